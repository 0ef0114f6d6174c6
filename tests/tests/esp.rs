//! The ESP tunnel mode. On kernels without ESP (this project's host kernel)
//! `--tunnel esp` must be refused at start with the missing feature named
//! and nothing configured. Needs root.

use std::path::Path;

use anyhow::{Result, ensure};
use fabedge_tests::{
    agent::{agent_output, bpffs_root},
    cluster::FIXTURE,
    netns::Netns,
};

/// Does this kernel take an `rfc4106(gcm(aes))` ESP SA with UDP
/// encapsulation? Asked through iproute2, independently of the agent.
fn kernel_has_esp(ns: &Netns) -> Result<bool> {
    let added = ns.exec(
        "ip",
        &[
            "xfrm",
            "state",
            "add",
            "src",
            "127.0.0.9",
            "dst",
            "127.0.0.9",
            "proto",
            "esp",
            "spi",
            "0x4ffffe01",
            "mode",
            "tunnel",
            "aead",
            "rfc4106(gcm(aes))",
            "0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324",
            "128",
            "encap",
            "espinudp",
            "4500",
            "4500",
            "0.0.0.0",
        ],
    )?;
    if added.status.success() {
        ns.ip(&["xfrm", "state", "flush"])?;
    }
    Ok(added.status.success())
}

#[test]
fn tunnel_esp_is_refused_cleanly_on_a_kernel_without_esp() -> Result<()> {
    let ns = Netns::new("esp-refuse")?;
    if kernel_has_esp(&ns)? {
        eprintln!(
            "not run: this kernel has ESP (the refusal is proven on kernels without it, like the host's)"
        );
        return Ok(());
    }
    let root = bpffs_root("esp-refuse");
    let state_dir = std::env::temp_dir().join(format!("fabedge-esp-refuse-{}", std::process::id()));
    let cni_dir = state_dir.join("cni");
    let manifests = state_dir.join("cluster.yaml");
    std::fs::create_dir_all(&state_dir)?;
    std::fs::copy(FIXTURE, &manifests)?;
    let out = agent_output(
        Some(&ns),
        &root,
        &[
            "run",
            "--node",
            "edge-1",
            "--tunnel",
            "esp",
            "--manifests",
            &manifests.display().to_string(),
            "--state-dir",
            &state_dir.display().to_string(),
            "--cni-conf-dir",
            &cni_dir.display().to_string(),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("agent said: {stderr}");
    let result = (|| -> Result<()> {
        ensure!(
            !out.status.success(),
            "the agent started in ESP mode on a kernel without ESP:\n{stderr}"
        );
        for needle in [
            "--tunnel esp needs",
            "ESP",
            "--tunnel vxlan",
            "nothing was configured",
        ] {
            ensure!(
                stderr.contains(needle),
                "the refusal lacks {needle:?}:\n{stderr}"
            );
        }
        // Nothing half-configured: no device but lo, no route, no xfrm object,
        // no bpffs pins, no CNI file, no key written, manifest untouched.
        let links = ns.ip(&["-o", "link", "show"])?;
        ensure!(
            links.lines().count() == 1 && links.contains(": lo:"),
            "devices left: {links}"
        );
        let routes = ns.ip(&["route", "show", "table", "all"])?;
        ensure!(
            !routes
                .lines()
                .any(|l| !l.contains("dev lo") && !l.trim().is_empty()),
            "routes left: {routes}"
        );
        for what in ["state", "policy"] {
            let objects = ns.ip(&["xfrm", what, "show"])?;
            ensure!(objects.trim().is_empty(), "xfrm {what}s left: {objects}");
        }
        ensure!(!root.exists(), "bpffs pins left under {}", root.display());
        ensure!(
            !cni_dir.exists(),
            "CNI config written to {}",
            cni_dir.display()
        );
        ensure!(
            !Path::new(&state_dir).join("node.key").exists(),
            "a node key was written before the refusal"
        );
        ensure!(
            std::fs::read(&manifests)? == std::fs::read(FIXTURE)?,
            "the manifest was annotated"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&state_dir);
    let _ = std::fs::remove_dir_all(&root);
    result
}
