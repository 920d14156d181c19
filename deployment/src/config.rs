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
//! metrics = "127.0.0.1:9464"                  # or "off"; plain HTTP on loopback only, unless
//! # metrics_client_ca = "scraper-ca.pem"      # given: then TLS, and a client certificate
//!
//! [tls]
//! server_cert = "server.pem"
//! server_key = "server.key"
//! admin_client_ca = "operator-ca.pem"         # operators' CA (admin plane)
//!
//! # Workload trust domains (data plane). Each is stored at the first start that finds no
//! # bundle for its domain; afterwards `kms trust-bundle set` manages it without restarts.
//! [[trust_bundle]]
//! trust_domain = "prod.example.org"
//! bundle = "workload-ca.pem"                 # X.509-SVID CAs (PEM), and/or
//! jwks = "prod-jwks.json"                    # JWT-SVID keys (JWKS)
//!
//! [jwt]                                      # optional; the defaults
//! audience = "sovereign-kms"                 # every JWT-SVID's aud must include it
//! max_lifetime_secs = 900                    # refuse tokens valid for longer than this
//!
//! [inventory]                                # optional; the default
//! max_lifetime_days = 365                    # longest workload registration
//!
//! [grants]                                   # optional; the default
//! max_ttl_secs = 3600                        # longest task grant
//!
//! [keys]                                     # optional; the default
//! min_destroy_waiting_days = 7               # shortest wait before a key's destruction
//!
//! [approvals]                                # optional; the defaults
//! required = 2                               # approvals from operators other than the requester
//! expiry = "24h"                             # a request expires unless approved by then
//!
//! # Operators registered on first start, when the operator inventory is empty; afterwards
//! # `kms operator register|update|deactivate` (gated by approvals) manage them.
//! [[operator]]
//! name = "alice"
//! identity = "spiffe://operators.example.org/alice"  # or certificate = "alice.pem"
//! owner = "security team"
//! roles = ["operator"]                       # and/or "auditor"
//! expires_in = "365d"                        # the default
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
pub struct Config {
    /// The data directory: the store in `data_dir/store`, the endpoints file, exports.
    pub data_dir: PathBuf,
    /// `[hsm]`: the token.
    pub hsm: HsmSection,
    /// `[listen]`: the planes' addresses.
    #[serde(default)]
    pub listen: ListenSection,
    /// `[tls]`: the server certificate and the operators' CA.
    pub tls: TlsSection,
    /// `[audit]`: checkpoints and retention.
    #[serde(default)]
    pub audit: AuditSection,
    /// `[[trust_bundle]]`: workload trust domains stored at first start.
    #[serde(default)]
    pub trust_bundle: Vec<TrustBundleSection>,
    /// `[inventory]`: workload registrations.
    #[serde(default)]
    pub inventory: InventorySection,
    /// `[grants]`: task grants.
    #[serde(default)]
    pub grants: GrantsSection,
    /// `[jwt]`: JWT-SVIDs.
    #[serde(default)]
    pub jwt: JwtSection,
    /// `[keys]`: key lifecycle.
    #[serde(default)]
    pub keys: KeysSection,
    /// `[approvals]`: M-of-N approvals (first start only; then the stored rules).
    #[serde(default)]
    pub approvals: ApprovalsSection,
    /// Operators registered when the operator inventory is empty (first start only).
    #[serde(default)]
    pub operator: Vec<OperatorSection>,
    /// `[log]`: the server's log format.
    #[serde(default)]
    pub log: LogSection,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` (the default) or `json`: one JSON object per line.
    #[serde(default)]
    pub format: LogFormat,
}

/// `[log] format`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: time, level, target, message and the event's fields.
    Json,
}

/// `[keys]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// The shortest waiting period `kms key schedule-destroy` accepts, in days.
    #[serde(default = "default_min_destroy_waiting_days")]
    pub min_destroy_waiting_days: u32,
}

impl Default for KeysSection {
    fn default() -> Self {
        Self {
            min_destroy_waiting_days: default_min_destroy_waiting_days(),
        }
    }
}

fn default_min_destroy_waiting_days() -> u32 {
    7
}

impl KeysSection {
    /// The checked minimum: 1 to the longest waiting period.
    pub fn min_destroy_waiting_days(&self, file: &Path) -> Result<u32, Error> {
        let days = self.min_destroy_waiting_days;
        if days == 0 || days > kms_core::MAX_DESTROY_WAITING_DAYS {
            return Err(Error::Config {
                file: file.to_path_buf(),
                setting: "keys.min_destroy_waiting_days",
                problem: format!(
                    "must be 1 to {} days, not {days}",
                    kms_core::MAX_DESTROY_WAITING_DAYS
                ),
            });
        }
        Ok(days)
    }
}

/// `[approvals]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsSection {
    /// Approvals needed from operators other than the requester (M).
    #[serde(default = "default_required")]
    pub required: u32,
    /// How long a request waits for its approvals (`24h`, `90m`).
    #[serde(default = "default_expiry", with = "humantime_serde_compat")]
    pub expiry: std::time::Duration,
}

impl Default for ApprovalsSection {
    fn default() -> Self {
        Self {
            required: default_required(),
            expiry: default_expiry(),
        }
    }
}

fn default_required() -> u32 {
    2
}

fn default_expiry() -> std::time::Duration {
    std::time::Duration::from_secs(86_400)
}

impl ApprovalsSection {
    /// The approval rules this section seeds (every gatable action gated).
    pub fn rules(
        &self,
        file: &Path,
    ) -> Result<kms_core::governance::approvals::ApprovalRules, Error> {
        let gated = kms_core::governance::actions::GatedAction::ALL
            .iter()
            .copied()
            .collect();
        kms_core::governance::approvals::ApprovalRules::new(
            self.required,
            self.expiry.as_secs(),
            gated,
        )
        .map_err(|e| Error::Config {
            file: file.to_path_buf(),
            setting: "approvals",
            problem: e.to_string(),
        })
    }
}

/// `humantime` durations in the config (`"24h"`).
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// One `[[operator]]` of the bootstrap.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSection {
    /// The operator's name.
    pub name: String,
    /// The certificate's identity (URI SAN or `x509-sha256:<hex>`), or
    pub identity: Option<String>,
    /// the certificate itself (PEM), whose identity is taken as the admin plane takes it.
    pub certificate: Option<PathBuf>,
    /// Who answers for the operator.
    pub owner: String,
    /// `operator` and/or `auditor`.
    #[serde(default = "default_roles")]
    pub roles: Vec<String>,
    /// How long the registration lasts from first start (`365d`).
    #[serde(default = "default_operator_lifetime", with = "humantime_serde_compat")]
    pub expires_in: std::time::Duration,
}

fn default_roles() -> Vec<String> {
    vec!["operator".into()]
}

fn default_operator_lifetime() -> std::time::Duration {
    std::time::Duration::from_secs(365 * 86_400)
}

/// `[grants]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsSection {
    /// The longest task grant, in seconds.
    #[serde(default = "default_max_grant_ttl")]
    pub max_ttl_secs: u64,
}

impl Default for GrantsSection {
    fn default() -> Self {
        Self {
            max_ttl_secs: default_max_grant_ttl(),
        }
    }
}

fn default_max_grant_ttl() -> u64 {
    3600
}

impl GrantsSection {
    /// The grant store's settings.
    pub fn settings(&self) -> kms_core::governance::grants::GrantConfig {
        kms_core::governance::grants::GrantConfig {
            max_ttl_secs: self.max_ttl_secs,
        }
    }
}

/// One `[[trust_bundle]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleSection {
    /// The workload trust domain.
    pub trust_domain: String,
    /// CA certificates (PEM) for X.509-SVIDs.
    pub bundle: Option<PathBuf>,
    /// JWKS (JSON) for JWT-SVIDs.
    pub jwks: Option<PathBuf>,
}

/// `[jwt]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// The audience every JWT-SVID's `aud` must hold.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// The longest lifetime a JWT-SVID may have, in seconds.
    #[serde(default = "default_jwt_lifetime")]
    pub max_lifetime_secs: u64,
}

impl Default for JwtSection {
    fn default() -> Self {
        Self {
            audience: default_audience(),
            max_lifetime_secs: default_jwt_lifetime(),
        }
    }
}

fn default_audience() -> String {
    "sovereign-kms".into()
}

fn default_jwt_lifetime() -> u64 {
    900
}

impl JwtSection {
    /// The JWT-SVID settings.
    pub fn settings(&self) -> server::JwtConfig {
        server::JwtConfig {
            audience: self.audience.clone(),
            max_lifetime_secs: self.max_lifetime_secs,
        }
    }
}

/// `[inventory]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventorySection {
    /// The longest workload registration, in days.
    #[serde(default = "default_max_lifetime_days")]
    pub max_lifetime_days: u64,
}

impl Default for InventorySection {
    fn default() -> Self {
        Self {
            max_lifetime_days: default_max_lifetime_days(),
        }
    }
}

fn default_max_lifetime_days() -> u64 {
    365
}

impl InventorySection {
    /// The inventory's settings.
    pub fn settings(&self) -> kms_core::governance::inventory::InventoryConfig {
        kms_core::governance::inventory::InventoryConfig {
            max_lifetime_secs: self.max_lifetime_days.saturating_mul(86_400),
        }
    }
}

/// `[audit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Sign a checkpoint after this many records.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ... and at least this often, in seconds.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_secs: u64,
    /// Prune records older than this, in days (default: keep all).
    pub retention_days: Option<u64>,
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
    pub fn settings(&self) -> kms_core::audit::AuditConfig {
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

/// `[hsm]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// The PKCS#11 module (default: SoftHSM2, searched for).
    pub module: Option<PathBuf>,
    /// The token's label.
    pub token_label: String,
    /// A file holding the user PIN.
    pub pin_file: Option<PathBuf>,
    /// ... or the environment variable holding it.
    pub pin_env: Option<String>,
    /// SoftHSM2's configuration file (SoftHSM2 only).
    pub softhsm2_conf: Option<PathBuf>,
    /// The most sessions the pool opens.
    pub max_sessions: Option<usize>,
}

/// `[listen]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// The data plane's address.
    #[serde(default = "default_data")]
    pub data: SocketAddr,
    /// The admin plane's address.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Who may use gRPC reflection: `off`, `authenticated` (the default) or `open` (the
    /// default of `kms serve --dev`).
    #[serde(default)]
    pub reflection: Option<ReflectionSetting>,
    /// Where metrics and health are served, or `"off"`: plain HTTP on a loopback address, or
    /// TLS with client certificates from `metrics_client_ca` (required on any other address).
    #[serde(default)]
    pub metrics: MetricsSetting,
    /// The CA whose client certificates the metrics listener accepts: with it, the listener
    /// speaks TLS (the server certificate of `[tls]`) and requires a certificate.
    #[serde(default)]
    pub metrics_client_ca: Option<PathBuf>,
}

/// `[listen] metrics`: a loopback address (the default `127.0.0.1:9464`), or `"off"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
#[non_exhaustive]
pub enum MetricsSetting {
    /// No metrics listener.
    Off,
    /// Metrics and health on this loopback address.
    On(SocketAddr),
}

impl MetricsSetting {
    /// The address to serve metrics on, if any.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Self::Off => None,
            Self::On(addr) => Some(addr),
        }
    }
}

impl Default for MetricsSetting {
    fn default() -> Self {
        Self::On(SocketAddr::from(([127, 0, 0, 1], 9464)))
    }
}

impl TryFrom<String> for MetricsSetting {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        let addr: SocketAddr = s.parse().map_err(|_| {
            format!("{s:?} is neither \"off\" nor an address such as 127.0.0.1:9464")
        })?;
        Ok(Self::On(addr))
    }
}

/// `[listen] reflection`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ReflectionSetting {
    /// No reflection service.
    Off,
    /// Reflection for authenticated callers only.
    Authenticated,
    /// Reflection for anyone who completes the TLS handshake.
    Open,
}

impl From<ReflectionSetting> for server::Reflection {
    fn from(s: ReflectionSetting) -> Self {
        match s {
            ReflectionSetting::Off => server::Reflection::Off,
            ReflectionSetting::Authenticated => server::Reflection::Authenticated,
            ReflectionSetting::Open => server::Reflection::Open,
        }
    }
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            data: default_data(),
            admin: default_admin(),
            reflection: None,
            metrics: MetricsSetting::default(),
            metrics_client_ca: None,
        }
    }
}

/// Default data-plane address.
fn default_data() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

/// Default admin-plane address.
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7444))
}

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The server certificate (PEM), both planes.
    pub server_cert: PathBuf,
    /// Its private key (PEM).
    pub server_key: PathBuf,
    /// The operators' CA (admin plane client certificates).
    pub admin_client_ca: PathBuf,
}

/// The non-secret settings a backup bundle carries for a recovered deployment (never PINs,
/// paths or TLS material), as the `[section]`s of `kms.toml` name them.
pub fn deployment_settings(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "approvals": {
            "required": config.approvals.required,
            "expiry_secs": config.approvals.expiry.as_secs(),
        },
        "inventory": { "max_lifetime_days": config.inventory.max_lifetime_days },
        "grants": { "max_ttl_secs": config.grants.max_ttl_secs },
        "keys": { "min_destroy_waiting_days": config.keys.min_destroy_waiting_days },
        "audit": {
            "checkpoint_every": config.audit.checkpoint_every,
            "checkpoint_interval_secs": config.audit.checkpoint_interval_secs,
            "retention_days": config.audit.retention_days,
        },
        "jwt": {
            "audience": config.jwt.audience,
            "max_lifetime_secs": config.jwt.max_lifetime_secs,
        },
    })
}

impl Config {
    /// Reads and parses `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, Error> {
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
        for b in &mut config.trust_bundle {
            if let Some(p) = b.bundle.as_mut() {
                abs(p);
            }
            if let Some(p) = b.jwks.as_mut() {
                abs(p);
            }
        }
        abs(&mut config.tls.admin_client_ca);
        if let Some(p) = config.listen.metrics_client_ca.as_mut() {
            abs(p);
        }
        for o in &mut config.operator {
            if let Some(p) = o.certificate.as_mut() {
                abs(p);
            }
        }
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
    pub fn user_pin(&self, file: &Path) -> Result<SecretString, Error> {
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
