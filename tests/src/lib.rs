#![allow(
    clippy::disallowed_methods,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test harness: a failed step is a failed test"
)]
//! Harness for end-to-end tests: runs the real `kms` binary (`kms serve --dev` on ephemeral
//! loopback ports, with its own SoftHSM2 token and RocksDB under a temporary directory) and the
//! real CLI and gRPC clients against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `kms serve --dev`, killed when dropped.
pub struct Server {
    child: Child,
    /// The binary under test.
    pub bin: PathBuf,
    /// The working directory; state lives in `dir/.kms`.
    pub dir: PathBuf,
    /// Bound data-plane address.
    pub data: String,
    /// Bound admin-plane address.
    pub admin: String,
    /// The metrics and health listener's address.
    pub metrics: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `bin serve --dev` in `dir` on ephemeral ports and waits until it listens.
    /// `$KMS_BIN`, when set, replaces `bin` (to test an installed build).
    pub fn start(bin: &str, dir: &Path) -> Server {
        Self::start_with(bin, dir, "info")
    }

    /// The same, with `RUST_LOG` set to `log_filter`.
    pub fn start_with(bin: &str, dir: &Path, log_filter: &str) -> Server {
        Self::start_with_args(bin, dir, log_filter, &[])
    }

    /// The same, with `extra` added to `kms serve`'s arguments.
    pub fn start_with_args(bin: &str, dir: &Path, log_filter: &str, extra: &[&str]) -> Server {
        let bin = std::env::var_os("KMS_BIN").map_or_else(|| PathBuf::from(bin), PathBuf::from);
        let mut child = serve_dev(&bin, dir)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", log_filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kms serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        // Keep the server's log, and forward it to the test's stderr so failures show it.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kms serve] {line}");
                let mut all = kept.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("kms serve did not announce its listeners");
        let v: Value = serde_json::from_str(&line).expect("listening line is JSON");
        assert_eq!(v["event"], "listening");
        Server {
            child,
            bin,
            dir: dir.to_path_buf(),
            data: v["data"].as_str().unwrap_or_default().to_owned(),
            admin: v["admin"].as_str().unwrap_or_default().to_owned(),
            metrics: v["metrics"].as_str().unwrap_or_default().to_owned(),
            log,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for `needle` to appear in the server's log.
    pub fn log_shows(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; returns the server's whole log.
    pub fn stop(self) -> String {
        let log = self.log.clone();
        let status = self.terminate();
        assert!(status.success(), "kms serve exited with {status}");
        // The reader thread may still be draining the pipe.
        std::thread::sleep(Duration::from_millis(200));
        let all = log.lock().unwrap().clone();
        all
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit and returns its status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for kms serve")
    }

    /// Runs a `kms` client command in the server's directory.
    pub fn kms(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("run kms")
    }

    /// Runs a `kms ... --json` command that must succeed, and parses its output.
    pub fn kms_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.kms(&all);
        assert!(
            out.status.success(),
            "kms {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("kms --json prints JSON")
    }

    /// Runs a gated change (`kms ARGS --json`, as operator1 unless ARGS hold `--as`), checks
    /// that it waits for approvals, and has the other development operators approve it until
    /// it runs. Returns the executed approval request (its `result.after` is the object the
    /// change made).
    pub fn kms_approved(&self, args: &[&str]) -> Value {
        let asked = self.kms_json(args);
        assert_eq!(
            asked["state"], "pending",
            "kms {args:?} did not wait: {asked}"
        );
        self.approve_all(args, asked)
    }

    /// Runs `kms ARGS --json`, which must succeed; when the change waits for approvals, has it
    /// approved as [`Server::kms_approved`] does. Returns what the command printed, or the
    /// executed approval request.
    pub fn kms_change(&self, args: &[&str]) -> Value {
        let printed = self.kms_json(args);
        if printed["state"] == "pending" && printed["approval_id"].is_string() {
            return self.approve_all(args, printed);
        }
        printed
    }

    fn approve_all(&self, args: &[&str], asked: Value) -> Value {
        let id = asked["approval_id"]
            .as_str()
            .expect("approval_id")
            .to_owned();
        let requester = args
            .iter()
            .position(|a| *a == "--as")
            .and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or("operator1");
        let mut last = asked;
        for approver in ["operator1", "operator2", "operator3"] {
            if approver == requester {
                continue;
            }
            last = self.kms_json(&["--as", approver, "approval", "approve", &id]);
            if last["state"] != "pending" {
                break;
            }
        }
        assert_eq!(
            last["state"], "executed",
            "kms {args:?} did not run: {last}"
        );
        last
    }

    /// TLS material of the dev PKI for a client with `who`'s certificate.
    pub fn client_tls(&self, who: &str) -> api::ClientTls {
        let pki = self.dir.join(".kms/pki");
        let read = |name: &str| std::fs::read(pki.join(name)).expect("dev pki file");
        api::ClientTls {
            server_ca_pem: read("server-ca.pem"),
            cert_pem: read(&format!("{who}.pem")),
            key_pem: read(&format!("{who}.key")),
            server_name: "localhost".into(),
        }
    }
}

/// `bin serve --dev` in `dir` on ephemeral data and admin ports, not started: for a test that
/// adds flags of its own or expects the start to fail.
pub fn serve_dev(bin: impl AsRef<std::ffi::OsStr>, dir: &Path) -> Command {
    let mut command = Command::new(bin);
    command.current_dir(dir).args([
        "serve",
        "--dev",
        "--data-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    command
}

/// Runs `kms ARGS` (the binary `bin`) with `dir` as its working directory, where `.kms` is
/// the development data directory.
pub fn kms_in(bin: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run kms")
}

/// Every audit event in the log of a stopped server's directory `dir` (`kms audit export`).
pub fn audit_events(bin: &str, dir: &Path) -> Vec<Value> {
    let out = Command::new(bin)
        .current_dir(dir)
        .args(["audit", "export", "--since", "1"])
        .output()
        .expect("run kms audit export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| l.get("record").map(|r| r["event"].clone()))
        .collect()
}

/// `pkcs11-tool -O` (opensc) on the development token under `dir/.kms`, as an auditor runs
/// it: every object's attributes as the tool prints them.
pub fn pkcs11_tool_objects(dir: &Path) -> String {
    let kms_dir = dir.join(".kms");
    let pin = std::fs::read_to_string(kms_dir.join("secrets/user.pin")).unwrap();
    let module = softhsm_module();
    let out = Command::new("pkcs11-tool")
        .current_dir(dir)
        .env("SOFTHSM2_CONF", kms_dir.join("softhsm2.conf"))
        .args(["--module", &module, "--token-label", "sovereign-kms-dev"])
        .args(["--login", "--pin", pin.trim(), "-O"])
        .output()
        .expect("pkcs11-tool is installed (opensc, scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The SoftHSM2 module on this machine.
pub fn softhsm_module() -> String {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .find(|p| Path::new(p).is_file())
    .expect("SoftHSM2 module")
    .to_owned()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
