//! ClusterIP Services on the mini cluster (network namespaces, real
//! sockets): edge pods reach Services whose backends are local, on a
//! community peer and in the cloud; replies come from the Service address
//! (the clients' sockets are connected to it, so any other source would be
//! dropped by their kernels); a cloud pod reaches edge backends through
//! kube-proxy-like DNAT; a removed backend stops receiving flows. Needs root.
//!
//! One cluster serves every test of this binary, as in `forwarding.rs`.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_common::services::{ServiceKey, ct_flags};
use fabedge_tests::{
    cluster::{Cluster, ECHO_PORT, SharedCluster},
    netns::{tcp_echo, udp_echo},
};

static CLUSTER: SharedCluster = SharedCluster::new();

extern "C" fn tear_down_cluster() {
    CLUSTER.tear_down();
}

/// Runs `test` on the shared cluster, bringing it up first if needed.
fn with_cluster<R>(test: impl FnOnce(&Cluster) -> Result<R>) -> Result<R> {
    CLUSTER.with(tear_down_cluster, test)
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// A Service with a named TCP port and a UDP port, both to the echo port,
/// and an EndpointSlice naming `endpoints` (address, node, ready).
fn service_yaml(name: &str, vip: Ipv4Addr, endpoints: &[(Ipv4Addr, &str, bool)]) -> String {
    let mut yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {vip}\n  \
         ports:\n    - {{name: http, port: 80, protocol: TCP, targetPort: echo}}\n    - {{name: udp, port: 80, protocol: UDP, targetPort: {ECHO_PORT}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: default\n  \
         labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - {{name: http, port: {ECHO_PORT}, protocol: TCP}}\n  \
         - {{name: udp, port: {ECHO_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    if endpoints.is_empty() {
        yaml.push_str("  []\n");
    }
    for (ip, node, ready) in endpoints {
        yaml.push_str(&format!(
            "  - addresses: [{ip}]\n    conditions: {{ready: {ready}}}\n    nodeName: {node}\n"
        ));
    }
    yaml
}

/// Replace (or add) the documents between `# begin name` / `# end name` in
/// the agents' manifest file.
fn set_manifest_section(cluster: &Cluster, name: &str, yaml: &str) -> Result<()> {
    let path = cluster.manifests();
    let text = std::fs::read_to_string(path)?;
    let (begin, end) = (format!("# begin {name}\n"), format!("# end {name}\n"));
    let kept = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) => format!("{}{}", &text[..b], &text[e + end.len()..]),
        _ => text,
    };
    let updated = format!("{}\n{begin}{yaml}{end}", kept.trim_end());
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

/// Wait until `node`'s agent has programmed `vip:80/TCP` with `backends` backends.
fn wait_for_frontend(cluster: &Cluster, node: &str, vip: Ipv4Addr, backends: u16) -> Result<()> {
    let key = ServiceKey {
        addr: vip.octets(),
        port: 80,
        proto: 6,
        _pad: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let maps = cluster.maps(node)?;
        let entries = maps.service_entries()?;
        if entries
            .iter()
            .any(|(k, e)| *k == key && e.count == backends)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{node}: {vip}:80/TCP never got {backends} backends; FE_SERVICES holds {entries:?}"
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The backend each of `node`'s conntrack forward entries toward `vip` chose.
fn chosen_backends(cluster: &Cluster, node: &str, vip: Ipv4Addr) -> Result<BTreeSet<Ipv4Addr>> {
    Ok(cluster
        .maps(node)?
        .ct_entries()?
        .into_iter()
        .filter(|(k, e)| k.daddr == vip.octets() && e.flags & ct_flags::FORWARD != 0)
        .map(|(_, e)| Ipv4Addr::from(e.addr))
        .collect())
}

#[test]
fn edge_pod_reaches_a_cluster_ip_with_local_community_and_cloud_backends_over_tcp_and_udp()
-> Result<()> {
    with_cluster(|cluster| {
        let vip = Ipv4Addr::new(10, 96, 0, 50);
        let backends = [
            (cluster.pod("edge-1")?.ip(), "edge-1", true),
            (cluster.pod("edge-2")?.ip(), "edge-2", true),
            (cluster.pod("cloud-2")?.ip(), "cloud-2", true),
        ];
        set_manifest_section(cluster, "web", &service_yaml("web", vip, &backends))?;
        for node in ["edge-1", "edge-3"] {
            wait_for_frontend(cluster, node, vip, 3)?;
        }
        let servers = ["edge-1", "edge-2", "cloud-2"];
        let served_before: Vec<u64> = servers
            .iter()
            .map(|n| cluster.pod(n).map(|p| p.requests_served()))
            .collect::<Result<_>>()?;
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        // Random balancing: 30 flows miss one of 3 backends with probability < 1e-5.
        for client in ["edge-1", "edge-3"] {
            let from = cluster.pod(client)?;
            for _ in 0..30 {
                let reply = tcp_echo(from.netns(), SocketAddrV4::new(vip, 80), &payload, TIMEOUT)
                    .with_context(|| format!("{client} pod: TCP to {vip}:80"))?;
                ensure!(
                    reply == payload,
                    "{client} pod: TCP echo through {vip}:80 came back different"
                );
            }
            for _ in 0..10 {
                let reply = udp_echo(
                    from.netns(),
                    SocketAddrV4::new(vip, 80),
                    b"dns-like?",
                    TIMEOUT,
                )
                .with_context(|| format!("{client} pod: UDP to {vip}:80"))?;
                ensure!(
                    reply == b"dns-like?",
                    "{client} pod: UDP echo came back different"
                );
            }
        }
        for (name, before) in servers.iter().zip(served_before) {
            let after = cluster.pod(name)?.requests_served();
            ensure!(
                after > before,
                "the {name} pod backend never served a Service client"
            );
        }
        let chosen = chosen_backends(cluster, "edge-1", vip)?;
        ensure!(
            chosen.len() == 3,
            "edge-1's conntrack shows backends {chosen:?}"
        );
        let table = cluster.agent_inspect_table("edge-1", "services")?;
        ensure!(
            table.contains("10.96.0.50:80/TCP")
                && table.contains(&format!("{}:{ECHO_PORT}", backends[2].0)),
            "inspect services:\n{table}"
        );
        let slots = cluster.agent_inspect_table("edge-1", "backends")?;
        for (ip, _, _) in &backends {
            ensure!(
                slots.contains(&format!("{ip}:{ECHO_PORT}")),
                "inspect backends lacks {ip}:\n{slots}"
            );
        }
        let ct = cluster.agent_inspect_table("edge-1", "ct")?;
        ensure!(
            ct.contains("snat"),
            "edge-1's own pod is a local backend (hairpin): its flows are source-NATed\n{ct}"
        );
        Ok(())
    })
}

#[test]
fn dns_like_udp_service_answers_from_the_service_address() -> Result<()> {
    with_cluster(|cluster| {
        // The fixture's kube-system/dns, pointed at the edge-2 pod.
        let vip = Ipv4Addr::new(10, 96, 0, 53);
        set_manifest_section(
            cluster,
            "dns2",
            &service_yaml(
                "dns2",
                vip,
                &[(cluster.pod("edge-2")?.ip(), "edge-2", true)],
            ),
        )?;
        wait_for_frontend(cluster, "edge-1", vip, 1)?;
        let from = cluster.pod("edge-1")?;
        for i in 0..5u8 {
            let query = [b'q', i];
            let reply = udp_echo(from.netns(), SocketAddrV4::new(vip, 80), &query, TIMEOUT)?;
            ensure!(reply == query);
        }
        Ok(())
    })
}

#[test]
fn service_without_endpoints_refuses_at_once() -> Result<()> {
    with_cluster(|cluster| {
        let vip = Ipv4Addr::new(10, 96, 0, 54);
        set_manifest_section(cluster, "empty", &service_yaml("empty", vip, &[]))?;
        wait_for_frontend(cluster, "edge-1", vip, 0)?;
        let from = cluster.pod("edge-1")?;
        let started = Instant::now();
        let tcp = from.netns().enter(|| {
            Ok(TcpStream::connect_timeout(
                &SocketAddrV4::new(vip, 80).into(),
                TIMEOUT,
            ))
        })?;
        match tcp {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            other => bail!(
                "TCP connect to a Service without endpoints: {other:?}, expected connection refused (RST)"
            ),
        }
        let udp = udp_echo(
            from.netns(),
            SocketAddrV4::new(vip, 80),
            b"anyone?",
            TIMEOUT,
        );
        let message = format!(
            "{:#}",
            udp.err()
                .context("UDP to a Service without endpoints got an answer")?
        );
        ensure!(message.contains("port unreachable"), "UDP: {message}");
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "refusals took {:?}",
            started.elapsed()
        );
        Ok(())
    })
}

#[test]
fn cloud_pod_reaches_a_service_with_edge_backends_through_kube_proxy_dnat() -> Result<()> {
    with_cluster(|cluster| {
        let vip = Ipv4Addr::new(10, 96, 0, 60);
        let backends = [
            SocketAddrV4::new(cluster.pod("edge-1")?.ip(), ECHO_PORT),
            SocketAddrV4::new(cluster.pod("edge-2")?.ip(), ECHO_PORT),
        ];
        for (node, proto) in [("cloud-2", "tcp"), ("cloud-2", "udp")] {
            cluster.kube_proxy_dnat(node, vip, 80, proto, &backends)?;
        }
        let from = cluster.pod("cloud-2")?;
        let before: Vec<u64> = ["edge-1", "edge-2"]
            .iter()
            .map(|n| cluster.pod(n).map(|p| p.requests_served()))
            .collect::<Result<_>>()?;
        let payload = vec![7u8; 3000];
        for _ in 0..20 {
            ensure!(
                tcp_echo(from.netns(), SocketAddrV4::new(vip, 80), &payload, TIMEOUT)? == payload
            );
        }
        ensure!(udp_echo(from.netns(), SocketAddrV4::new(vip, 80), b"hi", TIMEOUT)? == b"hi");
        for (name, before) in ["edge-1", "edge-2"].iter().zip(before) {
            ensure!(
                cluster.pod(name)?.requests_served() > before,
                "edge backend {name} never served the cloud client"
            );
        }
        Ok(())
    })
}

/// An open TCP connection from `client`'s pod to `vip:80` and the backend it got.
fn open_connection(
    cluster: &Cluster,
    client: &str,
    vip: Ipv4Addr,
) -> Result<(TcpStream, Ipv4Addr)> {
    let pod = cluster.pod(client)?;
    let stream = pod.netns().enter(|| {
        TcpStream::connect_timeout(&SocketAddrV4::new(vip, 80).into(), TIMEOUT)
            .context("connecting")
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let port = stream.local_addr()?.port();
    let entry = cluster
        .maps(client)?
        .ct_entries()?
        .into_iter()
        .find(|(k, e)| {
            k.sport == port && k.daddr == vip.octets() && e.flags & ct_flags::FORWARD != 0
        })
        .context("no conntrack entry for the open connection")?;
    Ok((stream, Ipv4Addr::from(entry.1.addr)))
}

fn echo_once(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf)?;
    if &buf != b"ping" {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

#[test]
fn a_removed_backend_gets_no_new_flows_its_flows_fail_fast_and_the_others_continue() -> Result<()> {
    with_cluster(|cluster| {
        let vip = Ipv4Addr::new(10, 96, 0, 70);
        let (edge2, cloud2) = (cluster.pod("edge-2")?.ip(), cluster.pod("cloud-2")?.ip());
        set_manifest_section(
            cluster,
            "churn",
            &service_yaml(
                "churn",
                vip,
                &[(edge2, "edge-2", true), (cloud2, "cloud-2", true)],
            ),
        )?;
        wait_for_frontend(cluster, "edge-1", vip, 2)?;
        let mut to_removed = None;
        let mut to_kept = None;
        for _ in 0..40 {
            let (stream, backend) = open_connection(cluster, "edge-1", vip)?;
            if backend == edge2 && to_removed.is_none() {
                to_removed = Some(stream);
            } else if backend == cloud2 && to_kept.is_none() {
                to_kept = Some(stream);
            }
            if to_removed.is_some() && to_kept.is_some() {
                break;
            }
        }
        let (mut to_removed, mut to_kept) = (
            to_removed.context("no flow went to edge-2")?,
            to_kept.context("no flow went to cloud-2")?,
        );
        echo_once(&mut to_removed)?;
        echo_once(&mut to_kept)?;

        // edge-2's endpoint stops being ready.
        set_manifest_section(
            cluster,
            "churn",
            &service_yaml(
                "churn",
                vip,
                &[(edge2, "edge-2", false), (cloud2, "cloud-2", true)],
            ),
        )?;
        wait_for_frontend(cluster, "edge-1", vip, 1)?;

        echo_once(&mut to_kept).context("a flow to a backend that stayed was disturbed")?;
        let started = Instant::now();
        let failed = echo_once(&mut to_removed);
        ensure!(failed.is_err(), "a flow to the removed backend still works");
        ensure!(
            started.elapsed() < Duration::from_secs(3),
            "the flow to the removed backend took {:?} to fail",
            started.elapsed()
        );
        for _ in 0..10 {
            let (mut stream, backend) = open_connection(cluster, "edge-1", vip)?;
            ensure!(
                backend == cloud2,
                "a new flow went to the removed backend {backend}"
            );
            echo_once(&mut stream)?;
        }
        Ok(())
    })
}

#[test]
fn udp_port_unreachable_from_backends_reaches_the_client_from_the_service() -> Result<()> {
    with_cluster(|cluster| {
        // Backends with nothing listening on the target port: their kernels
        // answer ICMP port unreachable about the translated datagram.
        for (i, node) in ["edge-1", "edge-2"].iter().enumerate() {
            let vip = Ipv4Addr::new(10, 96, 0, 80 + i as u8);
            let name = format!("closed{i}");
            let ip = cluster.pod(node)?.ip();
            let yaml = format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {vip}\n  \
                 ports:\n    - {{name: q, port: 80, protocol: UDP, targetPort: 7778}}\n    - {{name: t, port: 80, protocol: TCP, targetPort: 7778}}\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x\n  namespace: default\n  \
                 labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - {{name: q, port: 7778, protocol: UDP}}\n  \
                 - {{name: t, port: 7778, protocol: TCP}}\nendpoints:\n  - addresses: [{ip}]\n    nodeName: {node}\n"
            );
            set_manifest_section(cluster, &name, &yaml)?;
            wait_for_frontend(cluster, "edge-1", vip, 1)?;
            let from = cluster.pod("edge-1")?;
            let started = Instant::now();
            let result = udp_echo(from.netns(), SocketAddrV4::new(vip, 80), b"hello?", TIMEOUT);
            let message = format!(
                "{:#}",
                result
                    .err()
                    .context("a datagram to a closed port got an answer")?
            );
            ensure!(
                message.contains("port unreachable") && started.elapsed() < Duration::from_secs(2),
                "backend on {node}: the client's connected socket must see the error from {vip}: {message}"
            );
        }
        Ok(())
    })
}

#[test]
fn host_network_client_on_an_edge_node_reaches_a_cluster_ip_through_socket_translation()
-> Result<()> {
    with_cluster(|cluster| {
        let vip = Ipv4Addr::new(10, 96, 0, 90);
        let backends = [
            (cluster.pod("edge-2")?.ip(), "edge-2", true),
            (cluster.pod("cloud-2")?.ip(), "cloud-2", true),
        ];
        set_manifest_section(cluster, "hostnet", &service_yaml("hostnet", vip, &backends))?;
        wait_for_frontend(cluster, "edge-1", vip, 2)?;
        // TCP: connect to the ClusterIP; getpeername must still say so.
        // UDP: unconnected sendto / recvfrom; the reply must come from it.
        let script = format!(
            r#"
import socket
t = socket.create_connection(("{vip}", 80), timeout=5)
t.sendall(b"hello")
print("tcp", t.recv(5).decode(), t.getpeername()[0], t.getpeername()[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"query", ("{vip}", 80))
data, peer = u.recvfrom(100)
print("udp", data.decode(), peer[0], peer[1])
"#
        );
        for _ in 0..3 {
            let out = cluster.run_host_python("edge-1", &script)?;
            ensure!(
                out.contains(&format!("tcp hello {vip} 80"))
                    && out.contains(&format!("udp query {vip} 80")),
                "hostNetwork client output: {out}"
            );
        }
        Ok(())
    })
}

/// One Node whose pod CIDR overlaps another's is left out, named in
/// `inspect problems`, and stops nothing: a Service added at the same time is
/// programmed on every edge. Fixing the file clears the problem.
#[test]
fn a_node_overlapping_another_pod_cidr_is_left_out_and_everything_else_still_applies() -> Result<()>
{
    with_cluster(|cluster| {
        let vip = Ipv4Addr::new(10, 96, 0, 61);
        let bad_node = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: edge-9\n  labels:\n    \
                        node-role.kubernetes.io/edge: \"\"\nspec:\n  podCIDR: 10.234.1.0/25\nstatus:\n  \
                        addresses:\n    - {type: InternalIP, address: 10.2.0.99}\n";
        let backends = [(cluster.pod("edge-2")?.ip(), "edge-2", true)];
        set_manifest_section(cluster, "overlap", bad_node)?;
        set_manifest_section(
            cluster,
            "after-overlap",
            &service_yaml("after-overlap", vip, &backends),
        )?;
        for node in ["edge-1", "edge-3"] {
            wait_for_frontend(cluster, node, vip, 1)?;
        }
        // The pass that programs the frontend lists the problem just after
        // its map writes: wait for the list too.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let problems = cluster.agent_inspect("edge-1", "problems")?;
            let listed = problems.as_array().map(Vec::len).unwrap_or_default();
            if listed == 1
                && problems[0]["object"] == "Node edge-9"
                && problems[0]["problem"]
                    .as_str()
                    .is_some_and(|p| p.contains("overlaps node edge-1's 10.234.1.0/24"))
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "inspect problems on edge-1: {problems}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        set_manifest_section(cluster, "overlap", "")?;
        set_manifest_section(cluster, "after-overlap", "")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let problems = cluster.agent_inspect("edge-1", "problems")?;
            if problems.as_array().is_some_and(Vec::is_empty) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the problem did not clear: {problems}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    })
}
