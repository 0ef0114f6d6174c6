//! XDP under `BPF_PROG_TEST_RUN`: the uplink program run on a crafted frame
//! (the kernel returns the frame as the program left it), inside a small
//! namespace whose routes and neighbours `bpf_fib_lookup` consults.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use fabedge_common::{DEFAULT_TUNNEL_PORT, tunnel_mode};

use crate::{
    datapath::{TestDatapath, fixtures},
    netns::Netns,
    packet::Mac,
};

pub use fabedge_agent::datapath::xdp::{XDP_EMPTY, XDP_UPLINK};

/// `enum xdp_action`.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Size of `struct xdp_md` and the offsets of the fields we set.
const XDP_MD_SIZE: usize = 24;
const XDP_MD_DATA_END: usize = 4;
const XDP_MD_INGRESS_IFINDEX: usize = 12;

/// What the program did with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpOutcome {
    pub action: u32,
    /// The frame as the program left it.
    pub data: Vec<u8>,
}

/// Run XDP program `symbol` on `frame` as if it arrived on `ingress_ifindex`
/// (0: loopback) of the calling thread's namespace.
pub fn run_xdp(
    dp: &TestDatapath,
    symbol: &str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<XdpOutcome> {
    let mut ctx = [0u8; XDP_MD_SIZE];
    ctx[XDP_MD_DATA_END..XDP_MD_DATA_END + 4].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[XDP_MD_INGRESS_IFINDEX..XDP_MD_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut data_out = vec![0u8; frame.len() + 256];
    let result = dp
        .datapath
        .xdp_program(symbol)?
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {symbol}"))?;
    if result.data_size_out as usize > data_out.len() {
        bail!(
            "program output of {} bytes did not fit the buffer",
            result.data_size_out
        );
    }
    data_out.truncate(result.data_size_out as usize);
    Ok(XdpOutcome {
        action: result.return_value,
        data: data_out,
    })
}

/// Kernel time of one run of `symbol` on a fresh copy of `frame`
/// (`repeat` 1: a rewriting program never sees its own output again).
pub fn time_xdp_once(
    dp: &TestDatapath,
    symbol: &str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<std::time::Duration> {
    let mut ctx = [0u8; XDP_MD_SIZE];
    ctx[XDP_MD_DATA_END..XDP_MD_DATA_END + 4].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[XDP_MD_INGRESS_IFINDEX..XDP_MD_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let result = dp
        .datapath
        .xdp_program(symbol)?
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {symbol}"))?;
    Ok(result.duration)
}

/// The connector's MAC on its WAN NIC, and the next hops' MACs.
pub const CONNECTOR_WAN_MAC: Mac = [0x52, 0x54, 0, 0, 1, 0x01];
pub const EDGE1_NIC_MAC: Mac = [0x52, 0x54, 0, 0, 1, 0x11];
/// The connector's address on the WAN: the source edges know it by.
pub const CONNECTOR_WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// An edge underlay address with a route but no neighbour entry.
pub const UNRESOLVED_EDGE: [u8; 4] = [198, 18, 0, 99];

/// The connector's two NICs as `bpf_fib_lookup` sees them: `lan0` (cloud
/// LAN, Flannel) and `wan0` (edges), each a veth with a permanent
/// neighbour for the next hop, forwarding on.
pub struct FibLab {
    pub netns: Netns,
    pub lan_ifindex: u32,
    pub wan_ifindex: u32,
}

impl FibLab {
    pub fn new(name: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        for (nic, peer, mac, cidr) in [
            ("lan0", "lan1", fixtures::UPLINK_MAC, "10.1.0.1/24"),
            ("wan0", "wan1", CONNECTOR_WAN_MAC, "198.18.0.1/24"),
        ] {
            netns.ip(&["link", "add", nic, "type", "veth", "peer", "name", peer])?;
            netns.set_mac(nic, mac)?;
            netns.add_addr(nic, cidr)?;
            netns.set_up(nic)?;
            netns.set_up(peer)?;
        }
        for (addr, mac, dev) in [
            ("10.1.0.2", fixtures::CLOUD2_NIC_MAC, "lan0"),
            ("198.18.0.11", EDGE1_NIC_MAC, "wan0"),
        ] {
            let lladdr = crate::packet::format_mac(&mac);
            netns.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &lladdr,
                "nud",
                "permanent",
                "dev",
                dev,
            ])?;
        }
        netns.set_sysctl("net.ipv4.ip_forward", "1")?;
        let lan_ifindex = netns.ifindex("lan0")?;
        let wan_ifindex = netns.ifindex("wan0")?;
        Ok(FibLab {
            netns,
            lan_ifindex,
            wan_ifindex,
        })
    }
}

/// The connector of [`fixtures::connector`] with what XDP needs on top:
/// its tunnel port and the peer address index.
pub fn connector(name: &str) -> Result<TestDatapath> {
    let mut dp = fixtures::connector(name)?;
    let mut config = dp.maps.config()?;
    config.tunnel_port = DEFAULT_TUNNEL_PORT;
    dp.maps.set_config(config)?;
    sync_peer_addrs(&mut dp)?;
    Ok(dp)
}

/// The edge of [`fixtures::edge`] with its tunnel port and peer address index.
pub fn edge(name: &str, mode: u8) -> Result<TestDatapath> {
    let mut dp = fixtures::edge(name, mode)?;
    let mut config = dp.maps.config()?;
    config.tunnel_port = if mode == tunnel_mode::VXLAN {
        DEFAULT_TUNNEL_PORT
    } else {
        0
    };
    dp.maps.set_config(config)?;
    sync_peer_addrs(&mut dp)?;
    Ok(dp)
}

/// Index every in-use peer slot by its underlay address, as apply does.
pub fn sync_peer_addrs(dp: &mut TestDatapath) -> Result<()> {
    let mut peers = std::collections::BTreeMap::new();
    for id in 1..64u16 {
        let peer = dp.maps.peer(id)?;
        if peer.kind != 0 {
            peers.insert(id, peer);
        }
    }
    dp.maps.sync_peer_addrs(&peers)?;
    Ok(())
}
