//! The nightly Rust that the eBPF object (`-Z build-std`) and the fuzz
//! targets (sanitizer flags) need, pinned so every machine builds the kernel
//! object with the same compiler. `cargo xtask setup` installs it through
//! rustup with `rust-src`; when the Rust dist server cannot be reached it
//! says so and falls back to stable with `RUSTC_BOOTSTRAP=1`.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Same compiler as the unpinned nightly this project was developed with
/// (`rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`).
pub const NIGHTLY: &str = "nightly-2026-05-20";

/// The toolchain to run nightly-only builds with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nightly {
    Pinned,
    /// Stable with `RUSTC_BOOTSTRAP=1`: the dist server was unreachable.
    StableBootstrap,
}

impl Nightly {
    /// The pinned nightly when it is installed, else the stable fallback.
    pub fn current() -> Nightly {
        if installed(NIGHTLY) {
            Nightly::Pinned
        } else {
            Nightly::StableBootstrap
        }
    }

    /// `cargo +<toolchain>` with the environment the toolchain needs.
    pub fn cargo(self) -> Command {
        let mut cmd = Command::new("cargo");
        match self {
            Nightly::Pinned => {
                cmd.arg(format!("+{NIGHTLY}"));
            }
            Nightly::StableBootstrap => {
                cmd.arg("+stable").env("RUSTC_BOOTSTRAP", "1");
            }
        }
        cmd
    }

    fn name(self) -> &'static str {
        match self {
            Nightly::Pinned => NIGHTLY,
            Nightly::StableBootstrap => "stable",
        }
    }
}

fn installed(toolchain: &str) -> bool {
    Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `cargo xtask setup`: the pinned nightly with `rust-src`, installed once.
pub fn install() -> Result<Nightly> {
    if !installed(NIGHTLY) {
        eprintln!(
            "setup: installing Rust {NIGHTLY} (pinned; the eBPF object and cargo fuzz need it) with rust-src through rustup"
        );
        let status = Command::new("rustup")
            .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
            .args(["--component", "rust-src"])
            .status()
            .context("running rustup toolchain install")?;
        if !status.success() {
            eprintln!(
                "setup: NOTE: rustup could not install {NIGHTLY} (is static.rust-lang.org reachable?); \
                 falling back to stable with RUSTC_BOOTSTRAP=1 and rust-src"
            );
        }
    }
    let nightly = Nightly::current();
    install_rust_src(nightly.name())?;
    Ok(nightly)
}

fn install_rust_src(toolchain: &str) -> Result<()> {
    let out = Command::new("rustc")
        .args([&format!("+{toolchain}"), "--print", "sysroot"])
        .output()
        .with_context(|| format!("running `rustc +{toolchain} --print sysroot`"))?;
    if !out.status.success() {
        bail!("no {toolchain} toolchain: install it with `rustup toolchain install {toolchain}`");
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        return Ok(());
    }
    eprintln!(
        "setup: installing rust-src for the {toolchain} toolchain (build-std of the eBPF object)"
    );
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", toolchain])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("rustup component add rust-src --toolchain {toolchain} failed");
    }
    Ok(())
}
