//! The seed's test matrix in network namespaces (DESIGN.md §1, §4 layer 3):
//! real ping, TCP and UDP along every path of the mini cluster, each path
//! proven to have taken fabedge's tunnel (or, for c4, Flannel alone) by the
//! datapath's own statistics. Needs root.
//!
//! One cluster serves every test of this binary: bringing one up takes
//! seconds. Tests take turns on it (a lock), so the statistics a test
//! measures are its own, and it is torn down when the process exits.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use fabedge_common::Counter;
use fabedge_tests::{
    cluster::{Cluster, PING_COUNT, SharedCluster, seed_matrix},
    netns::PacketSocket,
};

static CLUSTER: SharedCluster = SharedCluster::new();

extern "C" fn tear_down_cluster() {
    CLUSTER.tear_down();
}

/// Runs `test` on the shared cluster, bringing it up first if needed.
fn with_cluster<R>(test: impl FnOnce(&Cluster) -> Result<R>) -> Result<R> {
    CLUSTER.with(tear_down_cluster, test)
}

/// Sends traffic along the seed path named `name` and checks its proofs.
fn prove_seed_path(name: &str) -> Result<()> {
    let path = seed_matrix()
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("seed_matrix() has no path named {name}"))?;
    with_cluster(|cluster| {
        let outcome = cluster.check_path(&path)?;
        if outcome.passed() {
            return Ok(());
        }
        bail!(
            "{}\n  {}\nwhat the statistics did show:\n  {}\n\n{}",
            outcome.title,
            outcome.failures().join("\n  "),
            outcome.evidence.join("\n  "),
            cluster.diagnostics(&cluster.nodes_of(&path))
        )
    })
}

/// One test per path of `seed_matrix()`, named after it.
macro_rules! seed_path_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() -> Result<()> {
                prove_seed_path(stringify!($name))
            }
        )*
        const SEED_PATH_TESTS: &[&str] = &[$(stringify!($name)),*];
    };
}

seed_path_tests! {
    edge_pod_reaches_cloud_pod_on_connector,
    edge_pod_reaches_community_peer_pod_directly,
    edge_pod_reaches_cloud_pod_through_connector_and_flannel,
    cloud_pods_reach_each_other_through_flannel_alone,
    cloud_pod_on_connector_reaches_edge_pod,
    cloud_pod_reaches_edge_pod_through_flannel_and_connector,
    edge_pods_outside_a_community_talk_through_connector,
    edge_node_and_cloud_node_reach_each_other,
    community_edge_nodes_reach_each_other_directly,
    cloud_node_reaches_edge_node_outside_community,
    edge_pod_reaches_cloud_node,
    cloud_pod_reaches_edge_node,
}

#[test]
fn every_seed_path_has_a_test() {
    let mut listed: Vec<&str> = seed_matrix().iter().map(|p| p.name).collect();
    let mut tested = SEED_PATH_TESTS.to_vec();
    listed.sort();
    tested.sort();
    assert_eq!(
        listed, tested,
        "seed_matrix() and the seed_path_tests! list must name the same paths"
    );
}

/// The image has no iproute2: every agent runs with an empty directory as
/// its PATH, and the seed paths above are proven through those agents.
#[test]
fn agents_run_with_no_ip_or_tc_on_their_path() -> Result<()> {
    let empty = fabedge_tests::agent::empty_path_dir()?;
    with_cluster(|cluster| {
        for node in cluster.node_names() {
            let path = cluster.agent_path_var(&node)?;
            ensure!(
                path.as_deref() == Some(empty.to_str().context("temp dir is not UTF-8")?),
                "the agent of {node} runs with PATH={path:?}, not the empty {}",
                empty.display()
            );
        }
        ensure!(
            std::fs::read_dir(&empty)?.next().is_none(),
            "{} is not empty",
            empty.display()
        );
        Ok(())
    })?;
    prove_seed_path("edge_pod_reaches_cloud_pod_through_connector_and_flannel")
}

/// TEST-NET-3: no route in any plan can cover it.
const UNKNOWN_DESTINATION: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

#[test]
fn edge_pod_traffic_to_unknown_destination_is_dropped_and_counted() -> Result<()> {
    with_cluster(|cluster| {
        let pod = cluster.pod("edge-1")?;
        // Everything edge-1 sends to the internet arrives at its switch port.
        let wan = PacketSocket::open(cluster.switch()?, &cluster.wan_port("edge-1")?)?;
        let dropped_before = cli_counter(cluster, "edge-1", Counter::DropNoRoute)?;

        let result = pod.ping(UNKNOWN_DESTINATION, PING_COUNT)?;

        let dropped_after = cli_counter(cluster, "edge-1", Counter::DropNoRoute)?;
        let dropped = dropped_after.checked_sub(dropped_before).with_context(|| {
            format!("edge-1 drop_no_route went down: {dropped_before} → {dropped_after}")
        })?;
        let leaked = wan.recv_matching(Duration::from_millis(200), |frame| {
            frame.windows(4).any(|w| w == UNKNOWN_DESTINATION.octets())
        })?;
        let diagnose = || cluster.diagnostics(&["edge-1".to_owned()]);
        ensure!(
            result.received == 0,
            "{UNKNOWN_DESTINATION} answered {result:?}\n{}",
            diagnose()
        );
        ensure!(
            dropped == u64::from(result.sent),
            "edge-1 drop_no_route grew by {dropped}, but {} requests were sent\n{}",
            result.sent,
            diagnose()
        );
        ensure!(
            leaked.is_none(),
            "a frame for {UNKNOWN_DESTINATION} left edge-1's WAN NIC: {leaked:02x?}\n{}",
            diagnose()
        );
        Ok(())
    })
}

#[test]
fn expiring_ttl_is_answered_with_icmp_time_exceeded_by_the_edge_node() -> Result<()> {
    with_cluster(|cluster| {
        let pod = cluster.pod("edge-1")?;
        let peer = cluster.pod("edge-2")?;
        let gateway = cluster
            .spec("edge-1")?
            .pod_cidr
            .hosts()
            .next()
            .context("pod CIDR has no gateway")?;
        let punted_before = cluster
            .counters("edge-1")?
            .get(Counter::PuntTtl.name())
            .copied()
            .unwrap_or(0);
        // TTL 1 leaves the pod and would expire at its first router, edge-1.
        let out = pod.netns().exec(
            "ping",
            &["-c", "1", "-t", "1", "-W", "1", &peer.ip().to_string()],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let punted = cluster
            .counters("edge-1")?
            .get(Counter::PuntTtl.name())
            .copied()
            .unwrap_or(0)
            - punted_before;
        ensure!(
            stdout.contains(&format!("From {gateway}"))
                && stdout.to_lowercase().contains("time to live exceeded"),
            "expected ICMP time-exceeded from edge-1's gateway {gateway}, ping said:\n{stdout}\n{}",
            cluster.diagnostics(&["edge-1".to_owned()])
        );
        ensure!(
            punted == 1,
            "edge-1 punt_ttl_expired grew by {punted}, expected 1"
        );
        Ok(())
    })
}

/// A counter as `fabedge-agent inspect counters --json` prints it.
fn cli_counter(cluster: &Cluster, node: &str, counter: Counter) -> Result<u64> {
    let rows = cluster.agent_inspect(node, "counters")?;
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|row| row["name"] == counter.name())
        .and_then(|row| row["packets"].as_u64())
        .with_context(|| {
            format!(
                "{node}: inspect counters --json has no {}: {rows}",
                counter.name()
            )
        })
}

#[test]
fn traffic_keeps_flowing_while_agents_restart() -> Result<()> {
    with_cluster(|cluster| {
        // c3 crosses both restarted datapaths: edge-1's and the connector's.
        let from = cluster.pod("edge-1")?;
        let to = cluster.pod("cloud-2")?.ip();
        let pings = cluster.restart_agents_under_ping(&["edge-1", "cloud-1"], from, to)?;
        eprintln!("restarts of edge-1 and cloud-1: {}", pings.summary());
        ensure!(
            pings.sent() > 0 && pings.lost() == 0,
            "pings were lost while the agents of edge-1 and cloud-1 restarted: {}\n{}",
            pings.summary(),
            cluster.diagnostics(&["edge-1".to_owned(), "cloud-1".to_owned()])
        );
        Ok(())
    })?;
    // And the path still proves itself afterwards.
    prove_seed_path("edge_pod_reaches_cloud_pod_through_connector_and_flannel")
}

/// As the DaemonSet's `maxSurge` rolls an agent: the new one starts beside
/// the old one and stands by, loading and applying nothing (the harness
/// checks its log), until the old one exits and it takes over. In VXLAN
/// mode there is no socket to hand over; the ESP mode's UDP 4500 handover
/// is proven in the VMs (`esp.rs`, edges behind NAT).
#[test]
fn a_surge_restart_hands_over_to_the_new_agent_without_loss() -> Result<()> {
    with_cluster(|cluster| {
        let from = cluster.pod("edge-1")?;
        let to = cluster.pod("cloud-2")?.ip();
        let pings = cluster.surge_restart_agents_under_ping(&["edge-1", "cloud-1"], from, to)?;
        eprintln!("surge restarts of edge-1 and cloud-1: {}", pings.summary());
        ensure!(
            pings.sent() > 0 && pings.lost() == 0,
            "pings were lost across surge restarts of edge-1 and cloud-1: {}\n{}",
            pings.summary(),
            cluster.diagnostics(&["edge-1".to_owned(), "cloud-1".to_owned()])
        );
        Ok(())
    })
}
