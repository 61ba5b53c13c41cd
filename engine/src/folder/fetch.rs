//! Which peer to fetch which part of which file from: the content scheduler, sans-IO, so the
//! simulator runs the same choices the node makes.
//!
//! Content is addressed by its BLAKE3 root and moves in chunk groups of [`GROUP_BYTES`] (16 KiB,
//! the unit bao verifies, requests name and a resumed transfer keeps). The driver tells the
//! scheduler which peers hold which content ([`Fetcher::handle_holder`]) and by which route it
//! reaches each peer ([`Fetcher::handle_route`]); the scheduler answers with requests for runs of
//! groups ([`Fetcher::poll_command`]). The driver verifies what arrives (bao: each group against
//! the root before it is written) and reports the verified groups ([`Fetcher::handle_groups`]) or
//! why a request failed ([`Fetcher::handle_failure`]); timers come back as
//! [`Fetcher::handle_timeout`]. Nothing unverified is ever reported, so a lying peer costs time,
//! never data.
//!
//! Choice ([`Policy::Nearest`], the default): the holders reached by the best route that has
//! something the device lacks (LAN, then direct, then relayed, then the cloud), up to
//! [`FetchConfig::sources_per_fetch_max`] of them at once, each taking a different run of missing
//! groups; when they are busy the fetch waits for them rather than taking a worse route. Within a
//! route, devices start at different peers, and at different points of the file
//! ([`FetchConfig::spread`]): a holder may hold part of the file (a peer fetching it too announces
//! its groups, [`Fetcher::handle_holder_runs`]) and is asked only for what it holds, so devices
//! that start apart have parts to trade. A source that stalls (no verified group within
//! [`FetchConfig::stall_us`], or slower than [`FetchConfig::rate_floor_bytes_per_s`] over a
//! request) is cancelled and backs off, doubling; its groups go to the next choice, which may be
//! a worse route. When every missing group is in flight, an idle usable source duplicates the
//! oldest request (endgame), so one slow peer cannot hold the last groups hostage.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use super::entry::{ContentHash, FILE_BYTES_MAX};
use crate::time::Micros;

/// A chunk group: the unit of verification, request and resumption, in bytes.
pub const GROUP_BYTES: u64 = 16 * 1024;
/// Most files fetched at once (a driver queues the rest).
pub const FETCHES_MAX: usize = 4096;
/// Most holders remembered per file.
pub const HOLDERS_PER_FETCH_MAX: usize = 256;
/// Most peers the scheduler tracks.
pub const SOURCES_MAX: usize = 4096;
/// Most disjoint runs of held groups one fetch tracks (a resumed file with more is refused).
pub const RUNS_PER_FETCH_MAX: usize = 4096;

/// How a peer is reached, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// The same local network (a private address, no NAT between).
    Lan,
    /// A direct path across the internet (hole-punched or public).
    Direct,
    /// Through the relay (it forwards ciphertext).
    Relayed,
    /// The cloud's own copy (a `cloud` folder's encrypted content).
    Cloud,
}

/// Which holders a fetch may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The best route with a usable holder only (LAN first, the cloud last).
    Nearest,
    /// Any holder, whatever its route (as Live Mesh did); the simulator's comparison.
    Any,
    /// The cloud only (as a cloud-storage client would); the simulator's comparison.
    CloudOnly,
}

#[derive(Clone, Debug)]
pub struct FetchConfig {
    pub policy: Policy,
    /// Most groups one request asks for (64 = 1 MiB).
    pub groups_per_request_max: u64,
    /// Most requests in flight to one source (pipelining).
    pub requests_per_source_max: u32,
    /// Most groups in flight to one source, over all its requests (a source with nothing in
    /// flight is always asked). Many small files want many requests in flight (each costs a
    /// round trip); a large file wants few, long ones: on a real QUIC connection each request is
    /// a stream, and many streams sharing the sender's window each wait for it.
    pub groups_per_source_max: u64,
    /// Most sources one file is fetched from at once.
    pub sources_per_fetch_max: u32,
    /// A request that verifies no group for this long is stalled.
    pub stall_us: Micros,
    /// A request is stalled when it runs slower than this over its length (past `stall_us`).
    pub rate_floor_bytes_per_s: u64,
    /// First back-off of a source that stalled or failed; doubles up to `backoff_max_us`.
    pub backoff_us: Micros,
    pub backoff_max_us: Micros,
    /// Where this device starts, so that devices fetching the same file do not all do the same:
    /// in the file's groups (a point of the file drawn from this; devices that start at
    /// different points hold different parts early and can trade them), and in the holders under
    /// [`Policy::Any`] (the peers' order, rotated by this). The simulator passes the device's
    /// index, the node a hash of its id; 0 starts at the file's first group and the first peer.
    pub spread: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Nearest,
            groups_per_request_max: 64,
            requests_per_source_max: 2,
            groups_per_source_max: u64::MAX,
            sources_per_fetch_max: 3,
            stall_us: 10_000_000,
            rate_floor_bytes_per_s: 16 * 1024,
            backoff_us: 2_000_000,
            backoff_max_us: 120_000_000,
            spread: 0,
        }
    }
}

/// A request's id, unique in one scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Ask `peer` for the groups `groups` of the content `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<P> {
    pub id: RequestId,
    pub peer: P,
    pub route: Route,
    pub hash: ContentHash,
    pub groups: Range<u64>,
}

impl<P> Request<P> {
    /// The byte range the request covers in a file of `size` bytes.
    pub fn bytes(&self, size: u64) -> Range<u64> {
        (self.groups.start * GROUP_BYTES).min(size)..(self.groups.end * GROUP_BYTES).min(size)
    }
}

/// What the driver carries out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<P> {
    Request(Request<P>),
    /// Stop the request (stalled, superseded by its endgame twin, or no longer wanted); whatever
    /// still arrives for it is dropped by the driver.
    Cancel(RequestId),
}

/// Why a request failed, as the driver saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer says it does not hold the content (or the range): it is no holder of it.
    NotHeld,
    /// Bytes that do not verify against the root: the peer is never asked for this content again.
    Corrupt,
    /// The peer refused (busy, quota, ticket); it backs off.
    Refused,
    /// The connection closed; the peer backs off.
    Closed,
}

/// What happened, for the driver and the status display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<P> {
    /// Every group of `hash` is verified and written.
    Done { hash: ContentHash },
    /// `peer` stalled on `hash` and backs off; its groups go elsewhere.
    Stalled { peer: P, hash: ContentHash },
    /// `peer` sent bytes for `hash` that do not verify.
    Corrupt { peer: P, hash: ContentHash },
}

/// Why a fetch has no request in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// No peer is known to hold the content.
    NoHolder,
    /// Holders are known but none is reachable now.
    Unreachable,
    /// Reachable holders are backing off (stalled or refused) until the given time.
    BackingOff { until: Micros },
    /// Holders are reachable only by routes the policy excludes.
    Policy,
    /// Every usable holder is busy with other files.
    Busy,
}

/// One file's progress, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress<P> {
    pub size: u64,
    pub have_bytes: u64,
    /// The peers being fetched from now, their route and measured rate (bytes per second).
    pub sources: Vec<(P, Route, u64)>,
    /// Why nothing is in flight, when nothing is.
    pub waiting: Option<Waiting>,
}

/// Errors of the scheduler's inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("already fetching {max} files", max = FETCHES_MAX)]
    Full,
    #[error("a file of {size} bytes is over the limit of {max} bytes", max = FILE_BYTES_MAX)]
    TooLarge { size: u64 },
    #[error("the groups held already are not ascending disjoint runs inside the file, or too many")]
    BadHave,
    #[error("already tracking {max} peers", max = SOURCES_MAX)]
    TooManySources,
}

/// `runs` as [`Runs`], when they are ascending, disjoint, inside `0..groups` and at most
/// [`RUNS_PER_FETCH_MAX`].
fn checked_runs(runs: &[Range<u64>], groups: u64) -> Result<Runs, FetchError> {
    if runs.len() > RUNS_PER_FETCH_MAX {
        return Err(FetchError::BadHave);
    }
    let mut out = Runs::default();
    let mut last_end = 0;
    for (i, run) in runs.iter().enumerate() {
        if run.start >= run.end || run.end > groups || (i > 0 && run.start < last_end) {
            return Err(FetchError::BadHave);
        }
        last_end = run.end;
        out.insert(run.clone());
    }
    Ok(out)
}

/// Sorted, disjoint, non-adjacent runs of group indices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Runs(Vec<Range<u64>>);

impl Runs {
    fn insert(&mut self, run: Range<u64>) {
        if run.is_empty() {
            return;
        }
        let at = self.0.partition_point(|r| r.end < run.start);
        let mut merged = run;
        let mut end = at;
        while end < self.0.len() && self.0[end].start <= merged.end {
            merged.start = merged.start.min(self.0[end].start);
            merged.end = merged.end.max(self.0[end].end);
            end += 1;
        }
        self.0.splice(at..end, [merged]);
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    /// The first group at or after `from` that is not in a run.
    fn first_gap(&self, from: u64) -> u64 {
        let at = self.0.partition_point(|r| r.end <= from);
        match self.0.get(at) {
            Some(r) if r.start <= from => r.end,
            _ => from,
        }
    }

    fn covers(&self, run: &Range<u64>) -> bool {
        run.is_empty() || self.first_gap(run.start) >= run.end
    }
}

#[derive(Debug)]
struct InFlight<P> {
    peer: P,
    hash: ContentHash,
    groups: Range<u64>,
    issued: Micros,
    progress: Micros,
    /// Groups this request has delivered.
    delivered: u64,
    /// The other request of an endgame pair.
    twin: Option<RequestId>,
}

#[derive(Clone, Debug, Default)]
struct Holder {
    /// It sent bytes that do not verify, or said it lacks the content: never asked again.
    bad: bool,
    /// The groups it holds, when it holds part of the file (it is fetching it too); `None`: all.
    runs: Option<Runs>,
}

#[derive(Debug)]
struct Fetch<P> {
    seq: u64,
    size: u64,
    groups: u64,
    have: Runs,
    holders: BTreeMap<P, Holder>,
}

#[derive(Debug)]
struct Source {
    route: Option<Route>,
    inflight: u32,
    /// Groups asked for by the requests in flight.
    inflight_groups: u64,
    rate_bytes_per_s: u64,
    strikes: u32,
    backoff_until: Micros,
    /// A back-off whose end is still to be handled (a timer is due for it).
    backing_off: bool,
}

/// The content scheduler of one device (see the module doc). `P` names a peer (a device id in
/// the node, an index in the simulator); the cloud is a peer whose route is [`Route::Cloud`].
#[derive(Debug)]
pub struct Fetcher<P> {
    config: FetchConfig,
    fetches: BTreeMap<ContentHash, Fetch<P>>,
    /// Fetches in the order they were wanted: the first wanted is served first.
    order: BTreeMap<u64, ContentHash>,
    sources: BTreeMap<P, Source>,
    requests: BTreeMap<RequestId, InFlight<P>>,
    next_seq: u64,
    next_request: u64,
    commands: VecDeque<Command<P>>,
    events: VecDeque<Event<P>>,
}

impl<P: Ord + Clone> Fetcher<P> {
    pub fn new(config: FetchConfig) -> Self {
        Self {
            config,
            fetches: BTreeMap::new(),
            order: BTreeMap::new(),
            sources: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_seq: 0,
            next_request: 0,
            commands: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// Fetch the content `hash` of `size` bytes, of which the groups `have` (ascending, disjoint
    /// runs, e.g. a partial file's verified groups after a restart) are held already, from
    /// `holders` (and those [`Fetcher::handle_holder`] adds later). Wanting a hash already wanted
    /// adds the holders. A file with nothing missing is done at once.
    pub fn want(
        &mut self,
        now: Micros,
        hash: ContentHash,
        size: u64,
        have: &[Range<u64>],
        holders: &[P],
    ) -> Result<(), FetchError> {
        if self.fetches.contains_key(&hash) {
            for peer in holders {
                self.add_holder(peer.clone(), hash);
            }
            self.schedule(now);
            return Ok(());
        }
        if size > FILE_BYTES_MAX {
            return Err(FetchError::TooLarge { size });
        }
        if self.fetches.len() >= FETCHES_MAX {
            return Err(FetchError::Full);
        }
        let groups = size.div_ceil(GROUP_BYTES);
        let runs = checked_runs(have, groups)?;
        if runs.count() == groups {
            self.events.push_back(Event::Done { hash });
            return Ok(());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, hash);
        self.fetches.insert(hash, Fetch { seq, size, groups, have: runs, holders: BTreeMap::new() });
        for peer in holders {
            self.add_holder(peer.clone(), hash);
        }
        self.schedule(now);
        Ok(())
    }

    /// Stop fetching `hash` (deleted, replaced, or fetched by other means); its requests are
    /// cancelled.
    pub fn unwant(&mut self, now: Micros, hash: &ContentHash) {
        if self.drop_fetch(hash) {
            self.schedule(now);
        }
    }

    /// `peer` holds the content `hash` (it wrote it, announced it, or is the cloud of a `cloud`
    /// folder). Ignored for content not wanted, past [`HOLDERS_PER_FETCH_MAX`], or from a peer
    /// that proved not to hold it.
    pub fn handle_holder(&mut self, now: Micros, peer: P, hash: ContentHash) {
        if self.add_holder(peer, hash) {
            self.schedule(now);
        }
    }

    fn add_holder(&mut self, peer: P, hash: ContentHash) -> bool {
        let Some(fetch) = self.fetches.get_mut(&hash) else { return false };
        if let Some(holder) = fetch.holders.get_mut(&peer) {
            let partial = holder.runs.is_some();
            holder.runs = None;
            return partial;
        }
        if fetch.holders.len() >= HOLDERS_PER_FETCH_MAX {
            return false;
        }
        fetch.holders.insert(peer, Holder::default());
        true
    }

    /// `peer` holds the groups `runs` (ascending, disjoint) of `hash`: it is fetching the file
    /// too, and serves what it has. Replaces what it announced before; a peer known to hold the
    /// whole file stays so. Ignored for content not wanted or past [`HOLDERS_PER_FETCH_MAX`].
    pub fn handle_holder_runs(
        &mut self,
        now: Micros,
        peer: P,
        hash: ContentHash,
        runs: &[Range<u64>],
    ) -> Result<(), FetchError> {
        let Some(fetch) = self.fetches.get_mut(&hash) else { return Ok(()) };
        let held = checked_runs(runs, fetch.groups)?;
        let full = fetch.holders.len() >= HOLDERS_PER_FETCH_MAX;
        match fetch.holders.get_mut(&peer) {
            Some(holder) if holder.runs.is_none() => return Ok(()),
            Some(holder) => holder.runs = Some(held),
            None if full => return Ok(()),
            None => {
                fetch.holders.insert(peer, Holder { bad: false, runs: Some(held) });
            }
        }
        self.schedule(now);
        Ok(())
    }

    /// `peer` is reachable by `route` now, or not at all (`None`: it left, its connection
    /// closed). Requests in flight to a peer that left fail as [`Failure::Closed`].
    pub fn handle_route(&mut self, now: Micros, peer: P, route: Option<Route>) -> Result<(), FetchError> {
        if !self.sources.contains_key(&peer) {
            if route.is_none() {
                return Ok(());
            }
            if self.sources.len() >= SOURCES_MAX {
                // Forget a peer that is gone and owes nothing; else refuse.
                let gone = self
                    .sources
                    .iter()
                    .find(|(_, s)| s.route.is_none() && s.inflight == 0)
                    .map(|(p, _)| p.clone());
                match gone {
                    Some(gone) => self.sources.remove(&gone),
                    None => return Err(FetchError::TooManySources),
                };
            }
            self.sources.insert(
                peer.clone(),
                Source {
                    route: None,
                    inflight: 0,
                    inflight_groups: 0,
                    rate_bytes_per_s: 0,
                    strikes: 0,
                    backoff_until: 0,
                    backing_off: false,
                },
            );
        }
        let Some(source) = self.sources.get_mut(&peer) else { return Ok(()) };
        source.route = route;
        if route.is_none() {
            let ids: Vec<RequestId> =
                self.requests.iter().filter(|(_, r)| r.peer == peer).map(|(id, _)| *id).collect();
            for id in ids {
                self.end_request(id, false);
            }
            if let Some(source) = self.sources.get(&peer) {
                if source.strikes == 0 && source.rate_bytes_per_s == 0 {
                    // Nothing learnt about it worth keeping: forget it (bounded table).
                    self.sources.remove(&peer);
                }
            }
        }
        self.schedule(now);
        Ok(())
    }

    /// The request `id` delivered the verified groups `groups` (written to the partial file).
    /// Groups outside the request, or of a request that ended, are ignored.
    pub fn handle_groups(&mut self, now: Micros, id: RequestId, groups: Range<u64>) {
        let Some(request) = self.requests.get_mut(&id) else { return };
        let start = groups.start.max(request.groups.start);
        let end = groups.end.min(request.groups.end);
        if start >= end {
            return;
        }
        let hash = request.hash;
        let peer = request.peer.clone();
        let elapsed_us = now.saturating_sub(request.progress).max(1);
        request.progress = now;
        request.delivered += end - start;
        let Some(fetch) = self.fetches.get_mut(&hash) else { return };
        let bytes = (end * GROUP_BYTES).min(fetch.size) - start * GROUP_BYTES;
        fetch.have.insert(start..end);
        if let Some(source) = self.sources.get_mut(&peer) {
            let rate =
                (u128::from(bytes) * 1_000_000 / u128::from(elapsed_us)).min(u128::from(u64::MAX)) as u64;
            source.rate_bytes_per_s =
                if source.rate_bytes_per_s == 0 { rate } else { (source.rate_bytes_per_s * 3 + rate) / 4 };
            source.strikes = 0;
        }
        self.settle(&hash);
        self.schedule(now);
    }

    /// The request `id` failed for `why`; its undelivered groups go elsewhere.
    pub fn handle_failure(&mut self, now: Micros, id: RequestId, why: Failure) {
        let Some(request) = self.requests.get(&id) else { return };
        let (peer, hash) = (request.peer.clone(), request.hash);
        self.end_request(id, false);
        match why {
            Failure::NotHeld | Failure::Corrupt => {
                if let Some(holder) = self.fetches.get_mut(&hash).and_then(|f| f.holders.get_mut(&peer)) {
                    match (&mut holder.runs, why) {
                        // A partial holder that lacks what it announced: it holds nothing
                        // until it announces again.
                        (Some(runs), Failure::NotHeld) => *runs = Runs::default(),
                        _ => holder.bad = true,
                    }
                }
                if why == Failure::Corrupt {
                    self.strike(now, &peer);
                    self.events.push_back(Event::Corrupt { peer, hash });
                }
            }
            Failure::Refused | Failure::Closed => self.strike(now, &peer),
        }
        self.schedule(now);
    }

    /// Timers: requests that stalled are cancelled, sources whose back-off ended are used again.
    pub fn handle_timeout(&mut self, now: Micros) {
        let stalled: Vec<RequestId> =
            self.requests.iter().filter(|(_, r)| now >= self.deadline(r)).map(|(id, _)| *id).collect();
        for id in stalled {
            let Some(request) = self.requests.get(&id) else { continue };
            let (peer, hash) = (request.peer.clone(), request.hash);
            self.end_request(id, true);
            self.strike(now, &peer);
            self.events.push_back(Event::Stalled { peer, hash });
        }
        for source in self.sources.values_mut() {
            if source.backing_off && now >= source.backoff_until {
                source.backing_off = false;
            }
        }
        self.schedule(now);
    }

    /// The next deadline: a request's stall, or the end of a back-off that keeps a wanted file
    /// waiting.
    pub fn poll_timeout(&self) -> Option<Micros> {
        let stalls = self.requests.values().map(|r| self.deadline(r));
        let backoffs = self.sources.values().filter(|s| s.backing_off).map(|s| s.backoff_until);
        stalls.chain(backoffs.filter(|_| !self.fetches.is_empty())).min()
    }

    pub fn poll_command(&mut self) -> Option<Command<P>> {
        self.commands.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event<P>> {
        self.events.pop_front()
    }

    /// The groups of `hash` held so far (verified), as ascending runs: what a driver persists to
    /// resume and announces to peers fetching the same file. `None` when it is not being fetched.
    pub fn have(&self, hash: &ContentHash) -> Option<Vec<Range<u64>>> {
        self.fetches.get(hash).map(|f| f.have.0.clone())
    }

    /// The files being fetched, first wanted first.
    pub fn wanted(&self) -> impl Iterator<Item = &ContentHash> {
        self.order.values()
    }

    /// `hash`'s progress, `None` when it is not being fetched.
    pub fn progress(&self, now: Micros, hash: &ContentHash) -> Option<Progress<P>> {
        let fetch = self.fetches.get(hash)?;
        let have_bytes =
            fetch.have.0.iter().map(|r| (r.end * GROUP_BYTES).min(fetch.size) - r.start * GROUP_BYTES).sum();
        let mut sources: Vec<(P, Route, u64)> = Vec::new();
        for request in self.requests.values().filter(|r| r.hash == *hash) {
            if sources.iter().all(|(p, _, _)| *p != request.peer) {
                let source = self.sources.get(&request.peer);
                let route = source.and_then(|s| s.route).unwrap_or(Route::Relayed);
                sources.push((request.peer.clone(), route, source.map_or(0, |s| s.rate_bytes_per_s)));
            }
        }
        let waiting = if sources.is_empty() { Some(self.waiting(now, fetch)) } else { None };
        Some(Progress { size: fetch.size, have_bytes, sources, waiting })
    }

    /// Checks the scheduler's invariants (tests and the simulator call it after every event).
    pub fn check_invariants(&self) {
        assert_eq!(self.order.len(), self.fetches.len());
        let mut inflight: BTreeMap<&P, (u32, u64)> = BTreeMap::new();
        for (id, request) in &self.requests {
            let counts = inflight.entry(&request.peer).or_default();
            counts.0 += 1;
            counts.1 += request.groups.end - request.groups.start;
            let fetch = self.fetches.get(&request.hash).expect("a request belongs to a wanted file");
            assert!(request.groups.start < request.groups.end && request.groups.end <= fetch.groups);
            assert!(!fetch.have.covers(&request.groups), "a request for groups all held lives on");
            if let Some(twin) = request.twin {
                let other = self.requests.get(&twin).expect("a twin lives as long as its pair");
                assert_eq!(other.twin, Some(*id));
            } else {
                // Requests that are not twins ask for disjoint groups.
                for (other_id, other) in &self.requests {
                    if other_id != id && other.hash == request.hash && other.twin.is_none() {
                        assert!(
                            other.groups.end <= request.groups.start
                                || request.groups.end <= other.groups.start
                        );
                    }
                }
            }
        }
        for (peer, source) in &self.sources {
            assert_eq!(
                (source.inflight, source.inflight_groups),
                inflight.get(peer).copied().unwrap_or((0, 0))
            );
            assert!(source.inflight <= self.config.requests_per_source_max);
            // Past the groups' cap only by the last request issued (one that found room under it).
            assert!(
                source.inflight <= 1
                    || source.inflight_groups
                        < self
                            .config
                            .groups_per_source_max
                            .saturating_add(self.config.groups_per_request_max)
            );
        }
        for fetch in self.fetches.values() {
            assert!(fetch.have.count() < fetch.groups, "a finished fetch is done, not wanted");
            assert!(fetch.holders.len() <= HOLDERS_PER_FETCH_MAX);
        }
    }

    fn deadline(&self, request: &InFlight<P>) -> Micros {
        let progress = request.progress.saturating_add(self.config.stall_us);
        let bytes = (request.groups.end - request.groups.start) * GROUP_BYTES;
        let floor = self.config.rate_floor_bytes_per_s.max(1);
        let whole = request
            .issued
            .saturating_add(self.config.stall_us)
            .saturating_add(bytes.saturating_mul(1_000_000) / floor);
        progress.min(whole)
    }

    fn strike(&mut self, now: Micros, peer: &P) {
        if let Some(source) = self.sources.get_mut(peer) {
            let backoff = self.config.backoff_us.saturating_mul(1 << source.strikes.min(20));
            source.backoff_until = now.saturating_add(backoff.min(self.config.backoff_max_us));
            source.strikes = source.strikes.saturating_add(1);
            source.backing_off = true;
        }
    }

    /// Removes a request (cancelling it at the peer when `cancel`), and its twin's link.
    fn end_request(&mut self, id: RequestId, cancel: bool) {
        let Some(request) = self.requests.remove(&id) else { return };
        if let Some(source) = self.sources.get_mut(&request.peer) {
            source.inflight = source.inflight.saturating_sub(1);
            source.inflight_groups =
                source.inflight_groups.saturating_sub(request.groups.end - request.groups.start);
        }
        if let Some(twin) = request.twin.and_then(|t| self.requests.get_mut(&t)) {
            twin.twin = None;
        }
        if cancel {
            self.commands.push_back(Command::Cancel(id));
        }
    }

    /// Forgets the fetch of `hash` and cancels its requests; whether there was one.
    fn drop_fetch(&mut self, hash: &ContentHash) -> bool {
        let Some(fetch) = self.fetches.remove(hash) else { return false };
        self.order.remove(&fetch.seq);
        let ids: Vec<RequestId> =
            self.requests.iter().filter(|(_, r)| r.hash == *hash).map(|(id, _)| *id).collect();
        for id in ids {
            self.end_request(id, true);
        }
        true
    }

    /// Ends the requests of `hash` whose groups are all held (cancelling those that did not
    /// deliver them all themselves: endgame twins), and the fetch when the file is complete.
    fn settle(&mut self, hash: &ContentHash) {
        let Some(fetch) = self.fetches.get(hash) else { return };
        let done: Vec<(RequestId, bool)> = self
            .requests
            .iter()
            .filter(|(_, r)| r.hash == *hash && fetch.have.covers(&r.groups))
            .map(|(id, r)| (*id, r.delivered < r.groups.end - r.groups.start))
            .collect();
        let complete = fetch.have.count() == fetch.groups;
        for (id, cancel) in done {
            self.end_request(id, cancel);
        }
        if complete {
            self.drop_fetch(hash);
            self.events.push_back(Event::Done { hash: *hash });
        }
    }

    fn usable(&self, now: Micros, peer: &P, holder: &Holder) -> Option<Route> {
        if holder.bad {
            return None;
        }
        let source = self.sources.get(peer)?;
        let route = source.route?;
        if source.strikes > 0 && now < source.backoff_until {
            return None;
        }
        match self.config.policy {
            Policy::CloudOnly if route != Route::Cloud => None,
            _ => Some(route),
        }
    }

    /// The holders of `fetch` the policy lets it use now, best first.
    fn choices(&self, now: Micros, fetch: &Fetch<P>) -> Vec<(Route, P)> {
        let mut choices: Vec<(Route, u64, P)> = fetch
            .holders
            .iter()
            .filter_map(|(peer, holder)| {
                let route = self.usable(now, peer, holder)?;
                let rate = self.sources.get(peer).map_or(0, |s| s.rate_bytes_per_s);
                Some((route, rate, peer.clone()))
            })
            .collect();
        match self.config.policy {
            // Best route first (the caller keeps to the best route that has something to give);
            // within a route, the peers' order from this device's own point, so that devices
            // spread over the holders instead of all asking the same (measured rates would make
            // them agree).
            Policy::Nearest => {
                choices.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
                let mut at = 0;
                while at < choices.len() {
                    let route = choices[at].0;
                    let len = choices[at..].iter().take_while(|c| c.0 == route).count();
                    choices[at..at + len].rotate_left((self.config.spread % len as u64) as usize);
                    at += len;
                }
            }
            // Any holder, in the peers' order from a point of the device's own: no preference.
            Policy::Any | Policy::CloudOnly => {
                choices.sort_by(|a, b| a.2.cmp(&b.2));
                if !choices.is_empty() {
                    let by = (self.config.spread % choices.len() as u64) as usize;
                    choices.rotate_left(by);
                }
            }
        }
        choices.into_iter().map(|(route, _, peer)| (route, peer)).collect()
    }

    fn waiting(&self, now: Micros, fetch: &Fetch<P>) -> Waiting {
        if fetch.holders.values().all(|h| h.bad) {
            return Waiting::NoHolder;
        }
        let live: Vec<&Source> = fetch
            .holders
            .iter()
            .filter(|(_, h)| !h.bad)
            .filter_map(|(p, _)| self.sources.get(p).filter(|s| s.route.is_some()))
            .collect();
        if live.is_empty() {
            return Waiting::Unreachable;
        }
        let allowed: Vec<&Source> = live
            .into_iter()
            .filter(|s| self.config.policy != Policy::CloudOnly || s.route == Some(Route::Cloud))
            .collect();
        if allowed.is_empty() {
            return Waiting::Policy;
        }
        let backing =
            allowed.iter().filter(|s| s.strikes > 0 && now < s.backoff_until).map(|s| s.backoff_until);
        match backing.clone().count() == allowed.len() {
            true => Waiting::BackingOff { until: backing.min().unwrap_or(now) },
            false => Waiting::Busy,
        }
    }

    /// Issues requests while some wanted file has a missing run and a usable source with room;
    /// then, with what room is left, endgame twins.
    fn schedule(&mut self, now: Micros) {
        for endgame in [false, true] {
            // Walked by key, not copied: this runs after every event, and with thousands of
            // files wanted a copy of the order per event cost more than the scheduling.
            let mut after: Option<u64> = None;
            // Bound: FETCHES_MAX files, each looked at once per pass.
            loop {
                let next = match after {
                    None => self.order.iter().next(),
                    Some(seq) => self.order.range(seq.saturating_add(1)..).next(),
                };
                let Some((&seq, &hash)) = next else { break };
                after = Some(seq);
                if !self.sources.values().any(|s| s.route.is_some() && self.has_room(s)) {
                    return;
                }
                self.schedule_fetch(now, hash, endgame);
            }
        }
    }

    /// Whether another request may go to this source: under the requests' cap, and under the
    /// groups' cap unless nothing is in flight to it.
    fn has_room(&self, s: &Source) -> bool {
        s.inflight < self.config.requests_per_source_max
            && (s.inflight == 0 || s.inflight_groups < self.config.groups_per_source_max)
    }

    fn schedule_fetch(&mut self, now: Micros, hash: ContentHash, endgame: bool) {
        let Some(fetch) = self.fetches.get(&hash) else { return };
        let choices = self.choices(now, fetch);
        // Bound: each pass issues a request or stops, and every request takes room of a source.
        loop {
            let Some(fetch) = self.fetches.get(&hash) else { return };
            let mut serving: Vec<&P> =
                self.requests.values().filter(|r| r.hash == hash).map(|r| &r.peer).collect();
            serving.sort();
            serving.dedup();
            let room = |peer: &P| {
                self.sources.get(peer).is_some_and(|s| self.has_room(s))
                    && (serving.contains(&peer)
                        || (serving.len() as u64) < u64::from(self.config.sources_per_fetch_max))
            };
            let nearest = self.config.policy == Policy::Nearest;
            if !endgame {
                // What each choice could be asked for; with the nearest policy only the best
                // route that has something to give is used (its holders may be busy: then the
                // fetch waits for them rather than taking a worse route).
                let offers: Vec<(Route, &P, Range<u64>)> = choices
                    .iter()
                    .filter_map(|(route, p)| {
                        let held = fetch.holders.get(p).and_then(|h| h.runs.as_ref());
                        self.free_run(&hash, fetch, held).map(|groups| (*route, p, groups))
                    })
                    .collect();
                let best = offers.first().map(|o| o.0);
                let next =
                    offers.into_iter().find(|(route, p, _)| room(p) && (!nearest || Some(*route) == best));
                let Some((route, peer, groups)) = next.map(|(r, p, g)| (r, p.clone(), g)) else { return };
                self.issue(now, peer, route, hash, groups, None);
                continue;
            }
            // Endgame twins come from holders of the whole file (of the best such route).
            let whole: Vec<&(Route, P)> = choices
                .iter()
                .filter(|(_, p)| fetch.holders.get(p).is_some_and(|h| h.runs.is_none()))
                .collect();
            let best = whole.first().map(|c| c.0);
            let next = whole.into_iter().find(|(route, p)| room(p) && (!nearest || Some(*route) == best));
            let Some((route, peer)) = next.cloned() else { return };
            // Endgame: everything missing is in flight. Duplicate, on another peer, the request
            // that has gone longest without progress, if it is slow: no verified group for a
            // fifth of the stall time, or a measured rate under half of this peer's (a peer not
            // measured yet is not slow for that).
            let rate_of = |p: &P| self.sources.get(p).map_or(0, |s| s.rate_bytes_per_s);
            let rate = rate_of(&peer);
            let slow = |r: &InFlight<P>| {
                let measured = rate_of(&r.peer);
                now.saturating_sub(r.progress) >= self.config.stall_us / 5
                    || (measured > 0 && measured.saturating_mul(2) < rate)
            };
            let oldest = self
                .requests
                .iter()
                .filter(|(_, r)| r.hash == hash && r.twin.is_none() && r.peer != peer && slow(r))
                .min_by_key(|(id, r)| (r.progress, **id))
                .map(|(id, r)| (*id, r.groups.clone()));
            let Some((of, groups)) = oldest else { return };
            let remaining = fetch.have.first_gap(groups.start)..groups.end;
            self.issue(now, peer, route, hash, remaining, Some(of));
        }
    }

    /// The first run of groups of `hash` neither held nor in flight, and held by the source
    /// when it holds only `within`; at most `groups_per_request_max` long.
    fn free_run(&self, hash: &ContentHash, fetch: &Fetch<P>, within: Option<&Runs>) -> Option<Range<u64>> {
        let mut busy = fetch.have.clone();
        for request in self.requests.values().filter(|r| r.hash == *hash) {
            busy.insert(request.groups.clone());
        }
        #[allow(clippy::single_range_in_vec_init)] // one run: the whole file
        let whole = [0..fetch.groups];
        let within: &[Range<u64>] = within.map_or(&whole, |runs| &runs.0);
        // From this device's point of the file to the end, then from the start to that point.
        let from = if self.config.spread == 0 || fetch.groups == 0 {
            0
        } else {
            self.config.spread.wrapping_mul(0x9E37_79B9_7F4A_7C15) % fetch.groups
        };
        let after = within.iter().filter(|w| w.end > from).map(|w| w.start.max(from)..w.end);
        let before = within.iter().filter(|w| w.start < from).map(|w| w.start..w.end.min(from));
        // Bound: twice RUNS_PER_FETCH_MAX runs of the source.
        for run in after.chain(before) {
            let start = busy.first_gap(run.start);
            if start >= run.end.min(fetch.groups) {
                continue;
            }
            let next_busy = busy.0.iter().find(|r| r.start > start).map_or(fetch.groups, |r| r.start);
            let end = next_busy
                .min(run.end)
                .min(fetch.groups)
                .min(start + self.config.groups_per_request_max.max(1));
            return Some(start..end);
        }
        None
    }

    fn issue(
        &mut self,
        now: Micros,
        peer: P,
        route: Route,
        hash: ContentHash,
        groups: Range<u64>,
        twin: Option<RequestId>,
    ) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        if let Some(source) = self.sources.get_mut(&peer) {
            source.inflight += 1;
            source.inflight_groups += groups.end - groups.start;
        }
        if let Some(of) = twin.and_then(|t| self.requests.get_mut(&t)) {
            of.twin = Some(id);
        }
        self.requests.insert(
            id,
            InFlight {
                peer: peer.clone(),
                hash,
                groups: groups.clone(),
                issued: now,
                progress: now,
                delivered: 0,
                twin,
            },
        );
        self.commands.push_back(Command::Request(Request { id, peer, route, hash, groups }));
    }
}

#[cfg(test)]
mod tests;
