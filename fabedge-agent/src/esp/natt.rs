//! NAT traversal: the UDP 4500 socket ESP-in-UDP arrives on, and the
//! keepalives that open and hold an edge node's NAT mapping.
//!
//! The kernel decapsulates ESP arriving on a UDP socket only while some
//! socket bound to the port has `UDP_ENCAP_ESPINUDP` set; the agent holds it.
//! Edge nodes send a one-byte 0xFF keepalive (RFC 3948) from it to each peer
//! every keepalive interval: the edge initiates, so the cloud never needs to
//! reach an edge first, and the NAT keeps the mapping open between packets.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
};

use fabedge_common::ESP_IN_UDP_PORT;

const SOL_UDP: i32 = 17;
const UDP_ENCAP: i32 = 100;
const UDP_ENCAP_ESPINUDP: i32 = 2;
/// RFC 3948 NAT-keepalive: one byte 0xFF (the kernel drops it on receipt).
const KEEPALIVE: [u8; 1] = [0xFF];

#[derive(Debug, thiserror::Error)]
pub enum NattError {
    #[error(
        "binding UDP port {port} for ESP in UDP: {source}; another IPsec daemon (strongSwan, \
         libreswan) may hold it: stop it, or run with --tunnel vxlan"
    )]
    Bind { port: u16, source: io::Error },
    #[error("setting UDP_ENCAP_ESPINUDP on UDP port {port}: {source} (kernel without ESP in UDP?)")]
    Encap { port: u16, source: io::Error },
}

pub struct EncapSocket {
    socket: UdpSocket,
}

impl EncapSocket {
    pub fn bind() -> Result<Self, NattError> {
        let port = ESP_IN_UDP_PORT;
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .map_err(|source| NattError::Bind { port, source })?;
        let value: i32 = UDP_ENCAP_ESPINUDP;
        // SAFETY: setsockopt with a pointer to a live i32 and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                SOL_UDP,
                UDP_ENCAP,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        if rc != 0 {
            return Err(NattError::Encap {
                port,
                source: io::Error::last_os_error(),
            });
        }
        socket
            .set_nonblocking(true)
            .map_err(|source| NattError::Encap { port, source })?;
        Ok(EncapSocket { socket })
    }

    /// Another handle on the same socket (for the keepalive thread).
    pub fn try_clone(&self) -> io::Result<EncapSocket> {
        Ok(EncapSocket {
            socket: self.socket.try_clone()?,
        })
    }

    /// A second handle on the socket for the event loop: readable when a
    /// hello (or anything not ESP) waits, so hellos are handled as they come.
    pub fn readiness(&self) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        let fd = std::os::fd::OwnedFd::from(self.socket.try_clone()?);
        // SAFETY: the AsyncFd owns the fd (an OwnedFd inside it), so the fd
        // stays open for as long as it is registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| io::Error::other(e.to_string()))
    }

    /// One keepalive to each peer; failures are returned per peer, not fatal.
    pub fn send(&self, bytes: &[u8], to: SocketAddrV4) -> io::Result<()> {
        self.socket.send_to(bytes, to).map(|_| ())
    }

    /// The next non-ESP datagram waiting on the socket, if any.
    pub fn try_recv(&self) -> Option<(Vec<u8>, SocketAddrV4)> {
        let mut buf = [0u8; 512];
        match self.socket.recv_from(&mut buf) {
            Ok((n, std::net::SocketAddr::V4(from))) => Some((buf[..n].to_vec(), from)),
            _ => None,
        }
    }

    pub fn keepalive(&self, peers: &[SocketAddrV4]) -> Vec<(SocketAddrV4, io::Error)> {
        peers
            .iter()
            .filter_map(|peer| {
                self.socket
                    .send_to(&KEEPALIVE, peer)
                    .err()
                    .map(|e| (*peer, e))
            })
            .collect()
    }
}

/// The authenticated hello an edge sends to each peer's UDP 4500 with its
/// keepalives. The first four bytes are zero, the RFC 3948 non-ESP marker,
/// so the kernel hands it to our socket rather than to ESP; the receiver
/// learns from it the address and port the edge's NAT shows.
///
/// Layout: `00000000 "FEH1" name_len:u8 name generation:u32 unix_secs:u64 hmac:32`.
pub mod hello {
    use crate::esp::keys::HelloKey;

    const MAGIC: &[u8; 8] = b"\0\0\0\0FEH1";
    const TAG_LEN: usize = 32;
    /// Hellos older or newer than this are ignored (replays).
    pub const MAX_SKEW_SECS: u64 = 120;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Hello {
        pub node: String,
        pub generation: u32,
        pub unix_secs: u64,
    }

    pub fn encode(hello: &Hello, key: &HelloKey) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        let name = hello.node.as_bytes();
        out.push(name.len().min(255) as u8);
        out.extend_from_slice(&name[..name.len().min(255)]);
        out.extend_from_slice(&hello.generation.to_be_bytes());
        out.extend_from_slice(&hello.unix_secs.to_be_bytes());
        let tag = key.tag(&out);
        out.extend_from_slice(&tag);
        out
    }

    /// The sender a hello claims to be from, before its tag is checked
    /// (the receiver needs the name to pick the key).
    pub fn claimed_sender(bytes: &[u8]) -> Option<&str> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let len = *rest.first()? as usize;
        std::str::from_utf8(rest.get(1..1 + len)?).ok()
    }

    /// Parse and authenticate; `None` for anything malformed, forged or stale.
    pub fn decode(bytes: &[u8], key: &HelloKey, now_secs: u64) -> Option<Hello> {
        let node = claimed_sender(bytes)?.to_owned();
        let body_len = MAGIC.len() + 1 + node.len() + 4 + 8;
        if bytes.len() != body_len + TAG_LEN || !key.verify(&bytes[..body_len], &bytes[body_len..])
        {
            return None;
        }
        let at = MAGIC.len() + 1 + node.len();
        let generation = u32::from_be_bytes(bytes[at..at + 4].try_into().ok()?);
        let unix_secs = u64::from_be_bytes(bytes[at + 4..at + 12].try_into().ok()?);
        if unix_secs.abs_diff(now_secs) > MAX_SKEW_SECS {
            return None;
        }
        Some(Hello {
            node,
            generation,
            unix_secs,
        })
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

        #[test]
        fn a_hello_from_the_edge_is_accepted_by_the_connector() {
            let (edge, connector) = keys();
            let hello = Hello {
                node: "edge-1".into(),
                generation: 3,
                unix_secs: 1_000_000,
            };
            let bytes = encode(&hello, &edge);
            assert_eq!(&bytes[..4], &[0, 0, 0, 0], "non-ESP marker");
            assert_eq!(claimed_sender(&bytes), Some("edge-1"));
            assert_eq!(decode(&bytes, &connector, 1_000_030), Some(hello));
        }

        #[test]
        fn forged_tampered_or_stale_hellos_are_ignored() {
            let (edge, connector) = keys();
            let bytes = encode(
                &Hello {
                    node: "edge-1".into(),
                    generation: 3,
                    unix_secs: 1_000_000,
                },
                &edge,
            );
            let mut tampered = bytes.clone();
            let gen_at = 8 + 1 + 6;
            tampered[gen_at + 3] ^= 1;
            assert_eq!(decode(&tampered, &connector, 1_000_000), None);
            let other = NodeKey::from_secret_bytes([3; 32])
                .shared_with(&NodeKey::from_secret_bytes([2; 32]).public())
                .hello_key("edge-1", "cloud-1");
            let forged = encode(
                &Hello {
                    node: "edge-1".into(),
                    generation: 3,
                    unix_secs: 1_000_000,
                },
                &other,
            );
            assert_eq!(decode(&forged, &connector, 1_000_000), None);
            assert_eq!(
                decode(&bytes, &connector, 1_000_000 + MAX_SKEW_SECS + 1),
                None,
                "replayed later"
            );
            assert_eq!(decode(&bytes[..20], &connector, 1_000_000), None);
            assert_eq!(decode(&[0xFF], &connector, 1_000_000), None);
        }
    }
}
