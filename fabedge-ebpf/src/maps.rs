//! Every map the programs use. Layouts come from `fabedge-common`; the agent
//! pins them under `/sys/fs/bpf/fabedge/v<LAYOUT_VERSION>/maps/`.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use fabedge_common::services::{
    AffinityEntry, AffinityKey, Backend, BackendKey, CtEntry, CtKey, DEFAULT_CT_ENTRIES,
    MAX_AFFINITY, MAX_BACKENDS, MAX_SERVICES, MAX_SOCK_REVNAT, ServiceEntry, ServiceKey,
    SockRevEntry, SockRevKey,
};
use fabedge_common::{
    DatapathConfig, MAX_PEERS, MAX_POD_PORTS, MAX_ROUTES, PeerAddrEntry, PeerEntry, PeerStats,
    PodPortEntry, RouteAddr, RouteEntry, counters::COUNTER_SLOTS,
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

/// Longest-prefix match of an IPv4 address (network order bytes).
#[inline(always)]
pub fn route(addr: [u8; 4]) -> Option<&'static RouteEntry> {
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(32, RouteAddr { addr });
    FE_ROUTES.get(&key)
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
