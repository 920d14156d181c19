//! Whether a forbidden key and an unknown key are refused in the same time.

use api::v1::{GenerateDataKeyRequest, PolicyRequest, PutPolicyRequest};
use hdrhistogram::Histogram;

use crate::{key_request, micros_since, new_histogram, now, Approvers, Error};

/// Latencies of refusals of a forbidden key and of an unknown key.
#[derive(Debug)]
pub struct RefusalTiming {
    /// Requests for the key the caller is forbidden, in µs.
    pub forbidden: Histogram<u64>,
    /// Requests for a key that does not exist, in µs.
    pub unknown: Histogram<u64>,
    /// Of each, how many were answered PermissionDenied: (forbidden, unknown).
    pub refused: (u64, u64),
}

impl RefusalTiming {
    /// Median of the forbidden minus median of the unknown, in µs.
    pub fn median_gap_us(&self) -> i64 {
        let median =
            |h: &Histogram<u64>| i64::try_from(h.value_at_quantile(0.5)).unwrap_or(i64::MAX);
        median(&self.forbidden) - median(&self.unknown)
    }
}

const POLICY: &str = "bench-timing-forbidden";

/// Times `pairs` interleaved data-key requests (the order alternating within each pair) for
/// a key the caller is forbidden (made with a label that a forbid policy, put for the run and
/// deleted after it, names) and for a key that does not exist. Both are answered with the same
/// status and message, and should take the same time.
pub async fn refusal_timing(
    admin: &mut api::AdminClient,
    data: &mut api::DataClient,
    approvers: &Approvers,
    protection: api::v1::Protection,
    pairs: u32,
) -> Result<RefusalTiming, Error> {
    let key = admin
        .create_key(key_request(protection, ("timing", "forbidden")))
        .await?
        .into_inner()
        .key_id;
    let put = PutPolicyRequest {
        id: POLICY.into(),
        text: "forbid (principal, action, resource)\nwhen { resource.hasTag(\"timing\") && \
               resource.getTag(\"timing\") == \"forbidden\" };\n"
            .into(),
    };
    let p = admin.put_policy(put).await?.into_inner();
    approvers.settle(p.approval.as_ref()).await?;
    let unknown = "00000000-0000-4000-8000-00000000beef";
    let timing = time_pairs(data, &key, unknown, pairs).await;
    if let Ok(p) = admin
        .delete_policy(PolicyRequest { id: POLICY.into() })
        .await
    {
        let _ = approvers.settle(p.into_inner().approval.as_ref()).await;
    }
    timing
}

async fn time_pairs(
    data: &mut api::DataClient,
    key: &str,
    unknown: &str,
    pairs: u32,
) -> Result<RefusalTiming, Error> {
    let mut out = RefusalTiming {
        forbidden: new_histogram()?,
        unknown: new_histogram()?,
        refused: (0, 0),
    };
    for i in 0..pairs {
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for forbidden in order {
            let request = GenerateDataKeyRequest {
                key: if forbidden { key } else { unknown }.to_owned(),
                ..Default::default()
            };
            let t = now();
            let answer = data.generate_data_key(request).await;
            let us = micros_since(t);
            let denied = answer
                .err()
                .is_some_and(|s| s.code() == tonic::Code::PermissionDenied);
            let (hist, refused) = if forbidden {
                (&mut out.forbidden, &mut out.refused.0)
            } else {
                (&mut out.unknown, &mut out.refused.1)
            };
            let _ = hist.record(us);
            *refused += u64::from(denied);
        }
    }
    Ok(out)
}
