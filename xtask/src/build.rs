//! `cargo xtask build-ebpf`: the one build path of the kernel object. The agent
//! embeds the object this produces (see fabedge-agent/build.rs).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::setup::LLVM_BIN;

/// Where the object lands; fabedge-agent/build.rs reads it from here.
pub fn object_path(workspace: &Path) -> PathBuf {
    workspace.join("target/bpfel-unknown-none/release/fabedge")
}

pub fn build_ebpf(workspace: &Path) -> Result<PathBuf> {
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    // \x1f separates CARGO_ENCODED_RUSTFLAGS entries.
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let status = crate::toolchain::Nightly::current()
        .cargo()
        .current_dir(workspace)
        .args([
            "build",
            "--package",
            "fabedge-ebpf",
            "--bin",
            "fabedge",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        // The agent's build script reads the object from the workspace's target dir.
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo build for fabedge-ebpf with the pinned nightly")?;
    if !status.success() {
        bail!("building the eBPF object failed (see the compiler output above)");
    }
    let object = object_path(workspace);
    check_btf(&object)?;
    Ok(object)
}

/// The object must carry BTF and BTF.ext, or maps lose their field names and
/// CO-RE/line info is gone.
fn check_btf(object: &Path) -> Result<()> {
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    for section in [".BTF\0", ".BTF.ext\0"] {
        if !bytes
            .windows(section.len())
            .any(|w| w == section.as_bytes())
        {
            bail!(
                "{} has no {} section: bpf-linker must run with --btf",
                object.display(),
                section.trim_end_matches('\0')
            );
        }
    }
    Ok(())
}
