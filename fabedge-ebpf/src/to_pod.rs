//! `fe_to_pod`: TC egress of `br-fabedge`. Packets the kernel routes to the
//! node's pods pass here (bridged pod-to-pod traffic does not): replies of
//! remote Service backends get the Service address back as their source.
//! Everything else passes untouched and uncounted.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::{
    lb::{self, Verdict},
    maps::config,
    parse::{self, L3},
};

#[classifier]
pub fn fe_to_pod(ctx: TcContext) -> i32 {
    if config().is_none() {
        return TC_ACT_OK as i32;
    }
    let L3::Ipv4(ip) = parse::ipv4(&ctx) else {
        return TC_ACT_OK as i32;
    };
    match lb::to_pod(&ctx, ip) {
        Verdict::Done(action) => action,
        Verdict::Untouched | Verdict::Translated => TC_ACT_OK as i32,
    }
}
