//! The edge node's CNI configuration: the standard `bridge` plugin on the pod
//! bridge with `host-local` IPAM over the node's pod CIDR. The plugins come
//! from containernetworking-plugins (Debian ships 1.1.1).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

/// Sorts before most CNIs' own files (the kubelet uses the first by name).
pub const CNI_FILE_NAME: &str = "10-fabedge.conflist";
/// 0.4.0 rather than 1.0.0: every plugin release since 2019 and the
/// container runtimes still found on edge devices understand it.
pub const CNI_VERSION: &str = "0.4.0";
/// The network's name, as runtimes log it.
const NETWORK_NAME: &str = "fabedge";

/// The pods' gateway: the first host address of the pod CIDR.
pub fn gateway(pod_cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(pod_cidr.network()).saturating_add(1))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfList<'a> {
    cni_version: &'a str,
    name: &'a str,
    plugins: [BridgePlugin<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BridgePlugin<'a> {
    #[serde(rename = "type")]
    plugin_type: &'a str,
    bridge: &'a str,
    /// The bridge holds the gateway address and is the pods' default route.
    is_gateway: bool,
    /// No masquerade: pod addresses stay visible across the tunnels.
    ip_masq: bool,
    /// Lets a pod reach itself through a Service.
    hairpin_mode: bool,
    /// Pod interfaces get the tunnel MTU, so pods never send what the tunnel cannot carry.
    mtu: u16,
    ipam: HostLocalIpam<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HostLocalIpam<'a> {
    #[serde(rename = "type")]
    plugin_type: &'a str,
    ranges: [[IpamRange; 1]; 1],
    routes: [IpamRoute; 1],
}

#[derive(Serialize)]
struct IpamRange {
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
}

#[derive(Serialize)]
struct IpamRoute {
    dst: Ipv4Net,
}

/// The conflist JSON (pretty-printed, trailing newline).
pub fn conflist(bridge: &str, pod_cidr: Ipv4Net, gateway: Ipv4Addr, mtu: u16) -> String {
    let conf = ConfList {
        cni_version: CNI_VERSION,
        name: NETWORK_NAME,
        plugins: [BridgePlugin {
            plugin_type: "bridge",
            bridge,
            is_gateway: true,
            ip_masq: false,
            hairpin_mode: true,
            mtu,
            ipam: HostLocalIpam {
                plugin_type: "host-local",
                ranges: [[IpamRange {
                    subnet: pod_cidr,
                    gateway,
                }]],
                routes: [IpamRoute {
                    dst: Ipv4Net::default(),
                }],
            },
        }],
    };
    let mut json = serde_json::to_string_pretty(&conf)
        .expect("strings, numbers and booleans always serialise");
    json.push('\n');
    json
}
