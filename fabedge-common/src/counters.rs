//! Per-CPU counters (`FE_COUNTERS`): every verdict the datapath takes that a
//! user may ask about, drop reasons first. The agent's `inspect counters`,
//! the metrics endpoint and the tests read them by these names.

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $value:literal, $name:literal, $drop:literal; )*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Counter {
            $( $(#[$doc])* $variant = $value, )*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[ $( Counter::$variant, )* ];

            /// Stable snake_case name used by the CLI, metrics and tests.
            pub const fn name(self) -> &'static str {
                match self { $( Counter::$variant => $name, )* }
            }

            /// Whether this counter counts dropped packets.
            pub const fn is_drop(self) -> bool {
                match self { $( Counter::$variant => $drop, )* }
            }

            pub const fn from_index(index: u32) -> Option<Counter> {
                match index { $( $value => Some(Counter::$variant), )* _ => None }
            }
        }
    };
}

counters! {
    /// Configuration not written yet: packet passed untouched.
    NotConfigured = 0, "not_configured", false;
    /// Not IPv4 (ARP, IPv6, ...): passed to the kernel untouched.
    PassNonIpv4 = 1, "pass_non_ipv4", false;
    /// Destination on this node (pod or host): passed to the kernel.
    PassLocal = 2, "pass_local", false;
    /// Destination reached by the kernel's own routing.
    PassKernel = 3, "pass_kernel", false;
    /// Sent into the tunnel toward a peer (set in VXLAN metadata or mark for xfrm).
    ToTunnel = 4, "to_tunnel", false;
    /// Received from a tunnel peer and accepted.
    FromTunnel = 5, "from_tunnel", false;
    /// Connector: Flannel VXLAN for an edge destination decapsulated.
    FlannelDecap = 6, "flannel_decap", false;
    /// Connector: tunnel traffic for a cloud pod encapsulated to its Flannel VTEP.
    FlannelEncap = 7, "flannel_encap", false;
    /// TTL would expire here: handed to the kernel, which answers ICMP time-exceeded.
    PuntTtl = 8, "punt_ttl_expired", false;
    /// Too big for the tunnel: handed to the kernel, which answers ICMP
    /// fragmentation-needed (DF) or fragments.
    PuntMtu = 9, "punt_too_big", false;
    /// Flannel VXLAN left to the kernel's flannel.1: not for an edge
    /// destination, or a GSO frame only the kernel decapsulates correctly.
    PassFlannel = 10, "pass_flannel", false;
    /// Fast path: TTL decremented and redirected straight into `fe-tunnel`.
    RedirectToTunnel = 11, "redirect_to_tunnel", false;
    /// XDP (connector uplink): Flannel VXLAN for an edge rewritten in place
    /// into our tunnel and sent back out (XDP_TX / redirect).
    XdpFlannelToTunnel = 12, "xdp_flannel_to_tunnel", false;
    /// XDP (connector uplink): our tunnel's VXLAN for a cloud pod rewritten
    /// in place into Flannel VXLAN to the owning VTEP.
    XdpTunnelToFlannel = 13, "xdp_tunnel_to_flannel", false;
    /// XDP declined tunnel traffic from a known sender (ESP mode, no fast
    /// path, fragment, options, TTL, size, destination): passed unchanged
    /// to the TC programs and the kernel.
    XdpPass = 14, "xdp_pass", false;
    /// XDP could rewrite but the next hop's neighbour (or route) is not
    /// resolved: passed unchanged; the kernel path resolves it.
    XdpPassNoNeighbour = 15, "xdp_pass_no_neighbour", false;
    /// Connector: a liveness probe from a known peer answered in the datapath.
    ProbeAnswered = 16, "probe_answered", false;
    /// Connector: a probe from an address that is no peer, not answered.
    DropProbeUnknownSource = 17, "drop_probe_unknown_source", true;
    /// XDP (edge uplink, `--xdp-pod-rx`): our tunnel's frame for a local pod
    /// decapsulated, TTL decremented and redirected into the pod's veth.
    XdpRedirectToPod = 18, "xdp_redirect_to_pod", false;
    /// XDP (edge uplink, `--xdp-pod-rx`): our tunnel's frame for a local pod
    /// that XDP declined (pod not learned, a Service flow or ICMP error
    /// `fe_to_pod` translates, options, fragment, TTL, size, UDP checksum,
    /// ECN CE...): passed unchanged to `fe-tunnel` and the kernel.
    XdpPassToPod = 19, "xdp_pass_to_pod", false;
    /// A new flow to a ClusterIP was balanced to a backend (conntrack created).
    ServiceNewFlow = 20, "service_new_flow", false;
    /// A packet of a known Service flow was translated (either direction).
    ServiceTranslated = 21, "service_translated", false;
    /// A Service with no endpoints answered a client with TCP RST / ICMP port unreachable.
    ServiceRejected = 22, "service_rejected", false;
    /// Gauge written by the agent, not the datapath: Services left out of
    /// the maps because they would not fit (see the agent's log).
    ServicesNotProgrammed = 23, "services_not_programmed", false;
    /// VXLAN fast path: encapsulated by the forwarding program itself and
    /// redirected to the uplink (`config_flags::TC_ENCAP`), not through
    /// `fe-tunnel`. Counted on top of `redirect_to_tunnel` and `to_tunnel`.
    TunnelEncap = 24, "tunnel_encap", false;
    /// The outer destination's neighbour is not resolved yet: the packet
    /// went into `fe-tunnel` as without `TC_ENCAP` (the kernel resolves it).
    TunnelEncapNoNeighbour = 25, "tunnel_encap_no_neighbour", false;
    /// `TC_ENCAP` could not encapsulate (no usable route to the peer, a
    /// kernel without `BPF_FIB_LOOKUP_SRC`, a GSO kind the kernel will not
    /// grow): the packet went into `fe-tunnel` unchanged.
    TunnelEncapDeclined = 26, "tunnel_encap_declined", false;
    /// XDP on the uplinks: a tunnel frame whose verdict (a masquerade, or a
    /// pass after the guard) came from the verdict cache, its flow's routes,
    /// guard and next hop not looked up again. Counted on top of the
    /// verdict's own counter.
    XdpCached = 27, "xdp_cached", false;

    /// No route for the destination.
    DropNoRoute = 32, "drop_no_route", true;
    /// Truncated or malformed header.
    DropMalformed = 33, "drop_malformed", true;
    /// A route names a peer the peer table does not have.
    DropUnknownPeer = 34, "drop_unknown_peer", true;
    /// Tunnel packet whose outer source is not a known peer, or whose inner
    /// source the sending peer does not own.
    DropSpoofed = 35, "drop_spoofed", true;
    /// A helper (tunnel key, room adjust, redirect) failed.
    DropHelperFailed = 36, "drop_helper_failed", true;
    /// IPv4 fragment (other than the first) or options where we cannot handle them.
    DropUnsupported = 37, "drop_unsupported", true;
    /// Marked for the tunnel but this node runs no tunnel.
    DropNoTunnel = 38, "drop_no_tunnel", true;
    /// XDP guard: tunnel-port traffic (our VXLAN, Flannel's on the
    /// connector, ESP in UDP) from an address that is no peer or VTEP.
    XdpDropUnknownTunnelSource = 39, "xdp_drop_unknown_tunnel_source", true;
    /// XDP guard: a peer's tunnel packet whose inner source is not one of
    /// that peer's prefixes.
    XdpDropSpoofed = 40, "xdp_drop_spoofed", true;
    /// Uplink egress: a packet for a tunnel destination (a remote site's
    /// pods or node address, the Service CIDR on edges) about to leave the
    /// node outside the tunnel, e.g. because its kernel route is missing.
    /// Dropped: it never leaves in clear.
    DropOutsideTunnel = 41, "drop_outside_tunnel", true;
    /// Uplink ingress: a packet in the name of a tunnel source (a remote
    /// site's pods or node address, the Service CIDR on edges) that arrived
    /// outside the tunnel, e.g. forged on the node's LAN.
    DropTunnelSourceOutsideTunnel = 42, "drop_tunnel_source_outside_tunnel", true;
    /// From a pod: a source outside this node's pod CIDR (the node's own
    /// address, another site's pods, anything else).
    DropPodSource = 43, "drop_pod_source", true;
    /// From a tunnel: a destination that is not ours to deliver (no route
    /// of ours, or only an edge's default route), so a peer cannot use this
    /// node as its gateway to the VPC, metadata services or the internet.
    DropTunnelDestination = 44, "drop_tunnel_destination", true;
    /// A pod's port on the pod bridge: IPv4 whose source, or ARP whose
    /// sender address, is not the address of the pod behind that port (a
    /// pod sending as, or claiming the address of, another pod).
    DropPodSpoofed = 45, "drop_pod_spoofed", true;
    /// A Service with no endpoints, where no reject could be built (dropped instead).
    DropNoEndpoints = 48, "drop_no_endpoints", true;
    /// Conntrack (or source-port) space exhausted for a new Service flow.
    DropCtFull = 49, "drop_ct_full", true;
    /// A route through a connector group none of whose members is alive.
    DropGroupDown = 50, "drop_group_down", true;
    /// Connector, ESP mode: a probe from a peer not answered because no
    /// socket holds UDP 4500 (the agent is not running): its ESP would be lost.
    DropProbeNotReady = 51, "drop_probe_not_ready", true;
}

/// Size of the counters array: room for growth without a layout change.
pub const COUNTER_SLOTS: u32 = 64;

const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!((Counter::ALL[i] as u32) < COUNTER_SLOTS);
        i += 1;
    }
};
