//! The kernel's FIB from the datapath: where an outer packet we build goes
//! (egress device, MACs, and the source address the kernel would pick).
//! Shared by the XDP masquerade (`xdp_masq`) and the TC encapsulation
//! (`encap`); each counts a miss its own way. And whether the kernel keeps
//! a packet to itself rather than forward it (`xdp_pod_rx`).

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
};

use crate::parse::IPPROTO_UDP;

const AF_INET: u8 = 2;

/// Where an outer packet goes.
pub struct NextHop {
    pub ifindex: u32,
    pub src_ip: [u8; 4],
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Why there is no next hop: the kernel resolves both on its slow path.
pub enum Miss {
    /// A route, but no neighbour entry yet.
    NoNeighbour,
    /// No usable route, or a kernel that refuses the lookup (before 6.7,
    /// `BPF_FIB_LOOKUP_SRC`).
    Declined,
}

/// Route UDP to `dst` as if it arrived on `ifindex`. `src`: the source
/// address to use; `None` asks the kernel for the one it would pick.
/// `tot_len` 0 leaves the MTU check to the caller.
///
/// # Safety
/// `ctx` is the program's context pointer (skb or xdp_md).
#[inline(always)]
pub unsafe fn next_hop(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    tot_len: u16,
    dst: [u8; 4],
    src: Option<[u8; 4]>,
) -> Result<NextHop, Miss> {
    // SAFETY: plain-old-data struct, filled below and by the helper.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.ifindex = ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    let flags = match src {
        Some(addr) => {
            params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(addr);
            0
        }
        None => BPF_FIB_LOOKUP_SRC,
    };
    // SAFETY: the caller passes the context; the helper reads and writes `params` only.
    let rc = unsafe {
        fib_lookup(
            ctx,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Err(Miss::NoNeighbour);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(Miss::Declined);
    }
    Ok(NextHop {
        ifindex: params.ifindex,
        // SAFETY: IPv4 lookup: the union holds ipv4_src.
        src_ip: unsafe { params.__bindgen_anon_3.ipv4_src }.to_ne_bytes(),
        src_mac: params.smac,
        dst_mac: params.dmac,
    })
}

/// Whether the kernel delivers a packet to `dst` arriving on `ifindex`
/// locally (a local, broadcast or multicast route) instead of forwarding it.
///
/// # Safety
/// `ctx` is the program's context pointer (skb or xdp_md).
#[inline(always)]
pub unsafe fn is_local(ctx: *mut core::ffi::c_void, ifindex: u32, dst: [u8; 4]) -> bool {
    // SAFETY: plain-old-data struct, filled below and by the helper.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.ifindex = ifindex;
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: the caller passes the context; the helper reads and writes `params` only.
    let rc = unsafe {
        fib_lookup(
            ctx,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64
}
