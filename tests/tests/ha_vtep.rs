//! Shared VTEP addresses move between connectors: the connector that takes
//! over a dead one's VTEP address holds it on its NIC, and a cloud node
//! that had the dead connector's MAC in its ARP cache switches to ours on
//! the gratuitous ARPs, without waiting for its entry to expire. Needs root.
//!
//! Topology: namespace `cloud` (a cloud node) has bridge `fe-br`, with a
//! port to connector `old` (which held the address) and one to connector
//! `new` (us). All on 10.9.0.0/24; the VTEP address is 10.9.0.100.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fabedge_agent::ha::vtep::{ASK_EVERY, HolderCheck, claim, held, release};
use fabedge_tests::{
    netns::{Netns, ping, veth_pair},
    packet::{Mac, format_mac},
};

const VTEP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 100);
const DEADLINE: Duration = Duration::from_secs(5);

/// The MAC `ns` has for `addr` on `dev` (`ip neigh`) and the entry's
/// states, if there is an entry.
fn neighbour(ns: &Netns, dev: &str, addr: Ipv4Addr) -> Result<Option<(String, String)>> {
    let json = ns.ip(&["-j", "neigh", "show", "to", &addr.to_string(), "dev", dev])?;
    let entries: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("parsing `ip -j neigh` {json:?}"))?;
    let Some(entry) = entries.get(0) else {
        return Ok(None);
    };
    let mac = entry.get("lladdr").and_then(|mac| mac.as_str());
    let state = entry
        .get("state")
        .map(|s| s.to_string())
        .unwrap_or_default();
    Ok(mac.map(|mac| (mac.to_owned(), state)))
}

/// Poll until `cloud` has `mac` for the VTEP and return the entry's
/// states; fail with what it has instead.
fn wait_for_neighbour(cloud: &Netns, mac: &Mac, why: &str) -> Result<String> {
    let want = format_mac(mac);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let have = neighbour(cloud, "fe-br", VTEP)?;
        if let Some((mac, state)) = &have
            && *mac == want
        {
            return Ok(state.clone());
        }
        if Instant::now() > deadline {
            bail!("{why}: the cloud node has {have:?} for {VTEP}, expected {want}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn addresses_in(ns: &Netns, dev: &str) -> Result<String> {
    ns.ip(&["-4", "-o", "addr", "show", "dev", dev])
}

/// The topology of the module doc: a cloud node `cloud` with bridge
/// `fe-br` (10.9.0.1) and two connectors, `conn-<first>` at 10.9.0.11 and
/// `conn-<second>` at 10.9.0.12, each on its `eth0`.
fn cloud_lan(cloud: &str, first: &str, second: &str) -> Result<(Netns, Netns, Netns)> {
    let cloud = Netns::new(cloud)?;
    let a = Netns::new(&format!("conn-{first}"))?;
    let b = Netns::new(&format!("conn-{second}"))?;
    cloud.bridge("fe-br")?;
    cloud.add_addr("fe-br", "10.9.0.1/24")?;
    for (connector, name, address) in [(&a, first, "10.9.0.11/24"), (&b, second, "10.9.0.12/24")] {
        let port = format!("fe-{name}");
        veth_pair(connector, "eth0", &cloud, &port)?;
        cloud.attach_to_bridge(&port, "fe-br")?;
        connector.add_addr("eth0", address)?;
    }
    Ok((cloud, a, b))
}

#[test]
fn a_claimed_vtep_address_moves_the_neighbours_arp_entry_to_us() -> Result<()> {
    let (cloud, old, new) = cloud_lan("cloud", "old", "new")?;
    let old_mac = old.mac("eth0")?;
    let new_mac = new.mac("eth0")?;

    // The old connector holds the address and the cloud node learns its MAC.
    old.add_addr("eth0", &format!("{VTEP}/32"))?;
    let reached = ping(&cloud, VTEP, 1, Duration::from_millis(100))?;
    assert!(reached.all_received(), "{reached:?}");
    wait_for_neighbour(&cloud, &old_mac, "after pinging the old holder")?;

    // It dies (its NIC goes silent); we claim the address.
    old.ip(&["link", "set", "dev", "eth0", "down"])?;
    new.enter(|| claim("eth0", VTEP))?;
    let state = wait_for_neighbour(&cloud, &new_mac, "after our gratuitous ARP")?;
    // STALE: updated by a broadcast request (our GARP), not learnt from an
    // answer to the cloud node's own ARP request (that would be REACHABLE).
    assert!(state.contains("STALE"), "neighbour state {state}");
    let addrs = addresses_in(&new, "eth0")?;
    assert!(
        addrs.contains(&format!("{VTEP}/32")) && addrs.contains("eth0:fe"),
        "{addrs}"
    );
    assert_eq!(new.enter(|| held("eth0"))?, BTreeSet::from([VTEP]));
    // And the traffic for it reaches us.
    let reached = ping(&cloud, VTEP, 1, Duration::from_millis(100))?;
    assert!(reached.all_received(), "{reached:?}");

    // Claiming again changes nothing; the node's own address is never "held".
    new.enter(|| claim("eth0", VTEP))?;
    assert_eq!(new.enter(|| held("eth0"))?, BTreeSet::from([VTEP]));
    assert_eq!(
        addresses_in(&new, "eth0")?
            .matches(&VTEP.to_string())
            .count(),
        1
    );

    // Release removes it, and releasing again is no error.
    assert!(new.enter(|| release("eth0", VTEP))?);
    assert!(!addresses_in(&new, "eth0")?.contains(&VTEP.to_string()));
    assert!(new.enter(|| held("eth0"))?.is_empty());
    assert!(!new.enter(|| release("eth0", VTEP))?);

    // An address the operator put there is not ours to remove.
    new.add_addr("eth0", "10.9.0.101/32")?;
    let foreign = new
        .enter(|| release("eth0", Ipv4Addr::new(10, 9, 0, 101)))
        .expect_err("not ours");
    assert!(
        format!("{foreign:#}").contains("not added by fabedge"),
        "{foreign:#}"
    );
    assert!(addresses_in(&new, "eth0")?.contains("10.9.0.101/32"));
    assert!(new.enter(|| held("eth0"))?.is_empty());

    // Errors name the interface.
    let missing = new
        .enter(|| claim("eth9", VTEP))
        .expect_err("no such interface");
    assert!(format!("{missing:#}").contains("eth9"), "{missing:#}");
    Ok(())
}

/// Before giving a borrowed address back, the successor asks the network
/// who else holds it: nobody while the returning connector only answers
/// probes; its MAC once the address is on its NIC again.
#[test]
fn a_successor_hears_the_owner_holding_its_vtep_address_again_before_giving_it_back() -> Result<()>
{
    let (_cloud, owner, heir) = cloud_lan("cloud-hc", "owner", "heir")?;
    let owner_mac = owner.mac("eth0")?;
    // The heir holds the owner's address (it took it over).
    heir.enter(|| claim("eth0", VTEP))?;
    let mut check = heir.enter(|| HolderCheck::open("eth0"))?;

    // The owner is up but does not hold its address yet: nobody answers,
    // however long we ask.
    let deadline = Instant::now() + ASK_EVERY * 5;
    while Instant::now() < deadline {
        assert_eq!(heir.enter(|| check.other_holder(VTEP))?, None);
        std::thread::sleep(Duration::from_millis(20));
    }

    // The owner adds its address (as its agent does at start): we hear it.
    owner.add_addr("eth0", &format!("{VTEP}/32"))?;
    let deadline = Instant::now() + DEADLINE;
    let heard = loop {
        if let Some(mac) = heir.enter(|| check.other_holder(VTEP))? {
            break mac;
        }
        if Instant::now() > deadline {
            bail!(
                "the heir never heard {} answer for {VTEP}",
                format_mac(&owner_mac)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(format_mac(&heard), format_mac(&owner_mac));
    // Our own address is ours alone: the heir never hears itself.
    let own = Ipv4Addr::new(10, 9, 0, 12);
    for _ in 0..3 {
        assert_eq!(heir.enter(|| check.other_holder(own))?, None);
        std::thread::sleep(ASK_EVERY);
    }
    Ok(())
}
