//! Every map the programs use. Layouts come from `fabedge-common`; the agent
//! pins them under `/sys/fs/bpf/fabedge/v<LAYOUT_VERSION>/maps/`.

use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use fabedge_common::services::{
    AffinityEntry, AffinityKey, Backend, BackendKey, CtEntry, CtKey, DEFAULT_CT_ENTRIES,
    MAX_AFFINITY, MAX_BACKENDS, MAX_SERVICES, MAX_SOCK_REVNAT, ServiceEntry, ServiceKey,
    SockRevEntry, SockRevKey,
};
use fabedge_common::{
    CONNECTOR_GROUP, Counter, DatapathConfig, GroupEntry, LocalPodEntry, MAX_GROUP_MEMBERS,
    MAX_GROUPS, MAX_PEERS, MAX_POD_PORTS, MAX_ROUTES, MAX_VTEP_ADDRS, PeerAddrEntry, PeerEntry,
    PeerStats, PodPortEntry, RouteAddr, RouteEntry, counters::COUNTER_SLOTS, route_flags,
    route_kind,
};

#[btf_map]
pub static FE_ROUTES: LpmTrie<RouteAddr, RouteEntry, { MAX_ROUTES as usize }> = LpmTrie::new();

#[btf_map]
pub static FE_PEERS: Array<PeerEntry, { MAX_PEERS as usize }> = Array::new();

/// Underlay address → the peers sending from it (the XDP guard's lookup).
#[btf_map]
pub static FE_PEER_ADDRS: HashMap<RouteAddr, PeerAddrEntry, { MAX_PEERS as usize }> =
    HashMap::new();

/// A pod's host-side veth (ifindex) → the address that pod may send from.
#[btf_map]
pub static FE_POD_PORTS: HashMap<u32, PodPortEntry, { MAX_POD_PORTS as usize }> = HashMap::new();

/// A pod's address → its veth and MACs, for XDP's delivery (`xdp_pod_rx`).
#[btf_map]
pub static FE_LOCAL_PODS: HashMap<RouteAddr, LocalPodEntry, { MAX_POD_PORTS as usize }> =
    HashMap::new();

/// The pods' host-side veths by ifindex: where XDP redirects their frames.
/// The agent enters a veth only once it accepts XDP frames.
#[btf_map]
pub static FE_POD_DEVS: DevMapHash<{ MAX_POD_PORTS as usize }> = DevMapHash::new();

/// Connector groups by id: the member routes through the group go to now.
#[btf_map]
pub static FE_GROUPS: Array<GroupEntry, { MAX_GROUPS as usize }> = Array::new();

/// The connector group's shared VTEP addresses (value unused): Flannel
/// VXLAN to any of them is this connector's, as to its own address.
#[btf_map]
pub static FE_VTEP_ADDRS: HashMap<RouteAddr, u8, { MAX_VTEP_ADDRS as usize }> = HashMap::new();

#[btf_map]
pub static FE_CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map]
pub static FE_COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static FE_PEER_STATS: PerCpuArray<PeerStats, { MAX_PEERS as usize }> = PerCpuArray::new();

#[btf_map]
pub static FE_SERVICES: HashMap<ServiceKey, ServiceEntry, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
pub static FE_BACKENDS: HashMap<BackendKey, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

#[btf_map]
pub static FE_CT: LruHashMap<CtKey, CtEntry, { DEFAULT_CT_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static FE_AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map]
pub static FE_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevEntry, { MAX_SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// The node's configuration, if the agent has completed it.
#[inline(always)]
pub fn config() -> Option<&'static DatapathConfig> {
    match FE_CONFIG.get(0) {
        Some(cfg) if cfg.ready != 0 => Some(cfg),
        _ => None,
    }
}

/// A route as the programs act on it: a group route already resolved to
/// the group's active member. A copy, so that a group switch reaches the
/// next packet and never half of one.
#[derive(Clone, Copy)]
pub struct Route {
    /// One of [`route_kind`].
    pub kind: u8,
    /// Bits of [`route_flags`].
    pub flags: u8,
    /// The next hop in `FE_PEERS`: the route's peer, or for a group route
    /// the group's active member (0 when none is alive).
    pub peer_id: u16,
    /// `peer_id` as the route names it: the group id of a group route.
    pub owner: u16,
}

impl Route {
    /// A `TUNNEL` route through a connector group.
    #[inline(always)]
    pub fn via_group(&self) -> bool {
        self.kind == route_kind::TUNNEL && self.flags & route_flags::VIA_GROUP != 0
    }

    /// A punched peer's route while the connector relays it: traffic goes
    /// to the connector group's active member.
    #[inline(always)]
    pub fn relayed(&self) -> bool {
        self.kind == route_kind::TUNNEL
            && self.flags & (route_flags::PUNCHED | route_flags::RELAYED)
                == route_flags::PUNCHED | route_flags::RELAYED
    }

    /// Whether the next hop is a group's active member (which the agent
    /// switches with one map write that no route changes with).
    #[inline(always)]
    pub fn through_group(&self) -> bool {
        self.via_group() || self.relayed()
    }

    /// A punched peer's route: the connectors relay for it.
    #[inline(always)]
    fn punched(&self) -> bool {
        self.kind == route_kind::TUNNEL && self.flags & route_flags::PUNCHED != 0
    }

    /// The tunnel peer this route sends to, or the drop reason when there
    /// is none: a group without a live member is `DropGroupDown`, not a
    /// configuration error.
    #[inline(always)]
    pub fn next_hop(&self) -> Result<&'static PeerEntry, Counter> {
        let missing = if self.through_group() {
            Counter::DropGroupDown
        } else {
            Counter::DropUnknownPeer
        };
        if self.peer_id == 0 && self.through_group() {
            return Err(missing);
        }
        peer(self.peer_id).ok_or(missing)
    }
}

/// Longest-prefix match of an IPv4 address (network order bytes), a group
/// route resolved to its active member (one array lookup, group routes only).
#[inline(always)]
pub fn route(addr: [u8; 4]) -> Option<Route> {
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(32, RouteAddr { addr });
    let entry: &RouteEntry = FE_ROUTES.get(&key)?;
    let mut r = Route {
        kind: entry.kind,
        flags: entry.flags,
        peer_id: entry.peer_id,
        owner: entry.peer_id,
    };
    if r.via_group() {
        r.peer_id = match group(r.owner) {
            Some(g) => g.active,
            None => 0,
        };
    } else if r.relayed() {
        r.peer_id = match group(CONNECTOR_GROUP) {
            Some(g) => g.active,
            None => 0,
        };
    }
    Some(r)
}

/// Group `id` of `FE_GROUPS`. Id 0 names no group.
#[inline(always)]
pub fn group(id: u16) -> Option<&'static GroupEntry> {
    if id == 0 {
        return None;
    }
    FE_GROUPS.get(id as u32)
}

/// Whether tunnel peer `sender` may send in the name of `r`'s prefix: the
/// route's own peer, or for a group route any member of the group (a
/// standby connector forwards for the group as well as the active one:
/// failover must not wait for both ends to agree). A punched peer's prefix
/// also comes relayed by any connector, whether we send to it directly or
/// not: its end may switch before or after ours.
#[inline(always)]
pub fn sent_by(r: &Route, sender: u16) -> bool {
    if !r.via_group() {
        return r.owner == sender
            || (r.punched()
                && sender != 0
                && matches!(group(CONNECTOR_GROUP), Some(g) if g.has_member(sender)));
    }
    match group(r.owner) {
        Some(g) => sender != 0 && g.has_member(sender),
        None => false,
    }
}

/// The peer at underlay address `addr` that may send in the name of `r`'s
/// prefix (the route's peer, or the group member there), if any: the
/// checks that know only the outer source of a tunnel packet.
#[inline(always)]
pub fn sender_at(r: &Route, addr: [u8; 4]) -> Option<u16> {
    if !r.via_group() {
        return match peer(r.owner) {
            Some(p) if p.underlay_ip == addr => Some(r.owner),
            _ if r.punched() => member_at(group(CONNECTOR_GROUP)?, addr),
            _ => None,
        };
    }
    member_at(group(r.owner)?, addr)
}

/// The member of `g` at underlay address `addr`.
#[inline(always)]
fn member_at(g: &GroupEntry, addr: [u8; 4]) -> Option<u16> {
    let mut i = 0;
    while i < MAX_GROUP_MEMBERS {
        let member = g.members[i];
        if member == 0 {
            return None;
        }
        if let Some(p) = peer(member) {
            if p.underlay_ip == addr {
                return Some(member);
            }
        }
        i += 1;
    }
    None
}

/// Whether `addr` is one of the connector group's shared VTEP addresses.
#[inline(always)]
pub fn is_vtep_addr(addr: [u8; 4]) -> bool {
    // SAFETY: the value is not read, only the key's presence.
    unsafe { FE_VTEP_ADDRS.get(&RouteAddr { addr }) }.is_some()
}

/// The peer behind `peer_id`, if that slot is in use.
#[inline(always)]
pub fn peer(peer_id: u16) -> Option<&'static PeerEntry> {
    match FE_PEERS.get(peer_id as u32) {
        Some(p) if p.kind != 0 => Some(p),
        _ => None,
    }
}

/// The address the pod behind bridge port `ifindex` may send from.
#[inline(always)]
pub fn pod_port(ifindex: u32) -> Option<[u8; 4]> {
    // SAFETY: plain data; a concurrent rewrite of the entry (a pod's new
    // address) at worst misjudges one packet.
    unsafe { FE_POD_PORTS.get(&ifindex) }.map(|p| p.addr)
}

/// The peers sending from underlay address `addr`, if any.
#[inline(always)]
pub fn peers_at(addr: [u8; 4]) -> Option<&'static PeerAddrEntry> {
    // SAFETY: the value is plain data; a concurrent update may tear it, which
    // at worst misjudges one packet while the agent rewrites the entry.
    unsafe { FE_PEER_ADDRS.get(&RouteAddr { addr }) }
}
