//! The device on the network: its iroh endpoint, the connection to the cloud, direct or relayed
//! connections to peers, sync rounds, and the daemon loop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use engine::authz::{AuthSession, Credentials, Policy};
use engine::directory::FolderId;
use engine::signing::DeviceId;
use engine::sync::{Micros, Outcome, Session};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, RelayUrl, TransportAddr};
use tokio::sync::Notify;
use transport::{frame, now_us, Notice, Open, Request, Response, FRAME_MAX};

use crate::state::Node;

pub type Shared = Arc<Mutex<Node>>;

/// Locks the node (a panic elsewhere does not stop the device).
pub fn lock(node: &Shared) -> MutexGuard<'_, Node> {
    node.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one sync round did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Round {
    pub directory_changes: usize,
    pub sessions_ok: usize,
    pub sessions_failed: usize,
    pub items_received: u64,
    pub items_sent: u64,
    pub errors: Vec<String>,
}

/// A device's network side.
#[derive(Debug)]
pub struct Net {
    pub node: Shared,
    pub endpoint: Endpoint,
    cloud: tokio::sync::Mutex<Option<Connection>>,
    peers: tokio::sync::Mutex<BTreeMap<DeviceId, Connection>>,
    /// Woken by local writes and cloud notices.
    pub wake: Notify,
    /// Sync with peers directly (not only with the cloud).
    pub peer_sync: std::sync::atomic::AtomicBool,
    /// No UDP: every path is the relay.
    relay_only: bool,
}

fn session_id() -> u64 {
    let mut b = [0u8; 8];
    rand::fill(&mut b);
    u64::from_le_bytes(b)
}

impl Net {
    /// Binds this device's endpoint (its key, the deployment's relay, no public services).
    pub async fn bind(node: Shared, bind: Option<std::net::SocketAddr>) -> anyhow::Result<Arc<Self>> {
        Self::bind_with(node, bind, false).await
    }

    /// [`Net::bind`]; with `relay_only`, no UDP: everything goes through the relay.
    pub async fn bind_with(
        node: Shared,
        bind: Option<std::net::SocketAddr>,
        relay_only: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let (key, cfg) = {
            let n = lock(&node);
            (n.key.clone(), n.cfg.clone())
        };
        let relay: RelayUrl =
            cfg.relay_url.parse().with_context(|| format!("relay URL {:?}", cfg.relay_url))?;
        let endpoint = transport::endpoint(
            &key,
            &transport::EndpointOptions {
                relay: Some(relay),
                relay_qad_port: cfg.relay_qad_port,
                bind,
                relay_ca_pem: cfg.relay_ca_pem.clone(),
                relay_only,
            },
        )
        .await?;
        Ok(Arc::new(Self {
            node,
            endpoint,
            cloud: tokio::sync::Mutex::new(None),
            peers: tokio::sync::Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            peer_sync: std::sync::atomic::AtomicBool::new(true),
            relay_only,
        }))
    }

    fn cloud_addr(&self) -> anyhow::Result<EndpointAddr> {
        let n = lock(&self.node);
        let id =
            transport::endpoint_id(&n.cfg.cloud).ok_or_else(|| anyhow!("stored cloud id is not a key"))?;
        let relay: RelayUrl = n.cfg.relay_url.parse()?;
        let mut addrs = vec![TransportAddr::Relay(relay)];
        addrs.extend(n.cfg.cloud_addrs.iter().map(|a| TransportAddr::Ip(*a)));
        Ok(EndpointAddr::from_parts(id, addrs))
    }

    /// The connection to the cloud (made if needed).
    pub async fn cloud(self: &Arc<Self>) -> anyhow::Result<Connection> {
        let mut slot = self.cloud.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let addr = self.cloud_addr()?;
        let conn =
            tokio::time::timeout(Duration::from_secs(20), self.endpoint.connect(addr, transport::ALPN))
                .await
                .map_err(|_| anyhow!("the cloud did not answer within 20 s"))?
                .context("connecting to the cloud")?;
        // Notices arrive on unidirectional streams of this connection.
        let me = self.clone();
        let notices = conn.clone();
        tokio::spawn(async move {
            while let Ok(mut recv) = notices.accept_uni().await {
                if let Ok(Some(notice)) = frame::read_value::<Notice>(&mut recv, 1024, "notice").await {
                    tracing::debug!(?notice, "notice from the cloud");
                    me.wake.notify_one();
                }
            }
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One control request to the cloud.
    pub async fn request(self: &Arc<Self>, request: Request) -> anyhow::Result<Response> {
        let conn = self.cloud().await?;
        transport::request(&conn, request).await
    }

    /// Pushes my directory changes and pulls the cloud's until both have everything.
    pub async fn sync_directory(self: &Arc<Self>) -> anyhow::Result<usize> {
        let mut total = 0;
        for _ in 0..64 {
            let (heads, changes) = {
                let n = lock(&self.node);
                // Push everything: the cloud ignores what it has (cheap next to a round trip
                // for its heads, and a directory is small).
                (n.dir.heads().into_iter().collect(), n.dir.changes().cloned().collect::<Vec<_>>())
            };
            let changes: Vec<_> =
                changes.into_iter().take(engine::directory::CHANGES_PER_BATCH_MAX).collect();
            let Response::Directory { changes: got } =
                self.request(Request::Directory { heads, changes }).await?
            else {
                bail!("unexpected answer to a directory request");
            };
            if got.is_empty() {
                return Ok(total);
            }
            let full = got.len() == engine::directory::CHANGES_PER_BATCH_MAX;
            total += lock(&self.node).apply_directory(&got)?;
            if !full {
                return Ok(total);
            }
        }
        Ok(total)
    }

    /// A fresh ticket from the cloud.
    pub async fn refresh_ticket(self: &Arc<Self>) -> anyhow::Result<()> {
        let Response::Ticket { ticket, cloud } = self.request(Request::Ticket).await? else {
            bail!("unexpected answer to a ticket request");
        };
        let mut n = lock(&self.node);
        if cloud != n.cfg.cloud {
            bail!("the cloud answered with another identity");
        }
        n.ticket = Some(ticket);
        Ok(())
    }

    fn policy(&self) -> anyhow::Result<Policy> {
        let n = lock(&self.node);
        let ticket = n.ticket.clone().ok_or_else(|| anyhow!("no ticket yet"))?;
        Ok(Policy::Directory(Box::new(Credentials { device: n.id, ticket, cloud: n.cfg.cloud })))
    }

    /// Runs one sync session for `folder` with the device at the other end of `conn`.
    pub async fn sync_folder(&self, conn: &Connection, folder: FolderId) -> anyhow::Result<Outcome> {
        let peer = transport::device_of(conn.remote_id());
        let policy = self.policy()?;
        let (mut send, recv) = conn.open_bi().await?;
        let mut recv = frame::Reader::new(recv);
        frame::write_value(&mut send, &Open::Sync).await?;
        let mut at_start = std::collections::BTreeMap::new();
        let mut session = {
            let mut n = lock(&self.node);
            if peer == n.cfg.cloud {
                at_start = n.outbox_fingerprints(&folder);
            }
            let retained = n.retained.get(&(folder, peer)).copied().unwrap_or_default();
            n.replica_mut(&folder);
            let n = &*n;
            let replica = n.replicas.get(&folder).expect("just made");
            AuthSession::initiate(
                session_id(),
                now_us(),
                folder,
                policy,
                transport::channel_of(conn.remote_id()),
                &n.dir,
                replica,
                transport::stream_config(),
                retained,
            )
        };
        let node = self.node.clone();
        let handle = move |s: &mut AuthSession, now: Micros, bytes: &[u8]| {
            let signers = lock(&node).replica_mut(&folder).signers();
            let verified = transport::preverify(bytes, Some(folder.scope()), signers.as_deref());
            let mut guard = lock(&node);
            let n = &mut *guard;
            let replica = n.replica_mut(&folder);
            replica.set_verified(verified);
            let replica = n.replicas.get_mut(&folder).expect("just made");
            s.handle_message(now, &mut n.dir, replica, bytes)
        };
        let driven =
            transport::drive(&mut session, &mut send, &mut recv, handle, |s, now| s.handle_timeout(now))
                .await?;
        let mut n = lock(&self.node);
        n.persist_directory()?;
        n.persist_folder(&folder)?;
        if let Outcome::Done { retained, .. } = &driven.outcome {
            n.retained.insert((folder, peer), *retained);
            if peer == n.cfg.cloud {
                n.acknowledge(&folder, &at_start)?;
                tracing::debug!(%folder, acked = at_start.len(), pending = n.pending(&folder), "cloud session done");
            }
        }
        Ok(driven.outcome)
    }

    /// Folders this device syncs: mapped here, with this device active.
    fn mapped_folders(&self) -> Vec<FolderId> {
        let n = lock(&self.node);
        if n.user().is_none() {
            return Vec::new();
        }
        n.dir.folders_of(&n.id)
    }

    /// Answers pairing requests of this device's user with a nonce (the first step of the
    /// existing device's part; the user approves with the code later).
    pub async fn answer_pairings(self: &Arc<Self>) -> anyhow::Result<()> {
        if lock(&self.node).user().is_none() {
            return Ok(());
        }
        let Response::Pairings(list) = self.request(Request::PairList).await? else { return Ok(()) };
        for p in list.into_iter().filter(|p| p.existing.is_none()) {
            let nonce = {
                let mut n = lock(&self.node);
                let mut nonce = [0u8; 32];
                rand::fill(&mut nonce);
                let nonce = *n.pair_nonces.entry(p.id).or_insert(nonce);
                n.save_pair_nonces()?;
                nonce
            };
            self.request(Request::PairNonce { id: p.id, nonce }).await?;
        }
        Ok(())
    }

    /// Connects to a peer device (direct when possible, through the relay otherwise).
    async fn peer(&self, addr: EndpointAddr) -> anyhow::Result<Connection> {
        let device = transport::device_of(addr.id);
        if let Some(c) = self.peers.lock().await.get(&device) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        // Not holding the map's lock while connecting: peers connect concurrently.
        let conn =
            tokio::time::timeout(Duration::from_secs(10), self.endpoint.connect(addr, transport::ALPN))
                .await
                .map_err(|_| anyhow!("peer did not answer within 10 s"))??;
        self.peers.lock().await.insert(device, conn.clone());
        Ok(conn)
    }

    /// One round: directory, ticket, pairings, every mapped folder with the cloud, then with
    /// every reachable peer.
    pub async fn sync_all(self: &Arc<Self>) -> anyhow::Result<Round> {
        let mut round = Round::default();
        let result = async {
            round.directory_changes = self.sync_directory().await?;
            self.refresh_ticket().await?;
            let addr = transport::peer_addr(&self.endpoint.addr());
            match self.request(Request::Announce { addr }).await {
                // A device not yet active (a pairing under way) has no peers to be found by.
                Err(e)
                    if e.downcast_ref()
                        == Some(&transport::CloudRefused(transport::ControlError::NotActive)) => {}
                other => {
                    other?;
                }
            }
            self.answer_pairings().await?;
            anyhow::Ok(())
        }
        .await;
        {
            let mut n = lock(&self.node);
            n.cloud_online = result.is_ok();
            n.cloud_why = match &result {
                Ok(()) => "connected".into(),
                Err(e) => format!("{e:#}"),
            };
        }
        result?;
        let cloud = self.cloud().await?;
        let folders = self.mapped_folders();
        for &folder in &folders {
            let r = self.sync_folder(&cloud, folder).await;
            if r.is_err() {
                // A dead connection: make a new one next time.
                *self.cloud.lock().await = None;
            }
            self.record(&mut round, folder, None, r);
        }
        if !self.peer_sync.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(round);
        }
        // Peers, concurrently: one slow or unreachable peer must not hold up the others.
        let mut work: BTreeMap<DeviceId, (EndpointAddr, Vec<FolderId>)> = BTreeMap::new();
        for &folder in &folders {
            match self.request(Request::Peers { folder }).await {
                Ok(Response::Peers { peers }) => {
                    for peer in peers {
                        let Some(addr) = transport::endpoint_addr(&peer) else {
                            round.errors.push(format!("peers of {folder}: an address that does not parse"));
                            continue;
                        };
                        work.entry(peer.device).or_insert_with(|| (addr, Vec::new())).1.push(folder);
                    }
                }
                Ok(_) => {}
                Err(e) => round.errors.push(format!("peers of {folder}: {e:#}")),
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for (device, (addr, folders)) in work {
            let me = self.clone();
            set.spawn(async move {
                let mut results = Vec::new();
                match me.peer(addr).await {
                    Ok(conn) => {
                        for folder in folders {
                            let r = me.sync_folder(&conn, folder).await;
                            let failed = r.is_err();
                            results.push((folder, r));
                            if failed {
                                me.peers.lock().await.remove(&device);
                                break;
                            }
                        }
                        me.note_path(device, &conn);
                    }
                    Err(e) => {
                        let mut n = lock(&me.node);
                        let st = n.peers.entry(device).or_default();
                        st.device = engine::signing::hex(&device.0);
                        st.path = "unreachable".into();
                        st.why = format!("{e:#}");
                        if let Some(&f) = folders.first() {
                            results.push((f, Err(e)));
                        }
                    }
                }
                (device, results)
            });
        }
        while let Some(done) = set.join_next().await {
            let Ok((device, results)) = done else { continue };
            for (folder, r) in results {
                self.record(&mut round, folder, Some(device), r);
            }
        }
        Ok(round)
    }

    fn record(
        &self,
        round: &mut Round,
        folder: FolderId,
        peer: Option<DeviceId>,
        outcome: anyhow::Result<Outcome>,
    ) {
        let label = format!(
            "{} with {}",
            lock(&self.node).dir.folder(&folder).map(|f| f.name.clone()).unwrap_or_default(),
            peer.map_or("the cloud".to_string(), |p| engine::signing::hex(&p.0[..8]))
        );
        let text = match &outcome {
            Ok(Outcome::Done { .. }) => {
                round.sessions_ok += 1;
                "ok".to_string()
            }
            Ok(Outcome::Failed(e)) => {
                round.sessions_failed += 1;
                round.errors.push(format!("{label}: {e}"));
                e.to_string()
            }
            Ok(Outcome::Running) => "unfinished".into(),
            Err(e) => {
                round.sessions_failed += 1;
                round.errors.push(format!("{label}: {e:#}"));
                format!("{e:#}")
            }
        };
        if let Some(device) = peer {
            let mut n = lock(&self.node);
            let st = n.peers.entry(device).or_default();
            st.device = engine::signing::hex(&device.0);
            st.last_outcome = text;
            st.last_sync_unix = Some(transport::now_secs());
        }
    }

    /// Records how a peer connection runs: LAN, direct or relayed, and why.
    fn note_path(&self, device: DeviceId, conn: &Connection) {
        let paths = conn.paths();
        let selected = paths.iter().find(|p| p.is_selected());
        let (path, why) = match selected {
            Some(p) if p.is_relay() && self.relay_only => {
                ("relayed", "relay-only mode: this device uses no UDP, every packet goes through the relay".to_string())
            }
            Some(p) if p.is_relay() => (
                "relayed",
                "no direct path: hole punching has not succeeded (NAT or firewall), traffic goes through the relay".to_string(),
            ),
            Some(p) => match p.remote_addr() {
                TransportAddr::Ip(ip) if is_lan(ip.ip()) => {
                    ("lan", format!("direct to {ip} on the local network"))
                }
                TransportAddr::Ip(ip) => ("direct", format!("direct to {ip} (hole punched)")),
                other => ("direct", format!("via {other:?}")),
            },
            None => ("relayed", "no path selected yet".to_string()),
        };
        let mut n = lock(&self.node);
        let st = n.peers.entry(device).or_default();
        st.device = engine::signing::hex(&device.0);
        st.path = path.into();
        st.why = why;
    }

    /// Serves connections from peers (sync sessions as responder).
    pub async fn serve_incoming(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let Ok(accepting) = incoming.accept() else { return };
                let Ok(conn) = accepting.await else { return };
                loop {
                    let Ok((send, recv)) = conn.accept_bi().await else { break };
                    let me = me.clone();
                    let remote = conn.remote_id();
                    tokio::spawn(async move {
                        if let Err(e) = me.respond(remote, send, recv).await {
                            tracing::debug!(error = %e, "incoming stream failed");
                        }
                    });
                }
            });
        }
    }

    async fn respond(
        &self,
        remote: iroh::EndpointId,
        mut send: iroh::endpoint::SendStream,
        recv: iroh::endpoint::RecvStream,
    ) -> anyhow::Result<()> {
        let mut recv = frame::Reader::new(recv);
        match recv.read_value::<Open>(1 << 16, "stream opening").await? {
            Some(Open::Sync) => {}
            Some(Open::Control(_)) => {
                frame::write_value(&mut send, &Response::Refused(transport::ControlError::NotCloud)).await?;
                let _ = send.finish();
                return Ok(());
            }
            None => return Ok(()),
        }
        let Some(first) = recv.read(FRAME_MAX).await? else { return Ok(()) };
        let folder = AuthSession::folder_of(&first, FRAME_MAX)
            .ok_or_else(|| anyhow!("sync must open with DirHello"))?;
        let sid = Session::session_of(&first, FRAME_MAX)?;
        let policy = self.policy()?;
        let mut session = {
            let mut n = lock(&self.node);
            if n.dir.folder(&folder).is_none_or(|f| !f.mapped.contains(&n.id)) {
                // Not mine: answer with an empty stand-in replica (the session will refuse).
                let r = engine::replica::Replica::new_signed(0, folder.scope());
                AuthSession::respond(
                    sid,
                    policy,
                    transport::channel_of(remote),
                    &r,
                    transport::stream_config(),
                )
            } else {
                let r = n.replica_mut(&folder);
                AuthSession::respond(
                    sid,
                    policy,
                    transport::channel_of(remote),
                    r,
                    transport::stream_config(),
                )
            }
        };
        let node = self.node.clone();
        let handle = move |s: &mut AuthSession, now: Micros, bytes: &[u8]| {
            let mapped =
                |n: &crate::state::Node| n.dir.folder(&folder).is_some_and(|f| f.mapped.contains(&n.id));
            // Signatures are checked before the node's lock is taken (only for a folder mapped
            // here: anything else is refused without looking at its items).
            let signers = {
                let mut n = lock(&node);
                mapped(&n).then(|| n.replica_mut(&folder).signers())
            };
            let verified = match &signers {
                Some(signers) => transport::preverify(bytes, Some(folder.scope()), signers.as_deref()),
                None => Default::default(),
            };
            let mut guard = lock(&node);
            let n = &mut *guard;
            if !mapped(n) {
                let mut scratch = engine::replica::Replica::new_signed(0, folder.scope());
                return s.handle_message(now, &mut n.dir, &mut scratch, bytes);
            }
            n.replica_mut(&folder).set_verified(verified);
            let replica = n.replicas.get_mut(&folder).expect("just made");
            s.handle_message(now, &mut n.dir, replica, bytes)
        };
        let _ = handle(&mut session, now_us(), &first);
        let driven =
            transport::drive(&mut session, &mut send, &mut recv, handle, |s, now| s.handle_timeout(now))
                .await?;
        let peer = transport::device_of(remote);
        {
            let mut n = lock(&self.node);
            n.persist_directory()?;
            let changed = n.persist_folder(&folder)?;
            let st = n.peers.entry(peer).or_default();
            st.device = engine::signing::hex(&peer.0);
            st.last_sync_unix = Some(transport::now_secs());
            st.last_outcome = match &driven.outcome {
                Outcome::Done { .. } => "ok (they initiated)".into(),
                Outcome::Failed(e) => e.to_string(),
                Outcome::Running => "unfinished".into(),
            };
            if changed > 0 {
                drop(n);
                // New data from a peer: pass it on to the cloud soon.
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// The daemon: a sync round now, then after every wake-up or `interval`.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        tokio::spawn(self.clone().serve_incoming());
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.sync_all().await {
                Ok(round) => {
                    backoff = Duration::from_secs(1);
                    lock(&self.node).last_errors = round.errors.clone();
                    if round.sessions_failed > 0 {
                        tracing::info!(errors = ?round.errors, "sync round had failures");
                    }
                    interval
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cloud unreachable; retrying");
                    *self.cloud.lock().await = None;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    backoff.min(interval)
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {
                    // Coalesce bursts of writes and notices.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Drops every connection (tests use this to take a device offline without stopping it).
    pub async fn disconnect(&self) {
        if let Some(c) = self.cloud.lock().await.take() {
            c.close(0u32.into(), b"bye");
        }
        for (_, c) in std::mem::take(&mut *self.peers.lock().await) {
            c.close(0u32.into(), b"bye");
        }
    }
}

/// Whether a peer's address is on this device's own network: loopback, link-local, or inside
/// the subnet of one of this machine's interfaces. Another private address is some other
/// network's NAT (a hole punched path between two NATs), not the LAN.
fn is_lan(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let local = || netdev::get_interfaces();
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || local().iter().any(|i| i.ipv4.iter().any(|net| net.contains(&v4)))
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || local().iter().any(|i| i.ipv6.iter().any(|net| net.contains(&v6)))
        }
    }
}

/// Pairing, new device side: ask the cloud (account-checked), wait for an existing device's
/// nonce, reveal mine with my consent, and return the code to show; then wait until the
/// directory has this device.
pub async fn pair_request(net: &Arc<Net>, account: &str, password: &str) -> anyhow::Result<(u64, [u8; 32])> {
    let mut nonce_new = [0u8; 32];
    rand::fill(&mut nonce_new);
    let me = lock(&net.node).id;
    let commitment = engine::directory::pairing_commitment(&me, &nonce_new);
    let Response::PairId { id } = net
        .request(Request::PairRequest { account: account.into(), password: password.into(), commitment })
        .await?
    else {
        bail!("unexpected answer to a pairing request");
    };
    Ok((id, nonce_new))
}

#[cfg(test)]
mod tests {
    use super::is_lan;

    #[test]
    fn lan_means_this_machines_own_subnets() {
        assert!(is_lan("127.0.0.1".parse().unwrap()));
        assert!(is_lan("::1".parse().unwrap()));
        assert!(is_lan("169.254.1.1".parse().unwrap()));
        // TEST-NET-3 is on no interface: a peer there is reached through the internet.
        assert!(!is_lan("203.0.113.5".parse().unwrap()));
        // A private address is LAN exactly when one of our interfaces' subnets holds it.
        let nets: Vec<_> = netdev::get_interfaces().into_iter().flat_map(|i| i.ipv4).collect();
        for ip in ["10.254.253.252", "192.168.213.7", "172.31.250.9"] {
            let v4: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(is_lan(v4.into()), nets.iter().any(|n| n.contains(&v4)), "{ip}");
        }
        if let Some(own) = nets.iter().find(|n| !n.addr().is_loopback()) {
            assert!(is_lan(own.addr().into()), "{own}");
        }
    }
}
