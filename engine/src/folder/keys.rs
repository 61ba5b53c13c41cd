//! Content keys: what keeps a `cloud` folder's files unreadable to the cloud that stores them.
//!
//! Each folder has a content key per epoch ([`ContentKey`], 32 random bytes from the caller).
//! Content stored at the cloud is sealed chunk group by chunk group with XChaCha20-Poly1305
//! (RustCrypto `chacha20poly1305`), the nonce derived from the file's root and the group's index
//! (a group's plaintext is fixed by them, so a repeated nonce only ever seals the same bytes), the
//! folder, epoch, root and index bound as associated data, so a group cannot be moved to another
//! file, place or folder. A key reaches a member device wrapped for that device ([`WrappedKey`]):
//! an ephemeral X25519 key agreed with the device's key (its ed25519 key in Montgomery form,
//! `x25519-dalek`), HKDF-SHA256 of the shared secret into a key-encryption key, ChaCha20-Poly1305
//! over the content key: the construction of libsodium's sealed boxes and age's X25519
//! recipients, from maintained crates, nothing hand-rolled. The cloud never holds a content key.
//!
//! Removing a member rotates the key ([`KeyRing::rotate`]): content written afterwards is sealed
//! under the new epoch, wrapped only for the remaining members' devices. What the removed member
//! can still read: everything sealed under the epochs it held (content written before its
//! removal), as it could read those files when it was a member.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hkdf::Hkdf;
use sha2::Sha256;

use super::entry::ContentHash;
use crate::directory::{Op, State as DirState, KEYS_PER_CHANGE_MAX};
use crate::ids::FolderId;
use crate::signing::{DeviceId, DeviceKey};

/// Bytes a sealed group adds (the Poly1305 tag).
pub const SEAL_OVERHEAD: usize = 16;
/// Most epochs one key ring keeps (a folder rotates once per member removal).
pub const EPOCHS_MAX: usize = 4096;

const WRAP_INFO: &[u8] = b"feedmesh 2026 content key wrap v1";
const NONCE_CONTEXT: &str = "feedmesh 2026 content group nonce v1";
const CHECK_CONTEXT: &str = "feedmesh 2026 content key check v1";

/// Why a key or a sealed group was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the sealed group does not open with this key (wrong key, epoch, file or place, or altered)")]
    Open,
    #[error("the wrapped key is not for this device, or was altered")]
    Unwrap,
    #[error("the device's public key is not a valid ed25519 key")]
    BadDevice,
    #[error("no key of epoch {epoch} in this folder's ring")]
    NoEpoch { epoch: u32 },
    #[error("the key ring holds {max} epochs already", max = EPOCHS_MAX)]
    Full,
}

/// One epoch's content key of a folder.
#[derive(Clone, PartialEq, Eq)]
pub struct ContentKey {
    pub folder: FolderId,
    pub epoch: u32,
    key: [u8; 32],
}

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentKey({:?}, epoch {})", self.folder, self.epoch)
    }
}

impl ContentKey {
    /// A key from 32 random bytes the caller drew (the engine has no randomness of its own).
    pub fn new(folder: FolderId, epoch: u32, random: [u8; 32]) -> Self {
        Self { folder, epoch, key: random }
    }

    fn aad(&self, root: &ContentHash, group: u64) -> [u8; 16 + 4 + 32 + 8] {
        let mut aad = [0u8; 60];
        aad[..16].copy_from_slice(&self.folder.0);
        aad[16..20].copy_from_slice(&self.epoch.to_le_bytes());
        aad[20..52].copy_from_slice(&root.0);
        aad[52..].copy_from_slice(&group.to_le_bytes());
        aad
    }

    fn nonce(root: &ContentHash, group: u64) -> [u8; 24] {
        let mut hasher = blake3::Hasher::new_derive_key(NONCE_CONTEXT);
        hasher.update(&root.0);
        hasher.update(&group.to_le_bytes());
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&hasher.finalize().as_bytes()[..24]);
        nonce
    }

    /// What the directory keeps to commit to this key (`Op::FolderKeys::check`): a keyed hash,
    /// which tells nothing of the key.
    pub fn check(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key(CHECK_CONTEXT);
        hasher.update(&self.folder.0);
        hasher.update(&self.epoch.to_le_bytes());
        hasher.update(&self.key);
        *hasher.finalize().as_bytes()
    }

    /// Seals chunk group `group` of the file `root` (what a device uploads to the cloud).
    pub fn seal_group(&self, root: &ContentHash, group: u64, plain: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        let aad = self.aad(root, group);
        cipher
            .encrypt((&Self::nonce(root, group)).into(), Payload { msg: plain, aad: &aad })
            // Invariant: XChaCha20-Poly1305 encryption fails only past 256 GiB per message; a group
            // is 16 KiB.
            .expect("a chunk group is far under the AEAD's message limit")
    }

    /// Opens what [`ContentKey::seal_group`] sealed for the same file and group.
    pub fn open_group(&self, root: &ContentHash, group: u64, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        let cipher = XChaCha20Poly1305::new((&self.key).into());
        let aad = self.aad(root, group);
        cipher
            .decrypt((&Self::nonce(root, group)).into(), Payload { msg: sealed, aad: &aad })
            .map_err(|_| KeyError::Open)
    }

    /// The key wrapped for `device`, with the ephemeral secret `ephemeral` the caller drew.
    pub fn wrap_for(&self, device: &DeviceId, ephemeral: [u8; 32]) -> Result<WrappedKey, KeyError> {
        let recipient = device_public(device)?;
        let secret = x25519_dalek::StaticSecret::from(ephemeral);
        let ephemeral_public = x25519_dalek::PublicKey::from(&secret);
        let shared = secret.diffie_hellman(&recipient);
        let kek = kek(
            shared.as_bytes(),
            ephemeral_public.as_bytes(),
            recipient.as_bytes(),
            self.folder,
            self.epoch,
        );
        let sealed = ChaCha20Poly1305::new((&kek).into())
            .encrypt(&[0u8; 12].into(), Payload { msg: &self.key, aad: &device.0 })
            // Invariant: 32 bytes are far under the AEAD's message limit.
            .expect("a key is far under the AEAD's message limit");
        Ok(WrappedKey {
            folder: self.folder,
            epoch: self.epoch,
            device: *device,
            ephemeral: *ephemeral_public.as_bytes(),
            sealed,
        })
    }
}

/// A content key wrapped for one device: only that device's key opens it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    pub folder: FolderId,
    pub epoch: u32,
    pub device: DeviceId,
    /// The ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// The content key sealed with the key-encryption key (32 bytes and a 16-byte tag).
    pub sealed: Vec<u8>,
}

impl WrappedKey {
    /// Opens the wrapped key with the device's own key.
    pub fn unwrap_with(&self, key: &DeviceKey) -> Result<ContentKey, KeyError> {
        if DeviceId::of(key) != self.device {
            return Err(KeyError::Unwrap);
        }
        let secret = x25519_dalek::StaticSecret::from(key.to_scalar_bytes());
        let recipient = x25519_dalek::PublicKey::from(&secret);
        let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(self.ephemeral));
        let kek = kek(shared.as_bytes(), &self.ephemeral, recipient.as_bytes(), self.folder, self.epoch);
        let plain = ChaCha20Poly1305::new((&kek).into())
            .decrypt(&[0u8; 12].into(), Payload { msg: &self.sealed, aad: &self.device.0 })
            .map_err(|_| KeyError::Unwrap)?;
        let key: [u8; 32] = plain.try_into().map_err(|_| KeyError::Unwrap)?;
        Ok(ContentKey { folder: self.folder, epoch: self.epoch, key })
    }
}

/// The device's ed25519 public key as an X25519 one (its Montgomery form).
fn device_public(device: &DeviceId) -> Result<x25519_dalek::PublicKey, KeyError> {
    let verifying = device.verifying_key().map_err(|_| KeyError::BadDevice)?;
    Ok(x25519_dalek::PublicKey::from(verifying.to_montgomery().to_bytes()))
}

/// The key-encryption key: HKDF-SHA256 of the shared secret, salted with both public keys, bound
/// to the folder and epoch.
fn kek(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
    folder: FolderId,
    epoch: u32,
) -> [u8; 32] {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let mut info = Vec::with_capacity(WRAP_INFO.len() + 20);
    info.extend_from_slice(WRAP_INFO);
    info.extend_from_slice(&folder.0);
    info.extend_from_slice(&epoch.to_le_bytes());
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(&info, &mut out)
        // Invariant: 32 bytes are within HKDF-SHA256's output limit (255 * 32).
        .expect("32 bytes are within HKDF's output limit");
    out
}

/// A folder's content keys by epoch, as one device holds them (those wrapped for it).
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<u32, ContentKey>,
}

impl KeyRing {
    /// Adds a key this device unwrapped (or made).
    pub fn insert(&mut self, key: ContentKey) -> Result<(), KeyError> {
        if self.keys.len() >= EPOCHS_MAX && !self.keys.contains_key(&key.epoch) {
            return Err(KeyError::Full);
        }
        self.keys.insert(key.epoch, key);
        Ok(())
    }

    /// The key new content is sealed with: the newest epoch.
    pub fn current(&self) -> Option<&ContentKey> {
        self.keys.values().next_back()
    }

    pub fn epoch(&self, epoch: u32) -> Result<&ContentKey, KeyError> {
        self.keys.get(&epoch).ok_or(KeyError::NoEpoch { epoch })
    }

    /// A new epoch's key (after a member's removal), wrapped for each of `members` (the devices
    /// that may read the folder now), with the caller's randomness: `random` for the key, one
    /// ephemeral secret per member.
    pub fn rotate(
        &mut self,
        folder: FolderId,
        random: [u8; 32],
        members: &[(DeviceId, [u8; 32])],
    ) -> Result<(ContentKey, Vec<WrappedKey>), KeyError> {
        let epoch = self.current().map_or(0, |k| k.epoch.saturating_add(1));
        let key = ContentKey::new(folder, epoch, random);
        let wrapped =
            members.iter().map(|(device, eph)| key.wrap_for(device, *eph)).collect::<Result<Vec<_>, _>>()?;
        self.insert(key.clone())?;
        Ok((key, wrapped))
    }
}

/// The keys of `folder` that `me` holds in the directory: each epoch's key wrapped for it that
/// unwraps and matches the epoch's check (a wrap that does not is skipped: someone else's bug or
/// malice must not stop the rest).
pub fn ring_of(dir: &DirState, folder: &FolderId, me: &DeviceKey) -> KeyRing {
    let id = DeviceId::of(me);
    let mut ring = KeyRing::default();
    let Some(f) = dir.folders.get(folder) else { return ring };
    for (epoch, keys) in &f.keys {
        let Some(wrapped) = keys.wrapped.get(&id) else { continue };
        if let Ok(key) = wrapped.unwrap_with(me) {
            if key.epoch == *epoch && key.folder == *folder && key.check() == keys.check {
                let _ = ring.insert(key);
            }
        }
    }
    ring
}

/// What a device does about `folder`'s content keys now, if anything (the daemon asks every
/// round): the owner's device makes the first key, and a new one when a device that holds the
/// newest may no longer read the folder (a member or device was removed); any device holding the
/// newest key wraps it for readers that lack it. `random` draws 32 bytes (a key, an ephemeral
/// secret). At most [`KEYS_PER_CHANGE_MAX`] wraps per change; the next round does the rest.
pub fn key_op(
    dir: &DirState,
    folder: &FolderId,
    me: &DeviceKey,
    mut random: impl FnMut() -> [u8; 32],
) -> Result<Option<Op>, KeyError> {
    let id = DeviceId::of(me);
    let Some(f) = dir.folders.get(folder) else { return Ok(None) };
    let Some(user) = dir.active_user(&id) else { return Ok(None) };
    let readers = f.readers(dir);
    if !readers.contains(&id) {
        return Ok(None);
    }
    let newest = f.keys.iter().next_back();
    let stale = newest.is_none_or(|(_, k)| k.wrapped.keys().any(|d| !readers.contains(d)));
    let (key, missing): (ContentKey, Vec<DeviceId>) = if stale {
        if f.owner != user {
            return Ok(None);
        }
        let epoch = newest.map_or(0, |(e, _)| e.saturating_add(1));
        (ContentKey::new(*folder, epoch, random()), readers.iter().copied().collect())
    } else {
        // Every epoch, oldest first: a reader that joins after a rotation still reads what the
        // cloud keeps under the older keys (it could fetch those files from any peer anyway).
        let ring = ring_of(dir, folder, me);
        let lacking = f.keys.iter().find_map(|(epoch, keys)| {
            let key = ring.epoch(*epoch).ok()?;
            let missing: Vec<DeviceId> =
                readers.iter().filter(|d| !keys.wrapped.contains_key(d)).copied().collect();
            (!missing.is_empty()).then(|| (key.clone(), missing))
        });
        let Some(lacking) = lacking else { return Ok(None) };
        lacking
    };
    if missing.is_empty() {
        return Ok(None);
    }
    let keys = missing
        .iter()
        .take(KEYS_PER_CHANGE_MAX)
        .map(|d| key.wrap_for(d, random()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Op::FolderKeys { folder: *folder, epoch: key.epoch, check: key.check(), keys }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceKey {
        DeviceKey::from_bytes(&[n; 32])
    }

    fn folder() -> FolderId {
        FolderId([7; 16])
    }

    #[test]
    fn a_member_opens_what_another_sealed_and_the_cloud_sees_no_plaintext() {
        let canary = b"CANARY-7f3a-do-not-leak ".repeat(700);
        let root = ContentHash::of(&canary);
        let mut owner = KeyRing::default();
        let (key, wrapped) = owner
            .rotate(
                folder(),
                [1; 32],
                &[(DeviceId::of(&device(1)), [11; 32]), (DeviceId::of(&device(2)), [12; 32])],
            )
            .unwrap();
        // What the cloud stores and relays: sealed groups and wrapped keys.
        let sealed: Vec<Vec<u8>> =
            canary.chunks(16 * 1024).enumerate().map(|(g, c)| key.seal_group(&root, g as u64, c)).collect();
        let mut seen: Vec<u8> = sealed.concat();
        for w in &wrapped {
            seen.extend(postcard::to_allocvec(w).unwrap());
        }
        assert!(!seen.windows(6).any(|w| w == b"CANARY"), "the canary is nowhere in what the cloud holds");
        assert!(!seen.windows(32).any(|w| w == key.key), "nor the key");
        // Member 2 unwraps its copy and reads every group.
        let mine = wrapped
            .iter()
            .find(|w| w.device == DeviceId::of(&device(2)))
            .unwrap()
            .unwrap_with(&device(2))
            .unwrap();
        assert_eq!(mine, key);
        let opened: Vec<u8> = sealed
            .iter()
            .enumerate()
            .flat_map(|(g, s)| mine.open_group(&root, g as u64, s).unwrap())
            .collect();
        assert_eq!(opened, canary);
        assert_eq!(sealed[0].len(), 16 * 1024 + SEAL_OVERHEAD);
    }

    #[test]
    fn a_sealed_group_opens_only_in_its_place() {
        let key = ContentKey::new(folder(), 3, [2; 32]);
        let root = ContentHash::of(b"file");
        let sealed = key.seal_group(&root, 5, b"group five");
        assert_eq!(key.open_group(&root, 5, &sealed).unwrap(), b"group five");
        assert_eq!(key.open_group(&root, 4, &sealed), Err(KeyError::Open), "another group");
        assert_eq!(
            key.open_group(&ContentHash::of(b"other"), 5, &sealed),
            Err(KeyError::Open),
            "another file"
        );
        let other_folder = ContentKey::new(FolderId([8; 16]), 3, [2; 32]);
        assert_eq!(other_folder.open_group(&root, 5, &sealed), Err(KeyError::Open), "another folder");
        let other_epoch = ContentKey::new(folder(), 4, [2; 32]);
        assert_eq!(other_epoch.open_group(&root, 5, &sealed), Err(KeyError::Open), "another epoch");
        let mut altered = sealed.clone();
        altered[0] ^= 1;
        assert_eq!(key.open_group(&root, 5, &altered), Err(KeyError::Open), "altered");
    }

    #[test]
    fn a_wrapped_key_opens_only_for_its_device() {
        let key = ContentKey::new(folder(), 0, [3; 32]);
        let w = key.wrap_for(&DeviceId::of(&device(1)), [9; 32]).unwrap();
        assert_eq!(w.unwrap_with(&device(1)).unwrap(), key);
        assert_eq!(w.unwrap_with(&device(2)), Err(KeyError::Unwrap), "another device's key");
        // Relabelled for another device: the key agreement does not match.
        let relabelled = WrappedKey { device: DeviceId::of(&device(2)), ..w.clone() };
        assert_eq!(relabelled.unwrap_with(&device(2)), Err(KeyError::Unwrap));
        let mut altered = w.clone();
        altered.sealed[3] ^= 1;
        assert_eq!(altered.unwrap_with(&device(1)), Err(KeyError::Unwrap));
        let moved = WrappedKey { epoch: 1, ..w };
        assert_eq!(moved.unwrap_with(&device(1)), Err(KeyError::Unwrap), "bound to its epoch");
    }

    #[test]
    fn a_removed_member_cannot_read_content_written_after_the_removal() {
        let (alice, bob) = (device(1), device(2));
        let mut ring = KeyRing::default();
        let both = [(DeviceId::of(&alice), [21; 32]), (DeviceId::of(&bob), [22; 32])];
        let (first, wrapped) = ring.rotate(folder(), [4; 32], &both).unwrap();
        let mut bobs = KeyRing::default();
        bobs.insert(wrapped[1].unwrap_with(&bob).unwrap()).unwrap();
        let before = ContentHash::of(b"before");
        let old = first.seal_group(&before, 0, b"written before the removal");
        // Bob is removed: a new epoch, wrapped for Alice alone.
        let (second, wrapped) = ring.rotate(folder(), [5; 32], &both[..1]).unwrap();
        assert_eq!(second.epoch, 1);
        assert!(wrapped.iter().all(|w| w.device != DeviceId::of(&bob)));
        assert!(wrapped.iter().all(|w| w.unwrap_with(&bob).is_err()));
        let after = ContentHash::of(b"after");
        let new = ring.current().unwrap().seal_group(&after, 0, b"written after the removal");
        assert_eq!(bobs.epoch(1).unwrap_err(), KeyError::NoEpoch { epoch: 1 });
        assert_eq!(bobs.current().unwrap().open_group(&after, 0, &new), Err(KeyError::Open));
        // What Bob can still read: what was written while he was a member.
        assert_eq!(
            bobs.epoch(0).unwrap().open_group(&before, 0, &old).unwrap(),
            b"written before the removal"
        );
        // Alice reads both epochs.
        let mut alices = KeyRing::default();
        alices.insert(wrapped[0].unwrap_with(&alice).unwrap()).unwrap();
        alices.insert(first).unwrap();
        assert_eq!(
            alices.current().unwrap().open_group(&after, 0, &new).unwrap(),
            b"written after the removal"
        );
    }
}

#[cfg(test)]
mod directory_tests {
    use super::*;
    use crate::directory::{Directory, Role, UserId};

    fn key(n: u8) -> DeviceKey {
        DeviceKey::from_bytes(&[n; 32])
    }

    /// A counter as randomness: deterministic and never twice the same.
    fn draws() -> impl FnMut() -> [u8; 32] {
        let mut n = 0u8;
        move || {
            n = n.wrapping_add(1);
            [n; 32]
        }
    }

    fn apply(
        dir: &mut Directory,
        k: &DeviceKey,
        folder: &FolderId,
        random: &mut impl FnMut() -> [u8; 32],
    ) -> bool {
        match key_op(dir.state(), folder, k, &mut *random).unwrap() {
            Some(op) => {
                dir.make(k, 10, op).unwrap();
                true
            }
            None => false,
        }
    }

    #[test]
    fn keys_reach_every_reader_through_the_directory_and_a_removal_rotates_them() {
        let (a1, b1, b2) = (key(1), key(2), key(3));
        let mut dir = Directory::new();
        dir.make(&a1, 1, Op::CreateUser { name: "alice".into() }).unwrap();
        dir.make(&b1, 2, Op::CreateUser { name: "bob".into() }).unwrap();
        let folder = dir.make(&a1, 3, Op::CreateFolder { name: "f".into() }).unwrap().folder_id();
        let bob = UserId::of_first_device(DeviceId::of(&b1));
        let invite =
            dir.make(&a1, 4, Op::Invite { folder, invitee: bob, role: Role::Member }).unwrap().invite_id();
        dir.make(&b1, 5, Op::Accept { invitation: invite }).unwrap();
        let mut random = draws();
        // A member does not make the first key; the owner's device does, for every reader.
        assert!(!apply(&mut dir, &b1, &folder, &mut random));
        assert!(apply(&mut dir, &a1, &folder, &mut random));
        assert!(!apply(&mut dir, &a1, &folder, &mut random), "nothing left to do");
        let (ra, rb) = (ring_of(dir.state(), &folder, &a1), ring_of(dir.state(), &folder, &b1));
        let (ka, kb) = (ra.current().unwrap(), rb.current().unwrap());
        assert_eq!((ka.epoch, ka), (0, kb));
        // Bob's new device gets the key from Bob's other device (the owner is not needed).
        {
            use crate::directory::{pair_new_device, pairing_commitment, short_code};
            let (ne, nn) = ([7u8; 32], [9u8; 32]);
            let new_id = DeviceId::of(&b2);
            let code = short_code(&DeviceId::of(&b1), &new_id, &ne, &nn);
            let pairing = pair_new_device(&b2, bob, DeviceId::of(&b1), ne, nn, code).unwrap();
            dir.add_paired_device(&b1, bob, pairing_commitment(&new_id, &nn), pairing, code, 6).unwrap();
        }
        assert!(ring_of(dir.state(), &folder, &b2).current().is_none());
        assert!(apply(&mut dir, &b1, &folder, &mut random));
        assert_eq!(ring_of(dir.state(), &folder, &b2).current(), Some(kb));
        // Content sealed before the removal ...
        let old = b"written while bob was a member".to_vec();
        let old_root = ContentHash::of(&old);
        let sealed_old = ka.seal_group(&old_root, 0, &old);
        dir.make(&a1, 20, Op::RemoveMember { folder, user: bob }).unwrap();
        // Bob's devices cannot make a new epoch, and may not share keys any more.
        assert!(!apply(&mut dir, &b1, &folder, &mut random));
        assert!(apply(&mut dir, &a1, &folder, &mut random), "the owner rotates");
        let ring = ring_of(dir.state(), &folder, &a1);
        let new = ring.current().unwrap();
        assert_eq!(new.epoch, 1);
        let secret = b"written after bob left".to_vec();
        let root = ContentHash::of(&secret);
        let sealed = new.seal_group(&root, 0, &secret);
        for bob_device in [&b1, &b2] {
            let ring = ring_of(dir.state(), &folder, bob_device);
            assert!(matches!(ring.epoch(1), Err(KeyError::NoEpoch { epoch: 1 })));
            for k in ring.keys.values() {
                assert_eq!(k.open_group(&root, 0, &sealed), Err(KeyError::Open));
            }
            // What it could read as a member, it still can (the threat model says so).
            assert_eq!(ring.epoch(0).unwrap().open_group(&old_root, 0, &sealed_old).unwrap(), old);
        }
        // A key change that names another key for an existing epoch is refused.
        let Some(Op::FolderKeys { keys, .. }) = key_op(
            &{
                let mut s = dir.state().clone();
                s.folders.get_mut(&folder).unwrap().keys.remove(&1);
                s
            },
            &folder,
            &a1,
            &mut random,
        )
        .unwrap() else {
            panic!("the owner would rotate a ring without epoch 1")
        };
        let forged = Op::FolderKeys { folder, epoch: 1, check: [9; 32], keys };
        assert!(dir.make(&a1, 30, forged).is_err());
    }
}
