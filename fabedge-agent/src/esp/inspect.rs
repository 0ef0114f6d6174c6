//! `inspect tunnels`: the ESP SAs we own, as the kernel counts them. Keys
//! are never read: the dump's key attribute is not even parsed.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use fabedge_common::mark;
use serde::Serialize;

use super::xfrm::{FE_IF_ID, SaInfo, Socket};
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
        ]
    }
}

fn row(sa: &SaInfo, peer_ids: &PeerIds) -> TunnelRow {
    let inbound = sa
        .set_mark
        .is_some_and(|(v, _)| v & mark::MAGIC_MASK == mark::MAGIC_FROM_TUNNEL);
    let (address, port) = if inbound {
        (sa.src, sa.encap.map(|e| e.sport))
    } else {
        (sa.dst, sa.encap.map(|e| e.dport))
    };
    let address = address.unwrap_or(Ipv4Addr::UNSPECIFIED);
    TunnelRow {
        direction: if inbound { "in" } else { "out" },
        peer_id: sa.reqid,
        peer: u16::try_from(sa.reqid)
            .ok()
            .and_then(|id| peer_ids.node(id))
            .unwrap_or("?")
            .to_owned(),
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
    let mut rows: Vec<TunnelRow> = Socket::open()?
        .sas()?
        .iter()
        .filter(|sa| sa.if_id == FE_IF_ID)
        .map(|sa| row(sa, &peer_ids))
        .collect();
    rows.sort_by(|a, b| {
        (a.peer_id, a.direction, a.generation).cmp(&(b.peer_id, b.direction, b.generation))
    });
    Ok(rows)
}
