//! Targets for what `transport` reads off a QUIC stream: the control protocol's values and the
//! length-prefixed frame reader (with reads cancelled mid-frame, as a driver's timer does).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use engine::control::{self, Bounded};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, ReadBuf};
use transport::{frame, FrameError, Notice, Open, Request, Response, CONTROL_MAX, FRAME_MAX};

/// Decodes `bytes` as a `T` as `frame::read_value` does (`engine::control::decode`: version,
/// size, bounds), and checks that what decodes re-encodes stably and within its bounds.
fn round_trip<T: Serialize + DeserializeOwned + Bounded>(bytes: &[u8]) -> Option<T> {
    let value: T = control::decode(bytes, CONTROL_MAX).ok()?;
    let encoded = control::encode(&value);
    let again: T = control::decode(&encoded, usize::MAX).expect("what we encode we decode");
    assert_eq!(control::encode(&again), encoded, "encoding is stable");
    Some(value)
}

/// The control protocol: the first byte picks the type (`Open`, `Request`, `Response`,
/// `Notice`; 4 and 5: Live Folders' `ContentReply` and `UploadReply`), the rest is its encoding
/// (version byte, postcard), as the node and the relay read it from a frame.
pub fn control(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind {
        4 => {
            let _ = round_trip::<control::ContentReply>(rest);
            return;
        }
        5 => {
            if let Some(reply) = round_trip::<control::UploadReply>(rest) {
                if let control::UploadState::Need(runs) = &reply.state {
                    assert!(runs.len() <= control::UPLOAD_RUNS_MAX && runs.iter().all(|(a, b)| a < b));
                }
            }
            return;
        }
        _ => {}
    }
    match kind % 4 {
        0 => {
            if let Some(Open::Control(request)) = round_trip::<Open>(rest) {
                check_request(&request);
            }
        }
        1 => {
            if let Some(request) = round_trip::<Request>(rest) {
                check_request(&request);
            }
        }
        2 => {
            let _ = round_trip::<Response>(rest);
        }
        _ => {
            if let Some(notice) = round_trip::<Notice>(rest) {
                assert_eq!(
                    control::decode::<Notice>(&control::encode(&notice), CONTROL_MAX).ok(),
                    Some(notice)
                );
            }
        }
    }
}

/// What a receiver checks of a request before it acts (the cloud does more, see the relay
/// targets): directory changes verify or are refused without a panic.
fn check_request(request: &Request) {
    if let Request::Directory { changes, .. } = request {
        for change in changes.iter().take(64) {
            let _ = change.verify();
        }
    }
}

/// A stream that hands out its bytes in chunks of the sizes the input chose, so the reader sees
/// every split of a header and a body a network could make. A size of 0 is a pause: the stream
/// is pending once (never twice in a row; a 0 right after a pause is one byte), and the read
/// that saw it is cancelled.
#[derive(Debug)]
struct Chunked<'a> {
    bytes: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
    paused: bool,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = match self.sizes.get(self.turn % self.sizes.len().max(1)) {
            Some(0) if !self.paused => {
                self.paused = true;
                self.turn += 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Some(&s) => usize::from(s).max(1),
            None => usize::MAX,
        };
        self.paused = false;
        self.turn += 1;
        let n = size.min(buf.remaining()).min(self.bytes.len());
        let (now, later) = self.bytes.split_at(n);
        buf.put_slice(now);
        self.bytes = later;
        Poll::Ready(Ok(()))
    }
}

/// Reads one frame as a driver whose timer keeps winning would: a read the stream leaves
/// pending is dropped (cancelled, as `select!` drops the losing branch) and a new one started,
/// so a frame must come out whole however often its reads are cancelled.
fn read_cancelled(
    reader: &mut frame::Reader<Chunked<'_>>,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let mut read = std::pin::pin!(reader.read(max));
        if let Poll::Ready(out) = read.as_mut().poll(&mut cx) {
            return out.map(|frame| frame.map(|bytes| bytes.to_vec()));
        }
    }
}

/// What reading frames from `stream` must give: frames until a clean end between frames, or
/// the first error.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Frame(Vec<u8>),
    End,
    TooLarge(usize),
    Truncated,
}

fn model(stream: &[u8], max: usize) -> Vec<Expected> {
    let mut out = Vec::new();
    let mut rest = stream;
    loop {
        if rest.is_empty() {
            out.push(Expected::End);
            return out;
        }
        let Some((header, body)) = rest.split_first_chunk::<4>() else {
            out.push(Expected::Truncated);
            return out;
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > max {
            out.push(Expected::TooLarge(len));
            return out;
        }
        if body.len() < len {
            out.push(Expected::Truncated);
            return out;
        }
        out.push(Expected::Frame(body[..len].to_vec()));
        rest = &body[len..];
    }
}

/// The frame reader: byte 0 picks the limit (64 bytes, 4 KiB, `FRAME_MAX`, `CONTROL_MAX`), byte
/// 1 how many chunk sizes follow, then the sizes (a 0 is a pause that cancels the read), then
/// the stream. Frames are read through one `frame::Reader` until the end or an error, and must be
/// exactly what a model of the format gives; the first frame is then decoded as an `Open`, and
/// the rest as engine messages, as the relay and the node do.
pub fn frame(data: &[u8]) {
    let [limit, count, rest @ ..] = data else { return };
    let max = match limit % 4 {
        0 => 64,
        1 => 4096,
        2 => FRAME_MAX,
        _ => CONTROL_MAX,
    };
    let (sizes, stream) = rest.split_at(usize::from(*count).min(rest.len()));
    let expected = model(stream, max);
    let mut reader = frame::Reader::new(Chunked { bytes: stream, sizes, turn: 0, paused: false });
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let next = match read_cancelled(&mut reader, max) {
            Ok(Some(bytes)) => Expected::Frame(bytes),
            Ok(None) => Expected::End,
            Err(FrameError::TooLarge(len, m)) => {
                assert_eq!(m, max);
                Expected::TooLarge(len)
            }
            Err(FrameError::Truncated) => Expected::Truncated,
            Err(e) => panic!("a stream without I/O errors gave {e}"),
        };
        let last = !matches!(next, Expected::Frame(_));
        got.push(next);
        if last {
            break;
        }
    }
    assert_eq!(got, expected, "the frame reader differs from the format");
    let mut frames = got.iter().filter_map(|e| match e {
        Expected::Frame(bytes) => Some(bytes),
        _ => None,
    });
    if let Some(first) = frames.next() {
        let _ = postcard::from_bytes::<Open>(first);
    }
    for bytes in frames.take(8) {
        let _ = engine::wire::decode(bytes, FRAME_MAX);
    }
}
