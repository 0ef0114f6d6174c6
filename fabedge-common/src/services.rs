//! ClusterIP translation maps: `FE_SERVICES` (frontend → service id and
//! backend count), `FE_BACKENDS` (service id, slot → backend address) and
//! `FE_CT` (LRU conntrack: what a flow was translated to, both directions).
//!
//! Conntrack keeps two entries per flow, one per direction, each keyed by the
//! tuple as the packet carries it where it is looked up (client → VIP at
//! `fe_from_pod`; backend → client at `fe_to_pod`, or backend → ClusterIP at
//! `fe_from_pod` for local backends). Calico folds both directions into one
//! ordered key, which works because its NAT entry is separate; here the
//! translation *is* the conntrack, and one lookup per packet with no tuple
//! normalisation is what the programs can afford.

/// Default capacity of `FE_SERVICES` (frontends: VIP × port × protocol);
/// the agent's `--max-services` changes it at load time.
pub const MAX_SERVICES: u32 = 32_768;
/// Default capacity of `FE_BACKENDS` (sum of backends over all frontends):
/// 10 k Services of 10 endpoints fit. The agent's `--max-backends` changes
/// it at load time.
pub const MAX_BACKENDS: u32 = 131_072;
/// Default capacity of `FE_CT` (entries; two per flow). The agent's
/// `--ct-entries` flag changes it at load time.
pub const DEFAULT_CT_ENTRIES: u32 = 131_072;
/// Capacity of `FE_AFFINITY` (client IP × service id).
pub const MAX_AFFINITY: u32 = 65_536;

/// Key of `FE_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ServiceKey {
    /// ClusterIP, network order.
    pub addr: [u8; 4],
    /// Service port, host order.
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

pub mod service_flags {
    /// `sessionAffinity: ClientIP`: a client keeps its backend for `affinity_timeout` seconds.
    pub const AFFINITY: u8 = 1 << 0;
}

/// Value of `FE_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceEntry {
    /// Names the frontend's backends in `FE_BACKENDS`. Stable across applies.
    pub id: u32,
    /// Backends in slots `0..count`; 0 means reject (no endpoints).
    pub count: u16,
    /// Bits of [`service_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// Session affinity timeout, seconds.
    pub affinity_timeout: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 12);

/// Key of `FE_BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

pub mod backend_flags {
    /// The backend is a pod on this node: the client is also source-NATed (to
    /// the ClusterIP) so the reply comes back through `fe_from_pod`.
    pub const LOCAL: u8 = 1 << 0;
}

/// Value of `FE_BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// Network order.
    pub addr: [u8; 4],
    /// Target port, host order.
    pub port: u16,
    /// Bits of [`backend_flags`].
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// Key of `FE_CT`: a tuple as it appears on the wire where it is looked up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Host order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

pub mod ct_flags {
    /// Original direction (client → Service): rewrite the destination to
    /// `addr:port`, and with `SNAT` the source to `snat_addr:snat_port`.
    pub const FORWARD: u8 = 1 << 0;
    /// Reply direction: rewrite the source to `addr:port` (the Service), and
    /// with `SNAT` the destination to `snat_addr:snat_port` (the client).
    pub const REPLY: u8 = 1 << 1;
    /// The flow is also source-NATed (local backend, hairpin).
    pub const SNAT: u8 = 1 << 2;
    /// A FIN or RST was seen: the agent's GC expires the entry quickly.
    pub const CLOSING: u8 = 1 << 3;
    /// A TCP flow whose handshake completed (a reply was seen).
    pub const SEEN_REPLY: u8 = 1 << 4;
}

/// Value of `FE_CT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns()` of the last packet (CLOCK_MONOTONIC), for GC.
    pub last_seen_ns: u64,
    /// FORWARD: the backend; REPLY: the Service address.
    pub addr: [u8; 4],
    /// Host order.
    pub port: u16,
    /// Bits of [`ct_flags`].
    pub flags: u8,
    pub proto: u8,
    /// FORWARD: the source the client is rewritten to; REPLY: the client.
    pub snat_addr: [u8; 4],
    pub snat_port: u16,
    pub _pad: u16,
    /// The frontend the flow was balanced by (removed-backend cleanup).
    pub service_id: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

/// Key of `FE_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub client: [u8; 4],
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

/// Value of `FE_AFFINITY`: the backend a client stuck to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityEntry {
    pub last_seen_ns: u64,
    pub backend: Backend,
}
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);

/// Capacity of `FE_SOCK_REVNAT` (connected hostNetwork sockets to Services).
pub const MAX_SOCK_REVNAT: u32 = 65_536;

/// Key of `FE_SOCK_REVNAT`: a socket of a hostNetwork client and the backend
/// its connect/sendmsg was translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub backend: [u8; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

/// Value of `FE_SOCK_REVNAT`: the Service address the socket believes it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevEntry {
    pub addr: [u8; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevEntry>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: `repr(C)`, explicit padding, no pointers.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevEntry {}
}
