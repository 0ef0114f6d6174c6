//! `/metrics`: the Prometheus text exposition (format 0.0.4) of what the
//! datapath counts, what xfrm holds and how the agent's applies went. Read
//! at scrape time, from the same maps and SAs `inspect` reads.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `fabedge_build_info` | gauge | `version`, `layout` |
//! | `fabedge_drops_total` | counter | `reason` (`drop_no_route`, ...: the names of `inspect counters`) |
//! | `fabedge_verdicts_total` | counter | `verdict` (`pass_local`, `to_tunnel`, ...) |
//! | `fabedge_services_not_programmed` | gauge | |
//! | `fabedge_peer_info` | gauge | `peer`, `peer_id`, `kind`, `endpoint` |
//! | `fabedge_peer_packets_total`, `fabedge_peer_bytes_total` | counter | `peer`, `direction` (`tx`: sent to the peer, `rx`: received from it) |
//! | `fabedge_map_entries`, `fabedge_map_max_entries` | gauge | `map` |
//! | `fabedge_esp_key_generation` | gauge | |
//! | `fabedge_esp_sas`, `fabedge_esp_sa_generation` | gauge | `peer`, `direction` (`in`, `out`) |
//! | `fabedge_esp_sa_packets_total`, `_bytes_total`, `_replay_errors_total`, `_integrity_errors_total` | counter | `peer`, `direction`, `generation` |
//! | `fabedge_applies_total` | counter | `result` (`ok`, `error`) |
//! | `fabedge_apply_last_duration_seconds`, `fabedge_apply_last_success`, `fabedge_apply_last_timestamp_seconds` | gauge | |
//! | `fabedge_ready` | gauge | |
//! | `fabedge_plan_warnings` | gauge | |
//! | `fabedge_problems` | gauge | |
//! | `fabedge_metrics_source_up` | gauge | `source` (`datapath`, `xfrm`) |

use std::{collections::BTreeMap, fmt::Display, fmt::Write as _, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};
use aya::maps::MapData;
use fabedge_common::{Counter, LAYOUT_VERSION, map_names};

use super::{Sources, StatusSnapshot};
use crate::{inspect, maps::Maps, plan::PeerIds};

/// The metric types the exposition format knows that we use.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A Prometheus text exposition being written: one family (HELP, TYPE,
/// samples) after the other.
#[derive(Default)]
pub struct Exposition {
    out: String,
    family: String,
}

impl Exposition {
    /// Start the family `name`; the samples that follow belong to it.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self.family = name.to_owned();
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(&self.family);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{name}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A line Prometheus ignores and a person reading the page sees.
    pub fn comment(&mut self, text: &str) {
        for line in text.lines() {
            let _ = writeln!(self.out, "# {line}");
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Label values may hold any UTF-8; the format escapes `\`, `"` and newlines.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The whole page.
pub fn render(sources: &Sources) -> String {
    let status = sources.status.snapshot();
    let mut page = Exposition::default();
    build_info(&mut page);
    agent_status(&mut page, &status);
    if let Some(ha) = &status.ha {
        connectors(&mut page, ha);
    }

    let datapath = Maps::open(&sources.layout)
        .and_then(|maps| datapath(&mut page, &maps, &sources.layout, &status.peer_ids));
    let xfrm = sources
        .esp_state_dir
        .as_deref()
        .map(|state_dir| esp(&mut page, state_dir, status.esp_generation));

    page.family(
        "fabedge_metrics_source_up",
        Kind::Gauge,
        "Whether this scrape could read the source (0: see the comment lines).",
    );
    let mut failures = Vec::new();
    for (source, result) in [("datapath", Some(datapath)), ("xfrm", xfrm)] {
        let Some(result) = result else { continue };
        page.sample(&[("source", source)], u8::from(result.is_ok()));
        if let Err(e) = result {
            failures.push(format!("{source}: {e:#}"));
        }
    }
    for failure in failures {
        page.comment(&failure);
    }
    page.finish()
}

fn build_info(page: &mut Exposition) {
    page.family(
        "fabedge_build_info",
        Kind::Gauge,
        "The agent's version and the pinned map layout it uses; always 1.",
    )
    .sample(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("layout", &LAYOUT_VERSION.to_string()),
        ],
        1,
    );
}

fn agent_status(page: &mut Exposition, status: &StatusSnapshot) {
    page.family(
        "fabedge_applies_total",
        Kind::Counter,
        "Plans applied since the agent started, by result (a failed apply keeps the last good state).",
    )
    .sample(&[("result", "ok")], status.applies_ok)
    .sample(&[("result", "error")], status.applies_failed);
    page.family(
        "fabedge_ready",
        Kind::Gauge,
        "1 once a plan has been applied (what /readyz reports).",
    )
    .sample(&[], u8::from(status.applied_once));
    if let Some((duration, end, ok)) = status.last_apply {
        page.family(
            "fabedge_apply_last_duration_seconds",
            Kind::Gauge,
            "How long the last apply took (plan and every write).",
        )
        .sample(&[], duration.as_secs_f64());
        page.family(
            "fabedge_apply_last_success",
            Kind::Gauge,
            "1 if the last apply succeeded, 0 if it failed (see the agent's log).",
        )
        .sample(&[], u8::from(ok));
        page.family(
            "fabedge_apply_last_timestamp_seconds",
            Kind::Gauge,
            "When the last apply ended (Unix time).",
        )
        .sample(&[], end);
    }
    page.family(
        "fabedge_plan_warnings",
        Kind::Gauge,
        "Problems the last plan found that do not stop this node (logged as warnings).",
    )
    .sample(&[], status.plan_warnings);
    page.family(
        "fabedge_problems",
        Kind::Gauge,
        "Objects left out of the plan (invalid, conflicting, or Services that do not fit); \
         `fabedge-agent inspect problems` lists them.",
    )
    .sample(&[], status.problems);
}

/// Connector liveness: probes per connector, health, and failovers.
fn connectors(page: &mut Exposition, ha: &crate::run::ha::HaStatus) {
    type Family = (
        &'static str,
        &'static str,
        fn(&crate::run::ha::TargetStatus) -> u64,
    );
    let families: [Family; 3] = [
        (
            "fabedge_probes_sent_total",
            "Liveness probes sent to each connector.",
            |t| t.sent,
        ),
        (
            "fabedge_probes_answered_total",
            "Liveness probes each connector's datapath answered.",
            |t| t.answered,
        ),
        (
            "fabedge_probes_missed_total",
            "Liveness probes each connector left unanswered.",
            |t| t.missed,
        ),
    ];
    for (name, help, value) in families {
        page.family(name, Kind::Counter, help);
        for (connector, target) in &ha.targets {
            page.sample(&[("connector", connector)], value(target));
        }
    }
    page.family(
        "fabedge_connector_up",
        Kind::Gauge,
        "Whether a connector answers its probes (1), and has for the hold-down (stable=\"true\").",
    );
    for (connector, target) in &ha.targets {
        let stable = if target.stable { "true" } else { "false" };
        page.sample(
            &[("connector", connector), ("stable", stable)],
            u8::from(target.up),
        );
    }
    page.family(
        "fabedge_connector_rtt_seconds",
        Kind::Gauge,
        "Round trip of the last answered probe to each connector.",
    );
    for (connector, target) in &ha.targets {
        if let Some(us) = target.rtt_us {
            page.sample(&[("connector", connector)], us as f64 / 1e6);
        }
    }
    if !ha.order.is_empty() {
        page.family(
            "fabedge_connector_active",
            Kind::Gauge,
            "Edge: the connector its cloud-bound traffic goes through (1).",
        );
        for connector in &ha.order {
            page.sample(
                &[("connector", connector)],
                u8::from(ha.active.as_ref() == Some(connector)),
            );
        }
    }
    page.family(
        "fabedge_failovers_total",
        Kind::Counter,
        "Edge: switches of its connector; connector: VTEP addresses taken over from dead connectors.",
    )
    .sample(&[], ha.failovers);
}

/// Counters, peers and map fill levels from the pinned maps.
fn datapath(
    page: &mut Exposition,
    maps: &Maps,
    layout: &crate::datapath::PinLayout,
    peer_ids: &PeerIds,
) -> Result<()> {
    // Read everything first: a family is written whole or not at all.
    let mut counters = Vec::new();
    for &counter in Counter::ALL {
        counters.push((counter, maps.counter(counter)?));
    }
    let peers = inspect::peers(maps)?;
    let fill = map_fill(layout, peers.len())?;

    page.family(
        "fabedge_drops_total",
        Kind::Counter,
        "Packets the datapath dropped, by reason (summed over CPUs).",
    );
    for (counter, value) in counters.iter().filter(|(c, _)| c.is_drop()) {
        page.sample(&[("reason", counter.name())], value);
    }
    page.family(
        "fabedge_verdicts_total",
        Kind::Counter,
        "Packets the datapath forwarded, passed or translated, by verdict (summed over CPUs).",
    );
    for (counter, value) in counters
        .iter()
        .filter(|(c, _)| !c.is_drop() && *c != Counter::ServicesNotProgrammed)
    {
        page.sample(&[("verdict", counter.name())], value);
    }
    if let Some((_, value)) = counters
        .iter()
        .find(|(c, _)| *c == Counter::ServicesNotProgrammed)
    {
        page.family(
            "fabedge_services_not_programmed",
            Kind::Gauge,
            "Services left out of the maps because they would not fit (see the agent's log).",
        )
        .sample(&[], value);
    }

    let named: Vec<(String, &inspect::PeerRow)> = peers
        .iter()
        .map(|p| (peer_label(peer_ids.node(p.id), p.id), p))
        .collect();
    page.family(
        "fabedge_peer_info",
        Kind::Gauge,
        "Peers in FE_PEERS: the node, its id, kind (tunnel, flannel-vtep) and underlay endpoint; always 1.",
    );
    for (name, p) in &named {
        page.sample(
            &[
                ("peer", name),
                ("peer_id", &p.id.to_string()),
                ("kind", p.kind),
                ("endpoint", &p.endpoint),
            ],
            1,
        );
    }
    page.family(
        "fabedge_peer_packets_total",
        Kind::Counter,
        "Packets the datapath sent to (tx) and received from (rx) each peer.",
    );
    for (name, p) in &named {
        page.sample(&[("peer", name), ("direction", "tx")], p.tx_packets)
            .sample(&[("peer", name), ("direction", "rx")], p.rx_packets);
    }
    page.family(
        "fabedge_peer_bytes_total",
        Kind::Counter,
        "Bytes (inner packets) the datapath sent to (tx) and received from (rx) each peer.",
    );
    for (name, p) in &named {
        page.sample(&[("peer", name), ("direction", "tx")], p.tx_bytes)
            .sample(&[("peer", name), ("direction", "rx")], p.rx_bytes);
    }

    page.family(
        "fabedge_map_entries",
        Kind::Gauge,
        "Entries in each map that fills up (hash, LRU, LPM maps; FE_PEERS: peers in use).",
    );
    for f in &fill {
        page.sample(&[("map", &f.name)], f.entries);
    }
    page.family(
        "fabedge_map_max_entries",
        Kind::Gauge,
        "Capacity of each map that fills up.",
    );
    for f in &fill {
        page.sample(&[("map", &f.name)], f.max_entries);
    }
    Ok(())
}

/// A peer's node name; `id-N` for a peer id no plan of this agent named
/// (maps adopted before the first plan).
fn peer_label(node: Option<&str>, id: impl Display) -> String {
    node.map_or_else(|| format!("id-{id}"), str::to_owned)
}

struct Fill {
    name: String,
    entries: u64,
    max_entries: u32,
}

/// BPF map types whose entry count changes (`enum bpf_map_type`).
const HASH: u32 = 1;
const PERCPU_HASH: u32 = 5;
const LRU_HASH: u32 = 9;
const LRU_PERCPU_HASH: u32 = 10;
const LPM_TRIE: u32 = 11;

/// Fill level of every pinned map that can fill up. Arrays are always full
/// and not listed, except `FE_PEERS`, whose used slots are `peers`.
fn map_fill(layout: &crate::datapath::PinLayout, peers: usize) -> Result<Vec<Fill>> {
    let mut out = Vec::new();
    for row in inspect::maps(layout)? {
        let path = Path::new(&row.pin);
        let info = aya::maps::MapInfo::from_pin(path)
            .with_context(|| format!("reading {}", path.display()))?;
        let map_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let entries = match map_type {
            HASH | PERCPU_HASH | LRU_HASH | LRU_PERCPU_HASH | LPM_TRIE => {
                let map = MapData::from_pin(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                count_keys(&map, row.key_size, row.max_entries)
                    .with_context(|| format!("counting the entries of {}", row.name))?
            }
            _ if row.name == map_names::PEERS => peers as u64,
            _ => continue,
        };
        out.push(Fill {
            name: row.name,
            entries,
            max_entries: row.max_entries,
        });
    }
    Ok(out)
}

/// `BPF_MAP_GET_NEXT_KEY` from the first key on: one syscall per entry,
/// never more than the map's capacity (an LRU map evicting while we walk
/// may restart the walk; the count is then approximate, never unbounded).
fn count_keys(map: &MapData, key_size: u32, max_entries: u32) -> Result<u64> {
    /// `union bpf_attr` as `BPF_MAP_*_ELEM` and `BPF_MAP_GET_NEXT_KEY` read it.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

    let fd = map.fd();
    let fd = std::os::fd::AsFd::as_fd(fd).as_raw_fd();
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u64;
    while count < u64::from(max_entries) {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            // NULL on the first call: "the first key".
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for this command; both
        // buffers are `key_size` bytes (the map's own key size) and outlive
        // the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if ret < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(error).context("BPF_MAP_GET_NEXT_KEY");
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}

/// ESP: the node's key generation and each peer's SAs as xfrm counts them
/// (what `inspect tunnels` shows; keys are never read).
fn esp(page: &mut Exposition, state_dir: &Path, generation: Option<u32>) -> Result<()> {
    let rows = crate::esp::inspect::tunnels(state_dir)?;
    esp_families(page, &rows, generation);
    hello_families(page, &crate::esp::hellos::load_received(state_dir));
    Ok(())
}

/// Clock skew as the peers' hellos show it, from the hello record rather than
/// the SAs: a peer whose clock is off never gets an SA to hang it on.
fn hello_families(page: &mut Exposition, peers: &BTreeMap<String, crate::esp::hellos::PeerHellos>) {
    page.family(
        "fabedge_hellos_skewed_total",
        Kind::Counter,
        "Authentic hellos from a peer refused because its clock is outside the accepted window.",
    );
    for (peer, hellos) in peers {
        page.sample(&[("peer", peer)], hellos.skewed_hellos);
    }
    page.family(
        "fabedge_peer_clock_skew_seconds",
        Kind::Gauge,
        "The peer's clock minus ours, for peers whose hellos are refused for it now.",
    );
    for (peer, hellos) in peers {
        if let Some(secs) = hellos.skew_secs {
            page.sample(&[("peer", peer)], secs);
        }
    }
}

fn esp_families(
    page: &mut Exposition,
    rows: &[crate::esp::inspect::TunnelRow],
    generation: Option<u32>,
) {
    if let Some(generation) = generation {
        page.family(
            "fabedge_esp_key_generation",
            Kind::Gauge,
            "This node's current key generation (published as fabedge.io/key-generation).",
        )
        .sample(&[], generation);
    }
    let label = |row: &crate::esp::inspect::TunnelRow| {
        if row.peer == "?" {
            peer_label(None, row.peer_id)
        } else {
            row.peer.clone()
        }
    };
    // Per peer and direction: how many SAs (two while a rotation's grace
    // runs) and the newest generation.
    let mut pairs: BTreeMap<(String, &str), (u32, u32)> = BTreeMap::new();
    for row in rows {
        let entry = pairs.entry((label(row), row.direction)).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(row.generation);
    }
    page.family(
        "fabedge_esp_sas",
        Kind::Gauge,
        "ESP SAs per peer and direction (2 while a key rotation's grace period runs).",
    );
    for ((peer, direction), (count, _)) in &pairs {
        page.sample(&[("peer", peer), ("direction", direction)], count);
    }
    page.family(
        "fabedge_esp_sa_generation",
        Kind::Gauge,
        "The newest key generation among a peer's SAs in each direction.",
    );
    for ((peer, direction), (_, generation)) in &pairs {
        page.sample(&[("peer", peer), ("direction", direction)], generation);
    }
    type Field = fn(&crate::esp::inspect::TunnelRow) -> u64;
    let per_sa: [(&str, &str, Field); 4] = [
        (
            "fabedge_esp_sa_packets_total",
            "Packets through each SA (in: decrypted, out: encrypted).",
            |r| r.packets,
        ),
        (
            "fabedge_esp_sa_bytes_total",
            "Bytes through each SA.",
            |r| r.bytes,
        ),
        (
            "fabedge_esp_sa_replay_errors_total",
            "Packets an inbound SA refused as replayed or outside its window.",
            |r| u64::from(r.replay_errors),
        ),
        (
            "fabedge_esp_sa_integrity_errors_total",
            "Packets an inbound SA refused for a failed integrity check.",
            |r| u64::from(r.integrity_errors),
        ),
    ];
    for (name, help, field) in per_sa {
        page.family(name, Kind::Counter, help);
        for row in rows {
            page.sample(
                &[
                    ("peer", &label(row)),
                    ("direction", row.direction),
                    ("generation", &row.generation.to_string()),
                ],
                field(row),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_and_label_values_are_escaped() {
        let mut page = Exposition::default();
        page.family(
            "fabedge_drops_total",
            Kind::Counter,
            "Dropped packets\\by reason.\nSecond line",
        )
        .sample(&[("reason", "drop_no_route")], 3u64)
        .sample(&[("peer", "a\"b\\c\nd"), ("direction", "tx")], 0u64);
        page.family("fabedge_ready", Kind::Gauge, "Ready.")
            .sample(&[], 1u8);
        page.comment("datapath: no pins\nsecond");
        assert_eq!(
            page.finish(),
            "# HELP fabedge_drops_total Dropped packets\\\\by reason.\\nSecond line\n\
             # TYPE fabedge_drops_total counter\n\
             fabedge_drops_total{reason=\"drop_no_route\"} 3\n\
             fabedge_drops_total{peer=\"a\\\"b\\\\c\\nd\",direction=\"tx\"} 0\n\
             # HELP fabedge_ready Ready.\n\
             # TYPE fabedge_ready gauge\n\
             fabedge_ready 1\n\
             # datapath: no pins\n\
             # second\n"
        );
    }

    fn sa(
        direction: &'static str,
        peer: &str,
        peer_id: u32,
        generation: u32,
        packets: u64,
    ) -> crate::esp::inspect::TunnelRow {
        crate::esp::inspect::TunnelRow {
            direction,
            peer_id,
            peer: peer.into(),
            spi: format!("{:#010x}", 0xfe00_0000 | generation),
            generation,
            remote: "198.18.0.11:4500".into(),
            packets,
            bytes: packets * 100,
            replay_errors: 1,
            integrity_errors: 0,
            clock_skew_secs: None,
            skewed_hellos: 0,
        }
    }

    #[test]
    fn esp_sas_are_counted_per_peer_and_direction_with_the_newest_generation() {
        // edge-1 in its rotation's grace period: two outbound SAs.
        let rows = [
            sa("in", "edge-1", 1, 4, 10),
            sa("out", "edge-1", 1, 4, 7),
            sa("out", "edge-1", 1, 5, 2),
            sa("in", "?", 9, 1, 0),
        ];
        let mut page = Exposition::default();
        esp_families(&mut page, &rows, Some(5));
        let page = page.finish();
        for line in [
            "fabedge_esp_key_generation 5\n",
            "fabedge_esp_sas{peer=\"edge-1\",direction=\"out\"} 2\n",
            "fabedge_esp_sas{peer=\"edge-1\",direction=\"in\"} 1\n",
            "fabedge_esp_sas{peer=\"id-9\",direction=\"in\"} 1\n",
            "fabedge_esp_sa_generation{peer=\"edge-1\",direction=\"out\"} 5\n",
            "fabedge_esp_sa_packets_total{peer=\"edge-1\",direction=\"out\",generation=\"4\"} 7\n",
            "fabedge_esp_sa_packets_total{peer=\"edge-1\",direction=\"out\",generation=\"5\"} 2\n",
            "fabedge_esp_sa_bytes_total{peer=\"edge-1\",direction=\"in\",generation=\"4\"} 1000\n",
            "fabedge_esp_sa_replay_errors_total{peer=\"edge-1\",direction=\"in\",generation=\"4\"} 1\n",
        ] {
            assert!(page.contains(line), "no {line:?} in\n{page}");
        }
        // SPIs and remotes stay out of label values (no series per rotation of them),
        // and nothing resembling key material is there to leak.
        assert!(!page.contains("0xfe00"), "{page}");
    }

    #[test]
    fn clock_skew_is_exported_per_peer_even_without_an_sa() {
        let peers: BTreeMap<String, crate::esp::hellos::PeerHellos> = serde_json::from_str(
            r#"{"edge-1": {"counter": 0, "skewed_hellos": 12, "skew_secs": -300},
                "edge-2": {"counter": 9, "skewed_hellos": 2}}"#,
        )
        .unwrap();
        let mut page = Exposition::default();
        hello_families(&mut page, &peers);
        let page = page.finish();
        for line in [
            "fabedge_hellos_skewed_total{peer=\"edge-1\"} 12\n",
            "fabedge_hellos_skewed_total{peer=\"edge-2\"} 2\n",
            "fabedge_peer_clock_skew_seconds{peer=\"edge-1\"} -300\n",
        ] {
            assert!(page.contains(line), "no {line:?} in\n{page}");
        }
        // edge-2 is back in the window: no skew sample for it.
        assert!(
            !page.contains("fabedge_peer_clock_skew_seconds{peer=\"edge-2\"}"),
            "{page}"
        );
    }

    #[test]
    fn a_page_without_a_datapath_still_says_what_it_can_and_why_not() {
        let dir = std::env::temp_dir().join(format!("fabedge-metrics-test-{}", std::process::id()));
        let status = super::super::Status::new(super::super::STUCK_AFTER);
        status.applied(std::time::Duration::from_millis(1500), None);
        let page = render(&Sources {
            layout: crate::datapath::PinLayout::new(&dir),
            esp_state_dir: None,
            status,
        });
        assert!(
            page.contains(&format!(
                "fabedge_build_info{{version=\"{}\",layout=\"{LAYOUT_VERSION}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{page}"
        );
        assert!(
            page.contains("fabedge_apply_last_duration_seconds 1.5\n"),
            "{page}"
        );
        assert!(
            page.contains("fabedge_applies_total{result=\"ok\"} 1\n"),
            "{page}"
        );
        assert!(page.contains("fabedge_ready 1\n"), "{page}");
        assert!(
            page.contains("fabedge_metrics_source_up{source=\"datapath\"} 0\n"),
            "{page}"
        );
        assert!(page.contains("# datapath: "), "{page}");
        assert!(!page.contains("fabedge_drops_total"), "{page}");
    }
}
