//! The NAT-traversal hello arrives from anyone on UDP 4500: parsing and
//! verifying any bytes gives `None` or a hello, never a panic, and only a
//! hello made with the right key is accepted (versions 2 and 3, with the
//! heard flag and a connector's introductions).

#![no_main]

use std::sync::LazyLock;

use fabedge_agent::esp::{
    keys::{HelloKey, NodeKey},
    natt::hello::{self, Hello},
};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000;

static KEYS: LazyLock<(HelloKey, HelloKey)> = LazyLock::new(|| {
    let edge = NodeKey::from_secret_bytes([1; 32]);
    let connector = NodeKey::from_secret_bytes([2; 32]);
    (
        edge.shared_with(&connector.public())
            .hello_key("edge-1", "cloud-1"),
        connector
            .shared_with(&edge.public())
            .hello_key("cloud-1", "edge-1"),
    )
});

fuzz_target!(|data: &[u8]| {
    let (edge, connector) = &*KEYS;
    // The cheap checks that run before any crypto.
    let _ = hello::parse(data);
    if let Some(hello) = hello::decode(data, connector, NOW) {
        // Accepting a forged hello would let anyone move a peer's endpoint.
        assert_eq!(
            data,
            &hello::encode(&hello, edge)[..],
            "accepted bytes that are not the edge's encoding of {hello:?}"
        );
    }
    // Round trip: what the edge encodes, the connector decodes unchanged.
    if data.len() >= 12 {
        let (fields, name) = data.split_at(12);
        // Version 3's flag and a connector's introductions, from the same bytes.
        let introductions = (fields[9] & 2 != 0).then(|| {
            (0..fields[10] % 4)
                .map(|i| hello::Introduction {
                    node: format!("edge-{i}"),
                    endpoint: std::net::SocketAddrV4::new(
                        std::net::Ipv4Addr::from(u32::from_be_bytes(
                            fields[0..4].try_into().unwrap(),
                        )),
                        u16::from(fields[11]) << 8 | u16::from(i),
                    ),
                })
                .collect()
        });
        let hello = Hello {
            node: String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned(),
            generation: u32::from_be_bytes(fields[0..4].try_into().unwrap()),
            // The sender's clock (inside the window) above a sequence number.
            counter: ((NOW - 60 + u64::from(fields[4] % 120)) << hello::COUNTER_SHIFT)
                | u64::from(u32::from_be_bytes(fields[5..9].try_into().unwrap()) & 0xf_ffff),
            heard_you: fields[9] & 1 != 0,
            introductions,
        };
        let bytes = hello::encode(&hello, edge);
        assert_eq!(hello::decode(&bytes, connector, NOW), Some(hello));
    }
});
