//! The stream transport's connection state (`transport = "stream"`): what QUIC gives the binaries'
//! sessions, modelled per packet. One connection per ordered pair of nodes carries messages in
//! order; each message is cut into packets of at most `mtu` bytes; the sender keeps at most
//! `cwnd` packets in flight, grows the window by one per acknowledged packet in slow start and by
//! one per window after, halves it when a packet's timer fires, and sends that packet again with
//! its timer doubled. The receiver delivers a message once every packet up to its last has
//! arrived. Acknowledgements travel back after the packet's own one-way delay and are not lost
//! (they are small and frequent; an approximation). A connection with packets outstanding and
//! none acknowledged for the idle timeout breaks: what it still held is lost, as when QUIC closes
//! a connection, and the sessions above find out by their own timers.
//!
//! The simulator owns the events (`Packet`, `Ack`, `PacketTimer`); this module is the state they
//! change. Every event names its connection's id: events of a connection that broke (or whose
//! node crashed) find a different id, or none, and are dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use engine::sessions::Stream;

/// Virtual microseconds.
pub type Micros = u64;

/// Smallest retransmission timer.
pub const RTO_MIN_US: Micros = 200_000;
/// Largest retransmission timer (after backoff).
pub const RTO_MAX_US: Micros = 10_000_000;
/// The congestion window a connection starts with, in packets.
pub const CWND_INITIAL: f64 = 10.0;

#[derive(Debug)]
pub struct Message {
    /// The packet number of its last packet.
    pub last: u32,
    pub stream: Stream,
    pub bytes: Arc<Vec<u8>>,
}

#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    pub sent_at: Micros,
    pub len: usize,
    /// Transmissions so far (a timer names the one it was set for).
    pub attempt: u32,
}

/// One direction of one connection.
#[derive(Debug)]
pub struct Conn {
    pub id: u32,
    /// Packets not yet sent (beyond the window): number and length.
    pub queue: VecDeque<(u32, usize)>,
    pub inflight: BTreeMap<u32, InFlight>,
    pub next_packet: u32,
    pub cwnd: f64,
    pub ssthresh: f64,
    pub srtt: Option<Micros>,
    /// Last time a packet was acknowledged (or the connection opened).
    pub progress_at: Micros,
    /// Receiver side: every packet below `contiguous` arrived; those above it that did.
    pub contiguous: u32,
    pub above: std::collections::BTreeSet<u32>,
    /// Messages not yet delivered, in order.
    pub messages: VecDeque<Message>,
}

impl Conn {
    pub fn new(id: u32, now: Micros) -> Self {
        Self {
            id,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_packet: 0,
            cwnd: CWND_INITIAL,
            ssthresh: f64::INFINITY,
            srtt: None,
            progress_at: now,
            contiguous: 0,
            above: std::collections::BTreeSet::new(),
            messages: VecDeque::new(),
        }
    }

    /// Queues a message as packets of at most `mtu` bytes.
    pub fn push(&mut self, now: Micros, stream: Stream, bytes: Arc<Vec<u8>>, mtu: usize) {
        if self.inflight.is_empty() && self.queue.is_empty() {
            // Idle until now: the idle timer counts from this message.
            self.progress_at = now;
        }
        let len = bytes.len().max(1);
        let mut left = len;
        while left > 0 {
            let n = left.min(mtu);
            self.queue.push_back((self.next_packet, n));
            self.next_packet += 1;
            left -= n;
        }
        self.messages.push_back(Message { last: self.next_packet - 1, stream, bytes });
    }

    /// The packet's retransmission timer for transmission `attempt` (1 for the first).
    pub fn rto(&self, attempt: u32) -> Micros {
        let base = self.srtt.map_or(1_000_000, |s| (2 * s).max(RTO_MIN_US));
        (base << (attempt.saturating_sub(1)).min(6)).min(RTO_MAX_US)
    }

    /// The next packet the window lets out, if any.
    pub fn next_to_send(&mut self) -> Option<(u32, usize)> {
        if (self.inflight.len() as f64) < self.cwnd.floor().max(1.0) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    /// The receiver got packet `p`: returns the messages now complete, in order.
    pub fn receive(&mut self, p: u32) -> Vec<Message> {
        if p >= self.contiguous {
            self.above.insert(p);
            while self.above.remove(&self.contiguous) {
                self.contiguous += 1;
            }
        }
        let mut done = Vec::new();
        while self.messages.front().is_some_and(|m| m.last < self.contiguous) {
            if let Some(m) = self.messages.pop_front() {
                done.push(m);
            }
        }
        done
    }

    /// Packet `p` was acknowledged at `now`; returns whether it was in flight.
    pub fn acked(&mut self, p: u32, now: Micros) -> bool {
        let Some(f) = self.inflight.remove(&p) else { return false };
        // Karn: only a packet sent once gives an RTT sample.
        if f.attempt == 1 {
            let sample = now.saturating_sub(f.sent_at);
            self.srtt = Some(self.srtt.map_or(sample, |s| (7 * s + sample) / 8));
        }
        self.progress_at = now;
        if self.cwnd < self.ssthresh {
            self.cwnd += 1.0;
        } else {
            self.cwnd += 1.0 / self.cwnd;
        }
        true
    }

    /// Packet `p`'s timer for transmission `attempt` fired: whether it is still that one in flight
    /// (then the window halves and the caller sends it again).
    pub fn lost(&mut self, p: u32, attempt: u32) -> Option<InFlight> {
        let f = *self.inflight.get(&p)?;
        if f.attempt != attempt {
            return None;
        }
        self.ssthresh = (self.cwnd / 2.0).max(2.0);
        self.cwnd = self.ssthresh;
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_delivered_whole_and_in_order_whatever_order_packets_arrive_in() {
        let mut c = Conn::new(1, 0);
        c.push(0, Stream::Sync, Arc::new(vec![1; 2500]), 1200); // packets 0, 1, 2
        c.push(0, Stream::Sync, Arc::new(vec![2; 10]), 1200); // packet 3
        assert_eq!(c.next_packet, 4);
        assert!(c.receive(3).is_empty(), "the second message waits for the first");
        assert!(c.receive(1).is_empty());
        assert!(c.receive(0).is_empty());
        let done = c.receive(2);
        assert_eq!(done.iter().map(|m| m.bytes[0]).collect::<Vec<_>>(), [1, 2]);
        assert!(c.receive(2).is_empty(), "a duplicate delivers nothing");
    }

    #[test]
    fn the_window_grows_on_acks_and_halves_on_a_loss() {
        let mut c = Conn::new(1, 0);
        c.push(0, Stream::Sync, Arc::new(vec![0; 1200 * 30]), 1200);
        let mut sent = Vec::new();
        while let Some((p, len)) = c.next_to_send() {
            c.inflight.insert(p, InFlight { sent_at: 0, len, attempt: 1 });
            sent.push(p);
        }
        assert_eq!(sent.len(), CWND_INITIAL as usize, "the initial window");
        assert!(c.acked(0, 100_000));
        assert_eq!(c.cwnd, CWND_INITIAL + 1.0);
        assert_eq!(c.srtt, Some(100_000));
        assert!(c.lost(1, 1).is_some());
        assert_eq!(c.cwnd, (CWND_INITIAL + 1.0) / 2.0);
        assert!(c.lost(1, 2).is_none(), "a timer of another transmission");
        assert_eq!(c.rto(1), 200_000);
        assert_eq!(c.rto(3), 800_000);
    }
}
