//! Shared VTEP addresses: how the cloud side fails over without Flannel
//! noticing.
//!
//! Each connector has a VTEP address of its own, which Flannel's
//! annotations on its edges name as `public-ip`. While the connector is
//! alive it holds the address (a /32 on its cloud-facing NIC, like a
//! keepalived VIP); when it dies its first live successor
//! ([`successor_order`]) adds the address to its own NIC and announces it
//! with gratuitous ARP, so cloud nodes send the dead connector's VXLAN
//! traffic to the successor at once: Flannel's view never changes, and a
//! Flannel restart finds the same annotations. The successor is the one
//! the dead connector's edges fail over to, so both directions meet there.
//!
//! The address carries label `<iface>:fe` when that fits IFNAMSIZ, and
//! address protocol `RTPROT_FABEDGE` (kernel 6.1+), which is how [`held`]
//! tells ours from the operator's.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

use super::order::successor_order;
use crate::apply::{
    net::RTPROT_FABEDGE,
    rtnl::{AddrDetail, LinkInfo, Rtnl},
};

/// Suffix of the label of the addresses we add (`eth0:fe`).
pub const LABEL_SUFFIX: &str = ":fe";
/// Gratuitous ARP frames sent per claim: one may be lost on a busy link.
pub const GARP_COUNT: usize = 3;
/// Longest interface name or label (IFNAMSIZ 16 with the NUL).
const IFNAME_MAX: usize = 15;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPOP_REQUEST: u16 = 1;
/// How often [`HolderCheck`] asks again while nobody else answers.
pub const ASK_EVERY: Duration = Duration::from_millis(200);
/// Minimum Ethernet frame without FCS: shorter frames are padded.
const ETH_MIN_FRAME: usize = 60;

/// The label our addresses on `iface` carry, if it fits.
pub fn label_for(iface: &str) -> Option<String> {
    (iface.len() + LABEL_SUFFIX.len() <= IFNAME_MAX).then(|| format!("{iface}{LABEL_SUFFIX}"))
}

/// The VTEP addresses connector `me` must hold: its own (always: from its
/// own point of view it is alive), and each dead connector's whose first
/// live successor it is. `connectors` lists every connector with its VTEP
/// address (if it has one); `alive`, the connectors our probes see up.
pub fn holders(
    connectors: &[(&str, Option<Ipv4Addr>)],
    alive: &BTreeSet<String>,
    me: &str,
) -> BTreeSet<Ipv4Addr> {
    let names: Vec<&str> = connectors.iter().map(|(name, _)| *name).collect();
    let is_alive = |name: &str| name == me || alive.contains(name);
    let mut held = BTreeSet::new();
    for (name, vtep) in connectors {
        let Some(vtep) = vtep else { continue };
        if *name == me {
            held.insert(*vtep);
        } else if !is_alive(name) {
            let heir = successor_order(name, &names)
                .into_iter()
                .find(|other| is_alive(other));
            if heir.as_deref() == Some(me) {
                held.insert(*vtep);
            }
        }
    }
    held
}

fn require_link(nl: &mut Rtnl, iface: &str, addr: Ipv4Addr) -> Result<LinkInfo> {
    nl.link(iface)?.with_context(|| {
        format!(
            "VTEP address {addr}: interface {iface} does not exist; name the connector's \
             cloud-facing NIC"
        )
    })
}

fn host_net(addr: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(addr, 32).expect("/32 is a valid prefix")
}

/// Take over `addr`: add it as a /32 to `iface` (nothing changes if it is
/// there already) and announce it with [`GARP_COUNT`] gratuitous ARPs, so
/// neighbours that knew another connector's MAC for it switch to ours.
pub fn claim(iface: &str, addr: Ipv4Addr) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let link = require_link(&mut nl, iface, addr)?;
    nl.replace_addr_owned(
        &link,
        host_net(addr),
        label_for(iface).as_deref(),
        RTPROT_FABEDGE,
    )
    .with_context(|| format!("claiming VTEP address {addr}"))?;
    announce(&link, addr)
}

/// Give `addr` up; `false` if `iface` did not have it. An `addr/32` that
/// fabedge did not add (no label or protocol of ours) is refused, never
/// removed: it is the operator's.
pub fn release(iface: &str, addr: Ipv4Addr) -> Result<bool> {
    let mut nl = Rtnl::open()?;
    let link = require_link(&mut nl, iface, addr)?;
    let present = nl
        .addr_details()?
        .into_iter()
        .find(|a| a.info.index == link.index && a.info.address == host_net(addr));
    match present {
        None => Ok(false),
        Some(detail) if is_ours(&detail, iface) => Ok(nl.del_addr(&link, host_net(addr))?),
        Some(_) => bail!(
            "VTEP address {addr}/32 on {iface} was not added by fabedge (no label \
             {iface}{LABEL_SUFFIX}, no protocol {RTPROT_FABEDGE:#x}); not removing it: remove \
             it by hand if it should go"
        ),
    }
}

/// The VTEP addresses we hold on `iface`: /32s with our label or protocol.
pub fn held(iface: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let mut nl = Rtnl::open()?;
    let Some(link) = nl.link(iface)? else {
        return Ok(BTreeSet::new());
    };
    Ok(nl
        .addr_details()?
        .into_iter()
        .filter(|a| a.info.index == link.index && a.info.address.prefix_len() == 32)
        .filter(|a| is_ours(a, iface))
        .map(|a| a.info.address.addr())
        .collect())
}

/// Marked as ours: the protocol (kernel 6.1+) or, on older kernels, the
/// label (when it fits; an address on an older kernel and a NIC name too
/// long for the label cannot be told apart, and is never released).
fn is_ours(detail: &AddrDetail, iface: &str) -> bool {
    detail.proto == Some(RTPROT_FABEDGE)
        || label_for(iface).is_some_and(|label| detail.label.as_deref() == Some(label.as_str()))
}

/// A gratuitous ARP request for `addr` from `mac`: sender and target
/// address both `addr`, broadcast. Linux neighbours update an existing
/// entry on it (`arp_is_garp`) without `arp_accept`.
pub fn garp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; ETH_MIN_FRAME] {
    let mut frame = [0u8; ETH_MIN_FRAME];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let arp = &mut frame[14..42];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&mac);
    arp[14..18].copy_from_slice(&addr.octets());
    // Target MAC stays zero (RFC 5227 announcement).
    arp[24..28].copy_from_slice(&addr.octets());
    frame
}

/// Send the gratuitous ARPs for `addr` out of `link` (AF_PACKET).
fn announce(link: &LinkInfo, addr: Ipv4Addr) -> Result<()> {
    let Some(mac) = link.mac else {
        bail!(
            "VTEP address {addr}: interface {} has no Ethernet address to announce it with",
            link.name
        );
    };
    let what = || {
        format!(
            "announcing VTEP address {addr} on {} (gratuitous ARP)",
            link.name
        )
    };
    // Protocol 0: this socket only sends, it receives nothing.
    let fd = packet_socket(0, 0).with_context(what)?;
    let frame = garp_frame(mac, addr);
    for _ in 0..GARP_COUNT {
        send_broadcast(&fd, link.index, &frame).with_context(what)?;
    }
    Ok(())
}

/// An `AF_PACKET` raw socket for `protocol` (0: send only), non-blocking
/// when asked (`SOCK_NONBLOCK`).
fn packet_socket(protocol: u16, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            protocol.to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn link_address(ifindex: u32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = protocol.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    to
}

/// Send an ARP `frame` to the broadcast address out of `ifindex`.
fn send_broadcast(fd: &OwnedFd, ifindex: u32, frame: &[u8]) -> io::Result<()> {
    let to = link_address(ifindex, ETH_P_ARP);
    // SAFETY: frame and `to` are valid for the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An ARP probe for `addr` from `mac` (RFC 5227): sender address 0.0.0.0,
/// so no neighbour learns anything from it; a host holding `addr` answers.
pub fn arp_probe_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; ETH_MIN_FRAME] {
    let mut frame = garp_frame(mac, addr);
    frame[28..32].copy_from_slice(&[0; 4]);
    frame
}

/// Who else says it holds an address: the sender of an ARP frame (reply,
/// probe answer or gratuitous announcement) whose sender address is
/// `addr`, if that sender is not `mine`.
pub fn other_sender(frame: &[u8], mine: [u8; 6]) -> Option<(Ipv4Addr, [u8; 6])> {
    if frame.get(12..14)? != ETH_P_ARP.to_be_bytes() || frame.get(16..18)? != ETH_P_IP.to_be_bytes()
    {
        return None;
    }
    let mac: [u8; 6] = frame.get(22..28)?.try_into().ok()?;
    let addr: [u8; 4] = frame.get(28..32)?.try_into().ok()?;
    (mac != mine && addr != [0; 4]).then_some((Ipv4Addr::from(addr), mac))
}

/// Before a connector gives a borrowed VTEP address back, the address's
/// own connector must hold it again: answering probes (its datapath, which
/// survives its agent) is not enough, the address must be on its NIC, or
/// the cloud's VXLAN traffic for its edges would reach nobody. This asks
/// the network with ARP probes and listens for anyone else answering for
/// (or announcing) the address. Non-blocking: one call per run-loop tick.
pub struct HolderCheck {
    fd: OwnedFd,
    ifindex: u32,
    mac: [u8; 6],
    asked: BTreeMap<Ipv4Addr, Instant>,
    answered: BTreeMap<Ipv4Addr, [u8; 6]>,
}

impl HolderCheck {
    pub fn open(iface: &str) -> Result<HolderCheck> {
        let what = || format!("listening for ARP on {iface} (VTEP address hand-back)");
        let link = Rtnl::open()?
            .link(iface)?
            .with_context(|| format!("{}: interface {iface} does not exist", what()))?;
        let mac = link
            .mac
            .with_context(|| format!("{}: {iface} has no Ethernet address", what()))?;
        let fd = packet_socket(ETH_P_ARP, libc::SOCK_NONBLOCK).with_context(what)?;
        let bind_to = link_address(link.index, ETH_P_ARP);
        // SAFETY: `bind_to` is a valid sockaddr_ll for the call.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&bind_to as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error()).with_context(what);
        }
        Ok(HolderCheck {
            fd,
            ifindex: link.index,
            mac,
            asked: BTreeMap::new(),
            answered: BTreeMap::new(),
        })
    }

    /// The MAC of another holder of `addr` heard since we began asking,
    /// if any; else asks (again, at most every [`ASK_EVERY`]).
    pub fn other_holder(&mut self, addr: Ipv4Addr) -> Result<Option<[u8; 6]>> {
        self.drain();
        if let Some(mac) = self.answered.get(&addr) {
            return Ok(Some(*mac));
        }
        let due = self
            .asked
            .get(&addr)
            .is_none_or(|at| at.elapsed() >= ASK_EVERY);
        if due {
            send_broadcast(&self.fd, self.ifindex, &arp_probe_frame(self.mac, addr))
                .with_context(|| format!("asking who holds VTEP address {addr} (ARP probe)"))?;
            self.asked.insert(addr, Instant::now());
        }
        Ok(None)
    }

    /// Stop asking about `addr` and forget who answered.
    pub fn forget(&mut self, addr: Ipv4Addr) {
        self.asked.remove(&addr);
        self.answered.remove(&addr);
    }

    fn drain(&mut self) {
        let mut frame = [0u8; 128];
        loop {
            // SAFETY: `frame` is valid for writes of its length.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    0,
                )
            };
            if got <= 0 {
                // EAGAIN: nothing more now. Other errors: asked again next tick.
                return;
            }
            if let Some((addr, mac)) = other_sender(&frame[..got as usize], self.mac)
                && self.asked.contains_key(&addr)
            {
                self.answered.insert(addr, mac);
            }
        }
    }
}

/// Uninstall: every VTEP address fabedge holds, on any NIC, removed.
/// Returns what went, for the uninstall report.
pub fn release_everywhere() -> Result<Vec<String>> {
    let mut nl = Rtnl::open()?;
    let links = nl.links()?;
    let mut removed = Vec::new();
    for addr in nl.addr_details()? {
        let Some(link) = links.iter().find(|l| l.index == addr.info.index) else {
            continue;
        };
        let ours = addr.proto == Some(RTPROT_FABEDGE)
            || label_for(&link.name)
                .is_some_and(|label| addr.label.as_deref() == Some(label.as_str()));
        if !ours || addr.info.address.prefix_len() != 32 {
            continue;
        }
        if nl.del_addr(link, addr.info.address)? {
            removed.push(format!(
                "VTEP address {} on {}",
                addr.info.address.addr(),
                link.name
            ));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 9, 0, last)
    }

    const A: &str = "connector-a";
    const B: &str = "connector-b";
    const C: &str = "connector-c";

    fn connectors() -> Vec<(&'static str, Option<Ipv4Addr>)> {
        vec![(A, Some(ip(1))), (B, Some(ip(2))), (C, Some(ip(3)))]
    }

    fn alive(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn set(addrs: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
        addrs.iter().copied().collect()
    }

    #[test]
    fn labels_fit_ifnamsiz_or_are_left_out() {
        assert_eq!(label_for("eth0").as_deref(), Some("eth0:fe"));
        assert_eq!(
            label_for("enp0s31f6abc").as_deref(),
            Some("enp0s31f6abc:fe")
        );
        assert_eq!(label_for("enp0s31f6abcd"), None);
    }

    #[test]
    fn everyone_alive_holds_only_their_own() {
        let all = alive(&[A, B, C]);
        for (me, own) in [(A, ip(1)), (B, ip(2)), (C, ip(3))] {
            assert_eq!(holders(&connectors(), &all, me), set(&[own]));
        }
    }

    #[test]
    fn own_address_is_held_even_when_our_probes_say_we_are_dead() {
        assert!(holders(&connectors(), &alive(&[]), A).contains(&ip(1)));
    }

    #[test]
    fn a_dead_connectors_address_goes_to_its_first_live_successor() {
        let heir = &successor_order(A, &[A, B, C])[0];
        let other = if heir == B { C } else { B };
        let up = alive(&[B, C]);
        assert!(holders(&connectors(), &up, heir).contains(&ip(1)));
        assert!(!holders(&connectors(), &up, other).contains(&ip(1)));
        // The heir dead too: the next one takes both addresses.
        let heir_ip = if heir == B { ip(2) } else { ip(3) };
        assert_eq!(
            holders(&connectors(), &alive(&[other]), other),
            set(&[ip(1), heir_ip, if other == B { ip(2) } else { ip(3) }])
        );
    }

    #[test]
    fn a_connector_without_a_vtep_holds_nothing_of_its_own() {
        let connectors = vec![(A, None), (B, Some(ip(2)))];
        assert!(holders(&connectors, &alive(&[A, B]), A).is_empty());
        assert_eq!(holders(&connectors, &alive(&[A]), A), set(&[ip(2)]));
    }

    /// Whatever subset is alive, every address is held by exactly one live
    /// connector (as long as one lives).
    #[test]
    fn every_address_has_exactly_one_live_holder() {
        let names = ["c-1", "c-2", "c-3", "c-4", "c-5"];
        let connectors: Vec<(&str, Option<Ipv4Addr>)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, Some(ip(i as u8 + 1))))
            .collect();
        for mask in 1u32..(1 << names.len()) {
            let up: Vec<&str> = (0..names.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| names[i])
                .collect();
            let up_set = alive(&up);
            let mut seen = BTreeSet::new();
            for me in &up {
                for addr in holders(&connectors, &up_set, me) {
                    assert!(seen.insert(addr), "{addr} held twice with {up:?} alive");
                }
            }
            assert_eq!(seen.len(), names.len(), "with {up:?} alive");
        }
    }

    #[test]
    fn garp_frame_bytes() {
        let mac = [0x02, 0, 0, 0, 0, 0x0b];
        let frame = garp_frame(mac, ip(100));
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x0b, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
            0x02, 0, 0, 0, 0, 0x0b, 10, 9, 0, 100,
            0, 0, 0, 0, 0, 0, 10, 9, 0, 100,
        ];
        assert_eq!(frame[..42], expected);
        assert!(frame[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_arp_probe_says_nothing_about_us_and_only_another_sender_counts() {
        let ours = [0x02, 0, 0, 0, 0, 0x0b];
        let addr = Ipv4Addr::new(10, 9, 0, 100);
        let probe = arp_probe_frame(ours, addr);
        // Sender address 0.0.0.0: no neighbour learns our MAC for `addr`.
        assert_eq!(probe[28..32], [0, 0, 0, 0]);
        assert_eq!(probe[38..42], addr.octets());
        assert_eq!(probe[20..22], ARPOP_REQUEST.to_be_bytes());
        // Our own frames (seen going out) and probes are not a holder.
        assert_eq!(other_sender(&probe, ours), None);
        assert_eq!(other_sender(&garp_frame(ours, addr), ours), None);
        // Another station answering (reply) or announcing the address is.
        let theirs = [0x02, 0, 0, 0, 0, 0x0c];
        let mut reply = garp_frame(theirs, addr);
        reply[20..22].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(other_sender(&reply, ours), Some((addr, theirs)));
        assert_eq!(
            other_sender(&garp_frame(theirs, addr), ours),
            Some((addr, theirs))
        );
        // Not ARP, or cut short: nothing.
        let mut ip = reply;
        ip[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        assert_eq!(other_sender(&ip, ours), None);
        assert_eq!(other_sender(&reply[..30], ours), None);
    }
}
