//! The prober against a reflector in a thread of this process.
//!
//! The reflector here is a stand-in only: a plain UDP echo that turns a
//! REQUEST into a REPLY, as the connector's datapath does in XDP/TC. The
//! datapath reflector itself is proven by its own datapath tests; these
//! prove the prober's side (timing, matching, what it refuses).

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use super::*;

const INTERVAL: Duration = Duration::from_millis(100);
const MISSES: u32 = 3;
/// Bound on any wait in these tests; none takes more than a second or two.
const DEADLINE: Duration = Duration::from_secs(10);

/// How the stand-in reflector answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Echo,
    Silent,
    /// A REPLY whose token has one bit flipped.
    WrongToken,
    /// The right REPLY, sent from another port of the same address.
    WrongPort,
    /// The request sent back unchanged (kind REQUEST).
    Unchanged,
}

struct Reflector {
    addr: SocketAddrV4,
    mode: Arc<Mutex<Mode>>,
    last_echo: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Reflector {
    fn start(mode: Mode) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("binding the reflector");
        let other = UdpSocket::bind("127.0.0.1:0").expect("binding the wrong-port socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let SocketAddr::V4(addr) = socket.local_addr().expect("local addr") else {
            unreachable!("bound to IPv4")
        };
        let mode = Arc::new(Mutex::new(mode));
        let last_echo = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (mode, last_echo, stop) = (mode.clone(), last_echo.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut reply = buf[..len].to_vec();
                    let mode = *mode.lock().unwrap();
                    if mode != Mode::Unchanged && len > 4 {
                        reply[4] = REPLY;
                    }
                    match mode {
                        Mode::Echo => {
                            socket.send_to(&reply, from).unwrap();
                            *last_echo.lock().unwrap() = Some(Instant::now());
                        }
                        Mode::Silent => {}
                        Mode::WrongToken => {
                            reply[31] ^= 1;
                            socket.send_to(&reply, from).unwrap();
                        }
                        Mode::WrongPort => {
                            other.send_to(&reply, from).unwrap();
                        }
                        Mode::Unchanged => {
                            socket.send_to(&reply, from).unwrap();
                        }
                    }
                }
            }
        });
        Reflector {
            addr,
            mode,
            last_echo,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn last_echo(&self) -> Option<Instant> {
        *self.last_echo.lock().unwrap()
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn prober(targets: &[(&str, &Reflector)]) -> Prober {
    let config = ProbeConfig {
        interval: INTERVAL,
        liveness: LivenessConfig {
            misses: MISSES,
            hold_down: Duration::from_secs(1),
        },
        bind: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
    };
    Prober::start(config, target_map(targets)).expect("starting the prober")
}

fn target_map(targets: &[(&str, &Reflector)]) -> BTreeMap<String, SocketAddrV4> {
    targets
        .iter()
        .map(|(name, reflector)| (name.to_string(), reflector.addr))
        .collect()
}

fn health(prober: &Prober, name: &str) -> TargetHealth {
    prober.snapshot()[name].health.clone()
}

/// Poll `condition` until it holds; fail naming `what` after [`DEADLINE`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait for the next up/down change and return when it was seen.
async fn next_change(changes: &mut watch::Receiver<u64>) -> Instant {
    tokio::time::timeout(DEADLINE, changes.changed())
        .await
        .expect("no up/down change within the deadline")
        .expect("the prober stopped");
    Instant::now()
}

#[test]
fn headers_round_trip_and_strangers_do_not_decode() {
    let header = ProbeHeader {
        magic: MAGIC,
        kind: REPLY,
        seq: 7u32.to_be_bytes(),
        token: [0xab; 16],
        ..ProbeHeader::default()
    };
    let bytes = encode(&header);
    assert_eq!(&bytes[..4], b"feP1");
    assert_eq!(bytes[4], REPLY);
    assert_eq!(&bytes[8..12], &[0, 0, 0, 7]);
    assert_eq!(decode(&bytes), Some(header));
    assert_eq!(decode(&bytes[..31]), None);
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert_eq!(decode(&longer), None);
    let mut foreign = bytes;
    foreign[0] = b'x';
    assert_eq!(decode(&foreign), None);
}

#[tokio::test]
async fn replies_mark_a_target_up_with_its_rtt() {
    let reflector = Reflector::start(Mode::Silent);
    let prober = prober(&[("connector-a", &reflector)]);
    let mut changes = prober.changes();
    next_change(&mut changes).await;
    assert!(!health(&prober, "connector-a").up, "silent: down");

    reflector.set(Mode::Echo);
    next_change(&mut changes).await;
    let health = health(&prober, "connector-a");
    assert!(health.up && !health.stable, "{health:?}");
    assert!(health.answered >= 1 && health.misses == 0, "{health:?}");
    let rtt = health.last_rtt.expect("an RTT once answered");
    assert!(rtt < INTERVAL, "loopback RTT {rtt:?}");
    let stats = prober.stats();
    assert_eq!(stats.transitions, 2, "{stats:?}");
    assert_eq!(
        (stats.unknown_source, stats.malformed, stats.unknown_token),
        (0, 0, 0),
        "{stats:?}"
    );
}

/// Detection takes `misses` probe intervals after the last answer, plus
/// at most one interval for the probe in flight when the target died, plus
/// scheduling: the delay is measured (from the reflector's last echo to
/// the change notification), not slept.
#[tokio::test]
async fn a_silent_target_is_down_after_misses_intervals() {
    let reflector = Reflector::start(Mode::Echo);
    let prober = prober(&[("connector-a", &reflector)]);
    wait_until("3 probes are answered", || {
        health(&prober, "connector-a").answered >= 3
    })
    .await;
    let mut changes = prober.changes();
    changes.borrow_and_update();
    reflector.set(Mode::Silent);
    let down_at = next_change(&mut changes).await;
    let last_echo = reflector.last_echo().expect("it echoed before");
    let health = health(&prober, "connector-a");
    assert!(!health.up, "{health:?}");
    assert_eq!(health.misses, MISSES);
    let delay = down_at - last_echo;
    eprintln!("detected after {delay:?} (interval {INTERVAL:?}, misses {MISSES})");
    assert!(
        delay >= INTERVAL * MISSES && delay <= INTERVAL * (MISSES + 2),
        "detection took {delay:?}, expected between {:?} and {:?}",
        INTERVAL * MISSES,
        INTERVAL * (MISSES + 2)
    );
}

#[tokio::test]
async fn replies_with_a_wrong_token_port_or_kind_are_ignored() {
    let reflector = Reflector::start(Mode::WrongToken);
    let prober = prober(&[("connector-a", &reflector)]);
    let mut changes = prober.changes();
    // Presumed up at start; forged replies do not keep it so.
    next_change(&mut changes).await;
    assert!(!health(&prober, "connector-a").up);
    assert!(prober.stats().unknown_token >= u64::from(MISSES));

    reflector.set(Mode::WrongPort);
    wait_until("3 replies from the wrong port arrive", || {
        prober.stats().unknown_source >= 3
    })
    .await;
    reflector.set(Mode::Unchanged);
    wait_until("3 requests come back unchanged", || {
        prober.stats().malformed >= 3
    })
    .await;
    let health = health(&prober, "connector-a");
    assert!(!health.up && health.answered == 0, "{health:?}");
    assert_eq!(prober.stats().answered, 0);

    // The same target answering properly is up at once.
    reflector.set(Mode::Echo);
    next_change(&mut changes).await;
    assert!(self::health(&prober, "connector-a").up);
}

#[tokio::test]
async fn targets_change_at_runtime_and_choose_follows_liveness() {
    let a = Reflector::start(Mode::Echo);
    let b = Reflector::start(Mode::Echo);
    let prober = prober(&[("connector-a", &a)]);
    let order = ["connector-a", "connector-b"].map(String::from).to_vec();
    prober.set_targets(target_map(&[("connector-a", &a), ("connector-b", &b)]));
    wait_until("both targets answer", || {
        let snapshot = prober.snapshot();
        snapshot.len() == 2 && snapshot.values().all(|t| t.health.answered >= 2)
    })
    .await;
    assert_eq!(prober.snapshot()["connector-b"].addr, b.addr);
    assert_eq!(
        prober.choose(&order, Some("connector-a")).as_deref(),
        Some("connector-a")
    );

    let mut changes = prober.changes();
    a.set(Mode::Silent);
    next_change(&mut changes).await;
    assert_eq!(
        prober.choose(&order, Some("connector-a")).as_deref(),
        Some("connector-b"),
        "failover to the live member"
    );

    prober.set_targets(target_map(&[("connector-b", &b)]));
    assert_eq!(
        prober.snapshot().keys().collect::<Vec<_>>(),
        ["connector-b"]
    );
}
