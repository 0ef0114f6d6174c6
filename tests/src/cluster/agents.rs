//! The real `fabedge-agent` on every node: starting, waiting for, inspecting, restarting and
//! uninstalling it, and its logs.

use std::{
    fs::{self, OpenOptions},
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::PoisonError,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_agent::plan::CNI_FILE_NAME;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    agent::{agent_bin, agent_ok, agent_output, empty_path_dir, nsenter_bin},
    netns::Netns,
};

use super::cgroup::node_cgroup;
use super::container::ContainerAgent;
use super::fixture::NodeRole;
use super::gaps::{GapMeter, PingGaps};
use super::traffic::Endpoint;
use super::{AGENT_READY_TIMEOUT, AGENT_STOP_TIMEOUT, Cluster, LOG_TAIL_LINES, POLL};

// ---------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------

/// A `fabedge-agent run` in a node's namespace, entered with `nsenter --net`
/// only: `ip netns exec` (and so `Netns::spawn`) gives the process a mount
/// namespace without bpffs, where its pins would be invisible. Or, for a
/// node in [`super::ClusterOptions::agent_image`], `podman run` of the image.
/// Stopped on drop.
pub(super) struct AgentProcess {
    child: Child,
    node: String,
    container: Option<ContainerAgent>,
}

impl AgentProcess {
    pub(super) fn start(
        netns: &Netns,
        node: &str,
        args: &[String],
        log_path: &Path,
        container: Option<&ContainerAgent>,
    ) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening agent log {}", log_path.display()))?;
        let log_for_stderr = log
            .try_clone()
            .context("duplicating the agent log handle")?;
        if let Some(container) = container {
            let child = container
                .spawn(netns, args, log, log_for_stderr)
                .with_context(|| format!("starting the agent of {node} from its image"))?;
            return Ok(AgentProcess {
                child,
                node: node.to_owned(),
                container: Some(container.clone()),
            });
        }
        let child = Command::new(nsenter_bin()?)
            .arg(format!("--net={}", netns.path().display()))
            .arg(agent_bin()?)
            .args(args)
            .env("PATH", empty_path_dir()?)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .with_context(|| format!("starting the agent of {node} (is nsenter installed?)"))?;
        Ok(AgentProcess {
            child,
            node: node.to_owned(),
            container: None,
        })
    }

    /// The running agent's environment variable `name` (from /proc).
    fn env_var(&self, name: &str) -> Result<Option<String>> {
        let path = format!("/proc/{}/environ", self.child.id());
        let environ = fs::read(&path).with_context(|| format!("reading {path}"))?;
        let prefix = format!("{name}=");
        Ok(environ
            .split(|&b| b == 0)
            .map(String::from_utf8_lossy)
            .find_map(|var| var.strip_prefix(&prefix).map(str::to_owned)))
    }

    /// An error with the exit status if the agent is no longer running.
    fn check_running(&mut self) -> Result<()> {
        match self
            .child
            .try_wait()
            .with_context(|| format!("checking on the agent of {}", self.node))?
        {
            None => Ok(()),
            Some(status) => bail!("the agent of {} exited ({status})", self.node),
        }
    }

    /// SIGTERM (the agent leaves its datapath forwarding), SIGKILL if it
    /// lingers, then reap.
    pub(super) fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(POLL);
            }
        }
        // Whatever `podman run` did, the container must not outlive the test.
        if let Some(container) = &self.container {
            container.remove();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    /// SIGKILL, as a node that dies: no shutdown path of the agent runs.
    pub(super) fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(container) = &self.container {
            container.remove();
        }
        let _ = self.child.wait();
    }

    /// The agent's process id (for its CPU time in /proc).
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
impl Cluster {
    /// Waits until the agent of `name` says it applied a plan, in log bytes
    /// written after `log_offset`.
    pub(super) fn wait_for_agent(&self, name: &str, log_offset: u64) -> Result<()> {
        let node = self.cluster_node(name)?;
        let applied = format!("applied plan for {name}");
        let deadline = Instant::now() + AGENT_READY_TIMEOUT * self.timeout_factor;
        loop {
            let log = read_from(&node.files.agent_log, log_offset);
            if log.contains(&applied) {
                break;
            }
            let mut agent = node.agent.lock().unwrap_or_else(PoisonError::into_inner);
            let agent = agent
                .as_mut()
                .with_context(|| format!("the agent of {name} is not running"))?;
            if let Err(e) = agent.check_running() {
                // Read again: its last words came after the read above.
                let log = read_from(&node.files.agent_log, log_offset);
                bail!("{e:#}; its log:\n{}", tail(&log, LOG_TAIL_LINES));
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent of {name} did not log {applied:?} within {AGENT_READY_TIMEOUT:?}; its log:\n{}",
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            thread::sleep(POLL);
        }
        if node.spec.role == NodeRole::Edge {
            let conflist = node.files.cni_conf_dir.join(CNI_FILE_NAME);
            ensure!(
                conflist.exists(),
                "edge node {name}: the agent applied its plan but wrote no {}",
                conflist.display()
            );
        }
        Ok(())
    }

    /// Whether `node`'s agent container runs, and its image name (an error
    /// when the node's agent is a plain process).
    pub fn agent_container(&self, node: &str) -> Result<(bool, String)> {
        self.cluster_node(node)?
            .container
            .as_ref()
            .with_context(|| format!("the agent of {node} does not run from an image"))?
            .inspect()
    }

    /// `fabedge-agent inspect <what> --json` on `node`, parsed.
    pub fn agent_inspect(&self, node: &str, what: &str) -> Result<serde_json::Value> {
        let n = self.cluster_node(node)?;
        let state_dir = n.files.state_dir.display().to_string();
        // Peer names (tunnels) and the problem list come from the state dir.
        let args = ["inspect", what, "--json", "--state-dir", &state_dir];
        let out = agent_ok(Some(&n.netns), &n.files.bpffs_root, &args)
            .with_context(|| format!("node {node}: inspect {what}"))?;
        serde_json::from_str(&out)
            .with_context(|| format!("node {node}: inspect {what} --json printed {out:?}"))
    }

    /// `fabedge-agent inspect <what>` on `node`, as the table it prints.
    pub fn agent_inspect_table(&self, node: &str, what: &str) -> Result<String> {
        let n = self.cluster_node(node)?;
        agent_ok(Some(&n.netns), &n.files.bpffs_root, &["inspect", what])
            .with_context(|| format!("node {node}: inspect {what}"))
    }

    /// Stops the node's agent (SIGTERM: the datapath keeps forwarding) and
    /// starts it again, then waits until it has applied its plan.
    /// Stops `node`'s agent and runs `fabedge-agent uninstall` there; returns
    /// what uninstall printed. (Teardown uninstalls again, harmlessly.)
    pub fn uninstall(&self, node: &str) -> Result<String> {
        self.stop_agent(node)?;
        let n = self.cluster_node(node)?;
        let cni_conf_dir = n.files.cni_conf_dir.display().to_string();
        let state_dir = n.files.state_dir.display().to_string();
        let out = agent_output(
            Some(&n.netns),
            &n.files.bpffs_root,
            &[
                "uninstall",
                "--cni-conf-dir",
                &cni_conf_dir,
                "--state-dir",
                &state_dir,
                "--purge-state",
            ],
        )?;
        ensure!(
            out.status.success(),
            "uninstall on {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The PATH the running agent of `node` was started with.
    pub fn agent_path_var(&self, node: &str) -> Result<Option<String>> {
        let n = self.cluster_node(node)?;
        let agent = n.agent.lock().unwrap_or_else(PoisonError::into_inner);
        agent
            .as_ref()
            .with_context(|| format!("the agent of {node} is not running"))?
            .env_var("PATH")
    }

    pub fn restart_agent(&self, node: &str) -> Result<()> {
        self.restart_agent_with_args(node, &[])
    }

    /// Stops `node`'s agent (SIGTERM) and leaves it stopped, with the
    /// datapath and state as it left them; [`Cluster::restart_agent`]
    /// starts it again.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        let n = self.cluster_node(node)?;
        if let Some(mut agent) = n
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            agent.stop();
        }
        Ok(())
    }

    /// [`Cluster::restart_agent`] with `extra` appended to the node's `run`
    /// arguments for this start only (the benchmark switches the connector
    /// between datapath variants); a later plain restart drops them again.
    pub fn restart_agent_with_args(&self, node: &str, extra: &[String]) -> Result<()> {
        let n = self.cluster_node(node)?;
        let args: Vec<String> = n.agent_args.iter().chain(extra).cloned().collect();
        let offset = {
            let mut agent = n.agent.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(mut running) = agent.take() {
                running.stop();
            }
            let offset = fs::metadata(&n.files.agent_log)
                .map(|m| m.len())
                .unwrap_or(0);
            *agent = Some(AgentProcess::start(
                &n.netns,
                node,
                &args,
                &n.files.agent_log,
                n.container.as_ref(),
            )?);
            offset
        };
        self.wait_for_agent(node, offset).with_context(|| {
            format!(
                "restarting the agent of {node}{}",
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(" with extra arguments {}", extra.join(" "))
                }
            )
        })
    }

    /// Restarts `node`'s agent as the DaemonSet's `maxSurge: 1` rolls it:
    /// the new agent starts beside the old one, and only when it says it
    /// stands by (in ESP mode: holding UDP 4500 beside the old one) is the
    /// old one stopped (SIGTERM). Then waits until the new one has taken over
    /// and applied its plan. Fails if the new agent applied anything (loaded
    /// its datapath) before the old one was gone.
    pub fn surge_restart_agent(&self, node: &str) -> Result<()> {
        let n = self.cluster_node(node)?;
        ensure!(
            n.container.is_none(),
            "{node}: a surge restart runs two agents side by side; not with an agent image"
        );
        let offset = fs::metadata(&n.files.agent_log)
            .map(|m| m.len())
            .unwrap_or(0);
        let mut new = AgentProcess::start(&n.netns, node, &n.agent_args, &n.files.agent_log, None)?;
        let standing_by = fabedge_agent::run::handover::STANDING_BY;
        let deadline = Instant::now() + AGENT_READY_TIMEOUT * self.timeout_factor;
        while !read_from(&n.files.agent_log, offset).contains(standing_by) {
            let log = read_from(&n.files.agent_log, offset);
            if let Err(e) = new.check_running() {
                bail!(
                    "{e:#} before standing by; its log:\n{}",
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the new agent of {node} did not log {standing_by:?} within {AGENT_READY_TIMEOUT:?}; its log:\n{}",
                tail(&log, LOG_TAIL_LINES)
            );
            thread::sleep(POLL);
        }
        {
            let mut agent = n.agent.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(mut old) = agent.take() {
                old.stop();
            }
            *agent = Some(new);
        }
        let taking_over = "taking over from pid";
        let deadline = Instant::now() + AGENT_READY_TIMEOUT * self.timeout_factor;
        let log = loop {
            let log = read_from(&n.files.agent_log, offset);
            if log.contains(taking_over) {
                break log;
            }
            ensure!(
                Instant::now() < deadline,
                "the new agent of {node} did not take over once the old one was gone; its log:\n{}",
                tail(&log, LOG_TAIL_LINES)
            );
            thread::sleep(POLL);
        };
        let standby = &log[log.find(standing_by).unwrap_or(0)..log.find(taking_over).unwrap_or(0)];
        ensure!(
            !standby.contains("fabedge-agent running"),
            "the new agent of {node} loaded its datapath while the old one still ran:\n{standby}"
        );
        let handed_over = offset + log.find(taking_over).unwrap_or(0) as u64;
        self.wait_for_agent(node, handed_over)
            .with_context(|| format!("surge restart of the agent of {node}"))
    }

    /// Restarts the agents of `nodes`, one after the other, while `from`
    /// sends an echo request to `to` every 20 ms, covering the whole window;
    /// each request's reply is awaited for up to a second (a slow reply is
    /// not a lost one). A failed restart is an error.
    pub fn restart_agents_under_ping(
        &self,
        nodes: &[&str],
        from: &Endpoint,
        to: Ipv4Addr,
    ) -> Result<RestartPings> {
        self.under_ping(nodes, from, to, |node| self.restart_agent(node))
    }

    /// [`Cluster::restart_agents_under_ping`] with [`Cluster::surge_restart_agent`].
    pub fn surge_restart_agents_under_ping(
        &self,
        nodes: &[&str],
        from: &Endpoint,
        to: Ipv4Addr,
    ) -> Result<RestartPings> {
        self.under_ping(nodes, from, to, |node| self.surge_restart_agent(node))
    }

    fn under_ping(
        &self,
        nodes: &[&str],
        from: &Endpoint,
        to: Ipv4Addr,
        restart: impl Fn(&str) -> Result<()>,
    ) -> Result<RestartPings> {
        let meter = GapMeter::start_to(from, to, &to.to_string(), RESTART_PING_INTERVAL)?;
        let mut restarts = Vec::new();
        for node in nodes {
            let began = Instant::now();
            let restarted = restart(node);
            restarts.push((node.to_string(), began, Instant::now()));
            restarted?;
        }
        let pings = meter.stop()?;
        Ok(RestartPings { pings, restarts })
    }

    /// The last lines of the agents' logs of `nodes`.
    /// Everything `node`'s agents logged so far (restarts append).
    pub fn agent_log(&self, node: &str) -> Result<String> {
        let node = self
            .nodes
            .get(node)
            .with_context(|| format!("no node {node}"))?;
        Ok(read_from(&node.files.agent_log, 0))
    }

    pub fn agent_logs(&self, nodes: &[String]) -> String {
        let mut out = String::new();
        for name in nodes {
            if let Some(node) = self.nodes.get(name) {
                let log = read_from(&node.files.agent_log, 0);
                out.push_str(&format!(
                    "--- agent log of {name} (last {LOG_TAIL_LINES} lines) ---\n{}\n",
                    tail(&log, LOG_TAIL_LINES)
                ));
            }
        }
        out
    }

    /// Agent logs and `inspect counters/peers/routes` of `nodes`, for failure messages.
    pub fn diagnostics(&self, nodes: &[String]) -> String {
        let mut out = self.agent_logs(nodes);
        for name in nodes {
            for what in ["counters", "peers", "routes"] {
                let table = self
                    .agent_inspect_table(name, what)
                    .unwrap_or_else(|e| format!("{e:#}\n"));
                out.push_str(&format!(
                    "--- {name}: fabedge-agent inspect {what} ---\n{table}"
                ));
            }
        }
        out
    }
    /// Run `script` (Python 3) as a hostNetwork process of `node`: in the
    /// node's network namespace and its cgroup. Returns its stdout.
    pub fn run_host_python(&self, node: &str, script: &str) -> Result<String> {
        let netns = self.node_netns(node)?;
        let cluster_id = self
            .work_dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("cluster work dir")?;
        let procs = node_cgroup(cluster_id, node).join("cgroup.procs");
        let shell = format!(
            "echo $$ > {} && exec nsenter --net={} python3 -c \"$0\"",
            procs.display(),
            netns.path().display()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &shell, script])
            .output()
            .context("running python3")?;
        ensure!(
            out.status.success(),
            "hostNetwork client on {node} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// How often [`Cluster::restart_agents_under_ping`] sends an echo request.
const RESTART_PING_INTERVAL: Duration = Duration::from_millis(20);

/// What the pings across agent restarts saw, and when each restart ran.
pub struct RestartPings {
    pub pings: PingGaps,
    /// (node, began, ended).
    restarts: Vec<(String, Instant, Instant)>,
}

impl RestartPings {
    pub fn sent(&self) -> u32 {
        self.pings.sent() as u32
    }

    pub fn received(&self) -> u32 {
        self.pings.received() as u32
    }

    pub fn lost(&self) -> u32 {
        self.pings.lost() as u32
    }

    /// `412 of 412 answered (slowest 31 ms); restarts: edge-1 0.02–6.10 s, …`
    /// and, if any were lost, when each lost request went out.
    pub fn summary(&self) -> String {
        let at = |instant: Instant| {
            instant
                .saturating_duration_since(self.pings.started)
                .as_secs_f64()
        };
        let restarts: Vec<String> = self
            .restarts
            .iter()
            .map(|(node, began, ended)| format!("{node} {:.2}–{:.2} s", at(*began), at(*ended)))
            .collect();
        let mut out = format!(
            "{}: {} of {} answered (slowest {} ms); restarts: {}",
            self.pings.label,
            self.received(),
            self.sent(),
            self.pings.slowest_reply().unwrap_or_default().as_millis(),
            restarts.join(", ")
        );
        let lost = self.pings.lost_sends();
        if !lost.is_empty() {
            let times: Vec<String> = lost
                .iter()
                .take(20)
                .map(|t| format!("{:.2}", t.as_secs_f64()))
                .collect();
            out.push_str(&format!(
                "; unanswered requests sent at {} s{}",
                times.join(", "),
                if lost.len() > 20 { ", …" } else { "" }
            ));
        }
        out
    }
}

/// The file's text from byte `offset` on ("" if unreadable).
fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
