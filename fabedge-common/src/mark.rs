//! The skb mark contract between the eBPF programs and the kernel (xfrm
//! policies, routing rules). Only the bits below are ours; everything else in
//! the mark is left as found, so kube-proxy (0x4000 masquerade, 0x8000 drop)
//! and Flannel keep working on the same node.
//!
//! ```text
//!  31            16 15  14 13 12 11      8 7           0
//! +----------------+------+-----+---------+-------------+
//! |    peer id     | k-p  | gen |  magic  |  not ours   |
//! +----------------+------+-----+---------+-------------+
//! ```
//! - magic (0x0F00): what the mark means; 0 = not ours.
//! - gen (0x3000): key generation slot the ESP mode uses during
//!   make-before-break rotation (plaintext mode leaves it 0).
//! - k-p (0xC000): kube-proxy's bits, never touched.
//! - peer id (0xFFFF_0000): index into `FE_PEERS`.

/// Bits of the magic nibble.
pub const MAGIC_MASK: u32 = 0x0000_0F00;
/// Leaving this node through a fabedge tunnel to `peer id`. In ESP mode the
/// outbound xfrm policy for that peer matches this mark and encrypts.
pub const MAGIC_TO_TUNNEL: u32 = 0x0000_0E00;
/// Arrived from a fabedge tunnel from `peer id` (decapsulated or decrypted).
pub const MAGIC_FROM_TUNNEL: u32 = 0x0000_0D00;

/// Key generation slot (ESP mode).
pub const GEN_MASK: u32 = 0x0000_3000;
pub const GEN_SHIFT: u32 = 12;

/// Peer id bits.
pub const PEER_MASK: u32 = 0xFFFF_0000;
pub const PEER_SHIFT: u32 = 16;

/// Every bit fabedge owns; `(mark & !OWNED_MASK)` is preserved.
pub const OWNED_MASK: u32 = PEER_MASK | GEN_MASK | MAGIC_MASK;

/// Mark value for traffic to `peer_id`, keeping the bits we do not own.
#[inline(always)]
pub const fn to_tunnel(existing: u32, peer_id: u16) -> u32 {
    (existing & !OWNED_MASK) | ((peer_id as u32) << PEER_SHIFT) | MAGIC_TO_TUNNEL
}

/// Mark value for traffic received from `peer_id`.
#[inline(always)]
pub const fn from_tunnel(existing: u32, peer_id: u16) -> u32 {
    (existing & !OWNED_MASK) | ((peer_id as u32) << PEER_SHIFT) | MAGIC_FROM_TUNNEL
}

/// The peer a `MAGIC_TO_TUNNEL` mark names, or `None` for any other mark.
#[inline(always)]
pub const fn tunnel_peer(mark: u32) -> Option<u16> {
    if mark & MAGIC_MASK == MAGIC_TO_TUNNEL {
        Some((mark >> PEER_SHIFT) as u16)
    } else {
        None
    }
}

const _: () = assert!(
    OWNED_MASK & 0x0000_C000 == 0,
    "kube-proxy's mark bits must stay free"
);
