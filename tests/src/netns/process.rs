//! A background process inside a namespace, killed and reaped on drop, whose output the test can
//! read.

use std::fs;
use std::path::PathBuf;
use std::process::Child;

use anyhow::{Result, anyhow, bail};

// ---------------------------------------------------------------------------
// Background processes
// ---------------------------------------------------------------------------

/// A process started with [`Netns::spawn`]; killed on drop. Its stdout and stderr go to a
/// log file, removed on drop, that [`BackgroundProcess::log`] reads.
#[derive(Debug)]
pub struct BackgroundProcess {
    pub(super) child: Child,
    pub(super) command_line: String,
    pub(super) log_path: PathBuf,
}

impl BackgroundProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Fails, with its output, if the process has already exited — e.g. after giving it
    /// a moment to bind its port.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "`{}` exited early ({status}): {}",
                self.command_line,
                self.log().trim()
            ),
            Err(error) => {
                Err(anyhow!(error).context(format!("checking on `{}`", self.command_line)))
            }
        }
    }

    /// Kills the process and returns what it printed.
    pub fn stop(mut self) -> String {
        self.kill_and_reap();
        self.log()
    }

    fn kill_and_reap(&mut self) {
        // Errors mean it already exited; waiting reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
        let _ = fs::remove_file(&self.log_path);
    }
}
