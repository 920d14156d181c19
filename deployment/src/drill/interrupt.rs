//! What an interrupted drill must not leave behind, and the watcher that removes it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// What a drill interrupted by a signal must not leave behind: its temporary directory (a
/// working copy of every key, with the token's PINs beside it) and its server.
#[derive(Default)]
pub(super) struct Leftovers {
    pub(super) dir: Option<PathBuf>,
    pub(super) server: Option<rustix::process::Pid>,
}

/// On SIGINT or SIGTERM: stops the drill's server, removes its directory and exits 130. The
/// runtime is built here, on the calling thread, so that the thread it runs on only waits on
/// signals (it reads no environment while the drill sets SoftHSM2's). A SIGKILL cannot be
/// caught: then the directory stays in the system temporary directory (docs/DRILL.md).
pub(super) fn clean_up_on_signal(leftovers: Arc<Mutex<Leftovers>>) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::File {
            what: "cannot start the signal watcher of",
            path: "the drill".into(),
            source,
        })?;
    let (term, int) = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    });
    let (Ok(mut term), Ok(mut int)) = (term, int) else {
        tracing::warn!(
            "cannot watch for SIGINT and SIGTERM: an interrupted drill leaves its directory"
        );
        return Ok(());
    };
    std::thread::spawn(move || {
        let name = runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        });
        let (dir, server) = match leftovers.lock() {
            Ok(mut l) => (l.dir.take(), l.server.take()),
            Err(_) => (None, None),
        };
        if let Some(pid) = server {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let removed = match &dir {
            Some(d) => match std::fs::remove_dir_all(d) {
                Ok(()) => format!("{} removed", d.display()),
                Err(e) => format!(
                    "{} could not be removed ({e}): remove it by hand",
                    d.display()
                ),
            },
            None => "nothing to remove".into(),
        };
        let _ = writeln!(
            std::io::stderr().lock(),
            "kms: drill interrupted by {name}: its server stopped, {removed}; no report written"
        );
        std::process::exit(130);
    });
    Ok(())
}
