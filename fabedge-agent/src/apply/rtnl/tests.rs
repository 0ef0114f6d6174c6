//! Message bytes without a kernel, then the real thing in a private network
//! namespace: what our netlink writers leave behind must read back through
//! iproute2 exactly as what the `ip` commands they replace left behind.

use std::{net::Ipv4Addr, process::Command};

use ipnet::Ipv4Net;
use serde_json::Value;

use super::msg::{self, LinkKind, NLM_F_ACK_TLVS, NLM_F_CAPPED};
use crate::{
    apply::net::{self, RTPROT_FABEDGE},
    plan::KernelRoute,
};

thread_local! {
    /// Change requests this thread sent the kernel (every request but reads).
    pub(super) static WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

fn addr(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

#[test]
fn vxlan_link_request_carries_external_port_and_no_learning() {
    let bytes = msg::new_link("fe-tunnel", &LinkKind::VxlanExternal { port: 8472 }, 7);
    assert_eq!(
        u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
        bytes.len()
    );
    let attrs: Vec<(u16, Vec<u8>)> = msg::attrs(&bytes[16 + 16..])
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    assert_eq!(attrs[0], (3, b"fe-tunnel\0".to_vec()));
    let (kind, info) = &attrs[1];
    assert_eq!(*kind, 18, "IFLA_LINKINFO");
    let info: Vec<(u16, &[u8])> = msg::attrs(info).collect();
    assert_eq!(info[0], (1, &b"vxlan\0"[..]));
    let data: Vec<(u16, &[u8])> = msg::attrs(info[1].1).collect();
    assert_eq!(
        data,
        vec![
            (25, &[1u8][..]),
            (7, &[0u8][..]),
            (15, &8472u16.to_be_bytes()[..])
        ]
    );
}

/// What `replace_addr_owned` sends reads back through the dump parser with
/// its owner marks, as the kernel echoes them in `RTM_NEWADDR`.
#[test]
fn an_owned_address_carries_its_label_and_protocol() {
    let bytes = msg::replace_addr_owned(4, net("10.9.0.100/32"), Some("eth0:fe"), 0xfe, 3);
    let detail = msg::parse_addr_detail(&bytes[16..]).unwrap();
    assert_eq!(detail.info.index, 4);
    assert_eq!(detail.info.address, net("10.9.0.100/32"));
    assert_eq!(detail.label.as_deref(), Some("eth0:fe"));
    assert_eq!(detail.proto, Some(0xfe));
    let unlabelled = msg::replace_addr_owned(4, net("10.9.0.100/32"), None, 0xfe, 3);
    assert_eq!(
        msg::parse_addr_detail(&unlabelled[16..]).unwrap().label,
        None
    );
    let delete = msg::del_addr(4, net("10.9.0.100/32"), 5);
    assert_eq!(u16::from_ne_bytes([delete[4], delete[5]]), msg::RTM_DELADDR);
    assert_eq!(delete[16 + 1], 32, "prefix length");
}

#[test]
fn error_answer_yields_errno_and_the_kernels_text() {
    // nlmsgerr: errno, the (capped) request header; then NLMSGERR_ATTR_MSG.
    let mut payload = (-libc::ENETUNREACH).to_ne_bytes().to_vec();
    payload.extend_from_slice(&[0u8; 16]);
    let text = b"Nexthop has invalid gateway\0";
    payload.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
    payload.extend_from_slice(&1u16.to_ne_bytes());
    payload.extend_from_slice(text);
    assert_eq!(
        msg::parse_error(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload),
        Some((
            -libc::ENETUNREACH,
            Some("Nexthop has invalid gateway".to_owned())
        ))
    );
    assert_eq!(
        msg::parse_error(0, &payload[..20]),
        Some((-libc::ENETUNREACH, None))
    );
    assert_eq!(msg::parse_error(0, &[1, 2]), None, "truncated");
}

#[test]
fn garbage_attributes_end_the_walk_without_panicking() {
    for bytes in [&[0xff, 0xff, 1, 0][..], &[2, 0, 1, 0], &[8, 0, 1], &[]] {
        assert_eq!(msg::attrs(bytes).count(), 0, "{bytes:?}");
    }
    assert_eq!(msg::parse_link(&[0; 3]), None);
    assert_eq!(msg::parse_route(&[2, 24, 0]), None);
}

/// Run `body` on a thread of its own in a fresh network namespace (the
/// namespace dies with the thread; children it spawns run inside it).
fn in_fresh_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): these tests need root (CAP_SYS_ADMIN)");
        body()
    })
    .join()
    .expect("netns thread panicked")
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An uplink with 192.0.2.1/24 for routes via a gateway (a veth: the
/// dummy module may be missing).
fn uplink() {
    ip(&[
        "link",
        "add",
        "eth9",
        "type",
        "veth",
        "peer",
        "name",
        "eth9-peer",
    ]);
    ip(&["addr", "add", "192.0.2.1/24", "dev", "eth9"]);
    ip(&["link", "set", "eth9-peer", "up"]);
    ip(&["link", "set", "eth9", "up"]);
}

/// Everything iproute2 reports about our objects, minus what differs by
/// chance between two namespaces (indexes, random MACs, running timers).
fn observed() -> Value {
    fn scrub(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.retain(|key, _| {
                    !matches!(
                        key.as_str(),
                        "ifindex" | "link_index" | "bridge_id" | "root_id"
                    ) && !key.ends_with("_timer")
                });
                map.values_mut().for_each(scrub);
            }
            Value::Array(items) => items.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    let json = |args: &[&str]| -> Value { serde_json::from_str(&ip(args)).unwrap() };
    let mut bridge = json(&["-d", "-j", "link", "show", "dev", "br-fabedge"]);
    // The bridge's MAC is random (it has no ports).
    bridge[0].as_object_mut().unwrap().remove("address");
    let mut all = serde_json::json!({
        "bridge": bridge,
        "vxlan": json(&["-d", "-j", "link", "show", "dev", "fe-tunnel"]),
        "addresses": json(&["-4", "-j", "addr", "show", "dev", "br-fabedge"]),
        "routes": json(&["-j", "-4", "route", "show", "proto", "0xfe"]),
    });
    scrub(&mut all);
    all
}

fn planned_routes() -> Vec<KernelRoute> {
    vec![
        KernelRoute {
            dst: net("10.244.2.0/24"),
            dev: Some("fe-tunnel".into()),
            via: None,
            src: Some(addr("10.234.1.1")),
        },
        KernelRoute {
            dst: net("10.244.3.0/24"),
            dev: None,
            via: Some(addr("192.0.2.2")),
            src: None,
        },
        KernelRoute {
            dst: net("10.244.4.5/32"),
            dev: Some("eth9".into()),
            via: Some(addr("192.0.2.3")),
            src: Some(addr("10.234.1.1")),
        },
    ]
}

/// What the agent did before netlink: the iproute2 commands, verbatim.
fn with_iproute2() -> Value {
    uplink();
    ip(&["link", "add", "br-fabedge", "type", "bridge"]);
    ip(&["link", "set", "br-fabedge", "mtu", "1400"]);
    ip(&["addr", "replace", "10.234.1.1/24", "dev", "br-fabedge"]);
    ip(&["link", "set", "br-fabedge", "up"]);
    ip(&[
        "link",
        "add",
        "fe-tunnel",
        "type",
        "vxlan",
        "external",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ip(&[
        "link",
        "set",
        "fe-tunnel",
        "address",
        "02:fe:0a:00:00:01",
        "mtu",
        "1400",
        "arp",
        "off",
        "up",
    ]);
    let proto = RTPROT_FABEDGE.to_string();
    ip(&[
        "route",
        "replace",
        "10.244.2.0/24",
        "proto",
        &proto,
        "dev",
        "fe-tunnel",
        "scope",
        "link",
        "src",
        "10.234.1.1",
    ]);
    ip(&[
        "route",
        "replace",
        "10.244.3.0/24",
        "proto",
        &proto,
        "via",
        "192.0.2.2",
    ]);
    ip(&[
        "route",
        "replace",
        "10.244.4.5/32",
        "proto",
        &proto,
        "dev",
        "eth9",
        "via",
        "192.0.2.3",
        "src",
        "10.234.1.1",
    ]);
    observed()
}

fn with_netlink() -> Value {
    uplink();
    // Twice: the second pass must find everything in place and change nothing.
    for pass in 0..2 {
        WRITES.with(|w| w.set(0));
        net::ensure_bridge("br-fabedge", net("10.234.1.1/24"), Some(1400)).unwrap();
        net::ensure_vxlan_external("fe-tunnel", 8472, "02:fe:0a:00:00:01", 1400).unwrap();
        let installed = net::our_routes().unwrap();
        for route in planned_routes() {
            if !installed.iter().any(|r| net::route_matches(&route, r)) {
                net::replace_route(&route).unwrap();
            }
        }
        let writes = WRITES.with(|w| w.get());
        match pass {
            0 => assert!(writes > 0),
            _ => assert_eq!(
                writes, 0,
                "a second apply of the same state wrote to the kernel"
            ),
        }
    }
    observed()
}

#[test]
fn netlink_writers_leave_what_the_ip_commands_left_and_rewrite_nothing() {
    let reference = in_fresh_netns(with_iproute2);
    let ours = in_fresh_netns(with_netlink);
    assert!(
        ours == reference,
        "ours:\n{ours:#}\niproute2's:\n{reference:#}"
    );
    assert_eq!(reference["routes"].as_array().map(Vec::len), Some(3));
}

#[test]
fn our_routes_read_back_as_planned_and_go_away_on_delete() {
    in_fresh_netns(|| {
        uplink();
        net::ensure_vxlan_external("fe-tunnel", 8472, "02:fe:0a:00:00:01", 1400).unwrap();
        net::ensure_bridge("br-fabedge", net("10.234.1.1/24"), Some(1400)).unwrap();
        // Someone else's route is never ours.
        ip(&["route", "add", "10.99.0.0/16", "via", "192.0.2.9"]);
        for route in planned_routes() {
            net::replace_route(&route).unwrap();
        }
        let mut read = net::our_routes().unwrap();
        read.sort();
        let mut expected = planned_routes();
        // A route without a device reads back with the one the kernel chose.
        expected[1].dev = Some("eth9".into());
        expected.sort();
        assert_eq!(read, expected);

        for route in &read {
            net::delete_route(route).unwrap();
        }
        // Already gone: still fine (apply may race a manual cleanup).
        net::delete_route(&read[0]).unwrap();
        assert_eq!(net::our_routes().unwrap(), vec![]);
        assert!(ip(&["-4", "route", "show", "10.99.0.0/16"]).contains("192.0.2.9"));

        assert!(net::delete_link_if_present("fe-tunnel").unwrap());
        assert!(!net::delete_link_if_present("fe-tunnel").unwrap());
        assert_eq!(net::link("fe-tunnel").unwrap(), None);
    });
}

#[test]
fn a_refused_route_names_itself_the_errno_and_the_kernels_reason() {
    let (unreachable, missing_dev) = in_fresh_netns(|| {
        uplink();
        let unreachable = net::replace_route(&KernelRoute {
            dst: net("10.244.2.0/24"),
            dev: Some("eth9".into()),
            via: Some(addr("10.99.0.1")),
            src: None,
        })
        .unwrap_err();
        let missing_dev = net::replace_route(&KernelRoute {
            dst: net("10.244.2.0/24"),
            dev: Some("fe-tunnel".into()),
            via: None,
            src: None,
        })
        .unwrap_err();
        (format!("{unreachable:#}"), format!("{missing_dev:#}"))
    });
    assert_eq!(
        unreachable,
        "route 10.244.2.0/24 via 10.99.0.1 dev eth9: Network is unreachable (os error 101): \
         Nexthop has invalid gateway"
    );
    assert_eq!(
        missing_dev,
        "route 10.244.2.0/24 dev fe-tunnel: device fe-tunnel does not exist"
    );
}

#[test]
fn a_vxlan_device_of_the_wrong_shape_is_recreated_and_a_foreign_bridge_name_refused() {
    in_fresh_netns(|| {
        ip(&[
            "link",
            "add",
            "fe-tunnel",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "4789",
        ]);
        net::ensure_vxlan_external("fe-tunnel", 8472, "02:fe:0a:00:00:01", 1400).unwrap();
        let link = net::require_link("fe-tunnel").unwrap();
        assert_eq!(
            (
                link.vxlan_external,
                link.vxlan_port,
                link.mtu,
                link.up,
                link.noarp
            ),
            (true, Some(8472), 1400, true, true)
        );
        assert_eq!(link.mac.as_deref(), Some("02:fe:0a:00:00:01"));

        ip(&[
            "link",
            "add",
            "br-fabedge",
            "type",
            "veth",
            "peer",
            "name",
            "br-peer",
        ]);
        let err = net::ensure_bridge("br-fabedge", net("10.234.1.1/24"), None).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "br-fabedge exists but is a Some(\"veth\"), not a bridge: remove it or choose \
             another bridge name"
        );
    });
}

#[test]
fn creating_an_existing_link_is_refused_with_its_name_and_errno() {
    let err = in_fresh_netns(|| {
        // Created twice: the second one is refused (NLM_F_EXCL).
        net::add_link("fe-a", &LinkKind::Bridge).unwrap();
        format!(
            "{:#}",
            net::add_link("fe-a", &LinkKind::Bridge).unwrap_err()
        )
    });
    assert_eq!(err, "creating bridge fe-a: File exists (os error 17)");
}

#[test]
fn a_bridge_ports_veth_peer_and_its_address_in_another_netns_are_read() {
    let pod = format!("fe-rtnl-pod-{}", std::process::id());
    let result = in_fresh_netns({
        let pod = pod.clone();
        move || {
            ip(&["netns", "add", &pod]);
            ip(&["link", "add", "br-t", "type", "bridge"]);
            ip(&[
                "link", "add", "vh-t", "type", "veth", "peer", "name", "eth0", "netns", &pod,
            ]);
            ip(&["link", "set", "vh-t", "master", "br-t"]);
            ip(&["-n", &pod, "addr", "add", "10.234.1.9/24", "dev", "eth0"]);
            ip(&["-n", &pod, "link", "set", "eth0", "up"]);
            let mut nl = super::Rtnl::open_strict().expect("strict socket");
            let links = nl.links().expect("links");
            let bridge = links.iter().find(|l| l.name == "br-t").expect("bridge");
            let port = links.iter().find(|l| l.name == "vh-t").expect("veth");
            let (peer, netnsid) = (
                port.link.expect("peer"),
                port.link_netnsid.expect("netnsid"),
            );
            let addrs = nl.addrs_in(netnsid, peer).expect("addresses in the pod");
            let gone = nl.addrs_in(netnsid, 999_999).map_err(|e| e.errno());
            (
                port.master == Some(bridge.index),
                bridge.master,
                addrs,
                gone,
            )
        }
    });
    ip(&["netns", "del", &pod]);
    let (is_port, bridge_master, addrs, gone) = result;
    assert!(is_port, "vh-t is a port of br-t");
    assert_eq!(bridge_master, None);
    assert_eq!(
        addrs.iter().map(|a| a.address).collect::<Vec<_>>(),
        vec![net("10.234.1.9/24")],
        "only the peer's address, not the pod's loopback"
    );
    assert_eq!(gone, Err(Some(libc::ENODEV)), "a link that is not there");
}

#[test]
fn a_pods_link_and_namespace_id_are_asked_in_the_kernels_layout() {
    let link = msg::get_link_in(3, 2, 9);
    assert_eq!(
        u16::from_ne_bytes(link[4..6].try_into().unwrap()),
        msg::RTM_GETLINK
    );
    assert_eq!(
        u32::from_ne_bytes(link[16 + 4..16 + 8].try_into().unwrap()),
        2
    );
    let attrs: Vec<(u16, Vec<u8>)> = msg::attrs(&link[16 + 16..])
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    assert_eq!(
        attrs,
        [(46, 3i32.to_ne_bytes().to_vec())],
        "IFLA_TARGET_NETNSID"
    );

    let nsid = msg::get_nsid(7, 9);
    assert_eq!(
        u16::from_ne_bytes(nsid[4..6].try_into().unwrap()),
        msg::RTM_GETNSID
    );
    let attrs: Vec<(u16, Vec<u8>)> = msg::attrs(&nsid[16 + 4..])
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    assert_eq!(attrs, [(3, 7u32.to_ne_bytes().to_vec())], "NETNSA_FD");
    // The answer: rtgenmsg, then NETNSA_NSID; -1 when none is assigned.
    let mut answer = vec![0u8; 4];
    answer.extend_from_slice(&8u16.to_ne_bytes());
    answer.extend_from_slice(&1u16.to_ne_bytes());
    answer.extend_from_slice(&5i32.to_ne_bytes());
    assert_eq!(msg::parse_nsid(&answer), Some(5));
    assert_eq!(msg::parse_nsid(&answer[..4]), None);
}

/// The tunnel table and its rule read back exactly as written: a second
/// sync of the same prefixes sends the kernel nothing (the rule is not
/// taken down and put back on every apply, which would leave marked
/// packets to the main table for that moment), and teardown leaves nothing.
#[test]
fn the_tunnel_table_reads_back_as_written_and_a_second_sync_writes_nothing() {
    use std::collections::BTreeSet;

    use crate::apply::tunnel_table::{self, TunnelTable};
    in_fresh_netns(|| {
        uplink();
        net::ensure_vxlan_external("fe-tunnel", 8472, "02:fe:0a:00:00:01", 1400).unwrap();
        let wanted: BTreeSet<Ipv4Net> = [net("10.234.2.0/24"), net("10.2.0.12/32")].into();
        assert_eq!(tunnel_table::sync(&wanted).unwrap(), 3);
        assert_eq!(
            TunnelTable::read().unwrap(),
            TunnelTable {
                prefixes: wanted.clone(),
                rule: true
            }
        );
        let before = WRITES.get();
        assert_eq!(tunnel_table::sync(&wanted).unwrap(), 0);
        assert_eq!(WRITES.get(), before, "a synced table was written again");
        let rules = ip(&["rule", "show"]);
        assert!(
            rules.contains("4011:\tfrom all fwmark 0xe00/0xf00 lookup 4011 proto 254"),
            "{rules}"
        );
        let one: BTreeSet<Ipv4Net> = [net("10.234.2.0/24")].into();
        assert_eq!(tunnel_table::sync(&one).unwrap(), 1);
        assert_eq!(tunnel_table::teardown().unwrap().len(), 2);
        assert_eq!(TunnelTable::read().unwrap(), TunnelTable::default());
        assert!(!ip(&["rule", "show"]).contains("4011"));
        assert!(ip(&["route", "show", "table", "4011"]).trim().is_empty());
    });
}
