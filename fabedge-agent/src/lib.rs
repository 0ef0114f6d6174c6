//! The fabedge node agent. Data flows through the modules in this order:
//! sources → model → plan → apply, with `inspect` and `observe` (metrics,
//! probes) reading what was applied.
//! The kernel side's lifecycle (load, pin, attach, uninstall) is `datapath`.
//! Three concerns have a folder each, holding their own plan/apply/run
//! pieces: `esp` (encryption and NAT traversal), `services` (ClusterIP) and
//! `connector` (the elected connector's cluster-wide duty). `ha` holds the
//! connector-group pieces (assignment, liveness probes, shared VTEPs).

pub mod apply;
pub mod connector;
pub mod datapath;
pub mod esp;
pub mod ha;
pub mod inspect;
pub mod maps;
pub mod model;
pub mod observe;
pub mod plan;
pub mod run;
pub mod services;
pub mod source;
pub mod sys;
