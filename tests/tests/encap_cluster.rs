//! The mini cluster with the agent's default datapath flags: edge pods'
//! tunnel traffic is encapsulated by the forwarding program itself
//! (`config_flags::TC_ENCAP`), not by `fe-tunnel`, and the older way
//! (`--tunnel-key-egress`, flags 0) still carries the same traffic. The
//! seed matrix (`--test forwarding`) proves every path with this default;
//! this proves which way the packets took. Needs root.

use anyhow::{Result, ensure};
use fabedge_common::{Counter, config_flags};
use fabedge_tests::cluster::{Cluster, ClusterOptions};

/// How much `counters` grew on `node` while `traffic` ran.
fn growth(
    cluster: &Cluster,
    node: &str,
    counters: &[Counter],
    traffic: impl FnOnce() -> Result<()>,
) -> Result<Vec<u64>> {
    let read = || -> Result<Vec<u64>> {
        let maps = cluster.maps(node)?;
        counters.iter().map(|c| maps.counter(*c)).collect()
    };
    let before = read()?;
    traffic()?;
    let after = read()?;
    Ok(after.iter().zip(&before).map(|(a, b)| a - b).collect())
}

#[test]
fn edge_pod_traffic_is_encapsulated_by_the_forwarding_program_by_default() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::default())?;
    let client = cluster.pod("edge-1")?;
    let server = cluster.pod("edge-2")?;
    assert_eq!(
        cluster.maps("edge-1")?.config()?.flags,
        config_flags::TC_ENCAP,
        "the agent's default"
    );
    let watched = [
        Counter::TunnelEncap,
        Counter::ToTunnel,
        Counter::TunnelEncapNoNeighbour,
        Counter::TunnelEncapDeclined,
    ];

    // Warm-up: the first packet may find the next hop unresolved and take
    // fe-tunnel, which resolves it.
    ensure!(client.ping(server.ip(), 1)?.all_received(), "warm-up ping");
    let grown = growth(&cluster, "edge-1", &watched, || {
        let pings = client.ping(server.ip(), 10)?;
        ensure!(
            pings.all_received(),
            "ping edge-1 pod → edge-2 pod: {pings:?}"
        );
        let echo = client.tcp_echo(server)?;
        ensure!(
            echo.excess_retransmissions().is_none(),
            "TCP echo retransmitted {} segments",
            echo.retransmitted
        );
        Ok(())
    })?;
    let [encap, to_tunnel, no_neighbour, declined] = grown[..] else {
        unreachable!()
    };
    assert!(
        encap >= 10,
        "tunnel_encap +{encap}: ping and TCP encapsulated in the program"
    );
    assert_eq!(
        (to_tunnel, no_neighbour, declined),
        (encap, 0, 0),
        "every packet into the tunnel went the new way"
    );

    // The older way, selected in the map as `--tunnel-key-egress` does:
    // same traffic, carried by fe-tunnel.
    for node in ["edge-1", "edge-2"] {
        let mut maps = cluster.maps(node)?;
        let mut config = maps.config()?;
        config.flags = 0;
        maps.set_config(config)?;
    }
    let grown = growth(&cluster, "edge-1", &watched, || {
        let pings = client.ping(server.ip(), 10)?;
        ensure!(pings.all_received(), "ping with the tunnel key: {pings:?}");
        client.tcp_echo(server)?;
        Ok(())
    })?;
    assert_eq!(grown[0], 0, "tunnel_encap does not move without TC_ENCAP");
    assert!(
        grown[1] >= 10,
        "to_tunnel +{}: fe-tunnel's egress",
        grown[1]
    );
    Ok(())
}
