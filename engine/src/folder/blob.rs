//! A file's content, verified as it streams: bao, BLAKE3's own tree, with chunk groups of
//! [`GROUP_BYTES`] (bao-tree's block size of 16 chunks of 1 KiB) as the unit a request names and
//! a receiver verifies and writes. The root of the tree is the file's plain BLAKE3 hash (what
//! [`ContentHash::of`] computes), so an entry's `blake3` attribute is all a receiver needs: a
//! response for some groups carries the parent hashes that prove them, and each group is checked
//! against the root before a byte of it is handed out.
//!
//! A holder keeps an outboard beside each file it serves ([`Outboard`]: the tree's parent hashes,
//! about 1/256 of the file at this group size). Sans-IO: [`encode`] writes a response into a
//! buffer, [`Decoder`] reads one from any `Read` (a stream, a buffer) and yields verified groups.

use std::io::Read;
use std::ops::Range;

use bao_tree::io::outboard::PreOrderMemOutboard;
use bao_tree::io::sync::{encode_ranges, encode_ranges_validated, DecodeResponseIter};
use bao_tree::io::{BaoContentItem, DecodeError};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};

use super::entry::{ContentHash, FILE_BYTES_MAX};
use super::fetch::GROUP_BYTES;

/// 16 chunks of 1 KiB: one chunk group of [`GROUP_BYTES`].
pub const BLOCK: BlockSize = BlockSize::from_chunk_log(4);
/// Chunks (1 KiB) per group.
const GROUP_CHUNKS: u64 = GROUP_BYTES / 1024;

/// Why content or a response was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("bytes for group {group} do not verify against the root")]
    Corrupt { group: u64 },
    #[error("the response ends before group {group}")]
    Truncated { group: u64 },
    #[error("groups {start}..{end} are not inside a file of {groups} groups")]
    Range { start: u64, end: u64, groups: u64 },
    #[error("a file of {size} bytes is over the limit of {max} bytes", max = FILE_BYTES_MAX)]
    TooLarge { size: u64 },
    #[error("the outboard is {bytes} bytes long; a file of {size} bytes has one of {expected}")]
    OutboardSize { bytes: usize, size: u64, expected: u64 },
    #[error("the content does not match its outboard")]
    Mismatch,
    #[error("reading the response: {0}")]
    Io(String),
}

/// The parent hashes of a file's tree (pre-order), and its root and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outboard {
    pub root: ContentHash,
    pub size: u64,
    hashes: Vec<u8>,
}

impl Outboard {
    /// Hashes `data` (what a holder does once per file it serves).
    pub fn of(data: &[u8]) -> Self {
        let outboard = PreOrderMemOutboard::create(data, BLOCK);
        Self { root: ContentHash(*outboard.root.as_bytes()), size: data.len() as u64, hashes: outboard.data }
    }

    /// Hashes `size` bytes read from `data` (a file, without holding it in memory).
    pub fn of_reader(data: impl Read, size: u64) -> Result<Self, BlobError> {
        if size > FILE_BYTES_MAX {
            return Err(BlobError::TooLarge { size });
        }
        let tree = BaoTree::new(size, BLOCK);
        let mut outboard = PreOrderMemOutboard {
            root: blake3::Hash::from_bytes([0; 32]),
            tree,
            data: vec![0u8; tree.outboard_size() as usize],
        };
        let root = bao_tree::io::sync::outboard(data.take(size), tree, &mut outboard)
            .map_err(|e| BlobError::Io(e.to_string()))?;
        Ok(Self { root: ContentHash(*root.as_bytes()), size, hashes: outboard.data })
    }

    /// The outboard as stored (its root and size are stored beside it).
    pub fn as_bytes(&self) -> &[u8] {
        &self.hashes
    }

    /// An outboard read back from storage: its length must be the tree's.
    pub fn from_bytes(root: ContentHash, size: u64, hashes: Vec<u8>) -> Result<Self, BlobError> {
        if size > FILE_BYTES_MAX {
            return Err(BlobError::TooLarge { size });
        }
        let expected = BaoTree::new(size, BLOCK).outboard_size();
        if hashes.len() as u64 != expected {
            return Err(BlobError::OutboardSize { bytes: hashes.len(), size, expected });
        }
        Ok(Self { root, size, hashes })
    }

    fn mem(&self) -> PreOrderMemOutboard<&[u8]> {
        PreOrderMemOutboard {
            root: blake3::Hash::from_bytes(self.root.0),
            tree: BaoTree::new(self.size, BLOCK),
            data: &self.hashes,
        }
    }
}

/// Groups of a file of `size` bytes.
pub fn groups_of(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES)
}

/// Why a peer's request for groups is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AskError {
    /// Empty, backwards, or past the end of the file (or the file is larger than any served).
    OutOfFile,
    /// More groups than one request may ask for.
    TooMany,
}

/// The groups `start..end` a peer asked for of a file of `size` bytes, checked before any
/// arithmetic is done on them: a non-empty run inside the file (of at most [`FILE_BYTES_MAX`]),
/// at most `max` groups long. Both the node and the cloud answer requests through this.
pub fn asked_groups(start: u64, end: u64, size: u64, max: u64) -> Result<Range<u64>, AskError> {
    if size > FILE_BYTES_MAX || start >= end || end > groups_of(size) {
        return Err(AskError::OutOfFile);
    }
    if end - start > max {
        return Err(AskError::TooMany);
    }
    Ok(start..end)
}

fn chunk_ranges(groups: &Range<u64>, size: u64) -> Result<ChunkRanges, BlobError> {
    let total = groups_of(size);
    if groups.start >= groups.end || groups.end > total {
        return Err(BlobError::Range { start: groups.start, end: groups.end, groups: total });
    }
    Ok(ChunkRanges::from(ChunkNum(groups.start * GROUP_CHUNKS)..ChunkNum(groups.end * GROUP_CHUNKS)))
}

/// The response for `groups` of `data` (whose outboard is `outboard`): the parents that prove
/// them, then each group's bytes, in the order a [`Decoder`] reads them. The data is checked
/// against the outboard as it is encoded, so a holder whose file changed under it sends nothing
/// wrong ([`BlobError::Mismatch`]).
pub fn encode(data: &[u8], outboard: &Outboard, groups: Range<u64>) -> Result<Vec<u8>, BlobError> {
    if data.len() as u64 != outboard.size {
        return Err(BlobError::Mismatch);
    }
    let ranges = chunk_ranges(&groups, outboard.size)?;
    let mut out = Vec::with_capacity(((groups.end - groups.start) * (GROUP_BYTES + 128)) as usize);
    encode_ranges_validated(data, outboard.mem(), &ranges, &mut out).map_err(|_| BlobError::Mismatch)?;
    Ok(out)
}

/// The groups a request names, as the tree's chunk ranges (a decoder borrows them).
#[derive(Clone, Debug)]
pub struct Groups {
    groups: Range<u64>,
    size: u64,
    ranges: ChunkRanges,
}

impl Groups {
    /// `groups` of a file of `size` bytes.
    pub fn new(groups: Range<u64>, size: u64) -> Result<Self, BlobError> {
        if size > FILE_BYTES_MAX {
            return Err(BlobError::TooLarge { size });
        }
        let ranges = chunk_ranges(&groups, size)?;
        Ok(Self { groups, size, ranges })
    }
}

/// The response for one group, from that group's bytes alone (`bytes` is the whole group, the
/// last one shorter): what a holder serving a large file reads from disk per group.
pub fn encode_group(bytes: &[u8], group: u64, outboard: &Outboard) -> Result<Vec<u8>, BlobError> {
    encode_one(bytes, group, outboard, true)
}

/// [`encode_group`] without hashing the group's bytes against the outboard: for a holder that
/// knows by other means that its file is unchanged since the outboard was made (its size and
/// modification time, as its scanner trusts them). Wrong bytes still fail at the receiver, which
/// verifies every group; a group of the wrong length is refused here.
pub fn encode_group_unchecked(bytes: &[u8], group: u64, outboard: &Outboard) -> Result<Vec<u8>, BlobError> {
    encode_one(bytes, group, outboard, false)
}

fn encode_one(bytes: &[u8], group: u64, outboard: &Outboard, check: bool) -> Result<Vec<u8>, BlobError> {
    let ranges = chunk_ranges(&(group..group + 1), outboard.size)?;
    let start = group * GROUP_BYTES;
    let expected = (outboard.size - start).min(GROUP_BYTES);
    if bytes.len() as u64 != expected {
        return Err(BlobError::Mismatch);
    }
    let window = Window { offset: start, bytes };
    let mut out = Vec::with_capacity(bytes.len() + 64 * 48);
    let encoded = if check {
        encode_ranges_validated(window, outboard.mem(), &ranges, &mut out)
    } else {
        encode_ranges(window, outboard.mem(), &ranges, &mut out)
    };
    encoded.map_err(|_| BlobError::Mismatch)?;
    Ok(out)
}

/// A slice of a file at its offset, read where the encoder reads it.
struct Window<'a> {
    offset: u64,
    bytes: &'a [u8],
}

impl positioned_io::ReadAt for Window<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(at) = pos.checked_sub(self.offset) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "before the window"));
        };
        positioned_io::ReadAt::read_at(&self.bytes, at, buf)
    }
}

/// The end of the window (the encoder asks for a size but reads only inside the window).
impl positioned_io::Size for Window<'_> {
    fn size(&self) -> std::io::Result<Option<u64>> {
        Ok(Some(self.offset + self.bytes.len() as u64))
    }
}

/// Reads a response for some groups of the content `root` and yields each group, verified, in
/// order: `(group, bytes)`. The first error ends it; what it yielded before stays good (a
/// receiver keeps it and asks someone else for the rest).
#[derive(Debug)]
pub struct Decoder<'a, R: Read> {
    inner: DecodeResponseIter<'a, R>,
    next: u64,
    end: u64,
}

impl<'a, R: Read> Decoder<'a, R> {
    pub fn new(root: ContentHash, groups: &'a Groups, response: R) -> Self {
        let tree = BaoTree::new(groups.size, BLOCK);
        let inner = DecodeResponseIter::new(blake3::Hash::from_bytes(root.0), tree, response, &groups.ranges);
        Self { inner, next: groups.groups.start, end: groups.groups.end }
    }
}

impl<R: Read> Iterator for Decoder<'_, R> {
    type Item = Result<(u64, bytes::Bytes), BlobError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Bound: the tree yields at most one leaf per requested group, and parents between.
        loop {
            if self.next >= self.end {
                return None;
            }
            match self.inner.next()? {
                Ok(BaoContentItem::Parent(_)) => continue,
                Ok(BaoContentItem::Leaf(leaf)) => {
                    let group = leaf.offset / GROUP_BYTES;
                    self.next = group + 1;
                    return Some(Ok((group, leaf.data)));
                }
                Err(e) => {
                    let group = self.next;
                    self.end = group;
                    return Some(Err(match e {
                        DecodeError::ParentHashMismatch(_) | DecodeError::LeafHashMismatch(_) => {
                            BlobError::Corrupt { group }
                        }
                        DecodeError::ParentNotFound(_) | DecodeError::LeafNotFound(_) => {
                            BlobError::Truncated { group }
                        }
                        DecodeError::Io(e) => BlobError::Io(e.to_string()),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    fn decode_all(
        root: ContentHash,
        groups: &Groups,
        response: &[u8],
    ) -> (Vec<(u64, Vec<u8>)>, Option<BlobError>) {
        let mut good = Vec::new();
        for item in Decoder::new(root, groups, response) {
            match item {
                Ok((g, bytes)) => good.push((g, bytes.to_vec())),
                Err(e) => return (good, Some(e)),
            }
        }
        (good, None)
    }

    fn slice(d: &[u8], g: u64) -> &[u8] {
        let start = (g * GROUP_BYTES) as usize;
        &d[start..(start + GROUP_BYTES as usize).min(d.len())]
    }

    #[test]
    fn the_root_is_the_plain_blake3_hash() {
        for len in [0, 1, 1024, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 300_000] {
            let d = data(len, 1);
            let outboard = Outboard::of(&d);
            assert_eq!(outboard.root, ContentHash::of(&d), "{len}");
            assert_eq!(outboard.size, len as u64);
            let stored =
                Outboard::from_bytes(outboard.root, outboard.size, outboard.as_bytes().to_vec()).unwrap();
            assert_eq!(stored, outboard);
        }
        // A megabyte's outboard: 64 groups, 63 parent pairs of 64 bytes.
        assert_eq!(Outboard::of(&data(1 << 20, 2)).as_bytes().len(), 63 * 64);
        assert!(matches!(
            Outboard::from_bytes(ContentHash::of(b""), 1 << 20, vec![0; 10]),
            Err(BlobError::OutboardSize { .. })
        ));
    }

    #[test]
    fn a_response_gives_back_exactly_the_groups_asked_for() {
        let d = data(10 * GROUP_BYTES as usize + 77, 3);
        let outboard = Outboard::of(&d);
        for groups in [0..1, 0..11, 3..7, 10..11] {
            let response = encode(&d, &outboard, groups.clone()).unwrap();
            let wanted = Groups::new(groups.clone(), outboard.size).unwrap();
            let (good, error) = decode_all(outboard.root, &wanted, &response);
            assert_eq!(error, None);
            let expected: Vec<(u64, Vec<u8>)> = groups.clone().map(|g| (g, slice(&d, g).to_vec())).collect();
            assert_eq!(good, expected, "{groups:?}");
        }
        assert_eq!(
            Groups::new(11..12, outboard.size).unwrap_err(),
            BlobError::Range { start: 11, end: 12, groups: 11 }
        );
        assert_eq!(encode(&d[1..], &outboard, 0..1), Err(BlobError::Mismatch), "a holder whose file changed");
    }

    #[test]
    fn a_request_for_groups_is_checked_before_any_arithmetic() {
        let size = 10 * GROUP_BYTES + 1; // 11 groups
        assert_eq!(asked_groups(0, 11, size, 256), Ok(0..11));
        assert_eq!(asked_groups(10, 11, size, 1), Ok(10..11));
        assert_eq!(asked_groups(0, 12, size, 256), Err(AskError::OutOfFile));
        assert_eq!(asked_groups(5, 5, size, 256), Err(AskError::OutOfFile));
        assert_eq!(asked_groups(6, 5, size, 256), Err(AskError::OutOfFile), "backwards");
        assert_eq!(asked_groups(u64::MAX - 1, u64::MAX, size, 256), Err(AskError::OutOfFile));
        assert_eq!(asked_groups(0, 11, size, 10), Err(AskError::TooMany));
        assert_eq!(asked_groups(0, 1, FILE_BYTES_MAX + 1, 256), Err(AskError::OutOfFile));
        assert_eq!(asked_groups(0, 1, 0, 256), Err(AskError::OutOfFile), "an empty file has no groups");
    }

    #[test]
    fn one_group_is_encoded_from_its_own_bytes_and_a_stream_outboard_is_the_same() {
        let d = data(5 * GROUP_BYTES as usize + 999, 6);
        let outboard = Outboard::of(&d);
        assert_eq!(Outboard::of_reader(d.as_slice(), d.len() as u64).unwrap(), outboard);
        for g in 0..groups_of(d.len() as u64) {
            let response = encode_group(slice(&d, g), g, &outboard).unwrap();
            assert_eq!(response, encode(&d, &outboard, g..g + 1).unwrap());
            let wanted = Groups::new(g..g + 1, outboard.size).unwrap();
            assert_eq!(
                decode_all(outboard.root, &wanted, &response),
                (vec![(g, slice(&d, g).to_vec())], None)
            );
        }
        let mut changed = slice(&d, 2).to_vec();
        changed[0] ^= 1;
        assert_eq!(
            encode_group(&changed, 2, &outboard),
            Err(BlobError::Mismatch),
            "a file changed under its holder"
        );
        assert_eq!(encode_group(&changed[1..], 2, &outboard), Err(BlobError::Mismatch));
        // Unchecked: the same response for the right bytes; for changed bytes the receiver
        // refuses the group instead.
        for g in 0..groups_of(d.len() as u64) {
            assert_eq!(
                encode_group_unchecked(slice(&d, g), g, &outboard).unwrap(),
                encode_group(slice(&d, g), g, &outboard).unwrap()
            );
        }
        let response = encode_group_unchecked(&changed, 2, &outboard).unwrap();
        let wanted = Groups::new(2..3, outboard.size).unwrap();
        assert_eq!(
            decode_all(outboard.root, &wanted, &response),
            (vec![], Some(BlobError::Corrupt { group: 2 }))
        );
        assert_eq!(encode_group_unchecked(&changed[1..], 2, &outboard), Err(BlobError::Mismatch));
    }

    #[test]
    fn wrong_bytes_for_a_hash_are_refused_and_what_verified_before_is_kept() {
        let d = data(8 * GROUP_BYTES as usize, 4);
        let outboard = Outboard::of(&d);
        let groups = Groups::new(0..8, outboard.size).unwrap();
        let response = encode(&d, &outboard, 0..8).unwrap();
        // Another file's response under this root: nothing verifies.
        let other = data(8 * GROUP_BYTES as usize, 5);
        let forged = encode(&other, &Outboard::of(&other), 0..8).unwrap();
        let (good, error) = decode_all(outboard.root, &groups, &forged);
        assert!(good.is_empty());
        assert!(matches!(error, Some(BlobError::Corrupt { group: 0 })), "{error:?}");
        // A truncated response: the whole groups before the cut verify.
        let cut = response.len() / 2;
        let (good, error) = decode_all(outboard.root, &groups, &response[..cut]);
        assert!(!good.is_empty() && good.len() < 8);
        assert!(good.iter().all(|(g, bytes)| bytes == slice(&d, *g)));
        assert_eq!(error, Some(BlobError::Truncated { group: good.len() as u64 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Flip any byte of a response: the decoder never yields a wrong byte, and stops with
        /// the group it could not verify.
        #[test]
        fn no_wrong_byte_ever_comes_out(
            len in 1usize..(6 * GROUP_BYTES as usize),
            start in 0u64..6,
            count in 1u64..6,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let d = data(len, 9);
            let outboard = Outboard::of(&d);
            let total = groups_of(len as u64);
            let start = start.min(total - 1);
            let range = start..(start + count).min(total);
            let mut response = encode(&d, &outboard, range.clone()).unwrap();
            let i = at.index(response.len());
            response[i] ^= flip;
            let groups = Groups::new(range.clone(), outboard.size).unwrap();
            let (good, error) = decode_all(outboard.root, &groups, &response);
            for (g, bytes) in &good {
                prop_assert_eq!(bytes.as_slice(), slice(&d, *g));
            }
            prop_assert!(matches!(error, Some(BlobError::Corrupt { .. })), "{:?}", error);
            prop_assert!(good.len() < (range.end - range.start) as usize);
        }
    }
}
