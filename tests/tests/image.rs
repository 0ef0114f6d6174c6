//! The agent's OCI image (`cargo xtask image`): a real OCI tool (skopeo)
//! reads the archive under the name `deploy/kustomization.yaml` gives it, and
//! a real runtime (podman, running runc) starts it as one node of the mini
//! cluster, mounted as `deploy/daemonset.yaml` mounts it, whose seed paths
//! then pass. Needs root, skopeo, podman and runc (`cargo xtask setup`) and the
//! archive (`cargo xtask image`; `cargo xtask test` builds it first).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_tests::cluster::{AgentImage, Cluster, ClusterOptions, seed_matrix};
use serde_json::Value;

/// The node whose agent runs from the image: an edge, so its paths cross
/// the tunnel and it writes the CNI configuration through the mount.
const NODE: &str = "edge-1";
const ENTRYPOINT: &str = "/usr/local/bin/fabedge-agent";
/// A static agent with the eBPF object embedded and nothing else: far more
/// than a stub, far less than anything carrying a distribution.
const LAYER_SIZE_RANGE: std::ops::Range<u64> = (1 << 20)..(64 << 20);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The archive `cargo xtask image` writes by default.
fn archive() -> Result<PathBuf> {
    let target = option_env!("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let path = target.join("image/fabedge-agent.oci.tar");
    ensure!(
        path.exists(),
        "{} is missing: build it with `cargo xtask image` (cargo xtask test does)",
        path.display()
    );
    Ok(path)
}

/// `newName:newTag` of the `fabedge-agent` image in `deploy/kustomization.yaml`.
fn deployed_reference() -> Result<String> {
    let path = workspace().join("deploy/kustomization.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let entry = doc["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|image| image["name"].as_str() == Some("fabedge-agent"))
        .with_context(|| format!("{} names no fabedge-agent image", path.display()))?;
    Ok(format!(
        "{}:{}",
        entry["newName"].as_str().unwrap_or_default(),
        entry["newTag"].as_str().unwrap_or_default()
    ))
}

/// Runs `program args`; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (`cargo xtask setup` installs it)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn skopeo_json(args: &[&str]) -> Result<Value> {
    let out = run("skopeo", args)?;
    serde_json::from_str(&out).with_context(|| format!("skopeo {} printed {out}", args.join(" ")))
}

#[test]
fn skopeo_reads_the_archive_as_the_deployed_image_with_only_the_agent_inside() -> Result<()> {
    let archive = archive()?;
    let reference = deployed_reference()?;
    let image = format!("oci-archive:{}:{reference}", archive.display());

    let inspect = skopeo_json(&["inspect", &image])?;
    ensure!(
        inspect["Architecture"] == "amd64" && inspect["Os"] == "linux",
        "the image is for {}/{}, not linux/amd64",
        inspect["Os"],
        inspect["Architecture"]
    );
    let config = skopeo_json(&["inspect", "--config", &image])?;
    ensure!(
        config["config"]["Entrypoint"] == serde_json::json!([ENTRYPOINT]),
        "entrypoint is {}, not [{ENTRYPOINT:?}]",
        config["config"]["Entrypoint"]
    );
    let manifest = skopeo_json(&["inspect", "--raw", &image])?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    ensure!(
        layers.len() == 1,
        "expected one layer, the manifest has {manifest}"
    );
    let size = layers[0]["size"].as_u64().unwrap_or_default();
    ensure!(
        LAYER_SIZE_RANGE.contains(&size),
        "the layer is {size} bytes, outside {LAYER_SIZE_RANGE:?}"
    );

    // The name is the archive's: another tag of the same repository is not there.
    let other = format!("oci-archive:{}:{}-not-built", archive.display(), reference);
    ensure!(
        run("skopeo", &["inspect", &other]).is_err(),
        "skopeo found {other} in an archive that holds only {reference}"
    );

    // Nothing but the agent: no shell, no iproute2, no libc.
    let digest = layers[0]["digest"].as_str().unwrap_or_default();
    let blob = format!("blobs/{}", digest.replacen(':', "/", 1));
    let listing = Command::new("sh")
        .arg("-c")
        .arg(r#"tar -xOf "$0" "$1" | tar -t"#)
        .arg(&archive)
        .arg(&blob)
        .output()
        .context("running tar")?;
    ensure!(
        listing.status.success(),
        "listing the layer {blob} of {}: {}",
        archive.display(),
        String::from_utf8_lossy(&listing.stderr)
    );
    let files = String::from_utf8_lossy(&listing.stdout);
    let files: Vec<&str> = files.lines().collect();
    ensure!(
        files
            == [
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/fabedge-agent"
            ],
        "the layer holds {files:?}"
    );
    Ok(())
}

#[test]
fn podman_runs_the_image_as_an_edge_node_whose_seed_paths_pass() -> Result<()> {
    let archive = archive()?;
    let reference = deployed_reference()?;
    // What a cluster admin does on each node (deploy/README.md).
    let loaded = run(
        "podman",
        &["load", "--input", &archive.display().to_string()],
    )?;
    ensure!(
        loaded.contains(&reference),
        "podman load did not name {reference}: {loaded}"
    );

    let cluster = Cluster::start(ClusterOptions {
        agent_image: Some(AgentImage {
            reference: reference.clone(),
            nodes: vec![NODE.to_owned()],
        }),
        ..ClusterOptions::default()
    })?;
    let (running, image) = cluster.agent_container(NODE)?;
    ensure!(
        running && image == reference,
        "the agent container of {NODE} is running={running} from {image:?}, expected a running {reference}"
    );

    let paths: Vec<_> = seed_matrix()
        .into_iter()
        .filter(|p| p.from.node() == NODE || p.to.node() == NODE)
        .collect();
    ensure!(
        paths.len() >= 4,
        "only {} seed paths start or end at {NODE}",
        paths.len()
    );
    let mut failed = Vec::new();
    for path in &paths {
        let outcome = cluster.check_path(path)?;
        if !outcome.passed() {
            failed.push(format!(
                "{}\n  {}\nwhat the statistics did show:\n  {}",
                outcome.title,
                outcome.failures().join("\n  "),
                outcome.evidence.join("\n  ")
            ));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} seed paths through {NODE} (agent from the image) failed:\n{}\n\n{}",
            failed.len(),
            paths.len(),
            failed.join("\n\n"),
            cluster.diagnostics(&[NODE.to_owned(), "cloud-1".to_owned()])
        );
    }
    // Still the container's agent that carried them.
    let (running, _) = cluster.agent_container(NODE)?;
    ensure!(
        running,
        "the agent container of {NODE} stopped during the test"
    );
    Ok(())
}
