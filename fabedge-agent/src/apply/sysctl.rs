//! Sysctls the plan sets, and the value each had before the agent first
//! changed it (`<state-dir>/sysctls-original.json`), so uninstall puts the
//! host back as it found it. A value we never changed is never recorded,
//! and a later agent start does not overwrite the first record.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};

use crate::sys::write_if_changed;

pub const ORIGINALS_FILE: &str = "sysctls-original.json";

fn proc_path(key: &str) -> std::path::PathBuf {
    Path::new("/proc/sys").join(key)
}

fn read(key: &str) -> Result<String> {
    let path = proc_path(key);
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("sysctl {key} does not exist ({})", path.display()))
}

/// The current value of sysctl `key`; `None` when it does not exist.
pub fn get(key: &str) -> Option<String> {
    read(key).ok()
}

fn load(path: &Path) -> Result<BTreeMap<String, String>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write sysctl `key` (below /proc/sys, `/`-separated) if it differs,
/// recording its value first in `state_dir` when one is given.
pub fn set(state_dir: Option<&Path>, key: &str, value: &str) -> Result<()> {
    let current = read(key)?;
    if current == value {
        return Ok(());
    }
    if let Some(dir) = state_dir {
        let path = dir.join(ORIGINALS_FILE);
        let mut originals = load(&path)?;
        if !originals.contains_key(key) {
            originals.insert(key.to_owned(), current);
            write_if_changed(&path, &serde_json::to_vec_pretty(&originals)?, 0o644)?;
        }
    }
    std::fs::write(proc_path(key), value).with_context(|| format!("setting sysctl {key}={value}"))
}

/// Put back every recorded sysctl and forget the record; returns what it did.
pub fn restore(state_dir: &Path) -> Result<Vec<String>> {
    let path = state_dir.join(ORIGINALS_FILE);
    let mut restored = Vec::new();
    for (key, value) in load(&path)? {
        match std::fs::write(proc_path(&key), &value) {
            Ok(()) => restored.push(format!("sysctl {key}={value} (restored)")),
            // An interface's sysctls vanish with it (br-fabedge is gone by now).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("restoring sysctl {key}={value}")),
        }
    }
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a network namespace of its own (per-namespace sysctls), so the
    /// host's values are never touched. Needs root, as the agent does.
    #[test]
    fn a_changed_sysctl_is_recorded_once_and_restored_by_uninstall() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            let dir = std::env::temp_dir().join(format!("fabedge-sysctl-{}", std::process::id()));
            let key = "net/ipv4/conf/all/send_redirects";
            let original = read(key).unwrap();
            let other = if original == "0" { "1" } else { "0" };
            set(Some(&dir), key, other).unwrap();
            assert_eq!(read(key).unwrap(), other);
            // A second change keeps the first record: the value before fabedge.
            set(Some(&dir), key, &original).unwrap();
            set(Some(&dir), key, other).unwrap();
            let recorded = load(&dir.join(ORIGINALS_FILE)).unwrap();
            assert_eq!(recorded.get(key), Some(&original));
            let restored = restore(&dir).unwrap();
            assert_eq!(restored, [format!("sysctl {key}={original} (restored)")]);
            assert_eq!(read(key).unwrap(), original);
            assert!(!dir.join(ORIGINALS_FILE).exists());
            let _ = std::fs::remove_dir_all(&dir);
        })
        .join()
        .expect("the test thread");
    }
}
