//! Raw packet sockets on an interface: send built frames, receive the ones a test waits for.

use std::io::{self, ErrorKind};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};

use super::links::check_ifname;
use super::namespace::Netns;
use super::servers::is_timeout;

// ---------------------------------------------------------------------------
// Raw frames on an interface (AF_PACKET)
// ---------------------------------------------------------------------------

/// A raw socket on one interface of a namespace: sends frames built with
/// [`crate::packet`] as if they arrived from the wire at the peer, and captures the
/// frames that come in.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    description: String,
}

impl PacketSocket {
    pub fn open(netns: &Netns, ifname: &str) -> Result<Self> {
        let description = format!("packet socket on {ifname} in netns {}", netns.name());
        let fd = netns
            .enter(|| open_packet_socket(ifname))
            .with_context(|| format!("opening {description}"))?;
        Ok(Self { fd, description })
    }

    /// Sends one whole Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: the pointer and length describe `frame`, which outlives the call.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            return Err(anyhow!(io::Error::last_os_error())
                .context(format!("sending a frame on {}", self.description)));
        }
        ensure!(
            sent as usize == frame.len(),
            "{} sent {sent} of {} bytes",
            self.description,
            frame.len()
        );
        Ok(())
    }

    /// The next frame that arrives on the interface (its own sends are skipped), or
    /// `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.recv_matching(timeout, |_| true)
    }

    /// The next arriving frame for which `wanted` is true, or `None` after `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65536];
        loop {
            let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            if !self.wait_readable(remaining)? {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut from_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buffer and address pointers are valid for the lengths passed.
            let received = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if is_timeout(&error) || error.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(anyhow!(error).context(format!("receiving on {}", self.description)));
            }
            let len = received as usize;
            ensure!(
                len <= buffer.len(),
                "{} got a {len}-byte frame, larger than the buffer",
                self.description
            );
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buffer[..len];
            if wanted(frame) {
                return Ok(Some(frame.to_vec()));
            }
        }
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        let mut poll_fd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, millis) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == ErrorKind::Interrupted {
                return Ok(true); // let the caller retry
            }
            return Err(anyhow!(error).context(format!("waiting on {}", self.description)));
        }
        Ok(ready > 0)
    }
}

/// Must run inside the target namespace: the ifindex and the socket belong to it.
fn open_packet_socket(ifname: &str) -> Result<OwnedFd> {
    check_ifname(ifname)?;
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .with_context(|| format!("no interface {ifname} in this namespace"))?;
    let all_protocols = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 at creation receives nothing; binding below starts capture on this one
    // interface only, so no frame from another interface slips in between.
    // SAFETY: plain syscall with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(anyhow!(io::Error::last_os_error())
            .context("creating AF_PACKET socket (needs CAP_NET_RAW)"));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all_protocols;
    address.sll_ifindex = i32::try_from(ifindex).context("ifindex out of range")?;
    // SAFETY: `address` is a valid sockaddr_ll and the length matches it.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const address).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(anyhow!(io::Error::last_os_error())
            .context(format!("binding AF_PACKET socket to {ifname}")));
    }
    Ok(fd)
}
