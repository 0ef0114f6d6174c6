//! Make the kernel's xfrm state match an [`EspPlan`], by diff and
//! make-before-break:
//!
//! 1. inbound SAs first (a peer may start using a generation as soon as we
//!    publish it), then outbound SAs (the kernel prefers the newest SA a
//!    policy template matches, so traffic moves to a new generation the
//!    moment its SA exists), then policies;
//! 2. SAs no longer planned are deleted only after a grace period, so
//!    packets encrypted with the old generation still in flight decrypt;
//! 3. SAs already in the kernel are adopted, never recreated, when they are
//!    what we would install (see [`compare`]): an agent restart keeps their
//!    sequence counters (and traffic). What `XFRM_MSG_UPDSA` can change
//!    (UDP ports, marks, limits) is changed in place, counters and replay
//!    window kept. Any other difference replaces the SA: an outbound one
//!    through a new generation (new SPI and key; the old SA carries traffic
//!    until the new one exists), an inbound one whose key differs by delete
//!    and add (its peer already sends with the new key). An inbound SA is
//!    never re-added with the key it had: its replay window would restart
//!    empty under a key whose packets may have been recorded.
//!
//! A key is never reused from sequence number 1: [`Generations`] remembers,
//! across restarts, for which peers an outbound SA of the current
//! generation was ever created; needing one of those again (after a reboot
//! or an `uninstall`) bumps the generation first.
//!
//! Only objects carrying our `if_id` are read, changed or removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{
    keys::KeyNonce,
    plan::{Direction, EspPlan, PlannedSa},
    xfrm::{
        FE_IF_ID, PolicyAction, PolicyInfo, PolicySpec, SaInfo, Socket,
        msg::{OUTBOUND_ESN_WINDOW, key_digest},
    },
};
use crate::{
    apply::{net, rtnl::LinkKind},
    sys::write_if_changed,
};

/// The xfrm interface `name` bound to `if_id`, with `mtu`, up.
pub fn ensure_device(name: &str, if_id: u32, mtu: u32) -> Result<()> {
    if let Some(link) = net::link(name)?
        && link.kind.as_deref() != Some("xfrm")
    {
        // Another mode's fe-tunnel (VXLAN): only our name is touched.
        net::delete_link_if_present(name)?;
    }
    if net::link(name)?.is_none() {
        net::add_link(name, &LinkKind::Xfrm { if_id }).with_context(|| {
            format!(
                "creating the xfrm interface {name}: the ESP mode needs CONFIG_XFRM_INTERFACE \
                 (module xfrm_interface); or run with --tunnel vxlan"
            )
        })?;
    }
    net::set_mtu_up(name, mtu)
}

/// The generation of this node's outbound SAs, kept in the state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    pub generation: u32,
    /// Peers an outbound SA of `generation` was created for (ever).
    pub created: BTreeSet<String>,
    /// This node's contribution to its SA keys (published as
    /// `fabedge.io/key-nonce`); new whenever replay state was lost.
    #[serde(default)]
    pub nonce: Option<KeyNonce>,
    #[serde(skip)]
    path: PathBuf,
}

pub const GENERATION_FILE: &str = "esp-generation.json";

impl Generations {
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(GENERATION_FILE);
        let mut loaded = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Generations>(&bytes).with_context(|| {
                format!(
                    "{} is unreadable; it guards against key reuse, so it is not guessed: \
                     delete it only together with `fabedge-agent uninstall`",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Generations {
                generation: 1,
                created: BTreeSet::new(),
                nonce: None,
                path: PathBuf::new(),
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        loaded.path = path;
        Ok(loaded)
    }

    /// Draw a new nonce when there is none, or when `replay_state_lost`
    /// (the kernel holds none of our SAs: a reboot, `uninstall`, a restored
    /// backup): every key this node sends or receives with is then new, so
    /// ESP recorded before cannot be replayed into the new SAs' empty
    /// replay windows. Returns whether it changed.
    pub fn refresh_nonce(&mut self, replay_state_lost: bool) -> Result<bool> {
        if self.nonce.is_some() && !replay_state_lost {
            return Ok(false);
        }
        self.nonce = Some(KeyNonce::generate()?);
        self.save()?;
        Ok(true)
    }

    fn save(&self) -> Result<()> {
        write_if_changed(&self.path, &serde_json::to_vec_pretty(self)?, 0o600)
    }

    /// Start a new generation (rotation, or a key that must not be reused).
    pub fn bump(&mut self) -> Result<u32> {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.created.clear();
        self.save()?;
        Ok(self.generation)
    }

    /// Record that outbound SAs for `peers` are about to be created. Saved
    /// before the kernel sees them: a crash in between errs on the side of
    /// a new key.
    fn record(&mut self, peers: impl IntoIterator<Item = String>) -> Result<()> {
        let before = self.created.len();
        self.created.extend(peers);
        if self.created.len() != before {
            self.save()
        } else {
            Ok(())
        }
    }
}

/// What one xfrm apply changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct XfrmReport {
    pub sas_added: usize,
    /// SAs whose UDP encapsulation ports moved (a peer's NAT mapping changed
    /// port, not address): updated in place, sequence counters kept.
    pub sas_updated: usize,
    /// Installed SAs whose key differed from the plan (see [`compare`]),
    /// deleted and added again.
    pub sas_replaced: usize,
    pub sas_removed: usize,
    pub policies_written: usize,
    pub policies_removed: usize,
}

/// Remembers stale SAs until their grace period ends.
pub struct XfrmApplier {
    pub grace: Duration,
    stale_since: BTreeMap<(Ipv4Addr, u32), Instant>,
}

pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

impl XfrmApplier {
    pub fn new(grace: Duration) -> Self {
        XfrmApplier {
            grace,
            stale_since: BTreeMap::new(),
        }
    }

    /// Outbound SAs `esp` wants that are not in the kernel as planned, by
    /// peer, and whether one of them is there but differs (its SPI is taken:
    /// only a new generation gives it a fresh one).
    pub fn missing_outbound(esp: &EspPlan) -> Result<(Vec<String>, bool)> {
        let sas = Socket::open()?.sas()?;
        Ok(outbound_needs(esp, &ours(&sas)))
    }

    pub fn apply(&mut self, esp: &EspPlan, generations: &mut Generations) -> Result<XfrmReport> {
        let mut socket = Socket::open()?;
        let mut report = XfrmReport::default();
        let sas = socket.sas()?;
        let present = ours(&sas);

        let wanted: BTreeSet<(Ipv4Addr, u32)> =
            esp.sas.iter().map(|s| (s.spec.dst, s.spec.spi)).collect();
        let (new_outbound, _) = outbound_needs(esp, &present);
        generations.record(new_outbound)?;
        for direction in [Direction::In, Direction::Out] {
            for sa in esp.sas.iter().filter(|s| s.direction == direction) {
                if let Some(installed) = present.get(&(sa.spec.dst, sa.spec.spi)) {
                    match compare(sa, installed) {
                        Installed::Keep => {}
                        Installed::Update(what) => {
                            // Same SA, same key, same counters and window:
                            // XFRM_MSG_UPDSA changes only these.
                            socket.update_sa(&sa.spec).with_context(|| {
                                format!("updating the {direction:?} SA with {} ({what})", sa.peer)
                            })?;
                            info!(
                                "ESP: SA spi {:#010x} with {} updated in place: {what}",
                                sa.spec.spi, sa.peer
                            );
                            report.sas_updated += 1;
                        }
                        Installed::Replace(what) => {
                            // The kernel holds one SA per (destination, SPI):
                            // the old one goes first. Outbound, `run` moved to
                            // a new generation (new SPI) already, so this is
                            // only reached for inbound SAs, whose peer sends
                            // with the new key.
                            warn!(
                                "ESP: replacing the {direction:?} SA spi {:#010x} with {} \
                                 (generation {}): {what}",
                                sa.spec.spi, sa.peer, sa.generation
                            );
                            socket
                                .delete_sa(sa.spec.dst, sa.spec.spi, FE_IF_ID)
                                .with_context(|| {
                                    format!("removing the outdated SA with {}", sa.peer)
                                })?;
                            socket.add_sa(&sa.spec).with_context(|| {
                                format!(
                                    "{direction:?} SA with {} (generation {})",
                                    sa.peer, sa.generation
                                )
                            })?;
                            report.sas_replaced += 1;
                        }
                    }
                    continue;
                }
                socket.add_sa(&sa.spec).with_context(|| {
                    format!(
                        "{direction:?} SA with {} (generation {})",
                        sa.peer, sa.generation
                    )
                })?;
                info!(
                    "ESP: added {} SA spi {:#010x} {} -> {} with {} (generation {})",
                    match direction {
                        Direction::In => "inbound",
                        Direction::Out => "outbound",
                    },
                    sa.spec.spi,
                    sa.spec.src,
                    sa.spec.dst,
                    sa.peer,
                    sa.generation
                );
                report.sas_added += 1;
            }
        }

        let policies = socket.policies()?;
        let installed: Vec<&PolicyInfo> = policies.iter().filter(|p| p.if_id == FE_IF_ID).collect();
        for policy in &esp.policies {
            if !installed.iter().any(|p| same_policy(policy, p)) {
                socket
                    .update_policy(policy)
                    .context("writing an ESP xfrm policy")?;
                report.policies_written += 1;
            }
        }
        for stale in installed
            .iter()
            .filter(|p| !esp.policies.iter().any(|w| same_key(w, p)))
        {
            let dir = match stale.dir {
                0 => crate::esp::xfrm::PolicyDir::In,
                1 => crate::esp::xfrm::PolicyDir::Out,
                _ => crate::esp::xfrm::PolicyDir::Fwd,
            };
            socket
                .delete_policy(dir, stale.mark, FE_IF_ID)
                .context("removing a stale ESP xfrm policy")?;
            report.policies_removed += 1;
        }

        // Stale SAs: gone after the grace period.
        let now = Instant::now();
        self.stale_since
            .retain(|id, _| present.contains_key(id) && !wanted.contains(id));
        for id in present.keys().filter(|id| !wanted.contains(id)) {
            let since = *self.stale_since.entry(*id).or_insert(now);
            if now.duration_since(since) >= self.grace {
                match socket.delete_sa(id.0, id.1, FE_IF_ID) {
                    Ok(()) => {
                        info!(
                            "ESP: removed SA spi {:#010x} to {} after its grace period",
                            id.1, id.0
                        );
                        report.sas_removed += 1;
                    }
                    Err(e) => warn!("ESP: removing SA spi {:#010x} to {}: {e}", id.1, id.0),
                }
                self.stale_since.remove(id);
            }
        }
        Ok(report)
    }

    /// Whether stale SAs wait for their grace period (callers re-apply on a timer).
    pub fn has_pending_removals(&self) -> bool {
        !self.stale_since.is_empty()
    }
}

fn outbound_needs(
    esp: &EspPlan,
    present: &BTreeMap<(Ipv4Addr, u32), &SaInfo>,
) -> (Vec<String>, bool) {
    let mut occupied = false;
    let peers = esp
        .sas
        .iter()
        .filter(|s| s.direction == Direction::Out)
        .filter(|s| match present.get(&(s.spec.dst, s.spec.spi)) {
            None => true,
            Some(installed) => {
                let replace = matches!(compare(s, installed), Installed::Replace(_));
                occupied |= replace;
                replace
            }
        })
        .map(|s| s.peer.clone())
        .collect();
    (peers, occupied)
}

/// What to do with the SA the kernel holds where a planned one goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// It is the planned SA.
    Keep,
    /// It differs only in what `XFRM_MSG_UPDSA` changes in place.
    Update(String),
    /// It must make way for a new SA (see the module docs).
    Replace(String),
}

/// Compare the SA the kernel holds at `planned`'s (destination, SPI) with
/// it. A key the kernel does not show (lockdown redacts it) is taken as
/// ours. An inbound SA with our key but an older shape (reqid, ESN, window:
/// an agent upgrade or a reassigned peer id) is kept rather than re-added
/// with its used key and an empty replay window; its peer's next generation
/// brings one of the new shape.
pub fn compare(planned: &PlannedSa, installed: &SaInfo) -> Installed {
    let spec = &planned.spec;
    let window = match u32::from(spec.replay_window) {
        0 => OUTBOUND_ESN_WINDOW,
        w => w,
    };
    let key_same = installed
        .key_digest
        .is_none_or(|d| d == key_digest(spec.key.expose()));
    let fixed = [
        (
            key_same,
            "key (a peer's key, nonce or name changed, or ours did)",
        ),
        (installed.reqid == spec.reqid, "reqid (peer id)"),
        (installed.esn, "extended sequence numbers"),
        (installed.replay_window == window, "replay window"),
        (
            planned.direction == Direction::In || installed.src == Some(spec.src),
            "source address",
        ),
    ];
    let in_place = [
        (installed.encap == spec.encap, "UDP ports"),
        (installed.set_mark == spec.set_mark, "mark"),
        (installed.if_id == spec.if_id, "if_id"),
        (installed.lifetime == spec.lifetime, "lifetime limits"),
    ];
    fn differ(checks: &[(bool, &'static str)]) -> Vec<&'static str> {
        checks
            .iter()
            .filter(|(same, _)| !same)
            .map(|(_, what)| *what)
            .collect()
    }
    let fixed_differ = differ(&fixed);
    let replace = match planned.direction {
        Direction::Out => !fixed_differ.is_empty(),
        Direction::In => !key_same,
    };
    if replace {
        return Installed::Replace(format!("its {} differ(s)", fixed_differ.join(", ")));
    }
    let in_place_differ = differ(&in_place);
    if in_place_differ.is_empty() {
        Installed::Keep
    } else {
        Installed::Update(format!("its {} changed", in_place_differ.join(", ")))
    }
}

fn ours(sas: &[SaInfo]) -> BTreeMap<(Ipv4Addr, u32), &SaInfo> {
    sas.iter()
        .filter(|s| s.if_id == FE_IF_ID)
        .filter_map(|s| Some(((s.dst?, s.spi), s)))
        .collect()
}

/// Same identity in the kernel: direction, mark, `if_id` (the selector is
/// always "all IPv4").
fn same_key(wanted: &PolicySpec, installed: &PolicyInfo) -> bool {
    wanted.dir as u8 == installed.dir
        && wanted.mark == installed.mark
        && wanted.if_id == installed.if_id
}

fn same_policy(wanted: &PolicySpec, installed: &PolicyInfo) -> bool {
    same_key(wanted, installed)
        && wanted.priority == installed.priority
        && wanted.action as u8 == installed.action
        && wanted.tmpl.map(|t| (Some(t.dst), t.reqid))
            == installed.tmpl_dst.map(|d| (Some(d), installed.tmpl_reqid))
        && (wanted.action == PolicyAction::Block) == installed.tmpl_dst.is_none()
}

/// Remove every SA and policy carrying our `if_id` (`fabedge-agent uninstall`).
pub fn teardown() -> Result<Vec<String>> {
    let mut socket = match Socket::open() {
        Ok(socket) => socket,
        // No xfrm netlink at all: nothing of ours can exist.
        Err(_) => return Ok(Vec::new()),
    };
    let mut removed = Vec::new();
    for policy in socket
        .policies()?
        .into_iter()
        .filter(|p| p.if_id == FE_IF_ID)
    {
        let dir = match policy.dir {
            0 => crate::esp::xfrm::PolicyDir::In,
            1 => crate::esp::xfrm::PolicyDir::Out,
            _ => crate::esp::xfrm::PolicyDir::Fwd,
        };
        socket.delete_policy(dir, policy.mark, FE_IF_ID)?;
        removed.push(format!(
            "xfrm policy {dir:?} mark {:#x}/{:#x}",
            policy.mark.0, policy.mark.1
        ));
    }
    for sa in socket.sas()?.into_iter().filter(|s| s.if_id == FE_IF_ID) {
        if let Some(dst) = sa.dst {
            socket.delete_sa(dst, sa.spi, FE_IF_ID)?;
            removed.push(format!("xfrm SA spi {:#010x} to {dst}", sa.spi));
        }
    }
    Ok(removed)
}

/// Creating outbound SAs for `missing` peers would restart a used key from
/// sequence number 1 if one of them already had an SA of this generation.
pub fn reuses_a_key(missing: &[String], generations: &Generations) -> bool {
    missing
        .iter()
        .any(|peer| generations.created.contains(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fabedge-gen-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_recreated_outbound_sa_forces_a_new_generation_that_survives_restarts() {
        let dir = temp_dir("reuse");
        let mut generations = Generations::load(&dir).unwrap();
        assert_eq!(generations.generation, 1, "first start");
        // First SA to cloud-1: a fresh key, recorded before the kernel sees it.
        let missing = vec!["cloud-1".to_owned()];
        assert!(!reuses_a_key(&missing, &generations));
        generations.record(missing.clone()).unwrap();
        // Agent restart: the record is read back.
        let reloaded = Generations::load(&dir).unwrap();
        assert_eq!(reloaded.created, generations.created);
        // The kernel lost the SA (reboot, uninstall): creating it again at
        // generation 1 would reuse the key, so the generation must move.
        assert!(reuses_a_key(&missing, &reloaded));
        let mut bumped = reloaded;
        assert_eq!(bumped.bump().unwrap(), 2);
        assert!(!reuses_a_key(&missing, &bumped));
        assert_eq!(
            Generations::load(&dir).unwrap().generation,
            2,
            "the bump is persisted"
        );
        // A peer never seen at this generation gets its first SA without a bump.
        assert!(!reuses_a_key(&["edge-2".to_owned()], &bumped));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(GENERATION_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_generation_file_is_an_error_not_a_guess() {
        let dir = temp_dir("garbage");
        std::fs::write(dir.join(GENERATION_FILE), b"{not json").unwrap();
        let err = format!("{:#}", Generations::load(&dir).unwrap_err());
        assert!(
            err.contains(GENERATION_FILE) && err.contains("key reuse"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_nonce_is_new_after_state_loss_and_kept_across_plain_restarts() {
        let dir = temp_dir("nonce");
        let mut generations = Generations::load(&dir).unwrap();
        assert!(generations.refresh_nonce(false).unwrap(), "first start");
        let first = generations.nonce.unwrap();
        // A restart while the kernel holds our SAs keeps it.
        let mut restarted = Generations::load(&dir).unwrap();
        assert_eq!(restarted.nonce, Some(first));
        assert!(!restarted.refresh_nonce(false).unwrap());
        // The kernel lost its SAs (reboot, uninstall, restored backup).
        assert!(restarted.refresh_nonce(true).unwrap());
        let second = restarted.nonce.unwrap();
        assert_ne!(second, first);
        assert_eq!(Generations::load(&dir).unwrap().nonce, Some(second));
        // The state dir lost: a new one again.
        std::fs::remove_dir_all(&dir).unwrap();
        let mut lost = Generations::load(&dir).unwrap();
        lost.refresh_nonce(false).unwrap();
        assert!(lost.nonce != Some(first) && lost.nonce != Some(second));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn planned(direction: Direction) -> PlannedSa {
        use crate::esp::{
            keys::NodeKey,
            xfrm::{Encap, SaSpec, msg::Lifetime},
        };
        let key = NodeKey::from_secret_bytes([1; 32])
            .shared_with(&NodeKey::from_secret_bytes([2; 32]).public())
            .sa_key("a", "b", 1, None);
        PlannedSa {
            peer: "b".into(),
            peer_id: 3,
            direction,
            generation: 1,
            spec: SaSpec {
                src: Ipv4Addr::new(198, 18, 0, 11),
                dst: Ipv4Addr::new(198, 18, 0, 1),
                spi: 0x4012_3401,
                reqid: 3,
                key,
                encap: Some(Encap {
                    sport: 4500,
                    dport: 4500,
                }),
                if_id: FE_IF_ID,
                set_mark: Some((0x0003_0D00, 0xFFFF_3F00)),
                replay_window: match direction {
                    Direction::In => crate::esp::xfrm::msg::REPLAY_WINDOW,
                    Direction::Out => 0,
                },
                lifetime: Lifetime::default(),
            },
        }
    }

    /// What the kernel's dump would say of `sa` once installed.
    fn dumped(sa: &PlannedSa) -> SaInfo {
        let msg = crate::esp::xfrm::msg::new_sa(&sa.spec, 1, false);
        crate::esp::xfrm::msg::parse_sa(&msg[16..]).unwrap()
    }

    #[test]
    fn installed_sas_are_verified_not_adopted_by_spi_alone() {
        for direction in [Direction::In, Direction::Out] {
            let sa = planned(direction);
            assert_eq!(compare(&sa, &dumped(&sa)), Installed::Keep, "{direction:?}");
            // Another key at the same SPI (the peer's nonce or key changed).
            let mut other_key = sa.clone();
            other_key.spec.key = crate::esp::keys::NodeKey::from_secret_bytes([3; 32])
                .shared_with(&crate::esp::keys::NodeKey::from_secret_bytes([2; 32]).public())
                .sa_key("a", "b", 1, None);
            let verdict = compare(&sa, &dumped(&other_key));
            assert!(
                matches!(&verdict, Installed::Replace(why) if why.contains("key")),
                "{direction:?}: {verdict:?}"
            );
            // Marks and limits change in place (counters and window kept).
            let mut limits = sa.clone();
            limits.spec.lifetime.soft_packets = 5;
            limits.spec.set_mark = Some((0x0004_0D00, 0xFFFF_3F00));
            let verdict = compare(&sa, &dumped(&limits));
            assert!(
                matches!(&verdict, Installed::Update(why) if why.contains("mark") && why.contains("lifetime")),
                "{direction:?}: {verdict:?}"
            );
            // A redacted key (lockdown) is not a reason to replace.
            let mut redacted = dumped(&sa);
            redacted.key_digest = None;
            assert_eq!(compare(&sa, &redacted), Installed::Keep);
        }
        // A reassigned peer id: the outbound SA is replaced (through a new
        // generation); the inbound one keeps its key and replay window.
        let mut old_id = planned(Direction::Out);
        old_id.spec.reqid = 9;
        assert!(matches!(
            compare(&planned(Direction::Out), &dumped(&old_id)),
            Installed::Replace(why) if why.contains("reqid")
        ));
        let mut old_id = planned(Direction::In);
        old_id.spec.reqid = 9;
        assert_eq!(
            compare(&planned(Direction::In), &dumped(&old_id)),
            Installed::Keep
        );
        // An SA from before ESN: outbound replaced, inbound kept.
        let mut legacy = dumped(&planned(Direction::Out));
        legacy.esn = false;
        assert!(matches!(
            compare(&planned(Direction::Out), &legacy),
            Installed::Replace(why) if why.contains("extended sequence numbers")
        ));
        let mut legacy = dumped(&planned(Direction::In));
        legacy.esn = false;
        assert_eq!(compare(&planned(Direction::In), &legacy), Installed::Keep);
    }
}
