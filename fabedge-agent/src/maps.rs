//! Typed access to the pinned maps: what `apply` writes and `inspect` reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context, Result};
use aya::maps::{Array, DevMapHash, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use fabedge_common::services::{
    AffinityEntry, AffinityKey, Backend, BackendKey, CtEntry, CtKey, ServiceEntry, ServiceKey,
};
use fabedge_common::{
    Counter, DatapathConfig, GroupEntry, LocalPodEntry, MAX_GROUPS, MAX_VTEP_ADDRS, PeerAddrEntry,
    PeerEntry, PeerStats, PodPortEntry, RouteAddr, RouteEntry, map_names, peer_kind,
};
use ipnet::Ipv4Net;

use crate::datapath::{PinLayout, open_pinned, xdp_epoch::XdpEpoch};

/// How many entries the sized maps hold: the agent's `--max-routes`,
/// `--max-services`, `--max-backends` and `--ct-entries`. Applied when the
/// object loads (a pinned map of another size is refused: see
/// `datapath::check_pinned_shape`), and what apply checks a plan against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    /// `FE_ROUTES` (`--max-routes`).
    pub routes: u32,
    /// `FE_SERVICES`, frontends (`--max-services`).
    pub services: u32,
    /// `FE_BACKENDS`, backend slots over all Services (`--max-backends`).
    pub backends: u32,
    /// `FE_CT`, two entries per flow (`--ct-entries`).
    pub ct_entries: u32,
}

/// The map size flags as given (`None`: not given).
#[derive(Debug, Clone, Copy, Default)]
pub struct CapacityFlags {
    pub routes: Option<u32>,
    pub services: Option<u32>,
    pub backends: Option<u32>,
    pub ct_entries: Option<u32>,
}

impl Capacity {
    /// The sizes the flags ask for; a flag not given keeps the size of the
    /// map pinned under `layout` (logged when that is not the default), and
    /// takes the default on a node without one. So an upgrade whose
    /// defaults grew adopts the running node's maps instead of refusing to
    /// start; larger maps on such a node are a choice (`uninstall`, then
    /// the flag or the new default).
    pub fn from_flags(layout: &PinLayout, flags: CapacityFlags) -> Capacity {
        let defaults = Capacity::default();
        let size = |map: &str, flag: &str, given: Option<u32>, default: u32| {
            if let Some(entries) = given {
                return entries;
            }
            match pinned_max_entries(layout, map) {
                Some(pinned) if pinned != default => {
                    log::info!(
                        "{map} is pinned with {pinned} entries: kept ({flag} not given; the \
                         default for a node without pinned maps is {default})"
                    );
                    pinned
                }
                _ => default,
            }
        };
        Capacity {
            routes: size(
                map_names::ROUTES,
                "--max-routes",
                flags.routes,
                defaults.routes,
            ),
            services: size(
                map_names::SERVICES,
                "--max-services",
                flags.services,
                defaults.services,
            ),
            backends: size(
                map_names::BACKENDS,
                "--max-backends",
                flags.backends,
                defaults.backends,
            ),
            ct_entries: size(
                map_names::CT,
                "--ct-entries",
                flags.ct_entries,
                defaults.ct_entries,
            ),
        }
    }
}

/// `max_entries` of the map `name` pinned under `layout`, if there is one.
fn pinned_max_entries(layout: &PinLayout, name: &str) -> Option<u32> {
    let path = layout.map(name);
    path.exists()
        .then(|| aya::maps::MapInfo::from_pin(&path).ok())
        .flatten()
        .map(|info| info.max_entries())
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            routes: fabedge_common::MAX_ROUTES,
            services: fabedge_common::services::MAX_SERVICES,
            backends: fabedge_common::services::MAX_BACKENDS,
            ct_entries: fabedge_common::services::DEFAULT_CT_ENTRIES,
        }
    }
}

/// What the kernel spends per entry beyond key and value (hash and trie
/// element headers, rounded up: an estimate that errs on the large side).
const ENTRY_OVERHEAD: u64 = 64;

impl Capacity {
    /// Each sized map: its name, the flag that sizes it, its entries and
    /// the bytes of one key plus value.
    pub fn maps(&self) -> [(&'static str, &'static str, u32, u64); 4] {
        use fabedge_common::services::{Backend, BackendKey, CtEntry, CtKey};
        let pair = |k: usize, v: usize| (k.next_multiple_of(8) + v.next_multiple_of(8)) as u64;
        [
            (
                map_names::ROUTES,
                "--max-routes",
                self.routes,
                pair(size_of::<RouteAddr>() + 4, size_of::<RouteEntry>()),
            ),
            (
                map_names::SERVICES,
                "--max-services",
                self.services,
                pair(size_of::<ServiceKey>(), size_of::<ServiceEntry>()),
            ),
            (
                map_names::BACKENDS,
                "--max-backends",
                self.backends,
                pair(size_of::<BackendKey>(), size_of::<Backend>()),
            ),
            (
                map_names::CT,
                "--ct-entries",
                self.ct_entries,
                pair(size_of::<CtKey>(), size_of::<CtEntry>()),
            ),
        ]
    }

    /// Refuse sizes the host cannot hold: zero, or one map alone wanting
    /// more than a quarter of `memory_bytes` (the host's RAM; maps are
    /// kernel memory that is never swapped). The error names the flag, the
    /// memory it would take and the largest size that fits.
    pub fn check(&self, memory_bytes: u64) -> Result<()> {
        for (map, flag, entries, pair) in self.maps() {
            if entries == 0 {
                anyhow::bail!("{flag} must be at least 1 (it sizes {map})");
            }
            let wanted = u64::from(entries) * (pair + ENTRY_OVERHEAD);
            let budget = memory_bytes / 4;
            if wanted > budget {
                anyhow::bail!(
                    "{flag} {entries} would take about {} of kernel memory for {map}, more than a \
                     quarter of this host's {}: choose at most {}",
                    human_bytes(wanted),
                    human_bytes(memory_bytes),
                    budget / (pair + ENTRY_OVERHEAD)
                );
            }
        }
        Ok(())
    }

    /// [`Capacity::check`] against this host's RAM (`MemTotal`).
    pub fn check_host(&self) -> Result<()> {
        self.check(host_memory_bytes()?)
    }
}

/// `MemTotal` of /proc/meminfo, in bytes.
pub fn host_memory_bytes() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .context("/proc/meminfo has no MemTotal line")
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub struct Maps {
    pub routes: LpmTrie<MapData, RouteAddr, RouteEntry>,
    pub peers: Array<MapData, PeerEntry>,
    pub config: Array<MapData, DatapathConfig>,
    pub counters: PerCpuArray<MapData, u64>,
    pub peer_stats: PerCpuArray<MapData, PeerStats>,
    pub services: HashMap<MapData, ServiceKey, ServiceEntry>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    pub ct: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub peer_addrs: HashMap<MapData, RouteAddr, PeerAddrEntry>,
    /// A pod's host-side veth (ifindex) → the address it may send from.
    pub pod_ports: HashMap<MapData, u32, PodPortEntry>,
    /// Connector groups by id (`GroupEntry::active` is the failover switch).
    pub groups: Array<MapData, GroupEntry>,
    /// The connector group's shared VTEP addresses (value unused).
    pub vtep_addrs: HashMap<MapData, RouteAddr, u8>,
    /// A pod's address → its veth and MACs (`--xdp-pod-rx`).
    pub local_pods: HashMap<MapData, RouteAddr, LocalPodEntry>,
    /// The pods' host-side veths XDP may redirect into, by ifindex.
    pub pod_devs: DevMapHash<MapData>,
    /// The XDP verdict cache's epoch, renewed by every setter here that
    /// writes a map the cached verdicts read (`None`: a datapath older
    /// than the cache).
    pub xdp_epoch: Option<XdpEpoch>,
}

impl Maps {
    /// Open the pinned maps (agent running or not).
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let typed = |name: &str| -> Result<aya::maps::Map> { open_pinned(layout, name) };
        Ok(Maps {
            routes: typed(map_names::ROUTES)?
                .try_into()
                .context(map_names::ROUTES)?,
            peers: typed(map_names::PEERS)?
                .try_into()
                .context(map_names::PEERS)?,
            config: typed(map_names::CONFIG)?
                .try_into()
                .context(map_names::CONFIG)?,
            counters: typed(map_names::COUNTERS)?
                .try_into()
                .context(map_names::COUNTERS)?,
            peer_stats: typed(map_names::PEER_STATS)?
                .try_into()
                .context(map_names::PEER_STATS)?,
            services: typed(map_names::SERVICES)?
                .try_into()
                .context(map_names::SERVICES)?,
            backends: typed(map_names::BACKENDS)?
                .try_into()
                .context(map_names::BACKENDS)?,
            ct: typed(map_names::CT)?.try_into().context(map_names::CT)?,
            affinity: typed(map_names::AFFINITY)?
                .try_into()
                .context(map_names::AFFINITY)?,
            peer_addrs: typed(map_names::PEER_ADDRS)?
                .try_into()
                .context(map_names::PEER_ADDRS)?,
            pod_ports: typed(map_names::POD_PORTS)?
                .try_into()
                .context(map_names::POD_PORTS)?,
            groups: typed(map_names::GROUPS)?
                .try_into()
                .context(map_names::GROUPS)?,
            vtep_addrs: typed(map_names::VTEP_ADDRS)?
                .try_into()
                .context(map_names::VTEP_ADDRS)?,
            local_pods: typed(map_names::LOCAL_PODS)?
                .try_into()
                .context(map_names::LOCAL_PODS)?,
            pod_devs: typed(map_names::POD_DEVS)?
                .try_into()
                .context(map_names::POD_DEVS)?,
            xdp_epoch: XdpEpoch::open(layout)?,
        })
    }

    /// After a write to a map cached XDP verdicts depend on (whether it
    /// worked or not): those verdicts are void.
    fn invalidate_xdp<T>(&mut self, written: Result<T>) -> Result<T> {
        if let Some(epoch) = &mut self.xdp_epoch {
            epoch.renew()?;
        }
        written
    }

    /// [`Maps::invalidate_xdp`] for a sync that reports how many entries
    /// it changed: nothing to void when it changed none.
    fn invalidate_xdp_if_changed(&mut self, written: Result<usize>) -> Result<usize> {
        match written {
            Ok(0) => Ok(0),
            other => self.invalidate_xdp(other),
        }
    }

    pub fn route_entries(&self) -> Result<Vec<(Ipv4Net, RouteEntry)>> {
        let mut out = Vec::new();
        for item in self.routes.iter() {
            let (key, value) = item.context("reading FE_ROUTES")?;
            out.push((key_to_net(&key), value));
        }
        out.sort_by_key(|(net, _)| (*net, 0));
        Ok(out)
    }

    pub fn set_route(&mut self, net: Ipv4Net, entry: RouteEntry) -> Result<()> {
        let written = self
            .routes
            .insert(&net_to_key(net), entry, 0)
            .with_context(|| format!("writing route {net} to FE_ROUTES (is the map full?)"));
        self.invalidate_xdp(written)
    }

    pub fn remove_route(&mut self, net: Ipv4Net) -> Result<()> {
        let written = self
            .routes
            .remove(&net_to_key(net))
            .with_context(|| format!("removing route {net} from FE_ROUTES"));
        self.invalidate_xdp(written)
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).context("reading FE_CONFIG")
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        let written = self.config.set(0, config, 0).context("writing FE_CONFIG");
        self.invalidate_xdp(written)
    }

    pub fn peer(&self, id: u16) -> Result<PeerEntry> {
        self.peers
            .get(&(id as u32), 0)
            .with_context(|| format!("reading FE_PEERS[{id}]"))
    }

    pub fn set_peer(&mut self, id: u16, peer: PeerEntry) -> Result<()> {
        let written = self
            .peers
            .set(id as u32, peer, 0)
            .with_context(|| format!("writing FE_PEERS[{id}]"));
        self.invalidate_xdp(written)
    }

    /// Make `FE_PEER_ADDRS` the address index of `peers` (what `FE_PEERS`
    /// holds) and of `esp_senders` (see [`peer_addrs`]): entries added or
    /// changed first, stale ones removed after.
    pub fn sync_peer_addrs<'a>(
        &mut self,
        peers: impl IntoIterator<Item = (&'a u16, &'a PeerEntry)>,
        esp_senders: &BTreeMap<Ipv4Addr, u16>,
    ) -> Result<usize> {
        let written = self.write_peer_addrs(peers, esp_senders);
        self.invalidate_xdp_if_changed(written)
    }

    fn write_peer_addrs<'a>(
        &mut self,
        peers: impl IntoIterator<Item = (&'a u16, &'a PeerEntry)>,
        esp_senders: &BTreeMap<Ipv4Addr, u16>,
    ) -> Result<usize> {
        let wanted = peer_addrs(peers, esp_senders);
        let mut current = std::collections::BTreeMap::new();
        for item in self.peer_addrs.iter() {
            let (key, value) = item.context("reading FE_PEER_ADDRS")?;
            current.insert(key.addr, value);
        }
        let mut changes = 0;
        for (addr, entry) in &wanted {
            if current.get(addr) != Some(entry) {
                self.peer_addrs
                    .insert(RouteAddr { addr: *addr }, *entry, 0)
                    .with_context(|| {
                        format!("writing {} to FE_PEER_ADDRS", Ipv4Addr::from(*addr))
                    })?;
                changes += 1;
            }
        }
        for addr in current.keys().filter(|a| !wanted.contains_key(*a)) {
            self.peer_addrs
                .remove(&RouteAddr { addr: *addr })
                .with_context(|| {
                    format!("removing {} from FE_PEER_ADDRS", Ipv4Addr::from(*addr))
                })?;
            changes += 1;
        }
        Ok(changes)
    }

    /// The addresses `FE_PEER_ADDRS` lets ESP in UDP in from as
    /// [`peer_kind::ESP_SENDER`], with the id it holds.
    pub fn esp_senders(&self) -> Result<BTreeMap<Ipv4Addr, u16>> {
        let mut out = BTreeMap::new();
        for item in self.peer_addrs.iter() {
            let (key, value) = item.context("reading FE_PEER_ADDRS")?;
            if value.kinds & (1 << peer_kind::ESP_SENDER) != 0 {
                out.insert(Ipv4Addr::from(key.addr), value.peer_id);
            }
        }
        Ok(out)
    }

    /// The groups in use (an entry with members or an active one), by id.
    pub fn group_entries(&self) -> Result<BTreeMap<u16, GroupEntry>> {
        let mut out = BTreeMap::new();
        for id in 1..MAX_GROUPS as u16 {
            let entry = self.group(id)?;
            if entry != GroupEntry::default() {
                out.insert(id, entry);
            }
        }
        Ok(out)
    }

    pub fn group(&self, id: u16) -> Result<GroupEntry> {
        self.groups
            .get(&u32::from(id), 0)
            .with_context(|| format!("reading FE_GROUPS[{id}]"))
    }

    /// Make `FE_GROUPS` hold `groups`: each given id written if it differs,
    /// every other id cleared (its routes then drop as `drop_group_down`).
    /// Returns the entries changed.
    pub fn set_groups(&mut self, groups: &BTreeMap<u16, GroupEntry>) -> Result<usize> {
        let written = self.write_groups(groups);
        self.invalidate_xdp_if_changed(written)
    }

    fn write_groups(&mut self, groups: &BTreeMap<u16, GroupEntry>) -> Result<usize> {
        if let Some(id) = groups
            .keys()
            .find(|&&id| id == 0 || u32::from(id) >= MAX_GROUPS)
        {
            anyhow::bail!("group id {id} is outside FE_GROUPS (1..{MAX_GROUPS})");
        }
        let mut changes = 0;
        for id in 1..MAX_GROUPS as u16 {
            let wanted = groups.get(&id).copied().unwrap_or_default();
            if self.group(id)? != wanted {
                self.groups
                    .set(u32::from(id), wanted, 0)
                    .with_context(|| format!("writing FE_GROUPS[{id}]"))?;
                changes += 1;
            }
        }
        Ok(changes)
    }

    /// Failover: point `group` at member `active` (0: none alive, the
    /// group's routes drop). One read and one write of a 16-byte entry,
    /// which the datapath sees whole on the next packet. Refuses a peer
    /// that is not a member, so a stale decision cannot send the group's
    /// traffic to a stranger.
    pub fn set_group_active(&mut self, group: u16, active: u16) -> Result<()> {
        if group == 0 || u32::from(group) >= MAX_GROUPS {
            anyhow::bail!("group id {group} is outside FE_GROUPS (1..{MAX_GROUPS})");
        }
        let mut entry = self.group(group)?;
        if active != 0 && !entry.has_member(active) {
            anyhow::bail!(
                "peer {active} is not a member of group {group} (members {:?}): FE_GROUPS \
                 unchanged; apply a plan that lists it first",
                entry
                    .members
                    .iter()
                    .take_while(|&&m| m != 0)
                    .collect::<Vec<_>>()
            );
        }
        if entry.active == active {
            return Ok(());
        }
        entry.active = active;
        let written = self
            .groups
            .set(u32::from(group), entry, 0)
            .with_context(|| format!("writing FE_GROUPS[{group}]"));
        self.invalidate_xdp(written)
    }

    /// A second handle on `FE_GROUPS` (the same kernel map), for the
    /// prober thread to switch a group without waiting for the run loop.
    pub fn groups_handle(&self) -> Result<Array<MapData, GroupEntry>> {
        use std::os::fd::AsFd;
        let fd = aya::maps::IterableMap::<u32, GroupEntry>::map(&self.groups)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the FE_GROUPS descriptor")?;
        let data = MapData::from_fd(fd).context("FE_GROUPS")?;
        aya::maps::Map::from_map_data(data)
            .context("FE_GROUPS")?
            .try_into()
            .context("FE_GROUPS")
    }

    /// The shared VTEP addresses in `FE_VTEP_ADDRS`.
    pub fn vtep_addr_entries(&self) -> Result<BTreeSet<Ipv4Addr>> {
        let mut out = BTreeSet::new();
        for key in self.vtep_addrs.keys() {
            let key = key.context("reading FE_VTEP_ADDRS")?;
            out.insert(Ipv4Addr::from(key.addr));
        }
        Ok(out)
    }

    /// Make `FE_VTEP_ADDRS` hold exactly `addrs`: new ones first, stale
    /// ones removed after. Returns the entries changed.
    pub fn set_vtep_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<usize> {
        let written = self.write_vtep_addrs(addrs);
        self.invalidate_xdp_if_changed(written)
    }

    fn write_vtep_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<usize> {
        if addrs.len() > MAX_VTEP_ADDRS as usize {
            anyhow::bail!(
                "{} shared VTEP addresses but FE_VTEP_ADDRS holds {MAX_VTEP_ADDRS}",
                addrs.len()
            );
        }
        let current = self.vtep_addr_entries()?;
        let mut changes = 0;
        for addr in addrs.difference(&current) {
            self.vtep_addrs
                .insert(
                    RouteAddr {
                        addr: addr.octets(),
                    },
                    1,
                    0,
                )
                .with_context(|| format!("writing {addr} to FE_VTEP_ADDRS"))?;
            changes += 1;
        }
        for addr in current.difference(addrs) {
            self.vtep_addrs
                .remove(&RouteAddr {
                    addr: addr.octets(),
                })
                .with_context(|| format!("removing {addr} from FE_VTEP_ADDRS"))?;
            changes += 1;
        }
        Ok(changes)
    }

    /// Summed over CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        let values = self
            .counters
            .get(&(counter as u32), 0)
            .with_context(|| format!("reading counter {}", counter.name()))?;
        Ok(values.iter().sum())
    }

    /// Summed over CPUs.
    pub fn peer_stats(&self, id: u16) -> Result<PeerStats> {
        let values = self
            .peer_stats
            .get(&(id as u32), 0)
            .with_context(|| format!("reading FE_PEER_STATS[{id}]"))?;
        Ok(values
            .iter()
            .fold(PeerStats::default(), |acc, s| PeerStats {
                tx_packets: acc.tx_packets + s.tx_packets,
                tx_bytes: acc.tx_bytes + s.tx_bytes,
                rx_packets: acc.rx_packets + s.rx_packets,
                rx_bytes: acc.rx_bytes + s.rx_bytes,
            }))
    }
}

/// The underlay addresses of `peers` (in-use slots with an address), each
/// with the lowest peer id there and every kind sending from it; and the
/// other addresses ESP in UDP of a peer comes from (`esp_senders`: address
/// → peer id), marked [`peer_kind::ESP_SENDER`]. A sender address that is
/// also a peer's underlay address only adds its bit: the id stays the
/// underlay peer's, whatever an edge publishes as its endpoint (the
/// datapath tells a Flannel VTEP, and another connector, by that id).
pub fn peer_addrs<'a>(
    peers: impl IntoIterator<Item = (&'a u16, &'a PeerEntry)>,
    esp_senders: &BTreeMap<Ipv4Addr, u16>,
) -> BTreeMap<[u8; 4], PeerAddrEntry> {
    let mut out = BTreeMap::<[u8; 4], PeerAddrEntry>::new();
    let underlays = peers
        .into_iter()
        .filter(|(_, peer)| peer.kind != 0 && peer.kind < 8 && peer.underlay_ip != [0; 4]);
    for (&id, peer) in underlays {
        let entry = out.entry(peer.underlay_ip).or_insert(PeerAddrEntry {
            peer_id: id,
            ..PeerAddrEntry::default()
        });
        entry.peer_id = entry.peer_id.min(id);
        entry.kinds |= 1 << peer.kind;
    }
    let sender_bit = 1 << peer_kind::ESP_SENDER;
    for (addr, &id) in esp_senders.iter().filter(|(a, _)| !a.is_unspecified()) {
        let entry = out.entry(addr.octets()).or_insert(PeerAddrEntry {
            peer_id: id,
            ..PeerAddrEntry::default()
        });
        if entry.kinds & !sender_bit == 0 {
            entry.peer_id = entry.peer_id.min(id);
        }
        entry.kinds |= sender_bit;
    }
    out
}

pub fn net_to_key(net: Ipv4Net) -> Key<RouteAddr> {
    Key::new(
        net.prefix_len() as u32,
        RouteAddr {
            addr: net.network().octets(),
        },
    )
}

pub fn key_to_net(key: &Key<RouteAddr>) -> Ipv4Net {
    let prefix = key.prefix_len().min(32) as u8;
    Ipv4Net::new(Ipv4Addr::from(key.data().addr), prefix)
        .expect("prefix clamped to 32")
        .trunc()
}

/// Service translation maps.
impl Maps {
    pub fn service_entries(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .context("reading FE_SERVICES")?;
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    pub fn backend_entries(&self) -> Result<Vec<(BackendKey, Backend)>> {
        let mut out: Vec<_> = self
            .backends
            .iter()
            .collect::<Result<_, _>>()
            .context("reading FE_BACKENDS")?;
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Entries may come and go (LRU) while we read; a vanished one is skipped.
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let mut out = Vec::new();
        for key in self.ct.keys() {
            let key = key.context("reading FE_CT")?;
            if let Ok(entry) = self.ct.get(&key, 0) {
                out.push((key, entry));
            }
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityEntry)>> {
        let mut out = Vec::new();
        for key in self.affinity.keys() {
            let key = key.context("reading FE_AFFINITY")?;
            if let Ok(entry) = self.affinity.get(&key, 0) {
                out.push((key, entry));
            }
        }
        Ok(out)
    }

    /// Set a counter the agent owns (a gauge): the value on CPU 0, zero elsewhere.
    pub fn set_gauge(&mut self, counter: Counter, value: u64) -> Result<()> {
        if self.counter(counter)? == value {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        let mut values = vec![0u64; cpus];
        values[0] = value;
        let values = aya::maps::PerCpuValues::try_from(values).context("per-CPU values")?;
        self.counters
            .set(counter as u32, values, 0)
            .with_context(|| format!("writing counter {}", counter.name()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::Capacity;

    #[test]
    fn absurd_map_sizes_are_refused_naming_the_flag_and_the_memory() {
        let gib = 1 << 30;
        Capacity::default()
            .check(2 * gib)
            .expect("the defaults fit a 2 GiB node");
        let err = Capacity {
            backends: 4_000_000_000,
            ..Capacity::default()
        }
        .check(2 * gib)
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "--max-backends 4000000000 would take about 298.0 GiB of kernel memory for \
             FE_BACKENDS, more than a quarter of this host's 2.0 GiB: choose at most 6710886"
        );
        let err = Capacity {
            routes: 0,
            ..Capacity::default()
        }
        .check(2 * gib)
        .unwrap_err()
        .to_string();
        assert_eq!(err, "--max-routes must be at least 1 (it sizes FE_ROUTES)");
    }

    use fabedge_common::{PeerAddrEntry, PeerEntry, peer_kind};

    use super::peer_addrs;

    fn peer(kind: u8, ip: [u8; 4]) -> PeerEntry {
        PeerEntry {
            kind,
            underlay_ip: ip,
            ..PeerEntry::default()
        }
    }

    #[test]
    fn peer_addresses_index_every_peer_by_underlay_ip() {
        let peers = BTreeMap::from([
            (3, peer(peer_kind::TUNNEL, [198, 18, 0, 250])),
            // Behind the same NAT: one address, the lowest id.
            (2, peer(peer_kind::TUNNEL, [198, 18, 0, 250])),
            // A cloud node's Flannel VTEP.
            (5, peer(peer_kind::FLANNEL_VTEP, [10, 1, 0, 2])),
            // ESP peers before their first hello have no address: not indexed.
            (7, peer(peer_kind::TUNNEL, [0; 4])),
            // Unused slot.
            (9, PeerEntry::default()),
        ]);
        assert_eq!(
            peer_addrs(&peers, &BTreeMap::new()),
            BTreeMap::from([
                (
                    [10, 1, 0, 2],
                    PeerAddrEntry {
                        peer_id: 5,
                        kinds: 1 << peer_kind::FLANNEL_VTEP,
                        _pad: 0
                    }
                ),
                (
                    [198, 18, 0, 250],
                    PeerAddrEntry {
                        peer_id: 2,
                        kinds: 1 << peer_kind::TUNNEL,
                        _pad: 0
                    }
                ),
            ])
        );
    }

    #[test]
    fn esp_senders_are_indexed_for_esp_only_beside_underlay_addresses() {
        // Both edges behind one NAT; an edge that publishes a Flannel VTEP's
        // address as its endpoint adds its bit there, not its id.
        let peers = BTreeMap::from([
            (2, peer(peer_kind::TUNNEL, [192, 168, 18, 11])),
            (3, peer(peer_kind::TUNNEL, [192, 168, 18, 12])),
            (5, peer(peer_kind::FLANNEL_VTEP, [10, 1, 0, 2])),
        ]);
        let senders = BTreeMap::from([
            (std::net::Ipv4Addr::new(198, 18, 0, 250), 3),
            (std::net::Ipv4Addr::new(10, 1, 0, 2), 2),
            (std::net::Ipv4Addr::UNSPECIFIED, 2),
        ]);
        let index = peer_addrs(&peers, &senders);
        assert_eq!(index.len(), 4, "{index:?}");
        assert_eq!(
            index[&[10, 1, 0, 2]],
            PeerAddrEntry {
                peer_id: 5,
                kinds: (1 << peer_kind::FLANNEL_VTEP) | (1 << peer_kind::ESP_SENDER),
                _pad: 0
            }
        );
        assert_eq!(
            index[&[198, 18, 0, 250]],
            PeerAddrEntry {
                peer_id: 3,
                kinds: 1 << peer_kind::ESP_SENDER,
                _pad: 0
            }
        );
        assert_eq!(index[&[192, 168, 18, 12]].kinds, 1 << peer_kind::TUNNEL);
        assert_eq!(index[&[192, 168, 18, 11]].kinds, 1 << peer_kind::TUNNEL);
    }
}
