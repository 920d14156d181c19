//! `kms hsm inspect`: every object in the token with the attributes an auditor needs (those
//! `pkcs11-tool -O` does not print among them), and which KMS object each one is. Objects the
//! KMS cannot account for are flagged.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use hsm_bridge::{ObjectReport, Pkcs11Hsm};
use kms_core::inspect::TokenInventory;
use kms_core::RocksStore;
use serde_json::{json, Value};

use crate::error::Error;
use crate::output::emit;

/// Token inspection.
#[derive(Subcommand, Debug)]
pub(crate) enum HsmCommand {
    /// List every token object with its security attributes and its role in the KMS
    /// (`--json`: one object per line).
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// The deployment's config file (default: the development config under --data-dir).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Runs an hsm command (blocking; before any async runtime exists).
pub(crate) fn run(cmd: HsmCommand, data_dir: &Path, as_json: bool) -> Result<(), Error> {
    let HsmCommand::Inspect(args) = cmd;
    let config_path = kms_deployment::open::config_path_or_dev(args.config.as_ref(), data_dir)?;
    let config = kms_deployment::config::Config::load(&config_path)?;
    kms_deployment::open::use_softhsm2_conf(&config);
    // Read-only: inspection works beside a running server.
    let store = config.data_dir.join("store");
    let inventory = if store.exists() {
        TokenInventory::read(&RocksStore::open_read_only(&store)?)?
    } else {
        TokenInventory::default()
    };
    let hsm = Pkcs11Hsm::open(&kms_deployment::open::hsm_config(&config, &config_path)?)?;
    let objects = hsm.inspect()?;
    let rows: Vec<Value> = objects.iter().map(|o| describe(&inventory, o)).collect();
    if as_json {
        for row in &rows {
            emit(true, row)?;
        }
        return Ok(());
    }
    for row in &rows {
        let flag = if row["flagged"] == true { "!" } else { " " };
        let attrs: Vec<&str> = [
            "trusted",
            "wrap_with_trusted",
            "sensitive",
            "always_sensitive",
            "extractable",
            "never_extractable",
            "local",
            "modifiable",
            "destroyable",
        ]
        .into_iter()
        .filter(|a| row[*a] == true)
        .collect();
        crate::output::raw(&format!(
            "{flag} {:<24} {:<16} {:<56} {}\n",
            row["kms_role"].as_str().unwrap_or("-"),
            row["class"].as_str().unwrap_or("-"),
            row["label"].as_str().unwrap_or("-"),
            attrs.join(",")
        ))?;
    }
    Ok(())
}

/// An object's attributes, its role, and whether it is flagged.
fn describe(inventory: &TokenInventory, o: &ObjectReport) -> Value {
    let found = inventory.classify(o);
    let mut row = json!({
        "kms_role": found.role.as_str(),
        "flagged": found.flagged,
        "label": o.label,
        "class": o.class,
        "key_type": o.key_type,
        "id": o.id,
        "token": o.token,
        "private": o.private,
        "sensitive": o.sensitive,
        "extractable": o.extractable,
        "always_sensitive": o.always_sensitive,
        "never_extractable": o.never_extractable,
        "local": o.local,
        "trusted": o.trusted,
        "wrap_with_trusted": o.wrap_with_trusted,
        "modifiable": o.modifiable,
        "destroyable": o.destroyable,
        "copyable": o.copyable,
        "encrypt": o.encrypt,
        "decrypt": o.decrypt,
        "wrap": o.wrap,
        "unwrap": o.unwrap,
        "sign": o.sign,
        "verify": o.verify,
        "derive": o.derive,
        "key_gen_mechanism": o.key_gen_mechanism,
        "allowed_mechanisms": o.allowed_mechanisms,
        "check_value": o.check_value,
        "value_len": o.value_len,
    });
    if let (Value::Object(map), Some(v)) = (&mut row, found.version) {
        map.insert("key_id".into(), json!(v.key_id.to_string()));
        map.insert("version".into(), json!(v.version.get()));
        map.insert("escrowed".into(), json!(v.escrowed));
    }
    row
}
