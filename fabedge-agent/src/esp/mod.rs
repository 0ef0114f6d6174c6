//! Everything ESP: node keys and SA key derivation (`keys`), NAT traversal
//! hellos and keepalives (`natt`), hello counters and clock skew
//! (`hellos`), the xfrm netlink client (`xfrm`), and the
//! ESP parts of the pipeline — `plan` (SAs and policies from the snapshot),
//! `apply` (the diff against the kernel's xfrm state), `run` (the UDP 4500
//! socket, key generations, rotation timers) and `inspect` (`inspect
//! tunnels`), and `punch` (direct paths between community edges behind
//! two NATs). Plaintext VXLAN mode needs none of it.

pub mod apply;
pub mod hellos;
pub mod inspect;
pub mod keys;
pub mod natt;
pub mod plan;
pub mod punch;
pub mod run;
pub mod xfrm;
