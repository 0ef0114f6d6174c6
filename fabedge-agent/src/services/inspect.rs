//! `inspect services|backends|ct`: the Service translation maps, in the
//! spirit of `cilium-dbg bpf lb list` and `bpf ct list`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use fabedge_common::services::{backend_flags, ct_flags, service_flags};
use serde::Serialize;

use super::{apply::describe, ctgc};
use crate::{inspect::table::Row, maps::Maps};

fn proto_name(proto: u8) -> &'static str {
    match proto {
        6 => "TCP",
        17 => "UDP",
        _ => "?",
    }
}

fn endpoint(addr: [u8; 4], port: u16) -> String {
    format!("{}:{port}", Ipv4Addr::from(addr))
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub id: u32,
    pub backends: Vec<String>,
    pub session_affinity_seconds: Option<u32>,
}

impl Row for ServiceRow {
    const HEADERS: &'static [&'static str] = &["FRONTEND", "ID", "AFFINITY", "BACKENDS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.frontend.clone(),
            self.id.to_string(),
            self.session_affinity_seconds
                .map_or("-".into(), |s| format!("ClientIP {s}s")),
            if self.backends.is_empty() {
                "(none: rejected)".into()
            } else {
                self.backends.join(" ")
            },
        ]
    }
}

pub fn services(maps: &Maps) -> Result<Vec<ServiceRow>> {
    let backends: BTreeMap<_, _> = maps.backend_entries()?.into_iter().collect();
    Ok(maps
        .service_entries()?
        .into_iter()
        .map(|(key, entry)| ServiceRow {
            frontend: describe(&key),
            id: entry.id,
            backends: (0..entry.count as u32)
                .map(|slot| {
                    match backends.get(&fabedge_common::services::BackendKey {
                        service_id: entry.id,
                        slot,
                    }) {
                        Some(b) => endpoint(b.addr, b.port),
                        None => format!("(slot {slot} missing)"),
                    }
                })
                .collect(),
            session_affinity_seconds: (entry.flags & service_flags::AFFINITY != 0)
                .then_some(entry.affinity_timeout),
        })
        .collect())
}

#[derive(Serialize)]
pub struct BackendRow {
    pub service_id: u32,
    pub slot: u32,
    pub backend: String,
    pub local: bool,
}

impl Row for BackendRow {
    const HEADERS: &'static [&'static str] = &["SERVICE-ID", "SLOT", "BACKEND", "LOCAL"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service_id.to_string(),
            self.slot.to_string(),
            self.backend.clone(),
            self.local.to_string(),
        ]
    }
}

pub fn backends(maps: &Maps) -> Result<Vec<BackendRow>> {
    Ok(maps
        .backend_entries()?
        .into_iter()
        .map(|(key, b)| BackendRow {
            service_id: key.service_id,
            slot: key.slot,
            backend: endpoint(b.addr, b.port),
            local: b.flags & backend_flags::LOCAL != 0,
        })
        .collect())
}

#[derive(Serialize)]
pub struct CtRow {
    pub proto: &'static str,
    /// The tuple as the packet carries it where it is looked up.
    pub tuple: String,
    pub direction: &'static str,
    /// What the packet is rewritten to.
    pub translation: String,
    pub service_id: u32,
    pub idle_seconds: u64,
    pub expires_in_seconds: u64,
    pub flags: Vec<&'static str>,
}

impl Row for CtRow {
    const HEADERS: &'static [&'static str] = &[
        "PROTO", "TUPLE", "DIR", "REWRITE", "SVC", "IDLE", "EXPIRES", "FLAGS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.proto.into(),
            self.tuple.clone(),
            self.direction.into(),
            self.translation.clone(),
            self.service_id.to_string(),
            format!("{}s", self.idle_seconds),
            format!("{}s", self.expires_in_seconds),
            self.flags.join(","),
        ]
    }
}

pub fn ct(maps: &Maps) -> Result<Vec<CtRow>> {
    let now = ctgc::monotonic_ns();
    Ok(maps
        .ct_entries()?
        .into_iter()
        .map(|(key, e)| {
            let forward = e.flags & ct_flags::FORWARD != 0;
            let snat = e.flags & ct_flags::SNAT != 0;
            let translation = match (forward, snat) {
                (true, false) => format!("dst {}", endpoint(e.addr, e.port)),
                (true, true) => format!(
                    "dst {} src {}",
                    endpoint(e.addr, e.port),
                    endpoint(e.snat_addr, e.snat_port)
                ),
                (false, false) => format!("src {}", endpoint(e.addr, e.port)),
                (false, true) => format!(
                    "src {} dst {}",
                    endpoint(e.addr, e.port),
                    endpoint(e.snat_addr, e.snat_port)
                ),
            };
            let idle = now.saturating_sub(e.last_seen_ns);
            let flags = [
                (ct_flags::SNAT, "snat"),
                (ct_flags::SEEN_REPLY, "seen-reply"),
                (ct_flags::CLOSING, "closing"),
            ]
            .into_iter()
            .filter(|(bit, _)| e.flags & bit != 0)
            .map(|(_, name)| name)
            .collect();
            CtRow {
                proto: proto_name(key.proto),
                tuple: format!(
                    "{} -> {}",
                    endpoint(key.saddr, key.sport),
                    endpoint(key.daddr, key.dport)
                ),
                direction: if forward { "forward" } else { "reply" },
                translation,
                service_id: e.service_id,
                idle_seconds: idle / 1_000_000_000,
                expires_in_seconds: ctgc::idle_limit_ns(&e).saturating_sub(idle) / 1_000_000_000,
                flags,
            }
        })
        .collect())
}
