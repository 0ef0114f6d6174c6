//! Connector high availability, the agent's side: which connector serves
//! an edge and who succeeds it (`order`), whether connectors are alive
//! (`liveness`, fed by the `probe` socket), and the shared VTEP addresses
//! a live connector holds for dead ones (`vtep`). The datapath answers the
//! probes and switches a group's active member; these decide what it is.

pub mod liveness;
pub mod order;
pub mod probe;
pub mod vtep;
