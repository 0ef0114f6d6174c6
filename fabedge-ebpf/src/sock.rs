//! Socket-level Service translation for hostNetwork clients (cgroup v2
//! `sock_addr` hooks, Cilium's "socket LB"). A node's own sockets never pass
//! `br-fabedge`, so instead of rewriting packets the destination is
//! rewritten once, when the socket connects (TCP, connected UDP) or sends
//! (unconnected UDP); the kernel then routes to the backend like any other
//! pod address. `recvmsg4` and `getpeername4` show the Service address back
//! to the application, from `FE_SOCK_REVNAT`, keyed by socket cookie.
//!
//! Every program returns 1 (proceed) except for a Service without
//! endpoints, where connect and sendmsg fail at once (EPERM), the socket
//! counterpart of the RST / port unreachable the packet path answers with.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use fabedge_common::services::{BackendKey, ServiceKey, SockRevEntry, SockRevKey};

use crate::maps::{FE_BACKENDS, FE_SERVICES, FE_SOCK_REVNAT};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn fe_sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn fe_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn fe_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn fe_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx)
}

/// The destination the application named, if it is a Service frontend:
/// replaced by a backend, remembered for the way back.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (addr, port, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_ip4.to_ne_bytes(),
            u16::from_be(sa.user_port as u16),
            sa.protocol as u8,
        )
    };
    let key = ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: read-only copy.
    let Some(service) = (unsafe { FE_SERVICES.get(&key) }).copied() else {
        return ALLOW;
    };
    if service.count == 0 {
        return REJECT;
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % service.count as u32;
    // SAFETY: read-only copy.
    let Some(backend) = (unsafe {
        FE_BACKENDS.get(&BackendKey {
            service_id: service.id,
            slot,
        })
    })
    .copied() else {
        return ALLOW;
    };
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let rev_key = SockRevKey {
        cookie,
        backend: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let _ = FE_SOCK_REVNAT.insert(
        &rev_key,
        &SockRevEntry {
            addr,
            port,
            _pad: 0,
        },
        0,
    );
    // SAFETY: the context fields are writable in these hooks.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(backend.addr);
        (*ctx.sock_addr).user_port = (backend.port.to_be()) as u32;
    }
    ALLOW
}

/// A peer address that is a backend this socket was translated to: shown
/// as the Service it stands for.
#[inline(always)]
fn to_service(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (addr, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4.to_ne_bytes(), u16::from_be(sa.user_port as u16))
    };
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    // SAFETY: read-only copy.
    if let Some(service) = (unsafe {
        FE_SOCK_REVNAT.get(&SockRevKey {
            cookie,
            backend: addr,
            port,
            _pad: 0,
        })
    })
    .copied()
    {
        // SAFETY: the context fields are writable in these hooks.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(service.addr);
            (*ctx.sock_addr).user_port = (service.port.to_be()) as u32;
        }
    }
    ALLOW
}
