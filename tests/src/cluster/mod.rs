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
//! [`ClusterOptions::ha`] builds it from `tests/fixtures/mini-cluster-ha.yaml`
//! instead: a second connector, cloud-3 (cloud LAN and WAN like cloud-1),
//! and both connectors' shared VTEP addresses. [`Cluster::kill_node`] and
//! [`Cluster::revive_node`] let a node die and come back,
//! [`connector_of`] says which connector an edge uses, and [`BothWays`]
//! measures the gaps a failover leaves in a 10 ms ping.
//!
//! [`ClusterOptions::edges_behind_nat`] puts the edges on a site LAN behind a
//! NAT router namespace; [`ClusterOptions::second_site`] moves
//! [`SECOND_SITE_EDGE`] to a second site behind a router of its own, of the
//! [`NatKind`] asked for (`nat.rs`).
//!
//! Everything is torn down on drop, also after a panic: agents are stopped
//! and uninstalled, namespaces (and every process in them) deleted, bpffs
//! roots and temporary files removed. What a killed run left behind is
//! removed by the next [`Cluster::start`].

mod agents;
mod cgroup;
mod container;
mod fail_closed;
mod failover;
mod fixture;
mod flannel;
mod gaps;
mod ha_checks;
mod matrix;
mod nat;
mod pods;
mod proofs;
mod shared;
#[cfg(test)]
mod tests;
mod topology;
mod traffic;

use agents::AgentProcess;
pub use agents::RestartPings;
use cgroup::node_cgroup;
pub use container::AgentImage;
use container::ContainerAgent;
pub use failover::{Connector, Failover, connector_of, ha_agent_args};
pub use fixture::{FlannelLease, NodeRole, NodeSpec, VTEP_ADDRESS};
pub use gaps::{BothWays, GAP_PING_INTERVAL, GapMeter, PingGaps};
pub use ha_checks::{
    FailoverGaps, HaCase, dead_connector_fails_over, returning_connector_takes_its_edges_back,
    revive_all_and_settle,
};
pub use matrix::{seed_matrix, seed_matrix_through};
pub use nat::{NatKind, SecondSite};
pub use proofs::{At, ClusterStats, NodeStats, PathOutcome, PathSpec, Proof};
pub use shared::SharedCluster;
pub use traffic::{Endpoint, Exchange, TcpEcho};

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::Duration,
};

use ipnet::Ipv4Net;

use crate::{agent::agent_ok, netns::Netns};

/// The example cluster every layer of tests shares.
pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mini-cluster.yaml");
/// [`FIXTURE`] with a second connector, `cloud-3`, and the connectors'
/// shared VTEP addresses (connector high availability, issue #12).
pub const HA_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/mini-cluster-ha.yaml");

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
/// The second site's LAN ([`ClusterOptions::second_site`]): [`SECOND_SITE_EDGE`] alone.
const SECOND_SITE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(192, 168, 19, 0), 24) {
    Ok(net) => net,
    Err(_) => panic!("a /24 is a valid prefix"),
};
const SECOND_NAT_SITE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 19, 1);
/// The second site's NAT router's public address.
pub const SECOND_NAT_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 251);
const SECOND_SITE_BRIDGE: &str = "br-site-2";
/// The edge that [`ClusterOptions::second_site`] moves to the second site:
/// a member of community `beijing`, whose other member, edge-1, stays on the first.
pub const SECOND_SITE_EDGE: &str = "edge-2";
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
/// The least retransmission timeout of the endpoints' TCP: longer than a
/// stall of the test machine, short enough that a lost tail segment is
/// retransmitted within [`ECHO_TIMEOUT`].
const TCP_RTO_MIN: Duration = Duration::from_secs(3);
/// Nothing on the test network loses packets, so a TCP echo needs no
/// retransmission; one is tolerated (a SYN's 1 s timer is not
/// [`TCP_RTO_MIN`]'s), and so is every retransmission the receiver reports
/// as a duplicate (D-SACK): that segment was not lost. A path that drops or mangles
/// segments needs dozens, none of them reported twice.
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
    /// With [`ClusterOptions::edges_behind_nat`]: [`SECOND_SITE_EDGE`] sits
    /// on a site of its own (192.168.19.0/24) behind a second router, public
    /// as [`SECOND_NAT_PUBLIC_IP`], of the given kind; the first router stays
    /// endpoint-independent.
    pub second_site: Option<SecondSite>,
    /// More `fabedge-agent run` arguments for the connector only.
    pub connector_args: Vec<String>,
    /// A port forward in front of the connector: UDP to this port of its WAN
    /// address reaches its UDP 4500 (a REDIRECT in its namespace).
    pub connector_port_forward: Option<u16>,
    /// These nodes' agents run from an OCI image with podman, mounted as the
    /// DaemonSet mounts them, instead of as processes.
    pub agent_image: Option<AgentImage>,
    /// Keep playing Flannel after start: every change of a Flannel lease in
    /// the manifest file reaches `flannel.1` on the cloud nodes, as flanneld
    /// follows Node updates (otherwise a test calls [`Cluster::sync_flannel`]).
    pub follow_flannel: bool,
}

impl ClusterOptions {
    /// The cluster with two active connectors ([`HA_FIXTURE`]): Flannel
    /// followed continuously, `extra` appended to every agent's arguments
    /// (e.g. a short `--hold-down`).
    pub fn ha(extra: &[&str]) -> Self {
        let mut options = ClusterOptions {
            manifests: PathBuf::from(HA_FIXTURE),
            follow_flannel: true,
            ..ClusterOptions::default()
        };
        options
            .extra_agent_args
            .extend(extra.iter().map(|arg| arg.to_string()));
        options
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            manifests: PathBuf::from(FIXTURE),
            // The host kernel has no ESP (the default tunnel mode): the
            // plaintext mode, unless a test asks for ESP (in the VMs). No XDP:
            // the switch's veth ports drop what native XDP sends back out
            // unless GRO is on there (`tests/tests/xdp.rs` turns it on).
            extra_agent_args: vec![
                "--tunnel".into(),
                "vxlan".into(),
                "--xdp".into(),
                "off".into(),
            ],
            timeout_factor: 1,
            edges_behind_nat: false,
            second_site: None,
            connector_args: Vec::new(),
            connector_port_forward: None,
            agent_image: None,
            follow_flannel: false,
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
    /// Set when the agent runs from the image ([`ClusterOptions::agent_image`]).
    container: Option<ContainerAgent>,
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
    /// The second site's router ([`ClusterOptions::second_site`]).
    second_nat: Option<Netns>,
    edges_behind_nat: bool,
    second_site: Option<SecondSite>,
    connector_args: Vec<String>,
    work_dir: PathBuf,
    manifests: PathBuf,
    /// Flannel leases as last read from the manifest file (names VTEP peers).
    leases: BTreeMap<String, FlannelLease>,
    extra_agent_args: Vec<String>,
    timeout_factor: u32,
    agent_image: Option<AgentImage>,
    /// [`ClusterOptions::follow_flannel`]; stopped first on drop.
    flannel_follower: Option<flannel::FlannelFollower>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.flannel_follower = None;
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
            let state_dir = node.files.state_dir.display().to_string();
            let args = [
                "uninstall",
                "--cni-conf-dir",
                &cni_conf_dir,
                "--state-dir",
                &state_dir,
            ];
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
        self.second_nat = None;
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
