//! Test harnesses shared by fabedge's datapath, network-namespace and VM tests.
//!
//! - [`packet`]: builders and parsers for the frames we feed to `BPF_PROG_TEST_RUN`.
//! - [`netns`]: network namespaces, veths and bridges that always clean up.

pub mod netns;
pub mod packet;
