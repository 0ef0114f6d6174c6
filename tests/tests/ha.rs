//! Connector high availability (issue #12) in network namespaces: the mini
//! cluster with two active connectors (`tests/fixtures/mini-cluster-ha.yaml`:
//! cloud-1 and cloud-3), VXLAN tunnels. Edges spread over the connectors,
//! fail over when theirs dies (uplinks down, agent SIGKILLed) within two
//! seconds in both directions, come back after the hold-down without loss,
//! and stay put while a connector's agent restarts. The pings run every
//! 10 ms between edge-1's pod and cloud-2's (a cloud node that is no
//! connector: its traffic to edges crosses Flannel). Needs root.
//!
//! One cluster serves every test of this binary (bringing one up takes
//! seconds); tests take turns on it, each starting from both connectors
//! alive and the edges settled, and leaving it so.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_common::Counter;
use fabedge_tests::cluster::{
    At, BothWays, Cluster, ClusterOptions, HaCase, PathSpec, SharedCluster,
    dead_connector_fails_over, ha_agent_args, returning_connector_takes_its_edges_back,
    revive_all_and_settle, seed_matrix_through,
};

static CLUSTER: SharedCluster = SharedCluster::new();

extern "C" fn tear_down_cluster() {
    CLUSTER.tear_down();
}

/// The connectors of the HA fixture, as the matrix's proofs name nodes.
const CONNECTORS: [&str; 2] = ["cloud-1", "cloud-3"];
/// The edge whose pod pings, and the cloud node (no connector) whose pod answers.
const EDGE: &str = "edge-1";
const CLOUD: &str = "cloud-2";
/// Short, so that a return is quick to watch; the agent's default is 10 s.
const HOLD_DOWN: Duration = Duration::from_secs(3);
/// The bound on the longest ping gap of a failover, each direction.
const FAILOVER_BUDGET: Duration = Duration::from_secs(2);
/// How long a failover or a return may take before the test stops waiting
/// (the failover bound is checked on the gaps, not by this).
const WAIT: Duration = Duration::from_secs(20);
/// The failover and return checks shared with the ESP test (tests/tests/esp.rs).
const CASE: HaCase = HaCase {
    edge: EDGE,
    cloud: CLOUD,
    hold_down: HOLD_DOWN,
    budget: FAILOVER_BUDGET,
    wait: WAIT,
};

/// Runs `test` on the shared two-connector cluster, first bringing it up if
/// needed and back to health: every connector alive, every edge's
/// connector unchanged for longer than the hold-down. Returns the test's
/// result with the settled assignment (edge → connector) it started from.
fn with_ha_cluster<R>(
    test: impl FnOnce(&Cluster, &BTreeMap<String, String>) -> Result<R>,
) -> Result<R> {
    CLUSTER.with_options(
        || {
            let args = ha_agent_args(HOLD_DOWN);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ClusterOptions::ha(&args)
        },
        tear_down_cluster,
        |cluster| {
            let settled = revive_all_and_settle(cluster, &CASE)?;
            test(cluster, &settled)
        },
    )
}

/// `name` as the `&'static` node name the matrix's proofs use.
fn connector_name(name: &str) -> Result<&'static str> {
    CONNECTORS
        .iter()
        .copied()
        .find(|c| *c == name)
        .with_context(|| format!("{name} is not a connector of the HA fixture ({CONNECTORS:?})"))
}

#[test]
fn two_healthy_connectors_share_the_edges_and_every_seed_path_passes() -> Result<()> {
    with_ha_cluster(|cluster, settled| {
        eprintln!("edges' connectors: {settled:?}");
        let mut by_edge = BTreeMap::new();
        for (edge, connector) in settled {
            let edge = match edge.as_str() {
                "edge-1" => "edge-1",
                "edge-2" => "edge-2",
                "edge-3" => "edge-3",
                other => bail!("unexpected edge {other} in the HA fixture"),
            };
            by_edge.insert(edge, connector_name(connector)?);
        }
        let before = cluster.settled_stats()?;
        let mut failures = Vec::new();
        // Every edge to a cloud pod on a plain cloud node and back: each
        // crosses its own connector (the seed matrix's edge ends are mostly
        // edge-1, which leaves the other connector idle).
        let mut paths = seed_matrix_through(&by_edge, &CONNECTORS);
        for (edge, connector) in &by_edge {
            let name: &'static str = match *edge {
                "edge-1" => "edge_1_pod_reaches_cloud_2_pod_through_its_connector",
                "edge-2" => "edge_2_pod_reaches_cloud_2_pod_through_its_connector",
                _ => "edge_3_pod_reaches_cloud_2_pod_through_its_connector",
            };
            paths.push(
                PathSpec::new(name, "", At::Pod(edge), At::Pod("cloud-2"))
                    .tunnel(edge, connector)
                    .tunnel(connector, edge),
            );
        }
        for path in paths {
            let outcome = cluster.check_path(&path)?;
            if !outcome.passed() {
                failures.push(format!(
                    "{}\n  {}\nwhat the statistics did show:\n  {}",
                    outcome.title,
                    outcome.failures().join("\n  "),
                    outcome.evidence.join("\n  ")
                ));
            }
        }
        let growth = cluster.stats()?.since(&before);
        // Edges spread: both connectors carried edge traffic through their tunnels.
        let idle: Vec<&str> = CONNECTORS
            .iter()
            .copied()
            .filter(|c| {
                growth.counter(c, Counter::ToTunnel) == 0
                    || growth.counter(c, Counter::FromTunnel) == 0
            })
            .collect();
        if !idle.is_empty() {
            failures.push(format!(
                "connector(s) {} carried no tunnel traffic (to_tunnel/from_tunnel did not both grow) across the seed matrix: \
                 the edges are not spread over both connectors (edges' connectors: {settled:?})",
                idle.join(", ")
            ));
        }
        ensure!(
            failures.is_empty(),
            "{}\n\n{}",
            failures.join("\n\n"),
            cluster.diagnostics(&cluster.node_names())
        );
        Ok(())
    })
}

#[test]
fn a_dead_connector_s_edges_fail_over_within_two_seconds_each_way() -> Result<()> {
    with_ha_cluster(|cluster, settled| dead_connector_fails_over(cluster, &CASE, settled).map(drop))
}

#[test]
fn a_returning_connector_takes_its_edges_back_after_the_hold_down_without_loss() -> Result<()> {
    with_ha_cluster(|cluster, settled| {
        returning_connector_takes_its_edges_back(cluster, &CASE, settled).map(drop)
    })
}

#[test]
fn restarting_a_connector_agent_loses_nothing_and_moves_no_edge() -> Result<()> {
    with_ha_cluster(|cluster, settled| {
        let connector = settled[EDGE].clone();
        let meters = BothWays::start(cluster.pod(EDGE)?, cluster.pod(CLOUD)?)?;
        // Every edge's connector, sampled all along the restart.
        let restarting = AtomicBool::new(true);
        let moved = thread::scope(|scope| -> Result<Vec<String>> {
            let watcher = scope.spawn(|| -> Result<Vec<String>> {
                let mut moves = Vec::new();
                while restarting.load(Ordering::Relaxed) {
                    for (edge, before) in settled {
                        let now = cluster.connector_of(edge)?.name;
                        if &now != before {
                            moves.push(format!("{edge}: {before} → {now}"));
                        }
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Ok(moves)
            });
            let restarted = cluster.restart_agent(&connector);
            // Past the hold-down: a move the restart triggered would show by now.
            thread::sleep(HOLD_DOWN + Duration::from_secs(1));
            restarting.store(false, Ordering::Relaxed);
            let moves = watcher
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            restarted?;
            moves
        });
        let (up, down) = meters.stop()?;
        eprintln!(
            "restarted the agent of {connector}\n  {}\n  {}",
            up.summary(),
            down.summary()
        );
        let moved = moved?;
        ensure!(
            up.lost() == 0 && down.lost() == 0 && moved.is_empty(),
            "restarting the agent of {connector}: {} edge → cloud and {} cloud → edge pings lost; edges moved: {moved:?}\n{}",
            up.lost(),
            down.lost(),
            cluster.diagnostics(&[EDGE.to_owned(), connector.clone()])
        );
        Ok(())
    })
}

/// The harness itself, whatever the agents do about connectors: a killed
/// node (cloud-2, no connector: nothing can take over for it) answers
/// nothing, the gap meter shows the silence from the kill to the end, and a
/// revived node answers again.
#[test]
fn a_killed_node_answers_nothing_until_it_is_revived() -> Result<()> {
    with_ha_cluster(|cluster, _| {
        let meters = BothWays::start(cluster.pod(EDGE)?, cluster.pod(CLOUD)?)?;
        thread::sleep(Duration::from_millis(500));
        // Dead from when kill_node returns (its links are down then): a
        // request answered while it was still taking them down is no fault.
        let killed = cluster.kill_node(CLOUD);
        let killed_at = Instant::now();
        thread::sleep(Duration::from_secs(2));
        let revived_at = Instant::now();
        let (up, down) = meters.stop()?;
        killed?;
        cluster.revive_node(CLOUD)?;
        eprintln!("{}\n{}", up.summary(), down.summary());
        for gaps in [&up, &down] {
            let answered_while_dead = gaps.sent_between(killed_at, revived_at)
                - gaps.lost_sent_between(killed_at, revived_at);
            // A request sent just before the kill may be answered just after it.
            ensure!(
                answered_while_dead <= 1 && gaps.longest_gap().0 >= Duration::from_millis(1900),
                "{}: {answered_while_dead} requests answered while {CLOUD} was dead",
                gaps.summary()
            );
        }
        let after = BothWays::start(cluster.pod(EDGE)?, cluster.pod(CLOUD)?)?;
        let revived = Instant::now();
        let deadline = revived + WAIT;
        while !after.both_replied_since(revived) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(25));
        }
        let (up, down) = after.stop()?;
        ensure!(
            up.received() > 0 && down.received() > 0,
            "{CLOUD} did not answer again after it was revived:\n{}\n{}\n{}",
            up.summary(),
            down.summary(),
            cluster.diagnostics(&[CLOUD.to_owned(), EDGE.to_owned()])
        );
        Ok(())
    })
}
