//! `run --metrics-addr`: a real Prometheus (Debian's `prometheus`) scrapes
//! an agent of the mini cluster and shows, through its own query API, the
//! drop this test causes; `/healthz` and `/readyz` answer as a kubelet's
//! probes expect. Needs root.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_agent::observe::DEFAULT_METRICS_PORT;
use fabedge_common::Counter;
use fabedge_tests::{
    agent::{agent_bin, agent_ok, bpffs_root},
    cluster::{Cluster, ClusterOptions, PING_COUNT},
    metrics::{HttpReply, Prometheus, http_get, sample},
    netns::Netns,
};

/// TEST-NET-3: no route in any plan can cover it.
const UNROUTED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Every agent serves on its node's loopback (each node is a namespace).
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, DEFAULT_METRICS_PORT);
/// Scraped every second: a change shows within a few.
const SEEN_TIMEOUT: Duration = Duration::from_secs(30);
const AGENT_TIMEOUT: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(50);

#[test]
fn prometheus_scraping_an_edge_agent_sees_the_drop_the_test_caused() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        extra_agent_args: vec![
            "--tunnel".into(),
            "vxlan".into(),
            "--metrics-addr".into(),
            METRICS.to_string(),
        ],
        ..ClusterOptions::default()
    })?;
    let node = cluster.node_netns("edge-1")?;
    // The cluster waited for every agent's first apply.
    let health = http_get(node, METRICS, "/healthz")?;
    ensure!(health.status == 200, "edge-1 /healthz: {health:?}");
    let ready = http_get(node, METRICS, "/readyz")?;
    ensure!(
        ready.status == 200,
        "edge-1 /readyz after its first apply: {ready:?}"
    );

    let prometheus = Prometheus::start(node, &[METRICS])?;
    let no_route = format!(
        "fabedge_drops_total{{job=\"fabedge\",reason=\"{}\"}}",
        Counter::DropNoRoute.name()
    );
    let context = |what: &str| {
        format!(
            "{what}\n{}\nprometheus log:\n{}",
            cluster.diagnostics(&["edge-1".to_owned()]),
            prometheus.log()
        )
    };
    // Scraped and parsed: `up` is 0 when the page does not parse.
    prometheus
        .wait_for_value("up{job=\"fabedge\"}", SEEN_TIMEOUT, |up| up == 1.0)
        .with_context(|| context("prometheus never scraped edge-1's agent"))?;
    let before = prometheus
        .wait_for_value(&no_route, SEEN_TIMEOUT, |_| true)
        .with_context(|| context("no drop_no_route series"))?;
    let peer_tx = "fabedge_peer_packets_total{job=\"fabedge\",peer=\"edge-2\",direction=\"tx\"}";
    let tx_before = prometheus
        .wait_for_value(peer_tx, SEEN_TIMEOUT, |_| true)
        .with_context(|| context("no per-peer series for edge-2"))?;

    // The drop: an edge pod pings an address no route covers.
    let pod = cluster.pod("edge-1")?;
    let pinged = pod.ping(UNROUTED, PING_COUNT)?;
    ensure!(
        pinged.received == 0 && pinged.sent > 0,
        "{UNROUTED} answered: {pinged:?}"
    );
    let counted = *cluster
        .counters("edge-1")?
        .get(Counter::DropNoRoute.name())
        .context("edge-1: inspect counters has no drop_no_route")?;
    let seen = prometheus
        .wait_for_value(&no_route, SEEN_TIMEOUT, |v| v >= counted as f64)
        .with_context(|| {
            context(&format!(
                "prometheus never showed edge-1's drop_no_route at {counted} (inspect counters)"
            ))
        })?;
    ensure!(
        seen - before >= f64::from(pinged.sent),
        "drop_no_route grew by {} in prometheus, but {} packets went to {UNROUTED}",
        seen - before,
        pinged.sent
    );

    // Traffic to a community peer shows under the peer's node name.
    let to_edge2 = pod.ping(cluster.pod("edge-2")?.ip(), PING_COUNT)?;
    ensure!(
        to_edge2.all_received(),
        "edge-1 pod → edge-2 pod: {to_edge2:?}"
    );
    prometheus
        .wait_for_value(peer_tx, SEEN_TIMEOUT, |v| {
            v >= tx_before + f64::from(to_edge2.sent)
        })
        .with_context(|| context("edge-2's tx packets did not grow in prometheus"))?;

    // The rest of the page made it through as well.
    for (promql, what) in [
        ("fabedge_build_info{job=\"fabedge\"}", "build info"),
        ("fabedge_ready{job=\"fabedge\"}", "readiness"),
        ("fabedge_apply_last_success{job=\"fabedge\"}", "last apply"),
        (
            "fabedge_map_entries{job=\"fabedge\",map=\"FE_ROUTES\"} > 0",
            "routes in use",
        ),
    ] {
        prometheus
            .wait_for_value(promql, SEEN_TIMEOUT, |v| v >= 1.0)
            .with_context(|| context(what))?;
    }
    let max_routes = prometheus.query("fabedge_map_max_entries{map=\"FE_ROUTES\"}")?;
    ensure!(
        max_routes.len() == 1 && max_routes[0].value == f64::from(fabedge_common::MAX_ROUTES),
        "FE_ROUTES capacity in prometheus: {max_routes:?}"
    );
    Ok(())
}

/// A standalone agent alone in a namespace, stopped, uninstalled and its
/// files removed on drop.
struct LoneAgent {
    child: Child,
    netns: Netns,
    root: PathBuf,
    dir: PathBuf,
}

impl LoneAgent {
    fn start(node: &str, manifest: &str) -> Result<Self> {
        let netns = Netns::new("metrics-lone")?;
        let dir = std::env::temp_dir().join(format!("fabedge-metrics-lone-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("cluster.yaml"), manifest)?;
        let root = bpffs_root("metrics-lone");
        let log = fs::File::create(dir.join("agent.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .arg(agent_bin()?)
            .arg("--bpffs-root")
            .arg(&root)
            .args(["run", "--node", node, "--tunnel", "vxlan", "--no-cgroup"])
            .args([
                "--poll-interval",
                "100ms",
                "--metrics-addr",
                &METRICS.to_string(),
            ])
            .arg("--manifests")
            .arg(dir.join("cluster.yaml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--cni-conf-dir")
            .arg(dir.join("cni"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent (is nsenter installed?)")?;
        Ok(LoneAgent {
            child,
            netns,
            root,
            dir,
        })
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Polls `path` until `accept` takes the reply (connection refused
    /// while the agent loads its datapath is not an answer yet).
    fn wait_for(&mut self, path: &str, accept: impl Fn(&HttpReply) -> bool) -> Result<HttpReply> {
        let deadline = Instant::now() + AGENT_TIMEOUT;
        loop {
            let reply = http_get(&self.netns, METRICS, path);
            if let Ok(reply) = &reply
                && accept(reply)
            {
                return Ok(reply.clone());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}); its log:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{path}: no acceptable answer within {AGENT_TIMEOUT:?}; last: {reply:?}\nagent log:\n{}",
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for LoneAgent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let cni = self.dir.join("cni").display().to_string();
        if let Err(e) = agent_ok(
            Some(&self.netns),
            &self.root,
            &["uninstall", "--cni-conf-dir", &cni],
        ) {
            eprintln!("warning: uninstalling the lone agent: {e:#}");
        }
        let _ = fs::remove_dir_all(&self.root);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const LONE_NODE: &str = "lone-1";

#[test]
fn readyz_says_why_until_the_first_plan_applies_and_healthz_stays_up() -> Result<()> {
    // No Node named like the agent: every plan fails.
    let other = "apiVersion: v1\nkind: Node\nmetadata:\n  name: other-1\nspec:\n  podCIDR: 10.244.8.0/24\n\
                 status:\n  addresses:\n    - {type: InternalIP, address: 10.1.0.8}\n";
    let mut agent = LoneAgent::start(LONE_NODE, other)?;
    let not_ready = agent.wait_for("/readyz", |r| {
        r.status == 503 && r.body.contains("last attempt failed")
    })?;
    ensure!(
        not_ready
            .body
            .contains(&format!("node {LONE_NODE} is not in the cluster snapshot")),
        "/readyz names no reason: {not_ready:?}"
    );
    let health = http_get(&agent.netns, METRICS, "/healthz")?;
    ensure!(
        health.status == 200,
        "/healthz while no plan applies: {health:?}"
    );
    let page = http_get(&agent.netns, METRICS, "/metrics")?.body;
    ensure!(
        sample(&page, "fabedge_ready", &[]) == Some(0.0)
            && sample(&page, "fabedge_apply_last_success", &[]) == Some(0.0)
            && sample(&page, "fabedge_applies_total", &[("result", "error")]) >= Some(1.0),
        "metrics while every apply fails:\n{page}"
    );

    // The Node appears: the next apply succeeds and the agent is ready.
    // A Service with a ClusterIP outside --service-cidr is left out: one problem.
    fs::write(
        agent.dir.join("cluster.yaml"),
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {LONE_NODE}\nspec:\n  podCIDR: 10.244.7.0/24\n\
             status:\n  addresses:\n    - {{type: InternalIP, address: 10.1.0.7}}\n---\n{other}---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: astray\n  namespace: default\n\
             spec:\n  clusterIP: 192.0.2.10\n  ports:\n    - {{port: 80, protocol: TCP}}\n"
        ),
    )?;
    agent.wait_for("/readyz", |r| r.status == 200)?;
    let page = http_get(&agent.netns, METRICS, "/metrics")?.body;
    ensure!(
        sample(&page, "fabedge_ready", &[]) == Some(1.0)
            && sample(&page, "fabedge_apply_last_success", &[]) == Some(1.0)
            && sample(&page, "fabedge_applies_total", &[("result", "ok")]) >= Some(1.0)
            && sample(
                &page,
                "fabedge_metrics_source_up",
                &[("source", "datapath")]
            ) == Some(1.0)
            && sample(&page, "fabedge_problems", &[]) == Some(1.0),
        "metrics once the plan applied:\n{page}"
    );
    // Every family has its HELP and TYPE before its first sample.
    let mut announced = std::collections::BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            announced.insert(rest.split(' ').next().unwrap_or_default().to_owned());
        } else if !line.starts_with('#') {
            let family = line.split(['{', ' ']).next().unwrap_or_default();
            ensure!(
                announced.contains(family),
                "{family} has no TYPE line before it:\n{page}"
            );
        }
    }
    ensure!(
        page.matches("# HELP ").count() == announced.len(),
        "a HELP line per family:\n{page}"
    );
    Ok(())
}
