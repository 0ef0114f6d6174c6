//! Running the real `fabedge-agent` binary inside a test's network namespace.
//!
//! The agent is entered into the namespace with `nsenter --net` only: `ip
//! netns exec` would also give it a fresh mount namespace without bpffs, and
//! its pins would be invisible to everyone else.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// The environment variable that names another agent binary for every test
/// to run: `cargo xtask test` sets it in its VM boots to the image's static
/// release build, since under TCG a debug agent spends most of a restart
/// loading its objects.
pub const AGENT_BIN_ENV: &str = "FABEDGE_TEST_AGENT";

/// The agent binary the tests run: [`AGENT_BIN_ENV`] when set, else the one
/// built next to this test (`cargo build -p fabedge-agent`; `cargo xtask
/// test` builds it first).
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(AGENT_BIN_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "{AGENT_BIN_ENV}={} is not a file: build the image's agent with `cargo xtask image`",
                path.display()
            );
        }
        return Ok(path);
    }
    // The target dir these tests were built into (CARGO_TARGET_DIR, else the workspace's).
    let target = option_env!("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug/fabedge-agent");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p fabedge-agent` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// The whole PATH every agent the tests start runs with: an empty
/// directory, so a shell-out to `ip`, `tc` or `sysctl` fails the test
/// instead of quietly working (the agent's image has no such tools).
pub fn empty_path_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("fabedge-test-empty-path");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(entry) = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .next()
    {
        bail!(
            "{} must stay empty (it is the agents' PATH) but holds {:?}: remove it",
            dir.display(),
            entry?.file_name()
        );
    }
    Ok(dir)
}

/// `nsenter`, found on the tests' own PATH: the agent's PATH (which the
/// command looks programs up in) is [`empty_path_dir`].
pub fn nsenter_bin() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nsenter"))
        .find(|path| path.is_file())
        .context("nsenter is not on PATH: install util-linux")
}

/// A private bpffs root for one test, unique per process and name.
pub fn bpffs_root(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/fabedge-test-{}-{name}",
        std::process::id()
    ))
}

/// `fabedge-agent --bpffs-root ROOT ARGS...` inside `netns` (or the current
/// namespace when `None`); returns its output whatever the exit status.
pub fn agent_output(netns: Option<&Netns>, root: &Path, args: &[&str]) -> Result<Output> {
    let bin = agent_bin()?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut cmd = Command::new(nsenter_bin()?);
            cmd.arg(format!("--net={}", ns.path().display())).arg(&bin);
            cmd
        }
        None => Command::new(&bin),
    };
    cmd.arg("--bpffs-root")
        .arg(root)
        .args(args)
        .env("PATH", empty_path_dir()?)
        .env("RUST_BACKTRACE", "0");
    cmd.output()
        .with_context(|| format!("running fabedge-agent {}", args.join(" ")))
}

/// Like [`agent_output`], but a non-zero exit is an error carrying stderr.
pub fn agent_ok(netns: Option<&Netns>, root: &Path, args: &[&str]) -> Result<String> {
    let out = agent_output(netns, root, args)?;
    if !out.status.success() {
        bail!(
            "fabedge-agent {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace for an agent playing edge-1 of the mini cluster: edge-1's
/// InternalIP on `eth0` (kernel routes use it as their source), as on the
/// real node.
pub fn edge_1_netns(name: &str) -> Result<Netns> {
    let netns = Netns::new(name)?;
    netns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0-peer",
    ])?;
    netns.set_up("eth0-peer")?;
    netns.add_addr("eth0", "10.2.0.11/24")?;
    netns.set_up("eth0")?;
    Ok(netns)
}

/// `fabedge-agent run` (the binary `bin`) as edge-1 in `netns`, in
/// standalone mode on `work/cluster.yaml` with its state and CNI directory
/// in `work`: VXLAN tunnels, no XDP, no cgroup programs, no hold on drastic
/// changes, info logs, the empty PATH. The caller adds flags and output.
pub fn standalone_edge_1(netns: &Netns, bin: &Path, root: &Path, work: &Path) -> Result<Command> {
    let manifest = work.join("cluster.yaml");
    edge_1(
        netns,
        bin,
        root,
        work,
        &["--manifests".as_ref(), manifest.as_os_str()],
    )
}

/// [`standalone_edge_1`], but in kube mode on the API server `kubeconfig`
/// names (reachable from `netns`, see `ApiServer::expose_in`).
pub fn kube_edge_1(
    netns: &Netns,
    bin: &Path,
    root: &Path,
    work: &Path,
    kubeconfig: &Path,
) -> Result<Command> {
    edge_1(
        netns,
        bin,
        root,
        work,
        &["--kubeconfig".as_ref(), kubeconfig.as_os_str()],
    )
}

/// `fabedge-agent run` as edge-1 on `source` (the flags naming where the
/// cluster's objects come from); see [`standalone_edge_1`].
fn edge_1(
    netns: &Netns,
    bin: &Path,
    root: &Path,
    work: &Path,
    source: &[&std::ffi::OsStr],
) -> Result<Command> {
    let mut cmd = Command::new(nsenter_bin()?);
    cmd.arg(format!("--net={}", netns.path().display()))
        .arg(bin)
        .arg("--bpffs-root")
        .arg(root)
        .args(["run", "--node", "edge-1"])
        .args(source)
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg("--cni-conf-dir")
        .arg(work.join("cni"))
        .args([
            "--tunnel",
            "vxlan",
            "--xdp",
            "off",
            "--no-cgroup",
            "--hold-drastic-changes",
            "0",
        ])
        .env("PATH", empty_path_dir()?)
        .env("RUST_LOG", "info");
    Ok(cmd)
}
