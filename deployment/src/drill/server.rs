//! The recovered copy's server, started as a child process of this binary on loopback, and
//! the data-plane client that asks it for every canary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::v1::{DecryptRequest, GenerateDataKeyRequest};
use api::ClientTls;
use kms_core::drill::CanaryCase;
use serde_json::Value;

use super::place::Place;
use super::{ms, now, Progress};
use crate::error::Error;

/// The recovered copy's server, a child process of this binary.
pub(super) struct Server {
    pub(super) child: Child,
    pub(super) data: String,
    log: PathBuf,
}

impl Server {
    pub(super) fn start(place: &Place) -> Result<Self, Error> {
        let exe = std::env::current_exe().map_err(|source| Error::File {
            what: "cannot find the kms binary",
            path: "current_exe".into(),
            source,
        })?;
        let log = place.dir.path().join("server.log");
        let log_file = std::fs::File::create(&log).map_err(|source| Error::File {
            what: "cannot create",
            path: log.clone(),
            source,
        })?;
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(place.dir.path())
            .arg("serve")
            .arg("--config")
            .arg(&place.config)
            .env("RUST_LOG", "warn")
            .env_remove("KMS_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|source| Error::File {
                what: "cannot start the recovered server from",
                path: place.config.clone(),
                source,
            })?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let announced: Option<String> = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("data")?.as_str().map(str::to_owned));
        match announced {
            Some(data) => Ok(Self { child, data, log }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::Usage(format!(
                    "the recovered server did not start: {}",
                    tail(&log)
                )))
            }
        }
    }

    /// Stops the server as an operator would (SIGTERM), so that it signs its last checkpoint.
    pub(super) fn stop(mut self) -> Result<(), Error> {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let waited_from = now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(Error::Usage(format!(
                        "the recovered server stopped with {status}: {}",
                        tail(&self.log)
                    )))
                }
                Ok(None) if waited_from.elapsed() < Duration::from_secs(60) => {
                    #[expect(
                        clippy::disallowed_methods,
                        reason = "waits for the recovered server to finish its stop"
                    )]
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(Error::Usage(
                        "the recovered server did not stop within 60 s; it was killed".into(),
                    ));
                }
            }
        }
    }
}

/// A drill that ends early (an error, a panic) leaves no server of the recovered copy
/// running: it is killed here unless [`Server::stop`] stopped it.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of the server's log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "its log is empty".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// What the data plane answered.
#[derive(Default)]
pub(super) struct Verified {
    pub(super) asked: usize,
    pub(super) per_level: BTreeMap<String, u64>,
    pub(super) failures: Vec<String>,
    pub(super) first_ok_ms: Option<u64>,
    pub(super) destroyed_refused: usize,
    pub(super) destroyed_problem: Option<String>,
}

// long: one async block: the canaries in flight, then the destroyed keys.
pub(super) fn verify_canaries(
    tls: &ClientTls,
    addr: &str,
    cases: Vec<CanaryCase>,
    destroyed: &[kms_core::KeyId],
    concurrency: usize,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Verified, Error> {
    use futures_util::stream::{self, StreamExt};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::File {
            what: "cannot start the async runtime for",
            path: "the drill's data-plane client".into(),
            source,
        })?;
    runtime.block_on(async move {
        let client = tls.data(addr).await?;
        let mut found = Verified {
            asked: cases.len(),
            ..Verified::default()
        };
        let mut answers = stream::iter(cases.into_iter().map(|case| {
            let mut client = client.clone();
            async move {
                let label = format!("{}/{}", case.key_id, case.version);
                let answer = client
                    .decrypt(DecryptRequest {
                        ciphertext: case.blob,
                        encryption_context: case.context.into_iter().collect(),
                    })
                    .await;
                let outcome = match answer {
                    Ok(r) => {
                        let r = r.into_inner();
                        // The response wipes its plaintext when dropped.
                        let hash = kms_core::audit::sha256_hex(&r.plaintext);
                        if r.key_id != case.key_id.to_string() || r.key_version != case.version {
                            Err(format!("{label}: opened as {}/{}", r.key_id, r.key_version))
                        } else if hash != case.dek_sha256 {
                            Err(format!(
                                "{label}: the DEK does not hash to the recorded value"
                            ))
                        } else {
                            Ok(())
                        }
                    }
                    Err(status) => Err(format!("{label}: {}", status.message())),
                };
                (case.protection, outcome)
            }
        }))
        .buffer_unordered(concurrency);
        while let Some((protection, outcome)) = answers.next().await {
            progress.inc(1);
            match outcome {
                Ok(()) => {
                    found.first_ok_ms.get_or_insert_with(|| ms(started));
                    *found
                        .per_level
                        .entry(protection.as_str().to_owned())
                        .or_default() += 1;
                }
                Err(e) => found.failures.push(e),
            }
        }
        for key in destroyed {
            let mut c = client.clone();
            let answer = c
                .generate_data_key(GenerateDataKeyRequest {
                    key: key.to_string(),
                    encryption_context: [(
                        "sovereign-kms/drill".to_owned(),
                        "destroyed".to_owned(),
                    )]
                    .into_iter()
                    .collect(),
                    spec: 0,
                })
                .await;
            match answer {
                Err(s) if s.message().contains("destroyed") => found.destroyed_refused += 1,
                Err(s) => {
                    found
                        .destroyed_problem
                        .get_or_insert(format!("{key}: refused, but with {:?}", s.message()));
                }
                Ok(_) => {
                    found
                        .destroyed_problem
                        .get_or_insert(format!("{key}: a data key was returned"));
                }
            }
        }
        Ok(found)
    })
}
