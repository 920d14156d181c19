//! `kms serve`: start a node of the deployment (`kms_deployment::node`) and serve until
//! SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use kms_deployment::config::{Config, LogFormat, MetricsSetting};
use kms_deployment::dev::{self, DevLayout};
use kms_deployment::node::{Node, NodeOptions};

use crate::error::Error;

/// Options of `kms serve`.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Config file (see the README); not needed with --dev.
    #[arg(long, conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Development mode: create (first start) or reuse a SoftHSM2 token, a RocksDB store and a
    /// development PKI under --data-dir (default ./.kms).
    #[arg(long)]
    dev: bool,
    /// Data-plane address, overriding the config (port 0 picks a free port).
    #[arg(long)]
    data_addr: Option<SocketAddr>,
    /// Admin-plane address, overriding the config (port 0 picks a free port).
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Metrics (`GET /metrics`) and health (`GET /health`) address, overriding the config's
    /// `[listen] metrics` (default 127.0.0.1:9464; port 0 picks a free port), or `off`. Plain
    /// HTTP on a loopback address only; elsewhere the config must name
    /// `[listen] metrics_client_ca`, and the listener speaks TLS.
    #[arg(long, value_parser = parse_metrics_addr)]
    metrics_addr: Option<MetricsSetting>,
    /// Log format, overriding the config's `[log] format`: `text` or `json` (one JSON object
    /// per line). Set RUST_LOG=info,kms::request=debug for a line per request.
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Serve without recording requests in the audit log, to measure what auditing costs.
    /// Development instances only.
    #[arg(long, requires = "dev", hide = true)]
    unaudited: bool,
    /// Allow every admitted workload every key, skipping Cedar, to measure what policy
    /// evaluation costs. Development instances only.
    #[arg(long, requires = "dev", hide = true)]
    no_policy: bool,
}

/// Opens and seeds the node before the async runtime exists.
pub(crate) fn prepare(args: &ServeArgs, data_dir: &Path) -> Result<Node, Error> {
    let config_path = match (&args.config, args.dev) {
        (Some(path), false) => path.clone(),
        (None, true) => dev::ensure(&DevLayout::new(data_dir.to_path_buf()))?,
        _ => {
            return Err(Error::Usage(
                "kms serve needs --config FILE, or --dev for a development instance".into(),
            ))
        }
    };
    Node::prepare(
        &config_path,
        &NodeOptions {
            dev: args.dev,
            data_addr: args.data_addr,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            unaudited: args.unaudited,
            no_policy: args.no_policy,
        },
    )
}

/// Serves, printing the bound addresses as one JSON line on stdout.
pub(crate) async fn run(node: Node) -> Result<(), Error> {
    node.run(|listening| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{listening}");
        let _ = out.flush();
    })
    .await
}

/// `off`, or an address.
fn parse_metrics_addr(s: &str) -> Result<MetricsSetting, String> {
    MetricsSetting::try_from(s.to_owned())
}

/// The log format `kms serve` runs with: the flag, else the config's `[log] format` (the
/// development config when `--dev`), else text. A config that does not load is reported by
/// start-up itself, in text.
pub(crate) fn log_format(args: &ServeArgs, data_dir: &Path) -> LogFormat {
    match args.log_format.as_deref() {
        Some("json") => return LogFormat::Json,
        Some(_) => return LogFormat::Text,
        None => {}
    }
    let path = match (&args.config, args.dev) {
        (Some(path), _) => path.clone(),
        (None, true) => DevLayout::new(data_dir.to_path_buf()).config(),
        (None, false) => return LogFormat::Text,
    };
    if !path.exists() {
        return LogFormat::Text;
    }
    Config::load(&path).map_or(LogFormat::Text, |c| c.log.format)
}
