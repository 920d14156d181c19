//! Synthetic governance to measure authorisation against.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::v1::{PutPolicyRequest, RegisterWorkloadRequest};

use crate::{Approvers, Error};

/// Registrations run in this many parallel workers: each is its own synced write and two
/// audit records.
const WORKERS: u32 = 32;

/// Stores `policies` policies, each permitting one synthetic workload two actions under a
/// tenant context (each a real, schema-checked policy that does not apply to the benchmark's
/// own workload), plus the shipped restricted-hours forbid and a forbid of requests whose
/// `request` entry is `blocked` (both apply to every request; the second makes every
/// caller's decision depend on the `request` entry); and registers `identities` workloads,
/// expiring in 30 days. Adds to what is there.
pub async fn populate(
    admin: &mut api::AdminClient,
    approvers: &Approvers,
    policies: u32,
    identities: u32,
) -> Result<(), Error> {
    if policies > 0 {
        put(
            admin,
            approvers,
            "bench-restricted-hours",
            include_str!("../../examples/policies/restricted-hours.cedar").into(),
        )
        .await?;
        let blocked = "forbid (principal, action, resource)\nwhen {\n  \
                       context.encryption_context.hasTag(\"request\") &&\n  \
                       context.encryption_context.getTag(\"request\") == \"blocked\"\n};\n";
        put(admin, approvers, "bench-blocked-requests", blocked.into()).await?;
    }
    for i in 0..policies {
        let text = format!(
            "permit (\n  principal == Workload::\"spiffe://bench.example/svc-{i}\",\n  \
             action in [Action::\"GenerateDataKey\", Action::\"Decrypt\"],\n  resource\n)\n\
             when {{\n  context.encryption_context.hasTag(\"tenant\") &&\n  \
             context.encryption_context.getTag(\"tenant\") == \"t{i}\"\n}};\n"
        );
        put(admin, approvers, &format!("bench-{i}"), text).await?;
    }
    let expires_at = expiry_in(Duration::from_secs(30 * 86_400));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (mut admin, approvers) = (admin.clone(), approvers.clone());
            tokio::spawn(async move {
                for i in (w..identities).step_by(usize::try_from(WORKERS).unwrap_or(1)) {
                    let r = admin
                        .register_workload(RegisterWorkloadRequest {
                            selector: format!("spiffe://bench.example/svc-{i}"),
                            owner: format!("team-{}", i % 100),
                            purpose: "benchmark identity".into(),
                            labels: [("tier".to_owned(), "prod".to_owned())].into(),
                            expires_at,
                        })
                        .await?
                        .into_inner();
                    approvers.settle(r.approval.as_ref()).await?;
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await
            .map_err(|_| Error::Internal("a registration worker panicked"))??;
    }
    Ok(())
}

async fn put(
    admin: &mut api::AdminClient,
    approvers: &Approvers,
    id: &str,
    text: String,
) -> Result<(), Error> {
    let request = PutPolicyRequest {
        id: id.to_owned(),
        text,
    };
    let p = admin.put_policy(request).await?.into_inner();
    approvers.settle(p.approval.as_ref()).await
}

#[expect(
    clippy::disallowed_methods,
    reason = "registrations expire relative to the wall clock"
)]
fn expiry_in(d: Duration) -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |now| now.saturating_add(d).as_secs())
}
