use std::net::Ipv4Addr;

use super::*;
use crate::esp::keys::NodeKey;

fn sa_key() -> SaKey {
    NodeKey::from_secret_bytes([1; 32])
        .shared_with(&NodeKey::from_secret_bytes([2; 32]).public())
        .sa_key("a", "b", 1, None)
}

fn spec() -> SaSpec {
    SaSpec {
        src: Ipv4Addr::new(198, 18, 0, 11),
        dst: Ipv4Addr::new(198, 18, 0, 1),
        spi: 0x4012_3401,
        reqid: 3,
        key: sa_key(),
        encap: Some(Encap {
            sport: 4500,
            dport: 61000,
        }),
        if_id: 0x4645,
        set_mark: Some((0x0003_0D00, 0xFFFF_3F00)),
        replay_window: REPLAY_WINDOW,
        lifetime: Lifetime::default(),
    }
}

/// (type, value) of every attribute after the body.
fn attributes(msg: &[u8], body: usize) -> Vec<(u16, Vec<u8>)> {
    attrs(&msg[16 + body..])
        .map(|(k, v)| (k, v.to_vec()))
        .collect()
}

#[test]
fn new_sa_lays_out_xfrm_usersa_info_and_its_attributes() {
    let msg = new_sa(&spec(), 7, false);
    assert_eq!(
        u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
        msg.len()
    );
    assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), XFRM_MSG_NEWSA);
    assert_eq!(
        u16::from_ne_bytes([msg[6], msg[7]]),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    );
    assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
    let info = &msg[16..16 + 224];
    assert_eq!(&info[56..60], &[198, 18, 0, 1], "id.daddr");
    assert_eq!(
        &info[72..76],
        &[0x40, 0x12, 0x34, 0x01],
        "SPI in network order"
    );
    assert_eq!(info[76], 50, "ESP");
    assert_eq!(&info[80..84], &[198, 18, 0, 11], "saddr");
    assert_eq!(
        u64::from_ne_bytes(info[96..104].try_into().unwrap()),
        u64::MAX,
        "no byte limit"
    );
    assert_eq!(
        u64::from_ne_bytes(info[128..136].try_into().unwrap()),
        0,
        "no time limit"
    );
    assert_eq!(
        u32::from_ne_bytes(info[208..212].try_into().unwrap()),
        3,
        "reqid"
    );
    assert_eq!(u16::from_ne_bytes([info[212], info[213]]), 2, "AF_INET");
    assert_eq!(info[214], 1, "tunnel mode");
    assert_eq!(info[215], 0, "legacy window off: ESN carries it");
    assert_eq!(info[216], XFRM_STATE_ESN, "extended sequence numbers");
    assert_eq!(
        u16::from_ne_bytes([info[40], info[41]]),
        2,
        "selector family"
    );

    let attrs = attributes(&msg, 224);
    let kinds: Vec<u16> = attrs.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        [
            XFRMA_ALG_AEAD,
            XFRMA_REPLAY_ESN_VAL,
            XFRMA_ENCAP,
            XFRMA_IF_ID,
            XFRMA_SET_MARK,
            XFRMA_SET_MARK_MASK
        ]
    );
    let aead = &attrs[0].1;
    assert_eq!(aead.len(), 72 + 36);
    assert_eq!(&aead[..17], b"rfc4106(gcm(aes))");
    assert!(aead[17..64].iter().all(|b| *b == 0), "NUL-padded name");
    assert_eq!(
        u32::from_ne_bytes(aead[64..68].try_into().unwrap()),
        288,
        "key length in bits: AES-256 + salt"
    );
    assert_eq!(
        u32::from_ne_bytes(aead[68..72].try_into().unwrap()),
        128,
        "ICV bits"
    );
    assert_eq!(&aead[72..], sa_key().expose());
    let esn = &attrs[1].1;
    assert_eq!(
        esn.len(),
        24 + 16,
        "xfrm_replay_state_esn and a 128-bit bitmap"
    );
    assert_eq!(
        u32::from_ne_bytes(esn[0..4].try_into().unwrap()),
        4,
        "bmp_len"
    );
    assert!(
        esn[4..20].iter().all(|b| *b == 0),
        "sequence numbers from 0"
    );
    assert_eq!(
        u32::from_ne_bytes(esn[20..24].try_into().unwrap()),
        u32::from(REPLAY_WINDOW)
    );
    let encap = &attrs[2].1;
    assert_eq!(encap.len(), 24);
    assert_eq!(u16::from_ne_bytes([encap[0], encap[1]]), UDP_ENCAP_ESPINUDP);
    assert_eq!(
        &encap[2..6],
        &[0x11, 0x94, 0xEE, 0x48],
        "ports 4500 and 61000 in network order"
    );
    assert_eq!(attrs[3].1, 0x4645u32.to_ne_bytes());
    assert_eq!(attrs[4].1, 0x0003_0D00u32.to_ne_bytes());
    assert_eq!(attrs[5].1, 0xFFFF_3F00u32.to_ne_bytes());
}

#[test]
fn lifetimes_and_esn_are_laid_out_and_parse_back() {
    let mut sa = spec();
    sa.lifetime = Lifetime {
        soft_bytes: 1 << 40,
        hard_bytes: 1 << 41,
        soft_packets: 1000,
        hard_packets: 2000,
    };
    sa.replay_window = 0;
    let msg = new_sa(&sa, 1, false);
    let info = &msg[16..16 + 224];
    let u64_at = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().unwrap());
    assert_eq!(
        [u64_at(96), u64_at(104), u64_at(112), u64_at(120)],
        [1 << 40, 1 << 41, 1000, 2000],
        "soft/hard byte and packet limits of xfrm_lifetime_cfg"
    );
    // An outbound SA (no window of its own) still gets one: the kernel
    // refuses ESN without.
    let esn = attributes(&msg, 224)
        .into_iter()
        .find(|(k, _)| *k == XFRMA_REPLAY_ESN_VAL)
        .unwrap()
        .1;
    assert_eq!(u32::from_ne_bytes(esn[20..24].try_into().unwrap()), 32);
    let parsed = parse_sa(&msg[16..]).unwrap();
    assert_eq!(parsed.lifetime, sa.lifetime);
    assert!(parsed.esn);
    assert_eq!(parsed.replay_window, 32);
    assert_eq!(parsed.key_digest, Some(key_digest(sa.key.expose())));
}

#[test]
fn a_redacted_key_is_unknown_not_a_mismatch() {
    let mut msg = new_sa(&spec(), 1, false);
    // The AEAD attribute's key bytes, zeroed as under lockdown.
    let key_at = 16 + 224 + 4 + 72;
    msg[key_at..key_at + 36].fill(0);
    assert_eq!(parse_sa(&msg[16..]).unwrap().key_digest, None);
}

#[test]
fn expire_events_name_the_sa_and_say_soft_or_hard() {
    // xfrm_user_expire as the kernel sends it: the state, `hard`, padding,
    // then the state's attributes.
    let added = new_sa(&spec(), 1, false);
    let mut payload = added[16..16 + 224].to_vec();
    payload.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    payload.extend_from_slice(&[8, 0]);
    payload.extend_from_slice(&XFRMA_IF_ID.to_ne_bytes());
    payload.extend_from_slice(&0x4645u32.to_ne_bytes());
    let expire = parse_expire(&payload).unwrap();
    assert!(expire.hard);
    assert_eq!(
        (expire.sa.dst, expire.sa.spi, expire.sa.if_id),
        (Some(Ipv4Addr::new(198, 18, 0, 1)), 0x4012_3401, 0x4645)
    );
    payload[224] = 0;
    assert!(!parse_expire(&payload).unwrap().hard, "soft");
    assert_eq!(parse_expire(&payload[..230]), None, "truncated");
}

#[test]
fn update_sa_replaces_without_create_flags() {
    let msg = new_sa(&spec(), 1, true);
    assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), XFRM_MSG_UPDSA);
    assert_eq!(
        u16::from_ne_bytes([msg[6], msg[7]]) & (NLM_F_CREATE | NLM_F_EXCL),
        0
    );
}

#[test]
fn sa_without_encap_or_mark_has_only_the_aead_and_esn() {
    let mut sa = spec();
    sa.encap = None;
    sa.set_mark = None;
    sa.if_id = 0;
    let kinds: Vec<u16> = attributes(&new_sa(&sa, 1, false), 224)
        .iter()
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(kinds, [XFRMA_ALG_AEAD, XFRMA_REPLAY_ESN_VAL]);
}

#[test]
fn sa_debug_output_has_no_key() {
    let printed = format!("{:?}", spec());
    let key_hex: String = sa_key().expose().iter().map(|b| format!("{b}, ")).collect();
    assert!(!printed.contains(&key_hex[..20]), "{printed}");
    assert!(printed.contains("<redacted>"));
}

#[test]
fn outbound_policy_matches_the_mark_and_tunnels_to_the_peer() {
    let policy = PolicySpec {
        dir: PolicyDir::Out,
        priority: 100,
        mark: (0x0005_0E00, 0xFFFF_0F00),
        if_id: 0x4645,
        action: PolicyAction::Allow,
        tmpl: Some(Tmpl {
            src: Ipv4Addr::new(198, 18, 0, 1),
            dst: Ipv4Addr::new(198, 18, 0, 21),
            reqid: 5,
        }),
    };
    let msg = update_policy(&policy, 9);
    assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), XFRM_MSG_UPDPOLICY);
    let info = &msg[16..16 + 168];
    assert_eq!(u32::from_ne_bytes(info[152..156].try_into().unwrap()), 100);
    assert_eq!(info[160], 1, "XFRM_POLICY_OUT");
    assert_eq!(info[161], 0, "XFRM_POLICY_ALLOW");
    assert!(
        info[0..40].iter().all(|b| *b == 0),
        "selector: any address, any port"
    );
    let attrs = attributes(&msg, 168);
    assert_eq!(
        attrs.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        [XFRMA_TMPL, XFRMA_MARK, XFRMA_IF_ID]
    );
    let tmpl = &attrs[0].1;
    assert_eq!(tmpl.len(), 64);
    assert_eq!(&tmpl[0..4], &[198, 18, 0, 21], "tmpl id.daddr");
    assert_eq!(tmpl[20], 50, "ESP");
    assert_eq!(&tmpl[28..32], &[198, 18, 0, 1], "tmpl saddr");
    assert_eq!(
        u32::from_ne_bytes(tmpl[44..48].try_into().unwrap()),
        5,
        "reqid"
    );
    assert_eq!(tmpl[48], 1, "tunnel mode");
    assert_eq!(&tmpl[52..64], &[0xff; 12], "any algorithms");
    assert_eq!(
        attrs[1].1,
        [0x0005_0E00u32.to_ne_bytes(), 0xFFFF_0F00u32.to_ne_bytes()].concat()
    );
    let parsed = parse_policy(&msg[16..]).unwrap();
    assert_eq!(
        (parsed.dir, parsed.priority, parsed.mark, parsed.if_id),
        (1, 100, policy.mark, 0x4645)
    );
    assert_eq!(parsed.tmpl_dst, Some(Ipv4Addr::new(198, 18, 0, 21)));
}

#[test]
fn default_drop_policy_blocks_on_the_magic_only() {
    let policy = PolicySpec {
        dir: PolicyDir::Out,
        priority: 1000,
        mark: (0x0E00, 0x0F00),
        if_id: 0x4645,
        action: PolicyAction::Block,
        tmpl: None,
    };
    let msg = update_policy(&policy, 1);
    assert_eq!(msg[16 + 161], 1, "XFRM_POLICY_BLOCK");
    let kinds: Vec<u16> = attributes(&msg, 168).iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        [XFRMA_MARK, XFRMA_IF_ID],
        "no template: nothing to encrypt with, so nothing leaves"
    );
}

#[test]
fn delete_messages_name_the_object() {
    let msg = del_sa(Ipv4Addr::new(10, 0, 0, 1), 0x4000_0101, 0x4645, 3);
    assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), XFRM_MSG_DELSA);
    assert_eq!(&msg[16..20], &[10, 0, 0, 1]);
    assert_eq!(&msg[32..36], &[0x40, 0, 1, 1]);
    assert_eq!(msg[16 + 22], 50);
    let msg = del_policy(PolicyDir::Fwd, (0, 0), 0x4645, 4);
    assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), XFRM_MSG_DELPOLICY);
    assert_eq!(msg[16 + 60], 2, "XFRM_POLICY_FWD");
    assert_eq!(
        attributes(&msg, 64)
            .iter()
            .map(|(k, _)| *k)
            .collect::<Vec<_>>(),
        [XFRMA_IF_ID]
    );
}

#[test]
fn a_dumped_sa_parses_back_without_its_key() {
    let msg = new_sa(&spec(), 1, false);
    let sa = parse_sa(&msg[16..]).unwrap();
    assert_eq!(sa.spi, 0x4012_3401);
    assert_eq!(sa.src, Some(Ipv4Addr::new(198, 18, 0, 11)));
    assert_eq!(sa.dst, Some(Ipv4Addr::new(198, 18, 0, 1)));
    assert_eq!(
        sa.encap,
        Some(Encap {
            sport: 4500,
            dport: 61000
        })
    );
    assert_eq!(sa.if_id, 0x4645);
    assert_eq!(sa.set_mark, Some((0x0003_0D00, 0xFFFF_3F00)));
    assert_eq!(sa.reqid, 3);
}

#[test]
fn truncated_or_foreign_payloads_are_ignored_not_panicked_on() {
    assert_eq!(parse_sa(&[0; 100]), None);
    assert_eq!(parse_policy(&[0; 10]), None);
    assert_eq!(parse_mapping(&[0; 10]), None);
    // An attribute claiming more bytes than there are ends the walk.
    let mut msg = new_sa(&spec(), 1, false);
    msg[16 + 224] = 0xff;
    msg[16 + 225] = 0x7f;
    let sa = parse_sa(&msg[16..]).unwrap();
    assert_eq!(sa.if_id, 0);
}

#[test]
fn mapping_events_give_the_new_address_and_port() {
    let mut payload = vec![0u8; 64];
    payload[0..4].copy_from_slice(&[198, 18, 0, 1]);
    payload[16..20].copy_from_slice(&0x4000_0101u32.to_be_bytes());
    payload[24..28].copy_from_slice(&9u32.to_ne_bytes());
    payload[28..32].copy_from_slice(&[203, 0, 113, 1]);
    payload[44..48].copy_from_slice(&[203, 0, 113, 2]);
    payload[60..62].copy_from_slice(&4500u16.to_be_bytes());
    payload[62..64].copy_from_slice(&61001u16.to_be_bytes());
    let m = parse_mapping(&payload).unwrap();
    assert_eq!(
        (m.spi, m.reqid, m.new_addr, m.new_port),
        (0x4000_0101, 9, Ipv4Addr::new(203, 0, 113, 2), 61001)
    );
}
