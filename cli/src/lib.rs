//! # Design overview
//!
//! The `kms` command of sovereign-kms, as a library so that the binary and the end-to-end
//! tests run the same code. It keeps flags, prompts, progress bars and printing: each
//! subcommand parses its arguments and makes one call into the application layer
//! (`kms_deployment`: opening a deployment, starting a node, the ceremonies and the drill) or
//! one admin- or data-plane client call, and prints the result. It holds no server, host or
//! domain logic.
//!
//! ```text
//!   argv ─▶ clap ─▶ serve ─▶ kms_deployment::node (open, seed; before any thread) ─▶ tokio ─▶ server
//!                ├▶ ceremony / drill / dev ─▶ kms_deployment
//!                └▶ key / data / bench / ... ─▶ api client ─▶ gRPC over mTLS
//! ```

mod approval;
mod attest;
mod audit;
mod backup;
mod bench;
mod ceremony;
mod connect;
mod data;
mod dev;
mod drill;
mod error;
mod grant;
mod hsm;
mod identity;
mod input;
mod key;
mod operator;
mod output;
mod policy;
mod recover;
mod reshare;
mod seal;
mod serve;
mod trust_bundle;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::connect::ConnectArgs;
use crate::error::Error;

/// sovereign-kms: an organisation-operated key management service.
#[derive(Parser, Debug)]
#[command(name = "kms", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print results as one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (data plane and admin plane).
    Serve(serve::ServeArgs),
    /// Key lifecycle on the admin plane.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Envelope encryption on the data plane.
    Data(data::DataArgs),
    /// Trust bundles of workload trust domains (admin plane).
    #[command(subcommand, name = "trust-bundle")]
    TrustBundle(trust_bundle::TrustBundleCommand),
    /// The inventory of workload identities (admin plane).
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Cedar policies deciding data-plane requests (admin plane).
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Short-lived task grants: create and revoke as a workload, list and revoke as an operator.
    #[command(subcommand)]
    Grant(grant::GrantCommand),
    /// The tamper-evident audit log: verify, export, signer keys.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Backup bundles: export one (a gated change on the admin plane) and inspect one.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// A signed sovereignty statement from the running deployment (`--out FILE`), or its
    /// offline check (`verify FILE --public-key PEM`).
    Attest(attest::AttestArgs),
    /// Provider-exit drills: recover a bundle into an isolated place and prove every key
    /// version works (`provider-exit`), and check a drill's signed report (`verify-report`).
    #[command(subcommand)]
    Drill(drill::DrillCommand),
    /// Load-test a running server and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Custody ceremonies on the data directory (server stopped): init, verify a share,
    /// status.
    #[command(subcommand)]
    Ceremony(ceremony::CeremonyCommand),
    /// The token as an auditor sees it: every object, its security attributes and its role.
    #[command(subcommand)]
    Hsm(hsm::HsmCommand),
    /// The operator inventory: who may use the admin plane, with which role (admin plane).
    #[command(subcommand)]
    Operator(operator::OperatorCommand),
    /// M-of-N approvals of gated changes: list, show, approve, reject, cancel (admin plane).
    #[command(subcommand, alias = "approvals")]
    Approval(approval::ApprovalCommand),
    /// Emergency seal: refuse every data-plane call and drop key material from memory at
    /// once (any one operator; survives restarts).
    Seal(seal::SealArgs),
    /// Ask to unseal (gated: runs once M other operators approve).
    Unseal,
    /// Whether the service is sealed, by whom and why.
    Status,
    /// Development helpers: more operator certificates, a faster clock.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

/// Every leaf subcommand of `kms` (except `serve`, which would run until stopped) with a
/// placeholder for each required argument: for tests that run each one and check that none
/// panics, whatever it is given.
#[doc(hidden)]
pub fn minimal_invocations() -> Vec<Vec<String>> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    let mut pending = vec![(Vec::<String>::new(), Cli::command())];
    while let Some((path, mut cmd)) = pending.pop() {
        cmd.build();
        if cmd.has_subcommands() {
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "serve" || sub.get_name() == "help" {
                    continue;
                }
                let mut p = path.clone();
                p.push(sub.get_name().to_owned());
                pending.push((p, sub.clone()));
            }
            continue;
        }
        let mut args = path;
        for arg in cmd.get_arguments().filter(|a| a.is_required_set()) {
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
            match arg.get_long() {
                Some(long) => {
                    args.push(format!("--{long}"));
                    if takes_value {
                        args.push("x".into());
                    }
                }
                None => args.push("x".into()),
            }
        }
        out.push(args);
    }
    out.sort();
    out
}

/// Runs the `kms` command with the process's arguments and returns its exit code.
pub fn main() -> ExitCode {
    // Everything kms writes (the store, the audit log, keys, exports) is for its owner only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(args) => serve::log_format(args, &cli.connect.data_dir),
        _ => kms_deployment::config::LogFormat::Text,
    };
    start_logging(format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG (default `info`), as text or as JSON lines.
fn start_logging(format: kms_deployment::config::LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == kms_deployment::config::LogFormat::Json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    // The server opens the HSM before any runtime thread exists: SoftHSM2's configuration is
    // process-wide environment, set once here.
    let prepared = match cli.command {
        Command::Serve(ref args) => Some(serve::prepare(args, &cli.connect.data_dir)?),
        // Ceremonies open the token too, and need no runtime.
        Command::Ceremony(cmd) => return ceremony::run(cmd, &cli.connect, cli.json),
        Command::Hsm(cmd) => return hsm::run(cmd, &cli.connect.data_dir, cli.json),
        Command::Dev(cmd) => return dev::run(cmd, &cli.connect.data_dir, cli.json),
        // The drill opens tokens before it starts its own runtime, like the ceremonies.
        Command::Drill(cmd) => return drill::run(cmd, &cli.connect, cli.json),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::File {
            what: "cannot start the async runtime",
            path: "-".into(),
            source,
        })?;
    runtime.block_on(async move {
        match (cli.command, prepared) {
            (Command::Serve(_), Some(p)) => serve::run(p).await,
            (Command::Key(cmd), _) => key::run(cmd, &cli.connect, cli.json).await,
            (Command::Data(args), _) => data::run(args, &cli.connect, cli.json).await,
            (Command::TrustBundle(cmd), _) => trust_bundle::run(cmd, &cli.connect, cli.json).await,
            (Command::Identity(cmd), _) => identity::run(cmd, &cli.connect, cli.json).await,
            (Command::Policy(cmd), _) => policy::run(cmd, &cli.connect, cli.json).await,
            (Command::Grant(cmd), _) => grant::run(cmd, &cli.connect, cli.json).await,
            (Command::Audit(cmd), _) => audit::run(cmd, &cli.connect, cli.json).await,
            (Command::Backup(cmd), _) => backup::run(cmd, &cli.connect, cli.json).await,
            (Command::Attest(args), _) => attest::run(args, &cli.connect, cli.json).await,
            (Command::Bench(args), _) => bench::run(args, &cli.connect, cli.json).await,
            (Command::Operator(cmd), _) => operator::run(cmd, &cli.connect, cli.json).await,
            (Command::Approval(cmd), _) => approval::run(cmd, &cli.connect, cli.json).await,
            (Command::Seal(args), _) => seal::seal(args, &cli.connect, cli.json).await,
            (Command::Unseal, _) => seal::unseal(&cli.connect, cli.json).await,
            (Command::Status, _) => seal::status(&cli.connect, cli.json).await,
            (Command::Serve(_), None)
            | (Command::Ceremony(_), _)
            | (Command::Hsm(_), _)
            | (Command::Dev(_), _)
            | (Command::Drill(_), _) => Err(Error::Usage("internal: command not prepared".into())),
        }
    })
}

fn report(e: &Error) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "kms: {}", e.full_text());
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand's definition is valid (clap's own checks: no two arguments share an
    /// id or a flag, and so on) and its `--help` renders. A clap conflict panics at run time
    /// only when that subcommand is used, so each one is built here.
    #[test]
    fn every_subcommand_builds_and_renders_help() {
        Cli::command().debug_assert();
        let mut pending = vec![Cli::command()];
        let mut seen = 0;
        while let Some(mut cmd) = pending.pop() {
            cmd.build();
            let help = cmd.render_long_help().to_string();
            assert!(help.contains("Usage:"), "{}", cmd.get_name());
            seen += 1;
            pending.extend(cmd.get_subcommands().cloned());
        }
        assert!(seen > 40, "only {seen} commands found");
    }
}
