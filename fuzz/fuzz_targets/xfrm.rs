//! The xfrm netlink parsers read what the kernel sends (SA and policy dumps,
//! NAT mapping events): any bytes give `None` or a value, never a panic.
//! Messages we build parse back to what we asked for.

#![no_main]

use std::net::Ipv4Addr;

use fabedge_agent::esp::xfrm::msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = msg::parse_sa(data);
    let _ = msg::parse_policy(data);
    let _ = msg::parse_mapping(data);
    // Also from every offset of a netlink stream the kernel could send.
    let mut rest = data;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            break;
        }
        let payload = &rest[16..len];
        let _ = msg::parse_sa(payload);
        let _ = msg::parse_policy(payload);
        let _ = msg::parse_mapping(payload);
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    // A deletion we build from fuzzed fields is a well-formed message.
    if data.len() >= 12 {
        let dst = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
        let spi = u32::from_ne_bytes([data[4], data[5], data[6], data[7]]);
        let if_id = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        let message = msg::del_sa(dst, spi, if_id, 1);
        let len = u32::from_ne_bytes([message[0], message[1], message[2], message[3]]) as usize;
        assert_eq!(len, message.len(), "nlmsg_len of a built DELSA");
    }
});
