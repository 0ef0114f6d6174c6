//! A blocking `NETLINK_XFRM` socket: one request at a time, answers read
//! until the kernel's ACK or the end of a dump.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use zeroize::Zeroize;

use super::msg::{self, NLMSG_DONE, NLMSG_ERROR, PolicyInfo, SaInfo};

#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    #[error("opening the xfrm netlink socket: {0}")]
    Open(io::Error),
    #[error("talking to the kernel's xfrm netlink: {0}")]
    Io(io::Error),
    /// The kernel refused a request (errno).
    #[error("the kernel refused {what}: {source}")]
    Refused { what: String, source: io::Error },
}

impl XfrmError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            XfrmError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Self, XfrmError> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                msg::NETLINK_XFRM,
            )
        };
        if fd < 0 {
            return Err(XfrmError::Open(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Socket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, buf: &[u8]) -> Result<(), XfrmError> {
        // SAFETY: sockaddr_nl zeroed = the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and addr are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            Err(XfrmError::Io(io::Error::last_os_error()))
        } else {
            Ok(())
        }
    }

    /// Read messages answering `seq`, handing each non-control message to
    /// `each`, until ACK/error (requests) or DONE (dumps).
    fn receive(
        &self,
        seq: u32,
        what: &str,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), XfrmError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(XfrmError::Io(e));
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < 16 || len > rest.len() {
                    break;
                }
                let payload = &rest[16..len];
                rest = &rest[((len + 3) & !3).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(payload[0..4].try_into().expect("4 bytes"));
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(XfrmError::Refused {
                                what: what.to_owned(),
                                source: io::Error::from_raw_os_error(-errno),
                            })
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ => each(kind, payload),
                }
            }
        }
    }

    /// Send one request and wait for its ACK. `what` names it in errors.
    fn request(
        &mut self,
        mut build: impl FnMut(u32) -> Vec<u8>,
        what: &str,
    ) -> Result<(), XfrmError> {
        let seq = self.next_seq();
        let mut buf = build(seq);
        let sent = self.send(&buf);
        // SA messages carry key bytes: wipe our copy whatever happened.
        buf.zeroize();
        sent?;
        self.receive(seq, what, |_, _| {})
    }

    pub fn add_sa(&mut self, sa: &msg::SaSpec) -> Result<(), XfrmError> {
        let what = format!("ESP SA spi {:#010x} {} -> {}", sa.spi, sa.src, sa.dst);
        self.request(|seq| msg::new_sa(sa, seq, false), &what)
    }

    pub fn update_sa(&mut self, sa: &msg::SaSpec) -> Result<(), XfrmError> {
        let what = format!(
            "update of ESP SA spi {:#010x} {} -> {}",
            sa.spi, sa.src, sa.dst
        );
        self.request(|seq| msg::new_sa(sa, seq, true), &what)
    }

    pub fn delete_sa(
        &mut self,
        dst: std::net::Ipv4Addr,
        spi: u32,
        if_id: u32,
    ) -> Result<(), XfrmError> {
        let what = format!("deletion of ESP SA spi {spi:#010x} to {dst}");
        self.request(|seq| msg::del_sa(dst, spi, if_id, seq), &what)
    }

    pub fn update_policy(&mut self, policy: &msg::PolicySpec) -> Result<(), XfrmError> {
        let what = format!(
            "xfrm policy {:?} mark {:#x}/{:#x}",
            policy.dir, policy.mark.0, policy.mark.1
        );
        self.request(|seq| msg::update_policy(policy, seq), &what)
    }

    pub fn delete_policy(
        &mut self,
        dir: msg::PolicyDir,
        mark: (u32, u32),
        if_id: u32,
    ) -> Result<(), XfrmError> {
        let what = format!(
            "deletion of xfrm policy {dir:?} mark {:#x}/{:#x}",
            mark.0, mark.1
        );
        self.request(|seq| msg::del_policy(dir, mark, if_id, seq), &what)
    }

    /// A socket that receives the kernel's `XFRM_MSG_EXPIRE` events
    /// (non-blocking; read with [`Socket::expires`]).
    pub fn subscribe_expire() -> Result<Self, XfrmError> {
        let socket = Self::open()?;
        // SAFETY: sockaddr_nl zeroed, then family and groups set.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = 1 << (msg::XFRMNLGRP_EXPIRE - 1);
        // SAFETY: addr is a valid sockaddr_nl for the call.
        let rc = unsafe {
            libc::bind(
                socket.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        // SAFETY: fcntl on our own fd.
        let nonblocking = unsafe {
            let flags = libc::fcntl(socket.fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(
                socket.fd.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            )
        };
        if rc != 0 || nonblocking != 0 {
            return Err(XfrmError::Open(io::Error::last_os_error()));
        }
        Ok(socket)
    }

    /// The expire events waiting on a [`Socket::subscribe_expire`] socket.
    /// A lost event (buffer overrun) is an error, so the caller can act as
    /// if every SA had expired.
    pub fn expires(&self) -> Result<Vec<msg::Expire>, XfrmError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(out),
                    _ => return Err(XfrmError::Io(e)),
                }
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < 16 || len > rest.len() {
                    break;
                }
                if kind == msg::XFRM_MSG_EXPIRE
                    && let Some(expire) = msg::parse_expire(&rest[16..len])
                {
                    out.push(expire);
                }
                rest = &rest[((len + 3) & !3).min(rest.len())..];
            }
        }
    }

    pub fn sas(&mut self) -> Result<Vec<SaInfo>, XfrmError> {
        let seq = self.next_seq();
        self.send(&msg::dump(msg::XFRM_MSG_GETSA, seq))?;
        let mut out = Vec::new();
        self.receive(seq, "the SA dump", |kind, payload| {
            if kind == msg::XFRM_MSG_NEWSA
                && let Some(sa) = msg::parse_sa(payload)
            {
                out.push(sa);
            }
        })?;
        Ok(out)
    }

    pub fn policies(&mut self) -> Result<Vec<PolicyInfo>, XfrmError> {
        let seq = self.next_seq();
        self.send(&msg::dump(msg::XFRM_MSG_GETPOLICY, seq))?;
        let mut out = Vec::new();
        self.receive(seq, "the policy dump", |kind, payload| {
            if kind == msg::XFRM_MSG_NEWPOLICY
                && let Some(p) = msg::parse_policy(payload)
            {
                out.push(p);
            }
        })?;
        Ok(out)
    }
}
