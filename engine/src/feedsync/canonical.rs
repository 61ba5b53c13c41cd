//! The canonical encoding of a version: the last tie-break of the winner rule and the input to
//! version digests and signatures. Byte-exact and stable; changing it is a wire-format change.
//!
//! ```text
//! version   = "FSV1" id updates flags count entry* attrs inner
//! id        = str                       ; sx:sync/@id
//! updates   = u32                       ; big-endian
//! flags     = u8                        ; bit 0 deleted, bit 1 noconflicts
//! count     = u32                       ; number of history entries, topmost first
//! entry     = sequence when by
//! sequence  = u32
//! when      = 0x00 | 0x01 i64 u32 str   ; unix seconds, nanoseconds, text as written
//! by        = 0x00 | 0x01 str
//! attrs     = str                       ; raw attributes of <item>/<entry>
//! inner     = str                       ; raw children other than sx:sync
//! str       = u32 length, UTF-8 bytes
//! ```
//! All integers are big-endian, so comparing encodings compares fields in order.

use super::model::Version;

fn put_str(out: &mut Vec<u8>, text: &str) {
    // Lengths are bounded by the parser's limits, far below u32::MAX.
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Appends the canonical encoding of `version` to `out`.
pub fn encode_version_into(version: &Version, out: &mut Vec<u8>) {
    out.extend_from_slice(b"FSV1");
    put_str(out, version.id.as_str());
    out.extend_from_slice(&version.updates.to_be_bytes());
    out.push(u8::from(version.deleted) | (u8::from(version.noconflicts) << 1));
    out.extend_from_slice(&(version.history.len() as u32).to_be_bytes());
    for entry in version.history.iter() {
        out.extend_from_slice(&entry.sequence.to_be_bytes());
        match &entry.when {
            None => out.push(0),
            Some(when) => {
                out.push(1);
                out.extend_from_slice(&when.unix_secs().to_be_bytes());
                out.extend_from_slice(&when.nanos().to_be_bytes());
                // `put_str` of the text, written in place.
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                when.write_rfc3339(out);
                let len = (out.len() - at - 4) as u32;
                out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
        match &entry.by {
            None => out.push(0),
            Some(by) => {
                out.push(1);
                put_str(out, by.as_str());
            }
        }
    }
    put_str(out, &version.content.attrs);
    put_str(out, &version.content.inner);
}

/// The canonical encoding of `version`.
pub fn encode_version(version: &Version) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + version.content.inner.len());
    encode_version_into(version, &mut out);
    out
}
