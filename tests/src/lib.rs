//! Test harnesses shared by fabedge's datapath, network-namespace and VM tests.
//!
//! - [`datapath`]: the real object in a private bpffs root, run with `BPF_PROG_TEST_RUN`.
//! - [`packet`]: builders and parsers for the frames we feed to `BPF_PROG_TEST_RUN`.
//! - [`netns`]: network namespaces, veths and bridges that always clean up.

pub mod datapath;
pub mod netns;
pub mod packet;
