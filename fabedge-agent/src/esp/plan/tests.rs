use std::collections::BTreeMap;

use super::*;
use crate::{
    esp::keys::NodeKey,
    plan::{PeerIds, Settings, plan},
    source::manifest::{self, EXAMPLE_CLUSTER, set_node_annotations},
};

/// Node keys derived from the name, so every test node has a fixed key.
fn key_of(name: &str) -> NodeKey {
    let mut seed = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        seed[i % 32] ^= b;
    }
    seed[31] = 0x42;
    NodeKey::from_secret_bytes(seed)
}

/// The example cluster with every node's public key and generation published.
fn cluster(generations: &[(&str, u32)]) -> Snapshot {
    manifest::snapshot(&cluster_text(generations)).unwrap()
}

fn cluster_text(generations: &[(&str, u32)]) -> String {
    let bare = manifest::snapshot(EXAMPLE_CLUSTER).unwrap();
    let mut text = EXAMPLE_CLUSTER.to_owned();
    for name in bare.nodes.keys() {
        let mut set = BTreeMap::new();
        set.insert(
            PUBLIC_KEY_ANNOTATION.to_owned(),
            key_of(name).public().to_base64(),
        );
        if let Some((_, g)) = generations.iter().find(|(n, _)| n == name) {
            set.insert(KEY_GENERATION_ANNOTATION.to_owned(), g.to_string());
        }
        text = set_node_annotations(&text, name, &set, &[]).unwrap();
    }
    text
}

fn settings() -> Settings {
    Settings {
        uplink: Some("eth0".into()),
        flannel_mac: Some([2, 0, 0, 0, 0, 1]),
        tunnel_mode: crate::plan::TunnelMode::Esp,
        ..Settings::default()
    }
}

/// Every tunnel peer's hello seen at its published endpoint (no NAT).
fn hellos_from_every_peer(plan: &Plan) -> ObservedEndpoints {
    plan.peers
        .iter()
        .filter(|(_, p)| p.kind == fabedge_common::peer_kind::TUNNEL)
        .filter_map(|(&id, p)| {
            Some((
                plan.peer_name(id)?.to_owned(),
                (Ipv4Addr::from(p.underlay_ip), ESP_IN_UDP_PORT),
            ))
        })
        .collect()
}

fn esp_for(snapshot: &Snapshot, node: &str, generation: u32) -> (Plan, EspPlan) {
    let plan = plan(snapshot, node, &settings(), &PeerIds::new()).unwrap();
    let esp = plan_esp(
        snapshot,
        &plan,
        LocalKeys {
            key: &key_of(node),
            nonce: None,
        },
        generation,
        &hellos_from_every_peer(&plan),
        &PinnedGenerations::new(),
    );
    (plan, esp)
}

/// Generation 1, no hello seen from anyone.
fn esp_without_hellos(snapshot: &Snapshot, node: &str) -> (Plan, EspPlan) {
    let plan = plan(snapshot, node, &settings(), &PeerIds::new()).unwrap();
    let esp = plan_esp(
        snapshot,
        &plan,
        LocalKeys {
            key: &key_of(node),
            nonce: None,
        },
        1,
        &ObservedEndpoints::new(),
        &PinnedGenerations::new(),
    );
    (plan, esp)
}

fn sa<'a>(esp: &'a EspPlan, peer: &str, direction: Direction, generation: u32) -> &'a PlannedSa {
    esp.sas
        .iter()
        .find(|s| s.peer == peer && s.direction == direction && s.generation == generation)
        .unwrap_or_else(|| panic!("no {direction:?} SA gen {generation} with {peer}"))
}

#[test]
fn each_outbound_sa_is_the_peers_inbound_sa_for_that_generation() {
    let snapshot = cluster(&[("edge-1", 5), ("cloud-1", 9)]);
    let (_, edge) = esp_for(&snapshot, "edge-1", 5);
    let (_, connector) = esp_for(&snapshot, "cloud-1", 9);
    let out = sa(&edge, "cloud-1", Direction::Out, 5);
    let inbound = sa(&connector, "edge-1", Direction::In, 5);
    assert_eq!(out.spec.spi, inbound.spec.spi);
    assert_eq!(out.spec.key, inbound.spec.key);
    assert_eq!(
        (out.spec.src, out.spec.dst),
        (inbound.spec.src, inbound.spec.dst)
    );
    // And the other way round.
    let back = sa(&connector, "edge-1", Direction::Out, 9);
    assert_eq!(
        back.spec.key,
        sa(&edge, "cloud-1", Direction::In, 9).spec.key
    );
    assert_ne!(
        back.spec.key, out.spec.key,
        "the two directions have their own keys"
    );
}

#[test]
fn inbound_sas_cover_the_peers_generation_and_its_neighbours() {
    let snapshot = cluster(&[("cloud-1", 9)]);
    let (_, edge) = esp_for(&snapshot, "edge-1", 1);
    let gens: Vec<u32> = edge
        .sas
        .iter()
        .filter(|s| s.peer == "cloud-1" && s.direction == Direction::In)
        .map(|s| s.generation)
        .collect();
    assert_eq!(gens, [8, 9, 10, 11]);
    let spis: std::collections::BTreeSet<u32> = edge
        .sas
        .iter()
        .filter(|s| s.direction == Direction::In)
        .map(|s| s.spec.spi)
        .collect();
    assert_eq!(
        spis.len(),
        edge.sas
            .iter()
            .filter(|s| s.direction == Direction::In)
            .count(),
        "inbound SPIs unique"
    );
}

#[test]
fn marks_tie_policies_and_sas_to_the_receivers_peer_ids() {
    let snapshot = cluster(&[]);
    let (plan, esp) = esp_for(&snapshot, "edge-1", 1);
    let id = plan.peer_ids.get("cloud-1").unwrap();
    let policy = esp
        .policies
        .iter()
        .find(|p| p.dir == PolicyDir::Out && p.mark == out_mark(id))
        .expect("policy");
    assert_eq!(policy.mark.0 >> 16, u32::from(id));
    assert_eq!(policy.mark.0 & mark::MAGIC_MASK, mark::MAGIC_TO_TUNNEL);
    assert_eq!(policy.tmpl.unwrap().reqid, u32::from(id));
    assert_eq!(
        policy.tmpl.unwrap().dst,
        snapshot.nodes["cloud-1"].tunnel_endpoint
    );
    let inbound = sa(&esp, "cloud-1", Direction::In, 1);
    assert_eq!(
        inbound.spec.set_mark,
        Some((mark::from_tunnel(0, id), mark::OWNED_MASK))
    );
    assert_eq!(
        inbound.spec.encap,
        Some(Encap {
            sport: 4500,
            dport: 4500
        })
    );
    assert_eq!(
        sa(&esp, "cloud-1", Direction::Out, 1).spec.set_mark,
        Some((0, mark::OWNED_MASK))
    );
}

#[test]
fn default_drop_is_below_every_peer_policy_and_matches_the_magic_only() {
    let (_, esp) = esp_for(&cluster(&[]), "cloud-1", 1);
    let drop = esp
        .policies
        .iter()
        .find(|p| p.action == PolicyAction::Block)
        .expect("a default drop");
    assert_eq!(drop.mark, (mark::MAGIC_TO_TUNNEL, mark::MAGIC_MASK));
    assert_eq!(drop.dir, PolicyDir::Out);
    for peer in esp
        .policies
        .iter()
        .filter(|p| p.dir == PolicyDir::Out && p.action == PolicyAction::Allow)
    {
        assert!(
            peer.priority < drop.priority,
            "peer policies must win over the drop"
        );
        assert_eq!(
            peer.mark.0 & drop.mark.1,
            drop.mark.0,
            "every peer mark also matches the drop"
        );
    }
}

#[test]
fn a_peer_without_a_public_key_gets_no_sa_and_a_warning() {
    let snapshot = manifest::snapshot(EXAMPLE_CLUSTER).unwrap();
    let (_, esp) = esp_for(&snapshot, "edge-1", 1);
    assert!(esp.sas.is_empty());
    assert!(
        esp.warnings
            .iter()
            .any(|w| w.contains("cloud-1") && w.contains(PUBLIC_KEY_ANNOTATION)),
        "{:?}",
        esp.warnings
    );
    assert!(
        esp.policies.iter().any(|p| p.action == PolicyAction::Block),
        "the drop is there regardless"
    );
}

#[test]
fn nat_observed_endpoints_replace_the_published_one() {
    let snapshot = cluster(&[]);
    let plan = plan(&snapshot, "cloud-1", &settings(), &PeerIds::new()).unwrap();
    let public = "203.0.113.7".parse().unwrap();
    let observed: ObservedEndpoints = [("edge-1".to_owned(), (public, 61001))].into();
    let esp = plan_esp(
        &snapshot,
        &plan,
        LocalKeys {
            key: &key_of("cloud-1"),
            nonce: None,
        },
        1,
        &observed,
        &PinnedGenerations::new(),
    );
    let out = sa(&esp, "edge-1", Direction::Out, 1);
    assert_eq!(
        (out.spec.dst, out.spec.encap),
        (
            public,
            Some(Encap {
                sport: 4500,
                dport: 61001
            })
        )
    );
    let id = plan.peer_ids.get("edge-1").unwrap();
    let policy = esp
        .policies
        .iter()
        .find(|p| p.mark == out_mark(id))
        .unwrap();
    assert_eq!(policy.tmpl.unwrap().dst, public);
}

/// `text` with `annotations` set on `node`.
fn annotate(snapshot_text: &str, node: &str, key: &str, value: &str) -> String {
    let set: BTreeMap<String, String> = [(key.to_owned(), value.to_owned())].into();
    set_node_annotations(snapshot_text, node, &set, &[]).unwrap()
}

#[test]
fn a_connector_behind_a_port_forward_is_reached_at_the_endpoint_it_publishes() {
    let text = annotate(
        &cluster_text(&[]),
        "cloud-1",
        ESP_ENDPOINT_ANNOTATION,
        "192.0.2.44:14500",
    );
    let snapshot = manifest::snapshot(&text).unwrap();
    let (plan, esp) = esp_without_hellos(&snapshot, "edge-1");
    let out = sa(&esp, "cloud-1", Direction::Out, 1);
    let forwarded: Ipv4Addr = "192.0.2.44".parse().unwrap();
    assert_eq!(
        (out.spec.dst, out.spec.encap),
        (
            forwarded,
            Some(Encap {
                sport: 4500,
                dport: 14500
            })
        )
    );
    let inbound = sa(&esp, "cloud-1", Direction::In, 1);
    assert_eq!(
        inbound.spec.encap,
        Some(Encap {
            sport: 14500,
            dport: 4500
        })
    );
    let id = plan.peer_ids.get("cloud-1").unwrap();
    let policy = esp
        .policies
        .iter()
        .find(|p| p.mark == out_mark(id))
        .unwrap();
    assert_eq!(policy.tmpl.unwrap().dst, forwarded);
    // What the edge observes from hellos wins over what is published.
    let observed: ObservedEndpoints = [(
        "cloud-1".to_owned(),
        ("198.51.100.9".parse().unwrap(), 4501),
    )]
    .into();
    let esp = plan_esp(
        &snapshot,
        &plan,
        LocalKeys {
            key: &key_of("edge-1"),
            nonce: None,
        },
        1,
        &observed,
        &PinnedGenerations::new(),
    );
    assert_eq!(
        sa(&esp, "cloud-1", Direction::Out, 1)
            .spec
            .encap
            .unwrap()
            .dport,
        4501
    );
}

#[test]
fn a_malformed_published_endpoint_is_a_warning_and_the_tunnel_endpoint_is_used() {
    for bad in [
        "cloud-1:4500",
        "192.0.2.44",
        "192.0.2.44:0",
        "0.0.0.0:4500",
        "[::1]:4500",
    ] {
        let text = annotate(&cluster_text(&[]), "cloud-1", ESP_ENDPOINT_ANNOTATION, bad);
        let snapshot = manifest::snapshot(&text).unwrap();
        let (plan, esp) = esp_without_hellos(&snapshot, "edge-1");
        let out = sa(&esp, "cloud-1", Direction::Out, 1);
        let id = plan.peer_ids.get("cloud-1").unwrap();
        let underlay = Ipv4Addr::from(plan.peers[&id].underlay_ip);
        assert_eq!(
            (out.spec.dst, out.spec.encap.unwrap().dport),
            (underlay, ESP_IN_UDP_PORT),
            "{bad}"
        );
        assert!(
            esp.warnings
                .iter()
                .any(|w| w.contains(ESP_ENDPOINT_ANNOTATION) && w.contains(bad)),
            "{bad}: {:?}",
            esp.warnings
        );
    }
}

#[test]
fn a_pinned_peer_keeps_its_sa_one_generation_behind_and_no_further() {
    let snapshot = cluster(&[]);
    let plan = plan(&snapshot, "cloud-1", &settings(), &PeerIds::new()).unwrap();
    let none = hellos_from_every_peer(&plan);
    let pinned: PinnedGenerations = [("edge-1".to_owned(), 4), ("edge-2".to_owned(), 3)].into();
    let esp = plan_esp(
        &snapshot,
        &plan,
        LocalKeys {
            key: &key_of("cloud-1"),
            nonce: None,
        },
        5,
        &none,
        &pinned,
    );
    let outbound = |peer: &str| {
        esp.sas
            .iter()
            .filter(|s| s.peer == peer && s.direction == Direction::Out)
            .map(|s| s.generation)
            .collect::<Vec<_>>()
    };
    assert_eq!(outbound("edge-1"), [4], "one behind: kept");
    assert_eq!(
        outbound("edge-2"),
        [5],
        "two behind would leave the receiver's window"
    );
    assert_eq!(outbound("edge-3"), [5]);
    // The kept SA is the very one planned at generation 4: same SPI, same key.
    let at_4 = plan_esp(
        &snapshot,
        &plan,
        LocalKeys {
            key: &key_of("cloud-1"),
            nonce: None,
        },
        4,
        &none,
        &PinnedGenerations::new(),
    );
    assert_eq!(
        sa(&esp, "edge-1", Direction::Out, 4),
        sa(&at_4, "edge-1", Direction::Out, 4)
    );
}

#[test]
fn the_connector_sends_to_an_edge_only_after_its_hello() {
    let snapshot = cluster(&[]);
    let plan = plan(&snapshot, "cloud-1", &settings(), &PeerIds::new()).unwrap();
    let mut observed = hellos_from_every_peer(&plan);
    observed.remove("edge-2");
    let esp = plan_esp(
        &snapshot,
        &plan,
        LocalKeys {
            key: &key_of("cloud-1"),
            nonce: None,
        },
        1,
        &observed,
        &PinnedGenerations::new(),
    );
    assert_eq!(esp.waiting, ["edge-2"]);
    assert!(
        !esp.sas
            .iter()
            .any(|s| s.peer == "edge-2" && s.direction == Direction::Out)
    );
    // Its inbound SAs exist: the edge opens the tunnel.
    assert!(
        esp.sas
            .iter()
            .any(|s| s.peer == "edge-2" && s.direction == Direction::In)
    );
    let id = plan.peer_ids.get("edge-2").unwrap();
    assert!(
        !esp.policies.iter().any(|p| p.mark == out_mark(id)),
        "its traffic meets the default drop"
    );
    assert!(
        esp.sas
            .iter()
            .any(|s| s.peer == "edge-1" && s.direction == Direction::Out)
    );
    // Edges themselves never wait.
    let (_, edge) = esp_for(&snapshot, "edge-1", 1);
    assert!(edge.waiting.is_empty());
    let edge_plan = crate::plan::plan(&snapshot, "edge-1", &settings(), &PeerIds::new()).unwrap();
    let no_hellos = plan_esp(
        &snapshot,
        &edge_plan,
        LocalKeys {
            key: &key_of("edge-1"),
            nonce: None,
        },
        1,
        &ObservedEndpoints::new(),
        &PinnedGenerations::new(),
    );
    assert!(
        no_hellos
            .sas
            .iter()
            .any(|s| s.peer == "cloud-1" && s.direction == Direction::Out)
    );
}

/// A node's nonce, fixed per name and "boot" so tests can lose state.
fn nonce_of(name: &str, boot: u8) -> KeyNonce {
    let mut bytes = [boot; crate::esp::keys::NONCE_LEN];
    for (i, b) in name.bytes().enumerate() {
        bytes[i % bytes.len()] ^= b;
    }
    KeyNonce::from_bytes(bytes)
}

/// edge-1's outbound SA of generation 5 to cloud-1 and cloud-1's inbound
/// one for it, with edge-1 at `edge_boot` and cloud-1 at `connector_boot`.
fn edge_to_connector(edge_boot: u8, connector_boot: u8) -> (PlannedSa, PlannedSa) {
    let mut text = cluster_text(&[("edge-1", 5), ("cloud-1", 9)]);
    for (node, boot) in [("edge-1", edge_boot), ("cloud-1", connector_boot)] {
        text = annotate(
            &text,
            node,
            KEY_NONCE_ANNOTATION,
            &nonce_of(node, boot).to_base64(),
        );
    }
    let snapshot = manifest::snapshot(&text).unwrap();
    let side = |node: &str, boot: u8, generation: u32| {
        let plan = plan(&snapshot, node, &settings(), &PeerIds::new()).unwrap();
        let nonce = nonce_of(node, boot);
        plan_esp(
            &snapshot,
            &plan,
            LocalKeys {
                key: &key_of(node),
                nonce: Some(&nonce),
            },
            generation,
            &hellos_from_every_peer(&plan),
            &PinnedGenerations::new(),
        )
    };
    let edge = side("edge-1", edge_boot, 5);
    let connector = side("cloud-1", connector_boot, 9);
    (
        sa(&edge, "cloud-1", Direction::Out, 5).clone(),
        sa(&connector, "edge-1", Direction::In, 5).clone(),
    )
}

#[test]
fn both_ends_mix_their_published_nonces_into_the_same_key() {
    let (out, inbound) = edge_to_connector(1, 1);
    assert_eq!(out.spec.spi, inbound.spec.spi);
    assert_eq!(out.spec.key, inbound.spec.key);
    let (_, without_nonces) = esp_for(&cluster(&[("edge-1", 5), ("cloud-1", 9)]), "edge-1", 5);
    assert_ne!(
        out.spec.key,
        sa(&without_nonces, "cloud-1", Direction::Out, 5).spec.key,
        "nonces change the key"
    );
}

#[test]
fn state_loss_on_either_side_yields_new_keys_for_the_same_generation() {
    let (before, _) = edge_to_connector(1, 1);
    // The edge lost its state (new nonce), same generation and SPI.
    let (edge_lost, connector_view) = edge_to_connector(2, 1);
    assert_eq!(edge_lost.spec.spi, before.spec.spi);
    assert_ne!(edge_lost.spec.key, before.spec.key);
    assert_eq!(edge_lost.spec.key, connector_view.spec.key);
    // The connector lost its state: its inbound keys are new too, so ESP
    // recorded earlier fails authentication instead of meeting an empty
    // replay window.
    let (edge_view, connector_lost) = edge_to_connector(1, 2);
    assert_ne!(connector_lost.spec.key, before.spec.key);
    assert_eq!(edge_view.spec.key, connector_lost.spec.key);
}

#[test]
fn a_malformed_nonce_is_a_warning_and_no_tunnel() {
    let text = annotate(
        &cluster_text(&[]),
        "cloud-1",
        KEY_NONCE_ANNOTATION,
        "not base64!",
    );
    let snapshot = manifest::snapshot(&text).unwrap();
    let (_, esp) = esp_for(&snapshot, "edge-1", 1);
    assert!(esp.sas.iter().all(|s| s.peer != "cloud-1"));
    assert!(
        esp.warnings
            .iter()
            .any(|w| w.contains("cloud-1") && w.contains(KEY_NONCE_ANNOTATION)),
        "{:?}",
        esp.warnings
    );
}

#[test]
fn outbound_sas_have_limits_and_inbound_ones_follow_the_sender() {
    let (_, esp) = esp_for(&cluster(&[]), "edge-1", 1);
    for sa in &esp.sas {
        match sa.direction {
            Direction::Out => assert_eq!(sa.spec.lifetime, OUTBOUND_LIFETIME),
            Direction::In => assert_eq!(sa.spec.lifetime, Lifetime::INFINITE),
        }
    }
}

/// What a connector's datapath lets ESP in UDP and probes in from besides
/// tunnel endpoints: where edges' NATs show them (learnt from hellos), and
/// a peer's published port forward; nothing in VXLAN mode.
#[test]
fn the_plan_indexes_nat_observed_and_published_esp_senders() {
    let public: Ipv4Addr = "203.0.113.7".parse().unwrap();
    let forward: Ipv4Addr = "198.51.100.9".parse().unwrap();
    let text = set_node_annotations(
        &cluster_text(&[]),
        "edge-2",
        &BTreeMap::from([(
            ESP_ENDPOINT_ANNOTATION.to_owned(),
            format!("{forward}:14500"),
        )]),
        &[],
    )
    .unwrap();
    let snapshot = manifest::snapshot(&text).unwrap();
    let mut settings = settings();
    settings.esp_observed = [
        ("edge-1".to_owned(), (public, 61001)),
        ("edge-3".to_owned(), (public, 61002)),
    ]
    .into();
    let plan = plan_fn(&snapshot, &settings);
    let id = |name: &str| plan.peer_ids.get(name).unwrap();
    assert_eq!(
        plan.esp_senders,
        BTreeMap::from([
            (public, id("edge-1").min(id("edge-3"))),
            (forward, id("edge-2")),
        ])
    );
    assert_eq!(
        plan.esp_senders_with(&snapshot, &settings.esp_observed),
        plan.esp_senders
    );
    // Every hello seen at its sender's tunnel endpoint (no NAT, and what
    // is observed wins over what is published): nothing to add.
    let mut no_nat = settings.clone();
    no_nat.esp_observed = hellos_from_every_peer(&plan);
    assert_eq!(plan_fn(&snapshot, &no_nat).esp_senders, BTreeMap::new());
    let mut vxlan = settings.clone();
    vxlan.tunnel_mode = crate::plan::TunnelMode::Vxlan;
    assert!(plan_fn(&snapshot, &vxlan).esp_senders.is_empty());
}

fn plan_fn(snapshot: &Snapshot, settings: &Settings) -> Plan {
    plan(snapshot, "cloud-1", settings, &PeerIds::new()).unwrap()
}
