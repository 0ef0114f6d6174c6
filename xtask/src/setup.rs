//! `cargo xtask setup`: install what building and testing need, idempotently,
//! saying what it installs. Costs well under a second when all is present.
//! `cargo xtask setup` and `cargo xtask test` also build the API-server
//! tests' Kubernetes (`kube`), once per version.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Debian packages and the command (or file) whose presence proves each is installed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/sbin/ip"),
    ("iptables", "/usr/sbin/iptables"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("kmod", "/usr/bin/kmod"),
    ("iperf3", "/usr/bin/iperf3"),
    ("tcpdump", "/usr/bin/tcpdump"),
    ("conntrack", "/usr/sbin/conntrack"),
    ("iputils-ping", "/usr/bin/ping"),
    ("ethtool", "/usr/sbin/ethtool"),
    // tests/tests/metrics.rs: a real Prometheus scrapes an agent.
    ("prometheus", "/usr/bin/prometheus"),
    // The API-server tests' etcd (Debian ships no kube-apiserver: `kube` builds it).
    ("etcd-server", crate::kube::ETCD),
    ("openssl", "/usr/bin/openssl"),
    // The agent's image: musl-gcc for ring's C under the static musl target;
    // skopeo inspects the archive and podman runs it in the image test, with
    // runc (crun refuses hosts with hybrid cgroups).
    ("musl-tools", "/usr/bin/musl-gcc"),
    ("skopeo", "/usr/bin/skopeo"),
    ("podman", "/usr/bin/podman"),
    ("runc", "/usr/sbin/runc"),
];

pub const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

pub fn run() -> Result<()> {
    install_apt_packages()?;
    crate::toolchain::install()?;
    install_bpf_linker()?;
    install_musl_target()?;
    install_cargo_fuzz()?;
    Ok(())
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, proof)| !Path::new(proof).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("running apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed; run it by hand to see why");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// The image's static agent is built for musl (`cargo xtask image`).
fn install_musl_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running `rustup target list --installed`: is rustup installed?")?;
    let target = crate::image::TARGET;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|t| t.trim() == target)
    {
        return Ok(());
    }
    eprintln!("setup: adding the Rust target {target} (the image's static agent)");
    let status = Command::new("rustup")
        .args(["target", "add", target])
        .status()
        .context("running rustup target add")?;
    if !status.success() {
        bail!("rustup target add {target} failed");
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.13"))
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!(
        "setup: installing bpf-linker 0.13 (LLVM 22) with cargo install; this takes a few minutes once"
    );
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "cargo install bpf-linker failed (needs llvm-22-dev, libpolly-22-dev, libzstd-dev, zlib1g-dev)"
        );
    }
    Ok(())
}

/// `cargo fuzz` (libFuzzer targets in `fuzz/`, run by `cargo xtask test`).
fn install_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!(
        "setup: installing cargo-fuzz from crates.io with cargo install; this takes a minute or two once"
    );
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz --locked failed; run it by hand to see why");
    }
    Ok(())
}
