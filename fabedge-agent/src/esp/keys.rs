//! ESP key material.
//!
//! Every node has a static X25519 key pair. The private half lives in
//! `<state dir>/node.key` (mode 0600) and never leaves this module except as
//! the Diffie-Hellman result; the public half is published as the Node
//! annotation [`PUBLIC_KEY_ANNOTATION`].
//!
//! Per node pair, both sides compute the same static-static shared secret.
//! Each *direction* of each pair gets its own SA key per *generation*:
//! `HKDF-SHA256(ikm = shared, salt = SALT_V2 | src nonce | dst nonce,
//! info = lo | hi | src | dst | gen)` with both names length-prefixed, so no
//! two (pair, direction, generation) triples can share a key. The sender owns
//! the generation of its direction and bumps it whenever it must create an
//! outbound SA anew, so a key never starts over at sequence number 1 (GCM
//! nonce reuse).
//!
//! The nonces ([`KeyNonce`], annotation [`KEY_NONCE_ANNOTATION`]) are random
//! and each node draws a new one whenever its replay state is gone (the state
//! dir lost, or the kernel holds none of our SAs: reboot, `uninstall`, a
//! restored backup). Both ends contribute one, so state loss on either side
//! yields keys nobody used before, and ESP recorded earlier never decrypts
//! into an empty replay window. A peer that publishes no nonce (an agent
//! from before nonces) gets the nonce-less derivation (`SALT`), which it
//! computes too.
//!
//! Secrets are zeroized on drop and have no `Debug` output beyond a
//! placeholder, so they cannot end up in logs or error messages.

use std::{
    fmt, fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The Node annotation carrying a node's X25519 public key (standard base64).
pub const PUBLIC_KEY_ANNOTATION: &str = "fabedge.io/public-key";
/// The Node annotation carrying the generation of a node's outbound SAs.
pub const KEY_GENERATION_ANNOTATION: &str = "fabedge.io/key-generation";
/// The Node annotation carrying where peers send a node's ESP in UDP
/// (`address:port`), when it is not the tunnel endpoint's UDP 4500: a
/// connector behind a port forward (`--esp-public-endpoint`).
pub const ESP_ENDPOINT_ANNOTATION: &str = "fabedge.io/esp-endpoint";
/// The Node annotation carrying a node's key nonce (standard base64 of 16
/// random bytes), mixed into the keys of every SA it sends or receives.
pub const KEY_NONCE_ANNOTATION: &str = "fabedge.io/key-nonce";
/// File name of the private key in the state dir.
pub const KEY_FILE: &str = "node.key";
/// HKDF salt: names the protocol and its version.
const SALT: &[u8] = b"fabedge esp v1";
/// HKDF salt prefix of keys that mix both ends' nonces.
const SALT_V2: &[u8] = b"fabedge esp v2";
/// Bytes of a [`KeyNonce`].
pub const NONCE_LEN: usize = 16;
/// AES-256 key + the 4-byte rfc4106 salt.
pub const SA_KEY_LEN: usize = 36;
/// ICV length of our AEAD, in bits.
pub const ICV_BITS: u32 = 128;
/// The kernel's name of our AEAD.
pub const AEAD_NAME: &str = "rfc4106(gcm(aes))";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the node key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the node key {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the node key {path} is not a 32-byte X25519 private key (it has {len} bytes); \
         move it away to let the agent create a new one (peers pick up the new public key)"
    )]
    Malformed { path: PathBuf, len: usize },
    #[error(
        "the node key {path} is readable by others (mode {mode:o}); it must be 0600: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the operating system gave no random bytes: {0}")]
    Random(io::Error),
    #[error("node {node}: annotation {annotation} is not a base64 X25519 public key: {problem}", annotation = PUBLIC_KEY_ANNOTATION)]
    BadPublicKey { node: String, problem: String },
    #[error("node {node}: annotation {annotation} is not {NONCE_LEN} bytes of base64: {problem}", annotation = KEY_NONCE_ANNOTATION)]
    BadNonce { node: String, problem: String },
}

/// A node's contribution of randomness to the keys of its SAs (not secret:
/// it is published; what matters is that it is new after state loss).
#[derive(Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct KeyNonce([u8; NONCE_LEN]);

impl KeyNonce {
    pub fn from_bytes(bytes: [u8; NONCE_LEN]) -> Self {
        KeyNonce(bytes)
    }

    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; NONCE_LEN];
        random_bytes(&mut bytes)?;
        Ok(KeyNonce(bytes))
    }

    /// Parse the annotation value of `node`.
    pub fn parse(node: &str, text: &str) -> Result<Self, KeyError> {
        let bad = |problem: String| KeyError::BadNonce {
            node: node.to_owned(),
            problem,
        };
        let bytes = BASE64.decode(text.trim()).map_err(|e| bad(e.to_string()))?;
        let bytes: [u8; NONCE_LEN] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| bad(format!("{} bytes", b.len())))?;
        Ok(KeyNonce(bytes))
    }

    /// The annotation value.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl From<KeyNonce> for String {
    fn from(nonce: KeyNonce) -> String {
        nonce.to_base64()
    }
}

impl TryFrom<String> for KeyNonce {
    type Error = KeyError;
    fn try_from(text: String) -> Result<Self, KeyError> {
        KeyNonce::parse("this node", &text)
    }
}

impl fmt::Debug for KeyNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyNonce({})", self.to_base64())
    }
}

/// Fill `buf` from the kernel's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), KeyError> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(KeyError::Random(e));
        }
        filled += n as usize;
    }
    Ok(())
}

/// A node's public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// Parse the annotation value of `node`.
    pub fn parse(node: &str, text: &str) -> Result<Self, KeyError> {
        let bad = |problem: String| KeyError::BadPublicKey {
            node: node.to_owned(),
            problem,
        };
        let bytes = BASE64.decode(text.trim()).map_err(|e| bad(e.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| bad(format!("{} bytes, not 32", b.len())))?;
        Ok(PublicKey(bytes))
    }

    /// The annotation value.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// This node's key pair. No `Debug` of the secret, no `Clone`.
pub struct NodeKey {
    secret: StaticSecret,
    public: PublicKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl NodeKey {
    pub fn from_secret_bytes(mut bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        bytes.zeroize();
        let public = PublicKey(DalekPublic::from(&secret).to_bytes());
        NodeKey { secret, public }
    }

    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        random_bytes(&mut bytes)?;
        Ok(Self::from_secret_bytes(bytes))
    }

    /// Load `<state_dir>/node.key`, creating it (0600) on first start.
    /// A key file others can read is refused rather than used.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, KeyError> {
        let path = state_dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(mut bytes) => {
                let mode = fs::metadata(&path)
                    .map_err(|source| KeyError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    bytes.zeroize();
                    return Err(KeyError::Permissions {
                        path,
                        mode: mode & 0o777,
                    });
                }
                let len = bytes.len();
                let array: Result<[u8; 32], _> = bytes.as_slice().try_into();
                bytes.zeroize();
                match array {
                    Ok(array) => Ok(Self::from_secret_bytes(array)),
                    Err(_) => Err(KeyError::Malformed { path, len }),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                let write = |path: &Path| -> io::Result<()> {
                    fs::create_dir_all(state_dir)?;
                    let tmp = path.with_extension("tmp");
                    let _ = fs::remove_file(&tmp);
                    let mut file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    let mut bytes = key.secret.to_bytes();
                    let result = file.write_all(&bytes).and_then(|()| file.sync_all());
                    bytes.zeroize();
                    result?;
                    fs::rename(&tmp, path)
                };
                write(&path).map_err(|source| KeyError::Write {
                    path: path.clone(),
                    source,
                })?;
                Ok(key)
            }
            Err(source) => Err(KeyError::Read { path, source }),
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The static-static secret shared with `peer`.
    pub fn shared_with(&self, peer: &PublicKey) -> PairSecret {
        let shared = self.secret.diffie_hellman(&DalekPublic::from(peer.0));
        PairSecret(shared.to_bytes())
    }
}

/// The X25519 result for one node pair.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct PairSecret([u8; 32]);

impl fmt::Debug for PairSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairSecret(<redacted>)")
    }
}

/// Key material of one SA: AES-256 key followed by the rfc4106 salt.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SaKey([u8; SA_KEY_LEN]);

impl fmt::Debug for SaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SaKey(<redacted>)")
    }
}

impl SaKey {
    pub fn expose(&self) -> &[u8; SA_KEY_LEN] {
        &self.0
    }
}

/// Key of the hello messages one pair exchanges over UDP 4500.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HelloKey([u8; 32]);

impl fmt::Debug for HelloKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HelloKey(<redacted>)")
    }
}

fn push_name(info: &mut Vec<u8>, name: &str) {
    info.extend_from_slice(&(name.len() as u32).to_be_bytes());
    info.extend_from_slice(name.as_bytes());
}

/// `label | lo | hi` with both names length-prefixed: binds the pair whatever
/// the order the caller names it in.
fn pair_info(label: &[u8], a: &str, b: &str) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(label);
    push_name(&mut info, lo);
    push_name(&mut info, hi);
    info
}

impl PairSecret {
    /// The key of the SA carrying `src → dst` traffic in `generation`;
    /// `nonces` are `(src's, dst's)` when both publish one.
    pub fn sa_key(
        &self,
        src: &str,
        dst: &str,
        generation: u32,
        nonces: Option<(&KeyNonce, &KeyNonce)>,
    ) -> SaKey {
        let mut info = pair_info(b"sa", src, dst);
        push_name(&mut info, src);
        push_name(&mut info, dst);
        info.extend_from_slice(&generation.to_be_bytes());
        let salt: Vec<u8> = match nonces {
            Some((src_nonce, dst_nonce)) => [SALT_V2, &src_nonce.0, &dst_nonce.0].concat(),
            None => SALT.to_vec(),
        };
        let mut out = [0u8; SA_KEY_LEN];
        Hkdf::<Sha256>::new(Some(&salt), &self.0)
            .expand(&info, &mut out)
            .expect("36 bytes is a valid HKDF-SHA256 length");
        SaKey(out)
    }

    /// The key authenticating hellos between the pair (either direction).
    pub fn hello_key(&self, a: &str, b: &str) -> HelloKey {
        let info = pair_info(b"hello", a, b);
        let mut out = [0u8; 32];
        Hkdf::<Sha256>::new(Some(SALT), &self.0)
            .expand(&info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        HelloKey(out)
    }
}

impl HelloKey {
    pub fn tag(&self, message: &[u8]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check of `tag` over `message`.
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(message);
        mac.verify_slice(tag).is_ok()
    }
}

/// SPIs below 256 are reserved (RFC 4303); ours have bit 31 clear and bit 30 set.
const SPI_BASE: u32 = 0x4000_0000;

/// The SPI of the `src → dst` SA of `generation`. Layout:
/// `0x40 | 22-bit pair slot | 8-bit generation`, where the pair slot is
/// `slot(src) XOR slot(dst)` over node slots unique in the cluster. The
/// kernel keys SAs by (destination address, SPI), so two kinds of SAs must
/// never share an SPI: those one node receives (fixed `dst`, any `src`), and
/// those one node sends to peers behind one NAT address (fixed `src`, any
/// `dst`). XOR with distinct slots is one-to-one in either argument, so
/// neither can collide; two generations of one direction never share an SPI
/// either (a receiver keeps at most four at once). Both sides compute the
/// slots the same way from the cluster's node names (`nodes`, which includes
/// `src` and `dst`; the snapshot is shared).
pub fn spi(src: &str, dst: &str, generation: u32, nodes: &[&str]) -> u32 {
    SpiSlots::new(nodes).spi(src, dst, generation)
}

const SLOT_BITS: u32 = 22;

fn slot_hash(node: &str, round: u32) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(b"fabedge spi slot");
    hasher.update((node.len() as u32).to_be_bytes());
    hasher.update(node.as_bytes());
    hasher.update(round.to_be_bytes());
    let digest = hasher.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & ((1 << SLOT_BITS) - 1)
}

/// The SPI agents from before key nonces give the `src → dst` SA: a 22-bit
/// slot per sender, unique per receiver only (two edges behind one NAT may
/// collide at their sender). Used only with a peer that publishes no
/// nonce, so that old and new agents agree during an upgrade.
pub fn legacy_spi(src: &str, dst: &str, generation: u32, nodes: &[&str]) -> u32 {
    let mut senders: Vec<&str> = nodes.iter().copied().filter(|n| *n != dst).collect();
    if !senders.contains(&src) {
        senders.push(src);
    }
    senders.sort_unstable();
    senders.dedup();
    let hash = |sender: &str, round: u32| {
        let mut hasher = Sha256::new();
        hasher.update(b"fabedge spi");
        hasher.update((dst.len() as u32).to_be_bytes());
        hasher.update(dst.as_bytes());
        hasher.update((sender.len() as u32).to_be_bytes());
        hasher.update(sender.as_bytes());
        hasher.update(round.to_be_bytes());
        let digest = hasher.finalize();
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & ((1 << SLOT_BITS) - 1)
    };
    let mut taken = std::collections::BTreeSet::new();
    for sender in senders {
        let slot = (0..)
            .map(|round| hash(sender, round))
            .find(|s| !taken.contains(s))
            .expect("2^22 slots");
        if sender == src {
            return SPI_BASE | (slot << 8) | (generation & 0xFF);
        }
        taken.insert(slot);
    }
    unreachable!("src was added to the senders")
}

/// The slot of every node of a snapshot, computed once per plan.
pub struct SpiSlots {
    nodes: Vec<String>,
    slots: std::collections::HashMap<String, u32>,
}

impl SpiSlots {
    /// Nodes in name order each take the first round whose hash no earlier
    /// node holds, so no two nodes share a slot.
    pub fn new(nodes: &[&str]) -> Self {
        let mut names: Vec<&str> = nodes.to_vec();
        names.sort_unstable();
        names.dedup();
        let mut taken = std::collections::HashSet::new();
        let mut slots = std::collections::HashMap::new();
        for name in &names {
            let slot = (0..)
                .map(|round| slot_hash(name, round))
                .find(|s| !taken.contains(s))
                .expect("2^22 slots");
            taken.insert(slot);
            slots.insert((*name).to_owned(), slot);
        }
        SpiSlots {
            nodes: names.into_iter().map(str::to_owned).collect(),
            slots,
        }
    }

    fn slot(&self, node: &str) -> u32 {
        match self.slots.get(node) {
            Some(&slot) => slot,
            // Not in the snapshot (callers always include both ends): as if
            // it were.
            None => {
                let mut nodes: Vec<&str> = self.nodes.iter().map(String::as_str).collect();
                nodes.push(node);
                SpiSlots::new(&nodes).slots[node]
            }
        }
    }

    /// See [`spi`].
    pub fn spi(&self, src: &str, dst: &str, generation: u32) -> u32 {
        let pair = self.slot(src) ^ self.slot(dst);
        SPI_BASE | (pair << 8) | (generation & 0xFF)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn key(seed: u8) -> NodeKey {
        NodeKey::from_secret_bytes([seed; 32])
    }

    #[test]
    fn both_sides_derive_the_same_key_for_a_direction() {
        let (edge, connector) = (key(1), key(2));
        let at_edge = edge
            .shared_with(&connector.public())
            .sa_key("edge-1", "cloud-1", 7, None);
        let at_connector = connector
            .shared_with(&edge.public())
            .sa_key("edge-1", "cloud-1", 7, None);
        assert_eq!(at_edge, at_connector);
        let hello_edge = edge
            .shared_with(&connector.public())
            .hello_key("edge-1", "cloud-1");
        let hello_connector = connector
            .shared_with(&edge.public())
            .hello_key("cloud-1", "edge-1");
        let tag = hello_edge.tag(b"hello");
        assert!(hello_connector.verify(b"hello", &tag));
        assert!(!hello_connector.verify(b"hellO", &tag));
    }

    #[test]
    fn directions_pairs_and_generations_never_share_a_key() {
        let nodes: Vec<(String, NodeKey)> =
            (1..=6).map(|i| (format!("node-{i}"), key(i))).collect();
        let mut seen = BTreeSet::new();
        let mut count = 0;
        for (src, src_key) in &nodes {
            for (dst, dst_key) in &nodes {
                if src == dst {
                    continue;
                }
                for generation in 0..4 {
                    let k = src_key
                        .shared_with(&dst_key.public())
                        .sa_key(src, dst, generation, None);
                    seen.insert(k.expose().to_vec());
                    count += 1;
                }
            }
        }
        assert_eq!(
            seen.len(),
            count,
            "every (pair, direction, generation) has its own key"
        );
    }

    #[test]
    fn each_ends_nonce_changes_every_key_and_both_ends_agree() {
        let (edge, connector) = (key(1), key(2));
        let (n1, n2, n3) = (
            KeyNonce::from_bytes([1; NONCE_LEN]),
            KeyNonce::from_bytes([2; NONCE_LEN]),
            KeyNonce::from_bytes([3; NONCE_LEN]),
        );
        let at_edge = |nonces| {
            edge.shared_with(&connector.public())
                .sa_key("edge-1", "cloud-1", 7, nonces)
        };
        let at_connector =
            connector
                .shared_with(&edge.public())
                .sa_key("edge-1", "cloud-1", 7, Some((&n1, &n2)));
        assert_eq!(at_edge(Some((&n1, &n2))), at_connector);
        let all = [
            at_edge(None),
            at_edge(Some((&n1, &n2))),
            at_edge(Some((&n3, &n2))),
            at_edge(Some((&n1, &n3))),
            at_edge(Some((&n2, &n1))),
        ];
        let distinct: BTreeSet<Vec<u8>> = all.iter().map(|k| k.expose().to_vec()).collect();
        assert_eq!(
            distinct.len(),
            all.len(),
            "a new nonce on either end: new key"
        );
        let published = n1.to_base64();
        assert_eq!(KeyNonce::parse("edge-1", &published).unwrap(), n1);
        let err = KeyNonce::parse("edge-1", "AAAA").unwrap_err().to_string();
        assert!(
            err.contains("edge-1") && err.contains(KEY_NONCE_ANNOTATION),
            "{err}"
        );
    }

    #[test]
    fn names_are_length_prefixed_so_concatenations_do_not_collide() {
        let (a, b) = (key(3), key(4));
        let secret = a.shared_with(&b.public());
        assert_ne!(
            secret.sa_key("ab", "c", 0, None),
            secret.sa_key("a", "bc", 0, None)
        );
    }

    #[test]
    fn spis_are_unique_per_receiver_and_generation() {
        let names: Vec<String> = (0..400).map(|i| format!("edge-{i}")).collect();
        let mut nodes: Vec<&str> = names.iter().map(String::as_str).collect();
        nodes.push("cloud-1");
        let mut seen = BTreeSet::new();
        for sender in &names {
            for generation in [41, 42, 43] {
                let spi = spi(sender, "cloud-1", generation, &nodes);
                assert!(spi >= 256, "SPIs below 256 are reserved");
                assert!(
                    seen.insert(spi),
                    "{sender} gen {generation}: SPI {spi:#x} collides at cloud-1"
                );
            }
        }
        // The other side computes the same value from the same snapshot,
        // whatever order it lists the nodes in.
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(
            spi("edge-7", "cloud-1", 42, &nodes),
            spi("edge-7", "cloud-1", 42, &reversed)
        );
    }

    #[test]
    fn spi_collisions_are_resolved_the_same_way_on_both_sides() {
        // Find two nodes whose first-round slots collide.
        let names: Vec<String> = (0..20000).map(|i| format!("n{i}")).collect();
        let mut first: std::collections::HashMap<u32, &str> = Default::default();
        let (a, b) = names
            .iter()
            .find_map(|n| {
                first
                    .insert(slot_hash(n, 0), n)
                    .map(|prev| (prev, n.as_str()))
            })
            .expect("20000 names in 2^22 slots collide (birthday bound)");
        let nodes = [a, b, "rx"];
        assert_ne!(spi(a, "rx", 1, &nodes), spi(b, "rx", 1, &nodes));
        assert_ne!(spi("rx", a, 1, &nodes), spi("rx", b, 1, &nodes));
    }

    /// `spi("edge-1", "cloud-1", 3, ["cloud-1", "edge-1", "edge-2"])` as the
    /// agent before nonces computed it.
    const LEGACY_EDGE_1_TO_CLOUD_1_GEN_3: u32 = 0x52d8_e403;

    #[test]
    fn peers_without_a_nonce_get_the_spis_agents_before_nonces_computed() {
        let nodes = ["cloud-1", "edge-1", "edge-2"];
        let old = legacy_spi("edge-1", "cloud-1", 3, &nodes);
        assert_eq!(old & 0xFF, 3);
        assert_eq!(old & 0xC000_0000, SPI_BASE);
        assert_ne!(old, legacy_spi("edge-2", "cloud-1", 3, &nodes));
        assert_eq!(old, LEGACY_EDGE_1_TO_CLOUD_1_GEN_3);
    }

    #[test]
    fn spis_never_collide_for_edges_behind_one_nat() {
        // The connector's outbound SAs to edges behind one NAT all have the
        // NAT's address as destination: their SPIs alone tell them apart.
        // The edges' SAs towards the connector share its address likewise.
        let names: Vec<String> = (0..2000).map(|i| format!("edge-{i}")).collect();
        let mut nodes: Vec<&str> = names.iter().map(String::as_str).collect();
        nodes.extend(["cloud-1", "cloud-2"]);
        let slots = SpiSlots::new(&nodes);
        for connector in ["cloud-1", "cloud-2"] {
            let mut to_nat = BTreeSet::new();
            let mut to_connector = BTreeSet::new();
            for edge in &names {
                for generation in [7, 8, 9, 10] {
                    let out = slots.spi(connector, edge, generation);
                    assert!(
                        to_nat.insert(out),
                        "{connector} -> {edge} gen {generation}: SPI {out:#x} collides"
                    );
                    let back = slots.spi(edge, connector, generation);
                    assert!(
                        to_connector.insert(back),
                        "{edge} -> {connector} gen {generation}: SPI {back:#x} collides"
                    );
                }
            }
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let node = key(9);
        let secret = node.shared_with(&key(10).public());
        let sa = secret.sa_key("a", "b", 1, None);
        let printed = format!(
            "{node:?} {secret:?} {sa:?} {:?}",
            secret.hello_key("a", "b")
        );
        assert!(printed.contains("<redacted>"));
        let as_list = format!("{:?}", &sa.expose()[..]);
        let as_hex: String = sa.expose().iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !printed.contains(&as_list[1..as_list.len() - 1]) && !printed.contains(&as_hex),
            "{printed}"
        );
        assert!(!printed.contains(&BASE64.encode([9u8; 32])));
    }

    #[test]
    fn the_key_file_is_created_0600_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("fabedge-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let created = NodeKey::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = NodeKey::load_or_create(&dir).unwrap();
        assert_eq!(created.public(), loaded.public());
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeKey::load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        fs::write(dir.join(KEY_FILE), b"short").unwrap();
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
        let err = NodeKey::load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("not a 32-byte"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn public_keys_round_trip_through_the_annotation_and_bad_ones_name_the_node() {
        let public = key(5).public();
        assert_eq!(PublicKey::parse("n", &public.to_base64()).unwrap(), public);
        let err = PublicKey::parse("edge-9", "AAAA").unwrap_err().to_string();
        assert!(
            err.contains("edge-9") && err.contains(PUBLIC_KEY_ANNOTATION),
            "{err}"
        );
    }
}
