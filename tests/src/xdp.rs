//! XDP under `BPF_PROG_TEST_RUN`: the uplink program run on a crafted frame
//! (the kernel returns the frame as the program left it), inside a small
//! namespace whose routes and neighbours `bpf_fib_lookup` consults; and what
//! the mini cluster needs to run with `--xdp native` (a wire XDP can use, the
//! seed matrix's proofs for XDP).

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions};
use fabedge_common::{Counter, DEFAULT_TUNNEL_PORT, tunnel_mode};

use crate::{
    cluster::{Cluster, PathSpec, Proof, seed_matrix},
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
        netns.set_sysctl("net.ipv4.ip_forward", "1")?;
        let lan_ifindex = netns.ifindex("lan0")?;
        let wan_ifindex = netns.ifindex("wan0")?;
        let lab = FibLab {
            netns,
            lan_ifindex,
            wan_ifindex,
        };
        lab.neighbour("10.1.0.2", fixtures::CLOUD2_NIC_MAC, "lan0")?;
        lab.neighbour("198.18.0.11", EDGE1_NIC_MAC, "wan0")?;
        Ok(lab)
    }

    /// A permanent neighbour entry, replacing whatever `addr` had.
    pub fn neighbour(&self, addr: &str, mac: [u8; 6], dev: &str) -> Result<()> {
        let lladdr = crate::packet::format_mac(&mac);
        self.netns.ip(&[
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
        Ok(())
    }
}

/// Keep the calling thread on one CPU: the XDP verdict cache is per CPU,
/// and a test run executes on the CPU of its caller, so a test that wants
/// its second frame to meet the first one's entry must not migrate.
pub fn stay_on_one_cpu() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET fills one bit.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
    // SAFETY: `cpu` is below CPU_SETSIZE (a CPU this thread runs on).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    ensure!(
        rc == 0,
        "pinning the test thread to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The connector of [`fixtures::connector`] with what XDP needs on top:
/// its tunnel port and the peer address index.
pub fn connector(name: &str) -> Result<TestDatapath> {
    let mut dp = fixtures::connector(name)?;
    let mut config = dp.maps.config()?;
    config.tunnel_port = DEFAULT_TUNNEL_PORT;
    dp.maps.set_config(config)?;
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
    Ok(dp)
}

pub use fixtures::{sync_peer_addrs, sync_peer_addrs_and_esp_senders};

pub use fixtures::flannel_to_connector;

/// Our VXLAN from `outer_src` to `outer_dst` over the WAN (from edge-1's
/// NIC to the connector's), carrying `inner`.
pub fn tunnel_frame(outer_src: Ipv4Addr, outer_dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    crate::packet::vxlan_encap(
        crate::packet::Frame::eth(EDGE1_NIC_MAC, CONNECTOR_WAN_MAC),
        outer_src,
        outer_dst,
        50000,
        DEFAULT_TUNNEL_PORT,
        fabedge_common::DEFAULT_TUNNEL_VNI,
        inner,
    )
}

// ---------------------------------------------------------------------------
// The mini cluster with XDP
// ---------------------------------------------------------------------------

/// The seed matrix's proofs with the connector's masquerade done by XDP:
/// where TC's Flannel counters had to move, XDP's must.
pub fn xdp_seed_matrix() -> Vec<PathSpec> {
    seed_matrix()
        .into_iter()
        .map(|mut path| {
            for proof in &mut path.proofs {
                if let Proof::Counted { counter, .. } = proof {
                    *counter = match *counter {
                        Counter::FlannelDecap => Counter::XdpFlannelToTunnel,
                        Counter::FlannelEncap => Counter::XdpTunnelToFlannel,
                        other => other,
                    };
                }
            }
            path
        })
        .collect()
}

/// What a physical wire gives XDP and veths do not by themselves:
/// - native XDP on a veth sends what it transmits or redirects to the peer
///   veth, which takes such frames on its ring only with NAPI running there
///   (GRO on) and wakes for XDP_TX only when it has an XDP program itself:
///   the switch's WAN ports get one that passes everything;
/// - a veth passes checksum work along unfinished (CHECKSUM_PARTIAL rides
///   in the skb, not on the wire), which a frame rewritten by XDP loses:
///   the nodes' NICs finish checksums before sending (tx offload off), as
///   every frame on a real wire is finished.
pub fn make_the_wire_real(cluster: &Cluster) -> Result<()> {
    let links = |netns: &Netns| -> Result<Vec<String>> {
        Ok(netns
            .ip(&["-o", "link", "show"])?
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect())
    };
    // XDP_TX on a veth queues the frame on its peer's ring, and the kernel
    // (veth_xdp_flush, 6.1 and 6.12) wakes the peer only when the peer has
    // an XDP program: with GRO alone (NAPI without a program) the frames
    // waited for the next packet the peer's stack sent and overflowed the
    // ring (6.1's VM lost hundreds per seed path, rx_queue_0_xdp_tx_errors).
    // A real NIC sends them at once. Redirects into a veth wake its peer
    // themselves, so only the WAN ports, where XDP bounces frames (the
    // connector's edge-to-edge hairpin, probe replies), get the program;
    // every port keeps GRO for NAPI.
    let switch = cluster.switch()?;
    let pass = XdpPass::load("wire")?;
    for port in links(switch)? {
        if port.starts_with("br-") || !(port.ends_with("-wan") || port.ends_with("-lan")) {
            continue;
        }
        switch.run_ok("ethtool", &["-K", &port, "gro", "on"])?;
        if port.ends_with("-wan") {
            // From a thread in the namespace, not `ip -n`: that remounts
            // /sys, hiding the pin in bpffs.
            let pin = pass.pin()?;
            let out = switch.enter(|| {
                std::process::Command::new("ip")
                    .args(["link", "set", "dev", &port, "xdpdrv", "pinned", pin])
                    .output()
                    .context("running ip link set xdpdrv")
            })?;
            ensure!(
                out.status.success(),
                "attaching XDP_PASS to the switch's {port}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for node in cluster.node_names() {
        let netns = cluster.node_netns(&node)?;
        for nic in links(netns)? {
            if nic == "eth-wan" || nic == "eth-lan" {
                netns.run_ok("ethtool", &["-K", &nic, "tx", "off"])?;
            }
        }
    }
    Ok(())
}

/// The UDP payload of a liveness probe request (`fabedge_common::probe::ProbeHeader`,
/// spelled out byte by byte).
pub fn probe_request() -> Vec<u8> {
    let mut out = b"feP1".to_vec();
    out.extend([fabedge_common::probe::REQUEST, 0, 0, 0]);
    out.extend(1u32.to_be_bytes());
    out.extend([0; 4]);
    out.extend(*b"sixteen-by-token");
    out
}

/// One XDP verdict's per-packet cost against `fe_xdp_empty`.
#[derive(Debug, Clone)]
pub struct VerdictCost {
    /// Stable key: `xdp.verdict_ns_ratio_vs_empty.<key>`.
    pub key: &'static str,
    pub what: &'static str,
    pub ns: f64,
    pub ratio_vs_empty: f64,
}

/// Per-packet kernel time of each `fe_xdp_uplink` verdict and of the empty
/// program on the same frame, in one process and namespace: the median of
/// `samples` single runs, each on a fresh copy of the frame (a rewrite never
/// runs again on its own output). The empty program is sampled between the
/// cases' samples so both see the same machine load.
pub fn verdict_costs(samples: usize) -> Result<Vec<VerdictCost>> {
    use crate::packet::Frame;
    use fabedge_common::{TUNNEL_DEV_MAC, TUNNEL_SRC_MAC};
    use fixtures::*;

    let lab = FibLab::new("xdp-bench")?;
    lab.netns.enter(|| {
        // Every sample of a case on the CPU whose cache slot it filled.
        stay_on_one_cpu()?;
        let mut dp = crate::xdp::connector("xdp-bench")?;
        let mut config = dp.maps.config()?;
        config.probe_port = fabedge_common::DEFAULT_PROBE_PORT;
        dp.maps.set_config(config)?;
        let inner = |src_mac, dst_mac, src: Ipv4Addr, dst: Ipv4Addr| {
            Frame::eth(src_mac, dst_mac)
                .ipv4(src, dst)
                .udp(5353, 53)
                .payload(&[0u8; 64])
                .build()
        };
        let edge1 = Ipv4Addr::new(198, 18, 0, 11);
        let cases: Vec<(&'static str, &'static str, Vec<u8>, u32, u32)> = vec![
            (
                "flannel_to_tunnel",
                "Flannel → our tunnel (rewrite, FIB, redirect)",
                flannel_to_connector(
                    CLOUD2_LAN,
                    &inner(CLOUD2_VTEP_MAC, FLANNEL_MAC, CLOUD_POD, LOCAL_POD),
                ),
                lab.lan_ifindex,
                XDP_REDIRECT,
            ),
            (
                "tunnel_to_flannel",
                "our tunnel → Flannel (rewrite, FIB, redirect)",
                tunnel_frame(
                    edge1,
                    CONNECTOR_WAN,
                    &inner(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, LOCAL_POD, CLOUD_POD),
                ),
                lab.wan_ifindex,
                XDP_REDIRECT,
            ),
            (
                "pass_flannel_cloud_pod",
                "Flannel for a cloud pod (guard, pass)",
                flannel_to_connector(
                    CLOUD2_LAN,
                    &inner(
                        CLOUD2_VTEP_MAC,
                        FLANNEL_MAC,
                        CLOUD_POD,
                        Ipv4Addr::new(10, 244, 0, 5),
                    ),
                ),
                lab.lan_ifindex,
                XDP_PASS,
            ),
            (
                "drop_unknown_tunnel_source",
                "tunnel from a stranger (drop)",
                tunnel_frame(
                    Ipv4Addr::new(198, 18, 0, 77),
                    CONNECTOR_WAN,
                    &inner(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, LOCAL_POD, CLOUD_POD),
                ),
                lab.wan_ifindex,
                XDP_DROP,
            ),
            (
                "drop_spoofed",
                "tunnel with a spoofed inner source (drop)",
                tunnel_frame(
                    edge1,
                    CONNECTOR_WAN,
                    &inner(TUNNEL_SRC_MAC, TUNNEL_DEV_MAC, CLOUD_POD, LOCAL_POD_2),
                ),
                lab.wan_ifindex,
                XDP_DROP,
            ),
            (
                "probe_answered",
                "liveness probe from a peer (reflect, XDP_TX)",
                Frame::eth(EDGE1_NIC_MAC, CONNECTOR_WAN_MAC)
                    .ipv4(edge1, Ipv4Addr::from(CONNECTOR_LAN))
                    .udp(40001, fabedge_common::DEFAULT_PROBE_PORT)
                    .payload(&probe_request())
                    .build(),
                lab.wan_ifindex,
                XDP_TX,
            ),
            (
                "pass_not_tunnel",
                "plain UDP, not a tunnel port (pass)",
                Frame::eth(CLOUD2_NIC_MAC, UPLINK_MAC)
                    .ipv4(Ipv4Addr::from(CLOUD2_LAN), LOCAL_POD)
                    .udp(1, 2)
                    .payload(&[0u8; 64])
                    .build(),
                lab.lan_ifindex,
                XDP_PASS,
            ),
        ];
        // The verdict cache's misses: the same frames with the cache's
        // epoch renewed before every run, so each one takes the full path.
        let uncached: Vec<_> = cases
            .iter()
            .filter_map(|(key, _, frame, ifindex, verdict)| {
                let (key, what) = match *key {
                    "flannel_to_tunnel" => (
                        "flannel_to_tunnel_uncached",
                        "Flannel → our tunnel, cache miss (full path)",
                    ),
                    "tunnel_to_flannel" => (
                        "tunnel_to_flannel_uncached",
                        "our tunnel → Flannel, cache miss (full path)",
                    ),
                    "pass_flannel_cloud_pod" => (
                        "pass_flannel_cloud_pod_uncached",
                        "Flannel for a cloud pod, cache miss (full path)",
                    ),
                    "drop_spoofed" => (
                        "drop_spoofed_uncached",
                        "spoofed inner source, cache miss (full path)",
                    ),
                    _ => return None,
                };
                Some((key, what, frame.clone(), *ifindex, *verdict, true))
            })
            .collect();
        let cases: Vec<_> = cases
            .into_iter()
            .map(|(key, what, frame, ifindex, verdict)| (key, what, frame, ifindex, verdict, false))
            .chain(uncached)
            .collect();
        let mut out = Vec::new();
        for (key, what, frame, ifindex, verdict, miss) in cases {
            // Measure the path the case names, not another one.
            let before = dp.counters();
            let action = run_xdp(&dp, XDP_UPLINK, &frame, ifindex)?.action;
            if action != verdict {
                let moved: Vec<String> = before
                    .iter()
                    .zip(dp.counters())
                    .filter(|((_, b), (_, a))| a != b)
                    .map(|((c, _), _)| c.name().to_owned())
                    .collect();
                bail!(
                    "bench case {key}: fe_xdp_uplink returned {action}, expected {verdict} \
                     (counted: {moved:?})"
                );
            }
            let mut case = Vec::with_capacity(samples);
            let mut empty = Vec::with_capacity(samples);
            for _ in 0..samples {
                if miss {
                    dp.maps
                        .xdp_epoch
                        .as_mut()
                        .context("the datapath has no FE_XDP_GEN")?
                        .renew()?;
                }
                case.push(time_xdp_once(&dp, XDP_UPLINK, &frame, ifindex)?);
                empty.push(time_xdp_once(&dp, XDP_EMPTY, &frame, ifindex)?);
            }
            case.sort();
            empty.sort();
            let ns = case[samples / 2].as_nanos() as f64;
            let base = (empty[samples / 2].as_nanos() as f64).max(1.0);
            out.push(VerdictCost {
                key,
                what,
                ns,
                ratio_vs_empty: ns / base,
            });
        }
        Ok(out)
    })
}

/// Turn on XDP delivery into pods (`--xdp-pod-rx`) on `dp` and learn `pod`
/// behind `veth` (any veth of the test's namespace: test runs redirect
/// nowhere).
pub fn learn_pod(
    dp: &mut TestDatapath,
    veth: u32,
    pod: Ipv4Addr,
    macs: ([u8; 6], [u8; 6]),
    mtu: u16,
) -> Result<()> {
    let mut config = dp.maps.config()?;
    config.flags |= fabedge_common::config_flags::XDP_POD_RX;
    dp.maps.set_config(config)?;
    dp.maps.pod_devs.insert(veth, veth, None, 0)?;
    let (pod_mac, bridge_mac) = macs;
    dp.maps.local_pods.insert(
        fabedge_common::RouteAddr { addr: pod.octets() },
        fabedge_common::LocalPodEntry {
            ifindex: veth,
            pod_mac,
            bridge_mac,
            mtu,
            _pad: [0; 2],
        },
        0,
    )?;
    Ok(())
}

/// Drop counters of every link the mini cluster wired (the switch, each
/// node, each node's pod), keyed `namespace/link/rx_dropped|tx_dropped`:
/// a veth counts there what XDP failed to send out of it too
/// (`rx_queue_0_xdp_tx_errors` in `ethtool -S`, and its peer's rx). One `ip`
/// per namespace: under TCG every process costs.
pub fn link_drops(cluster: &Cluster) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut namespaces: Vec<(String, &Netns)> = vec![("switch".into(), cluster.switch()?)];
    for node in cluster.node_names() {
        namespaces.push((node.clone(), cluster.node_netns(&node)?));
        if let Ok(pod) = cluster.pod(&node) {
            namespaces.push((format!("{node}-pod"), pod.netns()));
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for (label, netns) in namespaces {
        let links: serde_json::Value = serde_json::from_str(&netns.ip(&["-j", "-s", "link"])?)
            .context("parsing `ip -j -s link`")?;
        for link in links.as_array().into_iter().flatten() {
            let Some(name) = link["ifname"].as_str() else {
                continue;
            };
            for dir in ["rx", "tx"] {
                if let Some(n) = link["stats64"][dir]["dropped"].as_u64() {
                    out.insert(format!("{label}/{name}/{dir}_dropped"), n);
                }
            }
        }
    }
    Ok(out)
}

/// The counters of [`link_drops`] that grew from `before` to `after`.
pub fn grown_drops(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let grown: Vec<String> = after
        .iter()
        .filter_map(|(key, n)| {
            let was = before.get(key).copied().unwrap_or(0);
            (*n > was).then(|| format!("{key} +{}", n - was))
        })
        .collect();
    if grown.is_empty() {
        "no link counted a drop or an error".to_string()
    } else {
        grown.join(", ")
    }
}

/// An XDP program that passes every frame (`r0 = XDP_PASS; exit`), loaded
/// with the bpf syscall and pinned in bpffs for `ip link set ... xdp pinned`;
/// the pin is removed on drop (attachments keep the program).
pub struct XdpPass {
    path: std::path::PathBuf,
}

impl XdpPass {
    pub fn load(name: &str) -> Result<Self> {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_OBJ_PIN: libc::c_long = 6;
        const BPF_PROG_TYPE_XDP: u32 = 6;
        // mov64 r0, XDP_PASS; exit
        let insns: [u8; 16] = [
            0xb7,
            0,
            0,
            0,
            XDP_PASS as u8,
            0,
            0,
            0,
            0x95,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..60].copy_from_slice(b"fe_wire_pass");
        // SAFETY: attr is a zeroed bpf_attr for BPF_PROG_LOAD whose pointers
        // (insns, license) outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("loading an XDP_PASS program");
        }
        let fd = fd as libc::c_int;
        // One pin per load: tests of one process wire clusters at once, and
        // each one's drop removes only its own.
        static LOADS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let load = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/fabedge-test-pass-{name}-{}-{load}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        let mut attr = [0u8; 128];
        attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
        attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
        // SAFETY: as above, for BPF_OBJ_PIN; fd is ours and closed right after.
        let pinned =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
        let error = std::io::Error::last_os_error();
        // SAFETY: fd was returned by BPF_PROG_LOAD above and is closed once.
        unsafe { libc::close(fd) };
        if pinned < 0 {
            return Err(error)
                .with_context(|| format!("pinning the XDP_PASS program at {}", path.display()));
        }
        Ok(XdpPass { path })
    }

    pub fn pin(&self) -> Result<&str> {
        self.path.to_str().context("bpffs path")
    }
}

impl Drop for XdpPass {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
