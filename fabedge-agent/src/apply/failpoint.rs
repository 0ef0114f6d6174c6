//! Test-only failure injection: make apply fail right after a named step
//! has written, to prove that the rollback undoes every step before it.
//!
//! Library tests set the step with [`super::Applier::fail_after`]. Tests of
//! the agent binary set `FABEDGE_TEST_FAIL_APPLY_FILE` to a file path: while
//! that file holds a step name, every apply fails after that step. Nothing
//! in a deployment sets either; without them this is inert.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The environment variable naming the trigger file (tests only).
pub const ENV: &str = "FABEDGE_TEST_FAIL_APPLY_FILE";

#[derive(Debug, Default, Clone)]
pub struct FailPoint {
    /// Fail after this step (library tests).
    pub step: Option<String>,
    /// Fail after the step this file names, while it exists (agent tests).
    pub file: Option<PathBuf>,
}

impl FailPoint {
    pub fn from_env() -> FailPoint {
        FailPoint {
            step: None,
            file: std::env::var_os(ENV).map(PathBuf::from),
        }
    }

    /// Fails when `step` is the one to fail after.
    pub fn check(&self, step: &str) -> Result<()> {
        let from_file = self
            .file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok());
        let armed =
            self.step.as_deref() == Some(step) || from_file.as_deref().map(str::trim) == Some(step);
        if armed {
            bail!("injected failure after step {step} (test only)");
        }
        Ok(())
    }
}
