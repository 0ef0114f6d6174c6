//! The plan: a pure function from a cluster snapshot and this node's name to
//! everything `apply` must make true on this node — datapath maps, kernel
//! routes, devices, program attachments, CNI config, sysctls and (on the
//! connector) the Flannel annotations of other Nodes.
//!
//! Roles (see DESIGN.md §2):
//! - **edge**: its pods and address are local; community peers are reached
//!   over direct tunnels; everything else in the cluster (cloud pods and
//!   nodes, Services, other edge sites) through the connector.
//! - **connector**: edge pod CIDRs and node addresses are behind their edge
//!   tunnels; cloud pod CIDRs are behind the owning node's Flannel VTEP
//!   (the eBPF program encapsulates to it); cloud node addresses and
//!   Services are the kernel's business.
//! - **cloud**: no datapath; the annotation trick makes Flannel carry edge pod
//!   CIDRs to the connector, so only edge *node* addresses need routes here.
//!
//! Several connectors: all are active (`connectors.rs`). Each edge orders
//! them by rendezvous hashing and routes through a connector group whose
//! active member its probes choose; cloud nodes reach an edge through the
//! shared VTEP address of its first connector, which that connector's
//! successor takes over when it dies.

mod cni;
mod connectors;
mod error;
mod flannel;
mod peer_ids;
#[cfg(test)]
mod tests;

use std::{borrow::Cow, collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use fabedge_common::{
    CONNECTOR_GROUP, DEFAULT_FLANNEL_PORT, DEFAULT_FLANNEL_VNI, DEFAULT_TUNNEL_PORT,
    DEFAULT_TUNNEL_VNI, DatapathConfig, GroupEntry, POD_BRIDGE, PeerEntry, RouteEntry, TUNNEL_DEV,
    TUNNEL_DEV_MAC, VXLAN_OVERHEAD, peer_kind, route_flags, route_kind, tunnel_mode,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// For the leading connector's cluster work (`annotate`), which writes the
/// active connector's lease in kube mode.
pub use self::error::PlanError;
pub use self::flannel::{annotation_patches as flannel_annotation_patches, masquerade_lease};
pub use self::{
    cni::{CNI_FILE_NAME, CNI_VERSION},
    connectors::Connectors,
    peer_ids::PeerIds,
};
pub use crate::model::AnnotationPatch;
use crate::{
    datapath::{Attachment, Program},
    model::{Node, Role, Snapshot},
};

/// Kubernetes' default Service CIDR (kube-apiserver `--service-cluster-ip-range`).
pub const DEFAULT_SERVICE_CIDR: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12) {
    Ok(net) => net,
    Err(_) => panic!("a /12 is a valid prefix"),
};
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_UPLINK_MTU: u16 = 1500;

/// Bytes reserved for ESP-in-UDP tunnel mode (the ESP work may refine it):
/// outer IPv4 20 + UDP (NAT traversal) 8 + SPI and sequence number 8 + IV 8
/// (AES-GCM) + ICV 16 + pad length and next header 2 + padding up to 15 (the
/// worst case, a 16-byte block cipher; AES-GCM itself pads to 4 bytes)
/// = 77, rounded up to 80 so the inner MTU stays a multiple of 4.
pub const ESP_OVERHEAD: u16 = 80;
/// Peer ids the agent assigned, kept in its state dir so they survive restarts.
pub const PEER_IDS_FILE: &str = "peer-ids.json";
/// The smallest MTU IPv4 allows on a link (RFC 791).
const MIN_IPV4_MTU: u16 = 68;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// VNIs are 24 bits.
const MAX_VNI: u32 = 0x00FF_FFFF;

/// How traffic between fabedge nodes is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// Plaintext VXLAN through the collect-metadata device `fe-tunnel`.
    Vxlan,
    /// ESP in tunnel mode through xfrm.
    Esp,
}

impl TunnelMode {
    /// The value of `DatapathConfig::tunnel_mode`.
    pub const fn datapath_mode(self) -> u8 {
        match self {
            TunnelMode::Vxlan => tunnel_mode::VXLAN,
            TunnelMode::Esp => tunnel_mode::ESP,
        }
    }

    /// Bytes the tunnel adds to every packet.
    pub const fn overhead(self) -> u16 {
        match self {
            TunnelMode::Vxlan => VXLAN_OVERHEAD,
            TunnelMode::Esp => ESP_OVERHEAD,
        }
    }
}

/// The programs on an uplink of an edge or the connector: ingress
/// (forged tunnel sources, Flannel's sender checks, the connector's
/// decapsulation) and egress (tunnel destinations never leave in clear).
pub fn uplink_guards(iface: &str) -> [Attachment; 2] {
    [
        Attachment::new(Program::UplinkIngress, iface),
        Attachment::new(Program::UplinkEgress, iface),
    ]
}

/// Node-local settings: command-line flags, plus what `apply` reads from the
/// host (the uplink's MTU, `flannel.1`'s MAC) before planning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Plan this node as `role` whatever its labels say (tests, bring-up).
    pub role_override: Option<Role>,
    pub tunnel_mode: TunnelMode,
    pub tunnel_port: u16,
    pub tunnel_vni: u32,
    pub flannel_vni: u32,
    pub flannel_port: u16,
    /// The underlay NIC (the one Flannel uses on the connector). Required on
    /// the connector, where a program attaches to it.
    pub uplink: Option<String>,
    /// The uplink's MTU; tunnel MTUs are derived from it.
    pub uplink_mtu: u16,
    /// MAC of this node's `flannel.1`. Required on the connector: it is the
    /// VtepMAC written onto edge Nodes and the source MAC of frames the
    /// datapath encapsulates to cloud VTEPs.
    pub flannel_mac: Option<[u8; 6]>,
    pub service_cidr: Ipv4Net,
    pub cni_conf_dir: PathBuf,
    pub pod_bridge: String,
    /// Edge: let pods reach destinations outside the cluster through the
    /// node's own routing (`0.0.0.0/0 → kernel`). Off: such packets are
    /// dropped and counted (`drop_no_route`), never sent out the uplink.
    pub pod_egress_via_node: bool,
    /// VXLAN mode: hand tunnel traffic to the kernel's forwarding instead of
    /// redirecting it (`--no-fast-path`).
    pub no_fast_path: bool,
    /// VXLAN mode: the fast path redirects into `fe-tunnel`, whose egress
    /// program sets a tunnel key per packet, instead of encapsulating in
    /// the forwarding program (`--tunnel-key-egress`; the older, costlier
    /// way, kept for comparison).
    pub tunnel_key_egress: bool,
    /// VXLAN mode, edges: XDP delivers tunnel traffic for local pods
    /// straight into their veths (`--xdp-pod-rx`).
    pub xdp_pod_rx: bool,
    /// ESP mode: this node's public key (base64), published as
    /// `fabedge.io/public-key`, and the generation of its outbound SAs,
    /// published as `fabedge.io/key-generation`.
    pub esp_public_key: Option<String>,
    pub esp_generation: u32,
    /// ESP mode: this node's key nonce (base64), published as
    /// `fabedge.io/key-nonce`.
    pub esp_key_nonce: Option<String>,
    /// ESP mode: where peers reach this node's UDP 4500 when that is not its
    /// tunnel endpoint (a port forward), published as `fabedge.io/esp-endpoint`.
    pub esp_public_endpoint: Option<std::net::SocketAddrV4>,
    /// ESP mode: where peers' NATs show them, learnt from their hellos
    /// (their ESP in UDP and probes come from there).
    pub esp_observed: crate::esp::plan::ObservedEndpoints,
    /// ESP mode, edge: community peers behind another NAT that a connector
    /// introduced (`esp::punch`): routed to the peer once the direct path
    /// works both ways, else through the connector group.
    pub esp_punched: crate::esp::punch::PunchedPeers,
    /// Sizes of the maps the plan must fit (`--max-routes`, `--max-services`,
    /// `--max-backends`, `--ct-entries`).
    pub capacity: crate::maps::Capacity,
    /// UDP port of the liveness probes (`--probe-port`): the connector's
    /// datapath answers them, edges and connectors send them.
    pub probe_port: u16,
    /// Edge: prefixes routed through the connector group as a whole
    /// (`--cluster-prefix`: the cluster's pod CIDRs, the cloud and edge node
    /// networks). Every node's own route is more specific and still wins,
    /// so with them an edge needs to see only its community peers and the
    /// connectors (kube mode then watches only those Nodes).
    pub cluster_prefixes: Vec<Ipv4Net>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            role_override: None,
            tunnel_mode: TunnelMode::Vxlan,
            tunnel_port: DEFAULT_TUNNEL_PORT,
            tunnel_vni: DEFAULT_TUNNEL_VNI,
            flannel_vni: DEFAULT_FLANNEL_VNI,
            flannel_port: DEFAULT_FLANNEL_PORT,
            uplink: None,
            uplink_mtu: DEFAULT_UPLINK_MTU,
            flannel_mac: None,
            service_cidr: DEFAULT_SERVICE_CIDR,
            cni_conf_dir: PathBuf::from(DEFAULT_CNI_CONF_DIR),
            pod_bridge: POD_BRIDGE.to_owned(),
            pod_egress_via_node: false,
            no_fast_path: false,
            tunnel_key_egress: false,
            xdp_pod_rx: false,
            esp_public_key: None,
            esp_generation: 0,
            esp_key_nonce: None,
            esp_public_endpoint: None,
            esp_observed: Default::default(),
            esp_punched: Default::default(),
            capacity: crate::maps::Capacity::default(),
            probe_port: fabedge_common::DEFAULT_PROBE_PORT,
            cluster_prefixes: Vec::new(),
        }
    }
}

/// A route in the kernel's table: the slow path, which must agree with the
/// maps (whatever the eBPF fast path declines is routed by these).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelRoute {
    pub dst: Ipv4Net,
    /// `None`: the kernel picks the device that reaches `via`.
    pub dev: Option<String>,
    pub via: Option<Ipv4Addr>,
    /// Preferred source for locally originated packets (hostNetwork pods),
    /// so replies come back to an address every peer routes to this node.
    pub src: Option<Ipv4Addr>,
}

/// A network device apply creates (or adopts) and configures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Device {
    /// The edge pod bridge: pods' default gateway.
    Bridge {
        name: String,
        /// Gateway address with the pod CIDR's prefix, e.g. 10.234.1.1/24.
        address: Ipv4Net,
        mtu: u16,
    },
    /// `ip link add NAME type vxlan external dstport PORT` with NOARP, `mac`
    /// and `mtu`: the collect-metadata VXLAN device of the plaintext tunnel
    /// mode; the remote end of each packet is set by `fe_tunnel_egress`.
    VxlanTunnel {
        name: String,
        port: u16,
        #[serde(serialize_with = "serialize_mac")]
        mac: [u8; 6],
        mtu: u16,
        /// Outer source address. `None` (our choice): the kernel picks it from
        /// the route to each peer, which is the address peers see (or NAT
        /// rewrites into the one they expect); a node's advertised tunnel
        /// endpoint often is not an address on the node at all.
        local: Option<Ipv4Addr>,
    },
    /// `ip link add NAME type xfrm if_id IF_ID` with `mtu`: the ESP mode's
    /// tunnel device. Routes into it are encrypted by the xfrm policies
    /// carrying `if_id`; what our SAs decrypt arrives on it.
    XfrmTunnel { name: String, if_id: u32, mtu: u16 },
}

impl Device {
    pub fn name(&self) -> &str {
        match self {
            Device::Bridge { name, .. }
            | Device::VxlanTunnel { name, .. }
            | Device::XfrmTunnel { name, .. } => name,
        }
    }
}

fn serialize_mac<S: serde::Serializer>(mac: &[u8; 6], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::model::format_mac(*mac))
}

/// The CNI network configuration list an edge node's kubelet uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniConfig {
    /// `<cni_conf_dir>/10-fabedge.conflist`.
    pub path: PathBuf,
    pub json: String,
}

/// A kernel parameter. `key` is the path below `/proc/sys` with `/`
/// separators (`net/ipv4/conf/fe-tunnel/rp_filter`), which stays unambiguous
/// for interface names containing dots; `sysctl -w` accepts it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sysctl {
    pub key: String,
    pub value: String,
}

impl Sysctl {
    fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Sysctl {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/proc/sys").join(&self.key)
    }
}

/// Everything apply needs to make this node right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub node: String,
    /// The role planned for: the node's labelled role, or `Cloud` for a
    /// standby connector.
    pub role: Role,
    /// `FE_CONFIG`. `tunnel_ifindex` and `uplink_ifindex` are 0: apply fills
    /// them in once the devices exist.
    pub config: DatapathConfig,
    /// `FE_ROUTES`.
    pub routes: BTreeMap<Ipv4Net, RouteEntry>,
    /// `FE_PEERS`, by peer id.
    pub peers: BTreeMap<u16, PeerEntry>,
    /// Node name → peer id; persist it and pass it to the next plan.
    pub peer_ids: PeerIds,
    pub kernel_routes: Vec<KernelRoute>,
    pub devices: Vec<Device>,
    pub attachments: Vec<Attachment>,
    pub cni: Option<CniConfig>,
    pub sysctls: Vec<Sysctl>,
    /// Flannel annotations of other Nodes (active connector only).
    pub annotations: Vec<AnnotationPatch>,
    /// Things the operator should know that do not stop this node.
    pub warnings: Vec<String>,
    /// ClusterIP translation (edge nodes; empty elsewhere).
    pub services: crate::services::plan::ServicePlan,
    /// `FE_GROUPS` by group id (edge: [`CONNECTOR_GROUP`], its connectors in
    /// order of preference). The plan makes the first member active; the
    /// run loop replaces `active` with the first member its probes find alive.
    pub groups: BTreeMap<u16, GroupEntry>,
    /// `FE_VTEP_ADDRS` (connector): the shared VTEP addresses of every
    /// connector, on which this one accepts Flannel VXLAN for edges (it may
    /// hold another's after a failover, or be sent to by a stale ARP entry),
    /// and this connector's own tunnel endpoint and ExternalIP, where edges
    /// send their probes (the reflector answers probes to any of them).
    pub vtep_addrs: std::collections::BTreeSet<Ipv4Addr>,
    /// What this node probes and, on a connector, which shared VTEP
    /// addresses it may have to hold.
    pub ha: HaPlan,
    /// ESP mode: the addresses tunnel peers' ESP in UDP comes from that are
    /// not their tunnel endpoints (NAT-observed, or a published port
    /// forward), with the peer's id: `FE_PEER_ADDRS` lets their ESP and
    /// probes in ([`fabedge_common::peer_kind::ESP_SENDER`]).
    pub esp_senders: BTreeMap<Ipv4Addr, u16>,
}

/// The liveness side of connector high availability (see `run/ha.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HaPlan {
    /// Node name → where its datapath answers probes. Edge: every connector
    /// (at its tunnel endpoint); connector: every other connector (at its
    /// address on the cloud network).
    pub probe_targets: BTreeMap<String, std::net::SocketAddrV4>,
    /// Connector: every connector and its usable shared VTEP address, by name.
    pub connectors: BTreeMap<String, Option<Ipv4Addr>>,
    /// Connector: the NIC shared VTEP addresses go on (the uplink).
    pub vtep_iface: Option<String>,
}

impl Plan {
    /// [`esp_senders`] of this plan's peers, with `observed` endpoints.
    pub fn esp_senders_with(
        &self,
        snapshot: &Snapshot,
        observed: &crate::esp::plan::ObservedEndpoints,
    ) -> BTreeMap<Ipv4Addr, u16> {
        let peers = self
            .peers
            .iter()
            .filter_map(|(&id, entry)| Some((self.peer_name(id)?, id, entry)));
        esp_senders(snapshot, peers, observed)
    }

    /// The node behind a peer id, for logs and `inspect`.
    pub fn peer_name(&self, id: u16) -> Option<&str> {
        self.peer_ids.node(id)
    }
}

fn setting(setting: &'static str, problem: impl Into<String>) -> PlanError {
    PlanError::Setting {
        setting,
        problem: problem.into(),
    }
}

/// Plan node `me` of `snapshot`. `previous_peer_ids` is the previous plan's
/// [`Plan::peer_ids`] (empty on first start): ids of peers still present are
/// kept, so in-flight marks and per-peer statistics keep their meaning.
pub fn plan(
    snapshot: &Snapshot,
    me: &str,
    settings: &Settings,
    previous_peer_ids: &PeerIds,
) -> Result<Plan, PlanError> {
    let snapshot = match settings.role_override {
        Some(role) => {
            let mut overridden = snapshot.clone();
            if let Some(node) = overridden.nodes.get_mut(me) {
                node.role = role;
            }
            Cow::Owned(overridden)
        }
        None => Cow::Borrowed(snapshot),
    };
    let snapshot = snapshot.as_ref();
    let me = snapshot
        .nodes
        .get(me)
        .ok_or_else(|| PlanError::UnknownNode {
            node: me.to_owned(),
        })?;
    let tunnel_mtu = check_settings(settings)?;
    check_pod_cidrs(snapshot, settings.service_cidr)?;

    let mut planner = Planner::new(snapshot, me, settings);
    let connectors = connectors::Connectors::of(snapshot);
    for warning in &connectors.warnings {
        planner.warn(warning.clone());
    }
    let role = me.role;
    match role {
        Role::Edge => planner.edge(&connectors)?,
        Role::Connector => planner.connector(&connectors)?,
        Role::Cloud => planner.cloud(&connectors),
    }
    planner.check_tunnel_loops()?;
    planner.finish(role, tunnel_mtu, previous_peer_ids)
}

/// Validate settings; returns the tunnel MTU.
fn check_settings(settings: &Settings) -> Result<u16, PlanError> {
    let overhead = settings.tunnel_mode.overhead();
    let tunnel_mtu = settings.uplink_mtu.checked_sub(overhead).filter(|mtu| *mtu >= MIN_IPV4_MTU).ok_or_else(|| {
        setting(
            "uplink MTU",
            format!(
                "{} leaves no room for the {overhead}-byte tunnel overhead (IPv4 needs {MIN_IPV4_MTU} inside); \
                     is the uplink interface right?",
                settings.uplink_mtu
            ),
        )
    })?;
    for (name, vni) in [
        ("tunnel VNI", settings.tunnel_vni),
        ("Flannel VNI", settings.flannel_vni),
    ] {
        if vni > MAX_VNI {
            return Err(setting(
                name,
                format!("{vni} does not fit VXLAN's 24 bits (max {MAX_VNI})"),
            ));
        }
    }
    if settings.tunnel_port == 0 || settings.flannel_port == 0 {
        return Err(setting("tunnel port", "UDP port 0 cannot be used"));
    }
    if settings.tunnel_mode == TunnelMode::Vxlan && settings.tunnel_port == settings.flannel_port {
        return Err(setting(
            "tunnel port",
            format!(
                "{} is Flannel's VXLAN port too; fe-tunnel and flannel.1 cannot share it: use the default {DEFAULT_TUNNEL_PORT}",
                settings.tunnel_port
            ),
        ));
    }
    for (name, iface) in [
        ("pod bridge", Some(&settings.pod_bridge)),
        ("uplink", settings.uplink.as_ref()),
    ] {
        if let Some(iface) = iface
            && (iface.is_empty() || iface.len() > MAX_IFNAME_LEN)
        {
            return Err(setting(
                name,
                format!("{iface:?} is not an interface name (1 to {MAX_IFNAME_LEN} bytes)"),
            ));
        }
    }
    Ok(tunnel_mtu)
}

/// Every node's pod CIDR must be its own and outside the Service CIDR. Run on
/// the whole cluster so every agent reports the same problem.
fn check_pod_cidrs(snapshot: &Snapshot, service_cidr: Ipv4Net) -> Result<(), PlanError> {
    let mut cidrs: Vec<(Ipv4Net, &str)> = snapshot
        .nodes
        .values()
        .filter_map(|n| n.pod_cidr.map(|c| (c, n.name.as_str())))
        .collect();
    // Two CIDRs either nest or are disjoint. Sorted by start, wider first,
    // a CIDR nested in an earlier one also starts inside its predecessor.
    cidrs.sort_by_key(|(cidr, name)| (cidr.network(), cidr.prefix_len(), *name));
    for pair in cidrs.windows(2) {
        let [(wide, wide_name), (cidr, name)] = pair else {
            continue;
        };
        if wide.contains(&cidr.network()) {
            return Err(PlanError::PodCidrOverlap {
                first: (*wide_name).to_owned(),
                first_cidr: *wide,
                second: (*name).to_owned(),
                second_cidr: *cidr,
            });
        }
    }
    for (cidr, name) in &cidrs {
        if cidr.contains(&service_cidr.network()) || service_cidr.contains(&cidr.network()) {
            return Err(PlanError::ServiceCidrOverlap {
                node: (*name).to_owned(),
                pod_cidr: *cidr,
                service_cidr,
            });
        }
    }
    Ok(())
}

/// A route while planning: peers are still names, and each route remembers
/// what it is for error messages.
struct PlannedRoute {
    kind: u8,
    flags: u8,
    peer: Option<Via>,
    owner: String,
}

/// Where a tunnel route goes: one peer, or the group of this edge's connectors.
#[derive(Clone)]
enum Via {
    Peer(String),
    ConnectorGroup,
}

struct Planner<'a> {
    snapshot: &'a Snapshot,
    me: &'a Node,
    settings: &'a Settings,
    routes: BTreeMap<Ipv4Net, PlannedRoute>,
    /// Peers by node name; ids are given in `finish`.
    peers: BTreeMap<String, PeerEntry>,
    /// Kernel routes other than those mirroring tunnel prefixes (added in `finish`).
    kernel_routes: Vec<KernelRoute>,
    annotations: Vec<AnnotationPatch>,
    warnings: Vec<String>,
    /// Edge: its connectors, preferred first (the members of [`CONNECTOR_GROUP`]).
    connector_order: Vec<String>,
    /// Connector: every connector's shared VTEP address.
    vtep_addrs: std::collections::BTreeSet<Ipv4Addr>,
    ha: HaPlan,
}

fn host_route(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(ip)
}

impl<'a> Planner<'a> {
    fn new(snapshot: &'a Snapshot, me: &'a Node, settings: &'a Settings) -> Self {
        Planner {
            snapshot,
            me,
            settings,
            routes: BTreeMap::new(),
            peers: BTreeMap::new(),
            kernel_routes: Vec::new(),
            annotations: Vec::new(),
            warnings: Vec::new(),
            connector_order: Vec::new(),
            vtep_addrs: std::collections::BTreeSet::new(),
            ha: HaPlan::default(),
        }
    }

    fn warn(&mut self, warning: String) {
        log::debug!("plan for {}: {warning}", self.me.name);
        self.warnings.push(warning);
    }

    fn route(
        &mut self,
        prefix: Ipv4Net,
        kind: u8,
        flags: u8,
        peer: Option<Via>,
        owner: String,
    ) -> Result<(), PlanError> {
        if let Some(existing) = self.routes.get(&prefix) {
            return Err(PlanError::RouteConflict {
                prefix,
                first: existing.owner.clone(),
                second: owner,
            });
        }
        self.routes.insert(
            prefix,
            PlannedRoute {
                kind,
                flags,
                peer,
                owner,
            },
        );
        Ok(())
    }

    /// This node's own pod CIDR and address, delivered by the kernel.
    fn local_routes(&mut self) -> Result<(), PlanError> {
        let me = self.me;
        if let Some(cidr) = me.pod_cidr {
            self.route(
                cidr,
                route_kind::LOCAL_POD,
                0,
                None,
                format!("{}'s pod CIDR", me.name),
            )?;
        }
        self.route(
            host_route(me.internal_ip),
            route_kind::LOCAL_HOST,
            route_flags::NODE_ADDR,
            None,
            format!("{}'s InternalIP", me.name),
        )
    }

    fn tunnel_peer(&mut self, node: &Node) {
        let port = match self.settings.tunnel_mode {
            TunnelMode::Vxlan => self.settings.tunnel_port,
            TunnelMode::Esp => fabedge_common::ESP_IN_UDP_PORT,
        };
        self.peers.insert(
            node.name.clone(),
            PeerEntry {
                kind: peer_kind::TUNNEL,
                port,
                underlay_ip: node.tunnel_endpoint.octets(),
                ..Default::default()
            },
        );
    }

    /// `node`'s pod CIDR and address, through the tunnel to `via` (its own
    /// peer, or this edge's connector group).
    fn through_tunnel(&mut self, node: &Node, via: Via, flags: u8) -> Result<(), PlanError> {
        if let Via::Peer(name) = &via {
            let peer = self
                .snapshot
                .nodes
                .get(name)
                .expect("tunnel peers are nodes of the snapshot");
            self.tunnel_peer(peer);
        }
        match node.pod_cidr {
            Some(cidr) => self.route(
                cidr,
                route_kind::TUNNEL,
                flags,
                Some(via.clone()),
                format!("{}'s pod CIDR", node.name),
            )?,
            None if node.role == Role::Edge => self.warn(format!(
                "edge node {} has no pod CIDR yet: only its node address is routed (set spec.podCIDR)",
                node.name
            )),
            None => {}
        }
        self.route(
            host_route(node.internal_ip),
            route_kind::TUNNEL,
            route_flags::NODE_ADDR | flags,
            Some(via),
            format!("{}'s InternalIP", node.name),
        )
    }

    fn edge(&mut self, connectors: &connectors::Connectors<'a>) -> Result<(), PlanError> {
        let me = self.me;
        let cidr = me.pod_cidr.ok_or_else(|| PlanError::MissingPodCidr {
            node: me.name.clone(),
        })?;
        if cidr.prefix_len() > 30 {
            return Err(PlanError::PodCidrTooSmall {
                node: me.name.clone(),
                cidr,
            });
        }
        self.local_routes()?;
        // Destinations outside the cluster (the edge site's own network, the
        // internet) are dropped and counted by `fe_from_pod` unless the
        // operator opts in to handing them to the node's kernel.
        if self.settings.pod_egress_via_node {
            self.route(
                Ipv4Net::default(),
                route_kind::KERNEL,
                0,
                None,
                "the default route (edge pods reach their site and the internet through the node)"
                    .into(),
            )?;
        }

        // Every connector is a tunnel peer (ESP: SAs exist before a failover
        // needs them); routes through "the connector" name the group.
        self.connector_order = connectors.failover_order(&me.name);
        for connector in &connectors.nodes {
            self.tunnel_peer(connector);
            self.ha.probe_targets.insert(
                connector.name.clone(),
                std::net::SocketAddrV4::new(connector.tunnel_endpoint, self.settings.probe_port),
            );
        }
        let has_connector = !self.connector_order.is_empty();
        let peers = self.community_peers();
        for node in self.snapshot.nodes.values() {
            if node.name == me.name {
                continue;
            }
            if peers.contains(&node.name) {
                // Behind another NAT (introduced by a connector): the
                // connector relays until the direct path works.
                let punched = match self.settings.esp_punched.get(&node.name) {
                    Some(p) if p.direct || has_connector => {
                        route_flags::PUNCHED | if p.direct { 0 } else { route_flags::RELAYED }
                    }
                    _ => 0,
                };
                self.through_tunnel(node, Via::Peer(node.name.clone()), punched)?;
            } else if has_connector {
                self.through_tunnel(node, Via::ConnectorGroup, 0)?;
            }
        }
        match has_connector {
            true => {
                self.route(
                    self.settings.service_cidr,
                    route_kind::TUNNEL,
                    0,
                    Some(Via::ConnectorGroup),
                    "the Service CIDR".into(),
                )?;
                for prefix in &self.settings.cluster_prefixes {
                    // A node whose pod CIDR is exactly this prefix already
                    // has its route, the more precise one.
                    if !self.routes.contains_key(prefix) {
                        self.route(
                            *prefix,
                            route_kind::TUNNEL,
                            0,
                            Some(Via::ConnectorGroup),
                            format!("cluster prefix {prefix} (--cluster-prefix)"),
                        )?;
                    }
                }
            }
            false => self.warn(format!(
                "no connector node (label {}): {} reaches only its community peers",
                crate::model::label::CONNECTOR,
                me.name
            )),
        }
        Ok(())
    }

    /// Edge nodes sharing a community with this node.
    fn community_peers(&mut self) -> std::collections::BTreeSet<String> {
        let me = self.me;
        let mut peers = std::collections::BTreeSet::new();
        let mut warnings = Vec::new();
        for community in self
            .snapshot
            .communities
            .values()
            .filter(|c| c.members.contains(&me.name))
        {
            for member in community.members.iter().filter(|m| **m != me.name) {
                match self.snapshot.nodes.get(member) {
                    Some(node) if node.role == Role::Edge => {
                        peers.insert(member.clone());
                    }
                    Some(node) => warnings.push(format!(
                        "community {} lists {} node {member}; only edge nodes get direct tunnels, it stays reached through the connector",
                        community.name, node.role
                    )),
                    None => warnings.push(format!("community {} lists {member}, which is not a Node", community.name)),
                }
            }
        }
        for warning in warnings {
            self.warn(warning);
        }
        peers
    }

    fn connector(&mut self, connectors: &connectors::Connectors<'a>) -> Result<(), PlanError> {
        let me = self.me;
        let flannel_mac = self.settings.flannel_mac.ok_or_else(|| {
            setting(
                "flannel.1 MAC",
                format!(
                    "the connector {} needs its flannel.1 MAC (is Flannel running here?)",
                    me.name
                ),
            )
        })?;
        if self.settings.uplink.is_none() {
            return Err(setting(
                "uplink",
                format!(
                    "the connector {} needs the name of its Flannel-facing NIC",
                    me.name
                ),
            ));
        }
        if me.pod_cidr.is_none() {
            self.warn(format!(
                "connector {} has no pod CIDR: its own pods are not routed",
                me.name
            ));
        }
        self.local_routes()?;
        self.route(
            self.settings.service_cidr,
            route_kind::KERNEL,
            0,
            None,
            "the Service CIDR".into(),
        )?;
        let underlay = connector_underlay_ip(me);
        for node in self.snapshot.nodes.values().filter(|n| n.name != me.name) {
            if node.role == Role::Edge {
                self.through_tunnel(node, Via::Peer(node.name.clone()), 0)?;
                continue;
            }
            self.route(
                host_route(node.internal_ip),
                route_kind::KERNEL,
                route_flags::NODE_ADDR,
                None,
                format!("{}'s InternalIP", node.name),
            )?;
            let Some(cidr) = node.pod_cidr else { continue };
            let owner = format!("{}'s pod CIDR", node.name);
            match &node.flannel {
                // A lease naming us is our own masquerade left on a former
                // edge node: a VTEP at our own address would loop.
                Some(lease) if lease.public_ip != underlay => {
                    self.peers.insert(
                        node.name.clone(),
                        PeerEntry {
                            kind: peer_kind::FLANNEL_VTEP,
                            flags: if node.role == Role::Connector {
                                fabedge_common::peer_flags::CONNECTOR
                            } else {
                                0
                            },
                            port: self.settings.flannel_port,
                            underlay_ip: lease.public_ip.octets(),
                            vtep_mac: lease.vtep_mac,
                            ..Default::default()
                        },
                    );
                    self.route(
                        cidr,
                        route_kind::CLOUD_VTEP,
                        0,
                        Some(Via::Peer(node.name.clone())),
                        owner,
                    )?;
                }
                lease => {
                    self.warn(format!(
                        "cloud node {} has {}: edge traffic to {cidr} is left to the kernel until Flannel writes its lease",
                        node.name,
                        if lease.is_some() { "the connector's own Flannel lease" } else { "no Flannel lease" },
                    ));
                    self.route(cidr, route_kind::KERNEL, 0, None, owner)?;
                }
            }
        }
        self.annotations =
            flannel::annotation_patches(self.snapshot, connectors, &me.name, Some(flannel_mac));
        self.vtep_addrs = connectors.vtep_addresses.values().copied().collect();
        // Where edges probe us (our tunnel endpoint, often an ExternalIP on
        // another NIC than the cloud one): the reflector answers there too.
        self.vtep_addrs.insert(me.tunnel_endpoint);
        self.vtep_addrs.extend(me.external_ip);
        for connector in &connectors.nodes {
            self.ha.connectors.insert(
                connector.name.clone(),
                connectors.vtep_addresses.get(&connector.name).copied(),
            );
            if connector.name != me.name {
                self.ha.probe_targets.insert(
                    connector.name.clone(),
                    std::net::SocketAddrV4::new(
                        connector_underlay_ip(connector),
                        self.settings.probe_port,
                    ),
                );
            }
        }
        self.ha.vtep_iface = self.settings.uplink.clone();
        Ok(())
    }

    /// Flannel knows nothing of edge node addresses: route each to its first
    /// connector's shared VTEP address (held by a live connector), or to that
    /// connector's InternalIP when it has none.
    fn cloud(&mut self, connectors: &connectors::Connectors<'_>) {
        let edges = self.snapshot.nodes_with_role(Role::Edge);
        match connectors.nodes.is_empty() {
            false => self.kernel_routes.extend(edges.filter_map(|edge| {
                let primary = connectors.primary(&edge.name)?;
                Some(KernelRoute {
                    dst: host_route(edge.internal_ip),
                    dev: None,
                    via: Some(connectors.cloud_address(primary)),
                    src: None,
                })
            })),
            true if edges.count() > 0 => self.warn(format!(
                "no connector node (label {}): edge node addresses are unreachable from {}",
                crate::model::label::CONNECTOR,
                self.me.name
            )),
            true => {}
        }
    }

    /// No prefix that goes into the tunnel (or to a VTEP) may contain the
    /// underlay address of any peer.
    fn check_tunnel_loops(&self) -> Result<(), PlanError> {
        let endpoints: BTreeMap<Ipv4Addr, &str> = self
            .peers
            .iter()
            .map(|(name, peer)| (Ipv4Addr::from(peer.underlay_ip), name.as_str()))
            .collect();
        for (prefix, route) in &self.routes {
            if route.kind != route_kind::TUNNEL && route.kind != route_kind::CLOUD_VTEP {
                continue;
            }
            if let Some((endpoint, peer)) = endpoints
                .range(prefix.network()..=prefix.broadcast())
                .next()
            {
                return Err(PlanError::TunnelLoop {
                    prefix: *prefix,
                    owner: route.owner.clone(),
                    peer: (*peer).to_owned(),
                    endpoint: *endpoint,
                });
            }
        }
        Ok(())
    }

    fn finish(
        self,
        role: Role,
        tunnel_mtu: u16,
        previous_peer_ids: &PeerIds,
    ) -> Result<Plan, PlanError> {
        let Planner {
            snapshot,
            me,
            settings,
            routes: planned,
            peers: named_peers,
            mut kernel_routes,
            annotations,
            warnings,
            connector_order,
            vtep_addrs,
            ha,
            ..
        } = self;
        let peer_ids = previous_peer_ids.assign(named_peers.keys().map(String::as_str))?;
        let id_of = |name: &str| {
            peer_ids
                .get(name)
                .expect("every planned peer was given an id")
        };
        let peers = named_peers
            .iter()
            .map(|(name, entry)| (id_of(name), *entry))
            .collect();
        let routes = planned
            .iter()
            .map(|(prefix, r)| {
                let (peer_id, flags) = match &r.peer {
                    None => (0, r.flags),
                    Some(Via::Peer(name)) => (id_of(name), r.flags),
                    Some(Via::ConnectorGroup) => {
                        (CONNECTOR_GROUP, r.flags | route_flags::VIA_GROUP)
                    }
                };
                (
                    *prefix,
                    RouteEntry {
                        kind: r.kind,
                        flags,
                        peer_id,
                    },
                )
            })
            .collect();
        let mut groups = BTreeMap::new();
        if !connector_order.is_empty() {
            let members: Vec<u16> = connector_order.iter().map(|name| id_of(name)).collect();
            groups.insert(CONNECTOR_GROUP, GroupEntry::new(members[0], &members));
        }

        let vxlan = settings.tunnel_mode == TunnelMode::Vxlan;
        let esp_senders = if vxlan {
            BTreeMap::new()
        } else {
            esp_senders(
                snapshot,
                named_peers
                    .iter()
                    .map(|(name, entry)| (name.as_str(), id_of(name), entry)),
                &settings.esp_observed,
            )
        };
        // The kernel's slow path sends every tunnel prefix where the fast path would.
        if matches!(role, Role::Edge | Role::Connector) {
            // Both modes: `fe-tunnel` (VXLAN device or xfrm interface).
            let dev = Some(TUNNEL_DEV.to_owned());
            kernel_routes.extend(
                planned
                    .iter()
                    .filter(|(_, r)| r.kind == route_kind::TUNNEL)
                    .map(|(prefix, _)| KernelRoute {
                        dst: *prefix,
                        dev: dev.clone(),
                        via: None,
                        src: Some(me.internal_ip),
                    }),
            );
        }
        kernel_routes.sort();

        let connector = role == Role::Connector;
        let config = DatapathConfig {
            ready: 1,
            role: role.datapath_role(),
            tunnel_mode: settings.tunnel_mode.datapath_mode(),
            flags: datapath_flags(settings),
            node_ip: me.internal_ip.octets(),
            underlay_ip: if connector {
                connector_underlay_ip(me)
            } else {
                me.internal_ip
            }
            .octets(),
            tunnel_vni: settings.tunnel_vni,
            tunnel_mtu,
            flannel_vni: if connector { settings.flannel_vni } else { 0 },
            flannel_port: if connector { settings.flannel_port } else { 0 },
            flannel_mac: if connector {
                settings.flannel_mac.unwrap_or_default()
            } else {
                [0; 6]
            },
            flannel_mtu: if connector {
                settings.uplink_mtu - VXLAN_OVERHEAD
            } else {
                0
            },
            tunnel_port: if vxlan { settings.tunnel_port } else { 0 },
            probe_port: if connector { settings.probe_port } else { 0 },
            ..Default::default()
        };

        let mut devices = Vec::new();
        let mut attachments = Vec::new();
        let mut cni = None;
        let mut sysctls = Vec::new();
        if role == Role::Edge {
            let pod_cidr = me.pod_cidr.expect("edge planning requires a pod CIDR");
            let gateway = cni::gateway(pod_cidr);
            let address = Ipv4Net::new(gateway, pod_cidr.prefix_len())
                .expect("prefix taken from a valid CIDR");
            devices.push(Device::Bridge {
                name: settings.pod_bridge.clone(),
                address,
                mtu: tunnel_mtu,
            });
            attachments.push(Attachment::new(Program::FromPod, &settings.pod_bridge));
            attachments.push(Attachment::new(Program::ToPod, &settings.pod_bridge));
            // Replies of local Service backends come back to the gateway and
            // leave `fe_from_pod` with the ClusterIP as source, which the
            // kernel routes elsewhere: strict reverse-path filtering would drop them.
            sysctls.push(Sysctl::new(
                format!("net/ipv4/conf/{}/rp_filter", settings.pod_bridge),
                "2",
            ));
            cni = Some(CniConfig {
                path: settings.cni_conf_dir.join(CNI_FILE_NAME),
                json: cni::conflist(&settings.pod_bridge, pod_cidr, gateway, tunnel_mtu),
            });
        }
        if matches!(role, Role::Edge | Role::Connector) {
            if vxlan {
                devices.push(Device::VxlanTunnel {
                    name: TUNNEL_DEV.to_owned(),
                    port: settings.tunnel_port,
                    mac: TUNNEL_DEV_MAC,
                    mtu: tunnel_mtu,
                    local: None,
                });
                attachments.push(Attachment::new(Program::TunnelIngress, TUNNEL_DEV));
                attachments.push(Attachment::new(Program::TunnelEgress, TUNNEL_DEV));
            } else {
                devices.push(Device::XfrmTunnel {
                    name: TUNNEL_DEV.to_owned(),
                    if_id: crate::esp::xfrm::FE_IF_ID,
                    mtu: tunnel_mtu,
                });
                attachments.push(Attachment::new(Program::TunnelIngress, TUNNEL_DEV));
                attachments.push(Attachment::new(Program::TunnelEgress, TUNNEL_DEV));
            }
            // The uplink's guards (more NICs are added at apply time: every
            // device a peer is reached by, as for XDP).
            if let Some(uplink) = &settings.uplink {
                attachments.extend(uplink_guards(uplink));
            }
            sysctls.push(Sysctl::new("net/ipv4/ip_forward", "1"));
            {
                // Forwarding from one peer to another leaves by the device it
                // came in on, which makes the kernel send ICMP redirects. The
                // kernel ORs `all` with the device's value, so both must be 0.
                sysctls.push(Sysctl::new("net/ipv4/conf/all/send_redirects", "0"));
                sysctls.push(Sysctl::new(
                    format!("net/ipv4/conf/{TUNNEL_DEV}/send_redirects"),
                    "0",
                ));
                // The tunnel carries IPv4 only; no router solicitations into it.
                sysctls.push(Sysctl::new(
                    format!("net/ipv6/conf/{TUNNEL_DEV}/disable_ipv6"),
                    "1",
                ));
            }
        }
        if connector {
            let uplink = settings
                .uplink
                .clone()
                .expect("checked when planning the connector");
            // Loose reverse-path filtering: decapsulated Flannel traffic the
            // fast path punts arrives on the uplink from cloud pod addresses
            // the kernel routes via flannel.1; tunnel traffic arrives from
            // sources routed elsewhere. The kernel uses max(all, device).
            sysctls.push(Sysctl::new(
                format!("net/ipv4/conf/{TUNNEL_DEV}/rp_filter"),
                "2",
            ));
            sysctls.push(Sysctl::new(
                format!("net/ipv4/conf/{uplink}/rp_filter"),
                "2",
            ));
        }

        let mut annotations = annotations;
        if !vxlan && matches!(role, Role::Edge | Role::Connector) {
            annotations.extend(esp_annotations(me, settings));
        }

        Ok(Plan {
            node: me.name.clone(),
            role,
            config,
            routes,
            peers,
            peer_ids,
            kernel_routes,
            devices,
            attachments,
            cni,
            sysctls,
            annotations,
            services: match (role, me.pod_cidr) {
                (Role::Edge, Some(pod_cidr)) => crate::services::plan::plan_services(
                    snapshot,
                    &me.name,
                    pod_cidr,
                    &settings.capacity,
                ),
                _ => crate::services::plan::ServicePlan::default(),
            },
            groups,
            vtep_addrs,
            ha,
            esp_senders,
            warnings,
        })
    }
}

/// ESP mode: where each tunnel peer's ESP in UDP comes from when that is
/// not its tunnel endpoint: its NAT-observed address, else the address of
/// the `fabedge.io/esp-endpoint` it publishes (the lowest id where several
/// share one, as edges behind one NAT do). `peers`: (name, id, entry).
pub fn esp_senders<'a>(
    snapshot: &Snapshot,
    peers: impl IntoIterator<Item = (&'a str, u16, &'a PeerEntry)>,
    observed: &crate::esp::plan::ObservedEndpoints,
) -> BTreeMap<Ipv4Addr, u16> {
    let mut out = BTreeMap::new();
    for (name, id, peer) in peers {
        if peer.kind != peer_kind::TUNNEL {
            continue;
        }
        let published = || {
            let node = snapshot.nodes.get(name)?;
            crate::esp::plan::published_endpoint(&node.annotations)
                .ok()
                .flatten()
        };
        let Some((addr, _)) = observed.get(name).copied().or_else(published) else {
            continue;
        };
        if addr.octets() == peer.underlay_ip || addr.is_unspecified() {
            continue;
        }
        out.entry(addr)
            .and_modify(|lowest: &mut u16| *lowest = (*lowest).min(id))
            .or_insert(id);
    }
    out
}

/// Where cloud nodes send VXLAN for edge pod CIDRs: the connector's Flannel
/// `public-ip` when Flannel has written its lease (it may use another NIC
/// than the InternalIP's), else its InternalIP.
/// `DatapathConfig::flags` from the settings.
fn datapath_flags(settings: &Settings) -> u8 {
    use fabedge_common::config_flags::{NO_FAST_PATH, TC_ENCAP, XDP_POD_RX};
    if settings.no_fast_path {
        NO_FAST_PATH
    } else if settings.tunnel_mode != TunnelMode::Vxlan {
        0
    } else {
        let encap = if settings.tunnel_key_egress {
            0
        } else {
            TC_ENCAP
        };
        let pod_rx = if settings.xdp_pod_rx { XDP_POD_RX } else { 0 };
        encap | pod_rx
    }
}

fn connector_underlay_ip(connector: &Node) -> Ipv4Addr {
    connector
        .flannel
        .as_ref()
        .map_or(connector.internal_ip, |lease| lease.public_ip)
}

/// ESP mode: this node's public key, generation and public endpoint onto its
/// own Node, when they differ from what it carries.
fn esp_annotations(me: &Node, settings: &Settings) -> Option<AnnotationPatch> {
    use crate::esp::keys::{
        ESP_ENDPOINT_ANNOTATION, KEY_GENERATION_ANNOTATION, KEY_NONCE_ANNOTATION,
        PUBLIC_KEY_ANNOTATION,
    };
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    match (
        &settings.esp_public_endpoint,
        me.annotations.get(ESP_ENDPOINT_ANNOTATION),
    ) {
        (Some(endpoint), published) if published != Some(&endpoint.to_string()) => {
            set.insert(ESP_ENDPOINT_ANNOTATION.to_owned(), endpoint.to_string());
        }
        (None, Some(_)) => remove.push(ESP_ENDPOINT_ANNOTATION.to_owned()),
        _ => {}
    }
    if let Some(key) = &settings.esp_public_key
        && me.annotations.get(PUBLIC_KEY_ANNOTATION) != Some(key)
    {
        set.insert(PUBLIC_KEY_ANNOTATION.to_owned(), key.clone());
    }
    let generation = settings.esp_generation.to_string();
    if settings.esp_generation != 0
        && me.annotations.get(KEY_GENERATION_ANNOTATION) != Some(&generation)
    {
        set.insert(KEY_GENERATION_ANNOTATION.to_owned(), generation);
    }
    if let Some(nonce) = &settings.esp_key_nonce
        && me.annotations.get(KEY_NONCE_ANNOTATION) != Some(nonce)
    {
        set.insert(KEY_NONCE_ANNOTATION.to_owned(), nonce.clone());
    }
    (!set.is_empty() || !remove.is_empty()).then(|| AnnotationPatch {
        node: me.name.clone(),
        set,
        remove,
    })
}
