//! `fe_uplink_egress`: TC egress of the uplinks of edges and the connector,
//! the last hook before the wire. Fail closed: a packet for a tunnel
//! destination that reaches it has bypassed the tunnel (its kernel route
//! deleted or not installed yet, a host socket bound to the uplink), and
//! would leave in clear; it is dropped and counted. Our own encapsulations
//! are addressed to peer underlay addresses, which are never tunnel
//! destinations, and pass, as does everything else, untouched and uncounted.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use fabedge_common::Counter;

use crate::{
    parse::{self, L3},
    trust::is_tunnel_address,
    verdict::drop,
};

/// Not waiting for the configuration: a tunnel route in `FE_ROUTES` is
/// ours whether or not the rest is written yet.
#[classifier]
pub fn fe_uplink_egress(ctx: TcContext) -> i32 {
    match parse::ipv4(&ctx) {
        L3::Ipv4(ip) if is_tunnel_address(ip.daddr) => drop(Counter::DropOutsideTunnel),
        _ => TC_ACT_OK as i32,
    }
}
