//! Compiles the protobuf contract with protox (pure Rust, no system protoc).

use std::path::PathBuf;

use protox::prost::Message;

/// Messages with a plaintext or token field.
const SECRET_MESSAGES: [&str; 4] = [
    "GenerateDataKeyResponse",
    "DecryptResponse",
    "EncryptRequest",
    "CreateGrantResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["kms/v1/data.proto", "kms/v1/admin.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // One set per plane, so each listener's reflection describes only what it serves.
    for (plane, proto) in [("data", protos[0]), ("admin", protos[1])] {
        let one = protox::compile([proto], ["proto"])?;
        std::fs::write(
            out.join(format!("kms_{plane}_descriptor.bin")),
            one.encode_to_vec(),
        )?;
    }
    // Messages that carry plaintext get a hand-written Debug (lengths only) in lib.rs.
    tonic_prost_build::configure()
        .skip_debug(SECRET_MESSAGES.iter().map(|m| format!(".kms.v1.{m}")))
        .compile_fds(fds)?;
    Ok(())
}
