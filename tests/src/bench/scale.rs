//! Control-plane scale in standalone (file) mode (issue #16): a release
//! agent on one edge node whose manifest holds [`SERVICES`] Services of
//! [`ENDPOINTS`] endpoints each.
//!
//! - `scale.full_sync_ms`: from starting the agent to the last Service's
//!   last backend being in `FE_BACKENDS` (loading the programs included);
//! - `scale.rss_mb`: the agent's resident memory once synced;
//! - `scale.idle_cpu_pct`: its CPU time (utime + stime, all threads) over
//!   [`IDLE`] with nothing changing, as a percentage of one CPU;
//! - `scale.endpoint_change_ms.{median,p99}`: [`CHANGES`] times, one
//!   endpoint of one Service replaced by a new address (the file replaced
//!   by rename, as `kubectl` or an editor does), timed from the rename to
//!   the new address being in one of that Service's slots, read from the
//!   pinned maps in a tight loop.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_agent::{
    datapath::{self, PinLayout},
    maps::Maps,
    source::manifest::EXAMPLE_CLUSTER,
};
use fabedge_common::services::{BackendKey, ServiceKey};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    agent::{bpffs_root, edge_1_netns, standalone_edge_1},
    bench::report::Report,
    netns::Netns,
};

pub const SERVICES: usize = 10_000;
pub const ENDPOINTS: usize = 10;
pub const CHANGES: usize = 30;
const IDLE: Duration = Duration::from_secs(10);
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The Service whose endpoint changes: one in the middle of the file.
const CHANGED: usize = SERVICES / 2;

pub fn run(report: &mut Report) -> Result<()> {
    println!();
    println!(
        "control plane at scale: {SERVICES} Services x {ENDPOINTS} endpoints, file mode, release agent"
    );
    let bin = release_agent_bin()?;
    let node = Node::new()?;
    let mut text = manifest();
    println!(
        "  manifest: {:.1} MB",
        text.len() as f64 / (1024.0 * 1024.0)
    );
    node.replace(&text)?;
    let started = Instant::now();
    let agent = node.start(&bin)?;
    let maps = node.maps(&agent, started)?;
    let last = SERVICES - 1;
    wait_for_backend(&maps, last, endpoint(last, ENDPOINTS - 1), SYNC_TIMEOUT)
        .with_context(|| agent.log())?;
    let full_sync = started.elapsed();
    println!("  full sync: {:.0} ms", ms(full_sync));
    report.record("scale.full_sync_ms", ms(full_sync));

    let rss = agent.rss_kib()? as f64 / 1024.0;
    println!("  RSS once synced: {rss:.1} MB");
    report.record("scale.rss_mb", rss);

    let before = agent.cpu_ticks()?;
    let idle_start = Instant::now();
    thread::sleep(IDLE);
    let ticks = agent.cpu_ticks()? - before;
    let idle_cpu = ticks as f64 / ticks_per_second() / idle_start.elapsed().as_secs_f64() * 100.0;
    println!("  idle CPU over {IDLE:?}: {idle_cpu:.2} %");
    report.record("scale.idle_cpu_pct", idle_cpu);

    let mut samples = Vec::with_capacity(CHANGES);
    let mut current = endpoint(CHANGED, 0);
    for n in 0..CHANGES {
        let next = Ipv4Addr::new(10, 250, (n / 250) as u8, (n % 250 + 1) as u8);
        let old = format!("- addresses: [{current}]");
        ensure!(text.contains(&old), "{old} is not in the manifest");
        text = text.replacen(&old, &format!("- addresses: [{next}]"), 1);
        let written = node.replace_timed(&text)?;
        wait_for_backend(&maps, CHANGED, next, CHANGE_TIMEOUT)
            .with_context(|| format!("change {n}\n{}", agent.log()))?;
        samples.push(written.elapsed());
        current = next;
        // Let the pass finish (its conntrack purge) before the next change.
        thread::sleep(Duration::from_millis(200));
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99).div_ceil(100) - 1];
    println!(
        "  one endpoint changed, rename to map entry ({CHANGES} changes): median {:.1} ms, p99 {:.1} ms, min {:.1} ms",
        ms(median),
        ms(p99),
        ms(samples[0])
    );
    report.record("scale.endpoint_change_ms.median", ms(median));
    report.record("scale.endpoint_change_ms.p99", ms(p99));
    drop(agent);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The agent built with `cargo build --release -p fabedge-agent` (`cargo
/// xtask bench` builds it).
fn release_agent_bin() -> Result<PathBuf> {
    let debug = crate::agent::agent_bin()?;
    let release = debug
        .parent()
        .and_then(Path::parent)
        .context("the agent's target dir")?
        .join("release/fabedge-agent");
    ensure!(
        release.exists(),
        "{} is missing: build it with `cargo build --release -p fabedge-agent` (cargo xtask bench does)",
        release.display()
    );
    Ok(release)
}

fn cluster_ip(service: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (service / 200) as u8, (service % 200 + 1) as u8)
}

fn endpoint(service: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + (service * ENDPOINTS + n) as u32)
}

fn service_key(service: usize) -> ServiceKey {
    ServiceKey {
        addr: cluster_ip(service).octets(),
        port: 80,
        proto: 6,
        _pad: 0,
    }
}

/// The mini cluster's nodes with [`SERVICES`] Services, each with one
/// EndpointSlice of [`ENDPOINTS`] ready endpoints on edge-2.
fn manifest() -> String {
    let mut text = String::from(EXAMPLE_CLUSTER);
    for s in 0..SERVICES {
        let _ = write!(
            text,
            "---
apiVersion: v1
kind: Service
metadata: {{name: svc-{s}, namespace: bench}}
spec:
  clusterIP: {ip}
  clusterIPs: [{ip}]
  ports:
    - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{s}-a
  namespace: bench
  labels: {{kubernetes.io/service-name: svc-{s}}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
endpoints:
",
            ip = cluster_ip(s)
        );
        for e in 0..ENDPOINTS {
            let _ = write!(
                text,
                "  - addresses: [{}]\n    conditions: {{ready: true}}\n    nodeName: edge-2\n",
                endpoint(s, e)
            );
        }
    }
    text
}

/// Poll the pinned maps until `addr` is in one of `service`'s slots.
fn wait_for_backend(maps: &Maps, service: usize, addr: Ipv4Addr, timeout: Duration) -> Result<()> {
    let key = service_key(service);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entry) = maps.services.get(&key, 0) {
            for slot in 0..u32::from(entry.count) {
                let found = maps.backends.get(
                    &BackendKey {
                        service_id: entry.id,
                        slot,
                    },
                    0,
                );
                if found.is_ok_and(|b| b.addr == addr.octets()) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{addr} did not reach the slots of svc-{service} within {timeout:?}");
        }
        std::hint::spin_loop();
    }
}

/// The edge node: its namespace (edge-1's address on `eth0`), bpffs root
/// and work dir; uninstalled and removed on drop.
struct Node {
    ns: Netns,
    root: PathBuf,
    work: PathBuf,
}

impl Node {
    fn new() -> Result<Node> {
        let ns = edge_1_netns("scale-edge")?;
        let root = bpffs_root("scale");
        let work = std::env::temp_dir().join(format!("fabedge-bench-scale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(work.join("cni"))?;
        Ok(Node { ns, root, work })
    }

    fn manifest_path(&self) -> PathBuf {
        self.work.join("cluster.yaml")
    }

    /// Replace the manifest by rename.
    fn replace(&self, text: &str) -> Result<()> {
        self.replace_timed(text).map(drop)
    }

    /// Replace the manifest by rename; when the rename happened.
    fn replace_timed(&self, text: &str) -> Result<Instant> {
        let next = self.work.join(".cluster.yaml.next");
        fs::write(&next, text).with_context(|| format!("writing {}", next.display()))?;
        let at = Instant::now();
        fs::rename(&next, self.manifest_path()).context("replacing the manifest")?;
        Ok(at)
    }

    fn start(&self, bin: &Path) -> Result<Agent> {
        let log = self.work.join("agent.log");
        let out = fs::File::create(&log)?;
        let child = standalone_edge_1(&self.ns, bin, &self.root, &self.work)?
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the release fabedge-agent")?;
        Ok(Agent { child, log })
    }

    /// The pinned maps, once the agent has created them.
    fn maps(&self, agent: &Agent, started: Instant) -> Result<Maps> {
        let layout = PinLayout::new(&self.root);
        loop {
            if let Ok(maps) = Maps::open(&layout) {
                return Ok(maps);
            }
            if started.elapsed() > SYNC_TIMEOUT {
                bail!("the agent pinned no maps\n{}", agent.log());
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = datapath::uninstall(&self.root) {
            eprintln!("cleanup: uninstalling {}: {e:#}", self.root.display());
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status_field(&self, field: &str) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in the agent's /proc status"))
    }

    fn rss_kib(&self) -> Result<u64> {
        self.status_field("VmRSS:")
    }

    /// utime + stime of every thread, in clock ticks.
    fn cpu_ticks(&self) -> Result<u64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')').context("/proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); 12 and 13 here.
        Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: plain libc call.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
