//! Apply is all or nothing and never touches what is not ours: a failure
//! after any step rolls the node back to the plan applied before; a planned
//! route onto a network the host already routes is reported, not
//! overwritten; a route of ours deleted behind the agent's back comes back.
//! Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, OpenOptions},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fabedge_agent::{
    apply::{Applier, STEPS, failpoint, net},
    datapath::{self, AttachMode, Datapath, PinLayout, XdpMode},
    maps::Maps,
    plan::{KernelRoute, PeerIds, Plan, Settings, plan},
    source::manifest::{EXAMPLE_CLUSTER, snapshot},
};
use fabedge_common::{
    CONNECTOR_GROUP, DatapathConfig, GroupEntry, PeerEntry, RouteEntry,
    services::{Backend, BackendKey, ServiceEntry, ServiceKey},
};
use fabedge_tests::{
    agent::{agent_bin, agent_ok, bpffs_root, standalone_edge_1},
    netns::Netns,
};
use ipnet::Ipv4Net;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Removes a test's pins and work directories when it ends, even by a
/// failed assertion (a panic skips code after it).
struct Cleanup {
    root: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = datapath::uninstall(&self.root) {
            eprintln!("cleanup: uninstalling {}: {e:#}", self.root.display());
        }
        for dir in &self.dirs {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A node with edge-1's address on `eth0`, and a site LAN on `lan0` that no
/// node address is in.
fn edge_host(name: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    for (dev, cidr) in [("eth0", "10.2.0.11/24"), ("lan0", "192.168.50.1/24")] {
        // A veth whose other end stays in the namespace (no dummy module here).
        let peer = format!("{dev}-peer");
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer])?;
        ns.add_addr(dev, cidr)?;
        ns.set_up(&peer)?;
        ns.set_up(dev)?;
    }
    Ok(ns)
}

/// A new edge outside edge-1's community (its pod CIDR goes into the
/// tunnel), and a Service with one backend on it.
const EDGE_4: &str = "---
apiVersion: v1
kind: Node
metadata:
  name: edge-4
  labels:
    node-role.kubernetes.io/edge: \"\"
spec:
  podCIDR: 10.234.4.0/24
status:
  addresses:
    - {type: InternalIP, address: 10.2.0.14}
---
apiVersion: v1
kind: Service
metadata:
  name: web4
  namespace: default
spec:
  clusterIP: 10.96.4.4
  clusterIPs: [10.96.4.4]
  ports:
    - {name: http, port: 80, protocol: TCP, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web4-a
  namespace: default
  labels:
    kubernetes.io/service-name: web4
addressType: IPv4
ports:
  - {name: http, port: 8080, protocol: TCP}
endpoints:
  - addresses: [10.234.4.10]
    conditions: {ready: true}
    nodeName: edge-4
";

/// Everything an apply writes, as read back from the node.
#[derive(Debug, PartialEq)]
struct NodeState {
    routes: Vec<(Ipv4Net, RouteEntry)>,
    peers: BTreeMap<u16, PeerEntry>,
    groups: BTreeMap<u16, GroupEntry>,
    vtep_addrs: BTreeSet<Ipv4Addr>,
    config: DatapathConfig,
    services: Vec<(ServiceKey, ServiceEntry)>,
    backends: Vec<(BackendKey, Backend)>,
    kernel_routes: Vec<KernelRoute>,
    attached: Vec<String>,
    devices: Vec<(String, bool)>,
    sysctls: Vec<(String, Option<String>)>,
    cni: Option<String>,
}

/// Our program attachments in `ns`: netlink tc filters as `bpftool net
/// show` lists them (device, hook, program), and TCX links by their pins
/// (Debian's bpftool 7.1 does not list TCX).
fn programs_attached(ns: &Netns, datapath: &Datapath) -> Result<Vec<String>> {
    let out = ns.run_ok("bpftool", &["-j", "net", "show"])?;
    let parsed: serde_json::Value =
        serde_json::from_str(&out).context("parsing bpftool net show")?;
    let mut found: Vec<String> = parsed
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|section| section["tc"].as_array().cloned().unwrap_or_default())
        .filter(|entry| entry["name"].as_str().is_some_and(|n| n.starts_with("fe_")))
        .map(|entry| format!("{} {} {}", entry["devname"], entry["kind"], entry["name"]))
        .collect();
    found.extend(datapath.attached()?.iter().map(|a| format!("tcx {a}")));
    found.sort();
    Ok(found)
}

fn read_state(ns: &Netns, datapath: &Datapath, maps: &Maps, plan: &Plan) -> Result<NodeState> {
    let mut peers = BTreeMap::new();
    for id in 1..64 {
        let peer = maps.peer(id)?;
        if peer.kind != 0 {
            peers.insert(id, peer);
        }
    }
    let mut devices = Vec::new();
    for device in &plan.devices {
        devices.push((
            device.name().to_owned(),
            net::link(device.name())?.is_some(),
        ));
    }
    Ok(NodeState {
        routes: maps.route_entries()?,
        peers,
        groups: maps.group_entries()?,
        vtep_addrs: maps.vtep_addr_entries()?,
        config: maps.config()?,
        services: maps.service_entries()?,
        backends: maps.backend_entries()?,
        kernel_routes: net::our_routes()?,
        attached: programs_attached(ns, datapath)?,
        devices,
        sysctls: plan
            .sysctls
            .iter()
            .map(|s| {
                let value = fs::read_to_string(Path::new("/proc/sys").join(&s.key))
                    .ok()
                    .map(|v| v.trim().to_owned());
                (s.key.clone(), value)
            })
            .collect(),
        cni: plan
            .cni
            .as_ref()
            .and_then(|c| fs::read_to_string(&c.path).ok()),
    })
}

/// A failure injected after each step in turn: of the first apply (the node
/// goes back to empty: no device, program, route, sysctl or file of ours),
/// then of a change (the node goes back to the previous plan, entry for
/// entry). The failure names its step in the applier's problems. Finally the
/// change applies for real.
#[test]
fn a_failure_after_any_step_rolls_the_node_back_to_the_previous_plan() -> Result<()> {
    rolls_back_in(AttachMode::Tcx, "tcx")?;
    rolls_back_in(AttachMode::Netlink, "netlink")
}

fn rolls_back_in(mode: AttachMode, name: &str) -> Result<()> {
    let ns = edge_host(&format!("rollback-{name}"))?;
    let root = bpffs_root(&format!("rollback-{name}"));
    let cni_dir = std::env::temp_dir().join(format!(
        "fabedge-rollback-{name}-cni-{}",
        std::process::id()
    ));
    fs::create_dir_all(&cni_dir)?;
    let _cleanup = Cleanup {
        root: root.clone(),
        dirs: vec![cni_dir.clone()],
    };
    let settings = Settings {
        cni_conf_dir: cni_dir.clone(),
        ..Settings::default()
    };
    let mut plan_a = plan(
        &snapshot(EXAMPLE_CLUSTER)?,
        "edge-1",
        &settings,
        &PeerIds::new(),
    )?;
    let mut plan_b = plan(
        &snapshot(&format!("{EXAMPLE_CLUSTER}{EDGE_4}"))?,
        "edge-1",
        &settings,
        &plan_a.peer_ids,
    )?;
    // Connector HA maps, until the planner fills them: a group of edge-1's
    // peers whose members change, and a shared VTEP address that moves.
    let ids: Vec<u16> = plan_a.peers.keys().copied().collect();
    ensure!(ids.len() >= 2, "edge-1 has two peers at least: {ids:?}");
    let group = |active: u16, members: &[u16]| {
        let mut entry = GroupEntry {
            active,
            ..GroupEntry::default()
        };
        entry.members[..members.len()].copy_from_slice(members);
        entry
    };
    plan_a.groups = BTreeMap::from([(CONNECTOR_GROUP, group(ids[0], &ids[..1]))]);
    plan_a.vtep_addrs = BTreeSet::from([Ipv4Addr::new(10, 1, 0, 200)]);
    plan_b.groups = BTreeMap::from([
        (CONNECTOR_GROUP, group(ids[1], &[ids[1], ids[0]])),
        (2, group(ids[0], &ids[..1])),
    ]);
    plan_b.vtep_addrs = BTreeSet::from([Ipv4Addr::new(10, 1, 0, 201)]);
    let edge_4: Ipv4Net = "10.234.4.0/24".parse()?;
    ensure!(
        plan_b.routes.contains_key(&edge_4)
            && plan_b.kernel_routes.iter().any(|r| r.dst == edge_4)
            && plan_b.services.frontends.len() > plan_a.services.frontends.len(),
        "the change must touch maps, kernel routes and Services"
    );
    let result = ns.enter(|| {
        let mut datapath = Datapath::load(PinLayout::new(&root), mode)?;
        let mut maps = Maps::open(datapath.layout())?;
        let mut applier = Applier::with_xdp(XdpMode::Off);
        let empty = read_state(&ns, &datapath, &maps, &plan_a)?;
        ensure!(
            empty.devices.iter().all(|(_, present)| !present) && empty.routes.is_empty(),
            "not a fresh node ({name}): {empty:?}"
        );
        for step in STEPS {
            applier.fail_after(Some(step));
            let err = match applier.apply(&mut datapath, &mut maps, &plan_a, &settings) {
                Ok(_) => bail!("the first apply succeeded with a failure after {step}"),
                Err(e) => format!("{e:#}"),
            };
            ensure!(
                err.contains(&format!("apply step {step} failed; rolled back"))
                    && err.contains(&format!("injected failure after step {step}")),
                "{err}"
            );
            let after = read_state(&ns, &datapath, &maps, &plan_a)?;
            assert_eq!(after, empty, "{name}: first apply failing after {step}");
        }
        applier.fail_after(None);
        applier.apply(&mut datapath, &mut maps, &plan_a, &settings)?;
        let applied_a = read_state(&ns, &datapath, &maps, &plan_a)?;
        ensure!(
            applied_a.devices.iter().all(|(_, present)| *present)
                && !applied_a.attached.is_empty()
                && !applied_a.kernel_routes.is_empty()
                && applied_a.cni.is_some()
                && applied_a.groups == plan_a.groups
                && applied_a.vtep_addrs == plan_a.vtep_addrs,
            "plan A did not apply: {applied_a:?}"
        );
        for step in STEPS {
            applier.fail_after(Some(step));
            ensure!(
                applier
                    .apply(&mut datapath, &mut maps, &plan_b, &settings)
                    .is_err(),
                "the change applied with a failure after {step}"
            );
            let problems = applier.problems();
            ensure!(
                problems.len() == 1 && problems[0].object == format!("apply (step {step})"),
                "problems after a failure at {step}: {problems:?}"
            );
            let after = read_state(&ns, &datapath, &maps, &plan_a)?;
            assert_eq!(after, applied_a, "{name}: change failing after {step}");
        }
        applier.fail_after(None);
        applier.apply(&mut datapath, &mut maps, &plan_b, &settings)?;
        ensure!(applier.problems().is_empty(), "{:?}", applier.problems());
        let applied_b = read_state(&ns, &datapath, &maps, &plan_b)?;
        ensure!(
            applied_b.routes.iter().any(|(net, _)| *net == edge_4)
                && applied_b.kernel_routes.iter().any(|r| r.dst == edge_4)
                && applied_b.services.len() == plan_b.services.frontends.len()
                && applied_b.vtep_addrs == plan_b.vtep_addrs,
            "plan B did not apply: {applied_b:?}"
        );
        // Group 1 existed: its active member (chosen by the probes, here
        // the plan A one) stays while it is still a member.
        assert_eq!(
            applied_b.groups,
            BTreeMap::from([
                (CONNECTOR_GROUP, group(ids[0], &[ids[1], ids[0]])),
                (2, group(ids[0], &ids[..1])),
            ])
        );
        Ok(())
    });
    result
}

/// `fabedge-agent run` in a node's namespace; SIGTERM and wait on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(ns: &Netns, root: &Path, work: &Path, env: &[(&str, &Path)]) -> Result<Agent> {
        Self::start_with(ns, root, work, env, &[])
    }

    fn start_with(
        ns: &Netns,
        root: &Path,
        work: &Path,
        env: &[(&str, &Path)],
        extra: &[&str],
    ) -> Result<Agent> {
        let log = work.join("agent.log");
        let out = OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = standalone_edge_1(ns, &agent_bin()?, root, work)?
            .args(
                ["--poll-interval", "100ms"]
                    .into_iter()
                    .filter(|_| !extra.contains(&"--poll-interval")),
            )
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting fabedge-agent run")?;
        Ok(Agent { child, log })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// An edge host for one agent: its netns, bpffs root and work dir. Dropping
/// it (after the test's agent, declared later, has stopped) runs `uninstall`
/// and then removes the pins and dirs, even after a failed assertion.
struct AgentHost {
    // Dropped in this order: pins and dirs, then the netns.
    _cleanup: Cleanup,
    root: PathBuf,
    work: PathBuf,
    ns: Netns,
}

impl AgentHost {
    fn new(name: &str) -> Result<AgentHost> {
        let ns = edge_host(name)?;
        let root = bpffs_root(name);
        let work = work_dir(name)?;
        let _cleanup = Cleanup {
            root: root.clone(),
            dirs: vec![work.clone()],
        };
        Ok(AgentHost {
            ns,
            root,
            work,
            _cleanup,
        })
    }
}

impl Drop for AgentHost {
    fn drop(&mut self) {
        let cni = self.work.join("cni").display().to_string();
        let _ = agent_ok(
            Some(&self.ns),
            &self.root,
            &["uninstall", "--cni-conf-dir", &cni],
        );
    }
}

/// `ip route show` of the main table in `ns`, one route a line.
fn routes(ns: &Netns) -> Result<String> {
    ns.ip(&["route", "show", "table", "main"])
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn problems(ns: &Netns, root: &Path, work: &Path) -> Result<serde_json::Value> {
    let state = work.join("state").display().to_string();
    let out = agent_ok(
        Some(ns),
        root,
        &["inspect", "problems", "--json", "--state-dir", &state],
    )?;
    Ok(serde_json::from_str(&out)?)
}

fn work_dir(name: &str) -> Result<PathBuf> {
    let work = std::env::temp_dir().join(format!("fabedge-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("cni"))?;
    Ok(work)
}

/// A new edge whose pod CIDR is this host's own LAN: the agent never
/// replaces the kernel's connected route, lists the conflict (naming both
/// routes) in `inspect problems`, and applies the rest of the plan. Then one
/// of its own routes, deleted with `ip route del`, is restored by itself and
/// logged once.
#[test]
fn a_route_onto_a_connected_network_is_reported_not_overwritten_and_a_deleted_route_comes_back()
-> Result<()> {
    let host = AgentHost::new("conflict")?;
    let (ns, root, work) = (&host.ns, &host.root, &host.work);
    let covering_lan = EDGE_4.replace("10.234.4.0/24", "192.168.50.0/24");
    fs::write(
        work.join("cluster.yaml"),
        format!("{EXAMPLE_CLUSTER}{covering_lan}"),
    )?;
    let connected = "192.168.50.0/24 dev lan0 proto kernel scope link src 192.168.50.1";
    ensure!(routes(&ns)?.contains(connected), "{}", routes(&ns)?);
    let agent = Agent::start(&ns, &root, &work, &[])?;
    // The rest of the plan: edge-2's pod CIDR through the tunnel.
    let ours = "10.234.2.0/24 dev fe-tunnel proto 254 scope link src 10.2.0.11";
    wait_for("the plan to apply", Duration::from_secs(30), || {
        Ok(routes(&ns)?.contains(ours))
    })
    .with_context(|| agent.log())?;
    let table = routes(&ns)?;
    ensure!(
        table.contains(connected),
        "the connected route is gone:\n{table}"
    );
    ensure!(
        !table.contains("192.168.50.0/24 dev fe-tunnel"),
        "the LAN was routed into the tunnel:\n{table}"
    );
    let listed = problems(&ns, &root, &work)?;
    let conflict = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["object"] == "route 192.168.50.0/24 dev fe-tunnel src 10.2.0.11");
    let message = conflict
        .and_then(|p| p["problem"].as_str())
        .unwrap_or_default();
    ensure!(
        message
            .contains("collides with route 192.168.50.0/24 dev lan0 src 192.168.50.1 proto kernel"),
        "inspect problems: {listed}"
    );
    // What the datapath marked for the tunnel still goes there, whatever
    // holds the main table (a standby connector under Flannel's routes):
    // unmarked traffic keeps the LAN's route.
    ensure!(
        route_get(&ns, "192.168.50.7", None)?.contains("dev lan0"),
        "{}",
        route_get(&ns, "192.168.50.7", None)?
    );
    let marked = route_get(&ns, "192.168.50.7", Some("0x20e00"))?;
    ensure!(marked.contains("dev fe-tunnel"), "{marked}");
    let rules = ns.ip(&["rule", "show"])?;
    ensure!(
        rules.contains("4011:\tfrom all fwmark 0xe00/0xf00 lookup 4011 proto 254"),
        "{rules}"
    );

    // One of ours deleted behind the agent's back comes back.
    ns.ip(&["route", "del", "10.234.2.0/24", "dev", "fe-tunnel"])?;
    wait_for(
        "the deleted route to come back",
        Duration::from_secs(10),
        || Ok(routes(&ns)?.contains(ours)),
    )
    .with_context(|| agent.log())?;
    let restored =
        "route 10.234.2.0/24 dev fe-tunnel src 10.2.0.11 was removed outside fabedge: restored";
    wait_for("the restore to be logged", Duration::from_secs(5), || {
        Ok(agent.log().contains(restored))
    })?;
    // Logged once, not on every tick after.
    thread::sleep(Duration::from_millis(500));
    let log = agent.log();
    ensure!(log.matches(restored).count() == 1, "{log}");
    ensure!(routes(&ns)?.contains(connected), "{}", routes(&ns)?);

    // Another daemon taking that destination over is left alone and listed.
    ns.ip(&[
        "route",
        "replace",
        "10.234.2.0/24",
        "dev",
        "eth0",
        "proto",
        "static",
    ])?;
    wait_for("the takeover to be listed", Duration::from_secs(10), || {
        Ok(problems(&ns, &root, &work)?
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["object"] == "route 10.234.2.0/24 dev fe-tunnel src 10.2.0.11"
                    && p["problem"].as_str().is_some_and(|m| {
                        m.contains("route 10.234.2.0/24 dev eth0 proto static, which fabedge did not create")
                    })
            }))
    })
    .with_context(|| agent.log())?;
    let table = routes(&ns)?;
    ensure!(
        table.contains("10.234.2.0/24 dev eth0 proto static") && !table.contains(ours),
        "{table}"
    );
    let marked = route_get(&ns, "10.234.2.9", Some("0x10e00"))?;
    ensure!(marked.contains("dev fe-tunnel"), "{marked}");

    // The rule deleted behind the agent's back comes back; uninstall
    // removes the rule and the table.
    ns.ip(&["rule", "del", "priority", "4011"])?;
    wait_for("the rule to come back", Duration::from_secs(10), || {
        Ok(ns.ip(&["rule", "show"])?.contains("lookup 4011"))
    })
    .with_context(|| agent.log())?;
    drop(agent);
    let cni = work.join("cni").display().to_string();
    agent_ok(Some(ns), root, &["uninstall", "--cni-conf-dir", &cni])?;
    let rules = ns.ip(&["rule", "show"])?;
    ensure!(!rules.contains("4011"), "uninstall left a rule: {rules}");
    let left = ns.ip(&["route", "show", "table", "4011"])?;
    ensure!(left.trim().is_empty(), "uninstall left routes: {left}");
    Ok(())
}

/// `ip route get DST [mark MARK]` in `ns`.
fn route_get(ns: &Netns, dst: &str, mark: Option<&str>) -> Result<String> {
    let mut args = vec!["route", "get", dst];
    if let Some(mark) = mark {
        args.extend(["mark", mark]);
    }
    ns.ip(&args)
}

/// The agent binary with a failure injected (test-only
/// `FABEDGE_TEST_FAIL_APPLY_FILE`): a change that fails midway leaves the
/// node on the previous plan, names the step in `inspect problems`, and
/// applies once the failure is gone.
#[test]
fn an_agent_whose_apply_fails_midway_keeps_the_previous_plan_and_reports_the_step() -> Result<()> {
    let host = AgentHost::new("failstep")?;
    let (ns, root, work) = (&host.ns, &host.root, &host.work);
    let trigger = work.join("fail-after");
    fs::write(work.join("cluster.yaml"), EXAMPLE_CLUSTER)?;
    let agent = Agent::start(&ns, &root, &work, &[(failpoint::ENV, &trigger)])?;
    let edge_2 = "10.234.2.0/24 dev fe-tunnel proto 254";
    wait_for("the plan to apply", Duration::from_secs(30), || {
        Ok(routes(&ns)?.contains(edge_2))
    })
    .with_context(|| agent.log())?;
    let layout = PinLayout::new(&root);
    let before = ns.enter(|| Maps::open(&layout)?.route_entries())?;
    fs::write(&trigger, "services")?;
    fs::write(
        work.join("cluster.yaml"),
        format!("{EXAMPLE_CLUSTER}{EDGE_4}"),
    )?;
    wait_for("the failure to be listed", Duration::from_secs(10), || {
        Ok(problems(&ns, &root, &work)?
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["object"] == "apply (step services)"))
    })
    .with_context(|| agent.log())?;
    let after = ns.enter(|| Maps::open(&layout)?.route_entries())?;
    assert_eq!(after, before, "FE_ROUTES after the failed change");
    ensure!(!routes(&ns)?.contains("10.234.4.0/24"), "{}", routes(&ns)?);
    fs::remove_file(&trigger)?;
    wait_for("the change to apply", Duration::from_secs(40), || {
        Ok(routes(&ns)?.contains("10.234.4.0/24 dev fe-tunnel"))
    })
    .with_context(|| agent.log())?;
    wait_for("the problem to clear", Duration::from_secs(5), || {
        Ok(problems(&ns, &root, &work)?
            .as_array()
            .is_some_and(Vec::is_empty))
    })?;
    Ok(())
}

/// Standalone mode sees a manifest replaced by rename (as `kubectl`, an
/// editor or a ConfigMap volume replace it) by itself, through inotify on
/// its directory: with a poll interval of an hour, a new Service is in
/// FE_SERVICES within seconds.
#[test]
fn a_manifest_replaced_by_rename_applies_without_waiting_for_the_poll() -> Result<()> {
    let host = AgentHost::new("inotify")?;
    let (ns, root, work) = (&host.ns, &host.root, &host.work);
    let manifest = work.join("cluster.yaml");
    fs::write(&manifest, EXAMPLE_CLUSTER)?;
    let agent = Agent::start_with(ns, root, work, &[], &["--poll-interval", "3600s"])?;
    let layout = PinLayout::new(root);
    let has_service = |addr: [u8; 4]| -> Result<bool> {
        Ok(Maps::open(&layout)
            .and_then(|maps| maps.service_entries())
            .is_ok_and(|entries| entries.iter().any(|(key, _)| key.addr == addr)))
    };
    wait_for("the first apply", Duration::from_secs(30), || {
        has_service([10, 96, 0, 10])
    })
    .with_context(|| agent.log())?;
    let next = work.join(".cluster.yaml.next");
    fs::write(&next, format!("{EXAMPLE_CLUSTER}{EDGE_4}"))?;
    fs::rename(&next, &manifest)?;
    wait_for("the new Service", Duration::from_secs(30), || {
        has_service([10, 96, 4, 4])
    })
    .with_context(|| agent.log())?;
    Ok(())
}

/// `--max-routes` sizes FE_ROUTES; a restart with another size is refused
/// naming the flag and both sizes, one without the flag keeps the pinned
/// size; an absurd size is refused before anything is created, naming the
/// memory it would take.
#[test]
fn map_sizes_follow_the_flags_and_a_pinned_map_of_another_size_is_refused() -> Result<()> {
    use fabedge_agent::maps::{Capacity, CapacityFlags};
    let root = bpffs_root("capacity");
    let _cleanup = Cleanup {
        root: root.clone(),
        dirs: Vec::new(),
    };
    let layout = PinLayout::new(&root);
    let result = (|| -> Result<()> {
        let small = Capacity {
            routes: 512,
            services: 256,
            backends: 1024,
            ct_entries: 2048,
        };
        let dp = Datapath::load_with_capacity(layout.clone(), AttachMode::Auto, small)?;
        for (map, entries) in [
            ("FE_ROUTES", 512),
            ("FE_SERVICES", 256),
            ("FE_BACKENDS", 1024),
            ("FE_CT", 2048),
        ] {
            let info = aya::maps::MapInfo::from_pin(layout.map(map))?;
            ensure!(
                info.max_entries() == entries,
                "{map}: {}",
                info.max_entries()
            );
        }
        drop(dp);
        let bigger = Capacity {
            routes: 1024,
            ..small
        };
        let err = match Datapath::load_with_capacity(layout.clone(), AttachMode::Auto, bigger) {
            Ok(_) => bail!("a pinned FE_ROUTES of 512 entries was adopted as 1024"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains("FE_ROUTES")
                && err.contains("holds 512 entries but --max-routes is 1024")
                && err.contains("start with --max-routes 512")
                && err.contains("fabedge-agent uninstall"),
            "{err}"
        );
        // Flags not given keep the pinned sizes (an upgrade whose defaults
        // grew adopts the node's maps); a flag given is taken as is.
        ensure!(Capacity::from_flags(&layout, CapacityFlags::default()) == small);
        let routes_given = CapacityFlags {
            routes: Some(1024),
            ..CapacityFlags::default()
        };
        ensure!(Capacity::from_flags(&layout, routes_given) == bigger);
        let fresh = PinLayout::new(&bpffs_root("capacity-fresh"));
        ensure!(Capacity::from_flags(&fresh, CapacityFlags::default()) == Capacity::default());
        Ok(())
    })();
    result?;
    // Through the CLI: refused before any pin is made.
    let absurd = bpffs_root("absurd");
    let out = fabedge_tests::agent::agent_output(
        None,
        &absurd,
        &[
            "run",
            "--node",
            "edge-1",
            "--manifests",
            "/nonexistent.yaml",
            "--max-backends",
            "4000000000",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the agent started with --max-backends 4000000000"
    );
    ensure!(
        stderr.contains(
            "--max-backends 4000000000 would take about 298.0 GiB of kernel memory for FE_BACKENDS"
        ),
        "{stderr}"
    );
    ensure!(!absurd.exists(), "{} was created", absurd.display());
    Ok(())
}

/// A plan larger than `--max-routes` is refused whole: FE_ROUTES and the
/// kernel stay empty, and `inspect problems` names the flag to raise.
#[test]
fn a_plan_over_max_routes_writes_nothing_and_names_the_flag() -> Result<()> {
    let host = AgentHost::new("maxroutes")?;
    let (ns, root, work) = (&host.ns, &host.root, &host.work);
    fs::write(work.join("cluster.yaml"), EXAMPLE_CLUSTER)?;
    let agent = Agent::start_with(&ns, &root, &work, &[], &["--max-routes", "2"])?;
    wait_for("the refusal to be listed", Duration::from_secs(30), || {
        Ok(problems(&ns, &root, &work)?
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["object"] == "apply (checks)"
                    && p["problem"].as_str().is_some_and(|m| {
                        m.contains("FE_ROUTES holds 2: nothing was applied")
                            && m.contains("raise --max-routes")
                    })
            }))
    })
    .with_context(|| agent.log())?;
    let layout = PinLayout::new(&root);
    let entries = ns.enter(|| Maps::open(&layout)?.route_entries())?;
    ensure!(entries.is_empty(), "FE_ROUTES: {entries:?}");
    let table = routes(&ns)?;
    ensure!(!table.contains("fe-tunnel"), "{table}");
    Ok(())
}

/// At a full `FE_BACKENDS` (`--max-backends 4`), replacing two Services by
/// one with four backends applies: the backends only the removed Services
/// pointed at make room before the new ones are written.
#[test]
fn a_full_backend_map_swaps_services_within_max_backends() -> Result<()> {
    use std::net::Ipv4Addr;

    use fabedge_agent::{
        maps::Capacity,
        services::{
            apply::apply_services,
            plan::{Frontend, ServicePlan},
        },
    };
    let frontend = |n: u8, backends: u8| {
        let key = ServiceKey {
            addr: [10, 96, 9, n],
            port: 80,
            proto: 6,
            _pad: 0,
        };
        let backends: Vec<Backend> = (0..backends)
            .map(|b| Backend {
                addr: Ipv4Addr::new(10, 234, n, b).octets(),
                port: 8080,
                flags: 0,
                _pad: 0,
            })
            .collect();
        let entry = ServiceEntry {
            id: 0,
            count: backends.len() as u16,
            flags: 0,
            _pad: 0,
            affinity_timeout: 0,
        };
        (
            key,
            Frontend {
                name: format!("default/svc-{n}:http"),
                entry,
                backends,
            },
        )
    };
    let root = bpffs_root("backends-full");
    let _cleanup = Cleanup {
        root: root.clone(),
        dirs: Vec::new(),
    };
    let result = (|| -> Result<()> {
        let capacity = Capacity {
            backends: 4,
            ..Capacity::default()
        };
        let dp = Datapath::load_with_capacity(PinLayout::new(&root), AttachMode::Auto, capacity)?;
        let mut maps = Maps::open(dp.layout())?;
        let mut full = ServicePlan::default();
        full.frontends.extend([frontend(1, 2), frontend(2, 2)]);
        apply_services(&mut maps, &full)?;
        ensure!(maps.backend_entries()?.len() == 4, "not full");

        let mut swapped = ServicePlan::default();
        swapped.frontends.extend([frontend(3, 4)]);
        apply_services(&mut maps, &swapped)?;
        let services = maps.service_entries()?;
        ensure!(
            services.len() == 1 && services[0].0.addr == [10, 96, 9, 3] && services[0].1.count == 4,
            "{services:?}"
        );
        let id = services[0].1.id;
        let backends = maps.backend_entries()?;
        let want: Vec<(BackendKey, [u8; 4])> = (0..4)
            .map(|slot| {
                (
                    BackendKey {
                        service_id: id,
                        slot: slot as u32,
                    },
                    [10, 234, 3, slot],
                )
            })
            .collect();
        let got: Vec<(BackendKey, [u8; 4])> = backends.iter().map(|(k, b)| (*k, b.addr)).collect();
        assert_eq!(got, want);
        Ok(())
    })();
    result
}
