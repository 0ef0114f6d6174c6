//! ClusterIP Services on the agent side: `plan` (frontends, backend slots
//! and affinity from Services and EndpointSlices), `apply` (all-or-nothing
//! per Service, conntrack purge of removed backends), `ctgc` (conntrack
//! expiry) and `inspect` (`inspect services|backends|ct`). The kernel side
//! is `fabedge-ebpf/src/lb.rs`, `conntrack.rs`, `nat.rs`, `sock.rs`.

pub mod apply;
pub mod ctgc;
pub mod inspect;
pub mod plan;
#[cfg(test)]
pub(crate) mod random;
