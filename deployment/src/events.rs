//! The audit events a deployment records outside the planes, one builder per family: a
//! node's start and stop, the token's failures, the custody ceremonies, and changes made
//! without the admin plane (start-up seeding, a drill's recovered copy). Each site adds its
//! own facts with [`AuditEvent::with`].

use std::fmt::Display;
use std::net::SocketAddr;

use kms_core::audit::AuditEvent;
use kms_core::governance::actions::AdminAction;

/// A node started, with its version, boot id and the addresses it bound.
pub(crate) fn server_start(boot: &str, data: SocketAddr, admin: SocketAddr) -> AuditEvent {
    AuditEvent::new("server.start", "ok")
        .with("version", env!("CARGO_PKG_VERSION"))
        .with("boot", boot)
        .with("data", data)
        .with("admin", admin)
}

/// A node stopped, cleanly or not.
pub(crate) fn server_stop(boot: &str, clean: bool) -> AuditEvent {
    AuditEvent::new("server.stop", if clean { "ok" } else { "error" }).with("boot", boot)
}

/// The token could not be opened.
pub(crate) fn hsm_open_failed(token: &str, error: &impl Display) -> AuditEvent {
    AuditEvent::new("hsm.open_failed", "error")
        .because(error.to_string())
        .with("token", token)
}

/// An HSM operation failed in a way worth one retry, and is being retried.
pub(crate) fn hsm_retry(error: &str) -> AuditEvent {
    AuditEvent::new("hsm.retry", "retrying").because(error)
}

/// A custody ceremony that writes the audit log itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ceremony {
    /// `kms ceremony init`.
    Init,
    /// `kms ceremony reshare`.
    Reshare,
    /// `kms ceremony verify-share`, offline.
    ShareVerified,
}

impl Ceremony {
    fn action(self) -> &'static str {
        match self {
            Self::Init => "ceremony.init",
            Self::Reshare => "ceremony.reshare",
            Self::ShareVerified => AdminAction::RecordShareVerification.as_str(),
        }
    }
}

/// A ceremony that completed; its facts follow.
pub(crate) fn ceremony_done(which: Ceremony) -> AuditEvent {
    AuditEvent::new(which.action(), "ok")
}

/// A ceremony that failed, and why.
pub(crate) fn ceremony_failed(which: Ceremony, error: &impl Display) -> AuditEvent {
    AuditEvent::new(which.action(), "error").because(error.to_string())
}

/// A change made outside the admin plane, by `principal`, to `target`; `after` is the
/// changed object's hash.
pub(crate) fn offline_change(
    principal: &str,
    action: AdminAction,
    target: &str,
    after: Option<String>,
) -> AuditEvent {
    let mut event = AuditEvent::new(action.as_str(), "ok")
        .by(principal)
        .with("target", target);
    event.after = after;
    event
}

/// A warning found at start-up, as `principal`.
pub(crate) fn start_up_warning(principal: &str, action: &str, warning: String) -> AuditEvent {
    AuditEvent::new(action, "warning")
        .by(principal)
        .because(warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_names_its_action_and_outcome() {
        let at = SocketAddr::from(([127, 0, 0, 1], 7443));
        let start = server_start("b1", at, at);
        assert_eq!(
            (start.action.as_str(), start.status.as_str()),
            ("server.start", "ok")
        );
        assert_eq!(
            start.detail.get("data").map(String::as_str),
            Some("127.0.0.1:7443")
        );
        assert_eq!(start.detail.len(), 4);
        assert_eq!(server_stop("b1", false).status, "error");
        let failed = ceremony_failed(Ceremony::Reshare, &"quorum short");
        assert_eq!(failed.action, "ceremony.reshare");
        assert_eq!(failed.reason.as_deref(), Some("quorum short"));
        assert_eq!(
            ceremony_done(Ceremony::ShareVerified).action,
            "ceremony.share_verified"
        );
        let change = offline_change("kms serve (start-up)", AdminAction::PutPolicy, "p", None);
        assert_eq!(change.detail.get("target").map(String::as_str), Some("p"));
        assert_eq!(change.principal.as_deref(), Some("kms serve (start-up)"));
    }
}
