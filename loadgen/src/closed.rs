//! Callers that each send one request after another until a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::v1::data_plane_client::DataPlaneClient;
use api::v1::{
    decrypt_result, generate_data_key_result, BatchDecryptRequest, BatchGenerateDataKeyRequest,
    DecryptRequest, GenerateDataKeyRequest,
};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::{key_request, micros_since, now, Error, Latencies};

/// What each caller sends.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Workload {
    /// Data keys under a key made for the run; with `distinct_entry`, every request carries
    /// that encryption-context entry with a value of its own.
    GenerateDataKey {
        /// The entry that makes each request's context distinct, if any.
        distinct_entry: Option<String>,
    },
    /// Decryption of one data key made for the run.
    Decrypt,
    /// The gRPC health check (no key).
    Health,
}

/// One closed-loop run.
#[derive(Clone, Debug)]
pub struct ClosedLoop {
    /// What each caller sends.
    pub workload: Workload,
    /// Protection level of the key made for the run.
    pub protection: api::v1::Protection,
    /// Items per RPC; 1 uses the single-item RPC, more the batch RPC.
    pub batch: u32,
    /// Concurrent callers, spread over the channels in turn.
    pub callers: u32,
    /// How long the callers send.
    pub duration: Duration,
}

/// What a caller sends, made once for the run.
#[derive(Clone)]
enum Job {
    Decrypt(Vec<u8>),
    /// The key, and the entry that gives each request its own encryption context, if any.
    Generate(String, Option<Arc<str>>),
    Health,
}

/// Makes the run's key (on `admin`) and data, then runs `run.callers` callers over
/// `channels` (to the data plane) until `run.duration` has passed, and merges what they
/// measured.
pub async fn closed_loop(
    admin: &mut api::AdminClient,
    channels: &[Channel],
    run: &ClosedLoop,
) -> Result<Latencies, Error> {
    let first = channels
        .first()
        .ok_or(Error::Internal("a run needs at least one connection"))?;
    let job = job_for(admin, first, run).await?;
    let started = now();
    let deadline = started + run.duration;
    let callers = usize::try_from(run.callers).unwrap_or(1);
    let tasks: Vec<_> = channels
        .iter()
        .cycle()
        .take(callers)
        .map(|channel| tokio::spawn(caller(channel.clone(), job.clone(), run.batch, deadline)))
        .collect();
    let mut total = Latencies::empty()?;
    for t in tasks {
        let r = t
            .await
            .map_err(|_| Error::Internal("a benchmark caller panicked"))??;
        total
            .hist
            .add(&r.hist)
            .map_err(|_| Error::Internal("histogram merge"))?;
        total.items += r.items;
        total.errors += r.errors;
        total.first_error = total.first_error.or(r.first_error);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// The run's key (and, for decrypt, one data key under it).
async fn job_for(
    admin: &mut api::AdminClient,
    channel: &Channel,
    run: &ClosedLoop,
) -> Result<Job, Error> {
    if let Workload::Health = run.workload {
        return Ok(Job::Health);
    }
    let key = admin
        .create_key(key_request(run.protection, ("purpose", "benchmark")))
        .await?
        .into_inner()
        .key_id;
    Ok(match &run.workload {
        Workload::Decrypt => {
            let blob = DataPlaneClient::new(channel.clone())
                .generate_data_key_without_plaintext(gdk_request(&key))
                .await?
                .into_inner()
                .ciphertext;
            Job::Decrypt(blob)
        }
        Workload::GenerateDataKey { distinct_entry } => {
            Job::Generate(key, distinct_entry.as_deref().map(Arc::from))
        }
        Workload::Health => Job::Health,
    })
}

async fn caller(
    channel: Channel,
    job: Job,
    batch: u32,
    deadline: Instant,
) -> Result<Latencies, Error> {
    let mut clients = Clients {
        data: DataPlaneClient::new(channel.clone()),
        health: HealthClient::new(channel),
    };
    let mut out = Latencies::empty()?;
    while now() < deadline {
        let t0 = now();
        let outcome = clients.call(&job, batch).await;
        let _ = out.hist.record(micros_since(t0));
        match outcome {
            Ok(()) => out.items += u64::from(batch),
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(e);
            }
        }
    }
    Ok(out)
}

struct Clients {
    data: DataPlaneClient<Channel>,
    health: HealthClient<Channel>,
}

impl Clients {
    /// One RPC; a batch counts as failed if any item failed.
    async fn call(&mut self, job: &Job, batch: u32) -> Result<(), String> {
        let n = usize::try_from(batch).unwrap_or(1);
        match job {
            Job::Health => {
                let check = HealthCheckRequest {
                    service: String::new(),
                };
                self.health.check(check).await.map(drop).map_err(status)
            }
            Job::Generate(key, distinct) if batch == 1 => self
                .data
                .generate_data_key(gdk_request_for(key, distinct.as_deref()))
                .await
                .map(drop)
                .map_err(status),
            Job::Generate(key, distinct) => {
                let items = (0..n)
                    .map(|_| gdk_request_for(key, distinct.as_deref()))
                    .collect();
                let request = BatchGenerateDataKeyRequest {
                    items,
                    without_plaintext: false,
                };
                let r = self.data.batch_generate_data_key(request).await;
                first_failure(r.map_err(status)?.get_ref().results.iter().map(
                    |x| match &x.result {
                        Some(generate_data_key_result::Result::Ok(_)) => None,
                        Some(generate_data_key_result::Result::Error(e)) => Some(e.message.clone()),
                        None => Some("empty batch item".to_owned()),
                    },
                ))
            }
            Job::Decrypt(blob) if batch == 1 => self
                .data
                .decrypt(decrypt_request(blob))
                .await
                .map(drop)
                .map_err(status),
            Job::Decrypt(blob) => {
                let items = vec![decrypt_request(blob); n];
                let r = self.data.batch_decrypt(BatchDecryptRequest { items }).await;
                first_failure(r.map_err(status)?.get_ref().results.iter().map(
                    |x| match &x.result {
                        Some(decrypt_result::Result::Ok(_)) => None,
                        Some(decrypt_result::Result::Error(e)) => Some(e.message.clone()),
                        None => Some("empty batch item".to_owned()),
                    },
                ))
            }
        }
    }
}

/// The first failed item's message, if any item failed.
fn first_failure(mut items: impl Iterator<Item = Option<String>>) -> Result<(), String> {
    match items.find_map(|m| m) {
        Some(m) => Err(m),
        None => Ok(()),
    }
}

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// A request with the run's context, plus, when `distinct` names an entry, that entry with a
/// value unique in this process.
fn gdk_request_for(key: &str, distinct: Option<&str>) -> GenerateDataKeyRequest {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut r = gdk_request(key);
    if let Some(entry) = distinct {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        r.encryption_context.insert(entry.to_owned(), n.to_string());
    }
    r
}

fn gdk_request(key: &str) -> GenerateDataKeyRequest {
    GenerateDataKeyRequest {
        key: key.to_owned(),
        encryption_context: [("bench".to_owned(), "1".to_owned())].into(),
        spec: api::v1::DataKeySpec::Aes256.into(),
    }
}

fn decrypt_request(blob: &[u8]) -> DecryptRequest {
    DecryptRequest {
        ciphertext: blob.to_vec(),
        encryption_context: [("bench".to_owned(), "1".to_owned())].into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_requests_differ_only_in_their_entry() {
        let a = gdk_request_for("k", Some("message"));
        let b = gdk_request_for("k", Some("message"));
        assert_ne!(a.encryption_context, b.encryption_context);
        assert_eq!(a.encryption_context.get("bench"), Some(&"1".to_owned()));
        assert_eq!(gdk_request_for("k", None), gdk_request("k"));
    }

    #[test]
    fn a_batch_fails_on_its_first_failed_item() {
        assert_eq!(first_failure([None, None].into_iter()), Ok(()));
        let items = [None, Some("first".to_owned()), Some("second".to_owned())];
        assert_eq!(first_failure(items.into_iter()), Err("first".to_owned()));
    }
}
