//! A bounded pool of PKCS#11 sessions, handed out by move.
//!
//! A `cryptoki::Session` is `Send` but not `Sync`, and SoftHSM2 crashes when two threads use
//! one session at once. So a session belongs to exactly one caller at a time: `take` moves it
//! out, the guard moves it back on drop, and a guard marked broken closes it instead.

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use parking_lot::{Condvar, Mutex};

use crate::error::Result;

pub(crate) struct SessionPool {
    idle: Mutex<PoolState>,
    freed: Condvar,
    max: usize,
}

struct PoolState {
    sessions: Vec<Session>,
    /// Sessions open in total: idle plus handed out.
    open: usize,
    /// Times a caller waited for a session (every one was handed out).
    waits: u64,
}

/// The session pool, as a node's metrics read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Sessions open: idle plus handed out.
    pub open: usize,
    /// Sessions idle in the pool.
    pub idle: usize,
    /// The most the pool opens.
    pub max: usize,
    /// Times a caller waited for a session, since the token was opened.
    pub waits: u64,
}

impl SessionPool {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            idle: Mutex::new(PoolState {
                sessions: Vec::new(),
                open: 0,
                waits: 0,
            }),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    /// Moves an idle session out of the pool, opening a new one if there is room, or waits.
    pub(crate) fn take<'p>(&'p self, ctx: &Pkcs11, slot: Slot) -> Result<PooledSession<'p>> {
        let mut state = self.idle.lock();
        loop {
            if let Some(session) = state.sessions.pop() {
                return Ok(PooledSession::new(self, session));
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return match ctx.open_rw_session(slot) {
                    Ok(session) => Ok(PooledSession::new(self, session)),
                    Err(e) => {
                        self.forget_one();
                        Err(e.into())
                    }
                };
            }
            state.waits = state.waits.saturating_add(1);
            self.freed.wait(&mut state);
        }
    }

    /// How the pool stands now.
    pub(crate) fn stats(&self) -> PoolStats {
        let state = self.idle.lock();
        PoolStats {
            open: state.open,
            idle: state.sessions.len(),
            max: self.max,
            waits: state.waits,
        }
    }

    /// Closes every idle session, e.g. after a device error made them all suspect.
    pub(crate) fn drain(&self) {
        let drained: Vec<Session> = {
            let mut state = self.idle.lock();
            let drained = std::mem::take(&mut state.sessions);
            state.open = state.open.saturating_sub(drained.len());
            drained
        };
        drop(drained);
        self.freed.notify_all();
    }

    fn put_back(&self, session: Session) {
        self.idle.lock().sessions.push(session);
        self.freed.notify_one();
    }

    fn forget_one(&self) {
        let mut state = self.idle.lock();
        state.open = state.open.saturating_sub(1);
        drop(state);
        self.freed.notify_one();
    }
}

/// A session on loan from the pool.
pub(crate) struct PooledSession<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
    broken: bool,
}

impl<'p> PooledSession<'p> {
    fn new(pool: &'p SessionPool, session: Session) -> Self {
        Self {
            pool,
            session: Some(session),
            broken: false,
        }
    }

    /// The session itself. Present for the guard's whole life.
    pub(crate) fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Marks the session unfit for reuse; it is closed instead of returned.
    pub(crate) fn discard(&mut self) {
        self.broken = true;
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if self.broken {
            // Session's own Drop closes it and logs a failure; it never panics.
            drop(session);
            self.pool.forget_one();
        } else {
            self.pool.put_back(session);
        }
    }
}

impl crate::Pkcs11Hsm {
    /// How the token's session pool stands now.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Operations retried on a fresh session after a session loss or device error, since the
    /// token was opened. The token stays logged in for the life of the process (one session
    /// keeps the login), so there are no re-logins to count.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }
}
