//! Hello counters on both ends, so that a hello is accepted once.
//!
//! Sender ([`HelloCounter`]): every hello carries a counter
//! `unix_secs << 20 | n` that only ever grows. A mark above every counter
//! of the next [`SENT_LEAD_SECS`] seconds is written to [`SENT_FILE`]
//! *before* a round that passes the last mark is sent (so at most one
//! write per that many seconds, whatever the hello rate), and a restart
//! resumes from `max(that, now << 20)`: a restarted sender never reuses a
//! counter, even when its clock stepped back; one that lost its state dir
//! starts from its clock, past anything it sent before (it never runs
//! ahead of its clock by more than 2^20 hellos a second). After a restart
//! its counters may run up to that lead ahead of its clock, well inside
//! the receivers' skew window.
//!
//! Receiver ([`HelloReceiver`]): per peer, the highest counter accepted; a
//! hello at or below it is a replay, whatever address it comes from, and is
//! dropped before any cryptography. The counters are kept in
//! [`RECEIVED_FILE`] (written when something was learnt from a hello, and
//! every [`FLUSH_EVERY`] otherwise); on top of that, after a restart, only
//! hellos sent after the start are accepted, which covers the hellos
//! accepted after the last write. A peer whose clock is behind ours waits
//! that much after our restart (at most the window; we keep the endpoints
//! we knew meanwhile).
//!
//! Costs: each peer's hello key (X25519 + HKDF) is derived once and cached
//! by peer and public key; a datagram from nobody we know, of the wrong
//! length or version, or a replay costs no cryptography; anything else one
//! HMAC-SHA256.
//!
//! Clock skew: an authentic hello outside the ±[`MAX_SKEW_SECS`] window is
//! counted per peer, logged as a warning when a peer becomes skewed (and
//! once more when it is back), and shown by `inspect tunnels`.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{
    keys::{HelloKey, NodeKey, PublicKey},
    natt::hello::{self, COUNTER_SHIFT, Hello, MAX_SKEW_SECS, Malformed},
};
use crate::sys::write_if_changed;

/// The sender's next hello counter, in the state dir.
pub const SENT_FILE: &str = "esp-hello-sent.json";
/// The receiver's per-peer counters and clock-skew record, in the state dir.
pub const RECEIVED_FILE: &str = "esp-hellos.json";
/// Hellos read per pass of the event loop: a flood waits in the socket's
/// buffer (where the kernel drops the excess) instead of holding the loop.
pub const HELLO_BUDGET: usize = 256;
/// How often counters that changed nothing else are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How far ahead of the clock the sender's written mark goes.
pub const SENT_LEAD_SECS: u64 = 10;

#[derive(Debug, Default, Serialize, Deserialize)]
struct SentState {
    next: u64,
}

/// The sender's counter (see the module docs).
pub struct HelloCounter {
    next: u64,
    /// What [`SENT_FILE`] holds: no counter at or above it was used.
    written: u64,
    path: PathBuf,
    warned: bool,
}

impl HelloCounter {
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(SENT_FILE);
        let next = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<SentState>(&bytes).ok())
            .map_or(0, |s| s.next);
        HelloCounter {
            next,
            written: next,
            path,
            warned: false,
        }
    }

    /// The first of `count` consecutive counters for one round of hellos,
    /// sent at `now_secs`; a mark past the round's end is written first
    /// when the last one does not cover it.
    pub fn reserve(&mut self, count: u64, now_secs: u64) -> u64 {
        let first = self.next.max(now_secs << COUNTER_SHIFT);
        self.next = first + count;
        if self.next <= self.written {
            return first;
        }
        let mark = self.next.max((now_secs + SENT_LEAD_SECS) << COUNTER_SHIFT);
        let json = serde_json::to_vec(&SentState { next: mark }).expect("plain struct");
        match write_if_changed(&self.path, &json, 0o600) {
            Ok(()) => {
                self.written = mark;
                self.warned = false;
            }
            Err(e) if !self.warned => {
                // The clock still keeps counters increasing unless it steps
                // back across a restart.
                warn!("ESP: keeping the hello counter: {e:#}");
                self.warned = true;
            }
            Err(_) => {}
        }
        first
    }
}

/// What became of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(Hello),
    Malformed(Malformed),
    /// Claims a sender that is not a peer of ours, or has no public key.
    UnknownPeer,
    /// A counter we accepted already (or older).
    Replayed,
    /// The tag does not authenticate it.
    BadTag,
    /// Authentic, but its time is `offset_secs` from ours (sender minus
    /// receiver), outside the window.
    Skewed {
        offset_secs: i64,
    },
    /// Authentic, sent before this agent started (see the module docs).
    BeforeStart,
}

/// How many datagrams ended how, since the start.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct HelloStats {
    pub accepted: u64,
    pub malformed: u64,
    pub unknown_peer: u64,
    pub replayed: u64,
    pub bad_tag: u64,
    pub skewed: u64,
    pub before_start: u64,
}

/// What we keep per peer (persisted).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHellos {
    /// The highest counter accepted.
    pub counter: u64,
    /// Authentic hellos refused for clock skew, ever.
    #[serde(default)]
    pub skewed_hellos: u64,
    /// The offset (sender minus us, seconds) of the last authentic hello
    /// outside the window, while the peer is skewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skew_secs: Option<i64>,
}

/// The receiving end (see the module docs).
pub struct HelloReceiver {
    local: String,
    keys: HashMap<String, (PublicKey, HelloKey)>,
    peers: BTreeMap<String, PeerHellos>,
    /// Counters at or below this were sent before our start.
    floor: u64,
    path: PathBuf,
    dirty: bool,
    urgent: bool,
    last_flush: Instant,
    pub stats: HelloStats,
}

impl HelloReceiver {
    /// `now_secs`: when this agent started.
    pub fn load(state_dir: &Path, now_secs: u64) -> Self {
        let path = state_dir.join(RECEIVED_FILE);
        let peers = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(
                    "{} is unreadable ({e}); hellos sent before this start are refused anyway",
                    path.display()
                );
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        HelloReceiver {
            local: String::new(),
            keys: HashMap::new(),
            peers,
            floor: now_secs << COUNTER_SHIFT,
            path,
            dirty: false,
            urgent: false,
            last_flush: Instant::now(),
            stats: HelloStats::default(),
        }
    }

    /// This node's name (hello keys bind both names).
    pub fn set_local(&mut self, local: &str) {
        if self.local != local {
            self.local = local.to_owned();
            self.keys.clear();
        }
    }

    /// Judge one datagram. `public_key` gives a peer's published key (and
    /// `None` for anyone who is not a peer); `now_secs` is our clock.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        key: &NodeKey,
        public_key: impl FnOnce(&str) -> Option<PublicKey>,
        now_secs: u64,
    ) -> Verdict {
        let verdict = self.judge(bytes, key, public_key, now_secs);
        let counter = match &verdict {
            Verdict::Accepted(_) => &mut self.stats.accepted,
            Verdict::Malformed(_) => &mut self.stats.malformed,
            Verdict::UnknownPeer => &mut self.stats.unknown_peer,
            Verdict::Replayed => &mut self.stats.replayed,
            Verdict::BadTag => &mut self.stats.bad_tag,
            Verdict::Skewed { .. } => &mut self.stats.skewed,
            Verdict::BeforeStart => &mut self.stats.before_start,
        };
        *counter += 1;
        verdict
    }

    fn judge(
        &mut self,
        bytes: &[u8],
        key: &NodeKey,
        public_key: impl FnOnce(&str) -> Option<PublicKey>,
        now_secs: u64,
    ) -> Verdict {
        let unverified = match hello::parse(bytes) {
            Ok(unverified) => unverified,
            Err(malformed) => return Verdict::Malformed(malformed),
        };
        let sender = unverified.node;
        let Some(public) = public_key(sender) else {
            return Verdict::UnknownPeer;
        };
        let last = self.peers.get(sender).map_or(0, |p| p.counter);
        if unverified.counter <= last {
            return Verdict::Replayed;
        }
        let local = &self.local;
        let hello_key = match self.keys.get(sender) {
            Some((cached, hello_key)) if *cached == public => hello_key,
            _ => {
                let derived = key.shared_with(&public).hello_key(local, sender);
                self.keys.insert(sender.to_owned(), (public, derived));
                &self.keys[sender].1
            }
        };
        let Some(hello) = unverified.verify(hello_key) else {
            return Verdict::BadTag;
        };
        let offset_secs = hello.unix_secs() as i64 - now_secs as i64;
        let peer = self.peers.entry(hello.node.clone()).or_default();
        if offset_secs.unsigned_abs() > MAX_SKEW_SECS {
            peer.skewed_hellos += 1;
            if peer.skew_secs.is_none() {
                warn!(
                    "ESP: hellos from {} are refused: its clock is {offset_secs:+} s from ours, \
                     beyond the ±{MAX_SKEW_SECS} s window; fix the clock (NTP) on {} or here: \
                     until then the tunnel does not follow its NAT",
                    hello.node, hello.node
                );
                self.urgent = true;
            }
            peer.skew_secs = Some(offset_secs);
            self.dirty = true;
            return Verdict::Skewed { offset_secs };
        }
        if peer.skew_secs.take().is_some() {
            info!(
                "ESP: the clock of {} is back within the hello window ({offset_secs:+} s)",
                hello.node
            );
            self.urgent = true;
            self.dirty = true;
        }
        if hello.counter <= self.floor {
            return Verdict::BeforeStart;
        }
        peer.counter = hello.counter;
        self.dirty = true;
        Verdict::Accepted(hello)
    }

    /// Write the counters now if `urgent` (something was learnt from the
    /// hellos) or a skew changed, else at most every [`FLUSH_EVERY`].
    pub fn flush(&mut self, urgent: bool) -> Result<()> {
        if !self.dirty || !(urgent || self.urgent || self.last_flush.elapsed() >= FLUSH_EVERY) {
            return Ok(());
        }
        write_if_changed(&self.path, &serde_json::to_vec_pretty(&self.peers)?, 0o600)?;
        self.dirty = false;
        self.urgent = false;
        self.last_flush = Instant::now();
        Ok(())
    }

    pub fn peer(&self, name: &str) -> Option<&PeerHellos> {
        self.peers.get(name)
    }
}

/// What [`RECEIVED_FILE`] says about each peer (for `inspect tunnels`).
pub fn load_received(state_dir: &Path) -> BTreeMap<String, PeerHellos> {
    std::fs::read(state_dir.join(RECEIVED_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
