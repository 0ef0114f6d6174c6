//! The `cargo fuzz` suite of `cargo xtask test`: each libFuzzer target in
//! `fuzz/` runs for a bounded time from its checked-in corpus. A crash, a
//! panic or a hang fails the suite and names the input that caused it.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::toolchain::Nightly;

/// Every target of `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["manifest", "xfrm", "hello"];
/// Seconds per target unless `FABEDGE_FUZZ_SECONDS` says otherwise.
const DEFAULT_SECONDS: u64 = 20;
/// libFuzzer reports an input slower than this as a hang.
const HANG_SECONDS: u64 = 10;

/// Runs every target (or those `filter` names); one (suite name, passed,
/// time taken) per target.
pub fn run(workspace: &Path, filter: Option<&str>) -> Result<Vec<(String, bool, Duration)>> {
    let seconds = match std::env::var("FABEDGE_FUZZ_SECONDS") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("FABEDGE_FUZZ_SECONDS={text:?} is not a number of seconds"))?,
        Err(_) => DEFAULT_SECONDS,
    };
    let available = Nightly::current()
        .cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut suites = Vec::new();
    for target in TARGETS
        .iter()
        .filter(|t| filter.is_none_or(|f| t.contains(f) || "fuzz".contains(f)))
    {
        let name = format!("cargo fuzz {target} ({seconds} s)");
        if !available {
            println!(
                "xtask: `cargo fuzz` is missing: run `cargo xtask setup` (installs cargo-fuzz and {})",
                crate::toolchain::NIGHTLY
            );
            suites.push((name, false, Duration::ZERO));
            continue;
        }
        let started = Instant::now();
        let ok = run_target(workspace, target, seconds)?;
        suites.push((name, ok, started.elapsed()));
    }
    Ok(suites)
}

fn run_target(workspace: &Path, target: &str, seconds: u64) -> Result<bool> {
    let artifacts = workspace.join("fuzz/artifacts").join(target);
    let before = listing(&artifacts);
    // Built without a sanitizer: the targets are safe Rust, whose bugs are
    // panics and hangs that libFuzzer catches anyway, and an ASan build of
    // every dependency cost 35 minutes cold. The build is cached outside
    // the work tree, shared by every clone (CI included).
    let target_dir = crate::kube::cache_root()?.join("fuzz-target");
    println!("xtask: cargo fuzz {target} for {seconds} s");
    let status = Nightly::current()
        .cargo()
        .current_dir(workspace)
        .args(["fuzz", "run", target, "--sanitizer", "none", "--target-dir"])
        .arg(&target_dir)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={HANG_SECONDS}"))
        .status()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    if status.success() {
        return Ok(true);
    }
    let new: Vec<PathBuf> = listing(&artifacts).difference(&before).cloned().collect();
    if new.is_empty() {
        println!(
            "xtask: cargo fuzz {target} failed ({status}) without writing an input to {}",
            artifacts.display()
        );
    }
    for input in new {
        println!(
            "xtask: cargo fuzz {target} failed on {}; reproduce with `cargo +{} fuzz run {target} {}`",
            input.display(),
            crate::toolchain::NIGHTLY,
            input.display()
        );
    }
    Ok(false)
}

fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}
