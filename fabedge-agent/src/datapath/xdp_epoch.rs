//! The epoch of the XDP verdict cache (`FE_XDP_GEN`, see the datapath's
//! `xdp_cache`): a cached verdict stands only while the epoch it was
//! computed in does. The agent writes a fresh random epoch after every
//! write to a map the verdicts read ([`crate::maps::Maps`] does it in each
//! setter) and whenever the kernel reports a change of links, addresses,
//! neighbours, routes or rules ([`watch_kernel`]): the FIB and neighbour
//! answers a masquerade was built from.
//!
//! Random, not counted: two writers (an agent and the one replacing it, or
//! the watcher thread and the run loop) can never put back an epoch that
//! stale entries carry, whatever order their writes land in.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use fabedge_common::map_names;
use log::{info, warn};

use crate::datapath::{PinLayout, open_pinned};

/// A handle on `FE_XDP_GEN`.
pub struct XdpEpoch {
    map: Array<MapData, u64>,
}

impl XdpEpoch {
    /// The pinned epoch, or `None` when the running datapath predates it
    /// (an older agent's pins: it has no cache to invalidate).
    pub fn open(layout: &PinLayout) -> Result<Option<Self>> {
        if !layout.map(map_names::XDP_GEN).exists() {
            return Ok(None);
        }
        let map = open_pinned(layout, map_names::XDP_GEN)?
            .try_into()
            .context(map_names::XDP_GEN)?;
        Ok(Some(XdpEpoch { map }))
    }

    /// The epoch now.
    pub fn current(&self) -> Result<u64> {
        self.map.get(&0, 0).context("reading FE_XDP_GEN")
    }

    /// Invalidate every cached verdict: write a fresh random epoch.
    pub fn renew(&mut self) -> Result<()> {
        let mut bytes = [0u8; 8];
        crate::esp::keys::random_bytes(&mut bytes)
            .map_err(|e| anyhow::anyhow!("drawing a new XDP cache epoch: {e}"))?;
        // Never 0: the value a fresh map holds.
        let epoch = u64::from_ne_bytes(bytes) | 1;
        self.map
            .set(0, epoch, 0)
            .context("writing FE_XDP_GEN (the XDP verdict cache's epoch)")
    }

    /// A second handle on the same map, for another thread.
    pub fn try_clone(&self) -> Result<Self> {
        let fd = aya::maps::IterableMap::<u32, u64>::map(&self.map)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the FE_XDP_GEN descriptor")?;
        let data = MapData::from_fd(fd).context(map_names::XDP_GEN)?;
        let map = aya::maps::Map::from_map_data(data)
            .context(map_names::XDP_GEN)?
            .try_into()
            .context(map_names::XDP_GEN)?;
        Ok(XdpEpoch { map })
    }
}

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;
/// Room for a burst of events (a link going down withdraws its routes and
/// neighbours at once); an overrun renews the epoch like any event.
const RECV_BUFFER: i32 = 4 << 20;

/// A netlink socket subscribed to the kernel's link, address, neighbour,
/// route and rule events.
fn subscribe() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: setsockopt with a valid int; failure only leaves the default size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&RECV_BUFFER as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        );
    }
    // SAFETY: sockaddr_nl zeroed, then family and groups set.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups =
        RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
    // SAFETY: addr is a valid sockaddr_nl for the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Renew the epoch on every change of the kernel's links, addresses,
/// neighbours, routes and rules, on a thread of its own (`fe-xdp-epoch`),
/// for as long as the process runs. Subscribed before it returns, so no
/// change after the call goes unseen; the epoch is renewed once at start.
pub fn watch_kernel(mut epoch: XdpEpoch) -> Result<JoinHandle<()>> {
    let socket = subscribe().context(
        "subscribing to the kernel's route, neighbour and link events (the XDP verdict cache \
         follows them)",
    )?;
    epoch.renew()?;
    std::thread::Builder::new()
        .name("fe-xdp-epoch".into())
        .spawn(move || watch(socket, epoch))
        .context("starting the fe-xdp-epoch thread")
}

fn watch(socket: OwnedFd, mut epoch: XdpEpoch) {
    let mut buf = vec![0u8; 64 * 1024];
    // Errors are logged when they start and when they end, not per event.
    let mut failing: Option<String> = None;
    loop {
        // Block for the first event, then drain what queued behind it:
        // one renewal per burst.
        let mut flags = 0;
        let mut events = false;
        let mut trouble = None;
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                )
            };
            if n > 0 {
                events = true;
                flags = libc::MSG_DONTWAIT;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) if flags != 0 => break,
                Some(libc::EINTR) => continue,
                // Events were lost: as good as a change.
                Some(libc::ENOBUFS) => {
                    events = true;
                    flags = libc::MSG_DONTWAIT;
                }
                // Renewed anyway, every 100 ms until reads work again.
                _ => {
                    trouble = Some(format!("reading kernel route events: {e}"));
                    events = true;
                    break;
                }
            }
        }
        if events && let Err(e) = epoch.renew() {
            trouble = Some(format!("{e:#}"));
        }
        match (&failing, trouble) {
            (None, Some(t)) => {
                warn!("{t}: the XDP verdict cache is emptied every 100 ms until this recovers");
                failing = Some(t);
            }
            (Some(_), None) if events => {
                info!("the XDP verdict cache follows kernel changes again");
                failing = None;
            }
            _ => {}
        }
        if failing.is_some() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
