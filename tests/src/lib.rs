//! Test harnesses shared by fabedge's datapath, network-namespace and VM tests.
//!
//! - [`agent`]: the real agent binary run inside a test namespace.
//! - [`apiserver`]: a real etcd + kube-apiserver on loopback (`cargo xtask setup` builds it).
//! - [`cluster`]: the mini cluster of the seed's test matrix (cloud, connector, edges, pods).
//! - [`fake_api`]: an in-test Kubernetes API server (list/watch, 410, PATCH, Leases).
//! - [`datapath`]: the real object in a private bpffs root, run with `BPF_PROG_TEST_RUN`.
//! - [`packet`]: builders and parsers for the frames we feed to `BPF_PROG_TEST_RUN`.
//! - [`netns`]: network namespaces, veths and bridges that always clean up.

pub mod agent;
pub mod apiserver;
pub mod cluster;
pub mod datapath;
pub mod fake_api;
pub mod netns;
pub mod packet;
