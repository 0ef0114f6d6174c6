//! rtnetlink messages as `<linux/rtnetlink.h>`, `<linux/if_link.h>` and
//! `<linux/if_addr.h>` lay them out: only IPv4, only the links, addresses and
//! routes fabedge creates. Pure: built and parsed on bytes, tested without
//! a kernel.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub const NLMSG_HDR: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
/// In an error answer: the request was not echoed back.
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an error answer: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// Extended-ack attribute: the kernel's message text.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const RTM_NEWRULE: u16 = 32;
pub const RTM_DELRULE: u16 = 33;
pub const RTM_GETRULE: u16 = 34;
pub const RTM_NEWNSID: u16 = 88;
pub const RTM_GETNSID: u16 = 90;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_TARGET_NETNSID: u16 = 46;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const IFLA_VXLAN_COLLECT_METADATA: u16 = 25;
const IFLA_XFRM_IF_ID: u16 = 2;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_LABEL: u16 = 3;
/// Who added an address (kernel 6.1+; older kernels ignore it).
const IFA_PROTO: u16 = 11;
const IFA_TARGET_NETNSID: u16 = 10;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;

pub const RT_TABLE_MAIN: u8 = 254;
/// In a message's one-byte table field: "see the table attribute" (ids
/// above 255 only fit there).
const RT_TABLE_UNSPEC: u8 = 0;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
/// In a delete: match any scope.
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_UNICAST: u8 = 1;

pub const IFF_UP: u32 = 0x1;
pub const IFF_NOARP: u32 = 0x80;

const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;
/// `struct fib_rule_hdr`.
const FIB_RULE_HDR_LEN: usize = 12;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_PROTOCOL: u16 = 21;
/// A rule whose action is "look the packet up in table N".
const FR_ACT_TO_TBL: u8 = 1;
/// Nested attributes carry this bit; the type is below it.
const NLA_TYPE_MASK: u16 = 0x3fff;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message under construction.
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    pub fn new(kind: u16, flags: u16, seq: u32) -> Self {
        let mut buf = vec![0u8; NLMSG_HDR];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        Builder { buf }
    }

    fn body(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A C string attribute (names and kinds are NUL-terminated).
    fn attr_str(&mut self, kind: u16, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    /// Open a nested attribute; `end_nest` fixes its length.
    fn begin_nest(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.attr(kind, &[]);
        start
    }

    fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The attributes in `bytes`, as (type without flag bits, payload).
pub fn attrs(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let payload = &bytes[4..len];
        bytes = &bytes[align4(len).min(bytes.len())..];
        Some((kind, payload))
    })
}

fn c_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

fn u32_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

fn ipv4_of(payload: &[u8]) -> Option<Ipv4Addr> {
    let octets: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(octets))
}

/// `struct ifinfomsg`.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut out = [0u8; IFINFOMSG_LEN];
    out[0] = AF_UNSPEC;
    out[4..8].copy_from_slice(&index.to_ne_bytes());
    out[8..12].copy_from_slice(&flags.to_ne_bytes());
    out[12..16].copy_from_slice(&change.to_ne_bytes());
    out
}

/// What a new link is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    /// Collect-metadata ("external") VXLAN on `port`, not learning: the
    /// datapath sets every packet's tunnel key itself.
    VxlanExternal {
        port: u16,
    },
    /// An xfrm interface bound to SAs and policies of `if_id`.
    Xfrm {
        if_id: u32,
    },
}

impl LinkKind {
    pub fn name(&self) -> &'static str {
        match self {
            LinkKind::Bridge => "bridge",
            LinkKind::VxlanExternal { .. } => "vxlan",
            LinkKind::Xfrm { .. } => "xfrm",
        }
    }
}

/// `RTM_GETLINK` of one link by name.
pub fn get_link(name: &str, seq: u32) -> Vec<u8> {
    // With an ACK after the answer, so the reader knows it is complete.
    let mut b = Builder::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.body(&ifinfomsg(0, 0, 0));
    b.attr_str(IFLA_IFNAME, name);
    b.finish()
}

/// `RTM_GETLINK` of every link (to name the devices of routes).
pub fn dump_links(seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq);
    b.body(&ifinfomsg(0, 0, 0));
    b.finish()
}

/// `RTM_GETLINK` of link `index` in the namespace ours calls `netnsid`
/// (a veth peer's, from [`LinkInfo::link_netnsid`]).
pub fn get_link_in(netnsid: i32, index: u32, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.body(&ifinfomsg(index, 0, 0));
    b.attr(IFLA_TARGET_NETNSID, &netnsid.to_ne_bytes());
    b.finish()
}

/// `RTM_GETNSID`: the id our namespace gives the namespace open at `fd`.
pub fn get_nsid(fd: i32, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETNSID, NLM_F_REQUEST | NLM_F_ACK, seq);
    // struct rtgenmsg, padded.
    b.body(&[AF_UNSPEC, 0, 0, 0]);
    b.attr(NETNSA_FD, &(fd as u32).to_ne_bytes());
    b.finish()
}

/// The payload of an `RTM_NEWNSID` answer: the id (-1: none assigned).
pub fn parse_nsid(payload: &[u8]) -> Option<i32> {
    attrs(payload.get(4..)?)
        .find(|(kind, _)| *kind == NETNSA_NSID)
        .and_then(|(_, value)| Some(i32::from_ne_bytes(value.get(..4)?.try_into().ok()?)))
}

/// `RTM_NEWLINK` creating `name` (fails if it exists), down.
pub fn new_link(name: &str, kind: &LinkKind, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
    );
    b.body(&ifinfomsg(0, 0, 0));
    b.attr_str(IFLA_IFNAME, name);
    let info = b.begin_nest(IFLA_LINKINFO);
    b.attr_str(IFLA_INFO_KIND, kind.name());
    match kind {
        LinkKind::Bridge => {}
        LinkKind::VxlanExternal { port } => {
            let data = b.begin_nest(IFLA_INFO_DATA);
            b.attr(IFLA_VXLAN_COLLECT_METADATA, &[1]);
            b.attr(IFLA_VXLAN_LEARNING, &[0]);
            b.attr(IFLA_VXLAN_PORT, &port.to_be_bytes());
            b.end_nest(data);
        }
        LinkKind::Xfrm { if_id } => {
            let data = b.begin_nest(IFLA_INFO_DATA);
            b.attr(IFLA_XFRM_IF_ID, &if_id.to_ne_bytes());
            b.end_nest(data);
        }
    }
    b.end_nest(info);
    b.finish()
}

/// What to change on an existing link; `None` leaves it as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
    pub noarp: Option<bool>,
}

/// `RTM_NEWLINK` on an existing link (what `ip link set` sends).
pub fn set_link(index: u32, change: &LinkChange, seq: u32) -> Vec<u8> {
    let mut flags = 0;
    let mut mask = 0;
    for (wanted, bit) in [(change.up, IFF_UP), (change.noarp, IFF_NOARP)] {
        if let Some(on) = wanted {
            mask |= bit;
            if on {
                flags |= bit;
            }
        }
    }
    let mut b = Builder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.body(&ifinfomsg(index, flags, mask));
    if let Some(mac) = change.mac {
        b.attr(IFLA_ADDRESS, &mac);
    }
    if let Some(mtu) = change.mtu {
        b.attr(IFLA_MTU, &mtu.to_ne_bytes());
    }
    b.finish()
}

pub fn del_link(index: u32, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.body(&ifinfomsg(index, 0, 0));
    b.finish()
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub flags: u32,
    pub kind: Option<String>,
    pub vxlan_port: Option<u16>,
    pub vxlan_external: bool,
    /// The bridge (or bond) this link is a port of.
    pub master: Option<u32>,
    /// A veth's peer: its ifindex, in the namespace `link_netnsid` names
    /// (absent when the peer is in ours).
    pub link: Option<u32>,
    pub link_netnsid: Option<i32>,
    /// An XDP program is attached (`IFLA_XDP_ATTACHED` not `XDP_ATTACHED_NONE`).
    pub xdp_attached: bool,
}

/// The payload of an `RTM_NEWLINK` answer.
pub fn parse_link(payload: &[u8]) -> Option<LinkInfo> {
    let head = payload.get(..IFINFOMSG_LEN)?;
    let mut link = LinkInfo {
        index: u32::from_ne_bytes(head[4..8].try_into().ok()?),
        flags: u32::from_ne_bytes(head[8..12].try_into().ok()?),
        ..LinkInfo::default()
    };
    for (kind, value) in attrs(&payload[IFINFOMSG_LEN..]) {
        match kind {
            IFLA_IFNAME => link.name = c_string(value),
            IFLA_ADDRESS => link.mac = value.try_into().ok(),
            IFLA_MTU => link.mtu = u32_of(value)?,
            IFLA_MASTER => link.master = u32_of(value),
            IFLA_LINK => link.link = u32_of(value),
            IFLA_LINK_NETNSID => link.link_netnsid = u32_of(value).map(|id| id as i32),
            IFLA_XDP => {
                link.xdp_attached = attrs(value).any(|(attr, v)| {
                    attr == IFLA_XDP_ATTACHED && v.first().is_some_and(|m| *m != 0)
                })
            }
            IFLA_LINKINFO => {
                for (info, value) in attrs(value) {
                    match info {
                        IFLA_INFO_KIND => link.kind = Some(c_string(value)),
                        IFLA_INFO_DATA => data_of(&mut link, value),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

/// `IFLA_INFO_DATA` may precede `IFLA_INFO_KIND`: read it as VXLAN data
/// only when nothing says it is another kind.
fn data_of(link: &mut LinkInfo, data: &[u8]) {
    if link.kind.as_deref().is_some_and(|k| k != "vxlan") {
        return;
    }
    for (kind, value) in attrs(data) {
        match kind {
            IFLA_VXLAN_PORT if value.len() >= 2 => {
                link.vxlan_port = Some(u16::from_be_bytes([value[0], value[1]]))
            }
            IFLA_VXLAN_COLLECT_METADATA => link.vxlan_external = value.first() == Some(&1),
            _ => {}
        }
    }
}

/// `RTM_GETADDR` dump of IPv4 addresses.
pub fn dump_addrs(seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq);
    b.body(&[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
    b.finish()
}

/// `RTM_GETADDR` dump of the IPv4 addresses of link `index` in the
/// namespace our namespace calls `netnsid` (kernel 4.20+; the socket must
/// have strict checking on, or the kernel ignores both filters).
pub fn dump_addrs_in(netnsid: i32, index: u32, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq);
    let mut head = [0u8; IFADDRMSG_LEN];
    head[0] = AF_INET;
    head[4..8].copy_from_slice(&index.to_ne_bytes());
    b.body(&head);
    b.attr(IFA_TARGET_NETNSID, &netnsid.to_ne_bytes());
    b.finish()
}

/// An IPv4 address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrInfo {
    pub index: u32,
    pub address: Ipv4Net,
}

pub fn parse_addr(payload: &[u8]) -> Option<AddrInfo> {
    let head = payload.get(..IFADDRMSG_LEN)?;
    if head[0] != AF_INET {
        return None;
    }
    let prefix = head[1];
    let index = u32::from_ne_bytes(head[4..8].try_into().ok()?);
    let (mut local, mut address) = (None, None);
    for (kind, value) in attrs(&payload[IFADDRMSG_LEN..]) {
        match kind {
            IFA_LOCAL => local = ipv4_of(value),
            IFA_ADDRESS => address = ipv4_of(value),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    // on point-to-point links and the same otherwise.
    let addr = local.or(address)?;
    Some(AddrInfo {
        index,
        address: Ipv4Net::new(addr, prefix).ok()?,
    })
}

/// `RTM_NEWADDR` adding `address` to link `index`, or replacing its flags
/// if present (what `ip addr replace` sends).
pub fn replace_addr(index: u32, address: Ipv4Net, seq: u32) -> Vec<u8> {
    new_addr(index, address, seq).finish()
}

/// The common part of `RTM_NEWADDR` (create or replace): header, local
/// address and address; callers add attributes and finish.
fn new_addr(index: u32, address: Ipv4Net, seq: u32) -> Builder {
    let mut b = Builder::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    );
    let mut head = [0u8; IFADDRMSG_LEN];
    head[0] = AF_INET;
    head[1] = address.prefix_len();
    head[3] = RT_SCOPE_UNIVERSE;
    head[4..8].copy_from_slice(&index.to_ne_bytes());
    b.body(&head);
    b.attr(IFA_LOCAL, &address.addr().octets());
    b.attr(IFA_ADDRESS, &address.addr().octets());
    b
}

/// An IPv4 address with what says who owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrDetail {
    pub info: AddrInfo,
    /// `ip addr`'s label (`eth0:fe`); the kernel reports the device name
    /// when none was given.
    pub label: Option<String>,
    /// `IFA_PROTO` (kernel 6.1+): who added it.
    pub proto: Option<u8>,
}

pub fn parse_addr_detail(payload: &[u8]) -> Option<AddrDetail> {
    let info = parse_addr(payload)?;
    let (mut label, mut proto) = (None, None);
    for (kind, value) in attrs(&payload[IFADDRMSG_LEN..]) {
        match kind {
            IFA_LABEL => label = Some(c_string(value)),
            IFA_PROTO => proto = value.first().copied(),
            _ => {}
        }
    }
    Some(AddrDetail { info, label, proto })
}

/// [`replace_addr`] with an owner: `label` (must start with the device's
/// name, at most 15 bytes) and `proto` (`IFA_PROTO`).
pub fn replace_addr_owned(
    index: u32,
    address: Ipv4Net,
    label: Option<&str>,
    proto: u8,
    seq: u32,
) -> Vec<u8> {
    let mut b = new_addr(index, address, seq);
    if let Some(label) = label {
        b.attr_str(IFA_LABEL, label);
    }
    b.attr(IFA_PROTO, &[proto]);
    b.finish()
}

/// `RTM_DELADDR` of `address` (address and prefix length) on link `index`.
pub fn del_addr(index: u32, address: Ipv4Net, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq);
    let mut head = [0u8; IFADDRMSG_LEN];
    head[0] = AF_INET;
    head[1] = address.prefix_len();
    head[4..8].copy_from_slice(&index.to_ne_bytes());
    b.body(&head);
    b.attr(IFA_LOCAL, &address.addr().octets());
    b.finish()
}

/// `RTM_GETROUTE` dump of IPv4 routes (all tables; the caller filters).
pub fn dump_routes(seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq);
    let mut head = [0u8; RTMSG_LEN];
    head[0] = AF_INET;
    b.body(&head);
    b.finish()
}

/// `ip route get DST`: the kernel answers with the one route it would use.
pub fn get_route(dst: Ipv4Addr, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_ACK, seq);
    let mut head = [0u8; RTMSG_LEN];
    head[0] = AF_INET;
    head[1] = 32;
    b.body(&head);
    b.attr(RTA_DST, &dst.octets());
    b.finish()
}

/// A route of the main table, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: Ipv4Net,
    pub table: u32,
    pub protocol: u8,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    pub prefsrc: Option<Ipv4Addr>,
}

pub fn parse_route(payload: &[u8]) -> Option<RouteInfo> {
    let head = payload.get(..RTMSG_LEN)?;
    if head[0] != AF_INET {
        return None;
    }
    let mut route = RouteInfo {
        dst: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, head[1]).ok()?,
        table: head[4] as u32,
        protocol: head[5],
        oif: None,
        gateway: None,
        prefsrc: None,
    };
    for (kind, value) in attrs(&payload[RTMSG_LEN..]) {
        match kind {
            RTA_DST => route.dst = Ipv4Net::new(ipv4_of(value)?, head[1]).ok()?,
            RTA_TABLE => route.table = u32_of(value)?,
            RTA_OIF => route.oif = u32_of(value),
            RTA_GATEWAY => route.gateway = ipv4_of(value),
            RTA_PREFSRC => route.prefsrc = ipv4_of(value),
            _ => {}
        }
    }
    Some(route)
}

/// A route to install in `table` under `protocol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub table: u32,
    pub protocol: u8,
    pub oif: Option<u32>,
    /// `None`: a link-scope route (the destination is on `oif`).
    pub gateway: Option<Ipv4Addr>,
    pub prefsrc: Option<Ipv4Addr>,
}

/// `RTM_NEWROUTE` creating or replacing the route to `dst` (what
/// `ip route replace` sends).
pub fn replace_route(route: &RouteSpec, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    );
    let scope = if route.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    b.body(&rtmsg(
        route.dst.prefix_len(),
        route.table,
        route.protocol,
        scope,
        RTN_UNICAST,
    ));
    b.attr(RTA_TABLE, &route.table.to_ne_bytes());
    b.attr(RTA_DST, &route.dst.network().octets());
    if let Some(gateway) = route.gateway {
        b.attr(RTA_GATEWAY, &gateway.octets());
    }
    if let Some(oif) = route.oif {
        b.attr(RTA_OIF, &oif.to_ne_bytes());
    }
    if let Some(src) = route.prefsrc {
        b.attr(RTA_PREFSRC, &src.octets());
    }
    b.finish()
}

/// `RTM_DELROUTE` of `table`'s route to `dst` under `protocol` (any
/// scope, any device): never someone else's route to the same place.
pub fn del_route(dst: Ipv4Net, table: u32, protocol: u8, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, seq);
    b.body(&rtmsg(
        dst.prefix_len(),
        table,
        protocol,
        RT_SCOPE_NOWHERE,
        0,
    ));
    b.attr(RTA_TABLE, &table.to_ne_bytes());
    b.attr(RTA_DST, &dst.network().octets());
    b.finish()
}

fn rtmsg(dst_len: u8, table: u32, protocol: u8, scope: u8, kind: u8) -> [u8; RTMSG_LEN] {
    // family, dst_len, src_len, tos, table, protocol, scope, type; flags.
    let table = u8::try_from(table).unwrap_or(RT_TABLE_UNSPEC);
    let mut out = [0u8; RTMSG_LEN];
    out[..8].copy_from_slice(&[AF_INET, dst_len, 0, 0, table, protocol, scope, kind]);
    out
}

/// A policy routing rule "packets whose mark matches `fwmark/fwmask` look
/// up `table`", at `priority` (`ip rule`), added under `protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSpec {
    pub priority: u32,
    pub fwmark: u32,
    pub fwmask: u32,
    pub table: u32,
    pub protocol: u8,
}

/// `RTM_NEWRULE` adding `rule` (refused with `EEXIST` if the same rule is there).
pub fn new_rule(rule: &RuleSpec, seq: u32) -> Vec<u8> {
    rule_msg(
        RTM_NEWRULE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        rule,
        seq,
    )
}

/// `RTM_DELRULE` of the rule matching every field of `rule`.
pub fn del_rule(rule: &RuleSpec, seq: u32) -> Vec<u8> {
    rule_msg(RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, rule, seq)
}

fn rule_msg(kind: u16, flags: u16, rule: &RuleSpec, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(kind, flags, seq);
    // family, dst_len, src_len, tos, table, res1, res2, action; flags.
    let mut head = [0u8; FIB_RULE_HDR_LEN];
    head[0] = AF_INET;
    head[4] = u8::try_from(rule.table).unwrap_or(RT_TABLE_UNSPEC);
    head[7] = FR_ACT_TO_TBL;
    b.body(&head);
    b.attr(FRA_PRIORITY, &rule.priority.to_ne_bytes());
    b.attr(FRA_FWMARK, &rule.fwmark.to_ne_bytes());
    b.attr(FRA_FWMASK, &rule.fwmask.to_ne_bytes());
    b.attr(FRA_TABLE, &rule.table.to_ne_bytes());
    b.attr(FRA_PROTOCOL, &[rule.protocol]);
    b.finish()
}

/// `RTM_GETRULE` dump of the IPv4 rules.
pub fn dump_rules(seq: u32) -> Vec<u8> {
    let mut b = Builder::new(RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, seq);
    let mut head = [0u8; FIB_RULE_HDR_LEN];
    head[0] = AF_INET;
    b.body(&head);
    b.finish()
}

/// A "lookup table" rule as the kernel reports it; other actions
/// (blackhole, goto, ...) are `None`. Absent attributes read as 0.
pub fn parse_rule(payload: &[u8]) -> Option<RuleSpec> {
    let head = payload.get(..FIB_RULE_HDR_LEN)?;
    if head[0] != AF_INET || head[7] != FR_ACT_TO_TBL {
        return None;
    }
    let mut rule = RuleSpec {
        priority: 0,
        fwmark: 0,
        fwmask: 0,
        table: head[4] as u32,
        protocol: 0,
    };
    for (kind, value) in attrs(&payload[FIB_RULE_HDR_LEN..]) {
        match kind {
            FRA_PRIORITY => rule.priority = u32_of(value)?,
            FRA_FWMARK => rule.fwmark = u32_of(value)?,
            FRA_FWMASK => rule.fwmask = u32_of(value)?,
            FRA_TABLE => rule.table = u32_of(value)?,
            FRA_PROTOCOL => rule.protocol = *value.first()?,
            _ => {}
        }
    }
    Some(rule)
}

/// The errno of an `NLMSG_ERROR` payload (0 = ACK) and the kernel's
/// extended-ack message, if it sent one.
pub fn parse_error(flags: u16, payload: &[u8]) -> Option<(i32, Option<String>)> {
    let errno = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    if flags & NLM_F_ACK_TLVS == 0 {
        return Some((errno, None));
    }
    // `struct nlmsgerr` is the errno and the request's header; without
    // NLM_F_CAPPED the rest of the request follows it. Then the TLVs.
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDR
    } else {
        let request_len = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?) as usize;
        align4(request_len.max(NLMSG_HDR))
    };
    let tlvs = payload.get(4 + echoed..).unwrap_or(&[]);
    let text = attrs(tlvs)
        .find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG)
        .map(|(_, value)| c_string(value))
        .filter(|text| !text.is_empty());
    Some((errno, text))
}
