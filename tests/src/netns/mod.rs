//! Network namespaces for tests: the nodes and pods of a mini cluster on one machine.
//!
//! Every namespace a test creates is named `fe-t<pid>-<seq>-<name>` and is deleted, with
//! every process inside it, when its [`Netns`] is dropped — also when the test panics.
//! Links are created directly inside their namespaces, so nothing is ever added to the
//! host's own namespace. [`cleanup_stale`] removes what a killed test run left behind,
//! and runs once by itself before the first namespace of a process is created.
//!
//! ```no_run
//! use std::time::Duration;
//! use fabedge_tests::netns::{Netns, ping, veth_pair};
//!
//! let pod = Netns::new("pod")?;
//! let node = Netns::new("node")?;
//! veth_pair(&pod, "eth0", &node, "veth-pod")?;
//! pod.add_addr("eth0", "10.244.1.2/24")?;
//! node.add_addr("veth-pod", "10.244.1.1/24")?;
//! let result = ping(&pod, "10.244.1.1".parse()?, 3, Duration::from_millis(200))?;
//! assert!(result.all_received(), "{result:?}");
//! # anyhow::Ok(())
//! ```
//!
//! Sockets and aya need the calling thread inside the namespace: [`Netns::enter`] runs a
//! closure on a fresh thread that has joined it. A socket keeps working after the thread
//! ends, because a socket belongs to the namespace it was created in.

mod capture;
mod cleanup;
mod commands;
mod links;
mod namespace;
mod ping;
mod process;
mod servers;
mod tcpdump;
#[cfg(test)]
mod tests;

pub use capture::PacketSocket;
pub use cleanup::{cleanup_stale, list_netns};
pub use links::{NextHop, veth_pair};
pub use namespace::Netns;
pub use ping::{PingOptions, PingResult, parse_ping_output, ping, ping_with};
pub use process::BackgroundProcess;
pub use servers::{EchoServer, Tcp, TcpEchoServer, Udp, UdpEchoServer, tcp_echo, udp_echo};
pub use tcpdump::Tcpdump;

use std::sync::Once;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Every namespace the harness creates starts with this, followed by the creating pid.
pub const NETNS_PREFIX: &str = "fe-t";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Longest interface name Linux accepts (IFNAMSIZ 16 includes the NUL).
const IFNAME_MAX_LEN: usize = 15;
/// No single helper command may take longer than this; a hung one fails the test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often background echo servers look up from a blocking call to see if they should stop.
const SERVER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a UDP echo client waits for a reply before sending the request again.
const UDP_RESEND_INTERVAL: Duration = Duration::from_millis(250);

static NEXT_SEQUENCE: AtomicU64 = AtomicU64::new(0);
static STALE_CLEANUP: Once = Once::new();
