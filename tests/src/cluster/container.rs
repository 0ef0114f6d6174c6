//! A node's agent started from the OCI image by a real container runtime
//! (podman, with runc), set up the way `deploy/daemonset.yaml` runs it:
//! privileged, in the node's network namespace (hostNetwork), bpffs bind-
//! mounted at `/sys/fs/bpf`, the host's cgroup2 root at
//! `/run/fabedge/host-cgroup`, the state and CNI configuration directories
//! mounted from the "host". The image must already be loaded (`podman load`).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

use super::LEFTOVER_PREFIX;
use super::cgroup::cgroup2_root;

/// Where the DaemonSet mounts the host's `/sys/fs/cgroup`.
const HOST_CGROUP_IN_CONTAINER: &str = "/run/fabedge/host-cgroup";
const BPFFS: &str = "/sys/fs/bpf";

/// Which nodes' agents run from an image, and which image.
#[derive(Debug, Clone)]
pub struct AgentImage {
    /// An image the runtime has (`podman load -i <archive>` printed this name).
    pub reference: String,
    pub nodes: Vec<String>,
}

/// What one containerized agent needs from the host besides its arguments.
#[derive(Debug, Clone)]
pub(super) struct ContainerAgent {
    pub name: String,
    pub image: String,
    /// Directories mounted at the same path inside: state, CNI configuration,
    /// and the directory of the manifest file (the stand-in for the API server).
    pub host_dirs: Vec<PathBuf>,
}

impl ContainerAgent {
    /// `podman run` in the foreground: the agent's output is the child's, a
    /// SIGTERM to the child reaches the agent (podman proxies signals).
    pub(super) fn spawn(
        &self,
        netns: &Netns,
        args: &[String],
        stdout: File,
        stderr: File,
    ) -> Result<Child> {
        let cgroup_root = cgroup2_root();
        let mut cmd = Command::new("podman");
        // runc, not crun: crun refuses hosts with hybrid cgroups (v1 plus a
        // v2 hierarchy with controllers), which test machines can be.
        cmd.args(["--runtime", "runc"])
            .args(["run", "--rm", "--name", &self.name, "--privileged"])
            // podman's default limits can exceed this host's hard limits (the
            // runtime's setrlimit then fails): ours always fit.
            .arg(format!("--ulimit=nofile={}", open_files_limit()))
            .arg("--ulimit=nproc=4096:4096")
            .arg(format!("--network=ns:{}", netns.path().display()))
            // The host's bpffs is private here, so no `rshared` as in the
            // DaemonSet: the pins are the same either way (one bpffs).
            .arg(format!("--volume={BPFFS}:{BPFFS}"))
            .arg(format!(
                "--volume={}:{HOST_CGROUP_IN_CONTAINER}",
                cgroup_root.display()
            ));
        for dir in &self.host_dirs {
            cmd.arg(format!("--volume={0}:{0}", dir.display()));
        }
        cmd.args(["--env=RUST_LOG=info", "--env=RUST_BACKTRACE=1"])
            .arg(&self.image)
            .args(container_args(args, &cgroup_root));
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "starting container {} (are podman and runc installed?)",
                    self.name
                )
            })
    }

    /// Removes the container whatever its state (after the agent's SIGTERM
    /// grace, or when `podman run` itself died).
    pub(super) fn remove(&self) {
        remove_container(&self.name);
    }

    /// Whether the container runs, and from which image (`podman inspect`).
    pub(super) fn inspect(&self) -> Result<(bool, String)> {
        let out = Command::new("podman")
            .args([
                "container",
                "inspect",
                "--format",
                "{{.State.Running}} {{.ImageName}}",
                &self.name,
            ])
            .output()
            .context("running podman container inspect")?;
        if !out.status.success() {
            bail!(
                "podman container inspect {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (running, image) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
        Ok((running == "true", image.to_owned()))
    }
}

/// The process arguments with `--cgroup` moved under the DaemonSet's mount of
/// the host's cgroup root.
fn container_args(args: &[String], cgroup_root: &Path) -> Vec<String> {
    let mut out = args.to_vec();
    for i in 1..out.len() {
        if out[i - 1] == "--cgroup"
            && let Ok(relative) = Path::new(&out[i]).strip_prefix(cgroup_root)
        {
            out[i] = Path::new(HOST_CGROUP_IN_CONTAINER)
                .join(relative)
                .display()
                .to_string();
        }
    }
    out
}

/// `soft:hard` of this process's open-files limit.
fn open_files_limit() -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    format!("{}:{}", limit.rlim_cur, limit.rlim_max)
}

fn remove_container(name: &str) {
    match Command::new("podman")
        .args(["rm", "--force", "--time", "0", "--ignore", name])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "warning: podman rm {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("warning: running podman rm {name}: {e}"),
    }
}

/// Containers of clusters whose test process is gone (they are named like
/// the clusters' work directories).
pub(super) fn remove_stale_containers() {
    let Ok(out) = Command::new("podman")
        .args(["ps", "--all", "--format", "{{.Names}}"])
        .output()
    else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let owner = name
            .strip_prefix(LEFTOVER_PREFIX)
            .and_then(|rest| rest.split('-').next());
        if let Some(Ok(pid)) = owner.map(str::parse::<u32>)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            remove_container(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_argument_moves_under_the_daemonset_mount() {
        let args: Vec<String> = [
            "run",
            "--cgroup",
            "/sys/fs/cgroup/unified/c-edge-1",
            "--node",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            container_args(&args, Path::new("/sys/fs/cgroup/unified")),
            [
                "run",
                "--cgroup",
                "/run/fabedge/host-cgroup/c-edge-1",
                "--node"
            ]
        );
    }
}
