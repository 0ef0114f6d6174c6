//! The mini cluster of the seed's test matrix (DESIGN.md §1 and §4, layer 3):
//! every node, pod and switch of `tests/fixtures/mini-cluster.yaml` as a
//! network namespace on this machine, the real `fabedge-agent` on every node,
//! a kernel `flannel.1` on the cloud nodes programmed the way Flannel's VXLAN
//! backend programs it, and pods attached by the real CNI plugins.
//!
//! ```text
//!                               switch namespace
//!      br-wan 198.18.0.0/24 ("the internet")            br-lan 10.1.0.0/24 (cloud LAN)
//!        |            |            |            |            |                |
//!     eth-wan      eth-wan      eth-wan      eth-wan      eth-lan          eth-lan
//!     edge-1       edge-2       edge-3       cloud-1 (connector)           cloud-2
//!     `--- InternalIP on lo, br-fabedge,     flannel.1, cni0,              flannel.1, cni0
//!          fe-tunnel (the agent's)           fe-tunnel (the agent's)
//! ```
//!
//! Edge InternalIPs sit on `lo` and nothing on the WAN routes to them or to
//! edge pod CIDRs: as behind a real NAT, a path to an edge works only through
//! fabedge's tunnel, and cloud addresses are reachable from an edge only the
//! same way. [`Cluster::check_path`] still proves every path by the datapath's
//! own statistics ([`Proof`]).
//!
//! Everything is torn down on drop, also after a panic: agents are stopped
//! and uninstalled, namespaces (and every process in them) deleted, bpffs
//! roots and temporary files removed. What a killed run left behind is
//! removed by the next [`Cluster::start`].

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, OpenOptions},
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use fabedge_agent::{
    datapath::PinLayout,
    inspect,
    maps::Maps,
    model::{annotation, label},
    plan::CNI_FILE_NAME,
    source::manifest,
};
use fabedge_common::{Counter, PeerStats};
use ipnet::Ipv4Net;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    agent::{agent_bin, agent_ok, agent_output},
    netns::{
        Netns, NextHop, PingResult, TcpEchoServer, UdpEchoServer, ping, tcp_echo, udp_echo,
        veth_pair,
    },
};

/// The example cluster every layer of tests shares.
pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mini-cluster.yaml");

/// "The internet": edge nodes' and the connector's public addresses.
const WAN: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 24) {
    Ok(net) => net,
    Err(_) => panic!("a /24 is a valid prefix"),
};
/// The cloud nodes' LAN, which Flannel's VXLAN runs over.
const LAN: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 1, 0, 0), 24) {
    Ok(net) => net,
    Err(_) => panic!("a /24 is a valid prefix"),
};
/// Edge nodes' site LAN behind a NAT router ([`ClusterOptions::edges_behind_nat`]).
const SITE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(192, 168, 18, 0), 24) {
    Ok(net) => net,
    Err(_) => panic!("a /24 is a valid prefix"),
};
/// The NAT router's address on the site LAN (the edges' way to the WAN).
const NAT_SITE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 18, 1);
/// The NAT router's public address: every edge packet leaves with it.
pub const NAT_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
const SITE_BRIDGE: &str = "br-site";
const WAN_BRIDGE: &str = "br-wan";
const LAN_BRIDGE: &str = "br-lan";
const WAN_NIC: &str = "eth-wan";
const LAN_NIC: &str = "eth-lan";

/// Flannel's VXLAN backend defaults: device, VNI, kernel VXLAN port, and the
/// MTU it gives the device on a 1500-byte NIC.
const FLANNEL_DEV: &str = "flannel.1";
const FLANNEL_VNI: &str = "1";
const FLANNEL_PORT: &str = "8472";
const FLANNEL_MTU: u16 = 1450;
/// The pod bridge the Flannel CNI plugin creates on cloud nodes.
const CLOUD_POD_BRIDGE: &str = "cni0";
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// TCP and UDP echo servers listen on this port on every endpoint.
pub const ECHO_PORT: u16 = 7777;
/// Echo requests per ping check; also the least growth a [`Proof`] accepts.
pub const PING_COUNT: u32 = 3;
const PING_INTERVAL: Duration = Duration::from_millis(50);
/// Big enough for the kernel to build GSO super-packets, which the datapath
/// must forward (or punt) as well as single segments.
const TCP_PAYLOAD_LEN: usize = 64 * 1024;
/// Fits the pods' 1450-byte MTU unfragmented.
const UDP_PAYLOAD_LEN: usize = 1200;
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Nothing on the test network loses packets, so a TCP echo needs no
/// retransmission; one spurious tail-loss probe is tolerated (a descheduled
/// receiver on a busy 2-core machine can delay an ACK past the probe timer).
/// A path that drops or mangles segments needs dozens.
const MAX_TCP_RETRANSMISSIONS: u64 = 1;
/// Path-MTU discovery legitimately costs up to an initial congestion window
/// (10 segments) of retransmissions: a node's NIC is wider than the tunnel,
/// and the first big segments toward a tunnel destination come back as ICMP
/// fragmentation-needed.
const PMTU_DISCOVERY_RETRANSMISSIONS: u64 = 10;

/// How long a started agent may take to apply its first plan (a debug build
/// loads and verifies the object).
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(45);
/// How long the connector may take to write the edge leases Flannel needs.
const FLANNEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Between a SIGTERM and a SIGKILL.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
const CNI_TIMEOUT: Duration = Duration::from_secs(20);
/// How long datapath statistics may keep moving after traffic (a last TCP
/// ACK in flight) before a measurement starts anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(25);
/// How often agents re-read the manifest file (their default is 1 s).
const AGENT_POLL_INTERVAL: &str = "250ms";
/// Agent log lines shown in a failure report, per node.
const LOG_TAIL_LINES: usize = 40;

/// Names the bpffs roots and work directories of one cluster, so two clusters
/// in one process never share them.
static NEXT_CLUSTER: AtomicU64 = AtomicU64::new(0);
/// Work directories are `<tmp>/fabedge-cluster-<pid>-<seq>`, bpffs roots
/// `/sys/fs/bpf/fabedge-cluster-<pid>-<seq>-<node>`: the pid tells a later
/// run whether they are leftovers.
const LEFTOVER_PREFIX: &str = "fabedge-cluster-";
const BPFFS: &str = "/sys/fs/bpf";

// ---------------------------------------------------------------------------
// What the harness reads from the Node objects, as Flannel and a node would
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Connector,
    Cloud,
    Edge,
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRole::Connector => "connector",
            NodeRole::Cloud => "cloud",
            NodeRole::Edge => "edge",
        })
    }
}

/// One Node of the manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub role: NodeRole,
    pub internal_ip: Ipv4Addr,
    pub external_ip: Option<Ipv4Addr>,
    pub pod_cidr: Ipv4Net,
    /// Where fabedge tunnels reach the node: annotation
    /// `fabedge.io/tunnel-endpoint`, else the ExternalIP, else the InternalIP.
    pub tunnel_endpoint: Ipv4Addr,
}

impl NodeSpec {
    /// The uplink the agent is started with: the connector's Flannel NIC, an
    /// edge node's WAN NIC; other cloud nodes need none.
    fn uplink(&self) -> Option<&'static str> {
        match self.role {
            NodeRole::Connector => Some(LAN_NIC),
            NodeRole::Edge => Some(WAN_NIC),
            NodeRole::Cloud => None,
        }
    }

    fn is_cloud(&self) -> bool {
        self.role != NodeRole::Edge
    }
}

/// A complete Flannel VXLAN lease from a Node's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelLease {
    pub vtep_mac: String,
    pub public_ip: Ipv4Addr,
}

/// The manifest's Nodes and their Flannel leases (only complete vxlan leases;
/// Flannel ignores the rest).
#[derive(Debug, Clone)]
struct Manifest {
    nodes: Vec<NodeSpec>,
    leases: BTreeMap<String, FlannelLease>,
}

impl Manifest {
    fn parse(text: &str) -> Result<Self> {
        let objects = manifest::parse(text)?;
        let mut nodes = Vec::new();
        let mut leases = BTreeMap::new();
        for object in &objects.nodes {
            let name = object
                .metadata
                .name
                .clone()
                .context("a Node without metadata.name")?;
            let context = || format!("node {name} in the manifest");
            let labels = object.metadata.labels.clone().unwrap_or_default();
            let annotations = object.metadata.annotations.clone().unwrap_or_default();
            let role = if labels.contains_key(label::EDGE) {
                NodeRole::Edge
            } else if labels.contains_key(label::CONNECTOR) {
                NodeRole::Connector
            } else {
                NodeRole::Cloud
            };
            let address = |kind: &str| -> Result<Option<Ipv4Addr>> {
                let addresses = object.status.as_ref().and_then(|s| s.addresses.as_ref());
                match addresses.into_iter().flatten().find(|a| a.type_ == kind) {
                    Some(a) => Ok(Some(
                        a.address
                            .parse()
                            .with_context(|| format!("{kind} {:?}", a.address))?,
                    )),
                    None => Ok(None),
                }
            };
            let internal_ip = address("InternalIP").with_context(context)?.with_context(|| {
                format!("node {name} has no InternalIP in status.addresses: the mini cluster needs one per node")
            })?;
            let external_ip = address("ExternalIP").with_context(context)?;
            let pod_cidr: Ipv4Net = object
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .with_context(|| {
                    format!("node {name} has no spec.podCIDR: every mini-cluster node runs a pod")
                })?
                .parse()
                .with_context(context)?;
            let tunnel_endpoint = match annotations.get(annotation::TUNNEL_ENDPOINT) {
                Some(value) => value
                    .parse()
                    .with_context(|| format!("{}: {value:?}", annotation::TUNNEL_ENDPOINT))?,
                None => external_ip.unwrap_or(internal_ip),
            };
            if let Some(lease) = flannel_lease(&annotations) {
                leases.insert(name.clone(), lease);
            }
            nodes.push(NodeSpec {
                name,
                role,
                internal_ip,
                external_ip,
                pod_cidr,
                tunnel_endpoint,
            });
        }
        Ok(Manifest { nodes, leases })
    }

    fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Manifest::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What Flannel's subnet manager accepts as a node's lease: backend type
/// vxlan, a `VtepMAC` in the backend data and a public IP.
fn flannel_lease(annotations: &BTreeMap<String, String>) -> Option<FlannelLease> {
    if annotations
        .get(annotation::FLANNEL_BACKEND_TYPE)
        .map(String::as_str)
        != Some("vxlan")
    {
        return None;
    }
    let data: serde_json::Value =
        serde_json::from_str(annotations.get(annotation::FLANNEL_BACKEND_DATA)?).ok()?;
    let vtep_mac = data.get("VtepMAC")?.as_str()?.to_owned();
    let public_ip = annotations
        .get(annotation::FLANNEL_PUBLIC_IP)?
        .parse()
        .ok()?;
    Some(FlannelLease {
        vtep_mac,
        public_ip,
    })
}

// ---------------------------------------------------------------------------
// Endpoints: pods and hostNetwork endpoints, each with echo servers
// ---------------------------------------------------------------------------

/// Something traffic is sent from and to: a pod, or a node's hostNetwork
/// endpoint (the node's namespace, addressed at its InternalIP). It answers
/// ping and runs TCP and UDP echo servers on [`ECHO_PORT`].
pub struct Endpoint {
    label: String,
    ip: Ipv4Addr,
    // Servers before the namespace: their sockets close before it is deleted.
    tcp: TcpEchoServer,
    udp: UdpEchoServer,
    netns: Arc<Netns>,
}

impl Endpoint {
    /// Servers are bound to `ip` itself: replies then leave from the address
    /// the client talks to (an unbound UDP reply on a cloud node would take
    /// `flannel.1`'s address as its source, and the client would ignore it).
    fn start(label: String, netns: Arc<Netns>, ip: Ipv4Addr) -> Result<Self> {
        let address = SocketAddrV4::new(ip, ECHO_PORT);
        let tcp = TcpEchoServer::start(&netns, address)
            .with_context(|| format!("{label}: TCP echo server"))?;
        let udp = UdpEchoServer::start(&netns, address)
            .with_context(|| format!("{label}: UDP echo server"))?;
        Ok(Endpoint {
            label,
            ip,
            tcp,
            udp,
            netns,
        })
    }

    /// `edge-1 pod`, `cloud-2 node`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// TCP connections and UDP datagrams its echo servers have answered
    /// (which backend of a Service served a client).
    pub fn requests_served(&self) -> u64 {
        self.tcp.requests_served() + self.udp.requests_served()
    }

    pub fn ping(&self, to: Ipv4Addr, count: u32) -> Result<PingResult> {
        ping(&self.netns, to, count, PING_INTERVAL)
            .with_context(|| format!("{} pinging {to}", self.label))
    }

    /// A 64 KiB TCP echo to `to` (connect to close), reply checked byte for
    /// byte, with what the ends' TCP/ICMP statistics say happened meanwhile.
    pub fn tcp_echo(&self, to: &Endpoint) -> Result<TcpEcho> {
        let payload = test_payload(TCP_PAYLOAD_LEN);
        let before = TransportStats::read(&self.netns)?.plus(TransportStats::read(&to.netns)?);
        let started = Instant::now();
        let reply = tcp_echo(&self.netns, to.tcp.local_addr(), &payload, ECHO_TIMEOUT)
            .with_context(|| format!("TCP echo {} → {}", self.label, to.label))?;
        let elapsed = started.elapsed();
        let after = TransportStats::read(&self.netns)?.plus(TransportStats::read(&to.netns)?);
        ensure!(
            reply == payload,
            "TCP echo {} → {}: sent {} bytes, got back {} different ones",
            self.label,
            to.label,
            payload.len(),
            reply.len()
        );
        Ok(TcpEcho {
            elapsed,
            retransmitted: after
                .tcp_retransmitted
                .saturating_sub(before.tcp_retransmitted),
            path_mtu_discovered: after.icmp_unreachable_received > before.icmp_unreachable_received,
        })
    }

    /// Round trip of one UDP datagram to `to`, reply checked byte for byte.
    pub fn udp_echo(&self, to: &Endpoint) -> Result<Duration> {
        let payload = test_payload(UDP_PAYLOAD_LEN);
        let started = Instant::now();
        let reply = udp_echo(&self.netns, to.udp.local_addr(), &payload, ECHO_TIMEOUT)
            .with_context(|| format!("UDP echo {} → {}", self.label, to.label))?;
        let elapsed = started.elapsed();
        ensure!(
            reply == payload,
            "UDP echo {} → {}: the reply differs from the request",
            self.label,
            to.label
        );
        Ok(elapsed)
    }

    /// Ping, TCP and UDP from here to `to`; every outcome is kept, failed or not.
    pub fn exchange(&self, to: &Endpoint) -> Exchange {
        let ping = self.ping(to.ip, PING_COUNT).and_then(|result| {
            if result.all_received() {
                Ok(result)
            } else {
                Err(anyhow!(
                    "ping {} → {} ({}): {result:?}",
                    self.label,
                    to.label,
                    to.ip
                ))
            }
        });
        Exchange {
            from: self.label.clone(),
            to: to.label.clone(),
            ping,
            tcp: self.tcp_echo(to),
            udp: self.udp_echo(to),
        }
    }
}

/// The part of a namespace's `/proc/net/snmp` that explains a TCP echo. Only
/// the tests' own connections run in pod and node namespaces, so its growth
/// over an exchange belongs to that exchange.
#[derive(Debug, Clone, Copy)]
struct TransportStats {
    /// `Tcp: RetransSegs`.
    tcp_retransmitted: u64,
    /// `Icmp: InDestUnreachs`, which counts fragmentation-needed.
    icmp_unreachable_received: u64,
}

impl TransportStats {
    fn read(netns: &Netns) -> Result<Self> {
        let snmp = netns.enter(|| {
            fs::read_to_string("/proc/thread-self/net/snmp")
                .context("reading /proc/thread-self/net/snmp")
        })?;
        let field = |protocol: &str, name: &str| -> Result<u64> {
            let prefix = format!("{protocol}:");
            let mut lines = snmp.lines().filter(|line| line.starts_with(&prefix));
            let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
                bail!(
                    "netns {}: no {protocol} lines in /proc/net/snmp",
                    netns.name()
                );
            };
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .and_then(|(_, value)| value.parse().ok())
                .with_context(|| {
                    format!(
                        "netns {}: no {protocol} {name} in /proc/net/snmp",
                        netns.name()
                    )
                })
        };
        Ok(TransportStats {
            tcp_retransmitted: field("Tcp", "RetransSegs")?,
            icmp_unreachable_received: field("Icmp", "InDestUnreachs")?,
        })
    }

    fn plus(self, other: Self) -> Self {
        TransportStats {
            tcp_retransmitted: self.tcp_retransmitted + other.tcp_retransmitted,
            icmp_unreachable_received: self.icmp_unreachable_received
                + other.icmp_unreachable_received,
        }
    }
}

fn test_payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A TCP echo that got its bytes back.
#[derive(Debug, Clone, Copy)]
pub struct TcpEcho {
    pub elapsed: Duration,
    /// Segments either end retransmitted during the echo.
    pub retransmitted: u64,
    /// An end received ICMP destination-unreachable meanwhile: path-MTU
    /// discovery toward a narrower tunnel, which costs retransmissions.
    pub path_mtu_discovered: bool,
}

impl TcpEcho {
    /// Retransmissions beyond what a lossless path explains.
    pub fn excess_retransmissions(&self) -> Option<u64> {
        let allowed = MAX_TCP_RETRANSMISSIONS
            + if self.path_mtu_discovered {
                PMTU_DISCOVERY_RETRANSMISSIONS
            } else {
                0
            };
        (self.retransmitted > allowed).then_some(self.retransmitted)
    }
}

/// What ping, TCP echo and UDP echo from one endpoint to another did.
#[derive(Debug)]
pub struct Exchange {
    pub from: String,
    pub to: String,
    pub ping: Result<PingResult>,
    pub tcp: Result<TcpEcho>,
    pub udp: Result<Duration>,
}

impl Exchange {
    pub fn succeeded(&self) -> bool {
        self.failures().is_empty()
    }

    /// Average ping round trip, if every ping was answered.
    pub fn ping_rtt(&self) -> Option<Duration> {
        let rtts = &self.ping.as_ref().ok()?.rtts;
        let count = u32::try_from(rtts.len()).ok().filter(|n| *n > 0)?;
        Some(rtts.iter().sum::<Duration>() / count)
    }

    /// One line per failed check.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if let Err(e) = &self.ping {
            failures.push(format!("ping failed: {e:#}"));
        }
        match &self.tcp {
            Err(e) => failures.push(format!("TCP failed: {e:#}")),
            Ok(echo) => {
                if let Some(retransmitted) = echo.excess_retransmissions() {
                    failures.push(format!(
                        "TCP needed {retransmitted} retransmitted segments for a {} KiB echo on a lossless path{}: \
                         the path loses packets",
                        TCP_PAYLOAD_LEN / 1024,
                        if echo.path_mtu_discovered { " (path-MTU discovery included)" } else { "" }
                    ));
                }
            }
        }
        if let Err(e) = &self.udp {
            failures.push(format!("UDP failed: {e:#}"));
        }
        failures
    }
}

// ---------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------

/// A `fabedge-agent run` in a node's namespace, entered with `nsenter --net`
/// only: `ip netns exec` (and so `Netns::spawn`) gives the process a mount
/// namespace without bpffs, where its pins would be invisible. Stopped on drop.
struct AgentProcess {
    child: Child,
    node: String,
}

impl AgentProcess {
    fn start(netns: &Netns, node: &str, args: &[String], log_path: &Path) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening agent log {}", log_path.display()))?;
        let log_for_stderr = log
            .try_clone()
            .context("duplicating the agent log handle")?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .arg(agent_bin()?)
            .args(args)
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
        })
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
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

/// How to build a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The manifest file. It is copied: agents read the copy and the connector
    /// writes its annotations into it.
    pub manifests: PathBuf,
    /// More `fabedge-agent run` arguments for every node; `--tunnel vxlan`
    /// by default (replace it with `--tunnel esp` where the kernel has ESP).
    pub extra_agent_args: Vec<String>,
    /// Multiplies the agent and Flannel readiness timeouts (qemu TCG is slow).
    pub timeout_factor: u32,
    /// Edge nodes on one site LAN (192.168.18.0/24, their ExternalIPs
    /// rewritten to it) behind a NAT router namespace that masquerades them
    /// onto the WAN as [`NAT_PUBLIC_IP`] and forwards nothing the WAN opens.
    pub edges_behind_nat: bool,
    /// More `fabedge-agent run` arguments for the connector only.
    pub connector_args: Vec<String>,
    /// A port forward in front of the connector: UDP to this port of its WAN
    /// address reaches its UDP 4500 (a REDIRECT in its namespace).
    pub connector_port_forward: Option<u16>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            manifests: PathBuf::from(FIXTURE),
            // The host kernel has no ESP (the default tunnel mode): the
            // plaintext mode, unless a test asks for ESP (in the VMs).
            extra_agent_args: vec!["--tunnel".into(), "vxlan".into()],
            timeout_factor: 1,
            edges_behind_nat: false,
            connector_args: Vec::new(),
            connector_port_forward: None,
        }
    }
}

/// Per-node files, all inside the cluster's work directory except the bpffs root.
struct NodeFiles {
    bpffs_root: PathBuf,
    state_dir: PathBuf,
    cni_conf_dir: PathBuf,
    /// host-local's allocations (its default, /var/lib/cni, is shared by every "node" here).
    ipam_dir: PathBuf,
    agent_log: PathBuf,
}

struct ClusterNode {
    spec: NodeSpec,
    files: NodeFiles,
    /// The `run` arguments, kept for restarts.
    agent_args: Vec<String>,
    /// Behind a lock so that tests can restart an agent while traffic flows
    /// between endpoints they borrowed from the same cluster.
    agent: Mutex<Option<AgentProcess>>,
    /// Whether an agent ever ran, so teardown knows to uninstall.
    agent_started: bool,
    pod: Option<Endpoint>,
    host: Option<Endpoint>,
    netns: Arc<Netns>,
}

/// The running mini cluster. See the module documentation.
pub struct Cluster {
    nodes: BTreeMap<String, ClusterNode>,
    switch: Option<Netns>,
    /// The edges' NAT router ([`ClusterOptions::edges_behind_nat`]).
    nat: Option<Netns>,
    edges_behind_nat: bool,
    connector_args: Vec<String>,
    work_dir: PathBuf,
    manifests: PathBuf,
    /// Flannel leases as last read from the manifest file (names VTEP peers).
    leases: BTreeMap<String, FlannelLease>,
    extra_agent_args: Vec<String>,
    timeout_factor: u32,
}

impl Cluster {
    /// Builds the whole cluster and waits until every path can carry traffic:
    /// agents have applied their plans, the connector has written the edge
    /// leases and Flannel has been programmed from them, pods are attached.
    pub fn start(options: ClusterOptions) -> Result<Cluster> {
        let sequence = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        let cluster_id = format!("{LEFTOVER_PREFIX}{}-{sequence}", std::process::id());
        let work_dir = std::env::temp_dir().join(&cluster_id);
        fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let manifests = work_dir.join("cluster.yaml");
        fs::copy(&options.manifests, &manifests).with_context(|| {
            format!(
                "copying {} to {}",
                options.manifests.display(),
                manifests.display()
            )
        })?;
        if options.edges_behind_nat {
            move_edges_to_the_site_lan(&manifests)?;
        }
        let manifest = Manifest::read(&manifests)?;

        // From here on, a failure drops `cluster`, which tears down what exists.
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            switch: None,
            nat: None,
            edges_behind_nat: options.edges_behind_nat,
            connector_args: options.connector_args.clone(),
            work_dir,
            manifests,
            leases: manifest.leases.clone(),
            extra_agent_args: options.extra_agent_args.clone(),
            timeout_factor: options.timeout_factor.max(1),
        };
        let switch = Netns::new("switch")?;
        // The first namespace of this process has removed stale namespaces
        // (and the agents in them); now their bpffs roots and files can go.
        remove_stale_leftovers();
        switch.bridge(WAN_BRIDGE)?;
        switch.bridge(LAN_BRIDGE)?;
        if options.edges_behind_nat {
            switch.bridge(SITE_BRIDGE)?;
            cluster.nat = Some(create_nat_router(&switch)?);
        }
        cluster.switch = Some(switch);

        for spec in &manifest.nodes {
            let node = cluster.create_node(spec, &cluster_id)?;
            cluster.nodes.insert(spec.name.clone(), node);
        }
        if let Some(port) = options.connector_port_forward {
            for name in cluster.connector_names() {
                forward_port_to_esp(cluster.node_netns(&name)?, port)
                    .with_context(|| format!("port forward in front of {name}"))?;
            }
        }
        for node in cluster.nodes.values_mut() {
            let agent = AgentProcess::start(
                &node.netns,
                &node.spec.name,
                &node.agent_args,
                &node.files.agent_log,
            )?;
            *node.agent.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(agent);
            node.agent_started = true;
        }
        for name in cluster.node_names() {
            cluster.wait_for_agent(&name, 0)?;
        }
        cluster.wait_for_flannel()?;
        for name in cluster.node_names() {
            cluster.attach_pod(&name)?;
        }
        Ok(cluster)
    }

    /// Every node's name, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// A node's namespace, its wiring to the switch, its addresses and (on
    /// cloud nodes) Flannel's device; its agent's files and arguments.
    fn create_node(&self, spec: &NodeSpec, cluster_id: &str) -> Result<ClusterNode> {
        let switch = self
            .switch
            .as_ref()
            .context("the switch namespace exists before nodes")?;
        let context = || format!("creating node {} ({})", spec.name, spec.role);
        let netns = Netns::new(&spec.name).with_context(context)?;
        // The switch's port for a node's NIC is `<node>-wan` / `<node>-lan`.
        let wire = |nic: &str,
                    network: &str,
                    bridge: &str,
                    address: Ipv4Addr,
                    net: Ipv4Net|
         -> Result<()> {
            ensure!(
                net.contains(&address),
                "node {}: {address} (on {nic}) is outside {net}",
                spec.name
            );
            let port = format!("{}-{network}", spec.name);
            veth_pair(&netns, nic, switch, &port)?;
            switch.attach_to_bridge(&port, bridge)?;
            netns.add_addr(nic, &format!("{address}/{}", net.prefix_len()))
        };
        match spec.role {
            NodeRole::Edge => {
                let public = spec.external_ip.with_context(|| {
                    format!(
                        "edge node {} needs an ExternalIP (its address on the WAN)",
                        spec.name
                    )
                })?;
                if self.edges_behind_nat {
                    wire(WAN_NIC, "wan", SITE_BRIDGE, public, SITE).with_context(context)?;
                    netns
                        .add_route(&WAN.to_string(), NextHop::Gateway(NAT_SITE_IP))
                        .with_context(context)?;
                } else {
                    wire(WAN_NIC, "wan", WAN_BRIDGE, public, WAN).with_context(context)?;
                }
                // Behind "NAT": the InternalIP is nobody's route but the tunnel's.
                netns
                    .add_addr("lo", &format!("{}/32", spec.internal_ip))
                    .with_context(context)?;
            }
            NodeRole::Connector | NodeRole::Cloud => {
                wire(LAN_NIC, "lan", LAN_BRIDGE, spec.internal_ip, LAN).with_context(context)?;
                if let Some(public) = spec.external_ip {
                    wire(WAN_NIC, "wan", WAN_BRIDGE, public, WAN).with_context(context)?;
                }
                netns
                    .set_sysctl("net.ipv4.ip_forward", "1")
                    .with_context(context)?;
                let lease = self.leases.get(&spec.name).with_context(|| {
                    format!(
                        "cloud node {} has no Flannel lease annotations in the manifest",
                        spec.name
                    )
                })?;
                create_flannel_device(&netns, spec, lease).with_context(context)?;
            }
        }

        let dir = self.work_dir.join(&spec.name);
        let files = NodeFiles {
            bpffs_root: Path::new(BPFFS).join(format!("{cluster_id}-{}", spec.name)),
            state_dir: dir.join("state"),
            cni_conf_dir: dir.join("cni"),
            ipam_dir: dir.join("ipam"),
            agent_log: dir.join("agent.log"),
        };
        for d in [&files.state_dir, &files.cni_conf_dir, &files.ipam_dir] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut agent_args: Vec<String> = vec![
            "--bpffs-root".into(),
            files.bpffs_root.display().to_string(),
            "run".into(),
            "--node".into(),
            spec.name.clone(),
            "--manifests".into(),
            self.manifests.display().to_string(),
            "--state-dir".into(),
            files.state_dir.display().to_string(),
            "--cni-conf-dir".into(),
            files.cni_conf_dir.display().to_string(),
            "--poll-interval".into(),
            AGENT_POLL_INTERVAL.into(),
        ];
        if let Some(uplink) = spec.uplink() {
            agent_args.extend(["--uplink".into(), uplink.into()]);
        }
        // cgroup programs see sockets of every network namespace: each node
        // gets its own cgroup, never the host's root.
        let cgroup = node_cgroup(cluster_id, &spec.name);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        agent_args.extend(["--cgroup".into(), cgroup.display().to_string()]);
        agent_args.extend(self.extra_agent_args.iter().cloned());
        if spec.role == NodeRole::Connector {
            agent_args.extend(self.connector_args.iter().cloned());
        }
        Ok(ClusterNode {
            spec: spec.clone(),
            files,
            agent_args,
            agent: Mutex::new(None),
            agent_started: false,
            pod: None,
            host: None,
            netns: Arc::new(netns),
        })
    }

    fn cluster_node(&self, name: &str) -> Result<&ClusterNode> {
        self.nodes.get(name).with_context(|| {
            format!(
                "no node {name} in the mini cluster (nodes: {})",
                self.node_names().join(", ")
            )
        })
    }

    /// Waits until the agent of `name` says it applied a plan, in log bytes
    /// written after `log_offset`.
    fn wait_for_agent(&self, name: &str, log_offset: u64) -> Result<()> {
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

    /// Plays Flannel on every cloud node until the connector has written a
    /// lease onto every edge Node and those leases are programmed.
    fn wait_for_flannel(&mut self) -> Result<()> {
        let deadline = Instant::now() + FLANNEL_TIMEOUT * self.timeout_factor;
        loop {
            let manifest = Manifest::read(&self.manifests)?;
            let missing: Vec<&str> = manifest
                .nodes
                .iter()
                .filter(|n| n.role == NodeRole::Edge && !manifest.leases.contains_key(&n.name))
                .map(|n| n.name.as_str())
                .collect();
            if missing.is_empty() {
                self.program_flannel(&manifest.leases)?;
                self.leases = manifest.leases;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the connector did not write Flannel annotations onto edge node(s) {} within {FLANNEL_TIMEOUT:?}\n{}",
                    missing.join(", "),
                    self.agent_logs(&self.connector_names())
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Plays Flannel once more, as after a watch event: programs the leases
    /// the manifest file holds now (e.g. after a test edited it).
    pub fn sync_flannel(&self) -> Result<()> {
        self.program_flannel(&Manifest::read(&self.manifests)?.leases)
    }

    /// Programs `flannel.1` on every cloud node the way Flannel's VXLAN
    /// backend does for each lease it learns: a route via the remote pod
    /// CIDR's network address (onlink), a permanent neighbour entry binding
    /// that address to the remote `VtepMAC`, and an FDB entry sending that MAC
    /// to the remote public IP. Leases at the node's own address are skipped,
    /// as Flannel skips its own lease (on the connector, the edge leases it
    /// wrote name the connector itself).
    fn program_flannel(&self, leases: &BTreeMap<String, FlannelLease>) -> Result<()> {
        for node in self.nodes.values().filter(|n| n.spec.is_cloud()) {
            let own_addresses: Vec<Ipv4Addr> = [
                Some(node.spec.internal_ip),
                leases.get(&node.spec.name).map(|l| l.public_ip),
            ]
            .into_iter()
            .flatten()
            .collect();
            for remote in self
                .nodes
                .values()
                .filter(|r| r.spec.name != node.spec.name)
            {
                let Some(lease) = leases.get(&remote.spec.name) else {
                    continue;
                };
                if own_addresses.contains(&lease.public_ip) {
                    continue;
                }
                let gateway = remote.spec.pod_cidr.network().to_string();
                let context = || {
                    format!(
                        "programming Flannel on {} for {}'s lease {lease:?}",
                        node.spec.name, remote.spec.name
                    )
                };
                let netns = &node.netns;
                netns
                    .ip(&[
                        "route",
                        "replace",
                        &remote.spec.pod_cidr.to_string(),
                        "via",
                        &gateway,
                        "dev",
                        FLANNEL_DEV,
                        "onlink",
                    ])
                    .with_context(context)?;
                netns
                    .ip(&[
                        "neigh",
                        "replace",
                        &gateway,
                        "lladdr",
                        &lease.vtep_mac,
                        "dev",
                        FLANNEL_DEV,
                        "nud",
                        "permanent",
                    ])
                    .with_context(context)?;
                netns
                    .run_ok(
                        "bridge",
                        &[
                            "fdb",
                            "replace",
                            &lease.vtep_mac,
                            "dev",
                            FLANNEL_DEV,
                            "dst",
                            &lease.public_ip.to_string(),
                            "self",
                            "permanent",
                        ],
                    )
                    .with_context(context)?;
            }
        }
        Ok(())
    }

    /// Attaches the node's pod with the real CNI plugins — on edge nodes with
    /// the conflist the agent wrote, on cloud nodes with a Flannel-like
    /// configuration — and starts the pod's and the node's echo servers.
    fn attach_pod(&mut self, name: &str) -> Result<()> {
        let node = self.cluster_node(name)?;
        let pod_netns = Arc::new(Netns::new(&format!("{name}-pod"))?);
        let plugin = match node.spec.role {
            NodeRole::Edge => {
                let path = node.files.cni_conf_dir.join(CNI_FILE_NAME);
                first_plugin_of(&path)
                    .with_context(|| format!("reading the CNI config the agent of {name} wrote"))?
            }
            NodeRole::Connector | NodeRole::Cloud => flannel_like_cni_config(node.spec.pod_cidr),
        };
        let pod_ip = cni_add(
            &node.netns,
            &pod_netns,
            &format!("{name}-pod"),
            plugin,
            &node.files.ipam_dir,
        )
        .with_context(|| format!("attaching the pod of {name}"))?;
        ensure!(
            node.spec.pod_cidr.contains(&pod_ip),
            "the pod of {name} got {pod_ip}, outside the node's pod CIDR {}",
            node.spec.pod_cidr
        );
        let pod = Endpoint::start(format!("{name} pod"), pod_netns, pod_ip)?;
        let host = Endpoint::start(
            format!("{name} node"),
            Arc::clone(&node.netns),
            node.spec.internal_ip,
        )?;
        let node = self
            .nodes
            .get_mut(name)
            .with_context(|| format!("no node {name}"))?;
        node.pod = Some(pod);
        node.host = Some(host);
        Ok(())
    }

    // -- what tests use ------------------------------------------------------

    /// The node's pod.
    pub fn pod(&self, node: &str) -> Result<&Endpoint> {
        self.cluster_node(node)?
            .pod
            .as_ref()
            .with_context(|| format!("node {node} has no pod"))
    }

    /// The node's hostNetwork endpoint (its namespace, at its InternalIP).
    pub fn node(&self, node: &str) -> Result<&Endpoint> {
        self.cluster_node(node)?
            .host
            .as_ref()
            .with_context(|| format!("node {node} has no hostNetwork endpoint"))
    }

    pub fn endpoint(&self, at: At) -> Result<&Endpoint> {
        match at {
            At::Pod(node) => self.pod(node),
            At::Node(node) => self.node(node),
        }
    }

    /// The node's namespace.
    /// What kube-proxy (iptables mode) writes on a cloud node for a
    /// ClusterIP: a DNAT in PREROUTING (pods) and OUTPUT (the node itself)
    /// to one of `backends`, each picked with equal probability.
    pub fn kube_proxy_dnat(
        &self,
        node: &str,
        vip: Ipv4Addr,
        port: u16,
        protocol: &str,
        backends: &[SocketAddrV4],
    ) -> Result<()> {
        let netns = self.node_netns(node)?;
        for chain in ["PREROUTING", "OUTPUT"] {
            for (i, backend) in backends.iter().enumerate() {
                let probability = format!("{:.5}", 1.0 / (backends.len() - i) as f64);
                let (vip, port, backend) = (vip.to_string(), port.to_string(), backend.to_string());
                let mut args = vec![
                    "-w", "-t", "nat", "-A", chain, "-d", &vip, "-p", protocol, "--dport", &port,
                ];
                if i + 1 < backends.len() {
                    args.extend([
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &probability,
                    ]);
                }
                args.extend(["-j", "DNAT", "--to-destination", &backend]);
                netns
                    .run_ok("iptables", &args)
                    .with_context(|| format!("{node}: kube-proxy-like DNAT for {vip}:{port}"))?;
            }
        }
        Ok(())
    }

    pub fn node_netns(&self, node: &str) -> Result<&Netns> {
        Ok(&self.cluster_node(node)?.netns)
    }

    /// The NAT router in front of the edges ([`ClusterOptions::edges_behind_nat`]).
    pub fn nat_router(&self) -> Result<&Netns> {
        self.nat
            .as_ref()
            .context("this cluster has no NAT router (ClusterOptions::edges_behind_nat)")
    }

    /// The NAT router's mapping changes, as when a home router reboots or an
    /// ISP reassigns addresses: from now on the edges leave as `public`
    /// (added to its WAN NIC) from a source port in `ports`, and every
    /// existing mapping is forgotten (conntrack flushed).
    pub fn change_nat_mapping(&self, public: Ipv4Addr, ports: (u16, u16)) -> Result<()> {
        let nat = self.nat_router()?;
        let cidr = format!("{public}/{}", WAN.prefix_len());
        if !nat
            .ip(&["-4", "-o", "addr", "show", "dev", WAN_NIC])?
            .contains(&format!(" {cidr} "))
        {
            nat.add_addr(WAN_NIC, &cidr)?;
        }
        nat.run_ok("iptables", &["-w", "-t", "nat", "-F", "POSTROUTING"])?;
        let to = format!("{public}:{}-{}", ports.0, ports.1);
        nat.run_ok(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                WAN_NIC,
                "-p",
                "udp",
                "-j",
                "SNAT",
                "--to-source",
                &to,
            ],
        )?;
        nat.run_ok(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                WAN_NIC,
                "-j",
                "SNAT",
                "--to-source",
                &public.to_string(),
            ],
        )?;
        nat.run_ok("conntrack", &["-F"])
            .context("flushing the NAT's mappings (apt-get install conntrack)")?;
        Ok(())
    }

    /// The switch namespace; its bridge port for `node`'s `nic` is `<node>-<wan|lan>`.
    pub fn switch(&self) -> Result<&Netns> {
        self.switch.as_ref().context("the switch namespace is gone")
    }

    /// The switch's port facing `node`'s WAN NIC: every frame the node sends
    /// to the internet arrives there.
    pub fn wan_port(&self, node: &str) -> Result<String> {
        self.cluster_node(node)?;
        Ok(format!("{node}-wan"))
    }

    pub fn spec(&self, node: &str) -> Result<&NodeSpec> {
        Ok(&self.cluster_node(node)?.spec)
    }

    /// The cluster's manifest file (agents read it; the connector writes it).
    /// Node `node`'s agent state directory (keys, generations).
    pub fn state_dir(&self, node: &str) -> Result<&Path> {
        Ok(&self.cluster_node(node)?.files.state_dir)
    }

    pub fn manifests(&self) -> &Path {
        &self.manifests
    }

    fn connector_names(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.spec.role == NodeRole::Connector)
            .map(|n| n.spec.name.clone())
            .collect()
    }

    /// `fabedge-agent inspect <what> --json` on `node`, parsed.
    pub fn agent_inspect(&self, node: &str, what: &str) -> Result<serde_json::Value> {
        let n = self.cluster_node(node)?;
        let state_dir = n.files.state_dir.display().to_string();
        // Peer names come from the state dir's peer ids.
        let args = if what == "tunnels" {
            vec!["inspect", what, "--json", "--state-dir", &state_dir]
        } else {
            vec!["inspect", what, "--json"]
        };
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

    /// The node's datapath counters by name, summed over CPUs. Read in this
    /// process with the agent's own `inspect` code (the rows `inspect counters
    /// --json` prints): a CLI run costs ~130 ms with the debug binary, and
    /// every path takes several snapshots of every node.
    pub fn counters(&self, node: &str) -> Result<BTreeMap<String, u64>> {
        let maps = self.maps(node)?;
        let rows = inspect::counters(&maps, false)
            .with_context(|| format!("node {node}: reading counters"))?;
        Ok(rows
            .into_iter()
            .map(|row| (row.name.to_owned(), row.packets))
            .collect())
    }

    /// The node's per-peer traffic by peer node name (tunnel peers by tunnel
    /// endpoint, Flannel VTEPs by lease address), read like [`Cluster::counters`].
    pub fn peer_stats(&self, node: &str) -> Result<BTreeMap<String, PeerStats>> {
        let maps = self.maps(node)?;
        let rows = inspect::peers(&maps).with_context(|| format!("node {node}: reading peers"))?;
        let mut stats = BTreeMap::new();
        for row in rows {
            let endpoint: Ipv4Addr = row
                .endpoint
                .parse()
                .with_context(|| format!("peer endpoint {:?}", row.endpoint))?;
            let peer = self
                .node_at(row.kind, endpoint)
                .unwrap_or_else(|| format!("{} {endpoint}", row.kind));
            let traffic = PeerStats {
                tx_packets: row.tx_packets,
                tx_bytes: row.tx_bytes,
                rx_packets: row.rx_packets,
                rx_bytes: row.rx_bytes,
            };
            stats.insert(peer, traffic);
        }
        Ok(stats)
    }

    /// The node a peer row points at.
    fn node_at(&self, kind: &str, endpoint: Ipv4Addr) -> Option<String> {
        self.nodes
            .values()
            .find(|n| match kind {
                "flannel-vtep" => self
                    .leases
                    .get(&n.spec.name)
                    .is_some_and(|l| l.public_ip == endpoint),
                _ => n.spec.tunnel_endpoint == endpoint,
            })
            .map(|n| n.spec.name.clone())
    }

    /// The node's pinned maps (the agent need not run).
    pub fn maps(&self, node: &str) -> Result<Maps> {
        let root = &self.cluster_node(node)?.files.bpffs_root;
        Maps::open(&PinLayout::new(root)).with_context(|| {
            format!(
                "node {node}: opening the pinned maps under {}",
                root.display()
            )
        })
    }

    /// Counters and per-peer traffic of every node.
    pub fn stats(&self) -> Result<ClusterStats> {
        let mut nodes = BTreeMap::new();
        for name in self.nodes.keys() {
            nodes.insert(
                name.clone(),
                NodeStats {
                    counters: self.counters(name)?,
                    peers: self.peer_stats(name)?,
                },
            );
        }
        Ok(ClusterStats { nodes })
    }

    /// [`Cluster::stats`] once they have stopped moving (the last ACK of the
    /// previous exchange may still be on its way), or after a second anyway.
    pub fn settled_stats(&self) -> Result<ClusterStats> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last = self.stats()?;
        loop {
            thread::sleep(POLL);
            let now = self.stats()?;
            if now == last || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// Stops the node's agent (SIGTERM: the datapath keeps forwarding) and
    /// starts it again, then waits until it has applied its plan.
    /// Stops `node`'s agent and runs `fabedge-agent uninstall` there; returns
    /// what uninstall printed. (Teardown uninstalls again, harmlessly.)
    pub fn uninstall(&self, node: &str) -> Result<String> {
        let n = self.cluster_node(node)?;
        if let Some(mut agent) = n
            .agent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            agent.stop();
        }
        let cni_conf_dir = n.files.cni_conf_dir.display().to_string();
        let out = agent_output(
            Some(&n.netns),
            &n.files.bpffs_root,
            &["uninstall", "--cni-conf-dir", &cni_conf_dir],
        )?;
        ensure!(
            out.status.success(),
            "uninstall on {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn restart_agent(&self, node: &str) -> Result<()> {
        let n = self.cluster_node(node)?;
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
                &n.agent_args,
                &n.files.agent_log,
            )?);
            offset
        };
        self.wait_for_agent(node, offset)
            .with_context(|| format!("restarting the agent of {node}"))
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
            )?);
            offset
        };
        self.wait_for_agent(node, offset).with_context(|| {
            format!(
                "restarting the agent of {node} with extra arguments {}",
                extra.join(" ")
            )
        })
    }

    /// Restarts the agents of `nodes`, one after the other, while `from`
    /// pings `to` in short batches (20 ms apart) covering the whole window.
    /// Returns (sent, answered); a failed restart is an error.
    pub fn restart_agents_under_ping(
        &self,
        nodes: &[&str],
        from: &Endpoint,
        to: Ipv4Addr,
    ) -> Result<(u32, u32)> {
        let restarting = AtomicBool::new(true);
        let (pinged, restarts) = thread::scope(|scope| {
            let pinger = scope.spawn(|| -> Result<(u32, u32)> {
                let (mut sent, mut received) = (0, 0);
                loop {
                    let batch = ping(from.netns(), to, 10, Duration::from_millis(20))?;
                    sent += batch.sent;
                    received += batch.received;
                    if !restarting.load(Ordering::Relaxed) {
                        return Ok((sent, received));
                    }
                }
            });
            let restarts = nodes.iter().try_for_each(|node| self.restart_agent(node));
            restarting.store(false, Ordering::Relaxed);
            let pinged = pinger
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (pinged, restarts)
        });
        restarts?;
        pinged
    }

    /// The last lines of the agents' logs of `nodes`.
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

    /// Sends ping, TCP and UDP along `path` (both ways if it says so) and
    /// checks its proofs against the growth of the datapath statistics.
    pub fn check_path(&self, path: &PathSpec) -> Result<PathOutcome> {
        let from = self.endpoint(path.from)?;
        let to = self.endpoint(path.to)?;
        let before = self.settled_stats()?;
        let mut exchanges = vec![from.exchange(to)];
        if path.both_ways {
            exchanges.push(to.exchange(from));
        }
        let growth = self.stats()?.since(&before);
        let mut evidence = Vec::new();
        let mut proof_failures = Vec::new();
        for proof in &path.proofs {
            match proof.check(&growth, u64::from(PING_COUNT)) {
                Ok(seen) => evidence.push(seen),
                Err(missing) => proof_failures.push(missing),
            }
        }
        proof_failures.extend(growth.drops());
        Ok(PathOutcome {
            title: path.title.clone(),
            exchanges,
            evidence,
            proof_failures,
        })
    }

    /// The nodes whose state explains `path`: its ends, the nodes its proofs
    /// name, and the connector.
    pub fn nodes_of(&self, path: &PathSpec) -> Vec<String> {
        let mut nodes: Vec<String> = [path.from.node(), path.to.node()]
            .into_iter()
            .chain(path.proofs.iter().flat_map(Proof::nodes))
            .map(str::to_owned)
            .chain(self.connector_names())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut agent) = node
                .agent
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                agent.stop();
            }
        }
        let mut roots = Vec::new();
        for node in self.nodes.values().filter(|n| n.agent_started) {
            let cni_conf_dir = node.files.cni_conf_dir.display().to_string();
            let args = ["uninstall", "--cni-conf-dir", &cni_conf_dir];
            if let Err(e) = agent_ok(Some(&node.netns), &node.files.bpffs_root, &args) {
                eprintln!(
                    "warning: uninstalling fabedge from {}: {e:#}",
                    node.spec.name
                );
            }
            roots.push(node.files.bpffs_root.clone());
        }
        // Echo servers stop, then the namespaces go, pods first.
        for node in self.nodes.values_mut() {
            node.pod = None;
            node.host = None;
        }
        let cluster_id = self
            .work_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        for name in self.nodes.keys() {
            // Empty once the agents and clients have exited (uninstall
            // released the programs): rmdir, cgroups hold no files.
            let cgroup = node_cgroup(&cluster_id, name);
            if cgroup.exists()
                && let Err(e) = fs::remove_dir(&cgroup)
            {
                eprintln!("warning: removing {}: {e}", cgroup.display());
            }
        }
        self.nodes.clear();
        self.nat = None;
        self.switch = None;
        for root in roots.iter().filter(|r| r.exists()) {
            if let Err(e) = fs::remove_dir_all(root) {
                eprintln!("warning: removing {}: {e}", root.display());
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.work_dir) {
            eprintln!("warning: removing {}: {e}", self.work_dir.display());
        }
    }
}

/// Removes bpffs roots and work directories of clusters whose process is gone.
/// Their namespaces, with the agents inside, were removed by
/// `netns::cleanup_stale`, so nothing uses the pins any more.
/// The cgroup v2 directory a node's agent attaches its socket programs to;
/// hostNetwork clients of that node run inside it.
fn node_cgroup(cluster_id: &str, node: &str) -> PathBuf {
    cgroup2_root().join(format!("{cluster_id}-{node}"))
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                after
                    .starts_with("cgroup2 ")
                    .then(|| before.split(' ').nth(4).map(PathBuf::from))
                    .flatten()
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

impl Cluster {
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

fn remove_stale_leftovers() {
    if let Ok(entries) = fs::read_dir(cgroup2_root()) {
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let owner = name
                .strip_prefix(LEFTOVER_PREFIX)
                .and_then(|rest| rest.split('-').next());
            if let Some(Ok(pid)) = owner.map(str::parse::<u32>)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir(&path);
            }
        }
    }
    for dir in [Path::new(BPFFS).to_path_buf(), std::env::temp_dir()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.filter_map(|entry| entry.ok().map(|e| e.path())) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let owner = name
                .strip_prefix(LEFTOVER_PREFIX)
                .and_then(|rest| rest.split('-').next());
            let Some(Ok(pid)) = owner.map(str::parse::<u32>) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Err(e) = fs::remove_dir_all(&path) {
                eprintln!(
                    "warning: removing {} left by an earlier run: {e}",
                    path.display()
                );
            }
        }
    }
}

fn create_flannel_device(netns: &Netns, spec: &NodeSpec, lease: &FlannelLease) -> Result<()> {
    let local = spec.internal_ip.to_string();
    netns
        .ip(&[
            "link",
            "add",
            FLANNEL_DEV,
            "type",
            "vxlan",
            "id",
            FLANNEL_VNI,
            "local",
            &local,
            "dev",
            LAN_NIC,
            "dstport",
            FLANNEL_PORT,
            "nolearning",
        ])
        .context("creating flannel.1")?;
    netns.ip(&[
        "link",
        "set",
        FLANNEL_DEV,
        "address",
        &lease.vtep_mac,
        "mtu",
        &FLANNEL_MTU.to_string(),
    ])?;
    netns.add_addr(FLANNEL_DEV, &format!("{}/32", spec.pod_cidr.network()))?;
    netns.set_up(FLANNEL_DEV)
}

/// What Flannel's CNI plugin hands to `bridge`: pods on `cni0` with the
/// node's pod CIDR, the bridge as their gateway, Flannel's MTU.
fn flannel_like_cni_config(pod_cidr: Ipv4Net) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "cbr0",
        "type": "bridge",
        "bridge": CLOUD_POD_BRIDGE,
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "mtu": FLANNEL_MTU,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": pod_cidr.to_string() }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
        },
    })
}

/// The first plugin of a conflist, as a runtime hands it to the plugin: with
/// the list's `cniVersion` and `name` copied in.
fn first_plugin_of(conflist: &Path) -> Result<serde_json::Value> {
    let text =
        fs::read_to_string(conflist).with_context(|| format!("reading {}", conflist.display()))?;
    let list: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", conflist.display()))?;
    let mut plugin = list
        .get("plugins")
        .and_then(|p| p.get(0))
        .cloned()
        .with_context(|| format!("{} has no plugins", conflist.display()))?;
    let object = plugin
        .as_object_mut()
        .with_context(|| format!("{}: plugins[0] is not an object", conflist.display()))?;
    for key in ["cniVersion", "name"] {
        let value = list
            .get(key)
            .cloned()
            .with_context(|| format!("{} has no {key}", conflist.display()))?;
        object.insert(key.to_owned(), value);
    }
    Ok(plugin)
}

/// `CNI_COMMAND=ADD` of `plugin`'s type, run in the node's namespace for a pod
/// namespace, with host-local's store in `ipam_dir`. Returns the pod's address.
fn cni_add(
    node: &Netns,
    pod: &Netns,
    container_id: &str,
    mut plugin: serde_json::Value,
    ipam_dir: &Path,
) -> Result<Ipv4Addr> {
    let plugin_type = plugin
        .get("type")
        .and_then(|t| t.as_str())
        .context("CNI config without a type")?
        .to_owned();
    let ipam = plugin
        .get_mut("ipam")
        .and_then(|i| i.as_object_mut())
        .context("CNI config without ipam")?;
    ipam.insert("dataDir".into(), ipam_dir.display().to_string().into());
    let stdin = serde_json::to_vec(&plugin)?;

    let binary = Path::new(CNI_PLUGIN_DIR).join(&plugin_type);
    ensure!(
        binary.exists(),
        "CNI plugin {} is missing: install containernetworking-plugins",
        binary.display()
    );
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg(&binary)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PLUGIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(&stdin)
        .context("writing the CNI config to the plugin")?;
    let pid = child.id();
    let (done, result) = mpsc::channel();
    thread::spawn(move || done.send(child.wait_with_output()));
    let output = match result.recv_timeout(CNI_TIMEOUT) {
        Ok(output) => output.context("waiting for the CNI plugin")?,
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            bail!("CNI plugin {plugin_type} did not finish within {CNI_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "CNI ADD with {plugin_type} failed ({}): {} {}",
        output.status,
        stdout.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let result: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("CNI result {stdout:?}"))?;
    let address = result
        .get("ips")
        .and_then(|ips| ips.get(0))
        .and_then(|ip| ip.get("address"))
        .and_then(|a| a.as_str())
        .with_context(|| format!("CNI result without ips[0].address: {stdout}"))?;
    let net: Ipv4Net = address
        .parse()
        .with_context(|| format!("CNI address {address:?}"))?;
    Ok(net.addr())
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

// ---------------------------------------------------------------------------
// Statistics and proofs
// ---------------------------------------------------------------------------

/// One node's datapath statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Counter name → packets.
    pub counters: BTreeMap<String, u64>,
    /// Peer node name → traffic with it.
    pub peers: BTreeMap<String, PeerStats>,
}

/// Every node's statistics, or (from [`ClusterStats::since`]) their growth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStats {
    pub nodes: BTreeMap<String, NodeStats>,
}

impl ClusterStats {
    pub fn counter(&self, node: &str, counter: Counter) -> u64 {
        self.nodes
            .get(node)
            .and_then(|n| n.counters.get(counter.name()))
            .copied()
            .unwrap_or(0)
    }

    /// `node`'s traffic with `peer` (zero if `peer` is not its peer).
    pub fn peer(&self, node: &str, peer: &str) -> PeerStats {
        self.nodes
            .get(node)
            .and_then(|n| n.peers.get(peer))
            .copied()
            .unwrap_or_default()
    }

    /// How much every value grew since `before`.
    pub fn since(&self, before: &ClusterStats) -> ClusterStats {
        let nodes = self
            .nodes
            .iter()
            .map(|(name, now)| {
                let then = before.nodes.get(name).cloned().unwrap_or_default();
                let counters = now
                    .counters
                    .iter()
                    .map(|(c, v)| {
                        (
                            c.clone(),
                            v.saturating_sub(then.counters.get(c).copied().unwrap_or(0)),
                        )
                    })
                    .collect();
                let peers = now
                    .peers
                    .iter()
                    .map(|(p, s)| {
                        let t = then.peers.get(p).copied().unwrap_or_default();
                        let grown = PeerStats {
                            tx_packets: s.tx_packets.saturating_sub(t.tx_packets),
                            tx_bytes: s.tx_bytes.saturating_sub(t.tx_bytes),
                            rx_packets: s.rx_packets.saturating_sub(t.rx_packets),
                            rx_bytes: s.rx_bytes.saturating_sub(t.rx_bytes),
                        };
                        (p.clone(), grown)
                    })
                    .collect();
                (name.clone(), NodeStats { counters, peers })
            })
            .collect();
        ClusterStats { nodes }
    }

    /// Every drop counter that is non-zero, as `node: counter +n`.
    pub fn drops(&self) -> Vec<String> {
        let mut drops = Vec::new();
        for (name, node) in &self.nodes {
            for counter in Counter::ALL.iter().filter(|c| c.is_drop()) {
                let grown = node.counters.get(counter.name()).copied().unwrap_or(0);
                if grown > 0 {
                    drops.push(format!(
                        "{name}: {} +{grown} (nothing on a working path may be dropped)",
                        counter.name()
                    ));
                }
            }
        }
        drops
    }
}

/// Which endpoint of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Pod(&'static str),
    /// The hostNetwork endpoint.
    Node(&'static str),
}

impl At {
    pub fn node(&self) -> &'static str {
        match self {
            At::Pod(node) | At::Node(node) => node,
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Pod(node) => write!(f, "{node} pod"),
            At::Node(node) => write!(f, "{node} node"),
        }
    }
}

/// Counters that move only when fabedge's tunnel or the connector's Flannel
/// masquerade carries a packet.
const TUNNEL_COUNTERS: [Counter; 4] = [
    Counter::ToTunnel,
    Counter::FromTunnel,
    Counter::FlannelEncap,
    Counter::FlannelDecap,
];

/// Evidence a path must leave in the datapath statistics, beyond the traffic
/// getting through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// `from` sent packets into its tunnel to `to`, and `to` received them from `from`.
    Tunnel {
        from: &'static str,
        to: &'static str,
    },
    /// A counter on `node` grew.
    Counted {
        node: &'static str,
        counter: Counter,
    },
    /// Nothing crossed `node`'s tunnels or Flannel masquerade.
    Bypassed { node: &'static str },
}

impl Proof {
    fn nodes(&self) -> Vec<&'static str> {
        match self {
            Proof::Tunnel { from, to } => vec![from, to],
            Proof::Counted { node, .. } | Proof::Bypassed { node } => vec![node],
        }
    }

    /// What the statistics show, or why they do not prove this; `least` is
    /// the smallest growth accepted.
    fn check(&self, growth: &ClusterStats, least: u64) -> Result<String, String> {
        match *self {
            Proof::Tunnel { from, to } => {
                let sent = growth.peer(from, to).tx_packets;
                let received = growth.peer(to, from).rx_packets;
                let seen =
                    format!("tunnel {from}→{to}: {from} sent {sent}, {to} received {received}");
                if sent >= least && received >= least {
                    Ok(seen)
                } else {
                    Err(format!("{seen} (expected ≥ {least} each)"))
                }
            }
            Proof::Counted { node, counter } => {
                let grown = growth.counter(node, counter);
                let seen = format!("{node} {} +{grown}", counter.name());
                if grown >= least {
                    Ok(seen)
                } else {
                    Err(format!("{seen} (expected ≥ {least})"))
                }
            }
            Proof::Bypassed { node } => {
                let mut moved: Vec<String> = TUNNEL_COUNTERS
                    .iter()
                    .map(|c| (c.name(), growth.counter(node, *c)))
                    .filter(|(_, n)| *n > 0)
                    .map(|(name, n)| format!("{name} +{n}"))
                    .collect();
                if let Some(stats) = growth.nodes.get(node) {
                    moved.extend(
                        stats
                            .peers
                            .iter()
                            .filter(|(_, s)| s.tx_packets + s.rx_packets > 0)
                            .map(|(peer, s)| {
                                format!("peer {peer} tx +{} rx +{}", s.tx_packets, s.rx_packets)
                            }),
                    );
                }
                if moved.is_empty() {
                    Ok(format!("{node}: no tunnel or masquerade traffic"))
                } else {
                    Err(format!(
                        "{node} should not have carried this path, but: {}",
                        moved.join(", ")
                    ))
                }
            }
        }
    }
}

/// One path of the seed's matrix: traffic from one endpoint to another and
/// the evidence it must leave.
#[derive(Debug, Clone)]
pub struct PathSpec {
    /// The name of the test proving it.
    pub name: &'static str,
    /// What the demo prints: `c1  edge-1 pod → cloud-1 pod`.
    pub title: String,
    pub from: At,
    pub to: At,
    /// Also start traffic from `to` to `from`.
    pub both_ways: bool,
    pub proofs: Vec<Proof>,
}

impl PathSpec {
    /// `label` is the article's name for the path (`c1`), if it has one.
    pub fn new(name: &'static str, label: &str, from: At, to: At) -> Self {
        let title = format!("{label:<4}{from} → {to}");
        PathSpec {
            name,
            title,
            from,
            to,
            both_ways: false,
            proofs: Vec::new(),
        }
    }

    pub fn both_ways(mut self) -> Self {
        self.both_ways = true;
        self.title = self.title.replacen('→', "↔", 1);
        self
    }

    /// Packets crossed the tunnel from node `from` to node `to`.
    pub fn tunnel(mut self, from: &'static str, to: &'static str) -> Self {
        self.proofs.push(Proof::Tunnel { from, to });
        self
    }

    pub fn counted(mut self, node: &'static str, counter: Counter) -> Self {
        self.proofs.push(Proof::Counted { node, counter });
        self
    }

    pub fn bypassing(mut self, node: &'static str) -> Self {
        self.proofs.push(Proof::Bypassed { node });
        self
    }
}

/// What [`Cluster::check_path`] found.
#[derive(Debug)]
pub struct PathOutcome {
    pub title: String,
    /// The exchange from `from` to `to`, then (both ways) back.
    pub exchanges: Vec<Exchange>,
    /// What the statistics showed, one line per proof that held.
    pub evidence: Vec<String>,
    /// Proofs that did not hold, and drops seen anywhere.
    pub proof_failures: Vec<String>,
}

impl PathOutcome {
    pub fn passed(&self) -> bool {
        self.exchanges.iter().all(Exchange::succeeded) && self.proof_failures.is_empty()
    }

    /// Everything that went wrong, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut failures: Vec<String> = self
            .exchanges
            .iter()
            .flat_map(|e| {
                e.failures()
                    .into_iter()
                    .map(move |f| format!("{} → {}: {f}", e.from, e.to))
            })
            .collect();
        failures.extend(self.proof_failures.iter().cloned());
        failures
    }
}

/// Every path of the seed's test matrix (DESIGN.md §1) in the mini cluster,
/// each with the statistics that prove it took fabedge's way and no other.
/// `forwarding.rs` has one test per entry, named after it.
pub fn seed_matrix() -> Vec<PathSpec> {
    use At::{Node, Pod};
    vec![
        PathSpec::new(
            "edge_pod_reaches_cloud_pod_on_connector",
            "c1",
            Pod("edge-1"),
            Pod("cloud-1"),
        )
        .tunnel("edge-1", "cloud-1")
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "edge_pod_reaches_community_peer_pod_directly",
            "c2",
            Pod("edge-1"),
            Pod("edge-2"),
        )
        .tunnel("edge-1", "edge-2")
        .tunnel("edge-2", "edge-1")
        .bypassing("cloud-1"),
        PathSpec::new(
            "edge_pod_reaches_cloud_pod_through_connector_and_flannel",
            "c3",
            Pod("edge-1"),
            Pod("cloud-2"),
        )
        .tunnel("edge-1", "cloud-1")
        .counted("cloud-1", Counter::FlannelEncap)
        .counted("cloud-1", Counter::FlannelDecap)
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "cloud_pods_reach_each_other_through_flannel_alone",
            "c4",
            Pod("cloud-1"),
            Pod("cloud-2"),
        )
        .both_ways()
        .bypassing("cloud-1")
        // The connector's uplink program saw the Flannel frames and left them to flannel.1.
        .counted("cloud-1", Counter::PassFlannel),
        PathSpec::new(
            "cloud_pod_on_connector_reaches_edge_pod",
            "",
            Pod("cloud-1"),
            Pod("edge-1"),
        )
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1"),
        PathSpec::new(
            "cloud_pod_reaches_edge_pod_through_flannel_and_connector",
            "",
            Pod("cloud-2"),
            Pod("edge-1"),
        )
        .counted("cloud-1", Counter::FlannelDecap)
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1")
        .counted("cloud-1", Counter::FlannelEncap),
        PathSpec::new(
            "edge_pods_outside_a_community_talk_through_connector",
            "",
            Pod("edge-3"),
            Pod("edge-1"),
        )
        .both_ways()
        .tunnel("edge-3", "cloud-1")
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1")
        .tunnel("cloud-1", "edge-3"),
        PathSpec::new(
            "edge_node_and_cloud_node_reach_each_other",
            "",
            Node("edge-1"),
            Node("cloud-2"),
        )
        .both_ways()
        .tunnel("edge-1", "cloud-1")
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "community_edge_nodes_reach_each_other_directly",
            "",
            Node("edge-1"),
            Node("edge-2"),
        )
        .both_ways()
        .tunnel("edge-1", "edge-2")
        .tunnel("edge-2", "edge-1")
        .bypassing("cloud-1"),
        PathSpec::new(
            "cloud_node_reaches_edge_node_outside_community",
            "",
            Node("cloud-2"),
            Node("edge-3"),
        )
        .tunnel("cloud-1", "edge-3")
        .tunnel("edge-3", "cloud-1"),
        PathSpec::new(
            "edge_pod_reaches_cloud_node",
            "",
            Pod("edge-1"),
            Node("cloud-2"),
        )
        .tunnel("edge-1", "cloud-1")
        // Cloud-2 answers an edge pod CIDR through Flannel, i.e. to the connector's VTEP.
        .counted("cloud-1", Counter::FlannelDecap)
        .tunnel("cloud-1", "edge-1"),
        PathSpec::new(
            "cloud_pod_reaches_edge_node",
            "",
            Pod("cloud-2"),
            Node("edge-1"),
        )
        .tunnel("cloud-1", "edge-1")
        .tunnel("edge-1", "cloud-1")
        // The edge node's answers to a cloud pod leave the connector through Flannel's VXLAN.
        .counted("cloud-1", Counter::FlannelEncap),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_describes_the_mini_cluster() {
        let manifest = Manifest::read(Path::new(FIXTURE)).unwrap();
        let roles: BTreeMap<&str, NodeRole> = manifest
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.role))
            .collect();
        assert_eq!(
            roles,
            BTreeMap::from([
                ("cloud-1", NodeRole::Connector),
                ("cloud-2", NodeRole::Cloud),
                ("edge-1", NodeRole::Edge),
                ("edge-2", NodeRole::Edge),
                ("edge-3", NodeRole::Edge),
            ])
        );
        let connector = manifest.nodes.iter().find(|n| n.name == "cloud-1").unwrap();
        assert_eq!(connector.tunnel_endpoint, Ipv4Addr::new(198, 18, 0, 1));
        // Only the cloud nodes carry leases until the connector writes the edges'.
        assert_eq!(
            manifest.leases.keys().collect::<Vec<_>>(),
            ["cloud-1", "cloud-2"]
        );
        assert_eq!(
            manifest.leases["cloud-2"].public_ip,
            Ipv4Addr::new(10, 1, 0, 2)
        );
    }

    #[test]
    fn incomplete_flannel_leases_are_ignored() {
        let complete = BTreeMap::from([
            (
                annotation::FLANNEL_BACKEND_TYPE.to_owned(),
                "vxlan".to_owned(),
            ),
            (
                annotation::FLANNEL_BACKEND_DATA.to_owned(),
                r#"{"VtepMAC":"ce:0c:01:00:00:01"}"#.to_owned(),
            ),
            (
                annotation::FLANNEL_PUBLIC_IP.to_owned(),
                "10.1.0.1".to_owned(),
            ),
        ]);
        assert!(flannel_lease(&complete).is_some());
        for key in [
            annotation::FLANNEL_BACKEND_TYPE,
            annotation::FLANNEL_BACKEND_DATA,
            annotation::FLANNEL_PUBLIC_IP,
        ] {
            let mut partial = complete.clone();
            partial.remove(key);
            assert_eq!(flannel_lease(&partial), None, "without {key}");
        }
    }

    #[test]
    fn growth_is_measured_per_node_and_peer() {
        let stats = |to_tunnel: u64, tx: u64| ClusterStats {
            nodes: BTreeMap::from([(
                "edge-1".to_owned(),
                NodeStats {
                    counters: BTreeMap::from([("to_tunnel".to_owned(), to_tunnel)]),
                    peers: BTreeMap::from([(
                        "cloud-1".to_owned(),
                        PeerStats {
                            tx_packets: tx,
                            ..Default::default()
                        },
                    )]),
                },
            )]),
        };
        let growth = stats(10, 7).since(&stats(4, 2));
        assert_eq!(growth.counter("edge-1", Counter::ToTunnel), 6);
        assert_eq!(growth.peer("edge-1", "cloud-1").tx_packets, 5);
        assert_eq!(growth.peer("edge-1", "edge-2"), PeerStats::default());
        assert!(
            Proof::Bypassed { node: "edge-1" }
                .check(&growth, 3)
                .is_err()
        );
        assert!(
            Proof::Bypassed { node: "cloud-1" }
                .check(&growth, 3)
                .is_ok()
        );
    }

    #[test]
    fn every_seed_path_has_a_unique_name() {
        let mut names: Vec<&str> = seed_matrix().iter().map(|p| p.name).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
    }
}

/// One mini cluster shared by every test of a test binary: started by the
/// first test that asks for it, torn down when the binary exits (libtest
/// leaves through `exit()`, which runs `atexit` handlers after the last test).
///
/// ```ignore
/// static CLUSTER: SharedCluster = SharedCluster::new();
/// extern "C" fn tear_down() { CLUSTER.tear_down() }
/// CLUSTER.with(tear_down, |cluster| { ... })
/// ```
pub struct SharedCluster {
    slot: std::sync::Mutex<Option<Result<Cluster, String>>>,
    registered: std::sync::Once,
}

impl SharedCluster {
    pub const fn new() -> Self {
        SharedCluster {
            slot: std::sync::Mutex::new(None),
            registered: std::sync::Once::new(),
        }
    }

    /// Runs `test` on the cluster, bringing it up first if needed; `tear_down`
    /// (which calls [`SharedCluster::tear_down`] on this static) runs at exit.
    pub fn with<R>(
        &'static self,
        tear_down: extern "C" fn(),
        test: impl FnOnce(&Cluster) -> Result<R>,
    ) -> Result<R> {
        let mut slot = self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            self.registered.call_once(|| {
                // SAFETY: registers a plain function run at exit.
                if unsafe { libc::atexit(tear_down) } != 0 {
                    eprintln!("warning: cannot register the cluster teardown; the next run removes the leftovers");
                }
            });
            *slot = Some(Cluster::start(ClusterOptions::default()).map_err(|e| format!("{e:#}")));
        }
        match slot.as_ref() {
            Some(Ok(cluster)) => test(cluster),
            Some(Err(e)) => bail!("the mini cluster did not come up: {e}"),
            None => unreachable!("filled above"),
        }
    }

    pub fn tear_down(&self) {
        drop(
            self.slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }
}

impl Default for SharedCluster {
    fn default() -> Self {
        Self::new()
    }
}

/// Rewrites the manifest so that every edge's ExternalIP is on the site LAN
/// (same last octet): behind a NAT, a node knows only its private address.
fn move_edges_to_the_site_lan(path: &Path) -> Result<()> {
    let mut text =
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for spec in Manifest::read(path)?
        .nodes
        .iter()
        .filter(|n| n.role == NodeRole::Edge)
    {
        let public = spec
            .external_ip
            .with_context(|| format!("edge node {} has no ExternalIP", spec.name))?;
        let [.., last] = public.octets();
        let [a, b, c, _] = SITE.network().octets();
        let private = Ipv4Addr::new(a, b, c, last);
        let (old, new) = (
            format!("{{type: ExternalIP, address: {public}}}"),
            format!("{{type: ExternalIP, address: {private}}}"),
        );
        ensure!(
            text.matches(&old).count() == 1,
            "edge node {}: expected one `{old}` in the manifest",
            spec.name
        );
        text = text.replace(&old, &new);
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The edges' NAT router: `eth-site` on the site LAN, `eth-wan` on the WAN
/// as [`NAT_PUBLIC_IP`]; masquerades what the site sends out and forwards
/// from the WAN only what belongs to a mapping the site opened.
fn create_nat_router(switch: &Netns) -> Result<Netns> {
    let nat = Netns::new("nat")?;
    let context = || "creating the NAT router".to_owned();
    for (nic, port, bridge, address, net) in [
        ("eth-site", "nat-site", SITE_BRIDGE, NAT_SITE_IP, SITE),
        (WAN_NIC, "nat-wan", WAN_BRIDGE, NAT_PUBLIC_IP, WAN),
    ] {
        veth_pair(&nat, nic, switch, port).with_context(context)?;
        switch
            .attach_to_bridge(port, bridge)
            .with_context(context)?;
        nat.add_addr(nic, &format!("{address}/{}", net.prefix_len()))
            .with_context(context)?;
    }
    nat.set_sysctl("net.ipv4.ip_forward", "1")
        .with_context(context)?;
    for rule in [
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            WAN_NIC,
            "-j",
            "MASQUERADE",
        ][..],
        &["-P", "FORWARD", "DROP"],
        &[
            "-A", "FORWARD", "-i", "eth-site", "-o", WAN_NIC, "-j", "ACCEPT",
        ],
        &[
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ],
    ] {
        let mut args = vec!["-w"];
        args.extend_from_slice(rule);
        nat.run_ok("iptables", &args).with_context(context)?;
    }
    Ok(nat)
}

/// A port forward in front of a node: UDP to `port` of any of its addresses
/// reaches its UDP 4500; replies leave from `port` (conntrack undoes the DNAT).
fn forward_port_to_esp(netns: &Netns, port: u16) -> Result<()> {
    let (port, esp) = (
        port.to_string(),
        fabedge_agent::plan::ESP_IN_UDP_PORT.to_string(),
    );
    netns.run_ok(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            &port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &esp,
        ],
    )?;
    Ok(())
}
