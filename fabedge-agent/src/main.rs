use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fabedge_agent::{
    apply,
    datapath::{self, AttachMode, Attachment, Datapath, PinLayout, XdpMode},
    inspect,
    model::Role,
    plan::{self, Settings, TunnelMode},
    run::{self, RunOptions},
};
use fabedge_common::{
    DEFAULT_FLANNEL_PORT, DEFAULT_FLANNEL_VNI, DEFAULT_TUNNEL_PORT, DEFAULT_TUNNEL_VNI, POD_BRIDGE,
};
use ipnet::Ipv4Net;
use log::info;

#[derive(Parser)]
#[command(
    name = "fabedge-agent",
    version,
    about = "fabedge node agent: eBPF forwarding plane for edge Kubernetes"
)]
struct Cli {
    /// Root of our bpffs state; pins go under <ROOT>/v<layout version>/.
    #[arg(long, global = true, default_value = datapath::DEFAULT_BPFFS_ROOT, env = "FABEDGE_BPFFS_ROOT")]
    bpffs_root: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
// Parsed once at start; boxing `RunArgs` would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run the agent: keep this node's datapath equal to the cluster's plan.
    Run(RunArgs),
    /// Load the datapath, adopt its pinned maps and attach programs, then exit
    /// (the programs stay attached through pinned links / tc filters).
    Attach {
        /// PROGRAM=IFACE, e.g. from-pod=br-fabedge (repeatable).
        #[arg(long = "attach", required = true)]
        attachments: Vec<Attachment>,
        #[arg(long, value_enum, default_value = "auto")]
        attach_mode: AttachMode,
        /// Also put fe_xdp_uplink on IFACE (repeatable); XDP elsewhere is removed.
        #[arg(long = "xdp-iface", value_name = "IFACE")]
        xdp_ifaces: Vec<String>,
        /// How the XDP program is attached (with --xdp-iface).
        #[arg(long, value_enum, default_value = "native")]
        xdp: XdpMode,
    },
    /// Remove every program, link, filter, map pin, route, device and CNI file fabedge created.
    Uninstall {
        #[arg(long, default_value = plan::DEFAULT_CNI_CONF_DIR)]
        cni_conf_dir: PathBuf,
        /// The agent's state dir: the sysctls it changed are restored from it.
        #[arg(long, default_value = "/var/lib/fabedge")]
        state_dir: PathBuf,
        /// Also remove the agent's state files (peer ids, NAT endpoints, key
        /// generations, the node key: the node gets a new identity).
        #[arg(long)]
        purge_state: bool,
    },
    /// ESP mode: start a new key generation now (make-before-break). The
    /// running agent picks the request up within its poll interval.
    RotateKey {
        #[arg(long, default_value = "/var/lib/fabedge")]
        state_dir: PathBuf,
    },
    /// Show what the datapath holds (reads pinned maps; the agent need not run).
    Inspect {
        #[arg(value_enum)]
        what: inspect::What,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The agent's state dir (`inspect tunnels` names peers from it).
        #[arg(long, default_value = "/var/lib/fabedge")]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// This node's name (the Node object).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Standalone mode: a file of Kubernetes manifests (Nodes, Communities,
    /// Services, EndpointSlices). Changes are picked up live.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Plan as this role whatever the node's labels say.
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// How traffic between sites is carried. ESP (the default) encrypts it
    /// and crosses NAT; `vxlan` is plaintext, for trusted underlays and for
    /// kernels without ESP.
    #[arg(long, value_enum, default_value = "esp")]
    tunnel: TunnelMode,
    #[arg(long, default_value_t = DEFAULT_TUNNEL_PORT)]
    tunnel_port: u16,
    #[arg(long, default_value_t = DEFAULT_TUNNEL_VNI)]
    tunnel_vni: u32,
    #[arg(long, default_value_t = DEFAULT_FLANNEL_VNI)]
    flannel_vni: u32,
    #[arg(long, default_value_t = DEFAULT_FLANNEL_PORT)]
    flannel_port: u16,
    /// Flannel's VXLAN device (its MAC is what the connector advertises).
    #[arg(long, default_value = "flannel.1")]
    flannel_iface: String,
    /// The underlay NIC (the connector: the one Flannel uses); its MTU sizes the tunnel.
    #[arg(long)]
    uplink: Option<String>,
    #[arg(long, default_value_t = plan::DEFAULT_SERVICE_CIDR)]
    service_cidr: Ipv4Net,
    #[arg(long, default_value = plan::DEFAULT_CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
    /// Edge: hand pod traffic for destinations outside the cluster to the node's
    /// routing (default: drop and count it).
    #[arg(long)]
    pod_egress_via_node: bool,
    /// Edge: a prefix routed through the connectors as a whole (repeat it:
    /// the cluster's pod CIDR, the cloud and edge node networks; none may
    /// hold a connector's tunnel endpoint). In kube mode with `--tunnel
    /// vxlan` the edge then watches only its own Node, the connectors and
    /// its community peers, not every Node of the cluster.
    #[arg(long, value_name = "CIDR")]
    cluster_prefix: Vec<Ipv4Net>,
    /// VXLAN mode: no redirect fast path; tunnel traffic goes through the
    /// kernel's forwarding into `fe-tunnel` (for debugging; slower).
    #[arg(long)]
    no_fast_path: bool,
    /// VXLAN mode: the fast path hands packets to `fe-tunnel`, whose egress
    /// program sets a tunnel key per packet, instead of encapsulating them
    /// itself and sending them to the uplink (for comparison; slower).
    #[arg(long)]
    tunnel_key_egress: bool,
    /// VXLAN mode, edges: XDP on the uplink delivers our tunnel's frames for
    /// local pods straight into their veths (turning GRO on for each pod's
    /// interface); what it cannot deliver takes the kernel's path as without.
    #[arg(long)]
    xdp_pod_rx: bool,
    #[arg(long, value_enum, default_value = "auto")]
    attach_mode: AttachMode,
    /// XDP on the uplinks (`fe_xdp_uplink`: tunnel guard everywhere, the
    /// connector's Flannel masquerade in VXLAN mode). `native` falls back to
    /// `generic` (logged) where the driver has no XDP; `off` removes it.
    #[arg(long, value_enum, default_value = "native")]
    xdp: XdpMode,
    #[arg(long, default_value = "/var/lib/fabedge")]
    state_dir: PathBuf,
    /// The reconcile loop's tick: restoring removed routes, guarding new
    /// pods' ports, and checking the manifest file's stamp when inotify is
    /// unavailable (with it, a change to the file is seen at once).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// A change that would remove every tunnel of this node, or more than
    /// half of its routes (a lost connector label, a truncated source), is
    /// held back this long, loudly, before it applies; 0 applies at once.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    hold_drastic_changes: Duration,
    /// Kube mode: this kubeconfig instead of the pod's service account
    /// (without either, $KUBECONFIG or ~/.kube/config outside a pod).
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Kube mode: the agent's namespace (its connector Lease; Events about Nodes go to `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Kube mode: the Lease connectors elect their leader with.
    #[arg(long, default_value = fabedge_agent::connector::leader::DEFAULT_LEASE_NAME)]
    lease_name: String,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    lease_renew_interval: Duration,
    /// Kube mode, leading connector: allocate edge pod CIDRs (annotation
    /// fabedge.io/pod-cidr) from this pool for edge Nodes without spec.podCIDR.
    #[arg(long)]
    edge_pod_cidr_pool: Option<Ipv4Net>,
    /// Prefix length of each edge node's block of the pool.
    #[arg(long, default_value_t = 24)]
    edge_pod_cidr_size: u8,
    /// Capacity of the Service conntrack table (LRU; two entries per flow).
    /// Default: the pinned table's size on a node that has one, else 131072.
    /// Another size than the pinned one needs `uninstall` first.
    #[arg(long)]
    ct_entries: Option<u32>,
    /// Capacity of the route map FE_ROUTES (prefixes). A plan with more is
    /// refused whole. Default: the pinned map's size on a node that has
    /// one, else 16384. Another size than the pinned one needs `uninstall` first.
    #[arg(long)]
    max_routes: Option<u32>,
    /// Capacity of FE_SERVICES (ClusterIP:port frontends). Services beyond it
    /// are left out and listed by `inspect problems`. Default: the pinned
    /// map's size on a node that has one, else 32768. Another size than the
    /// pinned one needs `uninstall` first.
    #[arg(long)]
    max_services: Option<u32>,
    /// Capacity of FE_BACKENDS (backend slots over all Services). Default:
    /// the pinned map's size on a node that has one, else 131072 (10 k
    /// Services of 10 endpoints). Another size than the pinned one needs
    /// `uninstall` first.
    #[arg(long)]
    max_backends: Option<u32>,
    /// Edge: cgroup v2 directory whose sockets reach ClusterIPs through
    /// socket-level translation (hostNetwork pods, the node's processes).
    /// Default: the host's cgroup2 mount, found in /proc/self/mountinfo.
    #[arg(long, conflicts_with = "no_cgroup")]
    cgroup: Option<PathBuf>,
    /// Leave hostNetwork clients without Service translation (no cgroup programs).
    #[arg(long)]
    no_cgroup: bool,
    /// ESP mode: edge nodes send a NAT keepalive to each peer this often.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    keepalive_interval: Duration,
    /// ESP mode: rotate keys this often (0: only on `fabedge-agent rotate-key`).
    #[arg(long, default_value = "86400s", value_parser = parse_duration)]
    key_rotation_interval: Duration,
    /// ESP mode: SAs of a former key generation are removed after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    rotation_grace: Duration,
    /// ESP mode, a connector behind a port forward: the public ADDRESS:PORT
    /// that reaches this node's UDP 4500. Published as annotation
    /// `fabedge.io/esp-endpoint`; peers send their ESP in UDP and keepalives there.
    #[arg(long, value_name = "ADDRESS:PORT")]
    esp_public_endpoint: Option<std::net::SocketAddrV4>,
    /// Serve Prometheus metrics on http://ADDRESS:PORT/metrics, liveness on
    /// /healthz and readiness (a plan applied) on /readyz. Off by default;
    /// `deploy/` uses port 9476 on the node's address.
    #[arg(long, value_name = "ADDRESS:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// UDP port of the connectors' liveness probes (answered by their
    /// datapath). Every node of a cluster must use the same.
    #[arg(long, default_value_t = fabedge_common::DEFAULT_PROBE_PORT)]
    probe_port: u16,
    /// Edges and connectors probe the connectors this often.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    probe_interval: Duration,
    /// A connector that misses this many probes in a row is dead: its edges
    /// move to the next connector, its successor takes its VTEP address.
    #[arg(long, default_value_t = 3)]
    probe_misses: u32,
    /// A connector that answers again takes its edges and its VTEP address
    /// back only after answering for this long (no flapping).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold_down: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{text:?}: unit must be ms or s")),
    }
}

/// kube-client logs every failed request at error level; while an edge node
/// is offline that is one line per retry. The source says it once instead.
const DEFAULT_LOG_FILTER: &str = "info,kube_client::client::builder=off";

fn main() -> Result<()> {
    // Printing into a closed pipe (`inspect | head`) should end quietly.
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    fabedge_agent::sys::tune_allocator();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER))
        .init();
    let cli = Cli::parse();
    let layout = PinLayout::new(&cli.bpffs_root);
    match cli.command {
        Cmd::Run(args) => {
            let kube = match args.manifests {
                Some(_) => None,
                None => Some(run::KubeOptions {
                    connection: match args.kubeconfig {
                        Some(path) => fabedge_agent::source::kube::Connection::Kubeconfig(path),
                        None => fabedge_agent::source::kube::Connection::Infer,
                    },
                    namespace: args.namespace.unwrap_or_else(run::default_namespace),
                    lease_name: args.lease_name,
                    lease_duration: args.lease_duration,
                    renew_interval: args.lease_renew_interval,
                    pod_cidr_pool: args
                        .edge_pod_cidr_pool
                        .map(|pool| {
                            fabedge_agent::connector::ipam::Pool::new(pool, args.edge_pod_cidr_size)
                        })
                        .transpose()?,
                }),
            };
            if args.lease_renew_interval >= args.lease_duration {
                bail!("--lease-renew-interval must be shorter than --lease-duration");
            }
            let manifests = args.manifests.unwrap_or_default();
            let settings = Settings {
                role_override: args.role,
                tunnel_mode: args.tunnel,
                tunnel_port: args.tunnel_port,
                tunnel_vni: args.tunnel_vni,
                flannel_vni: args.flannel_vni,
                flannel_port: args.flannel_port,
                uplink: args.uplink,
                service_cidr: args.service_cidr,
                cni_conf_dir: args.cni_conf_dir,
                pod_bridge: POD_BRIDGE.to_owned(),
                pod_egress_via_node: args.pod_egress_via_node,
                no_fast_path: args.no_fast_path,
                tunnel_key_egress: args.tunnel_key_egress,
                xdp_pod_rx: args.xdp_pod_rx,
                esp_public_endpoint: args.esp_public_endpoint,
                probe_port: args.probe_port,
                cluster_prefixes: args.cluster_prefix,
                capacity: fabedge_agent::maps::Capacity::from_flags(
                    &layout,
                    fabedge_agent::maps::CapacityFlags {
                        routes: args.max_routes,
                        services: args.max_services,
                        backends: args.max_backends,
                        ct_entries: args.ct_entries,
                    },
                ),
                ..Settings::default()
            };
            // Before anything is created: sizes the host cannot hold leave no trace.
            settings.capacity.check_host()?;
            if args.keepalive_interval.is_zero() {
                bail!(
                    "--keepalive-interval must be above 0: edges behind NAT keep their mapping open with keepalives"
                );
            }
            if args.probe_port == 0 || args.probe_interval.is_zero() || args.probe_misses == 0 {
                bail!(
                    "--probe-port, --probe-interval and --probe-misses must be above 0: connectors are found dead by their probes"
                );
            }
            if args.esp_public_endpoint.is_some() && settings.tunnel_mode != TunnelMode::Esp {
                bail!("--esp-public-endpoint is for the ESP mode: add --tunnel esp, or drop it");
            }
            if settings.tunnel_mode == TunnelMode::Esp {
                // Before anything is created: a kernel without ESP leaves no trace.
                fabedge_agent::esp::xfrm::probe::check()?;
            }
            let options = RunOptions {
                node: args.node,
                manifests,
                kube,
                settings,
                flannel_iface: args.flannel_iface,
                layout,
                attach_mode: args.attach_mode,
                xdp: args.xdp,
                state_dir: args.state_dir,
                poll_interval: args.poll_interval,
                hold_drastic_changes: args.hold_drastic_changes,
                ha: run::HaOptions {
                    probe_interval: args.probe_interval,
                    probe_misses: args.probe_misses,
                    hold_down: args.hold_down,
                },
                cgroup: match (args.no_cgroup, args.cgroup) {
                    (true, _) => None,
                    (false, Some(cgroup)) => Some(cgroup),
                    (false, None) => Some(fabedge_agent::sys::cgroup2_mount().context(
                        "no cgroup2 mount in /proc/self/mountinfo: pass --cgroup DIR (a cgroup v2 directory) \
                         or --no-cgroup to leave hostNetwork clients without Service translation",
                    )?),
                },
                esp: (args.tunnel == TunnelMode::Esp).then(|| fabedge_agent::esp::run::EspOptions {
                    rotation_interval: (!args.key_rotation_interval.is_zero()).then_some(args.key_rotation_interval),
                    grace: args.rotation_grace,
                    keepalive: args.keepalive_interval,
                }),
                metrics_addr: args.metrics_addr,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run::run(options))
        }
        Cmd::Attach {
            attachments,
            attach_mode,
            xdp_ifaces,
            xdp,
        } => {
            let mut dp = Datapath::load(layout, attach_mode)?;
            for attachment in &attachments {
                dp.attach(attachment)?;
            }
            if !xdp_ifaces.is_empty() {
                dp.sync_xdp(&xdp_ifaces.into_iter().collect(), xdp)?;
            }
            info!(
                "attached {} program(s) in {:?} mode",
                attachments.len(),
                dp.attach_mode()
            );
            Ok(())
        }
        Cmd::Uninstall {
            cni_conf_dir,
            state_dir,
            purge_state,
        } => {
            for removed in apply::teardown(&cni_conf_dir)? {
                info!("removed {removed}");
            }
            for restored in apply::sysctl::restore(&state_dir)? {
                info!("{restored}");
            }
            if purge_state {
                for removed in apply::purge_state(&state_dir)? {
                    info!("removed {removed}");
                }
            }
            let report = datapath::uninstall(&cli.bpffs_root)?;
            info!(
                "removed {} link(s), {} netlink filter(s), {} map pin(s)",
                report.links.len(),
                report.netlink_filters.len(),
                report.maps.len()
            );
            Ok(())
        }
        Cmd::RotateKey { state_dir } => {
            let path = fabedge_agent::esp::run::request_rotation(&state_dir)?;
            info!(
                "rotation requested ({}); the running agent starts a new key generation",
                path.display()
            );
            Ok(())
        }
        Cmd::Inspect {
            what,
            json,
            state_dir,
        } => {
            let _ = inspect::STATE_DIR.set(state_dir);
            inspect::run(&layout, what, json)
        }
    }
}
