//! Where `fe_xdp_uplink` runs: every NIC tunnel or Flannel traffic arrives
//! on — the uplink, and whatever device the kernel routes each peer's
//! underlay address through (a connector's edges are often reached by
//! another NIC than its Flannel one).

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context, Result};
use fabedge_common::TUNNEL_DEV;
use serde::Deserialize;

use super::net;
use crate::plan::{Plan, Settings};

#[derive(Deserialize)]
struct RouteGet {
    dev: Option<String>,
}

/// The interfaces XDP belongs on for `plan` (none on nodes without programs).
pub fn interfaces(plan: &Plan, settings: &Settings) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    if plan.attachments.is_empty() {
        return Ok(out);
    }
    out.extend(settings.uplink.iter().cloned());
    let addrs: BTreeSet<[u8; 4]> = plan
        .peers
        .values()
        .filter(|p| p.kind != 0 && p.underlay_ip != [0; 4])
        .map(|p| p.underlay_ip)
        .collect();
    for addr in addrs {
        let addr = Ipv4Addr::from(addr).to_string();
        let text = match net::ip(&["-4", "-j", "route", "get", &addr]) {
            Ok(text) => text,
            // Unreachable right now: the peer's traffic cannot arrive either.
            Err(_) => continue,
        };
        let routes: Vec<RouteGet> = serde_json::from_str(&text)
            .with_context(|| format!("parsing `ip -j route get {addr}`"))?;
        for dev in routes.into_iter().filter_map(|r| r.dev) {
            if dev != "lo" && dev != TUNNEL_DEV {
                out.insert(dev);
            }
        }
    }
    Ok(out)
}
