//! ClusterIP translation (Cilium's `lb.h` is the reference design): a packet
//! from a pod to a Service frontend is balanced to a backend and
//! destination-NATed; conntrack remembers the choice and how to undo it.
//!
//! Where replies are reverse-translated:
//! - remote backend: the reply comes back through the tunnel and is routed
//!   into the pod bridge, where `fe_to_pod` (TC egress) rewrites its source;
//! - local backend (and hairpin, client == backend): pods on one bridge talk
//!   port to port, past every hook of ours, so the client is also
//!   source-NATed (kube-proxy's hairpin masquerade, for every local
//!   backend). The source it gets is the ClusterIP itself, not the bridge
//!   address kube-proxy uses: the kernel drops a packet arriving with one
//!   of its own addresses as source (martian), while the ClusterIP is
//!   routable (the Service CIDR route) and off the pod subnet, so the
//!   backend's reply goes to the gateway, enters `fe_from_pod` and is
//!   reverse-translated before the route lookup. (Cilium's answer is a
//!   dedicated loopback address, 169.254.42.1; the ClusterIP needs no
//!   address plan and tells the backend which Service it serves.)

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use fabedge_common::{
    Counter,
    services::{
        AffinityEntry, AffinityKey, Backend, BackendKey, CtEntry, CtKey, ServiceEntry, ServiceKey,
        backend_flags, ct_flags, service_flags,
    },
};

use crate::{
    conntrack::{self, Tuple},
    maps::{FE_AFFINITY, FE_BACKENDS, FE_SERVICES},
    nat::{self, End, IPPROTO_ICMP, IPPROTO_TCP, L4_OFF},
    parse::{IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr, ptr_at},
    reject,
    stats::count,
};

/// What translation did with a packet.
pub enum Verdict {
    /// Not a Service flow: carry on as if we were not here.
    Untouched,
    /// Rewritten: re-parse the headers and route the new destination.
    Translated,
    /// Finished here (dropped, rejected): return this TC verdict.
    Done(i32),
}

/// Random source ports tried for a local backend when the client's own
/// port is taken at the ClusterIP.
const SNAT_PORT_TRIES: u32 = 3;
const SNAT_PORT_MIN: u32 = 32_768;
const SNAT_PORT_SPAN: u32 = 28_232;

/// The packet's five-tuple and TCP flags, if it is TCP or UDP with a plain
/// 20-byte IPv4 header and not a fragment. `Err(())`: a TCP/UDP packet we
/// cannot translate (options, fragment, truncated).
#[inline(always)]
pub fn tuple(ctx: &TcContext, ip: &Ipv4Hdr) -> Option<Result<(Tuple, u8), ()>> {
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return None;
    }
    let frag = u16::from_be_bytes(ip.frag_off) & 0x3fff;
    if ip.header_len() != IPV4_HLEN || frag != 0 {
        return Some(Err(()));
    }
    // The L4 header must lie inside the packet, not in Ethernet padding
    // after it: its checksum covers only the packet.
    let l4_hlen = if ip.protocol == IPPROTO_TCP { 20 } else { 8 };
    if (ip.total_len() as usize) < IPV4_HLEN + l4_hlen {
        return Some(Err(()));
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, L4_OFF) else {
        return Some(Err(()));
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    let mut tcp_flags = 0;
    if ip.protocol == IPPROTO_TCP {
        match ptr_at::<u8>(ctx, L4_OFF + 13) {
            // SAFETY: bounds checked by ptr_at.
            Some(flags) => tcp_flags = unsafe { *flags },
            None => return Some(Err(())),
        }
    }
    Some(Ok((
        Tuple {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto: ip.protocol,
        },
        tcp_flags,
    )))
}

/// `fe_from_pod`: translate a packet of a Service flow (new or known), or a
/// reply of a local backend addressed to the ClusterIP.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, ip: &Ipv4Hdr) -> Verdict {
    if ip.protocol == IPPROTO_ICMP {
        return icmp_error(ctx, ip);
    }
    let (t, tcp_flags) = match tuple(ctx, ip) {
        None => return Verdict::Untouched,
        Some(Ok(found)) => found,
        // Options, fragments, truncated: not translated (see `nat`).
        Some(Err(())) => return Verdict::Untouched,
    };
    if let Some(entry) = conntrack::lookup(&t, tcp_flags) {
        return apply(ctx, &t, &entry);
    }
    let svc_key = ServiceKey {
        addr: t.daddr,
        port: t.dport,
        proto: t.proto,
        _pad: 0,
    };
    // SAFETY: read-only copy of a map value the agent replaces atomically.
    let Some(service) = (unsafe { FE_SERVICES.get(&svc_key) }).copied() else {
        return Verdict::Untouched;
    };
    if service.count == 0 {
        return Verdict::Done(reject::reject(ctx, &t, tcp_flags));
    }
    new_flow(ctx, &t, &service)
}

/// `fe_to_pod`: the reply of a remote backend on its way to a local client.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, ip: &Ipv4Hdr) -> Verdict {
    if ip.protocol == IPPROTO_ICMP {
        return icmp_error(ctx, ip);
    }
    let Some(Ok((t, tcp_flags))) = tuple(ctx, ip) else {
        return Verdict::Untouched;
    };
    match conntrack::lookup(&t, tcp_flags) {
        Some(entry) if entry.flags & ct_flags::REPLY != 0 => apply(ctx, &t, &entry),
        _ => Verdict::Untouched,
    }
}

#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &Ipv4Hdr) -> Verdict {
    match crate::icmp::translate_error(ctx, ip) {
        Ok(true) => {
            count(Counter::ServiceTranslated);
            Verdict::Translated
        }
        Ok(false) => Verdict::Untouched,
        Err(()) => Verdict::Done(crate::verdict::drop(Counter::DropHelperFailed)),
    }
}

/// Translate a packet as its conntrack entry says.
#[inline(always)]
fn apply(ctx: &TcContext, t: &Tuple, entry: &CtEntry) -> Verdict {
    let snat = entry.flags & ct_flags::SNAT != 0;
    let result = if entry.flags & ct_flags::FORWARD != 0 {
        nat::rewrite(
            ctx,
            t.proto,
            End::Destination,
            t.daddr,
            entry.addr,
            t.dport,
            entry.port,
        )
        .and_then(|()| {
            if snat {
                nat::rewrite(
                    ctx,
                    t.proto,
                    End::Source,
                    t.saddr,
                    entry.snat_addr,
                    t.sport,
                    entry.snat_port,
                )
            } else {
                Ok(())
            }
        })
    } else {
        nat::rewrite(
            ctx,
            t.proto,
            End::Source,
            t.saddr,
            entry.addr,
            t.sport,
            entry.port,
        )
        .and_then(|()| {
            if snat {
                nat::rewrite(
                    ctx,
                    t.proto,
                    End::Destination,
                    t.daddr,
                    entry.snat_addr,
                    t.dport,
                    entry.snat_port,
                )
            } else {
                Ok(())
            }
        })
    };
    match result {
        Ok(()) => {
            count(Counter::ServiceTranslated);
            Verdict::Translated
        }
        Err(()) => Verdict::Done(crate::verdict::drop(Counter::DropHelperFailed)),
    }
}

/// A backend for a new flow: the client's sticky one under session
/// affinity, else a random slot (the flow then sticks through conntrack).
#[inline(always)]
fn choose_backend(t: &Tuple, service: &ServiceEntry) -> Option<Backend> {
    let now = conntrack::now_ns();
    let affinity = service.flags & service_flags::AFFINITY != 0;
    let aff_key = AffinityKey {
        client: t.saddr,
        service_id: service.id,
    };
    if affinity {
        // SAFETY: read-only copy.
        if let Some(sticky) = unsafe { FE_AFFINITY.get(&aff_key) }.copied() {
            if now.saturating_sub(sticky.last_seen_ns)
                < service.affinity_timeout as u64 * 1_000_000_000
            {
                let _ = FE_AFFINITY.insert(
                    &aff_key,
                    &AffinityEntry {
                        last_seen_ns: now,
                        backend: sticky.backend,
                    },
                    0,
                );
                return Some(sticky.backend);
            }
        }
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % service.count as u32;
    // SAFETY: read-only copy.
    let backend = unsafe {
        FE_BACKENDS.get(&BackendKey {
            service_id: service.id,
            slot,
        })
    }
    .copied()?;
    if affinity {
        let _ = FE_AFFINITY.insert(
            &aff_key,
            &AffinityEntry {
                last_seen_ns: now,
                backend,
            },
            0,
        );
    }
    Some(backend)
}

#[inline(always)]
fn new_flow(ctx: &TcContext, t: &Tuple, service: &ServiceEntry) -> Verdict {
    let Some(backend) = choose_backend(t, service) else {
        // The agent is between writing the frontend and its backends.
        return Verdict::Done(crate::verdict::drop(Counter::DropNoEndpoints));
    };
    let now = conntrack::now_ns();
    let fwd_key = t.key();
    let mut fwd = CtEntry {
        last_seen_ns: now,
        addr: backend.addr,
        port: backend.port,
        flags: ct_flags::FORWARD,
        proto: t.proto,
        service_id: service.id,
        ..CtEntry::default()
    };
    let mut reply_key = CtKey {
        saddr: backend.addr,
        daddr: t.saddr,
        sport: backend.port,
        dport: t.sport,
        proto: t.proto,
        _pad: [0; 3],
    };
    let mut reply = CtEntry {
        last_seen_ns: now,
        addr: t.daddr,
        port: t.dport,
        flags: ct_flags::REPLY,
        proto: t.proto,
        service_id: service.id,
        ..CtEntry::default()
    };
    if backend.flags & backend_flags::LOCAL != 0 {
        fwd.flags |= ct_flags::SNAT;
        reply.flags |= ct_flags::SNAT;
        fwd.snat_addr = t.daddr;
        reply.snat_addr = t.saddr;
        reply.snat_port = t.sport;
        reply_key.daddr = t.daddr;
        // The client's own port first (what most flows keep), then a few
        // random ones: the reply key must be unique at the ClusterIP.
        let mut port = t.sport;
        let mut claimed = false;
        let mut i = 0;
        while i <= SNAT_PORT_TRIES {
            if i > 0 {
                // SAFETY: plain helper call.
                port = (SNAT_PORT_MIN + unsafe { bpf_get_prandom_u32() } % SNAT_PORT_SPAN) as u16;
            }
            reply_key.dport = port;
            if conntrack::create(&reply_key, &reply).is_ok() {
                claimed = true;
                break;
            }
            i += 1;
        }
        if !claimed {
            return Verdict::Done(crate::verdict::drop(Counter::DropCtFull));
        }
        fwd.snat_port = port;
    } else if conntrack::create(&reply_key, &reply).is_err() {
        // Another client port maps to the same reply tuple only if the
        // client reuses its port toward a second Service on the same
        // backend; the newer flow takes the entry.
        if crate::maps::FE_CT.insert(&reply_key, &reply, 0).is_err() {
            return Verdict::Done(crate::verdict::drop(Counter::DropCtFull));
        }
    }
    if conntrack::create(&fwd_key, &fwd).is_err()
        && crate::maps::FE_CT.insert(&fwd_key, &fwd, 0).is_err()
    {
        conntrack::remove(&reply_key);
        return Verdict::Done(crate::verdict::drop(Counter::DropCtFull));
    }
    count(Counter::ServiceNewFlow);
    apply(ctx, t, &fwd)
}
