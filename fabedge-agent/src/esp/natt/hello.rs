//! The authenticated hello an edge sends to each peer's UDP 4500 with its
//! keepalives. The first four bytes are zero, the RFC 3948 non-ESP marker,
//! so the kernel hands it to our socket rather than to ESP; the receiver
//! learns from it the address and port the edge's NAT shows.
//!
//! Layout (version 2):
//! `00000000 "FEH" 02 name_len:u8 name generation:u32 counter:u64 hmac:32`.
//!
//! Version 3 adds what hole punching between edges behind two NATs needs
//! (see `esp::punch`), after the counter:
//! `flags:u8 [count:u8 (name_len:u8 name addr:4 port:2)*]`.
//! - [`HEARD_YOU`]: the sender heard the receiver's hellos directly within
//!   the last few keepalive intervals (the direct path works both ways
//!   once each end says so).
//! - [`INTRODUCTION`]: sent by a connector, the list that follows names
//!   community peers and the endpoints their NATs show; such a hello
//!   teaches nothing about the connector's own endpoint.
//!
//! A hello without either is sent as version 2, so a receiver from before
//! version 3 keeps learning NAT moves from an upgraded sender.
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
/// The version with flags and introductions.
pub const VERSION_FLAGS: u8 = 3;
/// Flag: the sender hears the receiver directly.
pub const HEARD_YOU: u8 = 1 << 0;
/// Flag: a connector's introductions follow.
pub const INTRODUCTION: u8 = 1 << 1;
/// Introductions one hello carries at most (a longer list is split).
pub const MAX_INTRODUCTIONS: usize = 16;
const TAG_LEN: usize = 32;
/// Bits of the counter below the seconds.
pub const COUNTER_SHIFT: u32 = 20;
/// Hellos whose time is further than this from ours are not accepted.
pub const MAX_SKEW_SECS: u64 = 120;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    pub node: String,
    pub generation: u32,
    pub counter: u64,
    /// Version 3: the sender hears us directly.
    pub heard_you: bool,
    /// Version 3, from a connector: community peers and where their NATs
    /// show them. `Some` (even empty) makes the hello an introduction.
    pub introductions: Option<Vec<Introduction>>,
}

/// A community peer and the endpoint its NAT shows the connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introduction {
    pub node: String,
    pub endpoint: std::net::SocketAddrV4,
}

impl Hello {
    /// The sender's clock when it sent the hello.
    pub fn unix_secs(&self) -> u64 {
        self.counter >> COUNTER_SHIFT
    }
}

/// Node names are at most 253 bytes (a DNS subdomain); longer is cut.
fn name_bytes(name: &str) -> &[u8] {
    &name.as_bytes()[..name.len().min(255)]
}

/// The datagram; introductions past [`MAX_INTRODUCTIONS`] are left out
/// (the sender splits longer lists).
pub fn encode(hello: &Hello, key: &HelloKey) -> Vec<u8> {
    let name = name_bytes(&hello.node);
    let flags = if hello.heard_you { HEARD_YOU } else { 0 }
        | if hello.introductions.is_some() {
            INTRODUCTION
        } else {
            0
        };
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + name.len() + 12 + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(if flags == 0 { VERSION } else { VERSION_FLAGS });
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&hello.generation.to_be_bytes());
    out.extend_from_slice(&hello.counter.to_be_bytes());
    if flags != 0 {
        out.push(flags);
    }
    if let Some(list) = &hello.introductions {
        let list = &list[..list.len().min(MAX_INTRODUCTIONS)];
        out.push(list.len() as u8);
        for intro in list {
            let name = name_bytes(&intro.node);
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&intro.endpoint.ip().octets());
            out.extend_from_slice(&intro.endpoint.port().to_be_bytes());
        }
    }
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
    /// Version 3's flags (0 for version 2).
    pub flags: u8,
    /// Version 3 with [`INTRODUCTION`]: the list's bytes, whose shape
    /// `parse` checked.
    introductions: Option<&'a [u8]>,
    body: &'a [u8],
    tag: &'a [u8],
}

/// Read the fields of a hello; no allocation, no cryptography.
pub fn parse(bytes: &[u8]) -> Result<Unverified<'_>, Malformed> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(Malformed::NotAHello)?;
    let version = match rest.first() {
        Some(&v @ (VERSION | VERSION_FLAGS)) => v,
        Some(&other) => return Err(Malformed::Version(other)),
        None => return Err(Malformed::NotAHello),
    };
    let body_len = bytes
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(Malformed::NotAHello)?;
    let body = &bytes[..body_len];
    let name_len = *rest.get(1).ok_or(Malformed::NotAHello)? as usize;
    let at = MAGIC.len() + 2;
    let fixed_end = at + name_len + 4 + 8;
    if body.len() < fixed_end {
        return Err(Malformed::NotAHello);
    }
    let node = std::str::from_utf8(&body[at..at + name_len]).map_err(|_| Malformed::NotAHello)?;
    let at = at + name_len;
    let generation = u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let counter = u64::from_be_bytes(body[at + 4..at + 12].try_into().expect("8 bytes"));
    let (flags, introductions) = match version {
        VERSION if body.len() == fixed_end => (0, None),
        VERSION_FLAGS => {
            let flags = *body.get(fixed_end).ok_or(Malformed::NotAHello)?;
            // One encoding per hello: no flags is version 2, and no bits
            // we do not know.
            if flags == 0 || flags & !(HEARD_YOU | INTRODUCTION) != 0 {
                return Err(Malformed::NotAHello);
            }
            let rest = &body[fixed_end + 1..];
            match flags & INTRODUCTION {
                0 if rest.is_empty() => (flags, None),
                0 => return Err(Malformed::NotAHello),
                _ => {
                    introductions_shape(rest).ok_or(Malformed::NotAHello)?;
                    (flags, Some(rest))
                }
            }
        }
        _ => return Err(Malformed::NotAHello),
    };
    Ok(Unverified {
        node,
        generation,
        counter,
        flags,
        introductions,
        body,
        tag: &bytes[body_len..],
    })
}

/// Walks an introduction list: `count`, then each entry; `None` unless
/// the bytes are exactly that. No allocation.
fn introductions_shape(list: &[u8]) -> Option<()> {
    let (&count, mut rest) = list.split_first()?;
    if count as usize > MAX_INTRODUCTIONS {
        return None;
    }
    for _ in 0..count {
        let (&len, after) = rest.split_first()?;
        let entry = after.get(..len as usize + 6)?;
        std::str::from_utf8(&entry[..len as usize]).ok()?;
        rest = &after[len as usize + 6..];
    }
    rest.is_empty().then_some(())
}

/// The entries of a list [`introductions_shape`] accepted.
fn read_introductions(list: &[u8]) -> Vec<Introduction> {
    let mut out = Vec::with_capacity(list[0] as usize);
    let mut rest = &list[1..];
    for _ in 0..list[0] {
        let len = rest[0] as usize;
        let name = std::str::from_utf8(&rest[1..1 + len]).unwrap_or_default();
        let at = &rest[1 + len..1 + len + 6];
        out.push(Introduction {
            node: name.to_owned(),
            endpoint: std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::new(at[0], at[1], at[2], at[3]),
                u16::from_be_bytes([at[4], at[5]]),
            ),
        });
        rest = &rest[1 + len + 6..];
    }
    out
}

impl Unverified<'_> {
    /// The hello, if `key` authenticates it.
    pub fn verify(&self, key: &HelloKey) -> Option<Hello> {
        key.verify(self.body, self.tag).then(|| Hello {
            node: self.node.to_owned(),
            generation: self.generation,
            counter: self.counter,
            heard_you: self.flags & HEARD_YOU != 0,
            introductions: self.introductions.map(read_introductions),
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
            ..Hello::default()
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

    #[test]
    fn version_3_carries_the_heard_flag_and_introductions_and_plain_hellos_stay_version_2() {
        let (edge, connector) = keys();
        let heard = Hello {
            heard_you: true,
            ..hello_at(1_000_000)
        };
        let bytes = encode(&heard, &edge);
        assert_eq!(&bytes[4..8], b"FEH\x03");
        assert_eq!(decode(&bytes, &connector, 1_000_000), Some(heard.clone()));
        let intro = Hello {
            introductions: Some(vec![
                Introduction {
                    node: "edge-2".into(),
                    endpoint: "198.18.0.251:4500".parse().unwrap(),
                },
                Introduction {
                    node: "edge-3".into(),
                    endpoint: "198.18.0.252:31000".parse().unwrap(),
                },
            ]),
            ..hello_at(1_000_000)
        };
        let bytes = encode(&intro, &edge);
        assert_eq!(decode(&bytes, &connector, 1_000_000), Some(intro.clone()));
        // Any byte changed in the list, or a list cut short, is refused.
        for at in [bytes.len() - TAG_LEN - 1, bytes.len() - TAG_LEN - 9] {
            let mut tampered = bytes.clone();
            tampered[at] ^= 1;
            assert_eq!(decode(&tampered, &connector, 1_000_000), None);
        }
        let mut short = bytes[..bytes.len() - TAG_LEN - 1].to_vec();
        short.extend_from_slice(&edge.tag(&short));
        assert_eq!(parse(&short).unwrap_err(), Malformed::NotAHello);
        // A count the bytes do not hold, or above the limit, is refused
        // before any cryptography.
        let count_at = bytes.len() - TAG_LEN - 2 * (1 + 6 + 6) - 1;
        assert_eq!(bytes[count_at], 2);
        for count in [3, MAX_INTRODUCTIONS as u8 + 1] {
            let mut wrong = bytes.clone();
            wrong[count_at] = count;
            assert_eq!(parse(&wrong).unwrap_err(), Malformed::NotAHello);
        }
        // An empty list is still an introduction.
        let none = Hello {
            introductions: Some(Vec::new()),
            ..hello_at(1_000_000)
        };
        assert_eq!(
            decode(&encode(&none, &edge), &connector, 1_000_000),
            Some(none)
        );
        assert_eq!(&encode(&hello_at(1), &edge)[4..8], b"FEH\x02");
        // Version 3 without flags, or with bits we do not know, is no hello.
        let flag_at = 8 + 1 + 6 + 4 + 8;
        let v3 = encode(&heard, &edge);
        for flags in [0, 1 << 7] {
            let mut other = v3[..flag_at].to_vec();
            other.push(flags);
            other.extend_from_slice(&edge.tag(&other));
            assert_eq!(parse(&other).unwrap_err(), Malformed::NotAHello);
        }
    }
}
