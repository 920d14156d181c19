//! `kms.toml`: everything `kms serve` needs when not in `--dev` mode.
//!
//! ```toml
//! data_dir = "/var/lib/sovereign-kms"   # RocksDB lives in data_dir/store
//!
//! [hsm]
//! module = "/usr/lib/softhsm/libsofthsm2.so"  # optional; SoftHSM2 is searched for
//! token_label = "sovereign-kms"
//! pin_file = "/etc/sovereign-kms/hsm.pin"     # or pin_env = "KMS_HSM_PIN"
//! softhsm2_conf = "/etc/softhsm/softhsm2.conf" # optional, SoftHSM2 only
//!
//! [listen]
//! data = "127.0.0.1:7443"
//! admin = "127.0.0.1:7444"
//!
//! [tls]
//! server_cert = "server.pem"
//! server_key = "server.key"
//! data_client_ca = "workload-ca.pem"
//! admin_client_ca = "operator-ca.pem"
//!
//! [audit]                                    # optional; these are the defaults
//! checkpoint_every = 10000                   # sign a checkpoint after this many records
//! checkpoint_interval_secs = 60              # ... and at least this often
//! # retention_days = 400                     # prune older records (default: keep all)
//! ```
//!
//! Relative paths are relative to the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::error::{read, Error};

/// The parsed config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) data_dir: PathBuf,
    pub(crate) hsm: HsmSection,
    #[serde(default)]
    pub(crate) listen: ListenSection,
    pub(crate) tls: TlsSection,
    #[serde(default)]
    pub(crate) audit: AuditSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditSection {
    #[serde(default = "default_checkpoint_every")]
    pub(crate) checkpoint_every: u64,
    #[serde(default = "default_checkpoint_interval")]
    pub(crate) checkpoint_interval_secs: u64,
    pub(crate) retention_days: Option<u64>,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval_secs: default_checkpoint_interval(),
            retention_days: None,
        }
    }
}

impl AuditSection {
    /// The audit log's settings.
    pub(crate) fn settings(&self) -> kms_core::audit::AuditConfig {
        kms_core::audit::AuditConfig::new(
            self.checkpoint_every,
            std::time::Duration::from_secs(self.checkpoint_interval_secs),
            self.retention_days
                .map(|d| std::time::Duration::from_secs(d.saturating_mul(86_400))),
        )
    }
}

fn default_checkpoint_every() -> u64 {
    10_000
}

fn default_checkpoint_interval() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HsmSection {
    pub(crate) module: Option<PathBuf>,
    pub(crate) token_label: String,
    pub(crate) pin_file: Option<PathBuf>,
    pub(crate) pin_env: Option<String>,
    pub(crate) softhsm2_conf: Option<PathBuf>,
    pub(crate) max_sessions: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenSection {
    #[serde(default = "default_data")]
    pub(crate) data: SocketAddr,
    #[serde(default = "default_admin")]
    pub(crate) admin: SocketAddr,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            data: default_data(),
            admin: default_admin(),
        }
    }
}

/// Default data-plane address.
pub(crate) fn default_data() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

/// Default admin-plane address.
pub(crate) fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7444))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) data_client_ca: PathBuf,
    pub(crate) admin_client_ca: PathBuf,
}

impl Config {
    /// Reads and parses `path`, resolving relative paths against its directory.
    pub(crate) fn load(path: &Path) -> Result<Self, Error> {
        let text = String::from_utf8(read(path)?).map_err(|_| Error::Config {
            file: path.to_path_buf(),
            setting: "(file)",
            problem: "not UTF-8".into(),
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            setting: "(syntax)",
            problem: e.message().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut config.data_dir);
        abs(&mut config.tls.server_cert);
        abs(&mut config.tls.server_key);
        abs(&mut config.tls.data_client_ca);
        abs(&mut config.tls.admin_client_ca);
        if let Some(p) = config.hsm.pin_file.as_mut() {
            abs(p);
        }
        if let Some(p) = config.hsm.softhsm2_conf.as_mut() {
            abs(p);
        }
        Ok(config)
    }

    /// The user PIN, from the file or the environment variable named in the config. Never
    /// from the command line.
    pub(crate) fn user_pin(&self, file: &Path) -> Result<SecretString, Error> {
        let missing = |problem: &str| Error::Config {
            file: file.to_path_buf(),
            setting: "hsm.pin_file",
            problem: problem.to_owned(),
        };
        let mut raw = match (&self.hsm.pin_file, &self.hsm.pin_env) {
            (Some(path), None) => {
                String::from_utf8(read(path)?).map_err(|_| missing("PIN file is not UTF-8"))?
            }
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| missing("the PIN environment variable is not set"))?,
            _ => return Err(missing("set exactly one of hsm.pin_file and hsm.pin_env")),
        };
        let pin = SecretString::from(raw.trim_end_matches(['\r', '\n']).to_owned());
        zeroize::Zeroize::zeroize(&mut raw);
        Ok(pin)
    }
}
