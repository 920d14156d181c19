//! The one error type of the application layer, and of the `kms` command built on it.

use std::path::PathBuf;

/// Why a `kms` command failed. Each variant prints as one clear line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration setting is missing or wrong.
    #[error("config {}: {setting}: {problem}", file.display())]
    Config {
        /// The config file.
        file: PathBuf,
        /// The setting, e.g. `hsm.pin_file`.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A file could not be read or written.
    #[error("{what} {}", path.display())]
    File {
        /// What was being done, e.g. "cannot read".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HSM could not be opened.
    #[error(transparent)]
    Hsm(#[from] hsm_bridge::Error),
    /// The key service could not start.
    #[error("key service: {0}")]
    Core(#[from] kms_core::Error),
    /// A ceremony input (share, identity, custodian, transcript) was refused.
    #[error(transparent)]
    Recovery(#[from] recovery::Error),
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] server::Error),
    /// Connecting to a server failed.
    #[error(transparent)]
    Connect(#[from] api::ConnectError),
    /// The server refused or failed a request. Not a `#[source]`: the status is printed once,
    /// and `main` adds only its transport cause, if any.
    #[error("{}: {}", code_word(.0.code()), .0.message())]
    Rpc(tonic::Status),
    /// Caller input is unusable.
    #[error("{0}")]
    Usage(String),
    /// `kms audit verify` found the log broken.
    #[error("audit log broken at record {seq}: {problem}")]
    AuditBroken {
        /// The first broken sequence number.
        seq: u64,
        /// What is wrong there.
        problem: String,
    },
    /// `kms audit verify` found the log intact but its tail not covered by any signature.
    #[error(
        "audit log intact, but records {from}..{last} are not covered by a signed checkpoint: \
         they could have been dropped or rewritten unseen. Verify again after the next \
         checkpoint, give a head kept elsewhere (--expect-head, --expect-checkpoint), or \
         accept the tail with --allow-unanchored"
    )]
    AuditUnanchored {
        /// The first unsigned record.
        from: u64,
        /// The last record.
        last: u64,
    },
    /// A recovery ceremony refused its inputs; the target is untouched.
    #[error("recovery refused: {0}")]
    Restore(kms_core::restore::RestoreError),
    /// A reshare refused its inputs; nothing was written.
    #[error("reshare refused: {0}")]
    Reshare(#[from] kms_core::reshare::ReshareError),
    /// A bundle does not parse.
    #[error("{}: {source}", file.display())]
    Bundle {
        /// The file.
        file: std::path::PathBuf,
        /// Why.
        #[source]
        source: kms_core::bundle::BundleError,
    },
    /// An attestation did not verify.
    #[error("attestation does not verify: {0}")]
    Attest(#[from] kms_core::attest::AttestError),
    /// A destruction receipt did not verify.
    #[error("receipt does not verify: {0}")]
    Receipt(#[from] kms_core::receipt::ReceiptError),
    /// A drill ran and at least one check failed (each is named in its report).
    #[error("the provider-exit drill failed: {0} (see the report)")]
    DrillFailed(String),
    /// A drill report did not verify.
    #[error("drill report does not verify: {0}")]
    DrillReport(kms_core::drill::ReportError),
    /// A drill report is intact, but the audit export given does not show it recorded.
    #[error("{0}")]
    NotRecorded(String),
    /// The development PKI could not be generated.
    #[error("development pki")]
    Pki(#[from] rcgen::Error),
}

impl From<kms_core::restore::RestoreError> for Error {
    fn from(e: kms_core::restore::RestoreError) -> Self {
        Error::Restore(e)
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc(s)
    }
}

fn code_word(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Internal => "server error",
        _ => "request failed",
    }
}

impl Error {
    /// The error and its causes, each once: a wrapper that already shows its cause (`{0}`,
    /// or a transparent one) is not followed by the same text again.
    pub fn full_text(&self) -> String {
        let mut msg = self.to_string();
        let mut source = match self {
            Error::Rpc(status) => std::error::Error::source(status),
            other => std::error::Error::source(other),
        };
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.ends_with(&text) {
                msg.push_str(&format!(": {text}"));
            }
            source = s.source();
        }
        msg
    }

    /// The process exit code for this error: 2 for usage and configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config { .. } => 2,
            _ => 1,
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::File {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a new file readable by its owner only (0600) and syncs it; refuses to replace one.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file_err = |source| Error::File {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    f.write_all(bytes).map_err(file_err)?;
    f.sync_all().map_err(file_err)
}

/// Writes (or replaces) a file that holds nothing secret.
pub fn write_public(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::File {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file that must be UTF-8 text.
pub fn text_file(path: &std::path::Path) -> Result<String, Error> {
    String::from_utf8(read(path)?)
        .map_err(|_| Error::Usage(format!("{} is not UTF-8 text", path.display())))
}
