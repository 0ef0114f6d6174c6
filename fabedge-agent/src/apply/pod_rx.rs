//! XDP delivery to pods on edges (`--xdp-pod-rx`): `fe_xdp_uplink` hands our
//! tunnel's frames for a pod of `FE_LOCAL_PODS` straight to its host-side
//! veth through `FE_POD_DEVS`. Like `pod_ports`, it follows pods, not the plan.
//!
//! A veth takes frames from XDP (`ndo_xdp_xmit`) only while its peer — the
//! pod's interface — runs NAPI, which it does with an XDP program of its
//! own or with GRO on. Otherwise the kernel drops every redirected frame,
//! silently. So a pod is offered to XDP only once GRO is on for its
//! interface (set here, inside the pod's namespace): GRO also merges the
//! redirected TCP segments for the pod's stack, as the slow path's skbs
//! arrive merged. A pod whose namespace we cannot enter or whose GRO stays
//! off is left out, its frames counted `xdp_pass_to_pod` and delivered by
//! the kernel as without XDP. (An XDP program on the pod's side would
//! disable GSO toward the pod for the kernel's path: GRO costs nothing there.)
//!
//! Order: the veth enters `FE_POD_DEVS` before the pod enters
//! `FE_LOCAL_PODS`, and leaves after it, so the program never picks a
//! target that is not there (and passes the frame if it ever does).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use anyhow::{Context, Result, anyhow, bail};
use fabedge_common::{LocalPodEntry, RouteAddr, config_flags};
use log::info;

use super::rtnl::{LinkInfo, Rtnl};
use crate::maps::Maps;

/// Make `FE_LOCAL_PODS` and `FE_POD_DEVS` hold exactly the `pods` (address
/// → the port's link) when the datapath's configuration asks for XDP
/// delivery, and nothing otherwise. Returns the pods newly offered and the
/// problems of those that could not be (by port ifindex).
pub fn sync(
    nl: &mut Rtnl,
    maps: &mut Maps,
    bridge_mac: Option<[u8; 6]>,
    pods: &BTreeMap<[u8; 4], &LinkInfo>,
) -> Result<(Vec<String>, BTreeMap<u32, String>)> {
    let enabled = maps
        .config()
        .is_ok_and(|c| c.ready != 0 && c.flags & config_flags::XDP_POD_RX != 0);
    let wanted: BTreeMap<[u8; 4], u32> = match (enabled, bridge_mac) {
        (true, Some(_)) => pods.iter().map(|(addr, l)| (*addr, l.index)).collect(),
        _ => BTreeMap::new(),
    };

    let current: Vec<(RouteAddr, LocalPodEntry)> = maps
        .local_pods
        .iter()
        .collect::<Result<_, _>>()
        .context("reading FE_LOCAL_PODS")?;
    let mut kept = BTreeSet::new();
    for (key, entry) in &current {
        if wanted.get(&key.addr) == Some(&entry.ifindex) {
            kept.insert(key.addr);
        } else {
            maps.local_pods
                .remove(key)
                .context("removing a pod from FE_LOCAL_PODS")?;
        }
    }
    let devs: Vec<u32> = maps
        .pod_devs
        .keys()
        .collect::<Result<_, _>>()
        .context("reading FE_POD_DEVS")?;
    let wanted_devs: BTreeSet<u32> = wanted.values().copied().collect();
    for index in devs.iter().filter(|i| !wanted_devs.contains(i)) {
        maps.pod_devs
            .remove(*index)
            .with_context(|| format!("removing veth {index} from FE_POD_DEVS"))?;
    }

    let mut offered = Vec::new();
    let mut problems = BTreeMap::new();
    let Some(bridge_mac) = bridge_mac else {
        return Ok((offered, problems));
    };
    for (addr, port) in pods {
        if !wanted.contains_key(addr) || kept.contains(addr) {
            continue;
        }
        match offer(nl, maps, bridge_mac, *addr, port) {
            Ok(()) => offered.push(port.name.clone()),
            Err(e) => {
                problems.insert(port.index, format!("{e:#}"));
            }
        }
    }
    for iface in &offered {
        info!("pod port {iface}: XDP delivers tunnel traffic straight to the pod");
    }
    Ok((offered, problems))
}

/// Turn GRO on for the pod's interface and enter the pod in both maps.
fn offer(
    nl: &mut Rtnl,
    maps: &mut Maps,
    bridge_mac: [u8; 6],
    addr: [u8; 4],
    port: &LinkInfo,
) -> Result<()> {
    let (Some(peer), Some(netnsid)) = (port.link, port.link_netnsid) else {
        bail!("not a veth with its peer in a pod's namespace");
    };
    let pod_link = nl
        .link_in(netnsid, peer)?
        .ok_or_else(|| anyhow!("the pod's interface is gone"))?;
    let pod_mac = pod_link
        .mac
        .ok_or_else(|| anyhow!("the pod's interface {} has no MAC", pod_link.name))?;
    let netns = find_netns(nl, netnsid)?.ok_or_else(|| {
        anyhow!(
            "no process or /run/netns file holds the pod's network namespace (id {netnsid}), so \
             GRO cannot be turned on for its {}: XDP leaves the pod to the kernel",
            pod_link.name
        )
    })?;
    if !enable_gro(netns, &pod_link.name)? {
        bail!(
            "GRO stays off on the pod's {} (the veth would drop frames from XDP): XDP leaves the \
             pod to the kernel",
            pod_link.name
        );
    }
    maps.pod_devs
        .insert(port.index, port.index, None, 0)
        .with_context(|| format!("writing {} to FE_POD_DEVS", port.name))?;
    let entry = LocalPodEntry {
        ifindex: port.index,
        pod_mac,
        bridge_mac,
        mtu: u16::try_from(pod_link.mtu).unwrap_or(u16::MAX),
        _pad: [0; 2],
    };
    maps.local_pods
        .insert(RouteAddr { addr }, entry, 0)
        .with_context(|| format!("writing {} to FE_LOCAL_PODS", port.name))?;
    Ok(())
}

/// The network namespace our namespace calls `netnsid`: held open by a
/// file under /run/netns or by some process. `None` when none is found.
fn find_netns(nl: &mut Rtnl, netnsid: i32) -> Result<Option<File>> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = fs::read_dir("/run/netns") {
        candidates.extend(dir.flatten().map(|e| e.path()));
    }
    let procs = fs::read_dir("/proc").context("listing /proc")?;
    candidates.extend(
        procs
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .map(|e| e.path().join("ns/net")),
    );
    let mut seen = BTreeSet::new();
    for path in candidates {
        // Processes and files come and go meanwhile: skip what vanished.
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if nl.nsid_of(file.as_raw_fd()).ok().flatten() == Some(netnsid) {
            return Ok(Some(file));
        }
    }
    Ok(None)
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with `ifr_data`.
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _rest: [u8; 16],
}

/// Turn GRO on for `iface` inside `netns`; whether it is on afterwards.
/// On a thread of its own: `setns` moves only the calling thread.
fn enable_gro(netns: File, iface: &str) -> Result<bool> {
    let iface = iface.to_owned();
    std::thread::spawn(move || -> Result<bool> {
        // SAFETY: setns(2) on this thread with a namespace fd we own.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("entering the pod's network namespace");
        }
        // SAFETY: plain socket(2); closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(std::io::Error::last_os_error()).context("a socket in the pod's namespace");
        }
        let result = (|| {
            ethtool(sock, &iface, ETHTOOL_SGRO, 1)?;
            ethtool(sock, &iface, ETHTOOL_GGRO, 0).map(|on| on != 0)
        })();
        // SAFETY: the socket opened above.
        unsafe { libc::close(sock) };
        result
    })
    .join()
    .map_err(|_| anyhow!("the thread entering the pod's namespace panicked"))?
}

fn ethtool(sock: i32, iface: &str, cmd: u32, data: u32) -> Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _rest: [0; 16],
    };
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface} is too long");
    }
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: SIOCETHTOOL with an ifreq whose ifr_data points at a live ethtool_value.
    if unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ethtool command {cmd:#x} on the pod's {iface}"));
    }
    Ok(value.data)
}
