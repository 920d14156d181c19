//! What a node holds, counted at each scrape: keys by state and protection level, the
//! versions they hold, live grants, workloads, registrations about to expire, pending
//! approvals. Gauges, set afresh at every scrape (a count that falls to zero reads 0).

use std::sync::Arc;

use kms_core::governance::approvals::ApprovalState;
use kms_core::{Kms, Protection};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::governance::Governance;

/// Registrations expiring within this many seconds are counted apart.
const EXPIRING_WITHIN: u64 = 7 * 86_400;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    state: &'static str,
    protection: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtectionLabels {
    protection: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActiveLabels {
    state: &'static str,
}

/// The counts, and what they are read from.
pub(crate) struct Census {
    kms: Arc<Kms>,
    gov: Arc<Governance>,
    keys: Family<KeyLabels, Gauge>,
    versions: Family<ProtectionLabels, Gauge>,
    grants: Gauge,
    workloads: Family<ActiveLabels, Gauge>,
    expiring: Gauge,
    approvals: Gauge,
}

impl std::fmt::Debug for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Census").finish_non_exhaustive()
    }
}

impl Census {
    /// Registers the gauges in `registry`, to be read from `kms` and `gov`.
    pub(crate) fn register(registry: &mut Registry, kms: Arc<Kms>, gov: Arc<Governance>) -> Self {
        let c = Self {
            kms,
            gov,
            keys: Family::default(),
            versions: Family::default(),
            grants: Gauge::default(),
            workloads: Family::default(),
            expiring: Gauge::default(),
            approvals: Gauge::default(),
        };
        registry.register(
            "keys",
            "Keys, by state and protection level",
            c.keys.clone(),
        );
        registry.register(
            "key_versions",
            "Key versions held in memory (usable), by protection level; 0 while sealed",
            c.versions.clone(),
        );
        registry.register(
            "grants_live",
            "Task grants neither revoked nor expired",
            c.grants.clone(),
        );
        registry.register(
            "workloads",
            "Registered workloads, by state (active, inactive)",
            c.workloads.clone(),
        );
        registry.register(
            "workloads_expiring_7d",
            "Active workload registrations that expire within 7 days",
            c.expiring.clone(),
        );
        registry.register(
            "approvals_pending",
            "Gated changes waiting for approvals",
            c.approvals.clone(),
        );
        c
    }

    /// Counts afresh. Reads the approval requests from the store: call it where blocking is
    /// allowed.
    pub(crate) fn refresh(&self) {
        // Every (state, protection) pair is listed, so a count that falls to zero reads 0.
        let census = self.kms.census();
        for c in &census {
            let labels = KeyLabels {
                state: c.state.as_str(),
                protection: c.protection.as_str(),
            };
            self.keys.get_or_create(&labels).set(gauge(c.keys));
        }
        for protection in Protection::ALL {
            let versions = census
                .iter()
                .filter(|c| c.protection == protection)
                .map(|c| c.versions)
                .sum::<u64>();
            self.versions
                .get_or_create(&ProtectionLabels {
                    protection: protection.as_str(),
                })
                .set(gauge(versions));
        }
        let now = self.gov.clock.now_unix();
        let live = self
            .gov
            .grants
            .list(|g| g.revoked.is_none() && g.expires_at > now)
            .len();
        self.grants.set(gauge(live));
        let workloads = self.gov.inventory.all();
        let active = workloads.iter().filter(|w| w.active).count();
        let expiring = workloads
            .iter()
            .filter(|w| w.active && w.expires_at <= now.saturating_add(EXPIRING_WITHIN))
            .count();
        let count = |state, n| {
            self.workloads
                .get_or_create(&ActiveLabels { state })
                .set(gauge(n));
        };
        count("active", active);
        count("inactive", workloads.len().saturating_sub(active));
        self.expiring.set(gauge(expiring));
        match self.gov.approvals.all() {
            Ok(all) => {
                let pending = all
                    .iter()
                    .filter(|r| r.state == ApprovalState::Pending)
                    .count();
                self.approvals.set(gauge(pending));
            }
            Err(e) => tracing::warn!(error = %e, "metrics: approvals could not be read"),
        }
    }
}

/// A count as a gauge value.
fn gauge(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}
