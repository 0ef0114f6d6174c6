//! Test harnesses shared by fabedge's datapath, network-namespace and VM tests.
//!
//! - [`agent`]: the real agent binary run inside a test namespace.
//! - [`apiserver`]: a real etcd + kube-apiserver on loopback (`cargo xtask setup` builds it).
//! - [`bench`]: the connector packet-rate benchmark and the figures' JSON keys.
//! - [`cluster`]: the mini cluster of the seed's test matrix (cloud, connector, edges, pods).
//! - [`kube_agent`]: one real agent in kube mode in its own namespace, read through `inspect`.
//! - [`fake_api`]: an in-test Kubernetes API server (list/watch, 410, PATCH, Leases).
//! - [`metrics`]: an agent's metrics and probes over HTTP, and a real Prometheus scraping it.
//! - [`datapath`]: the real object in a private bpffs root, run with `BPF_PROG_TEST_RUN`.
//! - [`encap`]: the tunnel encapsulation in the forwarding program, its FIB namespace and its cost.
//! - [`packet`]: builders and parsers for the frames we feed to `BPF_PROG_TEST_RUN`.
//! - [`livegen`]: a kernel packet generator (XDP live frames) and an in-datapath frame counter.
//! - [`netns`]: network namespaces, veths and bridges that always clean up.
//! - [`xdp`]: XDP programs under `BPF_PROG_TEST_RUN`, with a namespace for their FIB lookups.

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod cluster;
pub mod datapath;
pub mod encap;
pub mod fake_api;
pub mod kube_agent;
pub mod livegen;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod xdp;
