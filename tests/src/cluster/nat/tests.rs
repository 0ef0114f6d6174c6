//! The NAT sites: where the manifest puts each edge, and the routers on
//! their own, without nodes or agents (needs root): what each kind shows the
//! WAN of one inside socket, and that nothing the WAN sends unasked gets in
//! or leaves a mapping behind.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_common::ESP_IN_UDP_PORT;

use crate::netns::{Netns, NextHop, veth_pair};

use super::super::fixture::Manifest;
use super::super::{FIXTURE, WAN, WAN_BRIDGE, WAN_NIC};
use super::{
    FIRST_NAT_SITE, NatKind, NatSite, SECOND_NAT_SITE, SecondSite, create_nat_sites,
    move_edges_to_the_site_lans,
};

/// Hosts on the WAN the inside socket sends to. The first two compare the
/// mappings; the third sends to the site first, unasked, where the inside
/// socket's mapping would be.
const WAN_HOSTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 0, 21),
    Ipv4Addr::new(198, 18, 0, 22),
    Ipv4Addr::new(198, 18, 0, 23),
];
const WAN_PORT: u16 = 7000;
/// The inside host's part of its site LAN's address (edge-2's).
const INSIDE_HOST: u8 = 12;
/// How long a datagram on this local network is awaited.
const DELIVERY: Duration = Duration::from_secs(2);
/// How long an unasked datagram is given to arrive (absence cannot be polled for).
const SILENCE: Duration = Duration::from_millis(500);

#[test]
fn with_a_second_site_edge_2_alone_moves_to_its_lan() -> Result<()> {
    let path = std::env::temp_dir().join(format!("fabedge-nat-sites-{}.yaml", std::process::id()));
    std::fs::copy(FIXTURE, &path)?;
    let moved = move_edges_to_the_site_lans(&path, true).and_then(|()| Manifest::read(&path));
    std::fs::remove_file(&path)?;
    let endpoints: Vec<(String, Ipv4Addr)> = moved?
        .nodes
        .into_iter()
        .filter(|n| n.name.starts_with("edge-"))
        .map(|n| (n.name, n.tunnel_endpoint))
        .collect();
    let expected = [
        ("edge-1", FIRST_NAT_SITE.address(11)),
        ("edge-2", SECOND_NAT_SITE.address(12)),
        ("edge-3", FIRST_NAT_SITE.address(13)),
    ]
    .map(|(name, address)| (name.to_owned(), address));
    ensure!(
        endpoints == expected,
        "edges' tunnel endpoints {endpoints:?}, expected {expected:?}"
    );
    Ok(())
}

#[test]
fn an_endpoint_independent_nat_shows_one_port_a_symmetric_one_a_port_per_peer_and_neither_lets_the_wan_in()
-> Result<()> {
    let switch = Netns::new("nat-sites-switch")?;
    switch.bridge(WAN_BRIDGE)?;
    let (first, second) = create_nat_sites(&switch, Some(SecondSite::behind(NatKind::Symmetric)))?;
    let second = second.context("create_nat_sites built no second router")?;
    let wan = Netns::new("nat-sites-wan")?;
    veth_pair(&wan, WAN_NIC, &switch, "wan-hosts")?;
    switch.attach_to_bridge("wan-hosts", WAN_BRIDGE)?;
    for host in WAN_HOSTS {
        wan.add_addr(WAN_NIC, &format!("{host}/{}", WAN.prefix_len()))?;
    }
    let listeners = wan.enter(|| {
        WAN_HOSTS
            .iter()
            .map(|host| {
                UdpSocket::bind((*host, WAN_PORT))
                    .with_context(|| format!("binding a WAN listener to {host}:{WAN_PORT}"))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut failures = Vec::new();
    for (site, router, kind) in [
        (&FIRST_NAT_SITE, &first, NatKind::EndpointIndependent),
        (&SECOND_NAT_SITE, &second, NatKind::Symmetric),
    ] {
        if let Err(e) = maps_and_filters_as(kind, &switch, site, router, &listeners) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// One inside socket on UDP 4500 behind `site`'s router: a datagram a WAN
/// host sends unasked is dropped by the router and leaves no mapping; then
/// the socket sends to every WAN host, each sees it at the router's public
/// address (one port, or a port each, as `kind` maps), and each answer
/// gets back in.
fn maps_and_filters_as(
    kind: NatKind,
    switch: &Netns,
    site: &NatSite,
    router: &Netns,
    listeners: &[UdpSocket],
) -> Result<()> {
    let label = format!("router {} ({kind:?}, public {})", site.router, site.public);
    let inside = inside_host(switch, site)?;
    let socket = inside.enter(|| {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ESP_IN_UDP_PORT))
            .context("binding the inside socket")
    })?;

    // Unasked, before the inside socket sent anything, to the port an
    // endpoint-independent router keeps for it.
    let unasked = listeners.get(2).context("three WAN listeners")?;
    let drops_before = unasked_drops(router)?;
    unasked.send_to(b"unasked", (site.public, ESP_IN_UDP_PORT))?;
    if let Some(from) = receive(&socket, SILENCE)? {
        bail!("{label}: a datagram the WAN sent unasked reached the inside host (from {from})");
    }
    let left = mappings_from(router, WAN_HOSTS[2])?;
    ensure!(
        left.is_empty(),
        "{label}: the datagram {} sent unasked left conntrack entries:\n{}",
        WAN_HOSTS[2],
        left.join("\n")
    );
    let dropped = unasked_drops(router)? - drops_before;
    ensure!(
        dropped >= 1,
        "{label}: its rule for what the WAN opens toward it dropped nothing"
    );

    for host in WAN_HOSTS {
        socket
            .send_to(b"out", (host, WAN_PORT))
            .with_context(|| format!("{label}: sending from the inside host to {host}"))?;
    }
    let mut seen = Vec::new();
    for (host, listener) in WAN_HOSTS.iter().zip(listeners) {
        let from = receive(listener, DELIVERY)?
            .with_context(|| format!("{label}: nothing from the inside host reached {host}"))?;
        listener.send_to(b"back", from)?;
        seen.push(from);
    }
    for _ in WAN_HOSTS {
        let from = receive(&socket, DELIVERY)?.with_context(|| {
            format!("{label}: not every WAN host's answer got back in (mappings {seen:?})")
        })?;
        ensure!(
            WAN_HOSTS.contains(from.ip()),
            "{label}: the inside host got a datagram from {from}"
        );
    }
    eprintln!(
        "{label}: the inside socket {}:{ESP_IN_UDP_PORT} seen by {} as {}; \
         {dropped} unasked datagram(s) dropped, no mapping left",
        site.address(INSIDE_HOST),
        WAN_HOSTS.map(|h| h.to_string()).join(", "),
        seen.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    ensure!(
        seen.iter().all(|from| *from.ip() == site.public),
        "{label}: the WAN hosts saw the inside host at {seen:?}, not all at the public address"
    );
    match kind {
        NatKind::EndpointIndependent => ensure!(
            seen.iter().all(|from| from.port() == seen[0].port()),
            "{label}: the WAN hosts saw the inside socket at {seen:?}: an endpoint-independent NAT \
             shows one port to all (a different port at {}, which sent first and unasked, means \
             its datagram left a mapping that the inside socket's clashed with)",
            WAN_HOSTS[2]
        ),
        NatKind::Symmetric => ensure!(
            seen[0].port() != seen[1].port(),
            "{label}: {} and {} saw the inside socket at the same port ({seen:?}): a symmetric NAT \
             gives every destination a port of its own",
            WAN_HOSTS[0],
            WAN_HOSTS[1]
        ),
    }
    Ok(())
}

/// A host on `site`'s LAN whose way to the WAN is the site's router.
fn inside_host(switch: &Netns, site: &NatSite) -> Result<Netns> {
    let host = Netns::new(&format!("{}-inside", site.router))?;
    let port = format!("{}-in", site.router);
    veth_pair(&host, "eth0", switch, &port)?;
    switch.attach_to_bridge(&port, site.bridge)?;
    let address = format!("{}/{}", site.address(INSIDE_HOST), site.lan.prefix_len());
    host.add_addr("eth0", &address)?;
    host.add_route(&WAN.to_string(), NextHop::Gateway(site.gateway))?;
    Ok(host)
}

/// The sender of the next datagram on `socket`, if one comes within
/// `timeout`. A signal meant for another test of this process (one that
/// runs child processes) interrupts the wait: it goes on for what is left.
fn receive(socket: &UdpSocket, timeout: Duration) -> Result<Option<SocketAddrV4>> {
    let deadline = std::time::Instant::now() + timeout;
    let mut buffer = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buffer) {
            Ok((_, SocketAddr::V4(from))) => return Ok(Some(from)),
            Ok((_, from)) => bail!("a datagram from {from}"),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) => return Err(e).context("receiving a datagram"),
        }
    }
}

/// `router`'s conntrack entries whose original source is `source`.
fn mappings_from(router: &Netns, source: Ipv4Addr) -> Result<Vec<String>> {
    let listed = router
        .run_ok("conntrack", &["-L", "-s", &source.to_string()])
        .context("listing the router's mappings (apt-get install conntrack)")?;
    Ok(listed
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Packets that `router`'s INPUT rule for what the WAN opens toward it dropped.
fn unasked_drops(router: &Netns) -> Result<u64> {
    let listing = router.run_ok("iptables", &["-w", "-L", "INPUT", "-v", "-n", "-x"])?;
    listing
        .lines()
        .find(|line| line.contains("DROP") && line.contains(WAN_NIC) && line.contains("NEW"))
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no INPUT rule dropping what the WAN opens:\n{listing}"))
}
