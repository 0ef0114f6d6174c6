//! Hole punching between community edges behind two NATs (ESP mode).
//!
//! Two edges of a community, each behind its own NAT, cannot reach each
//! other's private address, and neither NAT lets in what the other did not
//! open. The connector sees both NATs' mappings (from the edges' hellos):
//! it introduces each edge to the other ([`introductions`]), in hellos
//! authenticated with the key it shares with the receiving edge. Each
//! edge then sends its ESP, hellos and keepalives to the endpoint it was
//! given: both send at about the same time, every keepalive interval, so
//! each NAT sees its edge's packets to the other go out first, and lets
//! the other's packets in as replies. This works through NATs whose
//! mapping does not depend on the destination (endpoint-independent); a
//! symmetric NAT shows the connector another port than the peer, and
//! nothing gets through.
//!
//! Until the direct path is proven both ways, the peer's pod CIDR and
//! address are routed through the connector, which relays them (it
//! routes every edge's prefixes anyway). Proven both ways means: we heard
//! the peer's hellos directly within [`Punch::window`], and its latest
//! hellos say it hears ours (`HEARD_YOU`). The route then switches to the
//! peer (one map write per prefix); it goes back to the relay when the
//! peer's hellos stop for a window. Both routes let the peer *and* the
//! connectors send in the peer's name (`route_flags::PUNCHED`), so a
//! packet still in the relay when the other end switched, or the other
//! end switching a moment later, loses nothing.
//!
//! The direct attempt never stops: hellos go to the introduced endpoint
//! every keepalive interval while relayed, so a NAT that starts letting
//! them through (a firewall rule removed, a mapping that aligned) is used
//! within a few intervals.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use super::natt::hello::Introduction;
use crate::model::{Role, Snapshot};

/// How often hellos go to a punched peer (the keepalive interval when that
/// is shorter): a broken direct path goes back to the relay, and an open
/// one is taken, within a few of these.
pub const HELLO_INTERVAL: Duration = Duration::from_secs(1);

/// What the plan needs of a punched peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Punched {
    /// Where the connector says the peer's NAT shows it.
    pub endpoint: (Ipv4Addr, u16),
    /// The direct path works both ways; else the connector relays.
    pub direct: bool,
}

/// Punched peers by node name (`Settings::esp_punched`).
pub type PunchedPeers = BTreeMap<String, Punched>;

#[derive(Debug)]
struct PeerState {
    endpoint: (Ipv4Addr, u16),
    /// The connector whose introductions we follow: with several, each
    /// may see another port of a symmetric NAT, and alternating between
    /// them would move the peer every interval.
    introducer: String,
    introduced_at: Instant,
    /// The last hello heard from the peer directly.
    heard_at: Option<Instant>,
    /// The last hello of the peer that said it hears us.
    heard_you_at: Option<Instant>,
    /// As last planned.
    direct: bool,
}

/// A peer whose path changed, for the log and the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Direct {
        peer: String,
        endpoint: (Ipv4Addr, u16),
    },
    Relayed {
        peer: String,
        why: String,
    },
    /// No introduction for a while: the peer is no longer punched.
    Forgotten {
        peer: String,
    },
}

/// An edge's punched peers.
#[derive(Debug)]
pub struct Punch {
    peers: BTreeMap<String, PeerState>,
    keepalive: Duration,
}

impl Punch {
    /// `keepalive`: the keepalive interval (the connector repeats its
    /// introductions that often).
    pub fn new(keepalive: Duration) -> Self {
        Punch {
            peers: BTreeMap::new(),
            keepalive,
        }
    }

    /// How long a hello proves a direct path: three and a half hello
    /// intervals ([`HELLO_INTERVAL`], or the keepalive interval if shorter;
    /// at least two seconds), so one or two lost hellos do not send traffic
    /// back to the relay.
    pub fn window(&self) -> Duration {
        (self.keepalive.min(HELLO_INTERVAL) * 7 / 2).max(Duration::from_secs(2))
    }

    /// How long an introduction lasts without being repeated: ten
    /// keepalive intervals (at least 30 s). The connector repeats them every
    /// interval while both peers stay behind their NATs.
    pub fn introduction_ttl(&self) -> Duration {
        (self.keepalive * 10).max(Duration::from_secs(30))
    }

    /// Connector `from`'s introductions; `ours` says which names are
    /// community peers of this edge (others are ignored). A peer follows
    /// one connector's introductions while they keep coming (another's are
    /// taken once they stopped for a window). Returns the peers whose
    /// endpoint is new or moved, with it: what we observed of them before
    /// is stale.
    pub fn introduce(
        &mut self,
        from: &str,
        introductions: &[Introduction],
        ours: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<(String, (Ipv4Addr, u16))> {
        let window = self.window();
        let mut moved = Vec::new();
        for intro in introductions.iter().filter(|i| ours(&i.node)) {
            let endpoint = (*intro.endpoint.ip(), intro.endpoint.port());
            match self.peers.get_mut(&intro.node) {
                Some(state)
                    if state.introducer != from
                        && now.saturating_duration_since(state.introduced_at) < window => {}
                Some(state) => {
                    state.introducer = from.to_owned();
                    state.introduced_at = now;
                    if state.endpoint != endpoint {
                        state.endpoint = endpoint;
                        moved.push((intro.node.clone(), endpoint));
                    }
                }
                None => {
                    self.peers.insert(
                        intro.node.clone(),
                        PeerState {
                            endpoint,
                            introducer: from.to_owned(),
                            introduced_at: now,
                            heard_at: None,
                            heard_you_at: None,
                            direct: false,
                        },
                    );
                    moved.push((intro.node.clone(), endpoint));
                }
            }
        }
        moved
    }

    /// An authentic hello from `peer`, heard directly. `true` when the flag
    /// we send it changes (it should hear so now, not at the next interval).
    pub fn heard(&mut self, peer: &str, heard_you: bool, now: Instant) -> bool {
        let window = self.window();
        let Some(state) = self.peers.get_mut(peer) else {
            return false;
        };
        let before = fresh(state.heard_at, now, window);
        state.heard_at = Some(now);
        if heard_you {
            state.heard_you_at = Some(now);
        }
        !before
    }

    /// Whether our hellos to `peer` say we hear it.
    pub fn heard_you(&self, peer: &str, now: Instant) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|s| fresh(s.heard_at, now, self.window()))
    }

    pub fn has_peers(&self) -> bool {
        !self.peers.is_empty()
    }

    /// Whether `peer` is punched at all.
    pub fn contains(&self, peer: &str) -> bool {
        self.peers.contains_key(peer)
    }

    /// Bring each peer's path in line with what its hellos prove; forget
    /// peers whose introduction lapsed or who are no longer `ours`.
    pub fn settle(&mut self, ours: impl Fn(&str) -> bool, now: Instant) -> Vec<Change> {
        let (window, ttl) = (self.window(), self.introduction_ttl());
        let mut changes = Vec::new();
        self.peers.retain(|peer, state| {
            let keep = ours(peer) && now.duration_since(state.introduced_at) < ttl;
            if !keep {
                changes.push(Change::Forgotten { peer: peer.clone() });
            }
            keep
        });
        for (peer, state) in &mut self.peers {
            let heard = fresh(state.heard_at, now, window);
            let heard_you = fresh(state.heard_you_at, now, window);
            let direct = heard && heard_you;
            if direct == state.direct {
                continue;
            }
            state.direct = direct;
            changes.push(if direct {
                Change::Direct {
                    peer: peer.clone(),
                    endpoint: state.endpoint,
                }
            } else {
                let why = if heard {
                    format!("it has not heard us directly for {window:?}")
                } else {
                    format!("no hello from it directly for {window:?}")
                };
                Change::Relayed {
                    peer: peer.clone(),
                    why,
                }
            });
        }
        changes
    }

    /// What the plan reads.
    pub fn view(&self) -> PunchedPeers {
        self.peers
            .iter()
            .map(|(peer, s)| {
                (
                    peer.clone(),
                    Punched {
                        endpoint: s.endpoint,
                        direct: s.direct,
                    },
                )
            })
            .collect()
    }
}

fn fresh(at: Option<Instant>, now: Instant, window: Duration) -> bool {
    at.is_some_and(|at| now.saturating_duration_since(at) < window)
}

/// Connector: for each edge behind a NAT, its community peers behind
/// another NAT and the endpoints their NATs show us, with where to send
/// them (the edge's own NAT-observed endpoint). Edges behind one NAT
/// (same public address) reach each other on their site and are not
/// introduced; an edge that is not behind a NAT (seen at its own address)
/// is reached as before.
pub fn introductions(
    snapshot: &Snapshot,
    observed: &super::plan::ObservedEndpoints,
) -> BTreeMap<String, (SocketAddrV4, Vec<Introduction>)> {
    let behind_nat = |name: &str| -> Option<(Ipv4Addr, u16)> {
        let node = snapshot.nodes.get(name)?;
        if node.role != Role::Edge {
            return None;
        }
        let seen = *observed.get(name)?;
        (seen.0 != node.tunnel_endpoint).then_some(seen)
    };
    let mut pairs: BTreeSet<(&str, &str)> = BTreeSet::new();
    for community in snapshot.communities.values() {
        for a in &community.members {
            for b in &community.members {
                if a != b {
                    pairs.insert((a, b));
                }
            }
        }
    }
    let mut out: BTreeMap<String, (SocketAddrV4, Vec<Introduction>)> = BTreeMap::new();
    for (to, about) in pairs {
        let (Some(to_seen), Some(about_seen)) = (behind_nat(to), behind_nat(about)) else {
            continue;
        };
        if to_seen.0 == about_seen.0 {
            continue;
        }
        out.entry(to.to_owned())
            .or_insert_with(|| (SocketAddrV4::new(to_seen.0, to_seen.1), Vec::new()))
            .1
            .push(Introduction {
                node: about.to_owned(),
                endpoint: SocketAddrV4::new(about_seen.0, about_seen.1),
            });
    }
    out
}

#[cfg(test)]
mod tests;
