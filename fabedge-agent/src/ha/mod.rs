//! Connector high availability, the agent's side: which connector serves
//! an edge and who succeeds it (`order`), whether connectors are alive
//! (`liveness`, fed by the `probe` socket), and the shared VTEP addresses
//! a live connector holds for dead ones (`vtep`). The datapath answers the
//! probes and switches a group's active member; these decide what it is.
//!
//! How the run loop uses them:
//! - an edge probes its connectors ([`probe::Prober`], targets at
//!   `DEFAULT_PROBE_PORT`), and on each [`probe::ProberHandle::changes`]
//!   (and each tick) writes `FE_GROUPS[CONNECTOR_GROUP].active` from
//!   `choose(&failover_order(edge, connectors), current)`;
//! - a connector probes the other connectors, and holds
//!   [`vtep::holders`] of the ones it sees up: it claims what is missing
//!   from [`vtep::held`] and releases what is no longer its to hold.

pub mod liveness;
pub mod order;
pub mod probe;
pub mod vtep;
