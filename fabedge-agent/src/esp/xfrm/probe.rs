//! Does this kernel do what the ESP mode needs? Asked by trying: a
//! throwaway SA with our AEAD and UDP encapsulation is added and deleted
//! again (it names a loopback address no traffic uses), and an xfrm
//! interface is created and removed. Either way nothing is left behind.

use std::net::Ipv4Addr;

use super::{
    Socket,
    msg::{Encap, Lifetime, REPLAY_WINDOW, SaSpec},
};
use crate::{
    apply::rtnl::LinkKind,
    esp::keys::{AEAD_NAME, NodeKey},
};

/// Why `--tunnel esp` cannot run here.
#[derive(Debug, thiserror::Error)]
#[error(
    "--tunnel esp needs {feature}, which this kernel lacks ({detail}); \
     nothing was configured. Load the module or use a kernel that has it, or run with --tunnel vxlan"
)]
pub struct Unsupported {
    pub feature: &'static str,
    pub detail: String,
}

const PROBE_SPI: u32 = 0x4fff_ff01;
const PROBE_DST: Ipv4Addr = Ipv4Addr::new(127, 254, 254, 254);

pub fn check() -> Result<(), Unsupported> {
    let mut socket = Socket::open().map_err(|e| Unsupported {
        feature: "xfrm netlink (CONFIG_XFRM_USER)",
        detail: e.to_string(),
    })?;
    // A random throwaway key: the SA never carries a packet.
    let key = NodeKey::generate()
        .map_err(|e| Unsupported {
            feature: "random numbers",
            detail: e.to_string(),
        })?
        .shared_with(&NodeKey::from_secret_bytes([7; 32]).public())
        .sa_key("probe", "probe", 0, None);
    let sa = SaSpec {
        src: PROBE_DST,
        dst: PROBE_DST,
        spi: PROBE_SPI,
        reqid: 0,
        key,
        encap: Some(Encap {
            sport: 4500,
            dport: 4500,
        }),
        if_id: super::FE_IF_ID,
        set_mark: None,
        replay_window: REPLAY_WINDOW,
        lifetime: Lifetime::default(),
    };
    // A probe left over by a crash would make the add fail with EEXIST.
    let _ = socket.delete_sa(PROBE_DST, PROBE_SPI, super::FE_IF_ID);
    match socket.add_sa(&sa) {
        Ok(()) => {
            let _ = socket.delete_sa(PROBE_DST, PROBE_SPI, super::FE_IF_ID);
        }
        Err(e) => {
            let feature = match e.errno() {
                Some(libc::EPROTONOSUPPORT) => "ESP (CONFIG_INET_ESP, module esp4)",
                Some(libc::ENOSYS) | Some(libc::ENOENT) => {
                    "the AEAD rfc4106(gcm(aes)) (CONFIG_CRYPTO_GCM, modules gcm and aes)"
                }
                Some(libc::EINVAL) => {
                    "ESP in UDP (CONFIG_XFRM_USER with CONFIG_INET_ESP; UDP encapsulation)"
                }
                _ => "ESP through xfrm",
            };
            return Err(Unsupported {
                feature,
                detail: format!("{e}; algorithm {AEAD_NAME}"),
            });
        }
    }
    // The xfrm interface fe-tunnel will be (module xfrm_interface).
    const PROBE_LINK: &str = "fe-probe-xfrm";
    let _ = crate::apply::net::delete_link_if_present(PROBE_LINK);
    crate::apply::net::add_link(PROBE_LINK, &LinkKind::Xfrm { if_id: 0x4fff }).map_err(|e| {
        Unsupported {
            feature: "xfrm interfaces (CONFIG_XFRM_INTERFACE, module xfrm_interface)",
            detail: format!("{e:#}"),
        }
    })?;
    let _ = crate::apply::net::delete_link_if_present(PROBE_LINK);
    Ok(())
}
