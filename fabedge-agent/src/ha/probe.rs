//! The prober: one UDP socket that sends a [`ProbeHeader`] request to every
//! target each interval and matches the replies, feeding [`Liveness`].
//!
//! The targets' datapath answers (a reflector in XDP/TC), not their agent,
//! so a probe proves that the node forwards, and costs its agent nothing.
//! A reply counts only if it comes from the target's own address and port,
//! is a well-formed REPLY, and echoes the 16-byte random token of one of
//! the target's last [`OUTSTANDING`] probes that was not answered yet: a
//! stranger, or a replay of an old reply, cannot keep a dead target alive.
//!
//! The run loop queries it through [`ProberHandle`] ([`ProberHandle::snapshot`],
//! [`ProberHandle::choose`]) and awaits [`ProberHandle::changes`], which
//! moves the moment any target goes up or down, to fail over at once
//! instead of at its next poll tick.
//!
//! The socket is bound to an ephemeral port (by default): behind a NAT the
//! probes themselves keep its mapping open, as they go out every interval.
//!
//! It runs on a thread of its own (`fe-probes`), not on the agent's run
//! loop: an apply, an xfrm or a netlink dump that keeps the run loop busy
//! must neither delay the probes (a late round is a false miss) nor the
//! failover. What must happen at once when a target goes down is a
//! [`Reaction`], which this thread calls after every round and every
//! change of health (the run loop installs it: switch the edge's group,
//! take over a dead connector's address); everything else the run loop
//! does when [`ProberHandle::changes`] moves.

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Deref,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use fabedge_common::probe::{MAGIC, ProbeHeader, REPLY, REQUEST};
use log::{debug, info, warn};
use tokio::{
    net::UdpSocket,
    sync::{oneshot, watch},
    time::MissedTickBehavior,
};

use super::liveness::{Liveness, LivenessConfig, TargetHealth, Transition};

/// Probes per target whose replies are still accepted: a reply that is a
/// little late still proves the target alive.
pub const OUTSTANDING: usize = 4;
/// Bytes of a probe on the wire (the UDP payload).
pub const PROBE_LEN: usize = size_of::<ProbeHeader>();
/// How often targets are probed unless configured otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// How the prober runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub liveness: LivenessConfig,
    /// Local address of the socket; port 0 picks an ephemeral one.
    pub bind: SocketAddrV4,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: DEFAULT_INTERVAL,
            liveness: LivenessConfig::default(),
            bind: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        }
    }
}

/// One target as the run loop and `inspect` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub addr: SocketAddrV4,
    pub health: TargetHealth,
}

/// What became of the datagrams the prober sent and received, since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeStats {
    pub sent: u64,
    /// Probes the kernel refused to send (no route, buffer full): they
    /// count as sent for liveness, and so end up missed.
    pub send_errors: u64,
    pub answered: u64,
    /// Datagrams from an address and port that is no target.
    pub unknown_source: u64,
    /// Not a probe reply: wrong length, magic or kind.
    pub malformed: u64,
    /// A reply whose (seq, token) is none we have outstanding: forged,
    /// replayed, or later than [`OUTSTANDING`] probes.
    pub unknown_token: u64,
    /// Targets that went up or down.
    pub transitions: u64,
}

/// The wire form of a probe header (its fields are bytes already).
pub fn encode(header: &ProbeHeader) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[0..4].copy_from_slice(&header.magic);
    out[4] = header.kind;
    out[8..12].copy_from_slice(&header.seq);
    out[16..32].copy_from_slice(&header.token);
    out
}

/// A probe header from the wire; `None` unless it is exactly one header
/// with our magic.
pub fn decode(bytes: &[u8]) -> Option<ProbeHeader> {
    let bytes: &[u8; PROBE_LEN] = bytes.try_into().ok()?;
    let header = ProbeHeader {
        magic: bytes[0..4].try_into().ok()?,
        kind: bytes[4],
        seq: bytes[8..12].try_into().ok()?,
        token: bytes[16..32].try_into().ok()?,
        ..ProbeHeader::default()
    };
    (header.magic == MAGIC).then_some(header)
}

/// A probe waiting for its reply.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    seq: u32,
    token: [u8; 16],
    sent_at: Instant,
}

#[derive(Debug)]
struct Target {
    addr: SocketAddrV4,
    next_seq: u32,
    outstanding: VecDeque<Outstanding>,
    /// A send error was logged and nothing was sent since.
    send_failing: bool,
}

#[derive(Debug)]
struct State {
    liveness: Liveness,
    targets: BTreeMap<String, Target>,
    stats: ProbeStats,
}

/// What the prober thread does itself after each round and each change of
/// health, with the targets' liveness as of `now`.
pub type Reaction = Box<dyn FnMut(&Liveness, Instant) + Send>;

struct Shared {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    reaction: Mutex<Option<Reaction>>,
}

/// Queries and settings of a running [`Prober`]; cheap to clone.
#[derive(Clone)]
pub struct ProberHandle {
    shared: Arc<Shared>,
}

/// The probing thread; it stops when this is dropped.
pub struct Prober {
    handle: ProberHandle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    local_addr: SocketAddrV4,
}

impl Prober {
    /// Bind the socket and start probing `targets` (name → the target's
    /// probe address) on a thread of its own.
    pub fn start(config: ProbeConfig, targets: BTreeMap<String, SocketAddrV4>) -> io::Result<Self> {
        let socket = std::net::UdpSocket::bind(config.bind).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding the probe socket to {}: {e}", config.bind),
            )
        })?;
        socket.set_nonblocking(true)?;
        let local_addr = match socket.local_addr()? {
            SocketAddr::V4(addr) => addr,
            SocketAddr::V6(addr) => {
                return Err(io::Error::other(format!(
                    "probe socket bound to IPv6 {addr}"
                )));
            }
        };
        let now = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                liveness: Liveness::new(config.liveness, now),
                targets: BTreeMap::new(),
                stats: ProbeStats::default(),
            }),
            changes: watch::channel(0).0,
            reaction: Mutex::new(None),
        });
        let handle = ProberHandle { shared };
        handle.set_targets(targets);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let shared = handle.shared.clone();
        let interval = config.interval;
        let thread = std::thread::Builder::new()
            .name("fe-probes".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match UdpSocket::from_std(socket) {
                        Ok(socket) => run(socket, shared, interval, stopped).await,
                        Err(e) => warn!("probes: the socket left the runtime: {e}"),
                    }
                })
            })?;
        Ok(Prober {
            handle,
            stop: Some(stop),
            thread: Some(thread),
            local_addr,
        })
    }

    pub fn handle(&self) -> ProberHandle {
        self.handle.clone()
    }

    /// Where probes leave from (the port the reflector answers to).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local_addr
    }
}

impl Deref for Prober {
    type Target = ProberHandle;
    fn deref(&self) -> &ProberHandle {
        &self.handle
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl ProberHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent counters behind.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the prober thread does after each round and each change of
    /// health from now on (`None`: nothing).
    pub fn set_reaction(&self, reaction: Option<Reaction>) {
        *self
            .shared
            .reaction
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reaction;
    }

    /// Run the reaction on `state` (held by the caller: the liveness it
    /// sees is the one the round just changed).
    fn react(&self, state: &State, now: Instant) {
        let mut reaction = self
            .shared
            .reaction
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(reaction) = reaction.as_mut() {
            reaction(&state.liveness, now);
        }
    }

    /// Probe exactly `targets` from the next round on. A known target keeps
    /// its history (and its outstanding probes if its address is the same);
    /// a new one starts presumed up.
    pub fn set_targets(&self, targets: BTreeMap<String, SocketAddrV4>) {
        let now = Instant::now();
        let mut state = self.lock();
        state
            .liveness
            .set_targets(targets.keys().map(String::as_str), now);
        let mut old = std::mem::take(&mut state.targets);
        for (name, addr) in targets {
            let target = match old.remove(&name) {
                Some(target) if target.addr == addr => target,
                _ => Target {
                    addr,
                    next_seq: random_u32(),
                    outstanding: VecDeque::with_capacity(OUTSTANDING),
                    send_failing: false,
                },
            };
            state.targets.insert(name, target);
        }
    }

    /// Every target's address and health now.
    pub fn snapshot(&self) -> BTreeMap<String, ProbeTarget> {
        let now = Instant::now();
        let state = self.lock();
        state
            .targets
            .iter()
            .filter_map(|(name, target)| {
                let health = state.liveness.health(name, now)?;
                Some((
                    name.clone(),
                    ProbeTarget {
                        addr: target.addr,
                        health,
                    },
                ))
            })
            .collect()
    }

    pub fn stats(&self) -> ProbeStats {
        self.lock().stats.clone()
    }

    /// The member of a group to use now: [`Liveness::choose_at`].
    pub fn choose(&self, order: &[String], current: Option<&str>) -> Option<String> {
        self.lock()
            .liveness
            .choose_at(order, current, Instant::now())
    }

    /// A counter that moves each time a target goes up or down: await
    /// `changed()` on it, then [`ProberHandle::choose`] again.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// One probe to every target. Sending never blocks: a full buffer is a
    /// send error, and the probe is missed like a lost one.
    fn send_round(&self, socket: &UdpSocket) {
        let now = Instant::now();
        let announced = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut transitions = Vec::new();
            let mut tokens = vec![0u8; 16 * state.targets.len()];
            if let Err(e) = crate::esp::keys::random_bytes(&mut tokens) {
                warn!("probes: no random tokens this round: {e}");
                return;
            }
            for ((name, target), token) in state.targets.iter_mut().zip(tokens.chunks_exact(16)) {
                transitions.extend(state.liveness.sent(name, now));
                let seq = target.next_seq;
                target.next_seq = seq.wrapping_add(1);
                let token: [u8; 16] = token.try_into().expect("16-byte chunks");
                if target.outstanding.len() == OUTSTANDING {
                    target.outstanding.pop_front();
                }
                target.outstanding.push_back(Outstanding {
                    seq,
                    token,
                    sent_at: now,
                });
                let probe = encode(&ProbeHeader {
                    magic: MAGIC,
                    kind: REQUEST,
                    seq: seq.to_be_bytes(),
                    token,
                    ..ProbeHeader::default()
                });
                state.stats.sent += 1;
                match socket.try_send_to(&probe, SocketAddr::V4(target.addr)) {
                    Ok(_) => target.send_failing = false,
                    Err(e) => {
                        state.stats.send_errors += 1;
                        if !target.send_failing {
                            warn!("probes: sending to {name} at {}: {e}", target.addr);
                            target.send_failing = true;
                        }
                    }
                }
            }
            self.react(state, now);
            transitions.into_iter().map(|t| state.describe(t)).collect()
        };
        self.announce(announced);
    }

    /// Judge one datagram that arrived at `now` from `from`.
    fn receive(&self, bytes: &[u8], from: SocketAddrV4, now: Instant) {
        let announced = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut from_target = false;
            let mut matched = None;
            let header = decode(bytes).filter(|h| h.kind == REPLY);
            for (name, target) in state.targets.iter_mut().filter(|(_, t)| t.addr == from) {
                from_target = true;
                let Some(header) = &header else { break };
                let seq = u32::from_be_bytes(header.seq);
                if let Some(at) = target
                    .outstanding
                    .iter()
                    .position(|o| o.seq == seq && o.token == header.token)
                {
                    let probe = target.outstanding.remove(at).expect("found");
                    matched = Some((name.clone(), now.saturating_duration_since(probe.sent_at)));
                    break;
                }
            }
            let stats = &mut state.stats;
            match (from_target, &header, matched) {
                (false, _, _) => {
                    stats.unknown_source += 1;
                    return;
                }
                (true, None, _) => {
                    stats.malformed += 1;
                    return;
                }
                (true, Some(_), None) => {
                    stats.unknown_token += 1;
                    return;
                }
                (true, Some(_), Some((name, rtt))) => {
                    stats.answered += 1;
                    let transition = state.liveness.answered(&name, rtt, now);
                    if transition.is_some() {
                        self.react(state, now);
                    }
                    transition.map(|t| state.describe(t)).into_iter().collect()
                }
            }
        };
        self.announce(announced);
    }

    /// Log each transition and wake whoever awaits [`ProberHandle::changes`].
    fn announce(&self, transitions: Vec<(Transition, String)>) {
        for (transition, message) in &transitions {
            if transition.up {
                info!("{message}");
            } else {
                warn!("{message}");
            }
        }
        if !transitions.is_empty() {
            self.shared
                .changes
                .send_modify(|generation| *generation += 1);
        }
    }
}

impl State {
    /// Count `transition` and say what happened, naming the target.
    fn describe(&mut self, transition: Transition) -> (Transition, String) {
        self.stats.transitions += 1;
        let addr = self.targets.get(&transition.target).map(|t| t.addr);
        let addr = addr.map(|a| format!(" at {a}")).unwrap_or_default();
        let message = if transition.up {
            format!("probes: {}{addr} answers again: up", transition.target)
        } else {
            format!(
                "probes: {}{addr} is down: {} probes in a row unanswered",
                transition.target,
                self.liveness.config().misses
            )
        };
        (transition, message)
    }
}

async fn run(
    socket: UdpSocket,
    shared: Arc<Shared>,
    interval: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let handle = ProberHandle { shared };
    let mut tick = tokio::time::interval(interval);
    // A late round is not made up by a burst: probes keep their spacing,
    // and a stalled agent detects late rather than falsely.
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // Room for one datagram larger than a probe, so a longer one is seen
    // as such instead of being truncated to a valid-looking probe.
    let mut buf = [0u8; PROBE_LEN + 1];
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => handle.send_round(&socket),
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, SocketAddr::V4(from))) => handle.receive(&buf[..len], from, Instant::now()),
                Ok(_) => {}
                // ICMP errors reported on the socket: the miss count says
                // more than they do.
                Err(e) => debug!("probes: receiving: {e}"),
            },
        }
    }
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // Only the starting seq: a fixed one would do, random is nicer to read.
    let _ = crate::esp::keys::random_bytes(&mut bytes);
    u32::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests;
