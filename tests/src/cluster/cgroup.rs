//! The cgroup v2 directories the nodes' agents attach their socket programs
//! to (hostNetwork clients of a node run inside its own).

use std::{fs, path::PathBuf};

/// The cgroup v2 directory a node's agent attaches its socket programs to;
/// hostNetwork clients of that node run inside it.
pub(super) fn node_cgroup(cluster_id: &str, node: &str) -> PathBuf {
    cgroup2_root().join(format!("{cluster_id}-{node}"))
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub(super) fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                after
                    .starts_with("cgroup2 ")
                    .then(|| before.split(' ').nth(4).map(PathBuf::from))
                    .flatten()
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}
