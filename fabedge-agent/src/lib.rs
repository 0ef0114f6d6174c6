//! The fabedge node agent. Data flows through the modules in this order:
//! sources → model → plan → apply, with `inspect` reading what was applied.
//! The kernel side's lifecycle (load, pin, attach, uninstall) is `datapath`.

pub mod annotate;
pub mod apply;
pub mod ctgc;
pub mod datapath;
pub mod inspect;
pub mod inspect_services;
pub mod ipam;
pub mod keys;
pub mod leader;
pub mod maps;
pub mod model;
pub mod natt;
pub mod plan;
pub mod run;
pub mod snapshot;
pub mod source;
pub mod sys;
pub mod xfrm;
