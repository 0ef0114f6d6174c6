//! The benchmark's packet generator and counter (`fabedge_tests::livegen`)
//! on a two-namespace router: injected frames must arrive, all of them and
//! no more, or every packet rate the benchmark reports is wrong.
//!
//! ```text
//!  router namespace                                   sink namespace
//!  fe-in (frames injected here) ... forwarding ... fe-out  <->  fe-sink (counter)
//!  198.51.100.1/24                                 192.0.2.1/24    192.0.2.2/24
//! ```

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use fabedge_tests::{
    livegen::{CountAt, FrameCounter, FrameMatch, Generator, XdpProgram, XdpVerdict},
    netns::{Netns, veth_pair},
    packet::Frame,
};

const FRAMES: u32 = 20_000;
const PORT: u16 = 9;
const SETTLE: Duration = Duration::from_secs(2);

struct Router {
    router: Netns,
    sink: Netns,
}

fn router() -> Result<Router> {
    let router = Netns::new("livegen-router")?;
    let sink = Netns::new("livegen-sink")?;
    // fe-in's peer stays in the router namespace: nothing is sent to it.
    veth_pair(&router, "fe-in", &router, "fe-in-peer")?;
    veth_pair(&router, "fe-out", &sink, "fe-sink")?;
    router.add_addr("fe-in", "198.51.100.1/24")?;
    router.add_addr("fe-out", "192.0.2.1/24")?;
    sink.add_addr("fe-sink", "192.0.2.2/24")?;
    router.set_sysctl("net.ipv4.ip_forward", "1")?;
    // No ARP round trip inside the measurement.
    let sink_mac = sink.mac("fe-sink")?;
    let mac = sink_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    router.ip(&[
        "neigh",
        "replace",
        "192.0.2.2",
        "lladdr",
        &mac,
        "dev",
        "fe-out",
        "nud",
        "permanent",
    ])?;
    Ok(Router { router, sink })
}

fn udp_to_sink(dst_mac: [u8; 6], port: u16) -> Vec<u8> {
    Frame::eth([0x02, 0, 0, 0, 0, 0x09], dst_mac)
        .ipv4(Ipv4Addr::new(198, 51, 100, 2), Ipv4Addr::new(192, 0, 2, 2))
        .udp(40000, port)
        .payload(&[0xab; 36])
        .build()
}

/// XDP_PASS: the frames enter the router's stack as if fe-in had received
/// them, are forwarded out of fe-out and counted on the far side.
#[test]
fn live_frames_passed_to_the_stack_are_forwarded_and_counted_exactly() -> Result<()> {
    let net = router()?;
    let counter = FrameCounter::attach(&net.sink, "fe-sink", &FrameMatch::udp_dst_port(PORT))?;
    let in_mac = net.router.mac("fe-in")?;
    let generator = Generator::new(&udp_to_sink(in_mac, PORT), XdpVerdict::Pass)?;

    // Forwarding rewrites the frames' MACs and TTL in pages the kernel
    // recycles: only the generator's restore keeps later frames forwardable.
    let injected = generator.inject(&net.router, "fe-in", FRAMES)?;
    assert_eq!(injected.frames, FRAMES);
    assert_eq!(
        counter.settled_count(SETTLE)?,
        u64::from(FRAMES),
        "every injected frame is forwarded to the sink and counted once"
    );
    // Frames for another port are forwarded too, but not counted.
    Generator::new(&udp_to_sink(in_mac, PORT + 1), XdpVerdict::Pass)?.inject(
        &net.router,
        "fe-in",
        1_000,
    )?;
    assert_eq!(counter.settled_count(SETTLE)?, u64::from(FRAMES));
    Ok(())
}

/// A datapath XDP program chained behind the generator: its XDP_TX is
/// carried out on the device the frames were injected at, as a NIC's would
/// (the connector's XDP variant in the benchmark).
#[test]
fn live_frames_run_through_a_chained_xdp_program_and_its_tx_is_carried_out() -> Result<()> {
    let net = router()?;
    let counter = FrameCounter::attach(&net.sink, "fe-sink", &FrameMatch::udp_dst_port(PORT))?;
    let sink_mac = net.sink.mac("fe-sink")?;
    let generator = Generator::then(
        &udp_to_sink(sink_mac, PORT),
        XdpProgram::returning(XdpVerdict::Tx)?,
    )?;

    generator.inject(&net.router, "fe-out", FRAMES)?;
    assert_eq!(counter.settled_count(SETTLE)?, u64::from(FRAMES));

    // A chained program that drops: nothing arrives.
    let dropping = Generator::then(
        &udp_to_sink(sink_mac, PORT),
        XdpProgram::returning(XdpVerdict::Drop)?,
    )?;
    dropping.inject(&net.router, "fe-out", 1_000)?;
    assert_eq!(counter.settled_count(SETTLE)?, u64::from(FRAMES));
    Ok(())
}

/// The benchmark's setup: a TC counter, and GRO instead of an XDP program
/// giving the receiving veth the NAPI context XDP_TX into its peer needs.
#[test]
fn tc_counter_sees_exactly_what_a_chained_program_transmits() -> Result<()> {
    let net = router()?;
    net.sink
        .run_ok("ethtool", &["-K", "fe-sink", "gro", "on"])?;
    let counter = FrameCounter::attach_at(
        &net.sink,
        "fe-sink",
        &FrameMatch::udp_dst_port(PORT),
        CountAt::TcIngress,
    )?;
    let sink_mac = net.sink.mac("fe-sink")?;
    let generator = Generator::then(
        &udp_to_sink(sink_mac, PORT),
        XdpProgram::returning(XdpVerdict::Tx)?,
    )?;
    generator.inject(&net.router, "fe-out", FRAMES)?;
    assert_eq!(counter.settled_count(SETTLE)?, u64::from(FRAMES));
    // Through the router's stack too.
    let in_mac = net.router.mac("fe-in")?;
    Generator::new(&udp_to_sink(in_mac, PORT), XdpVerdict::Pass)?.inject(
        &net.router,
        "fe-in",
        FRAMES,
    )?;
    assert_eq!(counter.settled_count(SETTLE)?, 2 * u64::from(FRAMES));
    Ok(())
}

/// The counter passes what it does not match: the sink still answers ping.
#[test]
fn frame_counter_passes_other_traffic() -> Result<()> {
    let net = router()?;
    let counter = FrameCounter::attach(&net.sink, "fe-sink", &FrameMatch::udp_dst_port(PORT))?;
    let out = net
        .router
        .run_ok("ping", &["-c", "2", "-i", "0.2", "-W", "2", "192.0.2.2"])?;
    assert!(
        out.contains("2 received"),
        "ping through the counter: {out}"
    );
    assert_eq!(counter.count()?, 0);
    Ok(())
}
