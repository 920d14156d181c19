//! `kms dev`: helpers for a development directory (the layout is `kms_deployment::dev`'s).

use std::path::Path;

use kms_deployment::dev::DevLayout;

use crate::error::Error;

/// `kms dev`: helpers for a development directory.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum DevCommand {
    /// Issue another operator certificate from the development operator CA
    /// (DATA_DIR/pki/NAME.pem and NAME.key). Registering it is a gated change:
    /// `kms operator register NAME --cert DATA_DIR/pki/NAME.pem --owner ... --role ...`.
    IssueOperator {
        /// Certificate name: 1-64 of a-z 0-9 _ - .
        name: String,
    },
    /// Move the development server's clock forward (for expiries and waiting periods in
    /// tests and drills); a running `kms serve --dev` sees it within 50 ms.
    AdvanceClock {
        /// How far: 25h, 8d, 90m.
        by: humantime::Duration,
    },
}

pub(crate) fn run(cmd: DevCommand, data_dir: &Path, as_json: bool) -> Result<(), Error> {
    let layout = DevLayout::new(data_dir.to_path_buf());
    match cmd {
        DevCommand::IssueOperator { name } => {
            let issued = layout.issue_new_operator(&name)?;
            crate::output::emit(
                as_json,
                &serde_json::json!({
                    "name": name,
                    "identity": issued.identity,
                    "certificate": issued.certificate.display().to_string(),
                    "key": issued.key.display().to_string(),
                }),
            )
        }
        DevCommand::AdvanceClock { by } => {
            let offset = layout.advance_clock(by.as_secs())?;
            // The server re-reads the offset at most every 50 ms.
            #[expect(
                clippy::disallowed_methods,
                reason = "waits once for a running dev server to see the new offset"
            )]
            std::thread::sleep(std::time::Duration::from_millis(120));
            crate::output::emit(as_json, &serde_json::json!({ "offset_secs": offset }))
        }
    }
}
