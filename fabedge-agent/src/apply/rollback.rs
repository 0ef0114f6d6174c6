//! What the node held before an apply began, and putting it back when a
//! step fails midway: maps, kernel routes, attachments, XDP, sysctls, the
//! CNI file and the devices the apply created. After a failed apply the node
//! matches the plan applied before it, never half of each.
//!
//! Recorded from the node itself, not from the previous plan: right after a
//! restart no previous plan is known, but the pinned maps and our routes are.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use anyhow::{Context, Result};
use fabedge_common::{DatapathConfig, GroupEntry, PeerEntry, RouteEntry};
use ipnet::Ipv4Net;
use log::warn;

use super::{Applier, net, read_peers, sysctl, tunnel_table};
use crate::{
    datapath::{Attachment, Datapath},
    maps::Maps,
    plan::{KernelRoute, Plan},
};

pub(super) struct Before {
    peers: BTreeMap<u16, PeerEntry>,
    esp_senders: BTreeMap<Ipv4Addr, u16>,
    routes: BTreeMap<Ipv4Net, RouteEntry>,
    groups: BTreeMap<u16, GroupEntry>,
    vtep_addrs: BTreeSet<Ipv4Addr>,
    config: DatapathConfig,
    kernel_routes: Vec<KernelRoute>,
    tunnel_table: BTreeSet<Ipv4Net>,
    /// What this process had attached, and the attachments pinned.
    attached: BTreeSet<Attachment>,
    pinned: Vec<Attachment>,
    xdp_ifaces: Option<BTreeSet<String>>,
    /// The plan's sysctls with the value each had.
    sysctls: Vec<(String, String)>,
    /// The plan's devices that did not exist yet.
    absent_devices: Vec<String>,
    /// The CNI file and what it held (`None`: absent).
    cni: Option<(PathBuf, Option<Vec<u8>>)>,
}

impl Before {
    /// Read what `plan` may change.
    pub(super) fn record(
        applier: &Applier,
        datapath: &Datapath,
        maps: &Maps,
        plan: &Plan,
    ) -> Result<Before> {
        let mut absent_devices = Vec::new();
        for device in &plan.devices {
            if net::link(device.name())?.is_none() {
                absent_devices.push(device.name().to_owned());
            }
        }
        Ok(Before {
            peers: read_peers(maps)?,
            esp_senders: maps.esp_senders()?,
            routes: maps.route_entries()?.into_iter().collect(),
            groups: maps.group_entries()?,
            vtep_addrs: maps.vtep_addr_entries()?,
            config: maps.config()?,
            kernel_routes: net::our_routes()?,
            tunnel_table: tunnel_table::TunnelTable::read()?.prefixes,
            attached: applier.attached.clone(),
            pinned: datapath.attached()?,
            xdp_ifaces: applier.xdp_ifaces.clone(),
            sysctls: plan
                .sysctls
                .iter()
                .filter_map(|s| Some((s.key.clone(), sysctl::get(&s.key)?)))
                .collect(),
            absent_devices,
            cni: plan
                .cni
                .as_ref()
                .map(|cni| (cni.path.clone(), std::fs::read(&cni.path).ok())),
        })
    }

    /// Put everything back, in the reverse order of apply. Every part is
    /// tried even when one fails; the first error is returned.
    pub(super) fn restore(
        self,
        applier: &mut Applier,
        datapath: &mut Datapath,
        maps: &mut Maps,
    ) -> Result<()> {
        let mut first_error: Option<anyhow::Error> = None;
        let mut keep = |result: Result<()>| {
            if let Err(e) = result {
                warn!("rolling back: {e:#}");
                first_error.get_or_insert(e);
            }
        };
        keep(self.restore_cni());
        keep(self.restore_kernel_routes());
        keep(tunnel_table::sync(&self.tunnel_table).map(drop));
        keep(self.restore_programs(applier, datapath));
        keep(self.restore_maps(applier, maps));
        for (key, value) in &self.sysctls {
            keep(sysctl::set(None, key, value));
        }
        for name in &self.absent_devices {
            keep(net::delete_link_if_present(name).map(drop));
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn restore_cni(&self) -> Result<()> {
        match &self.cni {
            Some((path, Some(bytes))) => crate::sys::write_if_changed(path, bytes, 0o644),
            Some((path, None)) if path.exists() => {
                std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    fn restore_kernel_routes(&self) -> Result<()> {
        let now = net::our_routes()?;
        for route in now
            .iter()
            .filter(|r| !self.kernel_routes.iter().any(|b| b == *r))
        {
            net::delete_route(route)?;
        }
        for route in self.kernel_routes.iter().filter(|b| !now.contains(b)) {
            net::replace_route(route)?;
        }
        Ok(())
    }

    fn restore_programs(&self, applier: &mut Applier, datapath: &mut Datapath) -> Result<()> {
        if applier.xdp_ifaces != self.xdp_ifaces {
            // Unknown before this apply (`None`): the next one syncs again.
            if let Some(ifaces) = &self.xdp_ifaces {
                datapath.sync_xdp(ifaces, applier.xdp)?;
            }
            applier.xdp_ifaces = self.xdp_ifaces.clone();
        }
        let added: Vec<Attachment> = applier
            .attached
            .difference(&self.attached)
            .cloned()
            .collect();
        for attachment in &added {
            datapath.detach(attachment)?;
            applier.attached.remove(attachment);
        }
        let pinned_now = datapath.attached()?;
        for attachment in self.pinned.iter().filter(|a| !pinned_now.contains(a)) {
            datapath.attach(attachment)?;
            applier.attached.insert(attachment.clone());
        }
        Ok(())
    }

    /// The maps as they were, in the order apply writes them, so that no
    /// lookup meets an entry pointing at something absent.
    fn restore_maps(&self, applier: &mut Applier, maps: &mut Maps) -> Result<()> {
        if maps.config()? != self.config {
            maps.set_config(self.config)?;
        }
        // The Service maps: the apply's own writes taken back (they were
        // not dumped before it; see `services::apply::ServiceShadow`).
        if let Some(services) = &mut applier.services
            && let Err(e) = services.undo(maps)
        {
            // What the maps hold is not known now: read them at the next apply.
            applier.services = None;
            return Err(e);
        }
        let peers = read_peers(maps)?;
        for (&id, peer) in &self.peers {
            if peers.get(&id) != Some(peer) {
                maps.set_peer(id, *peer)?;
            }
        }
        // Groups before the routes naming them, as apply writes them.
        let mut staged = maps.group_entries()?;
        staged.extend(self.groups.iter().map(|(&id, &g)| (id, g)));
        maps.set_groups(&staged)?;
        let routes: BTreeMap<_, _> = maps.route_entries()?.into_iter().collect();
        for (&net, &entry) in &self.routes {
            if routes.get(&net) != Some(&entry) {
                maps.set_route(net, entry)?;
            }
        }
        for net in routes.keys().filter(|n| !self.routes.contains_key(n)) {
            maps.remove_route(*net)?;
        }
        maps.set_groups(&self.groups)?;
        for id in peers.keys().filter(|id| !self.peers.contains_key(id)) {
            maps.set_peer(*id, PeerEntry::default())?;
        }
        maps.sync_peer_addrs(&self.peers, &self.esp_senders)?;
        maps.set_vtep_addrs(&self.vtep_addrs)?;
        Ok(())
    }
}
