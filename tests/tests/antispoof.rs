//! Trust on the wire, in the mini cluster (plaintext tunnel mode, XDP off,
//! no fast path: every tunnel packet goes through the kernel's routes, as
//! in ESP mode). Fail closed: with one of our kernel routes deleted, pod,
//! host and forwarded traffic for a tunnel destination leaves no NIC in
//! clear (tcpdump on the switch), and `fe_uplink_egress` counts each one.
//! Anti-spoofing: a packet forged on an edge's LAN in the name of a cluster
//! address, and Flannel VXLAN from a node that is no VTEP or in the name of
//! an edge pod, reach no pod; counters show where they died. A pod sends
//! as no other pod and claims no other pod's address, on its bridge or
//! beyond (`fe_pod_port`). Needs root.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use fabedge_common::{Counter, DEFAULT_FLANNEL_PORT, POD_BRIDGE};
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

/// How long an agent may take to learn a new pod: one poll interval (1 s)
/// and a pass, with room for a loaded machine.
const LEARN_TIMEOUT: Duration = Duration::from_secs(10);
/// The kernel ignores an ARP that would change a neighbour entry updated
/// less than `locktime` (1 s by default) ago; older entries it overrides.
const NEIGHBOUR_LOCKTIME: Duration = Duration::from_secs(1);
const BROADCAST: Mac = [0xff; 6];

/// Waits until `node`'s agent guards the ports of pods `addrs`; returns how
/// long that took.
fn wait_until_guarded(cluster: &Cluster, node: &str, addrs: &[Ipv4Addr]) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let guarded = guarded_pods(cluster, node)?;
        if addrs.iter().all(|a| guarded.contains(a)) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < LEARN_TIMEOUT,
            "{node}: pods {addrs:?} not guarded within {LEARN_TIMEOUT:?} (FE_POD_PORTS holds \
             {guarded:?})\n{}",
            cluster.diagnostics(&[node.to_owned()])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pod addresses in `node`'s FE_POD_PORTS.
fn guarded_pods(cluster: &Cluster, node: &str) -> Result<Vec<Ipv4Addr>> {
    let maps = cluster.maps(node)?;
    let mut out = Vec::new();
    for entry in maps.pod_ports.iter() {
        out.push(Ipv4Addr::from(entry?.1.addr));
    }
    Ok(out)
}

/// `addr`'s neighbour entry on `dev` in `netns`: its MAC, and how long ago
/// it was last updated.
fn neighbour(netns: &Netns, dev: &str, addr: Ipv4Addr) -> Result<Option<(Mac, Duration)>> {
    let text = netns.ip(&["-s", "-j", "neigh", "show", &addr.to_string(), "dev", dev])?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let Some(entry) = json.get(0) else {
        return Ok(None);
    };
    let Some(lladdr) = entry["lladdr"].as_str() else {
        return Ok(None);
    };
    let updated = entry["updated"].as_u64().unwrap_or(0);
    Ok(Some((parse_mac(lladdr)?, Duration::from_secs(updated))))
}

/// Sends every forged ARP frame, then the control, from `wire`; returns
/// the forged frames each of `watchers` saw before the control reached it.
fn arps_seen(
    wire: &PacketSocket,
    watchers: &[(&str, &PacketSocket)],
    forged: &[(&str, Vec<u8>)],
    control: &[u8],
) -> Result<Vec<String>> {
    for (_, frame) in forged {
        wire.send(frame)?;
    }
    wire.send(control)?;
    let mut seen = Vec::new();
    for (at, socket) in watchers {
        let arrived = socket.recv_matching(DELIVERY_TIMEOUT, |frame| {
            for (what, sent) in forged {
                if frame.starts_with(sent) {
                    seen.push(format!("{what} at {at}"));
                }
            }
            frame.starts_with(control)
        })?;
        ensure!(
            arrived.is_some(),
            "the control ARP never reached {at}: the test's frames are wrong"
        );
    }
    Ok(seen)
}

#[test]
fn a_pod_sends_as_no_other_pod_nor_claims_its_address() -> Result<()> {
    with_cluster(|cluster| {
        let edge1 = cluster.node_netns("edge-1")?;
        let pod_a = cluster.pod("edge-1")?;
        let pod_b = cluster.add_pod("edge-1", "pod-b")?;
        let window = wait_until_guarded(cluster, "edge-1", &[pod_a.ip(), pod_b.ip()])?;
        println!(
            "edge-1: the new pod {} was guarded {window:?} after its CNI ADD returned \
             (unguarded until then)",
            pod_b.ip()
        );
        let remote = cluster.pod("edge-2")?;
        let (a_ip, b_ip) = (pod_a.ip(), pod_b.ip());
        let a_mac = mac_of(pod_a.netns(), "eth0")?;
        let b_mac = mac_of(pod_b.netns(), "eth0")?;
        let bridge_mac = mac_of(edge1, POD_BRIDGE)?;

        // The node knows pod B, long enough for an ARP to override it.
        let ping = cluster.node("edge-1")?.ping(b_ip, 1)?;
        ensure!(ping.all_received(), "the node cannot ping pod B: {ping:?}");
        let deadline = Instant::now() + LEARN_TIMEOUT;
        loop {
            match neighbour(edge1, POD_BRIDGE, b_ip)? {
                Some((mac, age)) if mac == b_mac && age > NEIGHBOUR_LOCKTIME => break,
                other => ensure!(
                    Instant::now() < deadline,
                    "the node's neighbour entry of pod B stays {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        let a_wire = PacketSocket::open(pod_a.netns(), "eth0")?;
        let at_b = PacketSocket::open(pod_b.netns(), "eth0")?;
        let at_remote = PacketSocket::open(remote.netns(), "eth0")?;
        let at_host = PacketSocket::open(edge1, POD_BRIDGE)?;
        let before = cluster.counter_value("edge-1", Counter::DropPodSpoofed)?;

        // Bridged to the neighbour: fe_from_pod never sees these.
        let to_b: Vec<(String, Vec<u8>)> = [
            ("as pod B to pod B", b_ip),
            ("as the edge-2 pod to pod B", remote.ip()),
        ]
        .into_iter()
        .map(|(what, src)| {
            let marker = format!("forged {what}");
            (marker.clone(), udp_frame(a_mac, b_mac, src, b_ip, &marker))
        })
        .collect();
        let control = "pod A to pod B";
        let seen = forged_seen(
            &a_wire,
            &at_b,
            &to_b,
            (control, udp_frame(a_mac, b_mac, a_ip, b_ip, control)),
        )?;
        ensure!(seen.is_empty(), "forged frames reached pod B: {seen:?}");

        // Routed into the tunnel: pod B's address is the node's own CIDR.
        let marker = "forged as pod B to the edge-2 pod";
        let to_remote = vec![(
            marker.to_owned(),
            udp_frame(a_mac, bridge_mac, b_ip, remote.ip(), marker),
        )];
        let control = "pod A to the edge-2 pod";
        let seen = forged_seen(
            &a_wire,
            &at_remote,
            &to_remote,
            (
                control,
                udp_frame(a_mac, bridge_mac, a_ip, remote.ip(), control),
            ),
        )?;
        ensure!(
            seen.is_empty(),
            "forged frames reached the edge-2 pod: {seen:?}"
        );

        // Claiming pod B's address on the bridge.
        let garp = |op| {
            Frame::eth(a_mac, BROADCAST)
                .arp(op, (a_mac, b_ip), (BROADCAST, b_ip))
                .build()
        };
        let forged_arps = [
            ("a gratuitous ARP request for pod B", garp(1)),
            ("a gratuitous ARP reply for pod B", garp(2)),
        ];
        let who_has_b = Frame::eth(a_mac, BROADCAST)
            .arp(1, (a_mac, a_ip), ([0; 6], b_ip))
            .build();
        let seen = arps_seen(
            &a_wire,
            &[("pod B", &at_b), ("the node", &at_host)],
            &forged_arps,
            &who_has_b,
        )?;
        ensure!(seen.is_empty(), "forged ARP arrived: {seen:?}");
        let entry = neighbour(edge1, POD_BRIDGE, b_ip)?.map(|(mac, _)| mac);
        ensure!(
            entry == Some(b_mac),
            "the node's neighbour entry of pod B changed to {entry:?} (pod B is {b_mac:?})"
        );

        let forged = to_b.len() + to_remote.len() + forged_arps.len();
        cluster.wait_for_count("edge-1", Counter::DropPodSpoofed, before, forged as u64)?;

        // A pod that goes away is let go: its entry leaves the map. (Our
        // socket in its namespace would keep the namespace, and its veth, alive.)
        drop(at_b);
        drop(pod_b);
        let deadline = Instant::now() + LEARN_TIMEOUT;
        while guarded_pods(cluster, "edge-1")?.contains(&b_ip) {
            ensure!(
                Instant::now() < deadline,
                "edge-1 still guards the deleted pod B ({b_ip})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(
            guarded_pods(cluster, "edge-1")?.contains(&a_ip),
            "edge-1 let go of pod A with pod B"
        );
        Ok(())
    })
}
