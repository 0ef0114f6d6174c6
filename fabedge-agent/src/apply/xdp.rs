//! Where `fe_xdp_uplink` runs: every NIC tunnel or Flannel traffic arrives
//! on — the uplink, and whatever device the kernel routes each peer's
//! underlay address (or, in ESP mode, the address its NAT shows) through
//! (a connector's edges are often reached by another NIC than its Flannel
//! one).

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::Result;
use fabedge_common::TUNNEL_DEV;

use super::net;
use crate::plan::{Plan, Settings};

/// The interfaces XDP belongs on for `plan` (none on nodes without programs).
pub fn interfaces(plan: &Plan, settings: &Settings) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    if plan.attachments.is_empty() {
        return Ok(out);
    }
    out.extend(settings.uplink.iter().cloned());
    // ESP mode: edges behind NAT send from their NAT's address, often by
    // another NIC than their unroutable private ones would be.
    let addrs: BTreeSet<[u8; 4]> = plan
        .peers
        .values()
        .filter(|p| p.kind != 0 && p.underlay_ip != [0; 4])
        .map(|p| p.underlay_ip)
        .chain(plan.esp_senders.keys().map(|a| a.octets()))
        .collect();
    let devices = net::route_devices(addrs.into_iter().map(Ipv4Addr::from))?;
    out.extend(
        devices
            .into_values()
            .filter(|dev| dev != "lo" && dev != TUNNEL_DEV),
    );
    Ok(out)
}
