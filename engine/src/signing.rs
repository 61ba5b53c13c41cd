//! Device keys and signed versions. A device id is an ed25519 public key; in signed mode the
//! endpoint (`sx:history/@by`) of a device is the lowercase hex of that key, and every version
//! carries the signature of the device named in its topmost history entry over
//! `VERSION_SIGNATURE_DOMAIN || canonical encoding` (`feedsync::canonical`).
//!
//! The signed bytes also name the feed (the folder) the version belongs to ([`FeedScope`]), so a
//! version signed for one folder cannot be replayed into another: before signature version 2 a
//! member of two folders could post one folder's versions (a tombstone, say) into the other
//! under their author's name (issue 11). Version 1 signatures no longer verify; stores written
//! with them are repaired on open (`transport::store`, schema 4, and [`migrate_signatures`]).
//!
//! Keys come from the caller (`SigningKey::from_bytes(seed)`): the engine never draws randomness.
//! Verification is `verify_strict` (no small-order keys, canonical `S`), so a signature cannot be
//! malleated into a second valid one by anyone but the key holder.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::feedsync::{encode_version_into, Endpoint, Item, ItemId, Version};

pub use ed25519_dalek::SigningKey as DeviceKey;

/// What every version signature covers first (domain separation); then the [`FeedScope`], then
/// the canonical encoding. Version 2: version 1 had no scope.
pub const VERSION_SIGNATURE_DOMAIN: &[u8] = b"feedmesh/version-signature/v2\0";

/// What a version signature is bound to besides the version itself: the folder whose feed the
/// version belongs to (its 16-byte id). Everything else that gives a version its meaning (item
/// id, content, history, flags) is in the canonical encoding; a folder id names its deployment
/// too, since it is derived from a signed directory change.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeedScope(pub [u8; 16]);

impl fmt::Debug for FeedScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scope:{}", hex(&self.0[..6]))
    }
}

/// A device id: its ed25519 public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 32]);

impl DeviceId {
    pub fn of(key: &SigningKey) -> Self {
        Self(key.verifying_key().to_bytes())
    }

    /// The endpoint this device writes in `sx:history/@by`: 64 lowercase hex digits.
    pub fn endpoint(&self) -> Endpoint {
        // 64 hex digits are a valid endpoint (non-empty, far below the length limit).
        Endpoint::new(&hex(&self.0)).expect("hex of 32 bytes is a valid endpoint")
    }

    /// The device an endpoint names, when it is 64 lowercase hex digits.
    pub fn from_endpoint(endpoint: &Endpoint) -> Option<Self> {
        let bytes = unhex(endpoint.as_str())?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The ed25519 key; fails for bytes that are not a valid point.
    pub fn verifying_key(&self) -> Result<VerifyingKey, SignatureError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| SignatureError::BadKey { device: *self })
    }

    /// Verifies `signature` by this device over `domain || message` (strict ed25519).
    pub fn verify(&self, domain: &[u8], message: &[u8], signature: &Sig64) -> Result<(), SignatureError> {
        let key = self.verifying_key()?;
        let mut bytes = Vec::with_capacity(domain.len() + message.len());
        bytes.extend_from_slice(domain);
        bytes.extend_from_slice(message);
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(&bytes, &sig).map_err(|_| SignatureError::Invalid { device: *self })
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev:{}", &hex(&self.0[..6]))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Signs `domain || message` with `key`.
pub fn sign(key: &SigningKey, domain: &[u8], message: &[u8]) -> Sig64 {
    let mut bytes = Vec::with_capacity(domain.len() + message.len());
    bytes.extend_from_slice(domain);
    bytes.extend_from_slice(message);
    Sig64(key.sign(&bytes).to_bytes())
}

/// A 64-byte ed25519 signature; on the wire a length-prefixed byte string that must be 64 long.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sig64(pub [u8; 64]);

impl fmt::Debug for Sig64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig:{}", hex(&self.0[..6]))
    }
}

impl Serialize for Sig64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Sig64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sig64, E> {
                let bytes: [u8; 64] = v.try_into().map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Sig64(bytes))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Sig64, A::Error> {
                let mut bytes = [0u8; 64];
                for (i, slot) in bytes.iter_mut().enumerate() {
                    *slot = seq.next_element()?.ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(65, &self));
                }
                Ok(Sig64(bytes))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

/// The signature a version carries (shared, so cloning a version copies no payload). It is an
/// attestation, not part of the version's identity: version equality, the winner rule, the
/// canonical encoding and fingerprints ignore it.
#[derive(Clone, PartialEq, Eq)]
pub struct VersionSignature(pub Arc<SignatureForm>);

/// The two forms of a version signature. Both are checked by [`verify_version`] on the version
/// alone, so a version of either form can be stored and forwarded on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureForm {
    /// The device's signature of this version: `VERSION_SIGNATURE_DOMAIN || scope || canonical
    /// encoding`. 64 bytes as bytes.
    Single(Sig64),
    /// The device's signature of a batch of its versions (a bulk write signs once per
    /// [`BATCH_MAX`] versions), with this version's path to the batch's Merkle root.
    Batch(BatchProof),
}

/// Versions signed under one root at most ([`sign_versions`]): a tree of depth at most
/// [`BATCH_DEPTH_MAX`].
pub const BATCH_MAX: usize = 1 << BATCH_DEPTH_MAX;
/// Depth of the largest batch tree. Each level adds a 32-byte sibling to every version's proof,
/// so the depth trades bytes on the wire (67 + 32 x depth per version, against 64) for
/// signatures to check (one per 2^depth versions).
pub const BATCH_DEPTH_MAX: usize = 5;
/// The longest signature, as bytes: the batch form at the largest depth.
pub const SIGNATURE_BYTES_MAX: usize = 67 + 32 * BATCH_DEPTH_MAX;
/// What a batch root signature covers first; then the scope, the depth and the root.
pub const BATCH_SIGNATURE_DOMAIN: &[u8] = b"feedmesh/version-batch/v1\0";

/// A version's place in a signed batch: the root's signature, the leaf index, and the sibling
/// hashes from the leaf up (the depth is their number, 1 to [`BATCH_DEPTH_MAX`]).
///
/// The tree: leaf `i` is `BLAKE3(0x00 || VERSION_SIGNATURE_DOMAIN || scope || canonical
/// encoding)` of the batch's `i`-th version, positions past the last version hold 32 zero bytes,
/// an inner node is `BLAKE3(0x01 || left || right)`, and the device signs
/// `BATCH_SIGNATURE_DOMAIN || scope || depth || root`. The prefixes keep leaves and inner nodes
/// apart, and the depth is signed, so a proof cannot pass an inner node off as a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchProof {
    pub root_signature: Sig64,
    pub index: u16,
    pub siblings: Vec<[u8; 32]>,
}

impl BatchProof {
    /// The root this proof leads to from `leaf`.
    fn root(&self, leaf: [u8; 32]) -> [u8; 32] {
        let mut node = leaf;
        for (level, sibling) in self.siblings.iter().enumerate() {
            node = if (self.index >> level) & 1 == 0 { inner(&node, sibling) } else { inner(sibling, &node) };
        }
        node
    }
}

fn inner(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

pub(crate) fn leaf_hash(version: &Version, scope: &FeedScope) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(VERSION_SIGNATURE_DOMAIN);
    h.update(&version_message(version, scope));
    *h.finalize().as_bytes()
}

fn root_message(scope: &FeedScope, depth: usize, root: &[u8; 32]) -> [u8; 49] {
    let mut m = [0u8; 49];
    m[..16].copy_from_slice(&scope.0);
    m[16] = depth as u8;
    m[17..].copy_from_slice(root);
    m
}

impl VersionSignature {
    /// The version's own signature.
    pub fn single(sig: Sig64) -> Self {
        Self(Arc::new(SignatureForm::Single(sig)))
    }

    /// As bytes (the wire, the store and the FeedSync extension element carry these): the 64
    /// signature bytes, or for a batch the root signature (64), the depth (1), the index (2,
    /// little-endian) and the siblings (32 each).
    pub fn to_bytes(&self) -> Vec<u8> {
        match &*self.0 {
            SignatureForm::Single(s) => s.0.to_vec(),
            SignatureForm::Batch(p) => {
                let mut out = Vec::with_capacity(67 + 32 * p.siblings.len());
                out.extend_from_slice(&p.root_signature.0);
                out.push(p.siblings.len() as u8);
                out.extend_from_slice(&p.index.to_le_bytes());
                for s in &p.siblings {
                    out.extend_from_slice(s);
                }
                out
            }
        }
    }

    /// The signature `bytes` encode ([`VersionSignature::to_bytes`]); `None` for any other length
    /// or layout (a depth of 0 or over [`BATCH_DEPTH_MAX`], an index outside the tree).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if let Ok(sig) = <[u8; 64]>::try_from(bytes) {
            return Some(Self::single(Sig64(sig)));
        }
        let root_signature = Sig64(bytes.get(..64)?.try_into().ok()?);
        let depth = usize::from(*bytes.get(64)?);
        let index = u16::from_le_bytes(bytes.get(65..67)?.try_into().ok()?);
        if !(1..=BATCH_DEPTH_MAX).contains(&depth) || bytes.len() != 67 + 32 * depth || index >> depth != 0 {
            return None;
        }
        let siblings = bytes[67..].chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        Some(Self(Arc::new(SignatureForm::Batch(BatchProof { root_signature, index, siblings }))))
    }

    /// Lowercase hex of [`VersionSignature::to_bytes`] (how the FeedSync extension element
    /// writes it): 128 digits for the single form, 198 to 454 for a batch.
    pub fn to_hex(&self) -> String {
        hex(&self.to_bytes())
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() > 2 * SIGNATURE_BYTES_MAX {
            return None;
        }
        Self::from_bytes(&unhex(text)?)
    }
}

impl fmt::Debug for VersionSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            SignatureForm::Single(s) => fmt::Debug::fmt(s, f),
            SignatureForm::Batch(p) => {
                write!(f, "batch:{:?}[{}/{}]", p.root_signature, p.index, 1u32 << p.siblings.len())
            }
        }
    }
}

/// Why a signed item or change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("item {id}: version carries no signature")]
    Missing { id: ItemId },
    #[error("item {id}: topmost history entry names no device (its `by` is not a device key)")]
    NoSigner { id: ItemId },
    #[error("device {device}: not a valid ed25519 public key")]
    BadKey { device: DeviceId },
    #[error("signature by {device} does not verify")]
    Invalid { device: DeviceId },
    #[error("item {id}: signed by {device}, which may not write this feed")]
    NotAllowed { id: ItemId, device: DeviceId },
    #[error("a signed replica makes only signed local changes")]
    LocalUnsigned,
    #[error("the replica has no folder scope to sign or verify versions for")]
    NoScope,
}

fn version_message(version: &Version, scope: &FeedScope) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(144 + version.content.inner.len());
    bytes.extend_from_slice(&scope.0);
    encode_version_into(version, &mut bytes);
    bytes
}

/// The signature of `version` in the feed `scope` by `key` (the caller makes sure `key` is the
/// topmost `by`).
pub fn sign_version(version: &Version, scope: &FeedScope, key: &SigningKey) -> VersionSignature {
    VersionSignature::single(sign(key, VERSION_SIGNATURE_DOMAIN, &version_message(version, scope)))
}

/// Signs `versions` (each of them `key`'s, in the feed `scope`) once per [`BATCH_MAX`]: each
/// gets the batch form ([`BatchProof`]), or the single form when it is alone in its batch. A bulk
/// write of `n` versions costs `n / 32` ed25519 signatures here and at every receiver, and each
/// version still verifies on its own ([`verify_version`]).
pub fn sign_versions(versions: &[&Version], scope: &FeedScope, key: &SigningKey) -> Vec<VersionSignature> {
    let mut out = Vec::with_capacity(versions.len());
    for batch in versions.chunks(BATCH_MAX) {
        if let [only] = batch {
            out.push(sign_version(only, scope, key));
            continue;
        }
        let depth = batch.len().next_power_of_two().trailing_zeros() as usize;
        let mut level: Vec<[u8; 32]> = batch.iter().map(|v| leaf_hash(v, scope)).collect();
        level.resize(1 << depth, [0; 32]);
        let mut levels = vec![level];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let up = below.chunks_exact(2).map(|pair| inner(&pair[0], &pair[1])).collect();
            levels.push(up);
        }
        let root = levels.last().and_then(|l| l.first()).copied().unwrap_or_default();
        let root_signature = sign(key, BATCH_SIGNATURE_DOMAIN, &root_message(scope, depth, &root));
        for index in 0..batch.len() {
            let siblings = (0..depth).map(|level| levels[level][(index >> level) ^ 1]).collect();
            let proof = BatchProof { root_signature, index: index as u16, siblings };
            out.push(VersionSignature(Arc::new(SignatureForm::Batch(proof))));
        }
    }
    out
}

/// The device named in the version's topmost history entry.
pub(crate) fn signer_of(version: &Version) -> Result<DeviceId, SignatureError> {
    version
        .topmost()
        .by
        .as_ref()
        .and_then(DeviceId::from_endpoint)
        .ok_or_else(|| SignatureError::NoSigner { id: version.id.clone() })
}

/// Checks a version's signature (either form) for the feed `scope`; returns the signing device.
pub fn verify_version(version: &Version, scope: &FeedScope) -> Result<DeviceId, SignatureError> {
    let device = signer_of(version)?;
    let signature =
        version.signature.as_ref().ok_or_else(|| SignatureError::Missing { id: version.id.clone() })?;
    match &*signature.0 {
        SignatureForm::Single(sig) => {
            device.verify(VERSION_SIGNATURE_DOMAIN, &version_message(version, scope), sig)?
        }
        SignatureForm::Batch(proof) => {
            let root = proof.root(leaf_hash(version, scope));
            let message = root_message(scope, proof.siblings.len(), &root);
            device.verify(BATCH_SIGNATURE_DOMAIN, &message, &proof.root_signature)?
        }
    }
    Ok(device)
}

/// Repairs an item read from a store written before signature version 2 (the store itself is
/// trusted: what is in it was verified when it arrived). Versions that verify for `scope` are
/// kept; versions `key` authored are signed again for `scope`; versions of other authors cannot
/// be, so they are dropped: a conflict from the item, and an item whose winner it is, whole
/// (`None`). They come back, signed anew, in their authors' next sessions. A cloud passes no key
/// and keeps only what verifies.
pub fn migrate_signatures(item: &Item, scope: &FeedScope, key: Option<&SigningKey>) -> Option<Item> {
    let me = key.map(DeviceId::of);
    let keep = |version: &Version| -> Option<Version> {
        if verify_version(version, scope).is_ok() {
            return Some(version.clone());
        }
        let author = version.topmost().by.as_ref().and_then(DeviceId::from_endpoint)?;
        let key = key.filter(|_| me == Some(author))?;
        let mut signed = version.clone();
        signed.signature = Some(sign_version(version, scope, key));
        Some(signed)
    };
    let mut out = item.clone();
    out.version = keep(&item.version)?;
    out.conflicts = item.conflicts.iter().filter_map(keep).collect();
    Some(out)
}

/// Signatures found valid ahead of a merge: a driver checks a message's versions before it takes
/// the lock its replica is under ([`Verified::check`]), hands the result to the replica
/// (`Replica::set_verified`), and the merge under the lock then looks the versions up instead of
/// verifying them again. An entry is the BLAKE3 hash of everything a check covers (domain, scope,
/// canonical encoding, signature), so it vouches for exactly that signature on exactly that
/// version in that folder; whether the signer may write the folder is still checked at merge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Shared: a driver hands one set to a replica several times (chunked merges).
    checked: Arc<BTreeSet<[u8; 32]>>,
}

/// The key of a valid signature in [`Verified`]: the version's leaf hash (domain, scope,
/// canonical encoding) and the signature's bytes.
pub(crate) fn verified_key(leaf: &[u8; 32], signature: &VersionSignature) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"feedmesh/verified/v1\0");
    hasher.update(leaf);
    hasher.update(&signature.to_bytes());
    *hasher.finalize().as_bytes()
}

impl Verified {
    /// Verifies the versions of `items` (winners and conflicts) for `scope`, on up to `threads`
    /// threads. With `signers`, versions by any other device are not verified (they will be
    /// refused at merge anyway). Stops at the first invalid signature: a message with one is
    /// refused whole, so checking the rest would be wasted work an attacker chose.
    pub fn check<I: std::borrow::Borrow<Item> + Sync>(
        items: &[I],
        scope: &FeedScope,
        signers: Option<&BTreeSet<DeviceId>>,
        threads: usize,
    ) -> Self {
        let versions: Vec<&Version> = items
            .iter()
            .flat_map(|i| std::iter::once(&i.borrow().version).chain(i.borrow().conflicts.iter()))
            .collect();
        Self::check_versions(&versions, scope, signers, threads)
    }

    /// [`Verified::check`] of a list of versions. A batch root is checked once per thread: the
    /// versions of one bulk write share it, so a message of them costs one ed25519 check per
    /// [`BATCH_MAX`] versions and hashing per version.
    pub fn check_versions(
        versions: &[&Version],
        scope: &FeedScope,
        signers: Option<&BTreeSet<DeviceId>>,
        threads: usize,
    ) -> Self {
        let leaves: Vec<(&Version, [u8; 32])> = versions.iter().map(|v| (*v, leaf_hash(v, scope))).collect();
        Self::check_leaves(&leaves, scope, signers, threads)
    }

    /// [`Verified::check_versions`] with each version's leaf hash computed already.
    pub(crate) fn check_leaves(
        versions: &[(&Version, [u8; 32])],
        scope: &FeedScope,
        signers: Option<&BTreeSet<DeviceId>>,
        threads: usize,
    ) -> Self {
        /// Below this many versions per thread, spawning costs more than it saves.
        const PER_THREAD_MIN: usize = 32;
        /// Checked roots remembered per thread (a message of 1 MiB holds a few thousand).
        const ROOTS_MAX: usize = 1 << 14;
        let check = |chunk: &[(&Version, [u8; 32])]| {
            let mut out = BTreeSet::new();
            let mut roots: BTreeSet<(DeviceId, [u8; 32], Sig64)> = BTreeSet::new();
            for &(version, leaf) in chunk {
                let (Some(signature), Some(device)) =
                    (&version.signature, version.topmost().by.as_ref().and_then(DeviceId::from_endpoint))
                else {
                    continue;
                };
                if signers.is_some_and(|s| !s.contains(&device)) {
                    continue;
                }
                let valid = match &*signature.0 {
                    SignatureForm::Single(sig) => {
                        device.verify(VERSION_SIGNATURE_DOMAIN, &version_message(version, scope), sig).is_ok()
                    }
                    SignatureForm::Batch(proof) => {
                        let root = proof.root(leaf);
                        let key = (device, root, proof.root_signature);
                        roots.contains(&key) || {
                            let message = root_message(scope, proof.siblings.len(), &root);
                            let ok = device
                                .verify(BATCH_SIGNATURE_DOMAIN, &message, &proof.root_signature)
                                .is_ok();
                            if ok && roots.len() < ROOTS_MAX {
                                roots.insert(key);
                            }
                            ok
                        }
                    }
                };
                if !valid {
                    break;
                }
                out.insert(verified_key(&leaf, signature));
            }
            out
        };
        let threads = threads.min(versions.len() / PER_THREAD_MIN).max(1);
        let checked = if threads == 1 {
            check(versions)
        } else {
            let chunks = versions.chunks(versions.len().div_ceil(threads));
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunks.map(|chunk| scope.spawn(move || check(chunk))).collect();
                let mut all = BTreeSet::new();
                for h in handles {
                    all.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                }
                all
            })
        };
        Self { checked: Arc::new(checked) }
    }

    /// How many valid signatures are held.
    pub fn len(&self) -> usize {
        self.checked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checked.is_empty()
    }

    /// Whether the signature with this [`verified_key`] is held.
    pub(crate) fn holds_key(&self, key: &[u8; 32]) -> bool {
        self.checked.contains(key)
    }

    fn contains(&self, version: &Version, scope: &FeedScope) -> bool {
        !self.checked.is_empty()
            && version
                .signature
                .as_ref()
                .is_some_and(|s| self.checked.contains(&verified_key(&leaf_hash(version, scope), s)))
    }
}

/// Checks every version of `item` (winner and conflicts), skipping those equal (with the same
/// signature) to a version of `known`, which were checked when they arrived, and those in
/// `verified`. With `signers`, each signing device must be in the set.
pub fn verify_item(
    item: &Item,
    known: Option<&Item>,
    scope: &FeedScope,
    signers: Option<&BTreeSet<DeviceId>>,
    verified: &Verified,
) -> Result<(), SignatureError> {
    for version in std::iter::once(&item.version).chain(item.conflicts.iter()) {
        if held(known, version) {
            continue;
        }
        let device = if verified.contains(version, scope) {
            signer_of(version)?
        } else {
            verify_version(version, scope)?
        };
        if signers.is_some_and(|s| !s.contains(&device)) {
            return Err(SignatureError::NotAllowed { id: version.id.clone(), device });
        }
    }
    Ok(())
}

/// Whether `known` holds `version` with the same signature (it was checked when it arrived).
pub(crate) fn held(known: Option<&Item>, version: &Version) -> bool {
    known.is_some_and(|k| {
        std::iter::once(&k.version)
            .chain(k.conflicts.iter())
            .any(|v| v == version && v.signature.is_some() && v.signature == version.signature)
    })
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Lowercase hex to bytes (`None` for odd length or another character).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes.chunks(2).map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?)).collect()
}
