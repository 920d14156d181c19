//! Every admin-plane action, spelled once: [`AdminAction`] names what an operator can ask for
//! (as audit records and approval rules name it, `admin.CreateKey`), and [`GatedAction`] is
//! the subset that can wait for M-of-N approvals. Matching on them is exhaustive everywhere in
//! the workspace, so a new gated action that nothing executes does not compile.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, InvalidInput};

/// Declares an enum of action names: each variant and its `admin.` name once, with `ALL`,
/// `as_str`, `Display`, `FromStr` and serde as that name.
macro_rules! actions {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        #[expect(
            clippy::exhaustive_enums,
            reason = "matched exhaustively across the workspace: a new action must be handled"
        )]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every action, in the order declared.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The action's name in audit records and approval rules.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        /// Ordered by name, as the stored rules have always listed them.
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.as_str().cmp(other.as_str())
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self, Error> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|a| a.as_str() == s)
                    .ok_or(Error::Invalid(InvalidInput::Action))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(|_| {
                    serde::de::Error::custom(format!("unknown action {text:?}"))
                })
            }
        }
    };
}

actions! {
    /// A change that can be gated by M-of-N approvals, in the order the docs list them.
    GatedAction {
        /// Put a Cedar policy.
        PutPolicy = "admin.PutPolicy",
        /// Delete a Cedar policy.
        DeletePolicy = "admin.DeletePolicy",
        /// Set a trust domain's bundle.
        SetTrustBundle = "admin.SetTrustBundle",
        /// Remove a trust domain's bundle.
        DeleteTrustBundle = "admin.DeleteTrustBundle",
        /// Register a workload identity.
        RegisterWorkload = "admin.RegisterWorkload",
        /// Change a workload registration.
        UpdateWorkload = "admin.UpdateWorkload",
        /// Deactivate a workload registration.
        DeactivateWorkload = "admin.DeactivateWorkload",
        /// Reactivate a workload registration.
        ReactivateWorkload = "admin.ReactivateWorkload",
        /// Register an operator.
        RegisterOperator = "admin.RegisterOperator",
        /// Change an operator.
        UpdateOperator = "admin.UpdateOperator",
        /// Deactivate an operator.
        DeactivateOperator = "admin.DeactivateOperator",
        /// Unseal the service.
        Unseal = "admin.Unseal",
        /// Schedule a key's destruction.
        ScheduleKeyDestruction = "admin.ScheduleKeyDestruction",
        /// Export a backup bundle (a single-use ticket).
        ExportBackup = "admin.ExportBackup",
        /// Reshare the recovery authority offline (a single-use ticket).
        Reshare = "admin.Reshare",
        /// Change the approval rules themselves (always gated).
        SetApprovalRules = "admin.SetApprovalRules",
    }
}

actions! {
    /// Every action an operator can ask for on the admin plane, as audit records name it
    /// (`admin.` and the RPC for most; the two custody records by what they record).
    AdminAction {
        /// Approve a pending change.
        ApproveChange = "admin.ApproveChange",
        /// Sign a sovereignty statement.
        Attest = "admin.Attest",
        /// Cancel one's own pending change.
        CancelChange = "admin.CancelChange",
        /// Cancel a scheduled destruction.
        CancelKeyDestruction = "admin.CancelKeyDestruction",
        /// Give a key an alias.
        CreateAlias = "admin.CreateAlias",
        /// Create a key.
        CreateKey = "admin.CreateKey",
        /// Deactivate an operator.
        DeactivateOperator = "admin.DeactivateOperator",
        /// Deactivate a workload registration.
        DeactivateWorkload = "admin.DeactivateWorkload",
        /// Delete a Cedar policy.
        DeletePolicy = "admin.DeletePolicy",
        /// Remove a trust domain's bundle.
        DeleteTrustBundle = "admin.DeleteTrustBundle",
        /// Describe a key.
        DescribeKey = "admin.DescribeKey",
        /// Describe an operator.
        DescribeOperator = "admin.DescribeOperator",
        /// Describe a workload registration.
        DescribeWorkload = "admin.DescribeWorkload",
        /// Disable a key.
        DisableKey = "admin.DisableKey",
        /// Enable a key.
        EnableKey = "admin.EnableKey",
        /// Export a backup bundle.
        ExportBackup = "admin.ExportBackup",
        /// Read one approval request.
        GetApproval = "admin.GetApproval",
        /// Read the approval rules.
        GetApprovalRules = "admin.GetApprovalRules",
        /// Read a destruction receipt.
        GetDestructionReceipt = "admin.GetDestructionReceipt",
        /// Read a policy.
        GetPolicy = "admin.GetPolicy",
        /// Read the seal state.
        GetServiceStatus = "admin.GetServiceStatus",
        /// Read a key's escrow coverage.
        KeyCoverage = "admin.KeyCoverage",
        /// List approval requests.
        ListApprovals = "admin.ListApprovals",
        /// List grants.
        ListGrants = "admin.ListGrants",
        /// List keys.
        ListKeys = "admin.ListKeys",
        /// List operators.
        ListOperators = "admin.ListOperators",
        /// List policies.
        ListPolicies = "admin.ListPolicies",
        /// List trust bundles.
        ListTrustBundles = "admin.ListTrustBundles",
        /// List workload registrations.
        ListWorkloads = "admin.ListWorkloads",
        /// Read policy decision statistics.
        PolicyStats = "admin.PolicyStats",
        /// Put a Cedar policy.
        PutPolicy = "admin.PutPolicy",
        /// Read the audit log.
        QueryAudit = "admin.QueryAudit",
        /// Reactivate a workload registration.
        ReactivateWorkload = "admin.ReactivateWorkload",
        /// Record a provider-exit drill's report in the audit log.
        RecordDrill = "drill.recorded",
        /// Record that a custodian verified their share.
        RecordShareVerification = "ceremony.share_verified",
        /// Register an operator.
        RegisterOperator = "admin.RegisterOperator",
        /// Register a workload identity.
        RegisterWorkload = "admin.RegisterWorkload",
        /// Reject a pending change.
        RejectChange = "admin.RejectChange",
        /// Reshare the recovery authority (authorised online, run offline).
        Reshare = "admin.Reshare",
        /// Revoke grants.
        RevokeGrants = "admin.RevokeGrants",
        /// Rotate a key.
        RotateKey = "admin.RotateKey",
        /// Schedule a key's destruction.
        ScheduleKeyDestruction = "admin.ScheduleKeyDestruction",
        /// Seal the service.
        Seal = "admin.Seal",
        /// Change the approval rules.
        SetApprovalRules = "admin.SetApprovalRules",
        /// Set a trust domain's bundle.
        SetTrustBundle = "admin.SetTrustBundle",
        /// Try a request against the policies.
        TestPolicy = "admin.TestPolicy",
        /// Unseal the service.
        Unseal = "admin.Unseal",
        /// Change an operator.
        UpdateOperator = "admin.UpdateOperator",
        /// Change a workload registration.
        UpdateWorkload = "admin.UpdateWorkload",
        /// Who the caller is.
        WhoAmI = "admin.WhoAmI",
    }
}

impl GatedAction {
    /// The same action among every admin action.
    pub fn action(self) -> AdminAction {
        match self {
            GatedAction::PutPolicy => AdminAction::PutPolicy,
            GatedAction::DeletePolicy => AdminAction::DeletePolicy,
            GatedAction::SetTrustBundle => AdminAction::SetTrustBundle,
            GatedAction::DeleteTrustBundle => AdminAction::DeleteTrustBundle,
            GatedAction::RegisterWorkload => AdminAction::RegisterWorkload,
            GatedAction::UpdateWorkload => AdminAction::UpdateWorkload,
            GatedAction::DeactivateWorkload => AdminAction::DeactivateWorkload,
            GatedAction::ReactivateWorkload => AdminAction::ReactivateWorkload,
            GatedAction::RegisterOperator => AdminAction::RegisterOperator,
            GatedAction::UpdateOperator => AdminAction::UpdateOperator,
            GatedAction::DeactivateOperator => AdminAction::DeactivateOperator,
            GatedAction::Unseal => AdminAction::Unseal,
            GatedAction::ScheduleKeyDestruction => AdminAction::ScheduleKeyDestruction,
            GatedAction::ExportBackup => AdminAction::ExportBackup,
            GatedAction::Reshare => AdminAction::Reshare,
            GatedAction::SetApprovalRules => AdminAction::SetApprovalRules,
        }
    }
}

impl AdminAction {
    /// The action as one that approvals can gate, if it is one.
    pub fn gatable(self) -> Option<GatedAction> {
        GatedAction::ALL
            .iter()
            .copied()
            .find(|g| g.action() == self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_parses_from_its_name_and_names_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for a in AdminAction::ALL {
            assert_eq!(a.as_str().parse::<AdminAction>().ok(), Some(*a));
            assert!(seen.insert(a.as_str()), "{a} twice");
        }
        assert_eq!(AdminAction::ALL.len(), 50);
        assert!("admin.Nothing".parse::<AdminAction>().is_err());
    }

    #[test]
    fn each_gated_action_is_the_admin_action_of_the_same_name() {
        for g in GatedAction::ALL {
            assert_eq!(g.action().as_str(), g.as_str());
            assert_eq!(g.action().gatable(), Some(*g));
        }
        assert_eq!(AdminAction::CreateKey.gatable(), None);
        assert_eq!(GatedAction::ALL.len(), 16);
    }

    #[test]
    fn actions_are_stored_as_their_names() {
        let text = serde_json::to_string(&GatedAction::PutPolicy).ok();
        assert_eq!(text.as_deref(), Some("\"admin.PutPolicy\""));
        let back: Result<GatedAction, _> = serde_json::from_str("\"admin.Unseal\"");
        assert_eq!(back.ok(), Some(GatedAction::Unseal));
        assert!(serde_json::from_str::<GatedAction>("\"admin.CreateKey\"").is_err());
    }
}
