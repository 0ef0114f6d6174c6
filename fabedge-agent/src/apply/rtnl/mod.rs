//! Route netlink (`NETLINK_ROUTE`): the links, addresses and routes apply
//! writes, without iproute2. A blocking socket, one request at a time, like
//! the xfrm one: apply is sequential and every call waits for the kernel's
//! answer, so an error belongs to the object that caused it.
//!
//! `msg` builds and parses the messages (pure, tested on bytes); [`Rtnl`]
//! sends them and turns a refusal into an error naming the object, the
//! errno and the kernel's extended-ack text.

pub mod msg;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use ipnet::Ipv4Net;

pub use self::msg::{
    AddrDetail, AddrInfo, LinkChange, LinkInfo, LinkKind, RouteInfo, RouteSpec, RuleSpec,
};
use self::msg::{NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR};

const NETLINK_ROUTE: i32 = 0;
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;
const NETLINK_GET_STRICT_CHK: i32 = 12;
/// A dump answer flagged this changed while it was read: read it again.
const NLM_F_DUMP_INTR: u16 = 0x10;
const DUMP_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("opening a route netlink socket: {0}")]
    Open(io::Error),
    // The io::Error is in the text, not a `source`: `{:#}` would print it twice.
    #[error("{what}: talking to the kernel's route netlink: {os}")]
    Io { what: String, os: io::Error },
    /// The kernel refused: errno, and its own explanation when it gave one.
    #[error("{what}: {os}{}", kernel.as_ref().map(|k| format!(": {k}")).unwrap_or_default())]
    Refused {
        what: String,
        os: io::Error,
        kernel: Option<String>,
    },
}

impl RtnlError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Refused { os, .. } => os.raw_os_error(),
            _ => None,
        }
    }
}

pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket whose dump requests the kernel checks strictly, and so
    /// filters by the fields and attributes they carry (kernel 4.20+):
    /// what [`Rtnl::addrs_in`] needs.
    pub fn open_strict() -> Result<Self, RtnlError> {
        let rtnl = Self::open()?;
        let on: libc::c_int = 1;
        // SAFETY: a c_int option value valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                rtnl.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_GET_STRICT_CHK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc < 0 {
            return Err(RtnlError::Open(io::Error::last_os_error()));
        }
        Ok(rtnl)
    }

    pub fn open() -> Result<Self, RtnlError> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(RtnlError::Open(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel's reason in words (extended ack), and errors without an
        // echo of our request. Kernels without them just say less.
        for option in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            let on: libc::c_int = 1;
            // SAFETY: a c_int option value valid for the call.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    option,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
        }
        Ok(Rtnl {
            fd,
            seq: 1,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, buf: &[u8], what: &str) -> Result<(), RtnlError> {
        // SAFETY: sockaddr_nl zeroed = the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and addr are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(RtnlError::Io {
                what: what.to_owned(),
                os: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Send `build(seq)`, then hand each answer message (type, flags,
    /// payload) to `each` until the ACK, an error, or the end of a dump.
    fn exchange(
        &mut self,
        build: impl FnOnce(u32) -> Vec<u8>,
        what: &str,
        mut each: impl FnMut(u16, u16, &[u8]),
    ) -> Result<(), RtnlError> {
        let seq = self.next_seq();
        self.send(&build(seq), what)?;
        let io_error = |os| RtnlError::Io {
            what: what.to_owned(),
            os,
        };
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_error(e));
            }
            if n as usize > self.buf.len() {
                return Err(io_error(io::Error::other(format!(
                    "an answer of {n} bytes does not fit the {} byte buffer",
                    self.buf.len()
                ))));
            }
            let mut rest = &self.buf[..n as usize];
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < NLMSG_HDR || len > rest.len() {
                    break;
                }
                let payload = &rest[NLMSG_HDR..len];
                rest = &rest[((len + 3) & !3).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let (errno, kernel) = msg::parse_error(flags, payload)
                            .ok_or_else(|| io_error(io::Error::other("a truncated error")))?;
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(RtnlError::Refused {
                                what: what.to_owned(),
                                os: io::Error::from_raw_os_error(-errno),
                                kernel,
                            })
                        };
                    }
                    NLMSG_DONE => {
                        // A dump may end with an error of its own.
                        return match msg::parse_error(flags, payload) {
                            Some((errno, kernel)) if errno < 0 => Err(RtnlError::Refused {
                                what: what.to_owned(),
                                os: io::Error::from_raw_os_error(-errno),
                                kernel,
                            }),
                            _ => Ok(()),
                        };
                    }
                    _ => each(kind, flags, payload),
                }
            }
        }
    }

    /// Send one request and wait for its ACK.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>, what: &str) -> Result<(), RtnlError> {
        #[cfg(test)]
        tests::WRITES.with(|writes| writes.set(writes.get() + 1));
        self.exchange(build, what, |_, _, _| {})
    }

    /// A whole dump, parsed by `parse`; read again if it changed meanwhile.
    fn dump<T>(
        &mut self,
        build: impl Fn(u32) -> Vec<u8>,
        answer: u16,
        parse: fn(&[u8]) -> Option<T>,
        what: &str,
    ) -> Result<Vec<T>, RtnlError> {
        for _ in 0..DUMP_ATTEMPTS {
            let mut out = Vec::new();
            let mut interrupted = false;
            self.exchange(&build, what, |kind, flags, payload| {
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                if kind == answer
                    && let Some(item) = parse(payload)
                {
                    out.push(item);
                }
            })?;
            if !interrupted {
                return Ok(out);
            }
        }
        Err(RtnlError::Io {
            what: what.to_owned(),
            os: io::Error::other(format!(
                "the kernel's table kept changing over {DUMP_ATTEMPTS} reads"
            )),
        })
    }

    /// The link called `name`, if there is one.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkInfo>, RtnlError> {
        self.one_link(
            |seq| msg::get_link(name, seq),
            &format!("reading link {name}"),
        )
    }

    /// Link `index` of the namespace ours calls `netnsid` (a veth peer's).
    pub fn link_in(&mut self, netnsid: i32, index: u32) -> Result<Option<LinkInfo>, RtnlError> {
        self.one_link(
            |seq| msg::get_link_in(netnsid, index, seq),
            &format!("reading link {index} in netns id {netnsid}"),
        )
    }

    /// The one link a `RTM_GETLINK` request names; `None` if there is none.
    fn one_link(
        &mut self,
        build: impl Fn(u32) -> Vec<u8>,
        what: &str,
    ) -> Result<Option<LinkInfo>, RtnlError> {
        let mut found = None;
        match self.exchange(build, what, |kind, _, payload| {
            if kind == msg::RTM_NEWLINK {
                found = msg::parse_link(payload);
            }
        }) {
            Ok(()) => Ok(found),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The id our namespace gives the network namespace open at `fd`
    /// (`None`: it has none, so no veth of ours leads there).
    pub fn nsid_of(&mut self, fd: i32) -> Result<Option<i32>, RtnlError> {
        let mut found = None;
        self.exchange(
            |seq| msg::get_nsid(fd, seq),
            "reading a network namespace's id",
            |kind, _, payload| {
                if kind == msg::RTM_NEWNSID {
                    found = msg::parse_nsid(payload);
                }
            },
        )?;
        Ok(found.filter(|id| *id >= 0))
    }

    pub fn links(&mut self) -> Result<Vec<LinkInfo>, RtnlError> {
        self.dump(
            msg::dump_links,
            msg::RTM_NEWLINK,
            msg::parse_link,
            "listing links",
        )
    }

    pub fn add_link(&mut self, name: &str, kind: &LinkKind) -> Result<(), RtnlError> {
        let what = match kind {
            LinkKind::Bridge => format!("creating bridge {name}"),
            LinkKind::VxlanExternal { port } => {
                format!("creating VXLAN device {name} (external, dstport {port})")
            }
            LinkKind::Xfrm { if_id } => {
                format!("creating xfrm interface {name} (if_id {if_id:#x})")
            }
        };
        self.request(|seq| msg::new_link(name, kind, seq), &what)
    }

    pub fn set_link(&mut self, link: &LinkInfo, change: &LinkChange) -> Result<(), RtnlError> {
        let what = format!("setting link {} to {}", link.name, describe_change(change));
        self.request(|seq| msg::set_link(link.index, change, seq), &what)
    }

    pub fn del_link(&mut self, link: &LinkInfo) -> Result<(), RtnlError> {
        let what = format!("deleting link {}", link.name);
        self.request(|seq| msg::del_link(link.index, seq), &what)
    }

    /// Every IPv4 address of every link.
    pub fn addrs(&mut self) -> Result<Vec<AddrInfo>, RtnlError> {
        self.dump(
            msg::dump_addrs,
            msg::RTM_NEWADDR,
            msg::parse_addr,
            "listing addresses",
        )
    }

    /// The IPv4 addresses of link `index` of the namespace that ours calls
    /// `netnsid` (a veth peer's, from [`LinkInfo::link_netnsid`]). Needs a
    /// socket from [`Rtnl::open_strict`].
    pub fn addrs_in(&mut self, netnsid: i32, index: u32) -> Result<Vec<AddrInfo>, RtnlError> {
        let what = format!("listing the addresses of link {index} in netns id {netnsid}");
        self.dump(
            |seq| msg::dump_addrs_in(netnsid, index, seq),
            msg::RTM_NEWADDR,
            msg::parse_addr,
            &what,
        )
    }

    pub fn replace_addr(&mut self, link: &LinkInfo, address: Ipv4Net) -> Result<(), RtnlError> {
        let what = format!("address {address} on {}", link.name);
        self.request(|seq| msg::replace_addr(link.index, address, seq), &what)
    }

    /// Every IPv4 address of every link, with its label and owner.
    pub fn addr_details(&mut self) -> Result<Vec<AddrDetail>, RtnlError> {
        self.dump(
            msg::dump_addrs,
            msg::RTM_NEWADDR,
            msg::parse_addr_detail,
            "listing addresses",
        )
    }

    /// Add `address` to `link` (or refresh it) marked as ours: `label`
    /// (see [`msg::replace_addr_owned`]) and `proto`.
    pub fn replace_addr_owned(
        &mut self,
        link: &LinkInfo,
        address: Ipv4Net,
        label: Option<&str>,
        proto: u8,
    ) -> Result<(), RtnlError> {
        let what = format!("address {address} on {}", link.name);
        self.request(
            |seq| msg::replace_addr_owned(link.index, address, label, proto, seq),
            &what,
        )
    }

    /// Remove `address` from `link`; `false` if it was not there.
    pub fn del_addr(&mut self, link: &LinkInfo, address: Ipv4Net) -> Result<bool, RtnlError> {
        let what = format!("removing address {address} from {}", link.name);
        match self.request(|seq| msg::del_addr(link.index, address, seq), &what) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every IPv4 route of every table.
    pub fn routes(&mut self) -> Result<Vec<RouteInfo>, RtnlError> {
        self.dump(
            msg::dump_routes,
            msg::RTM_NEWROUTE,
            msg::parse_route,
            "listing routes",
        )
    }

    /// The route the kernel would send a packet for `dst` by (`ip route get`).
    pub fn route_to(&mut self, dst: Ipv4Addr) -> Result<Option<RouteInfo>, RtnlError> {
        let mut found = None;
        let what = format!("looking up the route to {dst}");
        self.exchange(
            |seq| msg::get_route(dst, seq),
            &what,
            |kind, _, payload| {
                if kind == msg::RTM_NEWROUTE {
                    found = found.take().or_else(|| msg::parse_route(payload));
                }
            },
        )?;
        Ok(found)
    }

    /// `what` names the route in errors (with device names, which the
    /// spec only has as indexes).
    pub fn replace_route(&mut self, route: &RouteSpec, what: &str) -> Result<(), RtnlError> {
        self.request(|seq| msg::replace_route(route, seq), what)
    }

    pub fn del_route(
        &mut self,
        dst: Ipv4Net,
        table: u32,
        protocol: u8,
        what: &str,
    ) -> Result<(), RtnlError> {
        self.request(|seq| msg::del_route(dst, table, protocol, seq), what)
    }

    /// Every IPv4 "lookup table" rule (`ip rule`).
    pub fn rules(&mut self) -> Result<Vec<RuleSpec>, RtnlError> {
        self.dump(
            msg::dump_rules,
            msg::RTM_NEWRULE,
            msg::parse_rule,
            "listing policy routing rules",
        )
    }

    pub fn add_rule(&mut self, rule: &RuleSpec, what: &str) -> Result<(), RtnlError> {
        self.request(|seq| msg::new_rule(rule, seq), what)
    }

    pub fn del_rule(&mut self, rule: &RuleSpec, what: &str) -> Result<(), RtnlError> {
        self.request(|seq| msg::del_rule(rule, seq), what)
    }
}

fn describe_change(change: &LinkChange) -> String {
    let mut parts = Vec::new();
    if let Some(mac) = change.mac {
        parts.push(format!(
            "address {}",
            mac.map(|b| format!("{b:02x}")).join(":")
        ));
    }
    if let Some(mtu) = change.mtu {
        parts.push(format!("mtu {mtu}"));
    }
    if let Some(noarp) = change.noarp {
        parts.push(if noarp { "arp off" } else { "arp on" }.to_owned());
    }
    if let Some(up) = change.up {
        parts.push(if up { "up" } else { "down" }.to_owned());
    }
    parts.join(" ")
}
