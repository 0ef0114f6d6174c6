//! The authenticated hello an edge sends to each peer's UDP 4500 with its
//! keepalives. The first four bytes are zero, the RFC 3948 non-ESP marker,
//! so the kernel hands it to our socket rather than to ESP; the receiver
//! learns from it the address and port the edge's NAT shows.
//!
//! Layout (version 2):
//! `00000000 "FEH" 02 name_len:u8 name generation:u32 counter:u64 hmac:32`.
//!
//! `counter` is the sender's hello counter: `unix_secs << 20 | n`, strictly
//! increasing over every hello the sender ever sends (see `esp::hellos`),
//! so a receiver accepts each hello once, and the time it carries bounds
//! how old an accepted hello can be. Version 1 (`"FEH1"`, a bare timestamp)
//! could be replayed within its time window; it is no longer accepted,
//! and a version-1 receiver ignores version 2 (its magic differs), so
//! during an upgrade an edge's NAT moves are learnt once both ends run
//! version 2 (a connector keeps the endpoints it knew meanwhile).
//!
//! Parsing checks the length, the version and the name before any
//! cryptography, so a flood of junk costs no HMAC.

use crate::esp::keys::HelloKey;

const MAGIC: &[u8; 7] = b"\0\0\0\0FEH";
pub const VERSION: u8 = 2;
const TAG_LEN: usize = 32;
/// Bits of the counter below the seconds.
pub const COUNTER_SHIFT: u32 = 20;
/// Hellos whose time is further than this from ours are not accepted.
pub const MAX_SKEW_SECS: u64 = 120;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node: String,
    pub generation: u32,
    pub counter: u64,
}

impl Hello {
    /// The sender's clock when it sent the hello.
    pub fn unix_secs(&self) -> u64 {
        self.counter >> COUNTER_SHIFT
    }
}

pub fn encode(hello: &Hello, key: &HelloKey) -> Vec<u8> {
    let name = &hello.node.as_bytes()[..hello.node.len().min(255)];
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + name.len() + 12 + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&hello.generation.to_be_bytes());
    out.extend_from_slice(&hello.counter.to_be_bytes());
    let tag = key.tag(&out);
    out.extend_from_slice(&tag);
    out
}

/// Why a datagram is not a hello we can use, before any cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// No non-ESP marker and magic, or the wrong length.
    NotAHello,
    /// A hello of another version.
    Version(u8),
}

/// A hello whose fields are read but whose tag is not checked yet.
#[derive(Debug)]
pub struct Unverified<'a> {
    pub node: &'a str,
    pub generation: u32,
    pub counter: u64,
    body: &'a [u8],
    tag: &'a [u8],
}

/// Read the fields of a hello; no allocation, no cryptography.
pub fn parse(bytes: &[u8]) -> Result<Unverified<'_>, Malformed> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(Malformed::NotAHello)?;
    match rest.first() {
        Some(&VERSION) => {}
        Some(&other) => return Err(Malformed::Version(other)),
        None => return Err(Malformed::NotAHello),
    }
    let name_len = *rest.get(1).ok_or(Malformed::NotAHello)? as usize;
    let body_len = MAGIC.len() + 2 + name_len + 4 + 8;
    if bytes.len() != body_len + TAG_LEN {
        return Err(Malformed::NotAHello);
    }
    let at = MAGIC.len() + 2;
    let node = std::str::from_utf8(&bytes[at..at + name_len]).map_err(|_| Malformed::NotAHello)?;
    let at = at + name_len;
    let generation = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let counter = u64::from_be_bytes(bytes[at + 4..at + 12].try_into().expect("8 bytes"));
    Ok(Unverified {
        node,
        generation,
        counter,
        body: &bytes[..body_len],
        tag: &bytes[body_len..],
    })
}

impl Unverified<'_> {
    /// The hello, if `key` authenticates it.
    pub fn verify(&self, key: &HelloKey) -> Option<Hello> {
        key.verify(self.body, self.tag).then(|| Hello {
            node: self.node.to_owned(),
            generation: self.generation,
            counter: self.counter,
        })
    }
}

/// Parse and authenticate, and check the time against `now_secs`; `None`
/// for anything malformed, forged or out of the window. (Replays inside
/// the window are the receiver's counters' business: `esp::hellos`.)
pub fn decode(bytes: &[u8], key: &HelloKey, now_secs: u64) -> Option<Hello> {
    let hello = parse(bytes).ok()?.verify(key)?;
    (hello.unix_secs().abs_diff(now_secs) <= MAX_SKEW_SECS).then_some(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::esp::keys::NodeKey;

    fn keys() -> (HelloKey, HelloKey) {
        let (a, b) = (
            NodeKey::from_secret_bytes([1; 32]),
            NodeKey::from_secret_bytes([2; 32]),
        );
        (
            a.shared_with(&b.public()).hello_key("edge-1", "cloud-1"),
            b.shared_with(&a.public()).hello_key("cloud-1", "edge-1"),
        )
    }

    fn hello_at(secs: u64) -> Hello {
        Hello {
            node: "edge-1".into(),
            generation: 3,
            counter: (secs << COUNTER_SHIFT) | 5,
        }
    }

    #[test]
    fn a_hello_from_the_edge_is_accepted_by_the_connector() {
        let (edge, connector) = keys();
        let hello = hello_at(1_000_000);
        let bytes = encode(&hello, &edge);
        assert_eq!(&bytes[..4], &[0, 0, 0, 0], "non-ESP marker");
        assert_eq!(&bytes[4..8], b"FEH\x02", "magic and version");
        assert_eq!(parse(&bytes).unwrap().node, "edge-1");
        assert_eq!(decode(&bytes, &connector, 1_000_030), Some(hello));
    }

    #[test]
    fn forged_tampered_stale_or_foreign_version_hellos_are_ignored() {
        let (edge, connector) = keys();
        let bytes = encode(&hello_at(1_000_000), &edge);
        let mut tampered = bytes.clone();
        let gen_at = 8 + 1 + 6;
        tampered[gen_at + 3] ^= 1;
        assert_eq!(decode(&tampered, &connector, 1_000_000), None);
        let other = NodeKey::from_secret_bytes([3; 32])
            .shared_with(&NodeKey::from_secret_bytes([2; 32]).public())
            .hello_key("edge-1", "cloud-1");
        let forged = encode(&hello_at(1_000_000), &other);
        assert_eq!(decode(&forged, &connector, 1_000_000), None);
        assert_eq!(
            decode(&bytes, &connector, 1_000_000 + MAX_SKEW_SECS + 1),
            None,
            "out of the time window"
        );
        assert_eq!(parse(&bytes[..20]).unwrap_err(), Malformed::NotAHello);
        assert_eq!(parse(&[0xFF]).unwrap_err(), Malformed::NotAHello);
        let mut version_1 = bytes.clone();
        version_1[7] = b'1';
        assert_eq!(parse(&version_1).unwrap_err(), Malformed::Version(b'1'));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(parse(&long).unwrap_err(), Malformed::NotAHello);
    }
}
