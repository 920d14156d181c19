//! `kms key ...` (admin plane) and `kms data ...` (data plane).

use std::collections::HashMap;
use std::path::PathBuf;

use api::v1::{
    CreateAliasRequest, CreateKeyRequest, DecryptRequest, EncryptRequest, GenerateDataKeyRequest,
    KeyMetadata, KeyRequest, ListKeysRequest, ReEncryptRequest,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::connect::{ConnectArgs, Plane};
use crate::error::{read, write_private, Error};
use crate::output::emit;

/// `kms key`: key lifecycle on the admin plane.
#[derive(Subcommand, Debug)]
pub(crate) enum KeyCommand {
    /// Create a key. Prints its metadata, including key_id.
    Create {
        /// Unique alias for the key.
        #[arg(long)]
        alias: Option<String>,
        /// Where the key's material lives: software (unwrapped in memory) or hsm (in the token).
        #[arg(long, default_value = "software", value_parser = ["software", "hsm"])]
        protection: String,
        /// A label, k=v; repeatable (e.g. --label owner=payments --label sensitivity=high).
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// Show a key's metadata.
    Describe {
        /// Key id or alias.
        key: String,
    },
    /// List keys, a page at a time.
    List {
        /// Keys per page (1-1000).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Continue from a previous page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Add a version; new encryptions use it and old versions still decrypt.
    Rotate {
        /// Key id or alias.
        key: String,
    },
    /// Disable a key: no cryptographic operation is allowed until it is enabled again.
    Disable {
        /// Key id or alias.
        key: String,
    },
    /// Enable a disabled key.
    Enable {
        /// Key id or alias.
        key: String,
    },
    /// Point an alias at a key (replacing the key's previous alias).
    Alias {
        /// The alias.
        alias: String,
        /// Key id or alias of the target key.
        key: String,
    },
}

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
    GenerateKey {
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
    },
    /// Decrypt a ciphertext blob: prints key_id and plaintext (base64).
    Decrypt {
        #[command(flatten)]
        input: CiphertextIn,
        #[command(flatten)]
        context: ContextArgs,
        /// Write the plaintext to this file (mode 0600) instead of printing it.
        #[arg(long)]
        plaintext_out: Option<PathBuf>,
    },
    /// Encrypt a small secret (at most 4096 bytes) under a key.
    Encrypt {
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
    },
    /// Re-encrypt a blob under a destination key without exposing the plaintext.
    ReEncrypt {
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
    },
}

/// Encryption context entries.
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

pub(crate) fn pairs(flag: &str, entries: &[String]) -> Result<HashMap<String, String>, Error> {
    let mut map = HashMap::new();
    for e in entries {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("{flag} expects K=V, got {e:?}")))?;
        if map.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(Error::Usage(format!("{flag}: {k:?} given twice")));
        }
    }
    Ok(map)
}

fn decode_b64(flag: &str, s: &str) -> Result<Vec<u8>, Error> {
    B64.decode(s.trim())
        .map_err(|_| Error::Usage(format!("{flag} is not valid base64")))
}

fn metadata_json(m: &KeyMetadata) -> Value {
    let protection = match api::v1::Protection::try_from(m.protection) {
        Ok(api::v1::Protection::Hsm) => "hsm",
        _ => "software",
    };
    let state = match api::v1::KeyState::try_from(m.state) {
        Ok(api::v1::KeyState::Enabled) => "enabled",
        Ok(api::v1::KeyState::Disabled) => "disabled",
        _ => "unknown",
    };
    json!({
        "key_id": m.key_id,
        "alias": if m.alias.is_empty() { Value::Null } else { Value::String(m.alias.clone()) },
        "labels": m.labels,
        "protection": protection,
        "state": state,
        "current_version": m.current_version,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
    })
}

pub(crate) async fn key(cmd: KeyCommand, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
    let (addr, tls) = conn.resolve(Plane::Admin)?;
    let mut client = tls.admin(&addr).await?;
    let req = |key: String| KeyRequest { key };
    let meta = match cmd {
        KeyCommand::Create {
            alias,
            protection,
            labels,
        } => {
            let protection = match protection.as_str() {
                "hsm" => api::v1::Protection::Hsm,
                _ => api::v1::Protection::Software,
            };
            client
                .create_key(CreateKeyRequest {
                    alias: alias.unwrap_or_default(),
                    protection: protection.into(),
                    labels: pairs("--label", &labels)?,
                })
                .await?
        }
        KeyCommand::Describe { key } => client.describe_key(req(key)).await?,
        KeyCommand::Rotate { key } => client.rotate_key(req(key)).await?,
        KeyCommand::Disable { key } => client.disable_key(req(key)).await?,
        KeyCommand::Enable { key } => client.enable_key(req(key)).await?,
        KeyCommand::Alias { alias, key } => {
            client
                .create_alias(CreateAliasRequest { alias, key })
                .await?
        }
        KeyCommand::List {
            page_size,
            page_token,
        } => {
            let page = client
                .list_keys(ListKeysRequest {
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            let keys: Vec<Value> = page.keys.iter().map(metadata_json).collect();
            return emit(
                as_json,
                &json!({ "keys": keys, "next_page_token": page.next_page_token }),
            );
        }
    };
    emit(as_json, &metadata_json(meta.get_ref()))
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

pub(crate) async fn data(args: DataArgs, conn: &ConnectArgs, as_json: bool) -> Result<(), Error> {
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
    let purpose = Extras {
        purpose: args.purpose.as_deref(),
        grant: args.grant.as_deref(),
        bearer: jwt.as_deref(),
    };
    match args.cmd {
        DataCommand::GenerateKey {
            key,
            context,
            without_plaintext,
            plaintext_out,
            ciphertext_out,
        } => {
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
                let r = client
                    .generate_data_key(with_purpose(request, purpose)?)
                    .await?
                    .into_inner();
                (r.key_id, r.key_version, Some(r.plaintext), r.ciphertext)
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
        DataCommand::Decrypt {
            input,
            context,
            plaintext_out,
        } => {
            let r = client
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
            out.insert("key_id".into(), r.key_id.into());
            out.insert("key_version".into(), r.key_version.into());
            if let Some(p) = secret_field(Some(r.plaintext), plaintext_out.as_ref())? {
                out.insert("plaintext".into(), p.into());
            }
            emit(as_json, &Value::Object(out))
        }
        DataCommand::Encrypt {
            key,
            plaintext,
            plaintext_file,
            context,
            ciphertext_out,
        } => {
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
        DataCommand::ReEncrypt {
            input,
            context,
            destination_key,
            destination_context,
            ciphertext_out,
        } => {
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
