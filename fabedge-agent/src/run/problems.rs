//! Objects left out of the plan (see `model::checks`). Each is logged when
//! it appears, when it clears and when it comes back — never on every pass —
//! and the current list is kept in `<state-dir>/problems.json` for
//! `fabedge-agent inspect problems`, which runs as another process.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use log::{error, info, warn};

use crate::{model::checks::Problem, sys::write_if_changed};

pub const FILE_NAME: &str = "problems.json";

pub struct ProblemLog {
    current: BTreeSet<Problem>,
    path: PathBuf,
}

impl ProblemLog {
    pub fn new(state_dir: &Path) -> ProblemLog {
        ProblemLog {
            current: BTreeSet::new(),
            path: state_dir.join(FILE_NAME),
        }
    }

    /// The problems of the latest pass replace the previous ones.
    pub fn update(&mut self, problems: Vec<Problem>) {
        let latest: BTreeSet<Problem> = problems.into_iter().collect();
        if latest == self.current {
            return;
        }
        for problem in latest.difference(&self.current) {
            // An apply that failed was rolled back whole; anything else
            // left out one object and applied the rest.
            if problem.object.starts_with("apply (") {
                error!("{problem}");
            } else {
                error!("{problem} (left out; everything else is applied)");
            }
        }
        for problem in self.current.difference(&latest) {
            info!("resolved: {problem}");
        }
        self.current = latest;
        let written = serde_json::to_vec_pretty(&self.current)
            .map_err(anyhow::Error::from)
            .and_then(|json| write_if_changed(&self.path, &json, 0o644));
        if let Err(e) = written {
            warn!("recording problems in {}: {e:#}", self.path.display());
        }
    }

    pub fn count(&self) -> usize {
        self.current.len()
    }
}

/// The problems the running agent recorded last; none when it never did.
pub fn load(state_dir: &Path) -> Result<Vec<Problem>> {
    let path = state_dir.join(FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_recorded_when_they_change_and_cleared_when_they_go() {
        let dir = std::env::temp_dir().join(format!("fabedge-problems-{}", std::process::id()));
        let mut log = ProblemLog::new(&dir);
        let bad = Problem::new(
            "Node edge-9",
            "spec.podCIDR 10.244.1.0/24 overlaps node edge-1's",
        );
        log.update(vec![bad.clone()]);
        assert_eq!(load(&dir).unwrap(), vec![bad.clone()]);
        assert_eq!(log.count(), 1);
        log.update(vec![]);
        assert!(load(&dir).unwrap().is_empty());
        // The same problem coming back is recorded (and logged) again.
        log.update(vec![bad.clone()]);
        assert_eq!(load(&dir).unwrap(), vec![bad]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
