//! `kms data`: envelope encryption on the data plane.

use std::path::PathBuf;

use api::v1::{DecryptRequest, EncryptRequest, GenerateDataKeyRequest, ReEncryptRequest};
use api::DataClient;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::connect::{ConnectArgs, Plane};
use crate::error::{read, write_private, Error};
use crate::input::pairs;
use crate::output::emit;

/// `kms data`: envelope operations on the data plane.
#[derive(Args, Debug)]
pub(crate) struct DataArgs {
    /// Why this request is made; sent as the kms-purpose header, recorded in the audit log,
    /// and visible to policy (which may require it).
    #[arg(long, global = true)]
    purpose: Option<String>,
    /// Present this task grant's token (sent as the kms-grant header, with this workload's
    /// own certificate).
    #[arg(long, global = true, env = "KMS_GRANT", hide_env_values = true)]
    grant: Option<String>,
    /// Authenticate with the JWT-SVID in this file (sent as `authorization: Bearer`) instead
    /// of a client certificate.
    #[arg(long, global = true)]
    jwt_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: DataCommand,
}

/// The data-plane operations.
#[derive(Subcommand, Debug)]
pub(crate) enum DataCommand {
    /// Generate a data key: prints key_id, key_version, plaintext and ciphertext (base64).
    GenerateKey(GenerateKey),
    /// Decrypt a ciphertext blob: prints key_id and plaintext (base64).
    Decrypt(Decrypt),
    /// Encrypt a small secret (at most 4096 bytes) under a key.
    Encrypt(Encrypt),
    /// Re-encrypt a blob under a destination key without exposing the plaintext.
    ReEncrypt(ReEncrypt),
}

#[derive(clap::Args, Debug)]
pub(crate) struct GenerateKey {
    /// Key id or alias.
    #[arg(long)]
    key: String,
    #[command(flatten)]
    context: ContextArgs,
    /// Leave out the plaintext (GenerateDataKeyWithoutPlaintext).
    #[arg(long)]
    without_plaintext: bool,
    /// Write the plaintext DEK to this file (mode 0600) instead of printing it.
    #[arg(long)]
    plaintext_out: Option<PathBuf>,
    /// Write the ciphertext blob to this file.
    #[arg(long)]
    ciphertext_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Decrypt {
    #[command(flatten)]
    input: CiphertextIn,
    #[command(flatten)]
    context: ContextArgs,
    /// Write the plaintext to this file (mode 0600) instead of printing it.
    #[arg(long)]
    plaintext_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Encrypt {
    /// Key id or alias.
    #[arg(long)]
    key: String,
    /// The plaintext, base64.
    #[arg(
        long,
        conflicts_with = "plaintext_file",
        required_unless_present = "plaintext_file"
    )]
    plaintext: Option<String>,
    /// Read the plaintext from this file.
    #[arg(long)]
    plaintext_file: Option<PathBuf>,
    #[command(flatten)]
    context: ContextArgs,
    /// Write the ciphertext blob to this file.
    #[arg(long)]
    ciphertext_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ReEncrypt {
    #[command(flatten)]
    input: CiphertextIn,
    #[command(flatten)]
    context: ContextArgs,
    /// Key id or alias to seal under (its current version).
    #[arg(long)]
    destination_key: String,
    /// Destination context entry, k=v; repeatable. Defaults to the source context.
    #[arg(long = "destination-context", value_name = "K=V")]
    destination_context: Vec<String>,
    /// Write the new blob to this file.
    #[arg(long)]
    ciphertext_out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ContextArgs {
    /// Encryption context entry, k=v; repeatable. Decrypt needs the same entries.
    #[arg(long = "context", value_name = "K=V")]
    context: Vec<String>,
}

/// A ciphertext given inline or as a file.
#[derive(Args, Debug)]
pub(crate) struct CiphertextIn {
    /// The ciphertext blob, base64.
    #[arg(
        long,
        conflicts_with = "ciphertext_file",
        required_unless_present = "ciphertext_file"
    )]
    ciphertext: Option<String>,
    /// Read the ciphertext blob from this file.
    #[arg(long)]
    ciphertext_file: Option<PathBuf>,
}

impl CiphertextIn {
    fn bytes(&self) -> Result<Vec<u8>, Error> {
        match (&self.ciphertext, &self.ciphertext_file) {
            (Some(b64), _) => decode_b64("--ciphertext", b64),
            (None, Some(path)) => read(path),
            (None, None) => Err(Error::Usage(
                "give --ciphertext or --ciphertext-file".into(),
            )),
        }
    }
}

/// What every data-plane request carries besides its message.
#[derive(Clone, Copy)]
struct Extras<'a> {
    purpose: Option<&'a str>,
    grant: Option<&'a str>,
    bearer: Option<&'a str>,
}

/// A request carrying the declared purpose and the grant, if any.
fn with_purpose<T>(message: T, extras: Extras<'_>) -> Result<tonic::Request<T>, Error> {
    let mut request = tonic::Request::new(message);
    if let Some(p) = extras.purpose {
        let value = tonic::metadata::AsciiMetadataValue::try_from(p).map_err(|_| {
            Error::Usage("--purpose must be printable ASCII (it travels as a header)".into())
        })?;
        request.metadata_mut().insert(server::PURPOSE_HEADER, value);
    }
    if let Some(jwt) = extras.bearer {
        let value = tonic::metadata::AsciiMetadataValue::try_from(format!("Bearer {}", jwt.trim()))
            .map_err(|_| Error::Usage("--jwt-file does not hold a JWT".into()))?;
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(g) = extras.grant {
        let value = tonic::metadata::AsciiMetadataValue::try_from(g.trim())
            .map_err(|_| Error::Usage("--grant is not a grant token".into()))?;
        request.metadata_mut().insert(server::GRANT_HEADER, value);
    }
    Ok(request)
}

pub(crate) async fn run(args: DataArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let jwt = args
        .jwt_file
        .as_ref()
        .map(|p| {
            String::from_utf8(read(p)?)
                .map_err(|_| Error::Usage(format!("{} is not a JWT", p.display())))
        })
        .transpose()?;
    let (addr, tls) = match jwt {
        Some(_) => conn.resolve_without_certificate(Plane::Data)?,
        None => conn.resolve(Plane::Data)?,
    };
    let mut client = tls.data(&addr).await?;
    let extras = Extras {
        purpose: args.purpose.as_deref(),
        grant: args.grant.as_deref(),
        bearer: jwt.as_deref(),
    };
    match args.cmd {
        DataCommand::GenerateKey(c) => c.run(&mut client, extras, as_json).await,
        DataCommand::Decrypt(c) => c.run(&mut client, extras, as_json).await,
        DataCommand::Encrypt(c) => c.run(&mut client, extras, as_json).await,
        DataCommand::ReEncrypt(c) => c.run(&mut client, extras, as_json).await,
    }
}

impl GenerateKey {
    async fn run(
        self,
        client: &mut DataClient,
        purpose: Extras<'_>,
        as_json: bool,
    ) -> Result<(), Error> {
        let Self {
            key,
            context,
            without_plaintext,
            plaintext_out,
            ciphertext_out,
        } = self;
        let request = GenerateDataKeyRequest {
            key,
            encryption_context: pairs("--context", &context.context)?,
            spec: api::v1::DataKeySpec::Aes256.into(),
        };
        let (key_id, key_version, plaintext, ciphertext) = if without_plaintext {
            let r = client
                .generate_data_key_without_plaintext(with_purpose(request, purpose)?)
                .await?
                .into_inner();
            (r.key_id, r.key_version, None, r.ciphertext)
        } else {
            let mut r = client
                .generate_data_key(with_purpose(request, purpose)?)
                .await?
                .into_inner();
            (
                std::mem::take(&mut r.key_id),
                r.key_version,
                Some(std::mem::take(&mut r.plaintext)),
                std::mem::take(&mut r.ciphertext),
            )
        };
        let mut out = serde_json::Map::new();
        out.insert("key_id".into(), key_id.into());
        out.insert("key_version".into(), key_version.into());
        if let Some(p) = secret_field(plaintext, plaintext_out.as_ref())? {
            out.insert("plaintext".into(), p.into());
        }
        out.insert(
            "ciphertext".into(),
            blob_field(&ciphertext, ciphertext_out.as_ref())?,
        );
        emit(as_json, &Value::Object(out))
    }
}

impl Decrypt {
    async fn run(
        self,
        client: &mut DataClient,
        purpose: Extras<'_>,
        as_json: bool,
    ) -> Result<(), Error> {
        let Self {
            input,
            context,
            plaintext_out,
        } = self;
        let mut r = client
            .decrypt(with_purpose(
                DecryptRequest {
                    ciphertext: input.bytes()?,
                    encryption_context: pairs("--context", &context.context)?,
                },
                purpose,
            )?)
            .await?
            .into_inner();
        let mut out = serde_json::Map::new();
        out.insert("key_id".into(), std::mem::take(&mut r.key_id).into());
        out.insert("key_version".into(), r.key_version.into());
        if let Some(p) = secret_field(
            Some(std::mem::take(&mut r.plaintext)),
            plaintext_out.as_ref(),
        )? {
            out.insert("plaintext".into(), p.into());
        }
        emit(as_json, &Value::Object(out))
    }
}

impl Encrypt {
    async fn run(
        self,
        client: &mut DataClient,
        purpose: Extras<'_>,
        as_json: bool,
    ) -> Result<(), Error> {
        let Self {
            key,
            plaintext,
            plaintext_file,
            context,
            ciphertext_out,
        } = self;
        let plaintext = match (plaintext, plaintext_file) {
            (Some(b64), _) => decode_b64("--plaintext", &b64)?,
            (None, Some(path)) => read(&path)?,
            (None, None) => {
                return Err(Error::Usage("give --plaintext or --plaintext-file".into()))
            }
        };
        let r = client
            .encrypt(with_purpose(
                EncryptRequest {
                    key,
                    plaintext,
                    encryption_context: pairs("--context", &context.context)?,
                },
                purpose,
            )?)
            .await?
            .into_inner();
        let out = json!({
            "key_id": r.key_id,
            "key_version": r.key_version,
            "ciphertext": blob_field(&r.ciphertext, ciphertext_out.as_ref())?,
        });
        emit(as_json, &out)
    }
}

impl ReEncrypt {
    async fn run(
        self,
        client: &mut DataClient,
        purpose: Extras<'_>,
        as_json: bool,
    ) -> Result<(), Error> {
        let Self {
            input,
            context,
            destination_key,
            destination_context,
            ciphertext_out,
        } = self;
        let r = client
            .re_encrypt(with_purpose(
                ReEncryptRequest {
                    ciphertext: input.bytes()?,
                    source_encryption_context: pairs("--context", &context.context)?,
                    destination_key,
                    destination_context_set: !destination_context.is_empty(),
                    destination_encryption_context: pairs(
                        "--destination-context",
                        &destination_context,
                    )?,
                },
                purpose,
            )?)
            .await?
            .into_inner();
        let out = json!({
            "source_key_id": r.source_key_id,
            "source_key_version": r.source_key_version,
            "key_id": r.key_id,
            "key_version": r.key_version,
            "ciphertext": blob_field(&r.ciphertext, ciphertext_out.as_ref())?,
        });
        emit(as_json, &out)
    }
}

fn decode_b64(flag: &str, s: &str) -> Result<Vec<u8>, Error> {
    B64.decode(s.trim())
        .map_err(|_| Error::Usage(format!("{flag} is not valid base64")))
}

/// Writes a secret to a 0600 file, or returns it base64-encoded for printing.
fn secret_field(secret: Option<Vec<u8>>, file: Option<&PathBuf>) -> Result<Option<String>, Error> {
    use zeroize::Zeroize;
    let Some(mut bytes) = secret else {
        return Ok(None);
    };
    let result = match file {
        Some(path) => write_private(path, &bytes).map(|()| None),
        None => Ok(Some(B64.encode(&bytes))),
    };
    bytes.zeroize();
    result
}

fn blob_field(blob: &[u8], file: Option<&PathBuf>) -> Result<Value, Error> {
    match file {
        Some(path) => {
            crate::error::write_public(path, blob)?;
            Ok(Value::String(format!("written to {}", path.display())))
        }
        None => Ok(Value::String(B64.encode(blob))),
    }
}
