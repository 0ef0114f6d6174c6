//! Unit tests of the namespace harness: real namespaces, links, echo servers and kernel checks of
//! built packets.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::packet::Mac;

use super::capture::PacketSocket;
use super::cleanup::{cleanup_stale, delete_netns, list_netns};
use super::commands::run_ok;
use super::links::{NextHop, veth_pair};
use super::namespace::Netns;
use super::ping::{parse_ping_output, ping};
use super::servers::{TcpEchoServer, UdpEchoServer, tcp_echo, udp_echo};

use std::sync::Mutex;

use crate::packet::{
    ETH_HEADER_LEN, Frame, IcmpError, TcpFlags, UdpChecksum, icmp_code, icmp_type, ip_proto,
    parse_eth,
};

const SHORT: Duration = Duration::from_secs(3);

fn addr(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

/// Two namespaces joined by a veth: a = 10.99.0.1/24 on eth0, b = 10.99.0.2/24 on eth0.
fn joined_pair(test: &str) -> (Netns, Netns) {
    let a = Netns::new(&format!("{test}-a")).unwrap();
    let b = Netns::new(&format!("{test}-b")).unwrap();
    veth_pair(&a, "eth0", &b, "eth0").unwrap();
    a.add_addr("eth0", "10.99.0.1/24").unwrap();
    b.add_addr("eth0", "10.99.0.2/24").unwrap();
    (a, b)
}

/// Whether `condition` becomes true within 5 seconds.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

fn assert_absent_from_ip_netns_list(names: &[String]) {
    let listed = list_netns().unwrap();
    for name in names {
        assert!(
            !listed.contains(name),
            "{name} is still in `ip netns list`: {listed:?}"
        );
    }
}

#[test]
fn two_namespaces_joined_by_a_veth_ping_each_other() {
    let (a, b) = joined_pair("veth");
    let there = ping(&a, addr("10.99.0.2"), 3, Duration::from_millis(50)).unwrap();
    assert_eq!(
        (there.sent, there.received, there.rtts.len()),
        (3, 3, 3),
        "{there:?}"
    );
    let back = ping(&b, addr("10.99.0.1"), 2, Duration::from_millis(50)).unwrap();
    assert!(back.all_received(), "{back:?}");
}

#[test]
fn ping_to_a_silent_address_reports_loss_within_its_deadline() {
    let (a, _b) = joined_pair("loss");
    let started = Instant::now();
    let result = ping(&a, addr("10.99.0.77"), 2, Duration::from_millis(100)).unwrap();
    assert_eq!((result.sent, result.received), (2, 0), "{result:?}");
    assert!(!result.all_received());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn ping_without_a_route_is_an_error_naming_the_command() {
    let lonely = Netns::new("noroute").unwrap();
    let error = ping(&lonely, addr("192.0.2.1"), 1, Duration::from_millis(100)).unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("ping") && message.contains(lonely.name()),
        "{message}"
    );
}

#[test]
fn bridge_joins_three_namespaces() {
    let switch = Netns::new("switch").unwrap();
    switch.bridge("br0").unwrap();
    let hosts: Vec<Netns> = (1..=3)
        .map(|i| Netns::new(&format!("host{i}")).unwrap())
        .collect();
    for (i, host) in hosts.iter().enumerate() {
        let port = format!("port{}", i + 1);
        veth_pair(host, "eth0", &switch, &port).unwrap();
        switch.attach_to_bridge(&port, "br0").unwrap();
        host.add_addr("eth0", &format!("10.98.0.{}/24", i + 1))
            .unwrap();
    }
    for (i, host) in hosts.iter().enumerate() {
        for j in (1..=3).filter(|j| *j != i + 1) {
            let result = ping(
                host,
                addr(&format!("10.98.0.{j}")),
                2,
                Duration::from_millis(50),
            )
            .unwrap();
            assert!(
                result.all_received(),
                "host{} → 10.98.0.{j}: {result:?}",
                i + 1
            );
        }
    }
    let ports = switch.ip(&["-j", "link", "show", "master", "br0"]).unwrap();
    for port in ["port1", "port2", "port3"] {
        assert!(ports.contains(port), "{port} missing from br0: {ports}");
    }
}

#[test]
fn router_namespace_forwards_between_two_subnets() {
    let left = Netns::new("left").unwrap();
    let router = Netns::new("router").unwrap();
    let right = Netns::new("right").unwrap();
    veth_pair(&left, "eth0", &router, "to-left").unwrap();
    veth_pair(&right, "eth0", &router, "to-right").unwrap();
    left.add_addr("eth0", "10.97.1.2/24").unwrap();
    router.add_addr("to-left", "10.97.1.1/24").unwrap();
    right.add_addr("eth0", "10.97.2.2/24").unwrap();
    router.add_addr("to-right", "10.97.2.1/24").unwrap();
    left.add_route("default", NextHop::Gateway(addr("10.97.1.1")))
        .unwrap();
    right
        .add_route(
            "10.97.1.0/24",
            NextHop::GatewayOnDevice(addr("10.97.2.1"), "eth0"),
        )
        .unwrap();

    // A new namespace copies IPv4 settings from the host's (with
    // net.core.devconf_inherit_init_net at 0), which may forward already:
    // set left's own value, so the per-namespace check below means something.
    left.set_sysctl("net.ipv4.ip_forward", "0").unwrap();
    router.set_sysctl("net.ipv4.ip_forward", "0").unwrap();
    let blocked = ping(&left, addr("10.97.2.2"), 1, Duration::from_millis(100)).unwrap();
    assert_eq!(blocked.received, 0, "forwarding is off: {blocked:?}");

    router.set_sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(router.sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        left.sysctl("net.ipv4.ip_forward").unwrap(),
        "0",
        "sysctls are per namespace"
    );
    let through = ping(&left, addr("10.97.2.2"), 2, Duration::from_millis(50)).unwrap();
    assert!(through.all_received(), "{through:?}");
}

#[test]
fn udp_echo_round_trip() {
    let (a, b) = joined_pair("udp");
    let server = UdpEchoServer::start(&b, SocketAddrV4::new(addr("10.99.0.2"), 0)).unwrap();
    let reply = udp_echo(&a, server.local_addr(), b"hello over udp", SHORT).unwrap();
    assert_eq!(reply, b"hello over udp");
    assert!(server.requests_served() >= 1);
}

#[test]
fn udp_echo_without_a_server_fails_quickly() {
    let (a, _b) = joined_pair("udpnone");
    let started = Instant::now();
    let error = udp_echo(
        &a,
        SocketAddrV4::new(addr("10.99.0.2"), 9),
        b"anyone?",
        SHORT,
    )
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("port unreachable"),
        "{error:#}"
    );
    assert!(started.elapsed() < SHORT);
}

#[test]
fn tcp_echo_round_trip() {
    let (a, b) = joined_pair("tcp");
    let server = TcpEchoServer::start(&b, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7007)).unwrap();
    let big: Vec<u8> = (0..4_000_000u32).map(|i| i as u8).collect();
    for payload in [&b"hello over tcp"[..], &big] {
        let reply = tcp_echo(
            &a,
            SocketAddrV4::new(addr("10.99.0.2"), 7007),
            payload,
            SHORT,
        )
        .unwrap();
        assert!(
            reply == payload,
            "echo of {} bytes came back as {} bytes",
            payload.len(),
            reply.len()
        );
    }
    drop(server);
    // Usually "connection refused"; a reset if a child forked by a concurrent test
    // briefly held the listening socket open.
    let late = tcp_echo(
        &a,
        SocketAddrV4::new(addr("10.99.0.2"), 7007),
        b"late",
        SHORT,
    );
    assert!(late.is_err(), "echo after the server stopped: {late:?}");
}

#[test]
fn enter_runs_inside_the_namespace_and_returns_the_result() {
    let ns = Netns::new("enter").unwrap();
    // /proc/net follows the process's main thread; thread-self follows this thread.
    let links = ns
        .enter(|| Ok(fs::read_to_string("/proc/thread-self/net/dev")?))
        .unwrap();
    assert!(links.contains("lo:"));
    assert!(
        !links.contains("eth0"),
        "only loopback exists in a fresh namespace: {links}"
    );
    let error = ns
        .enter(|| -> Result<()> { bail!("inner failure") })
        .unwrap_err();
    assert!(
        format!("{error:#}").contains(ns.name()) && format!("{error:#}").contains("inner failure")
    );
}

#[test]
fn exec_spawn_and_errors_name_the_command() {
    let ns = Netns::new("exec").unwrap();
    assert_eq!(ns.run_ok("echo", &["inside"]).unwrap().trim(), "inside");
    let error = ns
        .run_ok("sh", &["-c", "echo oops >&2; exit 3"])
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("exit 3") || message.contains("exit status: 3"),
        "{message}"
    );
    assert!(
        message.contains("oops") && message.contains(ns.name()),
        "{message}"
    );

    let mut sleeper = ns.spawn("sleep", &["600"]).unwrap();
    sleeper.ensure_running().unwrap();
    // The child joins the namespace a moment after it starts.
    let sleeper_pid = sleeper.pid().to_string();
    let in_namespace = || {
        let listed = run_ok("ip", &["netns", "pids", ns.name()]).unwrap();
        listed.lines().any(|pid| pid.trim() == sleeper_pid)
    };
    assert!(
        eventually(in_namespace),
        "sleep (pid {sleeper_pid}) never showed up in {}",
        ns.name()
    );

    let mut quitter = ns.spawn("sh", &["-c", "echo bye; exit 1"]).unwrap();
    assert!(
        eventually(|| quitter.ensure_running().is_err()),
        "sh should have exited"
    );
    let error = quitter.ensure_running().unwrap_err();
    assert!(format!("{error:#}").contains("bye"), "{error:#}");
}

#[test]
fn bad_names_are_refused_with_the_fix() {
    assert!(
        Netns::new("a/b")
            .unwrap_err()
            .to_string()
            .contains("letters, digits")
    );
    let (a, b) = (
        Netns::new("names-a").unwrap(),
        Netns::new("names-b").unwrap(),
    );
    let error = veth_pair(&a, "a-very-long-ifname", &b, "eth0").unwrap_err();
    assert!(error.to_string().contains("at most 15"), "{error}");
    let error = a.add_addr("lo", "10.0.0.1").unwrap_err();
    assert!(error.to_string().contains("prefix length"), "{error}");
    let error = a.set_sysctl("kernel.panic", "1").unwrap_err();
    assert!(error.to_string().contains("only net.*"), "{error}");
    let error = a.set_sysctl("net.ipv4.no_such_knob", "1").unwrap_err();
    assert!(
        format!("{error:#}").contains("net.ipv4.no_such_knob"),
        "{error:#}"
    );
}

#[test]
fn dropped_namespaces_disappear_with_their_processes() {
    let (a, b) = joined_pair("drop");
    let names = vec![a.name().to_owned(), b.name().to_owned()];
    // A process the harness did not start itself, detached from our pipes.
    let orphan: i32 = a
        .run_ok("sh", &["-c", "sleep 600 >/dev/null 2>&1 & echo $!"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let listed = list_netns().unwrap();
    assert!(names.iter().all(|name| listed.contains(name)), "{listed:?}");
    drop(a);
    b.delete().unwrap();
    assert_absent_from_ip_netns_list(&names);
    let gone = eventually(|| {
        !Path::new(&format!("/proc/{orphan}")).exists()
            || fs::read_to_string(format!("/proc/{orphan}/stat"))
                .is_ok_and(|stat| stat.contains(") Z "))
    });
    assert!(gone, "sleep (pid {orphan}) survived its namespace");
}

#[test]
fn namespaces_are_removed_even_when_the_test_panics() {
    let names = Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(|| {
        let (a, b) = joined_pair("panic");
        names
            .lock()
            .unwrap()
            .extend([a.name().to_owned(), b.name().to_owned()]);
        panic!("a failing assertion");
    });
    assert!(outcome.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert_absent_from_ip_netns_list(&names);
}

/// A namespace made with plain `ip netns add`, deleted on drop.
struct RawNamespace(String);

impl RawNamespace {
    fn add(name: String) -> Self {
        run_ok("ip", &["netns", "add", &name]).unwrap();
        Self(name)
    }
}

impl Drop for RawNamespace {
    fn drop(&mut self) {
        if list_netns().is_ok_and(|names| names.contains(&self.0)) {
            let _ = delete_netns(&self.0);
        }
    }
}

#[test]
fn cleanup_stale_removes_only_namespaces_of_dead_runs() {
    // A prefix of this process's own, so test runs going on at the same time
    // neither see these namespaces nor are touched by this cleanup.
    let own_pid = std::process::id();
    let prefix = format!("fe-x{own_pid}-");
    let dead_pid = (2..32768)
        .rev()
        .find(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        .unwrap();
    let stale = RawNamespace::add(format!("{prefix}{dead_pid}-0-stale"));
    let live = RawNamespace::add(format!("{prefix}{own_pid}-0-live"));
    let unnumbered = RawNamespace::add(format!("{prefix}manual"));

    let removed = cleanup_stale(&prefix).unwrap();
    assert_eq!(removed, vec![stale.0.clone()]);
    let listed = list_netns().unwrap();
    assert!(!listed.contains(&stale.0), "{listed:?}");
    assert!(
        listed.contains(&live.0) && listed.contains(&unnumbered.0),
        "{listed:?}"
    );
    assert!(cleanup_stale("").is_err());
}

#[test]
fn ping_output_of_iputils_and_busybox_parses() {
    let iputils = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
        64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.051 ms\n\
        64 bytes from 10.0.0.2: icmp_seq=3 ttl=64 time=1.50 ms\n\n\
        --- 10.0.0.2 ping statistics ---\n\
        3 packets transmitted, 2 received, 33.3333% packet loss, time 2003ms\n\
        rtt min/avg/max/mdev = 0.051/0.775/1.500/0.724 ms\n";
    let parsed = parse_ping_output(iputils).unwrap();
    assert_eq!((parsed.sent, parsed.received), (3, 2));
    assert_eq!(
        parsed.rtts,
        vec![Duration::from_micros(51), Duration::from_micros(1500)]
    );

    let busybox = "PING 10.0.0.2 (10.0.0.2): 56 data bytes\n\
        64 bytes from 10.0.0.2: seq=0 ttl=64 time=0.088 ms\n\n\
        --- 10.0.0.2 ping statistics ---\n\
        1 packets transmitted, 1 packets received, 0% packet loss\n";
    let parsed = parse_ping_output(busybox).unwrap();
    assert_eq!((parsed.sent, parsed.received, parsed.rtts.len()), (1, 1, 1));

    assert!(parse_ping_output("ping: unknown host").is_err());
}

// --- The kernel as an independent oracle for crate::packet ---

/// The MACs and addresses of a joined pair, for building frames a → b.
fn wire(a: &Netns, b: &Netns) -> (Mac, Mac, Ipv4Addr, Ipv4Addr) {
    (
        a.mac("eth0").unwrap(),
        b.mac("eth0").unwrap(),
        addr("10.99.0.1"),
        addr("10.99.0.2"),
    )
}

#[test]
fn kernel_accepts_udp_checksums_built_here_and_drops_corrupt_ones() {
    let (a, b) = joined_pair("kudp");
    let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
    let receiver = b
        .enter(|| Ok(UdpSocket::bind(SocketAddrV4::new(ip_b, 5555))?))
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let injector = PacketSocket::open(&a, "eth0").unwrap();
    let udp = |payload: &[u8]| {
        Frame::eth(mac_a, mac_b)
            .ipv4(ip_a, ip_b)
            .udp(4444, 5555)
            .payload(payload)
    };
    let mut buffer = [0u8; 64];

    // The kernel verifies UDP checksums of frames from a packet socket; a corrupt one
    // must vanish, or the good case would prove nothing.
    injector
        .send(&udp(b"corrupt").checksum(0x1234).build())
        .unwrap();
    assert!(
        receiver.recv_from(&mut buffer).is_err(),
        "the kernel accepted a corrupt UDP checksum"
    );

    for payload in [&b"odd"[..], b"even", b""] {
        injector.send(&udp(payload).build()).unwrap();
        let (len, from) = receiver
            .recv_from(&mut buffer)
            .expect("the kernel dropped a UDP datagram built here");
        assert_eq!(
            (&buffer[..len], from),
            (payload, SocketAddr::V4(SocketAddrV4::new(ip_a, 4444)))
        );
    }
}

#[test]
fn kernel_answers_a_tcp_syn_built_here_and_ignores_a_corrupt_one() {
    let (a, b) = joined_pair("ktcp");
    let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
    let _listener = b
        .enter(|| Ok(TcpListener::bind(SocketAddrV4::new(ip_b, 8080))?))
        .unwrap();
    let injector = PacketSocket::open(&a, "eth0").unwrap();
    let syn = |seq: u32| {
        Frame::eth(mac_a, mac_b)
            .ipv4(ip_a, ip_b)
            .dont_fragment(true)
            .tcp(40000, 8080)
            .seq(seq)
            .flags(TcpFlags::SYN)
            .mss(1460)
            .window(64240)
    };
    let syn_ack_to = |seq: u32| {
        move |frame: &[u8]| {
            let Ok(ip) = parse_eth(frame).and_then(|eth| eth.ipv4()) else {
                return false;
            };
            ip.tcp().is_ok_and(|tcp| {
                tcp.flags.contains(TcpFlags::SYN | TcpFlags::ACK) && tcp.ack == seq.wrapping_add(1)
            })
        }
    };

    injector.send(&syn(1000).checksum(0xbad0).build()).unwrap();
    let reply = injector
        .recv_matching(Duration::from_millis(500), syn_ack_to(1000))
        .unwrap();
    assert!(
        reply.is_none(),
        "the kernel answered a SYN with a corrupt checksum"
    );

    injector.send(&syn(2000).build()).unwrap();
    let reply = injector.recv_matching(SHORT, syn_ack_to(2000)).unwrap();
    let reply = reply.expect("no SYN-ACK: the kernel rejected the TCP checksum built here");
    let ip = parse_eth(&reply).unwrap().ipv4().unwrap();
    assert!(
        ip.checksum_valid,
        "kernel-built IPv4 header fails our checksum check"
    );
    assert_eq!(
        (ip.src, ip.dst, ip.tcp().unwrap().src_port),
        (ip_b, ip_a, 8080)
    );
}

#[test]
fn kernel_answers_an_icmp_echo_built_here_with_checksums_we_accept() {
    let (a, b) = joined_pair("kicmp");
    let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
    let injector = PacketSocket::open(&a, "eth0").unwrap();
    let reply_to = |id: u16| {
        move |frame: &[u8]| {
            let Ok(ip) = parse_eth(frame).and_then(|eth| eth.ipv4()) else {
                return false;
            };
            ip.icmp().is_ok_and(|icmp| {
                icmp.icmp_type == icmp_type::ECHO_REPLY && icmp.echo_id() == Some(id)
            })
        }
    };
    let request = |id: u16| {
        Frame::eth(mac_a, mac_b)
            .ipv4(ip_a, ip_b)
            .icmp_echo_request(id, 1)
            .payload(b"abcdefghijklmnopq")
    };

    injector.send(&request(7).checksum(0xbeef).build()).unwrap();
    let reply = injector
        .recv_matching(Duration::from_millis(500), reply_to(7))
        .unwrap();
    assert!(
        reply.is_none(),
        "the kernel answered an echo request with a corrupt checksum"
    );

    injector.send(&request(8).build()).unwrap();
    let reply = injector
        .recv_matching(SHORT, reply_to(8))
        .unwrap()
        .expect("no echo reply from the kernel");
    let eth = parse_eth(&reply).unwrap();
    assert_eq!((eth.src, eth.dst), (mac_b, mac_a));
    let ip = eth.ipv4().unwrap();
    let icmp = ip.icmp().unwrap();
    // Linux computes both checksums of an echo reply in software, so they are real.
    assert!(
        ip.checksum_valid && icmp.checksum_valid,
        "{}",
        crate::packet::hexdump(&reply)
    );
    assert_eq!(
        (icmp.echo_seq(), icmp.body),
        (Some(1), &b"abcdefghijklmnopq"[..])
    );
}

#[test]
fn kernel_port_unreachable_quotes_the_datagram_built_here() {
    let (a, b) = joined_pair("kunreach");
    let (mac_a, mac_b, ip_a, ip_b) = wire(&a, &b);
    let injector = PacketSocket::open(&a, "eth0").unwrap();
    let datagram = Frame::eth(mac_a, mac_b)
        .ipv4(ip_a, ip_b)
        .id(77)
        .udp(4444, 9)
        .payload(b"nobody home")
        .build();
    injector.send(&datagram).unwrap();
    let is_unreachable = |frame: &[u8]| {
        parse_eth(frame)
            .and_then(|eth| eth.ipv4())
            .is_ok_and(|ip| ip.protocol == ip_proto::ICMP)
    };
    let reply = injector
        .recv_matching(SHORT, is_unreachable)
        .unwrap()
        .expect("no ICMP error from the kernel");
    let ip = parse_eth(&reply).unwrap().ipv4().unwrap();
    let icmp = ip.icmp().unwrap();
    assert_eq!(
        (icmp.icmp_type, icmp.code),
        (icmp_type::DEST_UNREACHABLE, icmp_code::PORT_UNREACHABLE)
    );
    assert!(icmp.checksum_valid);
    // Linux quotes the whole small datagram, not just 8 bytes.
    assert_eq!(icmp.body, &datagram[ETH_HEADER_LEN..]);
    let quoted = icmp.quoted_packet().unwrap();
    assert_eq!(
        (quoted.src, quoted.dst, quoted.id, quoted.ports().unwrap()),
        (ip_a, ip_b, 77, (4444, 9))
    );
    assert_eq!(quoted.udp().unwrap().checksum_status, UdpChecksum::Valid);

    // And our own port-unreachable for the same datagram matches the kernel's
    // header byte for byte once it quotes as much as the kernel did.
    let ours = Frame::eth(mac_b, mac_a)
        .ipv4(ip_b, ip_a)
        .icmp_error(IcmpError::PortUnreachable, &datagram[ETH_HEADER_LEN..])
        .payload(icmp.body)
        .build();
    let ours_icmp = parse_eth(&ours).unwrap().ipv4().unwrap().icmp().unwrap();
    assert_eq!(
        (
            ours_icmp.icmp_type,
            ours_icmp.code,
            ours_icmp.checksum,
            ours_icmp.rest_of_header
        ),
        (
            icmp.icmp_type,
            icmp.code,
            icmp.checksum,
            icmp.rest_of_header
        )
    );
}
