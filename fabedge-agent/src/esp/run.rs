//! The ESP mode's part of `run`: the node key, the generation, the xfrm
//! applier, the UDP 4500 socket and the timers (keepalives, rotation,
//! removal of SAs past their grace period).

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::{info, warn};

use fabedge_common::ESP_IN_UDP_PORT;

use super::{
    apply::{Generations, XfrmApplier, reuses_a_key},
    hellos::{HELLO_BUDGET, HelloCounter, HelloReceiver, Verdict},
    keys::{HelloKey, NodeKey, PUBLIC_KEY_ANNOTATION, PublicKey},
    natt::{EncapSocket, hello},
    plan::{Direction, LocalKeys, ObservedEndpoints, PinnedGenerations, plan_esp},
    punch::{Change, Punch},
    xfrm::{FE_IF_ID, Socket},
};
use crate::{
    model::{Role, Snapshot},
    plan::{Plan, Settings},
};

/// A `fabedge-agent rotate-key` request: a file in the state dir.
pub const ROTATE_REQUEST: &str = "rotate-key.request";
/// The NAT-observed endpoints of peers, kept across restarts: a restarted
/// connector keeps sending to where the edges' NATs show them instead of
/// their unreachable private addresses until their next hellos.
pub const OBSERVED_FILE: &str = "esp-endpoints.json";

#[derive(Debug, Clone)]
pub struct EspOptions {
    /// Rotate keys this often (`None`: only on `rotate-key`).
    pub rotation_interval: Option<Duration>,
    /// How long SAs of a former generation keep decrypting.
    pub grace: Duration,
    /// Edge nodes: how often a keepalive goes to each peer's UDP 4500.
    pub keepalive: Duration,
}

pub struct EspRuntime {
    key: NodeKey,
    generations: Generations,
    applier: XfrmApplier,
    socket: EncapSocket,
    state_dir: PathBuf,
    options: EspOptions,
    last_rotation: Instant,
    /// Edge: sends keepalives and hellos on its own thread, so that a slow
    /// apply never delays them (the connector learns NAT moves from them).
    keepalives: Keepalives,
    /// The NAT-observed endpoints of peers, learnt from their hellos.
    observed: ObservedEndpoints,
    /// Edge: community peers behind another NAT, as the connector
    /// introduced them, and whether their direct path works.
    punch: Punch,
    /// A connector introduced a peer anew: its routes must be planned.
    introduced: bool,
    /// Hello counters and clock skew of the peers whose hellos we read.
    hellos: HelloReceiver,
    /// (destination, SPI) of the outbound SAs last applied.
    outbound_spis: std::collections::BTreeSet<(std::net::Ipv4Addr, u32)>,
    /// The kernel's soft and hard expire events (`None`: not available;
    /// rotation by time still happens).
    expires: Option<Socket>,
    /// Peers whose outbound SA stays one generation behind (see [`PinnedGenerations`]).
    pinned: PinnedGenerations,
    /// The plan's warnings last logged.
    warned: std::collections::BTreeSet<String>,
    last: Option<(Snapshot, Plan)>,
}

/// Ask the agent using `state_dir` to rotate its keys.
pub fn request_rotation(state_dir: &Path) -> Result<PathBuf> {
    let path = state_dir.join(ROTATE_REQUEST);
    std::fs::write(&path, b"").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

impl EspRuntime {
    /// `socket`: UDP 4500, bound before this agent's turn came (see
    /// `run::handover`); nothing here runs before it is this agent's turn.
    pub fn start(state_dir: &Path, options: EspOptions, socket: EncapSocket) -> Result<Self> {
        let keepalive = options.keepalive;
        let key = NodeKey::load_or_create(state_dir)?;
        let mut generations = Generations::load(state_dir)?;
        // Replay windows live in the kernel's SAs: when it holds none of
        // ours, they are gone, and so must be the keys they protected.
        let kernel_holds_ours = Socket::open()
            .and_then(|mut socket| socket.sas())
            .context("reading the kernel's xfrm SAs")?
            .iter()
            .any(|sa| sa.if_id == FE_IF_ID);
        if generations.refresh_nonce(!kernel_holds_ours)? {
            info!("ESP: new key nonce (no SA of ours in the kernel): every SA key is new");
        }
        let keepalives = Keepalives::start(&socket, options.keepalive, state_dir)?;
        let expires = Socket::subscribe_expire()
            .inspect_err(|e| warn!("ESP: not watching SA expiry: {e}"))
            .ok();
        info!(
            "ESP mode: public key {}, generation {}, UDP {ESP_IN_UDP_PORT} held",
            key.public().to_base64(),
            generations.generation
        );
        Ok(EspRuntime {
            key,
            generations,
            applier: XfrmApplier::new(options.grace),
            socket,
            state_dir: state_dir.to_owned(),
            options,
            last_rotation: Instant::now(),
            keepalives,
            observed: load_observed(state_dir),
            punch: Punch::new(keepalive),
            introduced: false,
            hellos: HelloReceiver::load(state_dir, unix_now()),
            outbound_spis: Default::default(),
            expires,
            pinned: PinnedGenerations::new(),
            warned: Default::default(),
            last: None,
        })
    }

    /// Readable when hellos wait on the UDP 4500 socket (see [`EncapSocket::readiness`]).
    pub fn hello_readiness(&self) -> Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        self.socket
            .readiness()
            .context("watching the UDP 4500 socket for hellos")
    }

    /// What the plan publishes about this node.
    pub fn fill_settings(&self, settings: &mut Settings) {
        settings.esp_public_key = Some(self.key.public().to_base64());
        settings.esp_generation = self.generations.generation;
        settings.esp_key_nonce = self.generations.nonce.map(|n| n.to_base64());
        settings.esp_observed = self.endpoints();
        settings.esp_punched = self.punch.view();
    }

    /// Where each peer's ESP goes: where we heard it from, else where the
    /// connector says its NAT shows it.
    fn endpoints(&self) -> ObservedEndpoints {
        let mut out: ObservedEndpoints = self
            .punch
            .view()
            .into_iter()
            .map(|(peer, p)| (peer, p.endpoint))
            .collect();
        out.extend(self.observed.iter().map(|(k, v)| (k.clone(), *v)));
        out
    }

    /// Bring xfrm in line with `plan`. `Ok(true)`: a new generation began
    /// (a key would have been reused), its SAs are in place, and the caller
    /// plans again so that it is published.
    pub fn apply(&mut self, snapshot: &Snapshot, plan: &Plan) -> Result<bool> {
        let mut new_generation = false;
        let esp = loop {
            let (esp, missing, occupied) = loop {
                let esp = plan_esp(
                    snapshot,
                    plan,
                    LocalKeys {
                        key: &self.key,
                        nonce: self.generations.nonce.as_ref(),
                    },
                    self.generations.generation,
                    &self.endpoints(),
                    &self.pinned,
                );
                let (missing, occupied) = XfrmApplier::missing_outbound(&esp)?;
                // A pinned peer that needs a new SA (it moved, or the kernel lost
                // its SA) cannot get one at its older generation, whose key was
                // used: it moves to ours.
                let before = self.pinned.len();
                self.pinned.retain(|peer, _| !missing.contains(peer));
                if self.pinned.len() == before {
                    break (esp, missing, occupied);
                }
            };
            // An installed SA that differs from the plan holds the SPI its
            // successor needs: a new generation gives it another, so the old
            // one keeps carrying traffic until the new one is in place.
            if reuses_a_key(&missing, &self.generations) || occupied {
                let generation = self.generations.bump()?;
                // Only the peers that need a new SA move to the new generation;
                // the others keep theirs (one generation behind is in every
                // receiver's window), so a move of theirs soon after needs no
                // further generation: endpoints behind one NAT move together.
                self.pinned = esp
                    .sas
                    .iter()
                    .filter(|sa| sa.direction == Direction::Out && !missing.contains(&sa.peer))
                    .filter(|sa| sa.generation == generation.wrapping_sub(1))
                    .map(|sa| (sa.peer.clone(), sa.generation))
                    .collect();
                info!(
                    "ESP: outbound SAs for {} must be created anew; new generation {generation} \
                     (keys are never reused); {} peer(s) keep their SAs",
                    missing.join(", "),
                    self.pinned.len()
                );
                new_generation = true;
                continue;
            }
            break esp;
        };
        // Hellos re-apply often: say each warning once while it lasts.
        for warning in esp.warnings.iter().filter(|w| !self.warned.contains(*w)) {
            warn!("{warning}");
        }
        self.warned = esp.warnings.iter().cloned().collect();
        let report = self.applier.apply(&esp, &mut self.generations)?;
        self.outbound_spis = esp
            .sas
            .iter()
            .filter(|sa| sa.direction == Direction::Out)
            .map(|sa| (sa.spec.dst, sa.spec.spi))
            .collect();
        if report != Default::default() {
            info!("ESP: {report:?}");
        }
        self.last = Some((snapshot.clone(), plan.clone()));
        self.send_to(
            esp.sas
                .iter()
                .filter(|sa| sa.direction == Direction::Out)
                .map(|sa| {
                    let port = sa.spec.encap.map_or(ESP_IN_UDP_PORT, |e| e.dport);
                    (sa.peer.clone(), SocketAddrV4::new(sa.spec.dst, port))
                }),
        );
        Ok(new_generation)
    }

    /// Hand the keepalive thread what it sends. Edge: a hello and a
    /// keepalive where our ESP goes (`outbound`: each outbound SA's peer,
    /// destination and encapsulation port), saying to punched peers whether
    /// we hear them. Connector: its introductions, to the edges behind NAT.
    fn send_to(&self, outbound: impl Iterator<Item = (String, SocketAddrV4)>) {
        let Some((snapshot, plan)) = &self.last else {
            return;
        };
        let hello_key = |peer: &str| {
            let public = snapshot
                .nodes
                .get(peer)?
                .annotations
                .get(PUBLIC_KEY_ANNOTATION)?;
            let public = PublicKey::parse(peer, public).ok()?;
            Some(self.key.shared_with(&public).hello_key(&plan.node, peer))
        };
        let now = Instant::now();
        let targets = match plan.role {
            Role::Edge => outbound
                .filter_map(|(peer, to)| {
                    let key = hello_key(&peer)?;
                    let heard_you = self.punch.heard_you(&peer, now);
                    let punched = self.punch.contains(&peer);
                    Some(Target {
                        peer,
                        to,
                        key,
                        punched,
                        heard_you,
                        introductions: None,
                    })
                })
                .collect(),
            Role::Connector => super::punch::introductions(snapshot, &self.observed)
                .into_iter()
                .filter_map(|(edge, (to, list))| {
                    let key = hello_key(&edge)?;
                    Some(Target {
                        peer: edge,
                        to,
                        key,
                        punched: false,
                        heard_you: false,
                        introductions: Some(list),
                    })
                })
                .collect(),
            Role::Cloud => Vec::new(),
        };
        self.keepalives
            .update(&plan.node, self.generations.generation, targets);
    }

    /// The punched peers' flags of the targets in place (no key is derived
    /// again); sent at once if one changed.
    fn refresh_flags(&self) {
        let now = Instant::now();
        self.keepalives
            .set_flags(|peer| (self.punch.contains(peer), self.punch.heard_you(peer, now)));
    }

    /// Read the hellos waiting on the socket, at most [`HELLO_BUDGET`] per
    /// call; `true` if a peer's observed endpoint changed, or a connector
    /// introduced a community peer at a new endpoint.
    fn learn_from_hellos(&mut self) -> bool {
        let mut changed = false;
        let mut flags_changed = false;
        let now = unix_now();
        let instant = Instant::now();
        for _ in 0..HELLO_BUDGET {
            let Some((bytes, from)) = self.socket.try_recv() else {
                break;
            };
            let Some((snapshot, plan)) = &self.last else {
                continue;
            };
            self.hellos.set_local(&plan.node);
            let public_key = |sender: &str| {
                plan.peer_ids.get(sender)?;
                let text = snapshot
                    .nodes
                    .get(sender)?
                    .annotations
                    .get(PUBLIC_KEY_ANNOTATION)?;
                PublicKey::parse(sender, text).ok()
            };
            let hello = match self.hellos.receive(&bytes, &self.key, public_key, now) {
                Verdict::Accepted(hello) => hello,
                Verdict::Malformed(_) | Verdict::UnknownPeer => continue,
                other => {
                    log::debug!("ESP: ignored a hello at {from}: {other:?}");
                    continue;
                }
            };
            let sender = hello.node;
            if let Some(list) = &hello.introductions {
                // Teaches nothing of the connector's endpoint: a connector
                // behind a port forward sends from another port than the
                // one it is reached at.
                let from_connector = plan.role == Role::Edge
                    && snapshot
                        .nodes
                        .get(&sender)
                        .is_some_and(|n| n.role == Role::Connector);
                if !from_connector {
                    log::debug!("ESP: ignored introductions from {sender}, not a connector");
                    continue;
                }
                let ours = |peer: &str| community_peer(snapshot, plan, peer);
                for (peer, endpoint) in self.punch.introduce(&sender, list, ours, instant) {
                    info!(
                        "ESP: {peer} relayed through the connector (introduced by {sender} at \
                         {}:{}, behind another NAT; punching a direct path)",
                        endpoint.0, endpoint.1
                    );
                    // What we heard of it before is stale.
                    self.observed.remove(&peer);
                    self.introduced = true;
                    changed = true;
                }
                continue;
            }
            flags_changed |= self.punch.heard(&sender, hello.heard_you, instant);
            let endpoint = (*from.ip(), from.port());
            if self.observed.get(&sender) != Some(&endpoint) {
                info!("ESP: {sender} is reached at {from} (NAT-observed)");
                self.observed.insert(sender, endpoint);
                changed = true;
            }
        }
        if flags_changed && !changed {
            self.refresh_flags();
        }
        if let Err(e) = self.hellos.flush(changed) {
            warn!("ESP: keeping hello counters: {e:#}");
        }
        if changed {
            let path = self.state_dir.join(OBSERVED_FILE);
            let saved = serde_json::to_vec_pretty(&self.observed)
                .map_err(anyhow::Error::from)
                .and_then(|json| crate::sys::write_if_changed(&path, &json, 0o600));
            if let Err(e) = saved {
                warn!(
                    "ESP: keeping NAT-observed endpoints in {}: {e:#}",
                    path.display()
                );
            }
        }
        changed
    }

    /// Whether the kernel says one of our outbound SAs reached a limit
    /// (soft: it still works; hard: it is gone). Either way a new
    /// generation replaces it.
    fn outbound_sa_expired(&mut self) -> bool {
        let Some(socket) = &self.expires else {
            return false;
        };
        let expires = match socket.expires() {
            Ok(expires) => expires,
            Err(e) => {
                // Events were lost: rotating is the safe answer.
                warn!("ESP: reading SA expiry events: {e}; rotating keys");
                return true;
            }
        };
        let Some((_, plan)) = &self.last else {
            return false;
        };
        let mut expired = false;
        for expire in expires.iter().filter(|e| e.sa.if_id == FE_IF_ID) {
            let peer = u16::try_from(expire.sa.reqid)
                .ok()
                .and_then(|id| plan.peer_name(id))
                .unwrap_or("?");
            let ours = expire
                .sa
                .dst
                .is_some_and(|dst| self.outbound_spis.contains(&(dst, expire.sa.spi)));
            if !ours {
                continue;
            }
            let kind = if expire.hard { "hard" } else { "soft" };
            if expire.hard {
                warn!(
                    "ESP: the outbound SA spi {:#010x} with {peer} reached its hard limit                      ({} packets, {} bytes) and is gone; a new generation replaces it",
                    expire.sa.spi, expire.sa.packets, expire.sa.bytes
                );
            } else {
                info!(
                    "ESP: the outbound SA spi {:#010x} with {peer} reached its {kind} limit                      ({} packets, {} bytes); rotating keys",
                    expire.sa.spi, expire.sa.packets, expire.sa.bytes
                );
            }
            expired = true;
        }
        expired
    }

    /// Timers. `Ok(true)`: re-plan fully: a new generation started, or a
    /// peer's ESP now comes from an address not seen before (the guards go
    /// on the NIC it arrives by, see `apply::xdp::interfaces`).
    /// `let_in`: when a peer's NAT mapping is new or moved, called with the
    /// last plan and the addresses ESP in UDP now comes from
    /// ([`Plan::esp_senders`]), before the SAs follow, so that the datapath
    /// lets the peer's ESP and probes in from its new address.
    pub fn tick(
        &mut self,
        let_in: impl FnOnce(&Plan, &std::collections::BTreeMap<std::net::Ipv4Addr, u16>) -> Result<()>,
    ) -> Result<bool> {
        let now = Instant::now();
        let learnt = self.learn_from_hellos();
        // Punched peers' routes change with the plan: a full pass.
        let settled = self.settle_punches(now);
        if std::mem::take(&mut self.introduced) || settled {
            return Ok(true);
        }
        if self.punch.has_peers() {
            // A flag that went stale (no hello for a window) stops saying
            // we hear the peer.
            self.refresh_flags();
        }
        if learnt && let Some((snapshot, plan)) = self.last.take() {
            let senders = plan.esp_senders_with(&snapshot, &self.endpoints());
            let new_address = senders.keys().any(|a| !plan.esp_senders.contains_key(a));
            // The SAs follow the new mapping, with new keys where an
            // outbound SA is re-created (the generation guard).
            let result = let_in(&plan, &senders)
                .and_then(|()| self.apply(&snapshot, &plan))
                .map(|new_generation| new_generation || new_address);
            if self.last.is_none() {
                self.last = Some((snapshot, plan));
            }
            return result;
        }
        let request = self.state_dir.join(ROTATE_REQUEST);
        let requested = request.exists();
        let expired = self.outbound_sa_expired();
        let scheduled = self
            .options
            .rotation_interval
            .is_some_and(|every| now.duration_since(self.last_rotation) >= every);
        if requested || scheduled || expired {
            let _ = std::fs::remove_file(&request);
            let generation = self.generations.bump()?;
            self.pinned.clear();
            self.last_rotation = now;
            info!(
                "ESP: rotating keys ({}): generation {generation}",
                if requested {
                    "fabedge-agent rotate-key"
                } else if expired {
                    "an SA reached its limit"
                } else {
                    "scheduled"
                }
            );
            return Ok(true);
        }
        if self.applier.has_pending_removals()
            && let Some((snapshot, plan)) = self.last.take()
        {
            let result = self.apply(&snapshot, &plan);
            if self.last.is_none() {
                self.last = Some((snapshot, plan));
            }
            return result;
        }
        Ok(false)
    }
}

impl EspRuntime {
    /// Punched peers whose path changed, logged; `true` when the plan must
    /// follow (their routes go direct or through the connector).
    fn settle_punches(&mut self, now: Instant) -> bool {
        let Some((snapshot, plan)) = &self.last else {
            return false;
        };
        let ours = |peer: &str| community_peer(snapshot, plan, peer);
        let changes = self.punch.settle(ours, now);
        for change in &changes {
            match change {
                Change::Direct { peer, endpoint } => info!(
                    "ESP: direct path to {peer} open at {}:{} (hole punched)",
                    endpoint.0, endpoint.1
                ),
                Change::Relayed { peer, why } => {
                    info!("ESP: {peer} relayed through the connector ({why})")
                }
                Change::Forgotten { peer } => info!(
                    "ESP: {peer} is no longer introduced by a connector; reached at its own address"
                ),
            }
        }
        !changes.is_empty()
    }
}

/// Whether `peer` is a community peer of this edge (a tunnel peer of its
/// plan that is an edge node).
fn community_peer(snapshot: &Snapshot, plan: &Plan, peer: &str) -> bool {
    plan.role == Role::Edge
        && peer != plan.node
        && plan
            .peer_ids
            .get(peer)
            .is_some_and(|id| plan.peers.contains_key(&id))
        && snapshot
            .nodes
            .get(peer)
            .is_some_and(|n| n.role == Role::Edge)
}

/// What [`OBSERVED_FILE`] holds; nothing when it is missing or unreadable
/// (the next hellos teach it again).
fn load_observed(state_dir: &Path) -> ObservedEndpoints {
    let path = state_dir.join(OBSERVED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(
                "{} is unreadable ({e}); NAT-observed endpoints are learnt again",
                path.display()
            );
            ObservedEndpoints::new()
        }),
        Err(_) => ObservedEndpoints::new(),
    }
}

/// One peer the keepalive thread sends to.
#[derive(Clone)]
struct Target {
    peer: String,
    to: SocketAddrV4,
    key: HelloKey,
    /// A punched peer: its hellos go every [`super::punch::HELLO_INTERVAL`]
    /// (at most the keepalive interval), so a direct path that breaks
    /// is noticed, and one that opens is taken, within seconds.
    punched: bool,
    /// Punched peers: whether we hear them directly.
    heard_you: bool,
    /// Connector: introductions for this edge (no keepalive goes with them).
    introductions: Option<Vec<hello::Introduction>>,
}

impl Target {
    /// What decides whether the thread sends at once: all but the key.
    fn same(&self, other: &Target) -> bool {
        self.peer == other.peer
            && self.to == other.to
            && self.punched == other.punched
            && self.heard_you == other.heard_you
            && self.introductions == other.introductions
    }

    /// The hellos for this target, each with its counter from `next`.
    fn hellos(&self, node: &str, generation: u32, next: &mut u64) -> Vec<Vec<u8>> {
        let chunks: Vec<Option<Vec<hello::Introduction>>> = match &self.introductions {
            None => vec![None],
            Some(list) => list
                .chunks(hello::MAX_INTRODUCTIONS)
                .map(|c| Some(c.to_vec()))
                .collect(),
        };
        chunks
            .into_iter()
            .map(|introductions| {
                let hello = hello::Hello {
                    node: node.to_owned(),
                    generation,
                    counter: *next,
                    heard_you: self.heard_you,
                    introductions,
                };
                *next += 1;
                hello::encode(&hello, &self.key)
            })
            .collect()
    }
}

/// Where keepalives and hellos go, with each peer's hello key; this node's
/// name and generation for the hellos.
#[derive(Default)]
struct KeepaliveTargets {
    node: String,
    generation: u32,
    peers: Vec<Target>,
    /// Changed since the last round: everyone is sent to at once.
    changed: bool,
}

/// The keepalive thread: every interval, and at once when the targets
/// change, one hello and one RFC 3948 keepalive to each target.
struct Keepalives {
    shared: std::sync::Arc<(std::sync::Mutex<KeepaliveTargets>, std::sync::Condvar)>,
}

impl Keepalives {
    fn start(socket: &EncapSocket, interval: Duration, state_dir: &Path) -> Result<Self> {
        let mut counter = HelloCounter::load(state_dir);
        let socket = socket
            .try_clone()
            .context("a second handle on UDP 4500 for keepalives")?;
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(KeepaliveTargets::default()),
            std::sync::Condvar::new(),
        ));
        let weak = std::sync::Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("fe-keepalive".into())
            .spawn(move || {
                let punch_interval = interval.min(super::punch::HELLO_INTERVAL);
                let mut last_round: Option<Instant> = None;
                // Ends when the runtime is dropped.
                while let Some(shared) = weak.upgrade() {
                    let (lock, wake) = &*shared;
                    let mut targets = lock
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    // Every interval (or at once after a change) everyone;
                    // punched peers in between.
                    let everyone = std::mem::take(&mut targets.changed)
                        || last_round
                            .is_none_or(|at| at.elapsed() + punch_interval / 2 >= interval);
                    if everyone {
                        last_round = Some(Instant::now());
                    }
                    let round: Vec<&Target> = targets
                        .peers
                        .iter()
                        .filter(|t| everyone || t.punched)
                        .collect();
                    let count: usize = round
                        .iter()
                        .map(|t| {
                            t.introductions
                                .as_ref()
                                .map_or(1, |l| l.len().div_ceil(hello::MAX_INTRODUCTIONS).max(1))
                        })
                        .sum();
                    // Written before it is used: never reused after a restart.
                    let mut next = counter.reserve(count as u64, unix_now());
                    for target in &round {
                        for bytes in target.hellos(&targets.node, targets.generation, &mut next) {
                            if let Err(e) = socket.send(&bytes, target.to) {
                                log::debug!("ESP hello to {} at {}: {e}", target.peer, target.to);
                            }
                        }
                    }
                    let addresses: Vec<SocketAddrV4> = round
                        .iter()
                        .filter(|t| t.introductions.is_none())
                        .map(|t| t.to)
                        .collect();
                    for (peer, e) in socket.keepalive(&addresses) {
                        log::debug!("ESP keepalive to {peer}: {e}");
                    }
                    let any_punched = targets.peers.iter().any(|t| t.punched);
                    let wait = if any_punched {
                        punch_interval
                    } else {
                        interval
                    };
                    let _ = wake.wait_timeout(targets, wait);
                }
            })
            .context("starting the keepalive thread")?;
        Ok(Keepalives { shared })
    }

    /// Each outbound target's (punched, heard you) from `flags`; the thread
    /// sends at once if one changed.
    fn set_flags(&self, flags: impl Fn(&str) -> (bool, bool)) {
        let (lock, wake) = &*self.shared;
        let mut targets = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut changed = false;
        for target in targets
            .peers
            .iter_mut()
            .filter(|t| t.introductions.is_none())
        {
            let now = flags(&target.peer);
            changed |= (target.punched, target.heard_you) != now;
            (target.punched, target.heard_you) = now;
        }
        if changed {
            targets.changed = true;
            wake.notify_one();
        }
    }

    /// New targets; sent to at once if they changed.
    fn update(&self, node: &str, generation: u32, peers: Vec<Target>) {
        let (lock, wake) = &*self.shared;
        let mut targets = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = KeepaliveTargets {
            node: node.to_owned(),
            generation,
            peers,
            changed: true,
        };
        let changed = targets.node != new.node
            || targets.generation != new.generation
            || targets.peers.len() != new.peers.len()
            || targets
                .peers
                .iter()
                .zip(&new.peers)
                .any(|(a, b)| !a.same(b));
        if changed {
            *targets = new;
            wake.notify_one();
        } else {
            // Same targets: the keys may be new objects, the timing stays.
            targets.peers = new.peers;
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
