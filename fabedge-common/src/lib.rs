//! Everything the fabedge kernel programs and the agent must agree on: map
//! names, keys and values, the skb mark contract, ports, roles and the
//! counter (drop reason) list. One source of truth: both sides compile this.
//!
//! Layout rules: `#[repr(C)]`, padding spelled out as `_pad` fields, and a
//! `const` size assertion per type. IPv4 addresses are `[u8; 4]` in network
//! order (what the packet holds, and what `bpftool map dump` prints readably);
//! ports are host-order `u16` for the same reason.
#![no_std]

pub mod counters;
pub mod mark;
pub mod services;

pub use counters::Counter;

/// Bumped whenever any map's type, key, value or size changes. The agent pins
/// under `/sys/fs/bpf/fabedge/v<LAYOUT_VERSION>/` and refuses to adopt a pinned
/// map whose shape differs from what it was built with.
pub const LAYOUT_VERSION: u32 = 2;

/// Map names, as they appear in the object file, in bpffs and in `bpftool`.
pub mod map_names {
    pub const ROUTES: &str = "FE_ROUTES";
    pub const PEERS: &str = "FE_PEERS";
    pub const CONFIG: &str = "FE_CONFIG";
    pub const COUNTERS: &str = "FE_COUNTERS";
    pub const PEER_STATS: &str = "FE_PEER_STATS";
    pub const SERVICES: &str = "FE_SERVICES";
    pub const BACKENDS: &str = "FE_BACKENDS";
    pub const CT: &str = "FE_CT";
    pub const AFFINITY: &str = "FE_AFFINITY";
    pub const SOCK_REVNAT: &str = "FE_SOCK_REVNAT";
    pub const PEER_ADDRS: &str = "FE_PEER_ADDRS";
    pub const POD_PORTS: &str = "FE_POD_PORTS";
    pub const GROUPS: &str = "FE_GROUPS";
    pub const VTEP_ADDRS: &str = "FE_VTEP_ADDRS";
    pub const LOCAL_PODS: &str = "FE_LOCAL_PODS";
    pub const POD_DEVS: &str = "FE_POD_DEVS";
    /// The XDP verdict cache's generation (one `u64`): the agent writes a
    /// fresh random value whenever what the cached verdicts depend on
    /// changes.
    pub const XDP_GEN: &str = "FE_XDP_GEN";
}

/// Capacity of the route LPM trie (prefixes).
pub const MAX_ROUTES: u32 = 16_384;
/// Peer ids are `1..MAX_PEERS`; 0 means "no peer". Also the size of the
/// per-peer statistics array. Fits the 16 mark bits reserved for it.
pub const MAX_PEERS: u32 = 4_096;

/// Capacity of `FE_POD_PORTS`: pods (bridge ports) one edge node guards.
pub const MAX_POD_PORTS: u32 = 1_024;

/// Capacity of `FE_GROUPS`: group ids are `1..MAX_GROUPS`, 0 means none.
pub const MAX_GROUPS: u32 = 16;
/// Members one group lists (connectors an edge may fail over to).
pub const MAX_GROUP_MEMBERS: usize = 7;
/// The group of an edge's connectors: every route "through the connector"
/// names it instead of one connector, so failover is one map write.
pub const CONNECTOR_GROUP: u16 = 1;
/// Capacity of `FE_VTEP_ADDRS`: shared VTEP addresses of a connector group.
pub const MAX_VTEP_ADDRS: u32 = 64;
/// Default UDP port of the liveness probes the connector's datapath answers.
pub const DEFAULT_PROBE_PORT: u16 = 8476;

/// Default UDP port of fabedge's own VXLAN tunnel (plaintext mode). Not
/// Flannel's 8472, so the two never share a socket.
pub const DEFAULT_TUNNEL_PORT: u16 = 8475;
/// Default VNI of fabedge's own VXLAN tunnel.
pub const DEFAULT_TUNNEL_VNI: u32 = 0xFEDE;
/// Flannel's VXLAN backend defaults (Linux kernel VXLAN port, VNI 1).
pub const DEFAULT_FLANNEL_PORT: u16 = 8472;
pub const DEFAULT_FLANNEL_VNI: u32 = 1;
/// UDP port of ESP in UDP (RFC 3948): NAT traversal, our ESP mode's one
/// port in both directions, and where the XDP guard looks in ESP mode.
pub const ESP_IN_UDP_PORT: u16 = 4500;

/// Bytes a VXLAN-in-IPv4 encapsulation adds: outer IPv4 + UDP + VXLAN + inner Ethernet.
pub const VXLAN_OVERHEAD: u16 = 20 + 8 + 8 + 14;

/// Name of the collect-metadata VXLAN device of the plaintext tunnel mode.
pub const TUNNEL_DEV: &str = "fe-tunnel";
/// MAC address of `fe-tunnel` on every node. The device is NOARP, so the
/// kernel addresses frames it routes into the tunnel to the device's own MAC;
/// the same MAC everywhere makes those frames `PACKET_HOST` at the receiver,
/// and the eBPF fast path writes the same address.
pub const TUNNEL_DEV_MAC: [u8; 6] = [0x02, 0xfe, 0xde, 0x00, 0x00, 0x01];
/// Inner source MAC of every frame sent into the tunnel. It must differ from
/// `TUNNEL_DEV_MAC`: the kernel's VXLAN receive path drops frames whose
/// source is its own device address (loop protection).
pub const TUNNEL_SRC_MAC: [u8; 6] = [0x02, 0xfe, 0xde, 0x00, 0x00, 0x02];
/// The pod bridge on edge nodes.
pub const POD_BRIDGE: &str = "br-fabedge";

/// The node's role, decided by the agent from node labels.
pub mod role {
    pub const EDGE: u8 = 1;
    pub const CONNECTOR: u8 = 2;
    pub const CLOUD: u8 = 3;
}

/// How traffic between fabedge nodes is carried.
pub mod tunnel_mode {
    /// Plaintext VXLAN through a collect-metadata device; the program sets the remote end.
    pub const VXLAN: u8 = 1;
    /// ESP in tunnel mode through xfrm; the program only marks, xfrm matches the mark.
    pub const ESP: u8 = 2;
}

/// Bits of `DatapathConfig::flags`.
pub mod config_flags {
    /// VXLAN mode without the redirect fast path: tunnel traffic is marked
    /// and handed to the kernel's forwarding, which routes it into
    /// `fe-tunnel`, whose egress program encapsulates as usual (`--no-fast-path`,
    /// for debugging and as the baseline of `cargo xtask bench`).
    pub const NO_FAST_PATH: u8 = 1;
    /// VXLAN fast path: the program that forwards a packet encapsulates it
    /// (`bpf_skb_adjust_room`) and redirects it to the uplink, instead of
    /// redirecting it into `fe-tunnel`, whose egress program sets a tunnel
    /// key (a metadata dst the kernel allocates per packet). What it cannot
    /// do (neighbour unresolved, kernel < 6.7) still takes `fe-tunnel`.
    /// Off by default in the map, so an agent that predates it keeps the old
    /// behaviour; the agent sets it unless `--tunnel-key-egress`.
    pub const TC_ENCAP: u8 = 2;
    /// VXLAN mode, edges: our tunnel's frames for a pod of `FE_LOCAL_PODS`
    /// are decapsulated by `fe_xdp_uplink` and redirected straight into the
    /// pod's veth (`--xdp-pod-rx`). Off by default in the map.
    pub const XDP_POD_RX: u8 = 4;
}

/// An IPv4 prefix's address part, the data of an LPM trie key (the trie key
/// is `{ prefix_len: u32, data: RouteAddr }`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteAddr {
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<RouteAddr>() == 4);

/// What the datapath does with a destination.
pub mod route_kind {
    /// A pod on this node: hand to the kernel, which delivers over the pod bridge.
    pub const LOCAL_POD: u8 = 1;
    /// This node's own address (hostNetwork endpoints): hand to the kernel.
    pub const LOCAL_HOST: u8 = 2;
    /// Behind a fabedge tunnel peer (`peer_id`): an edge node or the connector.
    pub const TUNNEL: u8 = 3;
    /// A cloud pod CIDR behind a Flannel VTEP (`peer_id` names the VTEP): on the
    /// connector, traffic from tunnels is VXLAN-encapsulated to it.
    pub const CLOUD_VTEP: u8 = 4;
    /// Reached by the kernel's own routing (cloud node IPs seen from the connector).
    pub const KERNEL: u8 = 5;
}

/// Value of the `FE_ROUTES` LPM trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteEntry {
    /// One of [`route_kind`].
    pub kind: u8,
    /// Bits of [`route_flags`].
    pub flags: u8,
    /// Index into `FE_PEERS` for `TUNNEL` and `CLOUD_VTEP` routes, else 0.
    pub peer_id: u16,
}
const _: () = assert!(core::mem::size_of::<RouteEntry>() == 4);

pub mod route_flags {
    /// The destination is a node address (hostNetwork), not a pod CIDR.
    pub const NODE_ADDR: u8 = 1 << 0;
    /// A `TUNNEL` route whose `peer_id` is a group id (`FE_GROUPS`): traffic
    /// goes to the group's active member, and any member may send in the
    /// name of the prefix.
    pub const VIA_GROUP: u8 = 1 << 1;
    /// A `TUNNEL` route to a community peer behind another NAT (ESP mode,
    /// hole punching): the peer, and any member of [`CONNECTOR_GROUP`]
    /// (which relays for it), may send in the name of the prefix.
    ///
    /// [`CONNECTOR_GROUP`]: crate::CONNECTOR_GROUP
    pub const PUNCHED: u8 = 1 << 2;
    /// With [`PUNCHED`]: the direct path is not open (yet); traffic goes to
    /// the active member of [`CONNECTOR_GROUP`], which relays it. `peer_id`
    /// stays the peer's.
    ///
    /// [`CONNECTOR_GROUP`]: crate::CONNECTOR_GROUP
    pub const RELAYED: u8 = 1 << 3;
}

/// Value of the `FE_GROUPS` array, indexed by group id: the connectors an
/// edge may use, in its order of preference, and the one it uses now.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GroupEntry {
    /// Peer id traffic goes to now; 0: none alive (dropped, `drop_group_down`).
    pub active: u16,
    /// Peer ids of the members, preferred first; 0 ends the list.
    pub members: [u16; MAX_GROUP_MEMBERS],
}
const _: () = assert!(core::mem::size_of::<GroupEntry>() == 16);

impl GroupEntry {
    /// A group of `members` (preferred first; those beyond
    /// [`MAX_GROUP_MEMBERS`] are left out) sending to `active`.
    pub fn new(active: u16, members: &[u16]) -> Self {
        let mut entry = GroupEntry {
            active,
            ..GroupEntry::default()
        };
        for (slot, member) in entry.members.iter_mut().zip(members) {
            *slot = *member;
        }
        entry
    }

    /// Whether `peer_id` is one of the members.
    #[inline(always)]
    pub fn has_member(&self, peer_id: u16) -> bool {
        let mut i = 0;
        while i < MAX_GROUP_MEMBERS {
            let member = self.members[i];
            if member == 0 {
                return false;
            }
            if member == peer_id {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// The liveness probe: UDP to `probe_port` of a connector, whose datapath
/// turns a request into a reply in place (addresses, ports and `kind`
/// swapped or set, the rest echoed). The sender accepts only a reply that
/// echoes a token it drew for that target and has not seen answered yet,
/// so a stranger cannot keep a dead connector alive.
pub mod probe {
    pub const MAGIC: [u8; 4] = *b"feP1";
    pub const REQUEST: u8 = 1;
    pub const REPLY: u8 = 2;

    /// The UDP payload of a probe (network order where it matters).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ProbeHeader {
        pub magic: [u8; 4],
        /// [`REQUEST`] or [`REPLY`].
        pub kind: u8,
        pub _pad: [u8; 3],
        /// Sequence number, big-endian.
        pub seq: [u8; 4],
        pub _pad2: [u8; 4],
        /// Random per probe, echoed by the reflector.
        pub token: [u8; 16],
    }
    const _: () = assert!(core::mem::size_of::<ProbeHeader>() == 32);
}

/// What kind of neighbour a peer is.
pub mod peer_kind {
    /// Another fabedge node reached through our tunnel.
    pub const TUNNEL: u8 = 1;
    /// A cloud node's Flannel VTEP (connector only).
    pub const FLANNEL_VTEP: u8 = 2;
    /// ESP mode: an address a tunnel peer's ESP in UDP comes from that is not
    /// its tunnel endpoint: where its NAT shows it (learnt from its hellos),
    /// or the `fabedge.io/esp-endpoint` it publishes (a port forward). Only a
    /// bit of [`super::PeerAddrEntry::kinds`], never a [`super::PeerEntry::kind`]:
    /// ESP in UDP and liveness probes from it are a peer's; our VXLAN from
    /// it is not.
    pub const ESP_SENDER: u8 = 3;
}

/// Bits of [`PeerEntry::flags`].
pub mod peer_flags {
    /// A `FLANNEL_VTEP` peer that is another connector. All connectors are
    /// active and each carries its own edges' cloud traffic, so another
    /// connector's VTEP relays edge traffic to this node's pods and may send
    /// in the name of edge prefixes; a plain cloud node may not.
    pub const CONNECTOR: u8 = 1 << 0;
}

/// Value of the `FE_PEERS` array, indexed by peer id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerEntry {
    /// One of [`peer_kind`]; 0 marks an unused slot.
    pub kind: u8,
    pub flags: u8,
    /// UDP port of the remote end (host order): tunnel port, or 4500 / the
    /// NAT-observed port in ESP-in-UDP mode.
    pub port: u16,
    /// Underlay address of the remote end: tunnel endpoint or VTEP node IP.
    pub underlay_ip: [u8; 4],
    /// Flannel `VtepMAC` for `FLANNEL_VTEP` peers; zero otherwise.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PeerEntry>() == 16);

/// The single entry (key 0) of `FE_CONFIG`: node-wide datapath settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DatapathConfig {
    /// Non-zero once the agent has written a complete configuration; until
    /// then programs pass traffic untouched (counted as `NotConfigured`).
    pub ready: u8,
    /// One of [`role`].
    pub role: u8,
    /// One of [`tunnel_mode`].
    pub tunnel_mode: u8,
    /// Bits of [`config_flags`].
    pub flags: u8,
    /// This node's InternalIP.
    pub node_ip: [u8; 4],
    /// Source address for encapsulations this node originates in eBPF (the
    /// connector's address on the cloud network, Flannel's `public-ip`).
    pub underlay_ip: [u8; 4],
    /// ifindex of the `fe-tunnel` collect-metadata VXLAN device.
    pub tunnel_ifindex: u32,
    /// ifindex of the underlay NIC (the connector's Flannel-facing uplink).
    pub uplink_ifindex: u32,
    /// VNI of fabedge's tunnel.
    pub tunnel_vni: u32,
    /// Flannel's VNI (connector).
    pub flannel_vni: u32,
    /// Flannel's UDP port (connector), host order.
    pub flannel_port: u16,
    /// Largest inner IPv4 packet that fits fabedge's tunnel unfragmented.
    pub tunnel_mtu: u16,
    /// The connector's `flannel.1` MAC: inner source MAC of frames we encapsulate to cloud VTEPs.
    pub flannel_mac: [u8; 6],
    /// Largest inner IPv4 packet that fits Flannel's VXLAN unfragmented (connector).
    pub flannel_mtu: u16,
    /// UDP port `fe-tunnel` listens on (VXLAN mode), host order: where the
    /// XDP guard checks the sender.
    pub tunnel_port: u16,
    /// UDP port whose probes from known peers the connector's datapath
    /// answers (host order); 0: no reflector. (Was padding: an agent that
    /// predates it writes 0.)
    pub probe_port: u16,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 44);

/// Value of `FE_PEER_ADDRS`, keyed by a peer's underlay address
/// ([`RouteAddr`]): which peers send from that address. The XDP guard drops
/// tunnel traffic from addresses without an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerAddrEntry {
    /// One peer at this address (the lowest id when several share it,
    /// e.g. edges behind one NAT).
    pub peer_id: u16,
    /// `1 << kind` for every [`peer_kind`] at this address.
    pub kinds: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PeerAddrEntry>() == 4);

/// Value of `FE_POD_PORTS`, keyed by the ifindex (`u32`) of a pod's
/// host-side veth, a port of the pod bridge: the one address the pod behind
/// it may send from (the address its CNI gave it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodPortEntry {
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PodPortEntry>() == 4);

/// Value of `FE_LOCAL_PODS`, keyed by a pod's address ([`RouteAddr`]): what
/// `fe_xdp_uplink` needs to hand a decapsulated frame straight to the pod,
/// as the kernel's routing over the pod bridge would have.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalPodEntry {
    /// ifindex of the pod's host-side veth: its key in `FE_POD_DEVS`.
    pub ifindex: u32,
    /// The pod interface's MAC: the destination of delivered frames.
    pub pod_mac: [u8; 6],
    /// The pod bridge's MAC: the source the kernel's routing would give.
    pub bridge_mac: [u8; 6],
    /// The pod interface's MTU: the veth refuses longer frames from XDP,
    /// so those are left to the kernel.
    pub mtu: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<LocalPodEntry>() == 20);

/// Per-peer traffic statistics (`FE_PEER_STATS`, per-CPU, indexed by peer id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PeerStats>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `repr(C)` with explicit padding and no pointers.
    unsafe impl aya::Pod for RouteAddr {}
    unsafe impl aya::Pod for RouteEntry {}
    unsafe impl aya::Pod for PeerEntry {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for PeerStats {}
    unsafe impl aya::Pod for PeerAddrEntry {}
    unsafe impl aya::Pod for PodPortEntry {}
    unsafe impl aya::Pod for LocalPodEntry {}
    unsafe impl aya::Pod for GroupEntry {}
}
