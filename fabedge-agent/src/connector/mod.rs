//! The connector's once-per-cluster duty in kube mode, done by the connector
//! that holds the Lease: leader election (`leader`), the Flannel lease and
//! pod-CIDR annotations on edge Nodes (`annotate`, which also lists every
//! API call the agent makes), and edge pod CIDR allocation (`ipam`).

pub mod annotate;
pub mod ipam;
pub mod leader;
