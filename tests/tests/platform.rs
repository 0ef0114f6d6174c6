//! The platform: the agent loads, pins and attaches; restarts adopt state and
//! swap programs with no gap; stale layouts are refused; uninstall leaves
//! nothing behind. Needs root.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_agent::{
    datapath::{self, AttachMode, Datapath, PinLayout},
    maps::Maps,
};
use fabedge_common::{Counter, DatapathConfig, RouteEntry, role, route_kind, tunnel_mode};
use fabedge_tests::{
    agent::{agent_ok, agent_output, bpffs_root},
    netns::{Netns, ping, veth_pair},
};
use ipnet::Ipv4Net;

/// A client and a "node" joined by a veth; our from-pod program on the node's
/// end sees everything the client sends.
struct Wire {
    client: Netns,
    node: Netns,
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Routed as LOCAL_HOST in FE_ROUTES: passes.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Also on the node, but in no route: our program drops it.
const UNROUTED_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

fn wire(name: &str) -> Result<Wire> {
    let client = Netns::new(&format!("{name}-c"))?;
    let node = Netns::new(&format!("{name}-n"))?;
    veth_pair(&client, "c0", &node, "n0")?;
    client.add_addr("c0", "10.77.0.1/24")?;
    node.add_addr("n0", "10.77.0.2/24")?;
    node.add_addr("n0", "10.77.0.3/24")?;
    Ok(Wire { client, node })
}

/// Arm the datapath so the client's traffic to NODE_IP is forwarded (local) and
/// anything else is dropped as unroutable.
fn program_maps(layout: &PinLayout) -> Result<Maps> {
    let mut maps = Maps::open(layout)?;
    maps.set_route(
        Ipv4Net::new(NODE_IP, 32)?,
        RouteEntry {
            kind: route_kind::LOCAL_HOST,
            flags: 0,
            peer_id: 0,
        },
    )?;
    maps.set_route(
        Ipv4Net::new(CLIENT_IP, 32)?,
        RouteEntry {
            kind: route_kind::LOCAL_POD,
            flags: 0,
            peer_id: 0,
        },
    )?;
    maps.set_config(DatapathConfig {
        ready: 1,
        role: role::EDGE,
        tunnel_mode: tunnel_mode::VXLAN,
        ..DatapathConfig::default()
    })?;
    Ok(maps)
}

/// Attach modes to prove on this kernel: netlink always; TCX where it exists
/// (the VM suite runs these tests on 6.1, which has none, and on 6.12).
fn attach_modes() -> Vec<&'static str> {
    if kernel_at_least(6, 6) {
        vec!["tcx", "netlink"]
    } else {
        eprintln!(
            "TCX leg not run: this kernel is older than 6.6 and has no TCX; proving netlink tc only"
        );
        vec!["netlink"]
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (maj, min) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (maj, min) >= (major, minor)
}

#[test]
fn agent_restarts_without_losing_packets() -> Result<()> {
    for mode in attach_modes() {
        restarts_keep_forwarding(mode).with_context(|| format!("attach mode {mode}"))?;
    }
    Ok(())
}

fn restarts_keep_forwarding(mode: &str) -> Result<()> {
    let wire = wire(&format!("rs{mode}"))?;
    let root = bpffs_root(&format!("restart-{mode}"));
    let layout = PinLayout::new(&root);
    let attach = [
        "attach",
        "--attach-mode",
        mode,
        "--attach",
        "from-pod=n0",
        "--xdp-iface",
        "n0",
    ];
    let result = (|| -> Result<()> {
        agent_ok(Some(&wire.node), &root, &attach)?;
        let maps = program_maps(&layout)?;
        let before = maps.counter(Counter::PassLocal)?;
        let xdp_pin = layout.links_dir().join("fe_xdp_uplink@n0");
        let (xdp_link, first_xdp_prog) = pinned_link(&xdp_pin)?;
        ensure!(
            xdp_on(&wire.node, "n0")? == Some(first_xdp_prog),
            "fe_xdp_uplink is not the XDP program of n0"
        );

        // 400 pings at 10 ms while the agent restarts five times.
        let client = &wire.client;
        let pinger = thread::scope(|scope| -> Result<_> {
            let pings = scope.spawn(|| ping(client, NODE_IP, 400, Duration::from_millis(10)));
            thread::sleep(Duration::from_millis(300));
            for restart in 1..=5 {
                agent_ok(Some(&wire.node), &root, &attach)
                    .with_context(|| format!("restart {restart}"))?;
                thread::sleep(Duration::from_millis(300));
            }
            pings.join().expect("ping thread")
        })?;
        ensure!(pinger.sent == 400, "ping sent {} of 400", pinger.sent);
        ensure!(
            pinger.received == pinger.sent,
            "{} of {} pings lost across 5 agent restarts ({mode})",
            pinger.sent - pinger.received,
            pinger.sent
        );

        // The maps were adopted, not recreated: entries and counters survived.
        let maps = Maps::open(&layout)?;
        let routes: Vec<_> = maps.route_entries()?;
        ensure!(
            routes
                .iter()
                .any(|(net, e)| net.addr() == NODE_IP && e.kind == route_kind::LOCAL_HOST),
            "route to {NODE_IP} lost across restarts: {routes:?}"
        );
        ensure!(maps.config()?.ready == 1, "FE_CONFIG lost across restarts");
        // XDP: the same link all along, each restart's program swapped into it.
        let (link_now, prog_now) = pinned_link(&xdp_pin)?;
        ensure!(
            link_now == xdp_link && prog_now != first_xdp_prog,
            "XDP link {xdp_link} (program {first_xdp_prog}) became link {link_now} \
             (program {prog_now}): restarts must update the pinned link in place"
        );
        ensure!(
            xdp_on(&wire.node, "n0")? == Some(prog_now),
            "n0 does not run the restarted agent's fe_xdp_uplink"
        );
        let after = maps.counter(Counter::PassLocal)?;
        ensure!(
            after >= before + 400,
            "pass_local grew by {} for 400 pings: the program was not in the path all along",
            after - before
        );

        // Still our program deciding: an unrouted destination is dropped and counted.
        let dropped_before = maps.counter(Counter::DropNoRoute)?;
        let lost = ping(&wire.client, UNROUTED_IP, 3, Duration::from_millis(50))?;
        ensure!(
            lost.received == 0,
            "{UNROUTED_IP} answered although it has no route"
        );
        ensure!(
            maps.counter(Counter::DropNoRoute)? >= dropped_before + 3,
            "drop_no_route did not count the drops"
        );
        Ok(())
    })();
    let cleanup = agent_ok(
        Some(&wire.node),
        &root,
        &["uninstall", "--cni-conf-dir", "/nonexistent"],
    );
    result.and(cleanup.map(|_| ()))
}

#[test]
fn stale_pinned_map_layout_is_refused_with_the_fix() -> Result<()> {
    let root = bpffs_root("stale");
    let layout = PinLayout::new(&root);
    std::fs::create_dir_all(layout.maps_dir())?;
    let stale = layout.map("FE_ROUTES");
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stale)
        .args([
            "type",
            "hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "FE_ROUTES",
        ])
        .status()
        .context("running bpftool")?;
    ensure!(created.success(), "bpftool map create failed");

    let result = (|| -> Result<()> {
        // Through the library...
        let err = match Datapath::load(layout.clone(), AttachMode::Auto) {
            Ok(_) => bail!("a pinned FE_ROUTES of another layout was adopted"),
            Err(e) => format!("{e:#}"),
        };
        for needle in [
            "FE_ROUTES",
            "expected type lpm_trie key 8 B value 4 B max_entries 16384 flags 0x1",
            "found type hash key 8 B value 8 B max_entries 16 flags 0x0",
            "fabedge-agent uninstall",
        ] {
            ensure!(err.contains(needle), "error lacks {needle:?}: {err}");
        }
        // ...and through the CLI, which exits non-zero with the same message.
        let out = agent_output(None, &root, &["attach", "--attach", "from-pod=lo"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "the agent started on a stale layout");
        ensure!(
            stderr.contains("FE_ROUTES") && stderr.contains("found type hash"),
            "CLI error: {stderr}"
        );

        // Nothing half-done: no other map was pinned, the stale one is untouched.
        let pins: Vec<_> = std::fs::read_dir(layout.maps_dir())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        ensure!(pins == ["FE_ROUTES"], "pins after refusal: {pins:?}");
        let info = aya::maps::MapInfo::from_pin(&stale)?;
        ensure!(info.value_size() == 8, "the stale map was modified");
        ensure!(
            !layout.links_dir().exists(),
            "the refused start left {} behind",
            layout.links_dir().display()
        );
        Ok(())
    })();
    datapath::uninstall(&root)?;
    result
}

#[test]
fn uninstall_leaves_nothing_behind() -> Result<()> {
    for mode in attach_modes() {
        uninstall_in_mode(mode).with_context(|| format!("attach mode {mode}"))?;
    }
    Ok(())
}

fn uninstall_in_mode(mode: &str) -> Result<()> {
    let wire = wire(&format!("un{mode}"))?;
    let root = bpffs_root(&format!("uninstall-{mode}"));
    let result = attach_then_uninstall(&wire, &root, mode);
    if root.exists() {
        // The test failed before uninstall did its job; do not leak into bpffs.
        let _ = agent_ok(
            Some(&wire.node),
            &root,
            &["uninstall", "--cni-conf-dir", "/nonexistent"],
        );
    }
    result
}

fn attach_then_uninstall(wire: &Wire, root: &Path, mode: &str) -> Result<()> {
    agent_ok(
        Some(&wire.node),
        root,
        &[
            "attach",
            "--attach-mode",
            mode,
            "--attach",
            "from-pod=n0",
            "--attach",
            "uplink-ingress=n0",
            // As the agent puts it on each pod's veth.
            "--attach",
            "pod-port=n0",
            "--attach",
            "tunnel-ingress=lo",
            "--attach",
            "tunnel-egress=lo",
            "--xdp-iface",
            "n0",
        ],
    )?;
    let attached = attachments(&wire.node, root)?;
    ensure!(
        attached.len() == 6,
        "expected 5 TC attachments and XDP, found {attached:?}"
    );
    ensure!(
        xdp_on(&wire.node, "n0")?.is_some(),
        "no XDP program on n0 after attach"
    );
    let prog_ids: Vec<u64> = attached.iter().map(|a| a.1).collect();
    let mut map_ids = Vec::new();
    for id in &prog_ids {
        map_ids.extend(prog_map_ids(*id)?);
    }
    map_ids.sort();
    map_ids.dedup();
    ensure!(
        map_ids.len() >= 5,
        "our programs use {} maps, expected every FE_* map",
        map_ids.len()
    );

    agent_ok(
        Some(&wire.node),
        root,
        &["uninstall", "--cni-conf-dir", "/nonexistent"],
    )?;

    ensure!(!root.exists(), "{} still exists", root.display());
    let left = attachments(&wire.node, root)?;
    ensure!(left.is_empty(), "tc attachments remain: {left:?}");
    ensure!(
        xdp_on(&wire.node, "n0")?.is_none(),
        "uninstall left an XDP program on n0"
    );
    // The kernel frees programs, links and maps asynchronously once unreferenced.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let progs_left: Vec<_> = prog_ids
            .iter()
            .filter(|id| bpftool_has("prog", **id))
            .collect();
        let maps_left: Vec<_> = map_ids
            .iter()
            .filter(|id| bpftool_has("map", **id))
            .collect();
        let links_left = links_of(&prog_ids)?;
        if progs_left.is_empty() && maps_left.is_empty() && links_left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after uninstall, programs {progs_left:?}, maps {maps_left:?} and links {links_left:?} still exist"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Links (any type, any namespace) that hold one of `prog_ids`.
fn links_of(prog_ids: &[u64]) -> Result<Vec<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .context("running bpftool link show")?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| prog_ids.contains(&l["prog_id"].as_u64().unwrap_or(0)))
        .filter_map(|l| l["id"].as_u64())
        .collect())
}

/// (program name, program id) of our attachments: netlink filters as
/// `bpftool net show` lists them in the namespace, TCX links from our pins
/// (Debian's bpftool 7.1 does not list TCX).
fn attachments(ns: &Netns, root: &Path) -> Result<Vec<(String, u64)>> {
    let out = ns.run_ok("bpftool", &["-j", "net", "show"])?;
    let parsed: serde_json::Value =
        serde_json::from_str(&out).context("parsing bpftool net show")?;
    let mut found = Vec::new();
    for section in parsed.as_array().into_iter().flatten() {
        for entry in section["tc"].as_array().into_iter().flatten() {
            let name = entry["name"].as_str().unwrap_or_default().to_string();
            if name.starts_with("fe_") {
                found.push((name, entry["id"].as_u64().unwrap_or(0)));
            }
        }
    }
    let links = PinLayout::new(root).links_dir();
    if links.exists() {
        for pin in std::fs::read_dir(&links)? {
            let pin = pin?.path();
            let out = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&pin)
                .output()?;
            ensure!(
                out.status.success(),
                "bpftool link show pinned {} failed",
                pin.display()
            );
            let link: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let name = pin
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            found.push((name, link["prog_id"].as_u64().unwrap_or(0)));
        }
    }
    Ok(found)
}

/// (link id, program id) of a pinned bpf link.
fn pinned_link(pin: &Path) -> Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool link show pinned {} failed",
        pin.display()
    );
    let link: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        link["id"].as_u64().unwrap_or(0),
        link["prog_id"].as_u64().unwrap_or(0),
    ))
}

/// The id of the XDP program on `iface`, as the kernel reports the link.
fn xdp_on(ns: &Netns, iface: &str) -> Result<Option<u64>> {
    let out = ns.ip(&["-j", "-d", "link", "show", "dev", iface])?;
    let parsed: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j link")?;
    Ok(parsed[0]["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| parsed[0]["xdp"]["attached"][0]["prog"]["id"].as_u64()))
}

fn prog_map_ids(id: u64) -> Result<Vec<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()?;
    ensure!(out.status.success(), "bpftool prog show id {id} failed");
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(parsed["map_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect())
}

fn bpftool_has(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn bpftool_dumps_every_pinned_map_with_field_names() -> Result<()> {
    let root = bpffs_root("btf");
    let layout = PinLayout::new(&root);
    let result = (|| -> Result<()> {
        let datapath = Datapath::load(layout.clone(), AttachMode::Auto)?;
        let mut maps = program_maps(&layout)?;
        maps.set_peer(
            7,
            fabedge_common::PeerEntry {
                kind: fabedge_common::peer_kind::TUNNEL,
                underlay_ip: [198, 18, 0, 7],
                ..Default::default()
            },
        )?;
        maps.sync_peer_addrs(
            &std::collections::BTreeMap::from([(7u16, maps.peer(7)?)]),
            &Default::default(),
        )?;
        // Hash maps dump only their entries: give each one.
        {
            use fabedge_common::services::*;
            maps.services.insert(
                ServiceKey {
                    addr: [10, 96, 0, 1],
                    port: 80,
                    proto: 6,
                    _pad: 0,
                },
                ServiceEntry {
                    id: 1,
                    count: 1,
                    ..Default::default()
                },
                0,
            )?;
            maps.backends.insert(
                BackendKey {
                    service_id: 1,
                    slot: 0,
                },
                Backend {
                    addr: [10, 234, 1, 2],
                    port: 8080,
                    ..Default::default()
                },
                0,
            )?;
            maps.ct.insert(
                CtKey {
                    saddr: [10, 234, 1, 3],
                    ..Default::default()
                },
                CtEntry {
                    service_id: 1,
                    ..Default::default()
                },
                0,
            )?;
            maps.affinity.insert(
                AffinityKey {
                    client: [10, 234, 1, 3],
                    service_id: 1,
                },
                AffinityEntry::default(),
                0,
            )?;
            maps.local_pods.insert(
                fabedge_common::RouteAddr {
                    addr: [10, 234, 1, 3],
                },
                fabedge_common::LocalPodEntry {
                    ifindex: 1,
                    mtu: 1450,
                    ..Default::default()
                },
                0,
            )?;
            maps.pod_ports.insert(
                7,
                fabedge_common::PodPortEntry {
                    addr: [10, 234, 1, 3],
                },
                0,
            )?;
            maps.set_vtep_addrs(&std::collections::BTreeSet::from([
                std::net::Ipv4Addr::new(10, 1, 0, 200),
            ]))?;
            let mut revnat: aya::maps::HashMap<_, SockRevKey, SockRevEntry> =
                fabedge_agent::datapath::open_pinned(
                    &layout,
                    fabedge_common::map_names::SOCK_REVNAT,
                )?
                .try_into()?;
            revnat.insert(
                SockRevKey {
                    cookie: 1,
                    ..Default::default()
                },
                SockRevEntry {
                    addr: [10, 96, 0, 1],
                    port: 80,
                    _pad: 0,
                },
                0,
            )?;
        }
        // Field names each map's dump must show (BTF, not hex bytes).
        let expected: [(&str, &[&str]); 17] = [
            ("FE_SOCK_REVNAT", &["cookie", "backend", "addr"]),
            (
                "FE_SERVICES",
                &["addr", "proto", "count", "affinity_timeout"],
            ),
            ("FE_BACKENDS", &["service_id", "slot", "port"]),
            ("FE_CT", &["saddr", "dport", "last_seen_ns", "snat_addr"]),
            ("FE_AFFINITY", &["client", "backend"]),
            ("FE_ROUTES", &["prefix_len", "addr", "kind", "peer_id"]),
            ("FE_PEERS", &["underlay_ip", "vtep_mac", "port"]),
            ("FE_PEER_ADDRS", &["addr", "peer_id", "kinds"]),
            ("FE_POD_PORTS", &["addr"]),
            ("FE_GROUPS", &["active", "members"]),
            ("FE_VTEP_ADDRS", &["addr"]),
            ("FE_LOCAL_PODS", &["addr", "ifindex", "pod_mac", "mtu"]),
            // A device map: ifindexes, no BTF of ours (dumped, empty).
            ("FE_POD_DEVS", &[]),
            // One u64, the XDP verdict cache's epoch.
            ("FE_XDP_GEN", &["value"]),
            (
                "FE_CONFIG",
                &[
                    "ready",
                    "tunnel_mtu",
                    "flannel_mac",
                    "tunnel_port",
                    "probe_port",
                ],
            ),
            ("FE_COUNTERS", &["values", "cpu", "value"]),
            ("FE_PEER_STATS", &["tx_packets", "rx_bytes"]),
        ];
        let pinned: Vec<String> = std::fs::read_dir(layout.maps_dir())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        ensure!(
            pinned.len() == expected.len(),
            "pinned maps {pinned:?}; this test must name every one"
        );
        for (map, fields) in expected {
            let out = Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(layout.map(map))
                .output()?;
            ensure!(
                out.status.success(),
                "bpftool map dump {map}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            for field in fields {
                ensure!(
                    text.contains(&format!("\"{field}\"")),
                    "{map} dump lacks field {field:?}: {}",
                    &text[..text.len().min(400)]
                );
            }
        }
        drop(datapath);
        Ok(())
    })();
    datapath::uninstall(&root)?;
    result
}

/// A start that cannot reach any source (no `--manifests`, no kubeconfig, not
/// in a pod) fails with the fix in its message and leaves nothing pinned.
#[test]
fn a_start_without_a_source_fails_naming_the_fix_and_pins_nothing() -> Result<()> {
    let root = bpffs_root("no-source");
    let home = std::env::temp_dir().join(format!("fabedge-no-source-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let out = Command::new(fabedge_tests::agent::agent_bin()?)
        .arg("--bpffs-root")
        .arg(&root)
        .args([
            "run",
            "--node",
            "edge-1",
            "--tunnel",
            "vxlan",
            "--no-cgroup",
        ])
        .arg("--state-dir")
        .arg(home.join("state"))
        // kube-rs would find a kubeconfig through these.
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", &home)
        .env("RUST_BACKTRACE", "0")
        .output()?;
    let pinned = root.exists();
    if pinned {
        let _ = agent_ok(
            None,
            &root,
            &["uninstall", "--cni-conf-dir", "/nonexistent"],
        );
    }
    let _ = std::fs::remove_dir_all(&home);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the agent started without a source:\n{stderr}"
    );
    ensure!(
        stderr.contains("--kubeconfig FILE or --manifests FILE"),
        "the error does not say how to give a source:\n{stderr}"
    );
    ensure!(
        !stderr.contains("running for node"),
        "it claimed to run:\n{stderr}"
    );
    ensure!(!pinned, "a failed start left {} behind", root.display());
    Ok(())
}
