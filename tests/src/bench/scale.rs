//! Control-plane scale in standalone (file) mode (issue #16): a release
//! agent on one edge node whose manifest holds [`SERVICES`] Services of
//! [`ENDPOINTS`] endpoints each.
//!
//! - `scale.full_sync_ms`: from starting the agent to the last Service's
//!   last backend being in `FE_BACKENDS` (loading the programs included);
//! - `scale.rss_mb`: the agent's resident memory once synced and done
//!   with the pass; `scale.peak_rss_mb`: the most it held (`VmHWM`);
//!   `scale.rss_anon_mb` and `scale.rss_file_mb`: the first split into
//!   the agent's own memory (`RssAnon`) and the pages of its binary and
//!   libraries it has mapped (`RssFile`, page cache the kernel may take
//!   back; `RssShmem` is zero here);
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
    process::{Child, Command, Stdio},
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
/// How long the agent must use no CPU to count as done with what it did.
const QUIET: Duration = Duration::from_millis(150);
const QUIET_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
pub(super) const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the full sync's wait looks at the maps: a spinning reader
/// would take one of the two cores from the agent and the API server for
/// seconds, for a figure that needs no better than a millisecond.
const SYNC_POLL: Duration = Duration::from_millis(1);
/// The Service whose endpoint changes: one in the middle of the file.
pub(super) const CHANGED: usize = SERVICES / 2;

pub fn run(report: &mut Report) -> Result<()> {
    println!();
    println!(
        "control plane at scale: {SERVICES} Services x {ENDPOINTS} endpoints, file mode, release agent"
    );
    let bin = release_agent_bin()?;
    let node = Node::new("scale")?;
    let mut text = manifest();
    println!(
        "  manifest: {:.1} MB",
        text.len() as f64 / (1024.0 * 1024.0)
    );
    node.replace(&text)?;
    let started = Instant::now();
    let agent = node.spawn(standalone_edge_1(&node.ns, &bin, &node.root, &node.work)?)?;
    let maps = node.maps(&agent, started)?;
    wait_for_full_sync(&maps, &agent)?;
    let full_sync = started.elapsed();
    // The pass goes on after the maps (the annotations written back):
    // memory and idle are measured after it.
    wait_quiet(&agent)?;
    record_synced(report, "scale", &agent, full_sync)?;

    let mut samples = Vec::with_capacity(CHANGES);
    let mut current = endpoint(CHANGED, 0);
    for n in 0..CHANGES {
        let next = changed_address(n);
        let old = format!("- addresses: [{current}]");
        ensure!(text.contains(&old), "{old} is not in the manifest");
        text = text.replacen(&old, &format!("- addresses: [{next}]"), 1);
        let written = node.replace_timed(&text)?;
        wait_for_backend(&maps, CHANGED, next, CHANGE_TIMEOUT, Duration::ZERO)
            .with_context(|| format!("change {n}\n{}", agent.log()))?;
        samples.push(written.elapsed());
        current = next;
        // Let the pass finish (its conntrack purge) before the next change.
        thread::sleep(Duration::from_millis(200));
    }
    record_changes(report, "scale", "rename to map entry", samples);
    drop(agent);
    Ok(())
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until the last Service's last backend is in the maps.
pub(super) fn wait_for_full_sync(maps: &Maps, agent: &Agent) -> Result<()> {
    let last = SERVICES - 1;
    wait_for_backend(
        maps,
        last,
        endpoint(last, ENDPOINTS - 1),
        SYNC_TIMEOUT,
        SYNC_POLL,
    )
    .with_context(|| agent.log())
}

/// Records `{prefix}.full_sync_ms` (`full_sync`), then the synced agent's
/// `{prefix}.rss_mb`, `{prefix}.peak_rss_mb` and `{prefix}.idle_cpu_pct`
/// (over [`IDLE`]).
pub(super) fn record_synced(
    report: &mut Report,
    prefix: &str,
    agent: &Agent,
    full_sync: Duration,
) -> Result<()> {
    println!("  full sync: {:.0} ms", ms(full_sync));
    report.record(format!("{prefix}.full_sync_ms"), ms(full_sync));

    let mb = |field: &str| -> Result<f64> { Ok(agent.status_field(field)? as f64 / 1024.0) };
    let (rss, peak) = (mb("VmRSS:")?, mb("VmHWM:")?);
    let (anon, file) = (mb("RssAnon:")?, mb("RssFile:")?);
    println!(
        "  RSS once synced: {rss:.1} MB ({anon:.1} MB its own, {file:.1} MB mapped from files; peak during the sync: {peak:.1} MB)"
    );
    report.record(format!("{prefix}.rss_mb"), rss);
    report.record(format!("{prefix}.rss_anon_mb"), anon);
    report.record(format!("{prefix}.rss_file_mb"), file);
    report.record(format!("{prefix}.peak_rss_mb"), peak);

    let before = agent.cpu_ticks()?;
    let idle_start = Instant::now();
    thread::sleep(IDLE);
    let ticks = agent.cpu_ticks()? - before;
    let idle_cpu = ticks as f64 / ticks_per_second() / idle_start.elapsed().as_secs_f64() * 100.0;
    println!("  idle CPU over {IDLE:?}: {idle_cpu:.2} %");
    report.record(format!("{prefix}.idle_cpu_pct"), idle_cpu);
    Ok(())
}

/// Records `{prefix}.endpoint_change_ms.{median,p99}` of `samples`, each
/// one endpoint change timed as `timed` says.
pub(super) fn record_changes(
    report: &mut Report,
    prefix: &str,
    timed: &str,
    mut samples: Vec<Duration>,
) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99).div_ceil(100) - 1];
    println!(
        "  one endpoint changed, {timed} ({} changes): median {:.1} ms, p99 {:.1} ms, min {:.1} ms",
        samples.len(),
        ms(median),
        ms(p99),
        ms(samples[0])
    );
    report.record(format!("{prefix}.endpoint_change_ms.median"), ms(median));
    report.record(format!("{prefix}.endpoint_change_ms.p99"), ms(p99));
}

/// The agent built with `cargo build --release -p fabedge-agent` (`cargo
/// xtask bench` builds it).
pub(super) fn release_agent_bin() -> Result<PathBuf> {
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

/// Inside the in-test API server's Service CIDR (`apiserver::SERVICE_CIDR`)
/// and clear of the mini cluster's `10.96.0.x`: both modes serve the same
/// Services.
pub(super) fn cluster_ip(service: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (service / 200 + 1) as u8, (service % 200 + 1) as u8)
}

pub(super) fn endpoint(service: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + (service * ENDPOINTS + n) as u32)
}

/// The address change `n` gives to an endpoint of [`CHANGED`].
pub(super) fn changed_address(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, (n / 250) as u8, (n % 250 + 1) as u8)
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

/// Poll the pinned maps until `addr` is in one of `service`'s slots,
/// `pause` between looks (zero: spin, for the millisecond figures).
pub(super) fn wait_for_backend(
    maps: &Maps,
    service: usize,
    addr: Ipv4Addr,
    timeout: Duration,
    pause: Duration,
) -> Result<()> {
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
        if pause.is_zero() {
            std::hint::spin_loop();
        } else {
            thread::sleep(pause);
        }
    }
}

/// The edge node: its namespace (edge-1's address on `eth0`), bpffs root
/// and work dir; uninstalled and removed on drop.
pub(super) struct Node {
    pub(super) ns: Netns,
    pub(super) root: PathBuf,
    pub(super) work: PathBuf,
}

impl Node {
    /// `name` tells the section's namespace, bpffs root and work dir apart.
    pub(super) fn new(name: &str) -> Result<Node> {
        let ns = edge_1_netns(&format!("{name}-edge"))?;
        let root = bpffs_root(name);
        let work =
            std::env::temp_dir().join(format!("fabedge-bench-{name}-{}", std::process::id()));
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

    /// Starts `agent` (an edge-1 command on this node), its output to a log.
    pub(super) fn spawn(&self, mut agent: Command) -> Result<Agent> {
        let log = self.work.join("agent.log");
        let out = fs::File::create(&log)?;
        let child = agent
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the release fabedge-agent")?;
        Ok(Agent { child, log })
    }

    /// The pinned maps, once the agent has created them.
    pub(super) fn maps(&self, agent: &Agent, started: Instant) -> Result<Maps> {
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

pub(super) struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    pub(super) fn log(&self) -> String {
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

    /// utime + stime of every thread, in clock ticks.
    pub(super) fn cpu_ticks(&self) -> Result<u64> {
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

/// Waits until `agent` used no CPU for [`QUIET`]: done with what it was doing.
pub(super) fn wait_quiet(agent: &Agent) -> Result<()> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    let mut ticks = agent.cpu_ticks()?;
    loop {
        thread::sleep(QUIET);
        let now = agent.cpu_ticks()?;
        if now == ticks {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent kept using CPU for {QUIET_TIMEOUT:?}\n{}",
                agent.log()
            );
        }
        ticks = now;
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: plain libc call.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
