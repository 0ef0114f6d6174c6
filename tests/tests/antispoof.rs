//! Trust on the wire, in the mini cluster (plaintext tunnel mode, XDP off,
//! no fast path: every tunnel packet goes through the kernel's routes, as
//! in ESP mode). Fail closed: with one of our kernel routes deleted, pod,
//! host and forwarded traffic for a tunnel destination leaves no NIC in
//! clear (tcpdump on the switch), and `fe_uplink_egress` counts each one.
//! Anti-spoofing: a packet forged on an edge's LAN in the name of a cluster
//! address, and Flannel VXLAN from a node that is no VTEP or in the name of
//! an edge pod, reach no pod; counters show where they died. Needs root.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, ensure};
use fabedge_common::{Counter, DEFAULT_FLANNEL_PORT};
use fabedge_tests::{
    cluster::{Cluster, ClusterOptions, SharedCluster},
    netns::{Netns, PacketSocket},
    packet::{Frame, Mac, parse_mac, vxlan_encap},
};

static CLUSTER: SharedCluster = SharedCluster::new();

extern "C" fn tear_down_cluster() {
    CLUSTER.tear_down();
}

fn with_cluster<R>(test: impl FnOnce(&Cluster) -> Result<R>) -> Result<R> {
    CLUSTER.with_options(
        || {
            let mut options = ClusterOptions::default();
            options.extra_agent_args.push("--no-fast-path".into());
            options
        },
        tear_down_cluster,
        test,
    )
}

/// A bound on a frame's trip through the kernel, for frames that must not arrive.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_PORT: u16 = 7;

/// A MAC address of `iface` in `netns`.
fn mac_of(netns: &Netns, iface: &str) -> Result<Mac> {
    let text = netns.ip(&["-j", "link", "show", iface])?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let address = json[0]["address"]
        .as_str()
        .with_context(|| format!("{iface} has no MAC: {text}"))?;
    parse_mac(address)
}

#[test]
fn with_a_route_of_ours_deleted_nothing_for_the_tunnel_leaves_in_clear() -> Result<()> {
    with_cluster(|cluster| cluster.prove_fail_closed())
}

/// A UDP datagram carrying `marker`, as an Ethernet frame from `src` to `dst`.
fn udp_frame(src_mac: Mac, dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr, marker: &str) -> Vec<u8> {
    Frame::eth(src_mac, dst_mac)
        .ipv4(src, dst)
        .udp(40000, PROBE_PORT)
        .payload(marker.as_bytes())
        .build()
}

/// Whether a frame carries `marker`.
fn carries(frame: &[u8], marker: &str) -> bool {
    frame.windows(marker.len()).any(|w| w == marker.as_bytes())
}

/// Sends every forged frame, then the control, into `wire`; returns the
/// forged markers seen in `pod` before the control arrived there.
fn forged_seen(
    wire: &PacketSocket,
    pod: &PacketSocket,
    forged: &[(String, Vec<u8>)],
    control: (&str, Vec<u8>),
) -> Result<Vec<String>> {
    for (_, frame) in forged {
        wire.send(frame)?;
    }
    wire.send(&control.1)?;
    let mut seen = Vec::new();
    let arrived = pod.recv_matching(DELIVERY_TIMEOUT, |frame| {
        for (marker, _) in forged {
            if carries(frame, marker) {
                seen.push(marker.clone());
            }
        }
        carries(frame, control.0)
    })?;
    ensure!(
        arrived.is_some(),
        "the control frame {:?} never reached the pod: the test's frames are wrong",
        control.0
    );
    Ok(seen)
}

const LAN_HOST_MAC: Mac = [0x02, 0, 0, 0, 0, 0x77];

#[test]
fn packets_forged_on_an_edges_lan_in_a_cluster_name_reach_no_pod() -> Result<()> {
    with_cluster(|cluster| {
        let edge1 = cluster.node_netns("edge-1")?;
        let edge1_mac = mac_of(edge1, "eth-wan")?;
        let pod = cluster.pod("edge-1")?;
        let pod_socket = PacketSocket::open(pod.netns(), "eth0")?;
        let wire = PacketSocket::open(cluster.switch()?, &cluster.wan_port("edge-1")?)?;
        let forged: Vec<(String, Vec<u8>)> = [
            ("a cloud pod", cluster.pod("cloud-2")?.ip()),
            ("a community peer's pod", cluster.pod("edge-2")?.ip()),
            ("a Service", Ipv4Addr::new(10, 96, 0, 10)),
            ("the connector's node address", Ipv4Addr::new(10, 1, 0, 1)),
        ]
        .into_iter()
        .map(|(what, src)| {
            let marker = format!("forged as {what}");
            let frame = udp_frame(LAN_HOST_MAC, edge1_mac, src, pod.ip(), &marker);
            (marker, frame)
        })
        .collect();
        let control = "from a LAN host";
        let control_frame = udp_frame(
            LAN_HOST_MAC,
            edge1_mac,
            Ipv4Addr::new(198, 18, 0, 77),
            pod.ip(),
            control,
        );
        let before = cluster.counter_value("edge-1", Counter::DropTunnelSourceOutsideTunnel)?;
        let seen = forged_seen(&wire, &pod_socket, &forged, (control, control_frame))?;
        ensure!(
            seen.is_empty(),
            "forged frames reached the edge-1 pod: {seen:?}"
        );
        cluster.wait_for_count(
            "edge-1",
            Counter::DropTunnelSourceOutsideTunnel,
            before,
            forged.len() as u64,
        )
    })
}

#[test]
fn flannel_vxlan_from_a_stranger_or_in_an_edges_name_reaches_no_pod() -> Result<()> {
    with_cluster(|cluster| {
        let connector = cluster.node_netns("cloud-1")?;
        let connector_mac = mac_of(connector, "eth-lan")?;
        let flannel_mac = mac_of(connector, "flannel.1")?;
        let edge_pod = cluster.pod("edge-1")?;
        let pod_socket = PacketSocket::open(edge_pod.netns(), "eth0")?;
        let wire = PacketSocket::open(cluster.switch()?, "cloud-1-lan")?;
        let cloud2_pod = cluster.pod("cloud-2")?.ip();
        let flannel = |outer_src: Ipv4Addr, inner_src: Ipv4Addr, marker: &str| {
            let inner = udp_frame(LAN_HOST_MAC, flannel_mac, inner_src, edge_pod.ip(), marker);
            vxlan_encap(
                Frame::eth(LAN_HOST_MAC, connector_mac),
                outer_src,
                Ipv4Addr::new(10, 1, 0, 1),
                41234,
                DEFAULT_FLANNEL_PORT,
                1,
                &inner,
            )
        };
        let cloud2 = Ipv4Addr::new(10, 1, 0, 2);
        let forged: Vec<(String, Vec<u8>)> = [
            (
                "from a node that is no VTEP",
                Ipv4Addr::new(10, 1, 0, 77),
                cloud2_pod,
            ),
            (
                "from a VTEP as an edge pod",
                cloud2,
                cluster.pod("edge-2")?.ip(),
            ),
        ]
        .into_iter()
        .map(|(what, outer, inner)| {
            let marker = format!("flannel {what}");
            let frame = flannel(outer, inner, &marker);
            (marker, frame)
        })
        .collect();
        let control = "flannel from cloud-2";
        let before = cluster.counter_value("cloud-1", Counter::DropSpoofed)?;
        let seen = forged_seen(
            &wire,
            &pod_socket,
            &forged,
            (control, flannel(cloud2, cloud2_pod, control)),
        )?;
        ensure!(
            seen.is_empty(),
            "forged Flannel frames reached the edge-1 pod: {seen:?}"
        );
        cluster.wait_for_count("cloud-1", Counter::DropSpoofed, before, forged.len() as u64)
    })
}
