//! `fe_from_pod`: TC ingress of `br-fabedge`, where traffic from an edge
//! node's pods enters the host. Pod-to-pod traffic on the bridge does not
//! pass here: a pod sending as another pod of its node is caught earlier,
//! on its own bridge port (`fe_pod_port`).

use aya_ebpf::{macros::classifier, programs::TcContext};
use fabedge_common::Counter;

use crate::{
    forward::forward,
    lb::{self, Verdict},
    maps::{config, route},
    parse::{self, L3},
    trust::is_pod_source,
    verdict::{drop, pass},
};

#[classifier]
pub fn fe_from_pod(ctx: TcContext) -> i32 {
    let Some(cfg) = config() else {
        return pass(Counter::NotConfigured);
    };
    match parse::ipv4(&ctx) {
        L3::Other => pass(Counter::PassNonIpv4),
        L3::Malformed => drop(Counter::DropMalformed),
        L3::Ipv4(ip) => {
            // A pod speaks only from its node's pod CIDR: never as the node,
            // another site or a stranger (checked before any translation).
            if !is_pod_source(ip.saddr) {
                return drop(Counter::DropPodSource);
            }
            // Service translation first: the route is the backend's (or,
            // for a local backend's reply, the client's), not the ClusterIP's.
            let ip = match lb::from_pod(&ctx, ip) {
                Verdict::Untouched => ip,
                Verdict::Done(action) => return action,
                Verdict::Translated => match parse::ipv4(&ctx) {
                    L3::Ipv4(ip) => ip,
                    _ => return drop(Counter::DropMalformed),
                },
            };
            match route(ip.daddr) {
                Some(r) => forward(&ctx, cfg, &r, ip),
                None => drop(Counter::DropNoRoute),
            }
        }
    }
}
