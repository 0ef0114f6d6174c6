//! Fail closed (issue #13): with one of our kernel routes gone, pod, host
//! and forwarded traffic for a tunnel destination leaves no NIC in clear,
//! in either tunnel mode; `fe_uplink_egress` drops and counts each packet.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_common::Counter;

use super::Cluster;
use crate::netns::{Netns, Tcpdump};

/// How long a counter may take to show packets a test already sent.
const COUNTED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a marker may take to reach the switch's capture.
const MARKER_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_PORT: u16 = 7;
/// Where the markers go: no other packet of the proof does.
const MARKER_PORT: u16 = 9;
/// The next hops of the default routes the proof adds: the connector's WAN
/// address (for edge-1) and cloud-2's LAN address (for the connector).
const EDGE_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CONNECTOR_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

impl Cluster {
    /// A counter of `node`'s datapath.
    pub fn counter_value(&self, node: &str, counter: Counter) -> Result<u64> {
        Ok(self
            .counters(node)?
            .get(counter.name())
            .copied()
            .unwrap_or(0))
    }

    /// Waits until `counter` on `node` has grown by exactly `want` since
    /// `before`; fails if it grows by more, or not that much in time.
    pub fn wait_for_count(
        &self,
        node: &str,
        counter: Counter,
        before: u64,
        want: u64,
    ) -> Result<()> {
        let deadline = Instant::now() + COUNTED_TIMEOUT;
        loop {
            let moved = self.counter_value(node, counter)? - before;
            if moved == want {
                return Ok(());
            }
            if moved > want || Instant::now() > deadline {
                bail!(
                    "{node}: {} grew by {moved}, want {want}\n{}",
                    counter.name(),
                    self.diagnostics(&[node.to_owned()])
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Deletes one kernel route of ours on edge-1 (to cloud-2's pods) and
    /// one on the connector (to edge-1's pods), from the main table and from
    /// the tunnel table marked packets are routed by, each under a default route
    /// that would carry the traffic out in clear, and sends right away:
    /// edge-1's host and pod to a cloud-2 pod; the connector's host and pod,
    /// and cloud-2's pod (Flannel, decapsulated on the connector), to the
    /// edge-1 pod. Every packet must be dropped and counted by
    /// `fe_uplink_egress`, and none may reach the switch (tcpdump on every
    /// port). The routes are put back after, and the path works again.
    ///
    /// The two agents are stopped meanwhile (their datapath stays pinned and
    /// running): each would put its deleted route back within a tick, which
    /// under load can come before the packets, and the proof is about the
    /// datapath without the route. They are started again at the end (in
    /// ESP mode the agent also holds the UDP 4500 socket ESP arrives on).
    pub fn prove_fail_closed(&self) -> Result<()> {
        self.stop_agent("edge-1")?;
        self.stop_agent("cloud-1")?;
        self.fail_closed_without_agents()?;
        self.restart_agent("edge-1")?;
        self.restart_agent("cloud-1")?;
        // The routes are back: the same traffic goes through the tunnel again.
        let result = self.pod("edge-1")?.ping(self.pod("cloud-2")?.ip(), 2)?;
        ensure!(
            result.all_received(),
            "edge-1 pod → cloud-2 pod after the routes were put back: {result:?}"
        );
        Ok(())
    }

    fn fail_closed_without_agents(&self) -> Result<()> {
        let capture = Tcpdump::start(self.switch()?, "any", 128)?;
        let edge1 = self.node_netns("edge-1")?;
        let connector = self.node_netns("cloud-1")?;
        let _edge_default = DefaultRoute::add(edge1, EDGE_GATEWAY)?;
        let _connector_default = DefaultRoute::add(connector, CONNECTOR_GATEWAY)?;
        // Neighbours resolved first: nothing waits for ARP below.
        send_udp(edge1, EDGE_GATEWAY, 1)?;
        send_udp(connector, CONNECTOR_GATEWAY, 1)?;
        capture.wait_for(&format!("udp and dst host {EDGE_GATEWAY}"), MARKER_TIMEOUT)?;
        capture.wait_for(
            &format!("udp and dst host {CONNECTOR_GATEWAY}"),
            MARKER_TIMEOUT,
        )?;

        let cloud2_pod = self.pod("cloud-2")?.ip();
        let edge1_pod = self.pod("edge-1")?.ip();
        let before = self.counter_value("edge-1", Counter::DropOutsideTunnel)?;
        {
            let _gone = DeletedRoute::delete_both(edge1, "10.244.1.0/24")?;
            send_udp(edge1, cloud2_pod, 3)?;
            send_udp(self.pod("edge-1")?.netns(), cloud2_pod, 3)?;
            self.wait_for_count("edge-1", Counter::DropOutsideTunnel, before, 6)?;
        }
        let before = self.counter_value("cloud-1", Counter::DropOutsideTunnel)?;
        {
            let _gone = DeletedRoute::delete_both(connector, "10.234.1.0/24")?;
            send_udp(connector, edge1_pod, 3)?;
            send_udp(self.pod("cloud-1")?.netns(), edge1_pod, 3)?;
            send_udp(self.pod("cloud-2")?.netns(), edge1_pod, 3)?;
            self.wait_for_count("cloud-1", Counter::DropOutsideTunnel, before, 9)?;
        }

        // A marker after everything, out of each node's NIC: once both are
        // captured, so would be any packet that leaked before them.
        send_udp_to_port(edge1, EDGE_GATEWAY, MARKER_PORT, 1)?;
        send_udp_to_port(connector, CONNECTOR_GATEWAY, MARKER_PORT, 1)?;
        for gateway in [EDGE_GATEWAY, CONNECTOR_GATEWAY] {
            capture.wait_for(
                &format!("udp and dst host {gateway} and dst port {MARKER_PORT}"),
                MARKER_TIMEOUT,
            )?;
        }
        let leaked = capture.packets(&format!(
            "ip dst host {cloud2_pod} or ip dst host {edge1_pod}"
        ))?;
        ensure!(
            leaked.is_empty(),
            "packets for tunnel destinations left in clear:\n{}",
            leaked.join("\n")
        );
        eprintln!(
            "fail closed: with a route of ours deleted, edge-1 dropped 6 and cloud-1 9 packets \
             (drop_outside_tunnel), none reached the switch"
        );
        Ok(())
    }
}

/// Sends `count` UDP datagrams from inside `netns` to `to`.
fn send_udp(netns: &Netns, to: Ipv4Addr, count: u32) -> Result<()> {
    send_udp_to_port(netns, to, PROBE_PORT, count)
}

fn send_udp_to_port(netns: &Netns, to: Ipv4Addr, port: u16, count: u32) -> Result<()> {
    netns.enter(|| {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        for i in 0..count {
            socket
                .send_to(format!("fail-closed {i}").as_bytes(), (to, port))
                .with_context(|| format!("sending to {to}"))?;
        }
        Ok(())
    })
}

/// One of our kernel routes, deleted for a while and put back on drop (the
/// agent may put it back first; `replace` is then a no-op).
struct DeletedRoute<'a> {
    netns: &'a Netns,
    spec: Vec<String>,
}

impl<'a> DeletedRoute<'a> {
    /// Our route to `prefix` in routing `table` (`main`, or `4011`: where
    /// packets the datapath marked for the tunnel are routed), deleted
    /// until the guard drops.
    fn delete(netns: &'a Netns, prefix: &str, table: &str) -> Result<Self> {
        let line = netns.ip(&[
            "route", "show", "exact", prefix, "proto", "0xfe", "table", table,
        ])?;
        let mut spec: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        ensure!(
            spec.first().map(String::as_str) == Some(prefix),
            "{}: no route of ours to {prefix} in table {table}: {line:?}",
            netns.name()
        );
        netns.ip(&["route", "del", prefix, "proto", "0xfe", "table", table])?;
        spec.extend(["table".to_owned(), table.to_owned()]);
        Ok(DeletedRoute { netns, spec })
    }

    /// Our routes to `prefix` in both tables.
    fn delete_both(netns: &'a Netns, prefix: &str) -> Result<[Self; 2]> {
        Ok([
            Self::delete(netns, prefix, "main")?,
            Self::delete(netns, prefix, "4011")?,
        ])
    }
}

impl Drop for DeletedRoute<'_> {
    fn drop(&mut self) {
        let mut args = vec!["route", "replace"];
        args.extend(self.spec.iter().map(String::as_str));
        if let Err(e) = self.netns.ip(&args) {
            eprintln!("putting back {:?}: {e:#}", self.spec);
        }
    }
}

/// A default route through `via` for a while: where a packet whose route
/// of ours is gone would otherwise leave in clear.
struct DefaultRoute<'a>(&'a Netns);

impl<'a> DefaultRoute<'a> {
    fn add(netns: &'a Netns, via: Ipv4Addr) -> Result<Self> {
        netns.ip(&["route", "replace", "default", "via", &via.to_string()])?;
        Ok(DefaultRoute(netns))
    }
}

impl Drop for DefaultRoute<'_> {
    fn drop(&mut self) {
        let _ = self.0.ip(&["route", "del", "default"]);
    }
}
