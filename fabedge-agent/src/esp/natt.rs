//! NAT traversal: the UDP 4500 socket ESP-in-UDP arrives on, and the
//! keepalives that open and hold an edge node's NAT mapping.
//!
//! The kernel decapsulates ESP arriving on a UDP socket only while some
//! socket bound to the port has `UDP_ENCAP_ESPINUDP` set; the agent holds it.
//! Edge nodes send a one-byte 0xFF keepalive (RFC 3948) from it to each peer
//! every keepalive interval: the edge initiates, so the cloud never needs to
//! reach an edge first, and the NAT keeps the mapping open between packets.
//!
//! The port is bound with `SO_REUSEPORT`: during a restart the new agent
//! binds it beside the old one (`run::handover`), and as both sockets carry
//! `UDP_ENCAP_ESPINUDP`, whichever the kernel hands a datagram to
//! decapsulates it. No moment without a socket, no ESP refused.

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
        let socket = bind_shared(port)?;
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

/// A UDP socket on `0.0.0.0:port` that decapsulates ESP and that a second
/// agent may bind too (`SO_REUSEPORT`; the kernel lets only sockets of the
/// same user share). `UDP_ENCAP_ESPINUDP` is set before the bind: once
/// bound, the socket shares the port with the running agent's (a restart),
/// and the kernel may hand it ESP at once; a socket without it would read
/// that packet as a hello and drop it.
fn bind_shared(port: u16) -> Result<UdpSocket, NattError> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    let bind_error = |source: nix::Error| NattError::Bind {
        port,
        source: source.into(),
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(bind_error)?;
    setsockopt(&fd, sockopt::ReusePort, &true).map_err(bind_error)?;
    let value: i32 = UDP_ENCAP_ESPINUDP;
    // SAFETY: setsockopt with a pointer to a live i32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
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
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )
    .map_err(bind_error)?;
    Ok(UdpSocket::from(fd))
}

pub mod hello;
