//! xfrm netlink messages, laid out as `<linux/xfrm.h>` defines them (the
//! structs are the same on every architecture we run on: no pointers, and
//! `u64` fields at 8-byte offsets). Only IPv4, only ESP, only what fabedge uses.

use std::net::Ipv4Addr;

use crate::esp::keys::{AEAD_NAME, ICV_BITS, SaKey};

pub const NETLINK_XFRM: i32 = 6;

pub const XFRM_MSG_NEWSA: u16 = 0x10;
pub const XFRM_MSG_DELSA: u16 = 0x11;
pub const XFRM_MSG_GETSA: u16 = 0x12;
pub const XFRM_MSG_NEWPOLICY: u16 = 0x13;
pub const XFRM_MSG_DELPOLICY: u16 = 0x14;
pub const XFRM_MSG_GETPOLICY: u16 = 0x15;
pub const XFRM_MSG_EXPIRE: u16 = 0x18;
pub const XFRM_MSG_UPDPOLICY: u16 = 0x19;
pub const XFRM_MSG_UPDSA: u16 = 0x1a;
pub const XFRM_MSG_MAPPING: u16 = 0x26;

pub const XFRMA_ENCAP: u16 = 4;
pub const XFRMA_TMPL: u16 = 5;
pub const XFRMA_ALG_AEAD: u16 = 18;
pub const XFRMA_MARK: u16 = 21;
pub const XFRMA_REPLAY_ESN_VAL: u16 = 23;
pub const XFRMA_SET_MARK: u16 = 29;
pub const XFRMA_SET_MARK_MASK: u16 = 30;
pub const XFRMA_IF_ID: u16 = 31;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

const AF_INET: u16 = 2;
pub const IPPROTO_ESP: u8 = 50;
const XFRM_MODE_TUNNEL: u8 = 1;
pub const UDP_ENCAP_ESPINUDP: u16 = 2;
/// `XFRM_STATE_ESN`: 64-bit sequence numbers (RFC 4303 ESN), so an SA never
/// runs out at 2^32 packets. (`XFRM_STATE_AF_UNSPEC` is not set: inner and
/// outer are IPv4.)
pub const XFRM_STATE_ESN: u8 = 128;
const SA_FLAGS: u8 = XFRM_STATE_ESN;
/// Replay window (packets) of inbound SAs.
pub const REPLAY_WINDOW: u8 = 128;
/// The kernel refuses an ESN SA without a replay window (unless it is told
/// the SA's direction); outbound SAs get this one, which they never use.
pub const OUTBOUND_ESN_WINDOW: u32 = 32;
/// The multicast group of `XFRM_MSG_EXPIRE` (`XFRMNLGRP_EXPIRE`).
pub const XFRMNLGRP_EXPIRE: u32 = 2;
/// `XFRM_INF`: no lifetime limit.
const XFRM_INF: u64 = u64::MAX;

const NLMSG_HDR: usize = 16;
const SELECTOR_LEN: usize = 56;
const USERSA_INFO_LEN: usize = 224;
const USERSA_ID_LEN: usize = 24;
const USERPOLICY_INFO_LEN: usize = 168;
const USERPOLICY_ID_LEN: usize = 64;
const USER_TMPL_LEN: usize = 64;
const ENCAP_TMPL_LEN: usize = 24;
const ALGO_AEAD_LEN: usize = 72;
const LIFETIME_CFG_LEN: usize = 64;
/// `struct xfrm_replay_state_esn` without its bitmap.
const REPLAY_ESN_LEN: usize = 24;
/// `struct xfrm_user_expire`: the SA, then `hard`.
const USER_EXPIRE_LEN: usize = USERSA_INFO_LEN + 8;

/// Packet and byte limits of an SA (`XFRM_INF`: none). At the soft limit the
/// kernel sends an `XFRM_MSG_EXPIRE` (soft) and keeps the SA; at the hard
/// limit it deletes the SA and says so (hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Lifetime {
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    pub soft_packets: u64,
    pub hard_packets: u64,
}

impl Lifetime {
    pub const INFINITE: Lifetime = Lifetime {
        soft_bytes: XFRM_INF,
        hard_bytes: XFRM_INF,
        soft_packets: XFRM_INF,
        hard_packets: XFRM_INF,
    };
}

impl Default for Lifetime {
    fn default() -> Self {
        Lifetime::INFINITE
    }
}

/// ESP-in-UDP ports of an SA (RFC 3948).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Encap {
    pub sport: u16,
    pub dport: u16,
}

/// One tunnel-mode ESP SA with `rfc4106(gcm(aes))`. `Debug` shows no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaSpec {
    /// Outer source and destination.
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub spi: u32,
    pub reqid: u32,
    pub key: SaKey,
    pub encap: Option<Encap>,
    pub if_id: u32,
    /// `XFRMA_SET_MARK` value and mask: applied to the inner packet on
    /// input and to the outer packet on output.
    pub set_mark: Option<(u32, u32)>,
    /// Packets; 0 for outbound SAs (which need none).
    pub replay_window: u8,
    pub lifetime: Lifetime,
}

/// A policy template: where the matching traffic is tunnelled to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tmpl {
    /// Outer addresses; `UNSPECIFIED` matches any SA (inbound templates).
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// 0 matches any SA.
    pub reqid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyDir {
    In = 0,
    Out = 1,
    Fwd = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyAction {
    Allow = 0,
    Block = 1,
}

/// A policy over all IPv4 traffic (selector `0.0.0.0/0 → 0.0.0.0/0`), told
/// apart by direction, mark and `if_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicySpec {
    pub dir: PolicyDir,
    /// Lower wins.
    pub priority: u32,
    /// Flow mark value and mask to match; `(0, 0)` matches every mark.
    pub mark: (u32, u32),
    pub if_id: u32,
    pub action: PolicyAction,
    pub tmpl: Option<Tmpl>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message under construction.
struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    fn new(kind: u16, flags: u16, seq: u32) -> Self {
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

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `xfrm_address_t` of an IPv4 address: the 4 bytes first, network order.
fn address(addr: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&addr.octets());
    out
}

/// Selector matching all IPv4 traffic.
fn any_selector() -> [u8; SELECTOR_LEN] {
    let mut sel = [0u8; SELECTOR_LEN];
    sel[40..42].copy_from_slice(&AF_INET.to_ne_bytes());
    sel
}

fn infinite_lifetime(out: &mut [u8]) {
    for i in 0..4 {
        out[i * 8..i * 8 + 8].copy_from_slice(&XFRM_INF.to_ne_bytes());
    }
}

fn mark_attr(mark: (u32, u32)) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&mark.0.to_ne_bytes());
    out[4..].copy_from_slice(&mark.1.to_ne_bytes());
    out
}

/// `XFRM_MSG_NEWSA` (or `UPDSA` with `update`).
pub fn new_sa(sa: &SaSpec, seq: u32, update: bool) -> Vec<u8> {
    let (kind, flags) = if update {
        (XFRM_MSG_UPDSA, NLM_F_REQUEST | NLM_F_ACK)
    } else {
        (
            XFRM_MSG_NEWSA,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    };
    let mut b = Builder::new(kind, flags, seq);
    let mut info = [0u8; USERSA_INFO_LEN];
    info[..SELECTOR_LEN].copy_from_slice(&any_selector());
    // xfrm_id: daddr, spi (network order), proto.
    info[56..72].copy_from_slice(&address(sa.dst));
    info[72..76].copy_from_slice(&sa.spi.to_be_bytes());
    info[76] = IPPROTO_ESP;
    info[80..96].copy_from_slice(&address(sa.src));
    // Byte and packet limits as planned; no time limits (0).
    let lifetime = sa.lifetime;
    for (i, limit) in [
        lifetime.soft_bytes,
        lifetime.hard_bytes,
        lifetime.soft_packets,
        lifetime.hard_packets,
    ]
    .into_iter()
    .enumerate()
    {
        info[96 + i * 8..104 + i * 8].copy_from_slice(&limit.to_ne_bytes());
    }
    info[208..212].copy_from_slice(&sa.reqid.to_ne_bytes());
    info[212..214].copy_from_slice(&AF_INET.to_ne_bytes());
    info[214] = XFRM_MODE_TUNNEL;
    // With ESN the window lives in XFRMA_REPLAY_ESN_VAL; the kernel refuses
    // a legacy window next to it.
    info[215] = 0;
    info[216] = SA_FLAGS;
    b.body(&info);

    let key = sa.key.expose();
    let mut aead = Vec::with_capacity(ALGO_AEAD_LEN + key.len());
    let mut name = [0u8; 64];
    name[..AEAD_NAME.len()].copy_from_slice(AEAD_NAME.as_bytes());
    aead.extend_from_slice(&name);
    aead.extend_from_slice(&((key.len() * 8) as u32).to_ne_bytes());
    aead.extend_from_slice(&ICV_BITS.to_ne_bytes());
    aead.extend_from_slice(key);
    b.attr(XFRMA_ALG_AEAD, &aead);
    zeroize::Zeroize::zeroize(&mut aead);

    b.attr(XFRMA_REPLAY_ESN_VAL, &replay_esn(sa.replay_window));

    if let Some(encap) = sa.encap {
        let mut e = [0u8; ENCAP_TMPL_LEN];
        e[0..2].copy_from_slice(&UDP_ENCAP_ESPINUDP.to_ne_bytes());
        e[2..4].copy_from_slice(&encap.sport.to_be_bytes());
        e[4..6].copy_from_slice(&encap.dport.to_be_bytes());
        b.attr(XFRMA_ENCAP, &e);
    }
    if sa.if_id != 0 {
        b.attr(XFRMA_IF_ID, &sa.if_id.to_ne_bytes());
    }
    if let Some((value, mask)) = sa.set_mark {
        b.attr(XFRMA_SET_MARK, &value.to_ne_bytes());
        b.attr(XFRMA_SET_MARK_MASK, &mask.to_ne_bytes());
    }
    b.finish()
}

/// `struct xfrm_replay_state_esn` of a new SA: counters at zero, a bitmap
/// for `window` packets.
fn replay_esn(window: u8) -> Vec<u8> {
    let window = match u32::from(window) {
        0 => OUTBOUND_ESN_WINDOW,
        w => w,
    };
    let bmp_len = window.div_ceil(32);
    let mut out = vec![0u8; REPLAY_ESN_LEN + bmp_len as usize * 4];
    out[0..4].copy_from_slice(&bmp_len.to_ne_bytes());
    // oseq, seq, oseq_hi, seq_hi: 0.
    out[20..24].copy_from_slice(&window.to_ne_bytes());
    out
}

/// `XFRM_MSG_DELSA` of the SA `(dst, spi, ESP)` with `if_id`.
pub fn del_sa(dst: Ipv4Addr, spi: u32, if_id: u32, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK, seq);
    let mut id = [0u8; USERSA_ID_LEN];
    id[0..16].copy_from_slice(&address(dst));
    id[16..20].copy_from_slice(&spi.to_be_bytes());
    id[20..22].copy_from_slice(&AF_INET.to_ne_bytes());
    id[22] = IPPROTO_ESP;
    b.body(&id);
    if if_id != 0 {
        b.attr(XFRMA_IF_ID, &if_id.to_ne_bytes());
    }
    b.finish()
}

/// `XFRM_MSG_UPDPOLICY`: create or replace the policy with this selector,
/// direction, mark and `if_id`.
pub fn update_policy(policy: &PolicySpec, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq);
    let mut info = [0u8; USERPOLICY_INFO_LEN];
    info[..SELECTOR_LEN].copy_from_slice(&any_selector());
    infinite_lifetime(&mut info[56..56 + LIFETIME_CFG_LEN / 2]);
    info[152..156].copy_from_slice(&policy.priority.to_ne_bytes());
    info[160] = policy.dir as u8;
    info[161] = policy.action as u8;
    b.body(&info);
    if let Some(tmpl) = policy.tmpl {
        let mut t = [0u8; USER_TMPL_LEN];
        t[0..16].copy_from_slice(&address(tmpl.dst));
        t[20] = IPPROTO_ESP;
        t[24..26].copy_from_slice(&AF_INET.to_ne_bytes());
        t[28..44].copy_from_slice(&address(tmpl.src));
        t[44..48].copy_from_slice(&tmpl.reqid.to_ne_bytes());
        t[48] = XFRM_MODE_TUNNEL;
        // Any algorithms: the SA decides (AEAD SAs have no auth algorithm).
        for offset in [52, 56, 60] {
            t[offset..offset + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        }
        b.attr(XFRMA_TMPL, &t);
    }
    policy_attrs(&mut b, policy.mark, policy.if_id);
    b.finish()
}

fn policy_attrs(b: &mut Builder, mark: (u32, u32), if_id: u32) {
    if mark != (0, 0) {
        b.attr(XFRMA_MARK, &mark_attr(mark));
    }
    if if_id != 0 {
        b.attr(XFRMA_IF_ID, &if_id.to_ne_bytes());
    }
}

/// `XFRM_MSG_DELPOLICY` of the all-IPv4 policy with this direction, mark and `if_id`.
pub fn del_policy(dir: PolicyDir, mark: (u32, u32), if_id: u32, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq);
    let mut id = [0u8; USERPOLICY_ID_LEN];
    id[..SELECTOR_LEN].copy_from_slice(&any_selector());
    id[60] = dir as u8;
    b.body(&id);
    policy_attrs(&mut b, mark, if_id);
    b.finish()
}

/// A dump request (`GETSA` or `GETPOLICY` with `NLM_F_DUMP`).
pub fn dump(kind: u16, seq: u32) -> Vec<u8> {
    let mut b = Builder::new(kind, NLM_F_REQUEST | NLM_F_DUMP, seq);
    let body = if kind == XFRM_MSG_GETSA {
        USERSA_ID_LEN
    } else {
        USERPOLICY_ID_LEN
    };
    b.body(&vec![0u8; body]);
    b.finish()
}

/// What the kernel reports of one SA (a `NEWSA` in a dump): never the key.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SaInfo {
    pub src: Option<Ipv4Addr>,
    pub dst: Option<Ipv4Addr>,
    pub spi: u32,
    pub proto: u8,
    pub reqid: u32,
    pub bytes: u64,
    pub packets: u64,
    pub replay_errors: u32,
    pub integrity_errors: u32,
    pub if_id: u32,
    pub encap: Option<Encap>,
    pub set_mark: Option<(u32, u32)>,
    /// `XFRM_STATE_ESN` set.
    pub esn: bool,
    /// The replay window the SA checks (ESN or legacy).
    pub replay_window: u32,
    pub lifetime: Lifetime,
    /// SHA-256 of the SA's key material, to tell whether an installed SA
    /// has the key we would give it without keeping the key itself.
    #[serde(skip)]
    pub key_digest: Option<[u8; 32]>,
}

/// SHA-256 of key bytes (see [`SaInfo::key_digest`]).
pub fn key_digest(key: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key).into()
}

/// What the kernel reports of one policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct PolicyInfo {
    pub dir: u8,
    pub action: u8,
    pub priority: u32,
    pub mark: (u32, u32),
    pub if_id: u32,
    /// Template destination (outer address), if any.
    pub tmpl_dst: Option<Ipv4Addr>,
    pub tmpl_reqid: u32,
}

impl serde::Serialize for Encap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("udp {}->{}", self.sport, self.dport))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Attributes after a fixed-size body.
fn attrs(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = &rest[align4(len).min(rest.len())..];
        Some((kind, value))
    })
}

/// Parse the payload (after `nlmsghdr`) of a `NEWSA` message.
pub fn parse_sa(payload: &[u8]) -> Option<SaInfo> {
    parse_sa_with_attrs(payload, USERSA_INFO_LEN)
}

/// An `xfrm_usersa_info` at the start of `payload`, attributes from `attrs_at`.
fn parse_sa_with_attrs(payload: &[u8], attrs_at: usize) -> Option<SaInfo> {
    if payload.len() < USERSA_INFO_LEN
        || payload.len() < attrs_at
        || u16::from_ne_bytes([payload[212], payload[213]]) != AF_INET
    {
        return None;
    }
    let mut sa = SaInfo {
        dst: Some(ipv4_at(payload, 56)),
        spi: u32::from_be_bytes(payload[72..76].try_into().ok()?),
        proto: payload[76],
        src: Some(ipv4_at(payload, 80)),
        bytes: u64_at(payload, 160),
        packets: u64_at(payload, 168),
        replay_errors: u32_at(payload, 196),
        integrity_errors: u32_at(payload, 200),
        reqid: u32_at(payload, 208),
        lifetime: Lifetime {
            soft_bytes: u64_at(payload, 96),
            hard_bytes: u64_at(payload, 104),
            soft_packets: u64_at(payload, 112),
            hard_packets: u64_at(payload, 120),
        },
        replay_window: u32::from(payload[215]),
        esn: payload[216] & XFRM_STATE_ESN != 0,
        ..Default::default()
    };
    let mut set_mark = (None, 0xffff_ffff);
    for (kind, value) in attrs(&payload[attrs_at..]) {
        match kind {
            XFRMA_IF_ID if value.len() >= 4 => sa.if_id = u32_at(value, 0),
            XFRMA_ENCAP if value.len() >= 6 => {
                sa.encap = Some(Encap {
                    sport: u16::from_be_bytes([value[2], value[3]]),
                    dport: u16::from_be_bytes([value[4], value[5]]),
                })
            }
            XFRMA_SET_MARK if value.len() >= 4 => set_mark.0 = Some(u32_at(value, 0)),
            XFRMA_SET_MARK_MASK if value.len() >= 4 => set_mark.1 = u32_at(value, 0),
            XFRMA_REPLAY_ESN_VAL if value.len() >= REPLAY_ESN_LEN => {
                sa.replay_window = u32_at(value, 20)
            }
            // xfrm_algo_aead: name[64], key_len (bits), icv_len, key.
            XFRMA_ALG_AEAD if value.len() >= ALGO_AEAD_LEN => {
                let bits = u32_at(value, 64) as usize;
                // All zeros: the kernel redacts keys (lockdown); unknown.
                if let Some(key) = value.get(ALGO_AEAD_LEN..ALGO_AEAD_LEN + bits / 8)
                    && key.iter().any(|&b| b != 0)
                {
                    sa.key_digest = Some(key_digest(key));
                }
            }
            _ => {}
        }
    }
    sa.set_mark = set_mark.0.map(|v| (v, set_mark.1));
    Some(sa)
}

/// Parse the payload of a `NEWPOLICY` message.
pub fn parse_policy(payload: &[u8]) -> Option<PolicyInfo> {
    if payload.len() < USERPOLICY_INFO_LEN {
        return None;
    }
    let mut p = PolicyInfo {
        priority: u32_at(payload, 152),
        dir: payload[160],
        action: payload[161],
        ..Default::default()
    };
    for (kind, value) in attrs(&payload[USERPOLICY_INFO_LEN..]) {
        match kind {
            XFRMA_IF_ID if value.len() >= 4 => p.if_id = u32_at(value, 0),
            XFRMA_MARK if value.len() >= 8 => p.mark = (u32_at(value, 0), u32_at(value, 4)),
            XFRMA_TMPL if value.len() >= USER_TMPL_LEN => {
                p.tmpl_dst = Some(ipv4_at(value, 0));
                p.tmpl_reqid = u32_at(value, 44);
            }
            _ => {}
        }
    }
    Some(p)
}

/// An `XFRM_MSG_EXPIRE` event: an SA reached a soft or hard limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expire {
    pub sa: SaInfo,
    /// Hard: the kernel deleted the SA. Soft: it still works, replace it.
    pub hard: bool,
}

/// Parse the payload of an `XFRM_MSG_EXPIRE` event.
pub fn parse_expire(payload: &[u8]) -> Option<Expire> {
    if payload.len() < USER_EXPIRE_LEN {
        return None;
    }
    // The state, `hard`, then the state's attributes (marks, if_id).
    let sa = parse_sa_with_attrs(payload, USER_EXPIRE_LEN)?;
    Some(Expire {
        sa,
        hard: payload[USERSA_INFO_LEN] != 0,
    })
}

/// A `XFRM_MSG_MAPPING` event: the peer behind NAT moved (`xfrm_user_mapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub dst: Ipv4Addr,
    pub spi: u32,
    pub reqid: u32,
    pub old_addr: Ipv4Addr,
    pub new_addr: Ipv4Addr,
    pub old_port: u16,
    pub new_port: u16,
}

/// Parse the payload of an `XFRM_MSG_MAPPING` event.
pub fn parse_mapping(payload: &[u8]) -> Option<Mapping> {
    // xfrm_user_mapping: xfrm_usersa_id id (24), reqid u32, old_saddr (16),
    // new_saddr (16), old_sport be16, new_sport be16.
    if payload.len() < 24 + 4 + 32 + 4 {
        return None;
    }
    Some(Mapping {
        dst: ipv4_at(payload, 0),
        spi: u32::from_be_bytes(payload[16..20].try_into().ok()?),
        reqid: u32_at(payload, 24),
        old_addr: ipv4_at(payload, 28),
        new_addr: ipv4_at(payload, 44),
        old_port: u16::from_be_bytes([payload[60], payload[61]]),
        new_port: u16::from_be_bytes([payload[62], payload[63]]),
    })
}

#[cfg(test)]
mod tests;
