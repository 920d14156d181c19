//! The per-second caches of decisions and Cedar contexts. Correctness never depends on them:
//! the time and every other input are part of each key.

use std::collections::HashMap;

use cedar_policy::Context;

use crate::governance::authz::Verdict;

/// At most this many remembered decisions per second; beyond it, decisions are evaluated
/// and not remembered.
const DECISION_CACHE_MAX: usize = 4096;

/// Decisions taken in the current second under the current policies.
#[derive(Default)]
pub(super) struct DecisionCache {
    generation: u64,
    second: u64,
    decisions: HashMap<Vec<u8>, Verdict>,
}

impl DecisionCache {
    pub(super) fn get(&self, generation: u64, key: &[u8]) -> Option<Verdict> {
        if self.generation != generation {
            return None;
        }
        self.decisions.get(key).cloned()
    }

    /// Remembers a decision taken under `generation` at `second`. A newer generation or a
    /// later second starts the cache over. A decision from an older generation (evaluated
    /// while the policies changed) is dropped, and so is one from a second or two ago (a
    /// request that was slow to finish), so that it does not empty the current second's cache;
    /// a clock stepped back further starts the cache over. Correctness never depends on
    /// this: the time is part of every key.
    pub(super) fn put(&mut self, generation: u64, second: u64, key: Vec<u8>, verdict: Verdict) {
        if generation < self.generation {
            return;
        }
        let late = second < self.second && second.saturating_add(2) >= self.second;
        if generation == self.generation && late {
            return;
        }
        if generation > self.generation || second != self.second {
            self.generation = generation;
            self.second = second;
            self.decisions.clear();
        }
        if self.decisions.len() < DECISION_CACHE_MAX {
            self.decisions.insert(key, verdict);
        }
    }
}

/// At most this many Cedar contexts per second.
const CONTEXT_CACHE_MAX: usize = 1024;

/// Cedar contexts built in the current second, by [`super::eval`]'s context key.
#[derive(Default)]
pub(super) struct ContextCache {
    second: u64,
    contexts: HashMap<Vec<u8>, Context>,
}

impl ContextCache {
    pub(super) fn get(&self, second: u64, key: &[u8]) -> Option<Context> {
        if second != self.second {
            return None;
        }
        self.contexts.get(key).cloned()
    }

    /// Remembers a context built for `second`; a later second starts the cache over and an
    /// earlier one is not remembered. The time is part of every key as well.
    pub(super) fn put(&mut self, second: u64, key: Vec<u8>, context: Context) {
        if second < self.second {
            return;
        }
        if second > self.second {
            self.second = second;
            self.contexts.clear();
        }
        if self.contexts.len() < CONTEXT_CACHE_MAX {
            self.contexts.insert(key, context);
        }
    }
}
