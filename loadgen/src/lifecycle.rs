//! Key creation or rotation, one request after another.

use std::time::Duration;

use crate::{key_request, micros_since, now, Error, Latencies};

/// Which key change to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lifecycle {
    /// A new key per request.
    Create,
    /// A new version of one key per request.
    Rotate,
}

/// Times `which` on the admin plane, one request after another for `duration` (the server
/// serialises key changes, so more callers would only queue). Each new version is escrowed
/// inside its store write, so this is also the cost of escrow at creation.
pub async fn lifecycle(
    admin: &mut api::AdminClient,
    which: Lifecycle,
    protection: api::v1::Protection,
    duration: Duration,
) -> Result<Latencies, Error> {
    let create = key_request(protection, ("purpose", "benchmark"));
    let key = admin.create_key(create.clone()).await?.into_inner().key_id;
    let mut out = Latencies::empty()?;
    let start = now();
    while start.elapsed() < duration {
        let t = now();
        let answer = match which {
            Lifecycle::Rotate => admin
                .rotate_key(api::v1::KeyRequest { key: key.clone() })
                .await
                .map(drop),
            Lifecycle::Create => admin.create_key(create.clone()).await.map(drop),
        };
        let _ = out.hist.record(micros_since(t));
        match answer {
            Ok(()) => out.items += 1,
            Err(s) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| s.message().to_owned());
            }
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}
