//! `kms serve --dev`: everything a development KMS needs, created under one directory on first
//! start and reused afterwards.
//!
//! ```text
//! .kms/
//!   kms.toml              the config this directory amounts to (usable with --config)
//!   softhsm2.conf         SoftHSM2 configuration pointing at tokens/
//!   tokens/               the SoftHSM2 token "sovereign-kms-dev"
//!   secrets/user.pin      random user PIN (0600); secrets/so.pin likewise
//!   store/                RocksDB
//!   pki/                  server CA, workload CA, operator CA, their leaf certificates
//!   endpoints.json        the addresses the running server bound, for client commands
//! ```

use std::path::{Path, PathBuf};

use kms_core::{Rng, SystemRng};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use secrecy::SecretString;

use crate::error::{write_private, write_public, Error};

/// Label of the development token.
pub(crate) const DEV_TOKEN_LABEL: &str = "sovereign-kms-dev";
/// Trust domain of the development workload certificate.
pub(crate) const DEV_TRUST_DOMAIN: &str = "dev.sovereign-kms.local";
/// Identity of the development workload certificate.
pub(crate) const DEV_WORKLOAD_ID: &str = "spiffe://dev.sovereign-kms.local/workload/demo";
/// Identity of the development operator certificate.
pub(crate) const DEV_OPERATOR_ID: &str = "spiffe://operators.sovereign-kms.local/operator/dev";

/// Paths inside a development directory.
pub(crate) struct DevLayout {
    pub(crate) root: PathBuf,
}

impl DevLayout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }
    pub(crate) fn config(&self) -> PathBuf {
        self.root.join("kms.toml")
    }
    pub(crate) fn softhsm2_conf(&self) -> PathBuf {
        self.root.join("softhsm2.conf")
    }
    pub(crate) fn pki(&self, name: &str) -> PathBuf {
        self.root.join("pki").join(name)
    }
    pub(crate) fn endpoints(&self) -> PathBuf {
        self.root.join("endpoints.json")
    }
}

/// Creates whatever is missing under `layout.root`: the token, PINs, PKI and config.
pub(crate) fn ensure(layout: &DevLayout) -> Result<PathBuf, Error> {
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::File {
            what: "cannot create directory",
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(&layout.root)?;
    mkdir(&layout.root.join("secrets"))?;
    // The token files and PINs are the keys to everything here: owner-only, like secrets/.
    restrict(&layout.root)?;
    restrict(&layout.root.join("secrets"))?;

    let token_dir = layout.root.join("tokens");
    if !token_dir.exists() {
        tracing::info!(dir = %layout.root.display(), "creating development SoftHSM2 token");
        let rng = SystemRng::new();
        let user_pin = random_pin(&rng)?;
        let so_pin = random_pin(&rng)?;
        hsm_bridge::softhsm::write_conf(&layout.softhsm2_conf(), &token_dir)?;
        let created = || -> Result<(), Error> {
            use secrecy::ExposeSecret;
            write_private(
                &layout.root.join("secrets/user.pin"),
                user_pin.expose_secret().as_bytes(),
            )?;
            write_private(
                &layout.root.join("secrets/so.pin"),
                so_pin.expose_secret().as_bytes(),
            )?;
            hsm_bridge::softhsm::init_token(
                &layout.softhsm2_conf(),
                DEV_TOKEN_LABEL,
                &so_pin,
                &user_pin,
            )?;
            Ok(())
        };
        if let Err(e) = created() {
            // Leave no half-made token behind: the next start tries again from scratch.
            let _ = std::fs::remove_dir_all(&token_dir);
            let _ = std::fs::remove_file(layout.root.join("secrets/user.pin"));
            let _ = std::fs::remove_file(layout.root.join("secrets/so.pin"));
            return Err(e);
        }
    }
    if !layout.pki("server.pem").exists() {
        tracing::info!("creating development PKI");
        // Start clean: a half-written PKI from an interrupted start is replaced whole.
        let _ = std::fs::remove_dir_all(layout.root.join("pki"));
        mkdir(&layout.root.join("pki"))?;
        make_pki(layout)?;
    }
    // Written on first start; rewritten when it predates trust bundles (it is generated, and
    // holds nothing an operator set).
    let outdated = std::fs::read_to_string(layout.config())
        .map(|text| text.contains("data_client_ca"))
        .unwrap_or(true);
    if outdated {
        write_public(&layout.config(), dev_config_text().as_bytes())?;
    }
    Ok(layout.config())
}

fn restrict(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        Error::File {
            what: "cannot restrict permissions of",
            path: dir.to_path_buf(),
            source,
        }
    })
}

fn random_pin(rng: &SystemRng) -> Result<SecretString, Error> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes)?;
    let pin: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    zeroize::Zeroize::zeroize(&mut bytes);
    Ok(SecretString::from(pin))
}

fn dev_config_text() -> String {
    format!(
        "# Written by `kms serve --dev`. Paths are relative to this file.\n\
         data_dir = \".\"\n\n\
         [hsm]\n\
         token_label = \"{DEV_TOKEN_LABEL}\"\n\
         pin_file = \"secrets/user.pin\"\n\
         softhsm2_conf = \"softhsm2.conf\"\n\n\
         [listen]\n\
         data = \"127.0.0.1:7443\"\n\
         admin = \"127.0.0.1:7444\"\n\n\
         [tls]\n\
         server_cert = \"pki/server.pem\"\n\
         server_key = \"pki/server.key\"\n\
         admin_client_ca = \"pki/operator-ca.pem\"\n\n\
         [[trust_bundle]]\n\
         trust_domain = \"{DEV_TRUST_DOMAIN}\"\n\
         bundle = \"pki/workload-ca.pem\"\n"
    )
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "sovereign-kms development");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String), Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn make_pki(layout: &DevLayout) -> Result<(), Error> {
    let uri = |s: &str| -> Result<SanType, Error> { Ok(SanType::URI(s.try_into()?)) };
    let dns = |s: &str| -> Result<SanType, Error> { Ok(SanType::DnsName(s.try_into()?)) };

    let server_ca = ca("sovereign-kms dev server CA")?;
    let workload_ca = ca("sovereign-kms dev workload CA")?;
    let operator_ca = ca("sovereign-kms dev operator CA")?;
    let server = leaf(
        &server_ca,
        "localhost",
        vec![dns("localhost")?, SanType::IpAddress([127, 0, 0, 1].into())],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let workload = leaf(
        &workload_ca,
        "demo workload",
        vec![uri(DEV_WORKLOAD_ID)?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let operator = leaf(
        &operator_ca,
        "dev operator",
        vec![uri(DEV_OPERATOR_ID)?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    write_public(&layout.pki("server-ca.pem"), server_ca.pem().as_bytes())?;
    write_public(&layout.pki("workload-ca.pem"), workload_ca.pem().as_bytes())?;
    write_public(&layout.pki("operator-ca.pem"), operator_ca.pem().as_bytes())?;
    for (name, (cert, key)) in [
        ("operator", operator),
        ("workload", workload),
        ("server", server),
    ] {
        write_private(&layout.pki(&format!("{name}.key")), key.as_bytes())?;
        // server.pem is written last of all: its presence marks the PKI as complete.
        write_public(&layout.pki(&format!("{name}.pem")), cert.as_bytes())?;
    }
    Ok(())
}
