//! The fabedge node agent. Data flows through the modules in this order:
//! sources → model → plan → apply, with `inspect` reading what was applied.
//! The kernel side's lifecycle (load, pin, attach, uninstall) is `datapath`.

pub mod apply;
pub mod connector;
pub mod datapath;
pub mod esp;
pub mod inspect;
pub mod maps;
pub mod model;
pub mod plan;
pub mod run;
pub mod services;
pub mod source;
pub mod sys;
