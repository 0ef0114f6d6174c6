//! One real agent in kube mode, in a throwaway network namespace that holds
//! edge-1's InternalIP on a NIC, with everything it leaves behind removed on
//! drop. The maps are read with `fabedge-agent inspect ... --json`. Used
//! against the in-test API server (`tests/tests/kube.rs`) and the real one
//! (`tests/tests/apiserver.rs`); the caller writes the kubeconfig.

use std::{
    any::Any,
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    agent::{agent_bin, agent_output, bpffs_root},
    netns::Netns,
};

pub struct KubeAgent {
    /// The Node this agent runs for (`edge-1` unless changed before `start`).
    pub node: String,
    /// `run` arguments after the common ones.
    pub extra_args: Vec<String>,
    pub netns: Netns,
    pub root: PathBuf,
    /// Its kubeconfig, state, CNI dir and log.
    pub dir: PathBuf,
    child: Option<std::process::Child>,
    /// What must live as long as the agent (a relay to the API server).
    guards: Vec<Box<dyn Any>>,
}

impl KubeAgent {
    pub fn new(name: &str) -> Result<KubeAgent> {
        let netns = crate::agent::edge_1_netns(name)?;
        let root = bpffs_root(name);
        let dir =
            std::env::temp_dir().join(format!("fabedge-kube-agent-{}-{name}", std::process::id()));
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join("cni"))?;
        Ok(KubeAgent {
            node: "edge-1".into(),
            extra_args: Vec::new(),
            netns,
            root,
            dir,
            child: None,
            guards: Vec::new(),
        })
    }

    /// Where `start` expects the kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Keeps `guard` alive until the agent is gone.
    pub fn hold(&mut self, guard: impl Any) {
        self.guards.push(Box::new(guard));
    }

    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .arg(agent_bin()?)
            .arg("--bpffs-root")
            .arg(&self.root)
            .args([
                "run",
                "--node",
                &self.node,
                "--poll-interval",
                "200ms",
                // The host kernel has no ESP, the default tunnel mode.
                "--tunnel",
                "vxlan",
                // The host's own cgroup would translate every process's sockets.
                "--no-cgroup",
                "--kubeconfig",
            ])
            .arg(self.kubeconfig())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--cni-conf-dir")
            .arg(self.dir.join("cni"))
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent (is nsenter installed?)")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM: the agent's own shutdown path (the datapath stays pinned).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `fabedge-agent inspect WHAT --json` (empty before the first apply).
    pub fn inspect(&self, what: &str) -> Result<Vec<Value>> {
        let out = agent_output(Some(&self.netns), &self.root, &["inspect", what, "--json"])?;
        if !out.status.success() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("inspect {what} --json"))
    }

    /// `prefix → kind next hop` of every route in the maps.
    pub fn routes(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .inspect("routes")?
            .iter()
            .map(|r| {
                (
                    r["prefix"].as_str().unwrap_or("").to_owned(),
                    format!("{} {}", r["kind"], r["next_hop"]),
                )
            })
            .collect())
    }

    /// Polls `probe` until it holds (30 s), else fails with the routes and the log.
    pub fn wait<T>(
        &self,
        what: &str,
        probe: impl Fn(&KubeAgent) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(value) = probe(self)? {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent never showed {what}; routes {:#?}\nagent log:\n{}",
                    self.routes()?,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_routes(
        &self,
        what: &str,
        check: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Result<BTreeMap<String, String>> {
        self.wait(what, |agent| {
            let routes = agent.routes()?;
            Ok(check(&routes).then_some(routes))
        })
    }

    /// Log lines that report map writes (`applied plan for …` is logged only
    /// when an apply changed something).
    pub fn applies(&self) -> usize {
        self.log()
            .matches(&format!("applied plan for {}", self.node))
            .count()
    }
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        self.stop();
        let _ = agent_output(
            Some(&self.netns),
            &self.root,
            &[
                "uninstall",
                "--cni-conf-dir",
                &self.dir.join("cni").display().to_string(),
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
