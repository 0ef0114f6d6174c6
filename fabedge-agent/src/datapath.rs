//! The kernel side's lifecycle: load the embedded object, adopt or pin its
//! maps, attach its programs with no detach window, and remove all of it.
//!
//! Pins live under `<bpffs root>/v<LAYOUT_VERSION>/`:
//! - `maps/<MAP>`: every `FE_*` map, adopted with its contents on restart
//!   after its shape has been checked against this binary's;
//! - `links/<program>@<iface>`: TCX links. A restart swaps the program inside
//!   the pinned link (`BPF_LINK_UPDATE`), so traffic never sees no program.
//!   Kernels without TCX get a netlink `cls_bpf` filter at a fixed priority
//!   and handle instead, replaced in place (`NLM_F_REPLACE`) on restart.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Map, MapData, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use fabedge_common::LAYOUT_VERSION;
use log::{debug, info, warn};

pub mod xdp;
pub mod xdp_epoch;
pub use xdp::XdpMode;

/// The kernel object built by `cargo xtask build-ebpf`.
pub static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fabedge.bpf.o"));

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/fabedge";

/// Netlink (pre-TCX) filters sit at this priority, each program at its own
/// handle (`Program::nl_handle`), so a restart replaces exactly that filter
/// and two programs on one hook never clobber each other.
const NL_PRIORITY: u16 = 0xfe;

/// Every program in the object, by the hook it is written for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Program {
    /// TC ingress of the pod bridge.
    FromPod,
    /// TC ingress of `fe-tunnel`.
    TunnelIngress,
    /// TC egress of `fe-tunnel`.
    TunnelEgress,
    /// TC ingress of the uplinks (edges and the connector).
    UplinkIngress,
    /// TC egress of the pod bridge (reverse NAT of Service replies).
    ToPod,
    /// TC egress of the uplinks: tunnel destinations never leave in clear.
    UplinkEgress,
    /// TC ingress of each pod's host-side veth: a pod sends only as itself.
    /// Attached per pod, outside the plan (`apply::pod_ports`).
    PodPort,
}

impl Program {
    /// New programs go last: a program's netlink handle is its index here.
    pub const ALL: [Program; 7] = [
        Program::FromPod,
        Program::TunnelIngress,
        Program::TunnelEgress,
        Program::UplinkIngress,
        Program::ToPod,
        Program::UplinkEgress,
        Program::PodPort,
    ];

    /// The function name in the object (and the netlink filter's name).
    pub const fn symbol(self) -> &'static str {
        match self {
            Program::FromPod => "fe_from_pod",
            Program::TunnelIngress => "fe_tunnel_ingress",
            Program::TunnelEgress => "fe_tunnel_egress",
            Program::UplinkIngress => "fe_uplink_ingress",
            Program::ToPod => "fe_to_pod",
            Program::UplinkEgress => "fe_uplink_egress",
            Program::PodPort => "fe_pod_port",
        }
    }

    pub const fn cli_name(self) -> &'static str {
        match self {
            Program::FromPod => "from-pod",
            Program::TunnelIngress => "tunnel-ingress",
            Program::TunnelEgress => "tunnel-egress",
            Program::UplinkIngress => "uplink-ingress",
            Program::ToPod => "to-pod",
            Program::UplinkEgress => "uplink-egress",
            Program::PodPort => "pod-port",
        }
    }

    /// Handle of this program's netlink filter: 0xfe01, 0xfe02, ...
    fn nl_handle(self) -> TcHandle {
        let index = Program::ALL
            .iter()
            .position(|p| *p == self)
            .expect("listed in ALL") as u16;
        TcHandle::new(0, 0xfe01 + index)
    }

    fn tc_attach_type(self) -> TcAttachType {
        match self {
            Program::TunnelEgress | Program::ToPod | Program::UplinkEgress => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }
}

/// The cgroup sock_addr programs (hostNetwork clients of Services).
pub const SOCK_PROGRAMS: [&str; 4] = [
    "fe_sock_connect4",
    "fe_sock_sendmsg4",
    "fe_sock_recvmsg4",
    "fe_sock_getpeername4",
];

/// A program on an interface: `from-pod=br-fabedge`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attachment {
    pub program: Program,
    pub iface: String,
}

impl Attachment {
    pub fn new(program: Program, iface: impl Into<String>) -> Self {
        Attachment {
            program,
            iface: iface.into(),
        }
    }
    fn pin_name(&self) -> String {
        format!("{}@{}", self.program.symbol(), self.iface)
    }
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.program.cli_name(), self.iface)
    }
}

impl FromStr for Attachment {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (prog, iface) = s.split_once('=').ok_or_else(|| {
            anyhow!("attachment {s:?} is not PROGRAM=IFACE (e.g. from-pod=br-fabedge)")
        })?;
        let program = Program::ALL
            .into_iter()
            .find(|p| p.cli_name() == prog)
            .ok_or_else(|| {
                let known: Vec<_> = Program::ALL.iter().map(|p| p.cli_name()).collect();
                anyhow!(
                    "attachment {s:?}: unknown program {prog:?}; known: {}",
                    known.join(", ")
                )
            })?;
        if iface.is_empty() || iface.len() > 15 {
            bail!("attachment {s:?}: interface name must be 1..=15 characters");
        }
        Ok(Attachment::new(program, iface))
    }
}

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6+), netlink cls_bpf otherwise.
    Auto,
    Tcx,
    Netlink,
}

impl AttachMode {
    fn resolve(self) -> AttachMode {
        match self {
            AttachMode::Auto
                if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) =>
            {
                AttachMode::Tcx
            }
            AttachMode::Auto => AttachMode::Netlink,
            other => other,
        }
    }
}

/// Where our state lives in bpffs.
#[derive(Clone, Debug)]
pub struct PinLayout {
    bpffs_root: PathBuf,
}

impl PinLayout {
    pub fn new(bpffs_root: impl Into<PathBuf>) -> Self {
        PinLayout {
            bpffs_root: bpffs_root.into(),
        }
    }
    pub fn bpffs_root(&self) -> &Path {
        &self.bpffs_root
    }
    pub fn version_dir(&self) -> PathBuf {
        self.bpffs_root.join(format!("v{LAYOUT_VERSION}"))
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.version_dir().join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.version_dir().join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    fn link(&self, attachment: &Attachment) -> PathBuf {
        self.links_dir().join(attachment.pin_name())
    }
}

/// The loaded object with its maps pinned and programs loaded.
pub struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    mode: AttachMode,
}

/// Names of the maps we pin: every `FE_*` map of the object. Others (aya-log's
/// ring, `.rodata`) live and die with the loaded programs.
fn pinned_map_names(object: &aya_obj::Object) -> BTreeSet<String> {
    object
        .maps
        .keys()
        .filter(|n| n.starts_with("FE_"))
        .cloned()
        .collect()
}

impl Datapath {
    /// Load the object, adopting pinned maps whose shape matches and refusing
    /// any whose shape does not. Nothing is attached yet.
    pub fn load(layout: PinLayout, mode: AttachMode) -> Result<Self> {
        Self::load_with_ct_entries(layout, mode, fabedge_common::services::DEFAULT_CT_ENTRIES)
    }

    /// [`Datapath::load`] with `FE_CT` sized to `ct_entries` (the agent's
    /// `--ct-entries`), the other sized maps at their defaults.
    pub fn load_with_ct_entries(
        layout: PinLayout,
        mode: AttachMode,
        ct_entries: u32,
    ) -> Result<Self> {
        let capacity = crate::maps::Capacity {
            ct_entries,
            ..crate::maps::Capacity::default()
        };
        Self::load_with_capacity(layout, mode, capacity)
    }

    /// [`Datapath::load`] with the sized maps (`FE_ROUTES`, `FE_SERVICES`,
    /// `FE_BACKENDS`, `FE_CT`) sized as `capacity` says (the agent's flags).
    /// Sizes the host cannot hold are refused before anything is created; a
    /// pinned map of another size is refused like any other layout change,
    /// naming the flag: its entries would have to be copied into a new map
    /// while running programs still use the old one, so the operator
    /// chooses (the old size, or `uninstall` and a fresh start).
    pub fn load_with_capacity(
        layout: PinLayout,
        mode: AttachMode,
        capacity: crate::maps::Capacity,
    ) -> Result<Self> {
        capacity.check_host()?;
        crate::sys::ensure_bpffs(layout.bpffs_root())?;
        // Directories this call creates, removed again (if still empty) when
        // loading fails: a failed start leaves nothing behind.
        let created: Vec<PathBuf> = [
            layout.bpffs_root().to_path_buf(),
            layout.version_dir(),
            layout.maps_dir(),
            layout.links_dir(),
        ]
        .into_iter()
        .filter(|dir| !dir.exists())
        .collect();
        for dir in [layout.maps_dir(), layout.links_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
        }
        let adopted: BTreeSet<PathBuf> = read_dir_sorted(&layout.maps_dir())?.into_iter().collect();
        let maps_dir = layout.maps_dir();
        let result = Self::load_into(layout, mode.resolve(), capacity);
        if result.is_err() {
            // Pins aya created before a later step (e.g. the verifier) failed.
            for pin in read_dir_sorted(&maps_dir).unwrap_or_default() {
                if !adopted.contains(&pin) {
                    let _ = fs::remove_file(&pin);
                }
            }
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    fn load_into(
        layout: PinLayout,
        mode: AttachMode,
        capacity: crate::maps::Capacity,
    ) -> Result<Self> {
        let object = aya_obj::Object::parse(OBJECT).context("parsing the embedded eBPF object")?;
        let names = pinned_map_names(&object);
        let sized = capacity.maps();
        for name in &names {
            let size = sized
                .iter()
                .find(|(map, ..)| map == name)
                .map(|&(_, flag, entries, _)| (flag, entries));
            check_pinned_shape(name, &object.maps[name], size, &layout.map(name))?;
        }
        let pin_paths: Vec<(String, PathBuf)> =
            names.iter().map(|n| (n.clone(), layout.map(n))).collect();
        let mut loader = EbpfLoader::new();
        for (map, _, entries, _) in sized {
            loader.map_max_entries(map, entries);
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object into the kernel")?;
        for program in Program::ALL {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(program.symbol())
                .ok_or_else(|| anyhow!("the eBPF object has no program {}", program.symbol()))?
                .try_into()
                .with_context(|| format!("{} is not a TC program", program.symbol()))?;
            prog.load()
                .with_context(|| format!("verifying and loading {}", program.symbol()))?;
        }
        for symbol in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(symbol)
                .ok_or_else(|| anyhow!("the eBPF object has no program {symbol}"))?
                .try_into()
                .with_context(|| format!("{symbol} is not a cgroup sock_addr program"))?;
            prog.load()
                .with_context(|| format!("verifying and loading {symbol}"))?;
        }
        let mut datapath = Datapath { ebpf, layout, mode };
        datapath.load_xdp_programs()?;
        Ok(datapath)
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// The resolved attach mode (never `Auto`).
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Attach (or atomically re-attach) a program to an interface.
    pub fn attach(&mut self, attachment: &Attachment) -> Result<()> {
        let link_pin = self.layout.link(attachment);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(attachment.program.symbol())
            .expect("every program was loaded in Datapath::load")
            .try_into()
            .expect("every program is a classifier");
        match self.mode {
            AttachMode::Tcx => attach_tcx(prog, attachment, &link_pin),
            _ => attach_netlink(prog, attachment),
        }
        .with_context(|| format!("attaching {attachment} ({:?})", self.mode))
    }

    /// Attach the hostNetwork Service programs to `cgroup` (a cgroup v2
    /// directory): every socket of its processes, in any network namespace,
    /// is translated. Links are pinned as `links/<program>@cgroup`; on
    /// restart the new link is made before the old one is released (two
    /// programs for a moment: the second finds a backend address, not a
    /// Service, and leaves it).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let fs = nix::sys::statfs::statfs(cgroup)
            .with_context(|| format!("cgroup {} (--cgroup)", cgroup.display()))?;
        if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            bail!(
                "--cgroup {} is not a cgroup v2 directory; point it at the cgroup2 mount \
                 (`grep cgroup2 /proc/self/mountinfo`, e.g. /sys/fs/cgroup/unified on hybrid hosts) \
                 or pass --no-cgroup to leave hostNetwork clients untranslated",
                cgroup.display()
            );
        }
        let dir = fs::File::open(cgroup).with_context(|| {
            format!(
                "opening cgroup {} (is it a cgroup v2 directory? see --cgroup)",
                cgroup.display()
            )
        })?;
        for symbol in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(symbol)
                .expect("loaded in Datapath::load")
                .try_into()
                .expect("a cgroup sock_addr program");
            let id = prog
                // Single: bpf_link_create takes no flags (cgroup links always coexist).
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {symbol} to cgroup {}", cgroup.display()))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .with_context(|| format!("{symbol}: not an fd link"))?;
            let pin = self.layout.links_dir().join(format!("{symbol}@cgroup"));
            if pin.exists() {
                let old = PinnedLink::from_pin(&pin)
                    .with_context(|| format!("opening {}", pin.display()))?;
                drop(
                    old.unpin()
                        .with_context(|| format!("unpinning {}", pin.display()))?,
                );
            }
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
        }
        info!(
            "hostNetwork Service translation attached to cgroup {}",
            cgroup.display()
        );
        Ok(())
    }

    /// Attachments of the plan with a pinned TCX link. (Netlink filters are
    /// not listed: in netlink mode only attachments made by this process are
    /// known.) The per-pod `fe_pod_port` links are not the plan's: see
    /// [`Datapath::pod_ports_attached`].
    pub fn attached(&self) -> Result<Vec<Attachment>> {
        Ok(self
            .pinned_attachments()?
            .into_iter()
            .filter(|a| a.program != Program::PodPort)
            .collect())
    }

    /// The interfaces with a pinned `fe_pod_port` TCX link.
    pub fn pod_ports_attached(&self) -> Result<Vec<String>> {
        Ok(self
            .pinned_attachments()?
            .into_iter()
            .filter(|a| a.program == Program::PodPort)
            .map(|a| a.iface)
            .collect())
    }

    fn pinned_attachments(&self) -> Result<Vec<Attachment>> {
        let mut out = Vec::new();
        for pin in read_dir_sorted(&self.layout.links_dir())? {
            let name = pin
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if SOCK_PROGRAMS.iter().any(|p| name.starts_with(p)) || xdp::is_xdp_pin(&name) {
                continue;
            }
            let parsed = name.split_once('@').and_then(|(symbol, iface)| {
                Program::ALL
                    .into_iter()
                    .find(|p| p.symbol() == symbol)
                    .map(|p| Attachment::new(p, iface))
            });
            match parsed {
                Some(attachment) => out.push(attachment),
                None => warn!("ignoring unknown link pin {}", pin.display()),
            }
        }
        Ok(out)
    }

    /// Detach one program from one interface.
    pub fn detach(&mut self, attachment: &Attachment) -> Result<()> {
        let pin = self.layout.link(attachment);
        if pin.exists() {
            // Unpinned and unreferenced, the link is released and detaches.
            let pinned =
                PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            drop(
                pinned
                    .unpin()
                    .with_context(|| format!("unpinning {}", pin.display()))?,
            );
        } else {
            match tc::qdisc_detach_program(
                &attachment.iface,
                attachment.program.tc_attach_type(),
                attachment.program.symbol(),
            ) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("detaching {attachment}")),
            }
        }
        info!("{attachment}: detached");
        Ok(())
    }

    /// `fe_tc_empty` (`TC_ACT_OK` and nothing else), loaded on first use:
    /// the bench's baseline for TC programs. Never attached.
    pub fn tc_empty(&mut self) -> Result<&SchedClassifier> {
        const SYMBOL: &str = "fe_tc_empty";
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(SYMBOL)
            .ok_or_else(|| anyhow!("the eBPF object has no program {SYMBOL}"))?
            .try_into()
            .with_context(|| format!("{SYMBOL} is not a classifier"))?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("verifying and loading {SYMBOL}"))?;
        }
        Ok(program)
    }

    /// A loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self, program: Program) -> &SchedClassifier {
        self.ebpf
            .program(program.symbol())
            .expect("every program was loaded in Datapath::load")
            .try_into()
            .expect("every program is a classifier")
    }

    /// Kernel ids of our loaded programs and of every map they use.
    pub fn kernel_ids(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut progs = Vec::new();
        let mut maps = Vec::new();
        for program in Program::ALL {
            let info = self
                .program(program)
                .info()
                .with_context(|| format!("reading info of {}", program.symbol()))?;
            progs.push(info.id());
            maps.extend(
                info.map_ids()
                    .with_context(|| format!("reading map ids of {}", program.symbol()))?
                    .unwrap_or_default(),
            );
        }
        maps.sort();
        maps.dedup();
        Ok((progs, maps))
    }

    /// Forwarding state is in pinned maps: this gives writers and readers.
    pub fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
    }

    /// Start forwarding kernel-side log records to the `log` crate (debug level).
    pub fn init_kernel_logs(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .context("initialising aya-log for kernel-side logs")
    }
}

/// Refuse a pinned map whose shape differs from the one this binary was
/// built with: aya would otherwise adopt it silently and the programs would
/// read garbage.
fn check_pinned_shape(
    name: &str,
    expected: &aya_obj::Map,
    sized_by: Option<(&str, u32)>,
    path: &Path,
) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let found = MapInfo::from_pin(path)
        .with_context(|| format!("reading pinned map {}", path.display()))?;
    let found_type = found.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
    let want = (
        expected.map_type(),
        expected.key_size(),
        expected.value_size(),
        sized_by.map_or(expected.max_entries(), |(_, entries)| entries),
        expected.map_flags(),
    );
    let got = (
        found_type,
        found.key_size(),
        found.value_size(),
        found.max_entries(),
        found.map_flags() & !kernel_added_flags(found_type),
    );
    if want == got {
        return Ok(());
    }
    if let Some((flag, entries)) = sized_by
        && (want.0, want.1, want.2, want.4) == (got.0, got.1, got.2, got.4)
    {
        bail!(
            "pinned map {name} at {} holds {} entries but {flag} is {entries}: a pinned map keeps \
             its size. Fix: start with {flag} {} to keep its state, or run `fabedge-agent uninstall` \
             and start again to recreate it with {entries}.",
            path.display(),
            got.3,
            got.3
        );
    }
    let describe = |(t, k, v, m, f): (u32, u32, u32, u32, u32)| {
        format!(
            "type {} key {k} B value {v} B max_entries {m} flags {f:#x}",
            map_type_name(t)
        )
    };
    bail!(
        "pinned map {name} at {} does not have the layout this agent was built with \
         (layout v{LAYOUT_VERSION}): expected {}, found {}. It was left by another fabedge build. \
         Fix: run `fabedge-agent uninstall` (or remove {}), then start the agent again.",
        path.display(),
        describe(want),
        describe(got),
        path.display()
    )
}

/// Flags the kernel adds to maps of type `t` whatever their creator asked
/// for: device maps are read-only for programs (`BPF_F_RDONLY_PROG`), and
/// may not be created so.
fn kernel_added_flags(t: u32) -> u32 {
    const BPF_MAP_TYPE_DEVMAP: u32 = 14;
    const BPF_MAP_TYPE_DEVMAP_HASH: u32 = 25;
    const BPF_F_RDONLY_PROG: u32 = 1 << 7;
    match t {
        BPF_MAP_TYPE_DEVMAP | BPF_MAP_TYPE_DEVMAP_HASH => BPF_F_RDONLY_PROG,
        _ => 0,
    }
}

/// A kernel map type as bpftool names it.
pub fn map_type_name(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        11 => "lpm_trie".into(),
        27 => "ringbuf".into(),
        u32::MAX => "unknown".into(),
        other => format!("#{other}"),
    }
}

fn attach_tcx(prog: &mut SchedClassifier, attachment: &Attachment, link_pin: &Path) -> Result<()> {
    if link_pin.exists() {
        match replace_in_pinned_link(prog, link_pin) {
            Ok(()) => {
                debug!("{attachment}: program replaced inside pinned TCX link");
                return Ok(());
            }
            Err(e) => {
                // The interface was deleted and recreated: its old link is defunct.
                warn!(
                    "{attachment}: pinned link {} unusable ({e:#}); attaching anew",
                    link_pin.display()
                );
                fs::remove_file(link_pin)
                    .with_context(|| format!("removing stale link pin {}", link_pin.display()))?;
            }
        }
    }
    let id = prog.attach_with_options(
        &attachment.iface,
        attachment.program.tc_attach_type(),
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    link.pin(link_pin)
        .with_context(|| format!("pinning link at {}", link_pin.display()))?;
    info!(
        "{attachment}: attached (TCX, pinned at {})",
        link_pin.display()
    );
    Ok(())
}

fn replace_in_pinned_link(prog: &mut SchedClassifier, link_pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(link_pin)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // The pin keeps the link; dropping our fd does not detach it.
    drop(prog.take_link(id)?);
    Ok(())
}

fn attach_netlink(prog: &mut SchedClassifier, attachment: &Attachment) -> Result<()> {
    match tc::qdisc_add_clsact(&attachment.iface) {
        Ok(()) => {}
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(e).with_context(|| format!("adding clsact qdisc to {}", attachment.iface));
        }
    }
    let attach_type = attachment.program.tc_attach_type();
    let handle = attachment.program.nl_handle();
    let existing =
        SchedClassifierLink::attached(&attachment.iface, attach_type, NL_PRIORITY, handle, None)
            .with_context(|| format!("interface {} not found", attachment.iface))?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => {
            debug!("{attachment}: netlink filter replaced in place");
            id
        }
        Err(_) => {
            let options = NlOptions {
                priority: NL_PRIORITY,
                handle,
                classid: None,
            };
            let id = prog.attach_with_options(
                &attachment.iface,
                attach_type,
                TcAttachOptions::Netlink(options),
            )?;
            info!("{attachment}: attached (netlink cls_bpf prio {NL_PRIORITY:#x})");
            id
        }
    };
    // A netlink filter outlives us by design; dropping the link would delete it.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// What `uninstall` removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct UninstallReport {
    pub links: Vec<String>,
    pub netlink_filters: Vec<String>,
    pub maps: Vec<String>,
}

/// Remove every link, filter and pin we created under `bpffs_root`, for every
/// layout version. Maps and programs are freed by the kernel once their last
/// pin and attachment are gone.
pub fn uninstall(bpffs_root: &Path) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    if bpffs_root.exists() {
        for version in read_dir_sorted(bpffs_root)? {
            let links = version.join("links");
            if links.exists() {
                for pin in read_dir_sorted(&links)? {
                    let pinned = PinnedLink::from_pin(&pin)
                        .with_context(|| format!("opening link pin {}", pin.display()))?;
                    // Unpinned and closed: the kernel detaches and frees it.
                    drop(
                        pinned
                            .unpin()
                            .with_context(|| format!("unpinning {}", pin.display()))?,
                    );
                    report.links.push(pin.display().to_string());
                }
                remove_dir(&links)?;
            }
            let maps = version.join("maps");
            if maps.exists() {
                for pin in read_dir_sorted(&maps)? {
                    fs::remove_file(&pin)
                        .with_context(|| format!("removing map pin {}", pin.display()))?;
                    report.maps.push(pin.display().to_string());
                }
                remove_dir(&maps)?;
            }
            remove_dir(&version)?;
        }
        remove_dir(bpffs_root)?;
    }
    for iface in crate::sys::interfaces()? {
        for program in Program::ALL {
            for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
                match tc::qdisc_detach_program(&iface, attach_type, program.symbol()) {
                    Ok(()) => report
                        .netlink_filters
                        .push(format!("{}@{iface}", program.symbol())),
                    Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    // The interface vanished meanwhile, or has no clsact qdisc.
                    Err(e) => debug!("{iface}: no {} filter to remove ({e})", program.symbol()),
                }
            }
        }
    }
    Ok(report)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

fn remove_dir(dir: &Path) -> Result<()> {
    fs::remove_dir(dir)
        .with_context(|| format!("removing {} (is something else in it?)", dir.display()))
}

/// Open one of our pinned maps, whether or not an agent is running.
pub fn open_pinned(layout: &PinLayout, name: &str) -> Result<Map> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the datapath installed? start the agent first)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}
