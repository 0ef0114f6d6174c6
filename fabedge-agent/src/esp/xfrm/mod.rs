//! xfrm over netlink: the SAs and policies of the ESP tunnel mode.
//!
//! `msg` builds and parses the messages (pure, tested on bytes); `Socket`
//! sends them to the kernel and reads the answers. Everything we install
//! carries our xfrm interface id ([`FE_IF_ID`]), which is how `teardown` and
//! `inspect` tell our objects from anyone else's.

pub mod msg;
pub mod probe;
mod socket;

pub use self::{
    msg::{Encap, PolicyAction, PolicyDir, PolicySpec, SaInfo, SaSpec, Tmpl},
    msg::{Expire, Lifetime, Mapping, PolicyInfo},
    socket::{Socket, XfrmError},
};

/// The `if_id` of fabedge's xfrm interface and of every SA and policy we own
/// ("FE" in ASCII, well away from the small ids hand-made setups use).
pub const FE_IF_ID: u32 = 0x0000_4645;
