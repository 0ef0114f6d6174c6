//! Listing and deleting namespaces, and removing those a killed test run left behind.

use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::NETNS_PREFIX;
use super::commands::run_ok;

/// Names of all named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let listing = run_ok("ip", &["netns", "list"])?;
    // Lines look like "name (id: 3)" or just "name".
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Kills every process in namespace `name`, then deletes it.
pub(super) fn delete_netns(name: &str) -> Result<()> {
    let own_pid = std::process::id();
    // Processes can fork while we kill; a few rounds catch their children too.
    for _round in 0..20 {
        let pids = run_ok("ip", &["netns", "pids", name])
            .with_context(|| format!("listing processes in netns {name} before deleting it"))?;
        let pids: Vec<i32> = pids
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if u32::try_from(pid) == Ok(own_pid) {
                continue; // never this test process, even if a thread left it behind
            }
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => bail!("killing pid {pid} in netns {name}: {errno}"),
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    run_ok("ip", &["netns", "delete", name])
        .with_context(|| format!("deleting netns {name}"))
        .map(drop)
}

/// Deletes namespaces left by test runs that died without cleaning up: names
/// `<prefix><pid>-…` whose pid no longer runs. Namespaces of live runs (including other
/// test processes running right now) and names without a pid after `prefix` are left
/// alone. Returns the names deleted.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    ensure!(
        !prefix.is_empty(),
        "an empty prefix would match every namespace; pass e.g. {NETNS_PREFIX:?}"
    );
    let mut deleted = Vec::new();
    for name in list_netns()? {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete_netns(&name)
            .with_context(|| format!("removing stale netns {name} of dead pid {pid}"))?;
        deleted.push(name);
    }
    Ok(deleted)
}
