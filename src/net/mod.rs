//! Transport: QUIC (quinn) with mutual TLS against the cluster CA.
//!
//! Turns frames into bytes on streams and bytes back into messages. One connection per peer
//! node, one bidirectional stream per connection, frames as `concord-proto` lays them out.
//! Guarantees:
//!
//! - a peer is known only by the node id in its verified certificate; a peer whose certificate
//!   is not from the cluster CA never gets past the TLS handshake (refused and logged);
//! - a malformed or oversized frame closes that connection only;
//! - nothing is dropped for lack of room: the engine's driver queues a frame only while the
//!   connection's queue has room ([`crate::sync::PEER_QUEUE_BYTES`]), and the writer reports
//!   every frame it wrote; a reader waits while the engine is busy, and QUIC flow control
//!   slows the peer meanwhile;
//! - handshakes are bounded: at most [`INBOUND_HANDSHAKES_MAX`] at once, each within
//!   [`HANDSHAKE_TIMEOUT`];
//! - dialing retries forever with exponential backoff and jitter.

pub mod relay;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_proto::{encode_frame, FrameDecoder, Goodbye, Message};
use tokio::sync::mpsc;

use crate::record::NodeId;
// What the transport tells the engine's driver (connections up and down, messages, bytes
// written) is the driver's own input.
use crate::sync::Input;

/// Frames queued for one connection at most. The driver bounds the queue by bytes first;
/// this only catches a bug, which closes the connection.
pub const PEER_QUEUE_FRAMES: usize = 16_384;
/// Bytes written to a connection before the writer reports them (and always when its queue
/// runs empty), so the driver learns of room without an event per frame.
const DRAINED_REPORT_BYTES: usize = 256 * 1024;
/// TLS handshakes (incoming and stream setup) in progress at once, and how long each may take.
pub const INBOUND_HANDSHAKES_MAX: usize = 64;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a goodbye is given to leave before the connection is closed.
const GOODBYE_GRACE: Duration = Duration::from_millis(50);
/// Bytes read from a stream at a time.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// First and largest wait between dial attempts.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Wait before dialing again a peer that refused this node as revoked: a revocation does not
/// end, so the peer is asked again only in case this node's word of it was wrong.
pub const DIAL_REVOKED_WAIT: Duration = Duration::from_secs(60);
/// What a revoked node's dials say instead of dialing.
const SELF_REVOKED: &str =
    "this node was revoked or removed by the cluster authority: it dials no more";
/// How often the refusal of one revoked peer is logged, however often it dials.
pub const REVOKED_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// QUIC keep-alive and idle timeout: a cut link is noticed within the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The server name a dialer presents; the verifier checks the node name in the certificate.
const DIAL_SERVER_NAME: &str = "peer.node.concord";
/// Ports tried by [`free_loopback_port`] before it gives up.
const FREE_PORT_TRIES_MAX: usize = 32;

/// Lowest port [`free_loopback_port`] picks.
const FREE_PORT_LOW: u16 = 10_000;

/// A loopback port free for both UDP (QUIC) and TCP (the API) right now, for demos and tests
/// that start several nodes on one machine. It lies below the kernel's ephemeral range, so
/// that a node restarted on it does not find it taken by some client's outgoing connection,
/// and one process never hands out the same port twice.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > FREE_PORT_LOW + 1_000)
        .unwrap_or(32_768);
    let mut jitter = Jitter::from_os();
    let span = f64::from(ephemeral_low - FREE_PORT_LOW);
    // Ports this process handed out already: two nodes of one test process that probed the
    // same free port at once would both be told it is free, and the second to bind would fail.
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..FREE_PORT_TRIES_MAX {
        let port = FREE_PORT_LOW + (jitter.unit() * span) as u16;
        if !handed_out.contains(&port)
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        "no loopback port free for both UDP and TCP",
    ))
}

/// What a connection's writer is given.
enum Outgoing {
    Frame(Vec<u8>),
    /// Write this goodbye frame, then close the connection.
    Close {
        frame: Vec<u8>,
        reason: String,
    },
}

struct PeerLink {
    connection_id: u64,
    dialed_by: NodeId,
    connection: quinn::Connection,
    outbound: mpsc::Sender<Outgoing>,
    address: SocketAddr,
}

/// The QUIC close code and reason a revoked node's connections are closed with.
const REVOKED_CLOSE_CODE: u32 = 3;
const REVOKED_CLOSE_REASON: &[u8] = b"revoked or removed by the cluster authority";
/// How long a revoked dialer is given to finish its handshake, so the reason reaches it.
const REVOKED_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Frames refused because a connection's queue was full: a bug (the driver bounds the
    /// queue), and the connection is closed.
    pub frames_overflowed: AtomicU64,
    pub frames_refused: AtomicU64,
    pub handshakes_refused: AtomicU64,
}

/// How dialing one configured peer address goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialState {
    /// The node that answered at this address the last time a handshake completed.
    pub peer: Option<NodeId>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// Attempts that failed since the last one that did not.
    pub failures: u64,
}

/// The connections of one node.
pub struct Transport {
    node: NodeId,
    endpoint: quinn::Endpoint,
    links: Mutex<BTreeMap<NodeId, PeerLink>>,
    /// One entry per configured peer address: bounded by the config.
    dials: Mutex<BTreeMap<SocketAddr, DialState>>,
    events: mpsc::Sender<Input>,
    next_connection: AtomicU64,
    /// Nodes the cluster authority revoked: their connections are closed and refused.
    revoked: Mutex<BTreeSet<NodeId>>,
    /// When the refusal of each revoked node was last logged (as many entries as revoked
    /// nodes dialed, which the grants bound).
    refusals_logged: Mutex<BTreeMap<NodeId, std::time::Instant>>,
    /// Set once this node learns the cluster authority revoked it: it dials no more.
    self_revoked: std::sync::atomic::AtomicBool,
    pub stats: TransportStats,
}

fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config.keep_alive_interval(Some(KEEP_ALIVE));
    config.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("a few seconds fit a QUIC idle timeout"),
    ));
    config
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen for peers on {address} (network.listen): {error}")]
    Bind {
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("quic config: {0}")]
    Config(String),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Transport {
    /// Binds the QUIC endpoint on `listen`.
    pub fn bind(
        tls: &tls::NodeTls,
        listen: SocketAddr,
        events: mpsc::Sender<Input>,
    ) -> Result<Arc<Self>, TransportError> {
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|error| TransportError::Config(error.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(Arc::new(transport_config()));
        let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client_config()?)
            .map_err(|error| TransportError::Config(error.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(Arc::new(transport_config()));
        let mut endpoint =
            quinn::Endpoint::server(server, listen).map_err(|error| TransportError::Bind {
                address: listen,
                error,
            })?;
        endpoint.set_default_client_config(client);
        Ok(Arc::new(Self {
            node: tls.node,
            endpoint,
            links: Mutex::new(BTreeMap::new()),
            dials: Mutex::new(BTreeMap::new()),
            events,
            next_connection: AtomicU64::new(1),
            revoked: Mutex::new(BTreeSet::new()),
            refusals_logged: Mutex::new(BTreeMap::new()),
            self_revoked: std::sync::atomic::AtomicBool::new(false),
            stats: TransportStats::default(),
        }))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Peers with a connection now, and their addresses.
    pub fn connected(&self) -> Vec<(NodeId, SocketAddr)> {
        lock(&self.links)
            .iter()
            .map(|(peer, link)| (*peer, link.address))
            .collect()
    }

    /// Each configured peer address this node dials, and how dialing it goes.
    pub fn dials(&self) -> Vec<(SocketAddr, DialState)> {
        lock(&self.dials)
            .iter()
            .map(|(address, state)| (*address, state.clone()))
            .collect()
    }

    fn dialed(&self, address: SocketAddr, outcome: Result<Option<NodeId>, &str>) {
        let mut dials = lock(&self.dials);
        let state = dials.entry(address).or_default();
        match outcome {
            Ok(peer) => {
                state.peer = peer;
                state.last_error = None;
                state.failures = 0;
            }
            Err(error) => {
                let mut error = error.to_owned();
                concord_proto::clip_text(&mut error, concord_proto::DETAIL_BYTES_MAX);
                state.last_error = Some(error);
                state.failures += 1;
            }
        }
    }

    /// Queues a frame on `peer`'s connection `connection`. A frame for a connection that is
    /// gone is dropped: its engine state went with it.
    pub fn send(&self, peer: &NodeId, connection: u64, frame: Vec<u8>) {
        let mut links = lock(&self.links);
        let Some(link) = links.get(peer) else {
            return;
        };
        if link.connection_id != connection {
            return;
        }
        if link.outbound.try_send(Outgoing::Frame(frame)).is_err() {
            self.stats.frames_overflowed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%peer, "a connection's frame queue overflowed: closing it");
            if let Some(link) = links.remove(peer) {
                link.connection.close(4u32.into(), b"queue overflow");
            }
        }
    }

    /// Sends a goodbye on `peer`'s connection `connection`, then closes it.
    pub fn disconnect(&self, peer: &NodeId, connection: u64, goodbye: Goodbye) {
        let mut links = lock(&self.links);
        if links
            .get(peer)
            .is_none_or(|link| link.connection_id != connection)
        {
            return;
        }
        if let Some(link) = links.remove(peer) {
            Self::close_link(link, goodbye);
        }
    }

    fn close_link(link: PeerLink, goodbye: Goodbye) {
        let reason = goodbye.detail.clone();
        let frame = encode_frame(&Message::Goodbye(goodbye)).unwrap_or_default();
        if link
            .outbound
            .try_send(Outgoing::Close { frame, reason })
            .is_err()
        {
            link.connection.close(0u32.into(), b"closed");
        }
    }

    /// Takes `revoked` as the nodes revoked or removed now: connections to them close at once, and new
    /// ones are refused.
    pub fn set_revoked(&self, revoked: BTreeSet<NodeId>) {
        let mut held = lock(&self.revoked);
        if *held == revoked {
            return;
        }
        if revoked.contains(&self.node) && !self.self_revoked.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "this node was revoked or removed by the cluster authority: it dials its peers no more"
            );
            // Each dial loop ends when it next wakes; status says why from now on.
            for state in lock(&self.dials).values_mut() {
                state.last_error = Some(SELF_REVOKED.to_owned());
            }
        }
        lock(&self.refusals_logged).retain(|node, _| revoked.contains(node));
        let mut links = lock(&self.links);
        for peer in &revoked {
            if let Some(link) = links.remove(peer) {
                tracing::warn!(%peer, "closed the connection of a node revoked or removed by the cluster authority");
                link.connection
                    .close(REVOKED_CLOSE_CODE.into(), REVOKED_CLOSE_REASON);
            }
        }
        *held = revoked;
    }

    /// Closes every connection with a goodbye, as at shutdown.
    pub async fn close_all(&self, goodbye: Goodbye) {
        let links: Vec<PeerLink> = std::mem::take(&mut *lock(&self.links))
            .into_values()
            .collect();
        for link in links {
            Self::close_link(link, goodbye.clone());
        }
        tokio::time::sleep(GOODBYE_GRACE * 2).await;
        self.endpoint.close(0u32.into(), b"shutdown");
        self.endpoint.wait_idle().await;
    }

    /// Accepts connections until the endpoint closes: at most [`INBOUND_HANDSHAKES_MAX`]
    /// handshakes at once (more are refused), each within [`HANDSHAKE_TIMEOUT`].
    pub async fn accept_loop(self: Arc<Self>) {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(INBOUND_HANDSHAKES_MAX));
        while let Some(incoming) = self.endpoint.accept().await {
            let address = incoming.remote_address();
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                self.stats
                    .handshakes_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%address, "refused an incoming connection: too many handshakes at once");
                incoming.refuse();
                continue;
            };
            let transport = self.clone();
            tokio::spawn(async move {
                let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
                let connection = match accepted {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(error)) => {
                        transport.refused(address, &error.to_string());
                        return;
                    }
                    Err(_) => {
                        transport.refused(address, "the TLS handshake took too long");
                        return;
                    }
                };
                transport.serve(connection, false, Some(permit)).await;
            });
        }
    }

    fn refused(&self, address: SocketAddr, error: &str) {
        self.stats
            .handshakes_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%address, %error, "refused an incoming connection");
    }

    /// Keeps a connection to `address` up, redialing with backoff and jitter.
    pub async fn dial_loop(self: Arc<Self>, address: SocketAddr) {
        let mut backoff = DIAL_BACKOFF_MIN;
        let mut jitter = Jitter::from_os();
        lock(&self.dials).entry(address).or_default();
        let mut told_revoked = false;
        loop {
            if self.self_revoked.load(Ordering::Relaxed) {
                self.dialed(address, Err(SELF_REVOKED));
                return;
            }
            let attempt = match self.endpoint.connect(address, DIAL_SERVER_NAME) {
                Ok(connecting) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                    Ok(connected) => connected.map_err(|error| error.to_string()),
                    Err(_) => Err("the TLS handshake took too long".to_owned()),
                },
                Err(error) => Err(error.to_string()),
            };
            match attempt {
                Ok(connection) => {
                    self.dialed(address, Ok(peer_node(&connection)));
                    let ended = self.clone().serve(connection, true, None).await;
                    if self.self_revoked.load(Ordering::Relaxed) {
                        // This node learned of its own revocation meanwhile: the loop's top
                        // says so and stops, rather than the peer's refusal standing as why.
                        continue;
                    }
                    if ended == Ended::Revoked {
                        if !std::mem::replace(&mut told_revoked, true) {
                            tracing::error!(%address, "the peer refuses this node: the cluster authority revoked it");
                        }
                        self.dialed(address, Err("the peer refuses this node as revoked"));
                        tokio::time::sleep(DIAL_REVOKED_WAIT.mul_f64(0.5 + jitter.unit())).await;
                        continue;
                    }
                    if ended == Ended::Heard {
                        backoff = DIAL_BACKOFF_MIN;
                    } else {
                        // Closed before the peer said anything: as a failed dial, it backs off.
                        self.dialed(address, Err("the peer closed the connection at once"));
                    }
                }
                Err(error) => {
                    self.stats
                        .handshakes_refused
                        .fetch_add(1, Ordering::Relaxed);
                    self.dialed(address, Err(&error));
                    tracing::debug!(%address, %error, "dial failed");
                }
            }
            let wait = backoff.mul_f64(0.5 + jitter.unit());
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
        }
    }

    /// Runs one authenticated connection until it closes. `handshake` is released once the
    /// connection's stream is open. Whether the peer was heard on it (it sent a message)
    /// before it closed: a peer that closes a connection at once, as one that refuses this
    /// node does (its reason is lost when it closes inside the TLS handshake), is dialed
    /// again with backoff.
    async fn serve(
        self: Arc<Self>,
        connection: quinn::Connection,
        dialer: bool,
        handshake: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Ended {
        let address = connection.remote_address();
        let Some(peer) = peer_node(&connection) else {
            tracing::warn!(%address, "refused a peer whose certificate carries no node id");
            connection.close(1u32.into(), b"no node id");
            return Ended::Silent;
        };
        if peer == self.node {
            connection.close(1u32.into(), b"connected to itself");
            return Ended::Silent;
        }
        if lock(&self.revoked).contains(&peer) {
            self.refuse_revoked(peer, address);
            if !dialer {
                // Closed inside the TLS handshake, the reason would not reach the dialer
                // (QUIC drops it there); once the dialer opens its stream, it does.
                let _ = tokio::time::timeout(REVOKED_CLOSE_WAIT, connection.accept_bi()).await;
            }
            connection.close(REVOKED_CLOSE_CODE.into(), REVOKED_CLOSE_REASON);
            return Ended::Silent;
        }
        let streams = if dialer {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.open_bi()).await
        } else {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.accept_bi()).await
        };
        drop(handshake);
        let (send, recv) = match streams {
            Ok(Ok(streams)) => streams,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "connection closed before its stream opened");
                return Ended::Silent;
            }
            Err(_) => {
                tracing::debug!(%peer, "no stream opened in time");
                connection.close(1u32.into(), b"no stream");
                return Ended::Silent;
            }
        };
        let dialed_by = if dialer { self.node } else { peer };
        let connection_id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let (outbound, queue) = mpsc::channel(PEER_QUEUE_FRAMES);
        if !self.register(
            peer,
            PeerLink {
                connection_id,
                dialed_by,
                connection: connection.clone(),
                outbound,
                address,
            },
        ) {
            connection.close(2u32.into(), b"duplicate connection");
            return Ended::Silent;
        }
        tracing::info!(%peer, %address, dialer, "connected");
        let _ = self
            .events
            .send(Input::Up {
                peer,
                connection: connection_id,
            })
            .await;
        let writer = tokio::spawn(self.clone().write_loop(
            peer,
            connection_id,
            connection.clone(),
            send,
            queue,
        ));
        let ended = self.read_loop(peer, connection_id, &connection, recv).await;
        writer.abort();
        let removed = {
            let mut links = lock(&self.links);
            if links
                .get(&peer)
                .is_some_and(|link| link.connection_id == connection_id)
            {
                links.remove(&peer);
                true
            } else {
                false
            }
        };
        connection.close(0u32.into(), b"closed");
        if removed {
            tracing::info!(%peer, "disconnected");
        }
        let _ = self
            .events
            .send(Input::Down {
                peer,
                connection: connection_id,
            })
            .await;
        ended
    }

    /// Counts a revoked node's dial and logs it, once a minute per node at most.
    fn refuse_revoked(&self, peer: NodeId, address: SocketAddr) {
        self.stats
            .handshakes_refused
            .fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        let mut logged = lock(&self.refusals_logged);
        let due = logged
            .get(&peer)
            .is_none_or(|last| now.duration_since(*last) >= REVOKED_REFUSAL_LOG_INTERVAL);
        if due {
            logged.insert(peer, now);
            tracing::warn!(%peer, %address, "refused a node revoked by the cluster authority (logged once a minute)");
        }
    }

    /// One connection per peer pair: when both dial, the one dialed by the smaller node id
    /// stays, on both sides alike.
    fn register(&self, peer: NodeId, link: PeerLink) -> bool {
        let mut links = lock(&self.links);
        if let Some(existing) = links.get(&peer) {
            let preferred_dialer = self.node.min(peer);
            if existing.dialed_by == preferred_dialer || link.dialed_by != preferred_dialer {
                return false;
            }
            existing
                .connection
                .close(2u32.into(), b"duplicate connection");
        }
        links.insert(peer, link);
        true
    }

    async fn read_loop(
        &self,
        peer: NodeId,
        connection_id: u64,
        connection: &quinn::Connection,
        mut recv: quinn::RecvStream,
    ) -> Ended {
        let mut decoder = FrameDecoder::new();
        let mut heard = false;
        loop {
            let chunk = match recv.read_chunk(READ_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return ended(heard),
                Err(error) => {
                    tracing::debug!(%peer, %error, "stream ended");
                    if matches!(
                        &error,
                        quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))
                            if is_revoked(close)
                    ) {
                        return Ended::Revoked;
                    }
                    return ended(heard);
                }
            };
            self.stats
                .bytes_received
                .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
            if let Err(error) = decoder.push(&chunk.bytes) {
                self.refuse_frame(peer, connection, &error.to_string());
                return ended(heard);
            }
            loop {
                match decoder.next_message() {
                    Ok(Some(message)) => {
                        heard = true;
                        let event = Input::Received {
                            peer,
                            connection: connection_id,
                            message,
                        };
                        if self.events.send(event).await.is_err() {
                            return ended(heard);
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        self.refuse_frame(peer, connection, &error.to_string());
                        return ended(heard);
                    }
                }
            }
        }
    }

    fn refuse_frame(&self, peer: NodeId, connection: &quinn::Connection, error: &str) {
        self.stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, %error, "bad frame: closing the connection");
        connection.close(3u32.into(), b"malformed frame");
    }

    async fn write_loop(
        self: Arc<Self>,
        peer: NodeId,
        connection_id: u64,
        connection: quinn::Connection,
        mut send: quinn::SendStream,
        mut queue: mpsc::Receiver<Outgoing>,
    ) {
        let mut written = 0usize;
        while let Some(outgoing) = queue.recv().await {
            match outgoing {
                Outgoing::Frame(frame) => {
                    if send.write_all(&frame).await.is_err() {
                        return;
                    }
                    self.stats
                        .bytes_sent
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                    written += frame.len();
                    if queue.is_empty() || written >= DRAINED_REPORT_BYTES {
                        let event = Input::Drained {
                            peer,
                            connection: connection_id,
                            bytes: std::mem::take(&mut written),
                        };
                        if self.events.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Outgoing::Close { frame, reason } => {
                    let _ = send.write_all(&frame).await;
                    let _ = send.finish();
                    // Give the goodbye a moment to leave before the close overtakes it.
                    tokio::time::sleep(GOODBYE_GRACE).await;
                    connection.close(0u32.into(), reason.as_bytes());
                    return;
                }
            }
        }
    }
}

/// How a connection ended, as its dialer weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The peer never said anything on it: dialed again with backoff.
    Silent,
    /// The peer spoke: it was up, and is redialed at once.
    Heard,
    /// The peer refused this node as revoked.
    Revoked,
}

fn ended(heard: bool) -> Ended {
    if heard {
        Ended::Heard
    } else {
        Ended::Silent
    }
}

/// Whether the peer closed a connection because the cluster authority revoked this node.
fn is_revoked(close: &quinn::ApplicationClose) -> bool {
    close.error_code == quinn::VarInt::from_u32(REVOKED_CLOSE_CODE)
        && close.reason.as_ref() == REVOKED_CLOSE_REASON
}

/// The node id in the peer's verified certificate.
fn peer_node(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::node_id_of(certs.first()?)
}

/// Jitter for redial waits: seeded once from the OS.
type Jitter = crate::rng::SplitMix64;
