//! XDP on the uplinks: `fe_xdp_uplink` attached natively to each underlay
//! NIC (generic mode only as a logged fallback), its bpf link pinned as
//! `links/fe_xdp_uplink@<iface>`, so that a restart swaps the program inside
//! the link (`BPF_LINK_UPDATE`) and no frame meets an empty hook.

use std::{collections::BTreeSet, fs, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::programs::{
    Xdp, XdpMode as AyaXdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use log::{info, warn};

use super::{Datapath, read_dir_sorted};

/// The program on the uplinks.
pub const XDP_UPLINK: &str = "fe_xdp_uplink";
/// `XDP_PASS` and nothing else: the bench's baseline.
pub const XDP_EMPTY: &str = "fe_xdp_empty";
/// Every XDP program of the object.
pub const XDP_PROGRAMS: [&str; 2] = [XDP_UPLINK, XDP_EMPTY];

/// How `fe_xdp_uplink` is attached (`--xdp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// In the driver; generic mode (logged) where the driver has no XDP.
    #[default]
    Native,
    /// Generic (skb) XDP: after the skb is built, for any device.
    Generic,
    /// No XDP program; pinned XDP links are removed.
    Off,
}

/// Whether a link pin name is one of ours for XDP (`fe_xdp_uplink@eth0`).
pub fn is_xdp_pin(name: &str) -> bool {
    XDP_PROGRAMS.iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('@'))
    })
}

impl Datapath {
    pub(super) fn load_xdp_programs(&mut self) -> Result<()> {
        for symbol in XDP_PROGRAMS {
            self.xdp_mut(symbol)?
                .load()
                .with_context(|| format!("verifying and loading {symbol}"))?;
        }
        Ok(())
    }

    fn xdp_mut(&mut self, symbol: &str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(symbol)
            .ok_or_else(|| anyhow!("the eBPF object has no program {symbol}"))?
            .try_into()
            .with_context(|| format!("{symbol} is not an XDP program"))
    }

    /// A loaded XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&self, symbol: &str) -> Result<&Xdp> {
        self.ebpf
            .program(symbol)
            .ok_or_else(|| anyhow!("the eBPF object has no program {symbol}"))?
            .try_into()
            .with_context(|| format!("{symbol} is not an XDP program"))
    }

    /// Interfaces with a pinned `fe_xdp_uplink` link.
    pub fn xdp_attached(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for pin in read_dir_sorted(&self.layout.links_dir())? {
            let name = pin.file_name().unwrap_or_default().to_string_lossy();
            if let Some(iface) = name
                .strip_prefix(XDP_UPLINK)
                .and_then(|r| r.strip_prefix('@'))
            {
                out.insert(iface.to_owned());
            }
        }
        Ok(out)
    }

    /// Make `fe_xdp_uplink` run on exactly `ifaces` (none with `XdpMode::Off`).
    /// Attached ones get this binary's program inside their pinned link.
    pub fn sync_xdp(&mut self, ifaces: &BTreeSet<String>, mode: XdpMode) -> Result<()> {
        let wanted: BTreeSet<String> = match mode {
            XdpMode::Off => BTreeSet::new(),
            _ => ifaces.clone(),
        };
        for iface in &wanted {
            self.attach_xdp(iface, mode)
                .with_context(|| format!("attaching {XDP_UPLINK} to {iface} (--xdp)"))?;
        }
        for stale in self.xdp_attached()?.difference(&wanted) {
            let pin = self.xdp_pin(stale);
            detach_pinned(&pin)?;
            info!("{XDP_UPLINK}@{stale}: detached");
        }
        Ok(())
    }

    fn xdp_pin(&self, iface: &str) -> std::path::PathBuf {
        self.layout
            .links_dir()
            .join(format!("{XDP_UPLINK}@{iface}"))
    }

    fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        let pin = self.xdp_pin(iface);
        let prog = self.xdp_mut(XDP_UPLINK)?;
        if pin.exists() {
            match replace_in_pinned_link(prog, &pin) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // The interface was deleted and recreated: its old link is defunct.
                    warn!(
                        "{XDP_UPLINK}@{iface}: pinned link {} unusable ({e:#}); attaching anew",
                        pin.display()
                    );
                    fs::remove_file(&pin)
                        .with_context(|| format!("removing stale link pin {}", pin.display()))?;
                }
            }
        }
        let (id, how) = match mode {
            XdpMode::Generic => (prog.attach(iface, AyaXdpMode::Skb)?, "generic"),
            _ => match prog.attach(iface, AyaXdpMode::Driver) {
                Ok(id) => (id, "native"),
                Err(e) => {
                    warn!(
                        "{XDP_UPLINK}@{iface}: native XDP refused ({e}); falling back to generic \
                         (skb) mode, which saves less. Use --xdp off to run without XDP."
                    );
                    (prog.attach(iface, AyaXdpMode::Skb)?, "generic")
                }
            },
        };
        let link = prog.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link
                    .pin(&pin)
                    .with_context(|| format!("pinning XDP link at {}", pin.display()))?;
                info!(
                    "{XDP_UPLINK}@{iface}: attached ({how}, pinned at {})",
                    pin.display()
                );
            }
            Err(e) => {
                // Kernels without XDP bpf links (< 5.9): a netlink attachment,
                // which outlives us but cannot be pinned or swapped atomically.
                warn!("{XDP_UPLINK}@{iface}: attached ({how}) without a bpf link ({e})");
            }
        }
        Ok(())
    }
}

fn replace_in_pinned_link(prog: &mut Xdp, pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(pin)?;
    let link = XdpLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // The pin keeps the link; dropping our fd does not detach it.
    drop(prog.take_link(id)?);
    Ok(())
}

fn detach_pinned(pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    // Unpinned and closed, the link is released and the program detaches.
    drop(
        pinned
            .unpin()
            .with_context(|| format!("unpinning {}", pin.display()))?,
    );
    Ok(())
}
