//! The connector-HA checks (issue #12) that hold in every tunnel mode: the
//! bodies of the tests in `tests/tests/ha.rs` (VXLAN, on the host) and of
//! the ESP test in `tests/tests/esp.rs` (in the Debian VMs), each run on
//! the caller's two-connector cluster ([`ClusterOptions::ha`]).
//!
//! [`ClusterOptions::ha`]: super::ClusterOptions::ha

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{BothWays, Cluster};

/// Who pings whom, and the times the checks allow.
#[derive(Debug, Clone, Copy)]
pub struct HaCase<'a> {
    /// The edge whose pod pings (and whose connector dies).
    pub edge: &'a str,
    /// The cloud node (no connector) whose pod answers: its traffic to the
    /// edge crosses Flannel to a connector's VTEP address.
    pub cloud: &'a str,
    /// The agents' `--hold-down` ([`super::ha_agent_args`]).
    pub hold_down: Duration,
    /// The issue's bound on the longest ping gap of a failover, each way.
    pub budget: Duration,
    /// How long a failover or a return may take before the check stops
    /// waiting (the failover bound is checked on the gaps, not by this).
    pub wait: Duration,
}

/// What a passing failover measured, for the caller to print or report.
#[derive(Debug, Clone)]
pub struct FailoverGaps {
    pub killed: String,
    pub now_using: String,
    /// Longest gap edge → cloud and cloud → edge.
    pub edge_to_cloud: Duration,
    pub cloud_to_edge: Duration,
}

/// Where every check starts: every killed node revived, and every edge's
/// connector unchanged for longer than the hold-down. Returns that
/// assignment (edge → connector).
pub fn revive_all_and_settle(
    cluster: &Cluster,
    case: &HaCase<'_>,
) -> Result<BTreeMap<String, String>> {
    for node in cluster.node_names() {
        if !cluster.agent_running(&node)? {
            cluster.revive_node(&node)?;
        }
    }
    cluster.settled_connectors(case.hold_down + Duration::from_secs(1), case.wait)
}

/// The connector `case.edge` settled on, from [`Cluster::settled_connectors`].
fn primary_of(case: &HaCase<'_>, settled: &BTreeMap<String, String>) -> Result<String> {
    settled.get(case.edge).cloned().with_context(|| {
        format!(
            "{} is no edge of this cluster (settled connectors: {settled:?})",
            case.edge
        )
    })
}

/// The edge's connector dies ([`Cluster::kill_node`]: uplinks down, agent
/// SIGKILLed) while pings run every 10 ms both ways; both directions must
/// come back within `case.budget` through the other connector. The killed
/// node is revived before returning, whatever happened, so that the next
/// check starts from two live connectors.
pub fn dead_connector_fails_over(
    cluster: &Cluster,
    case: &HaCase<'_>,
    settled: &BTreeMap<String, String>,
) -> Result<FailoverGaps> {
    let HaCase { edge, cloud, .. } = *case;
    let killed = primary_of(case, settled)?;
    let failover = cluster.fail_over(edge, cloud, case.wait);
    // The dead connector as the failover left it (before the revival):
    // its links must still be down and its agent gone.
    let dead_links = cluster
        .node_netns(&killed)
        .and_then(|ns| ns.ip(&["-br", "link"]))
        .unwrap_or_else(|e| format!("{e:#}"));
    let diagnostics = format!(
        "--- {killed} (killed) at the end of the failover: ip -br link\n{dead_links}\n{}\n{}",
        cluster.agent_logs(&[edge.to_owned(), killed.clone()]),
        cluster.diagnostics(&[edge.to_owned(), cloud.to_owned()])
    );
    // Flannel restarts on the cloud node while the connector is still dead.
    let flannel_restart = match &failover {
        Ok(f) if f.recovered && !cluster.agent_running(&killed)? => {
            flannel_restarts_during_failover(cluster, case, &killed)
        }
        _ => Ok(()),
    };
    let revived = if cluster.agent_running(&killed)? {
        Ok(())
    } else {
        cluster.revive_node(&killed)
    };
    let failover = failover?;
    let (up, down) = (
        failover.edge_to_cloud.longest_gap().0,
        failover.cloud_to_edge.longest_gap().0,
    );
    eprintln!(
        "killed {killed}; {edge} now uses {:?}\n  {}\n  {}",
        failover.now_using,
        failover.edge_to_cloud.summary(),
        failover.cloud_to_edge.summary()
    );
    ensure!(
        failover.recovered && up <= case.budget && down <= case.budget,
        "after {killed} died, {edge}'s traffic {}: longest gap {} ms edge → cloud, {} ms cloud → edge \
         (at most {} ms each)\n{}\n{}\n{diagnostics}",
        if failover.recovered {
            "came back"
        } else {
            "did not come back"
        },
        up.as_millis(),
        down.as_millis(),
        case.budget.as_millis(),
        failover.edge_to_cloud.summary(),
        failover.cloud_to_edge.summary()
    );
    let now_using = match &failover.now_using {
        Ok(now) => {
            ensure!(
                now.name != killed,
                "{edge}'s traffic came back, but its datapath still names the dead {killed} ({now:?})\n{diagnostics}"
            );
            now.name.clone()
        }
        Err(e) => bail!("{edge}'s connector after the failover: {e}\n{diagnostics}"),
    };
    flannel_restart?;
    revived.with_context(|| format!("reviving {killed} after the failover"))?;
    Ok(FailoverGaps {
        killed,
        now_using,
        edge_to_cloud: up,
        cloud_to_edge: down,
    })
}

/// The edge's connector dies; once the edge has moved to the other one,
/// pings start, and once they flow both ways the dead connector comes
/// back. The edge must move back to it no sooner than the hold-down after,
/// and no ping sent from the revival on may be lost. Returns how long after
/// the revival the edge moved back.
pub fn returning_connector_takes_its_edges_back(
    cluster: &Cluster,
    case: &HaCase<'_>,
    settled: &BTreeMap<String, String>,
) -> Result<Duration> {
    let HaCase {
        edge,
        cloud,
        hold_down,
        wait,
        ..
    } = *case;
    let primary = primary_of(case, settled)?;
    cluster.kill_node(&primary)?;
    let moved = cluster.wait_for_connector(edge, wait, |c| c.name != primary);
    let (standby, _) = match moved {
        Ok(moved) => moved,
        Err(e) => {
            cluster.revive_node(&primary)?;
            return Err(e.context(format!("{edge} did not leave the dead {primary}")));
        }
    };
    let meters = BothWays::start(cluster.pod(edge)?, cluster.pod(cloud)?)?;
    // The edge's datapath names the standby before the cloud side has
    // followed (the standby claiming the VTEP address, Flannel's neighbour
    // entry): the failover's tail, which the failover check judges. The
    // return is measured from a path that carries both ways.
    if let Err(e) = carrying_both_ways(&meters, wait) {
        let _ = meters.stop();
        cluster.revive_node(&primary)?;
        return Err(e.context(format!(
            "{edge}'s traffic through {} before {primary} comes back",
            standby.name
        )));
    }
    let back_at = thread::scope(|scope| -> Result<_> {
        // Watches, from before the links come up, when the edge moves back.
        let watcher = scope
            .spawn(|| cluster.wait_for_connector(edge, wait + hold_down, |c| c.name == primary));
        let return_started = Instant::now();
        let revived = cluster.revive_node(&primary);
        let seen = watcher
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        revived?;
        let (_, back_at) = seen?;
        Ok((return_started, back_at))
    });
    // Pings go on past the move back: flows that moved must keep flowing.
    thread::sleep(Duration::from_secs(1));
    let (up, down) = meters.stop()?;
    let (return_started, back_at) = back_at?;
    let stopped = up.stopped.min(down.stopped);
    let after = back_at.duration_since(return_started);
    eprintln!(
        "{edge} used {} while {primary} was dead; {primary} came back, {edge} moved back after {:.2} s\n  {}\n  {}",
        standby.name,
        after.as_secs_f64(),
        up.summary(),
        down.summary()
    );
    let lost = (
        up.lost_sent_between(return_started, stopped),
        down.lost_sent_between(return_started, stopped),
    );
    ensure!(
        lost == (0, 0),
        "pings lost after {primary} started coming back: {} of {} edge → cloud, {} of {} cloud → edge\n{}",
        lost.0,
        up.sent_between(return_started, stopped),
        lost.1,
        down.sent_between(return_started, stopped),
        cluster.diagnostics(&[edge.to_owned(), primary.clone(), standby.name.clone()])
    );
    ensure!(
        after >= hold_down,
        "{edge} moved back to {primary} {:.2} s after it came back, before the {} s hold-down",
        after.as_secs_f64(),
        hold_down.as_secs()
    );
    let now = cluster.connector_of(edge)?;
    ensure!(
        now.name == primary,
        "{edge} uses {} after the return, not {primary}",
        now.name
    );
    Ok(after)
}

/// Waits until `meters` have seen replies both ways, and again both ways
/// [`STILL_CARRYING`] later: a path that carries, not one answer that
/// slipped through while it was moving.
fn carrying_both_ways(meters: &BothWays, wait: Duration) -> Result<()> {
    let started = Instant::now();
    let deadline = started + wait;
    // When replies have come both ways since `since`.
    let both_since = |since: Instant| -> Result<Instant> {
        while !meters.both_replied_since(since) {
            ensure!(
                Instant::now() < deadline,
                "no replies both ways within {wait:?} of the pings' start"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Ok(Instant::now())
    };
    let first = both_since(started)?;
    both_since(first + STILL_CARRYING)
        .with_context(|| format!("replies both ways {:?} in, not again", first - started))
        .map(drop)
}

/// See [`carrying_both_ways`].
const STILL_CARRYING: Duration = Duration::from_millis(300);

/// Flannel restarts on the cloud node while `killed` is still dead: it
/// forgets what it learnt (ARP for the VTEP address included) and programs
/// the same leases again; the edge's traffic must still flow, now through
/// the successor that holds the dead connector's VTEP address.
fn flannel_restarts_during_failover(
    cluster: &Cluster,
    case: &HaCase<'_>,
    killed: &str,
) -> Result<()> {
    let HaCase { edge, cloud, .. } = *case;
    let netns = cluster.node_netns(cloud)?;
    netns.ip(&["neigh", "flush", "dev", "eth-lan"])?;
    netns.ip(&["route", "flush", "dev", "flannel.1"])?;
    netns.ip(&["neigh", "flush", "dev", "flannel.1", "nud", "permanent"])?;
    cluster.sync_flannel()?;
    let pings = cluster.pod(cloud)?.ping(cluster.pod(edge)?.ip(), 5)?;
    ensure!(
        pings.all_received(),
        "after Flannel restarted on {cloud} with {killed} still dead: {} of {} pings to {edge}'s pod answered",
        pings.received,
        pings.sent
    );
    eprintln!(
        "Flannel restarted on {cloud} with {killed} dead: {} of {} pings to {edge}'s pod answered",
        pings.received, pings.sent
    );
    Ok(())
}
