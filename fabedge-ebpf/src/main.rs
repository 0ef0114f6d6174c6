//! fabedge kernel programs. One file per attach point holds only entry
//! functions; the concerns they share live in their own modules.
//!
//! | program             | attach point                      | file          |
//! |---------------------|-----------------------------------|---------------|
//! | `fe_from_pod`       | TC ingress of `br-fabedge` (edge) | `from_pod.rs` |
//! | `fe_tunnel_ingress` | TC ingress of `fe-tunnel`         | `tunnel_dev.rs` |
//! | `fe_tunnel_egress`  | TC egress of `fe-tunnel`          | `tunnel_dev.rs` |
//! | `fe_uplink_ingress` | TC ingress of the uplinks         | `uplink.rs`   |
//! | `fe_uplink_egress`  | TC egress of the uplinks          | `uplink_egress.rs` |
//! | `fe_pod_port`       | TC ingress of each pod's veth (edge) | `pod_port.rs` |
//! | `fe_to_pod`         | TC egress of `br-fabedge` (edge)  | `to_pod.rs`   |
//! | `fe_sock_*4`        | cgroup v2 sock_addr hooks (edge)  | `sock.rs`     |
//! | `fe_xdp_uplink`     | XDP on the uplinks (every node)   | `xdp_uplink.rs` |
//! | `fe_xdp_empty`      | XDP, the bench's baseline         | `xdp_uplink.rs` |
//! | `fe_tc_empty`       | TC, the bench's baseline (never attached) | `tc_empty.rs` |
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod encap;
mod fastpath;
mod fib;
mod flannel;
mod forward;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod probe;
mod reject;
mod sock;
mod stats;
mod trust;
mod verdict;
mod xdp_cache;
mod xdp_guard;
mod xdp_masq;
mod xdp_parse;
mod xdp_pod_rx;

mod from_pod;
mod pod_port;
mod tc_empty;
mod to_pod;
mod tunnel_dev;
mod uplink;
mod uplink_egress;
mod xdp_uplink;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs that could get here.
    loop {}
}
