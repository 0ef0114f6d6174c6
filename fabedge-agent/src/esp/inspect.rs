//! `inspect tunnels`: the ESP SAs we own, as the kernel counts them, with
//! each peer's clock skew as its hellos showed it. Keys are never shown:
//! the dump's key is only hashed, to compare (see `apply::compare`).

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use fabedge_common::mark;
use serde::Serialize;

use super::{
    hellos::PeerHellos,
    xfrm::{FE_IF_ID, SaInfo, Socket},
};
use crate::{inspect::table::Row, plan::PeerIds};

#[derive(Serialize)]
pub struct TunnelRow {
    pub direction: &'static str,
    pub peer_id: u32,
    pub peer: String,
    pub spi: String,
    pub generation: u32,
    /// The peer's end: address and UDP port (for an edge behind NAT, what the NAT shows).
    pub remote: String,
    pub packets: u64,
    pub bytes: u64,
    pub replay_errors: u32,
    pub integrity_errors: u32,
    /// The peer's clock minus ours, while its hellos are refused for it.
    pub clock_skew_secs: Option<i64>,
    /// Authentic hellos from the peer refused for clock skew, ever.
    pub skewed_hellos: u64,
}

impl Row for TunnelRow {
    const HEADERS: &'static [&'static str] = &[
        "DIR",
        "PEER-ID",
        "PEER",
        "SPI",
        "GEN",
        "REMOTE",
        "PACKETS",
        "BYTES",
        "REPLAY-ERR",
        "AUTH-ERR",
        "CLOCK-SKEW",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.direction.into(),
            self.peer_id.to_string(),
            self.peer.clone(),
            self.spi.clone(),
            self.generation.to_string(),
            self.remote.clone(),
            self.packets.to_string(),
            self.bytes.to_string(),
            self.replay_errors.to_string(),
            self.integrity_errors.to_string(),
            match (self.clock_skew_secs, self.skewed_hellos) {
                (Some(secs), n) => format!("{secs:+}s ({n} refused)"),
                (None, 0) => "-".into(),
                (None, n) => format!("ok ({n} refused before)"),
            },
        ]
    }
}

fn row(sa: &SaInfo, peer_ids: &PeerIds, hellos: &BTreeMap<String, PeerHellos>) -> TunnelRow {
    let inbound = sa
        .set_mark
        .is_some_and(|(v, _)| v & mark::MAGIC_MASK == mark::MAGIC_FROM_TUNNEL);
    let (address, port) = if inbound {
        (sa.src, sa.encap.map(|e| e.sport))
    } else {
        (sa.dst, sa.encap.map(|e| e.dport))
    };
    let address = address.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let peer = u16::try_from(sa.reqid)
        .ok()
        .and_then(|id| peer_ids.node(id))
        .unwrap_or("?")
        .to_owned();
    let skew = hellos.get(&peer);
    TunnelRow {
        direction: if inbound { "in" } else { "out" },
        peer_id: sa.reqid,
        clock_skew_secs: skew.and_then(|h| h.skew_secs),
        skewed_hellos: skew.map_or(0, |h| h.skewed_hellos),
        peer,
        spi: format!("{:#010x}", sa.spi),
        // Our SPIs carry the generation in their low byte.
        generation: sa.spi & 0xFF,
        remote: port.map_or(address.to_string(), |p| format!("{address}:{p}")),
        packets: sa.packets,
        bytes: sa.bytes,
        replay_errors: sa.replay_errors,
        integrity_errors: sa.integrity_errors,
    }
}

pub fn tunnels(state_dir: &Path) -> Result<Vec<TunnelRow>> {
    let peer_ids: PeerIds = std::fs::read(state_dir.join(crate::plan::PEER_IDS_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(PeerIds::new);
    let hellos = super::hellos::load_received(state_dir);
    let mut rows: Vec<TunnelRow> = Socket::open()?
        .sas()?
        .iter()
        .filter(|sa| sa.if_id == FE_IF_ID)
        .map(|sa| row(sa, &peer_ids, &hellos))
        .collect();
    rows.sort_by(|a, b| {
        (a.peer_id, a.direction, a.generation).cmp(&(b.peer_id, b.direction, b.generation))
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_peer_shows_its_offset_and_refused_hellos() {
        let peer_ids: PeerIds = serde_json::from_str(r#"{"edge-1": 3, "edge-2": 4}"#).unwrap();
        let hellos: BTreeMap<String, PeerHellos> = serde_json::from_str(
            r#"{"edge-1": {"counter": 1, "skewed_hellos": 12, "skew_secs": -300},
                "edge-2": {"counter": 9, "skewed_hellos": 2}}"#,
        )
        .unwrap();
        let sa = |reqid| SaInfo {
            reqid,
            spi: 0x4000_0105,
            ..Default::default()
        };
        let skewed = row(&sa(3), &peer_ids, &hellos);
        assert_eq!(
            (
                skewed.peer.as_str(),
                skewed.clock_skew_secs,
                skewed.skewed_hellos
            ),
            ("edge-1", Some(-300), 12)
        );
        assert_eq!(skewed.cells().last().unwrap(), "-300s (12 refused)");
        let fixed = row(&sa(4), &peer_ids, &hellos);
        assert_eq!(fixed.cells().last().unwrap(), "ok (2 refused before)");
        let never = row(&sa(7), &peer_ids, &hellos);
        assert_eq!(never.cells().last().unwrap(), "-");
    }
}
