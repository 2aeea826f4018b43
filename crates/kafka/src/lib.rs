//! tidewater's Kafka protocol listener: Kafka's clients and tools against tidewater's
//! streams (topics), committed offsets and groups, through the same `Broker` every other
//! front end calls ([docs/kafka.md](../../../docs/kafka.md)).
//!
//! - `conn.rs`: one connection: frames read in order, each request started in order (so a
//!   connection's produces append in the order sent), answered in order by a writer task.
//! - `versions.rs`: the APIs and versions served (ApiVersions), and the dispatch.
//! - `metadata.rs`, `produce.rs`, `fetch.rs`, `offsets.rs`, `groups.rs` (classic
//!   groups), `consumer.rs` (KIP-848 groups), `share.rs` (share groups, KIP-932), `admin.rs`:
//!   the APIs.
//! - `codec.rs` and `producers.rs`: what needs no I/O: produced batches checked and
//!   decompressed within a bound; idempotent producers' sequence state.
//! - `errors.rs`: broker errors as Kafka error codes.
//!
//! Schemas come from the `kafka-protocol` crate (generated from Kafka's own JSON message
//! definitions); record batches are tidewater-format's, as stored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tidewater_core::Broker;
use tokio::sync::{Semaphore, watch};

mod access;
mod admin;
pub mod codec;
mod conn;
mod consumer;
mod errors;
mod fetch;
mod groups;
mod metadata;
mod offsets;
mod produce;
pub mod producers;
mod sasl;
mod share;
mod versions;

pub use conn::serve_connection;
pub use versions::{Decoded, SUPPORTED, decode_request, supported_versions};

/// The Kafka listener's settings (docs/configuration.md, `[kafka]`).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The host and port clients are told to connect to (Metadata, FindCoordinator): the
    /// listen address unless set.
    pub advertised_host: String,
    pub advertised_port: u16,
    /// This node's id in Metadata (the leader of every partition).
    pub node_id: i32,
    pub max_connections: usize,
    /// Largest request (Kafka's `socket.request.max.bytes`); a bigger one closes the
    /// connection, as in Kafka.
    pub max_request_bytes: usize,
    /// Requests of one connection being handled or answered at once; the connection is
    /// not read past it.
    pub max_requests_in_flight: usize,
    /// Bytes of requests being handled across connections (Kafka's
    /// `queued.max.request.bytes`); past it connections wait to be read.
    pub max_request_bytes_in_flight: usize,
    /// A connection with no request this long is closed (Kafka's
    /// `connections.max.idle.ms`).
    pub idle_timeout: Duration,
    /// The most bytes one produce request's compressed batches may take once decompressed,
    /// all together (they also count against the memory budget until appended).
    pub max_uncompressed_produce_bytes: usize,
    /// Idempotent producer states kept (per producer and partition).
    pub max_producer_states: usize,
    /// Consumer-protocol groups (KIP-848): how often members heartbeat, and how long one
    /// may go without before it is removed (Kafka's group.consumer.heartbeat.interval.ms
    /// and group.consumer.session.timeout.ms).
    pub consumer_heartbeat_interval_ms: u64,
    pub consumer_session_timeout_ms: u64,
    pub shutdown_timeout: Duration,
    /// Authentication on: clients authenticate with SASL (PLAIN, SCRAM-SHA-256/512) and
    /// each request is checked against the principal's grants. None: off.
    pub auth: Option<Arc<tidewater_auth::Guard>>,
}

impl KafkaConfig {
    pub fn new(listen: SocketAddr) -> KafkaConfig {
        KafkaConfig {
            listen,
            advertised_host: listen.ip().to_string(),
            advertised_port: listen.port(),
            node_id: 1,
            max_connections: 4096,
            max_request_bytes: 100 << 20,
            max_requests_in_flight: 16,
            max_request_bytes_in_flight: 256 << 20,
            idle_timeout: Duration::from_secs(600),
            max_uncompressed_produce_bytes: 64 << 20,
            max_producer_states: 100_000,
            consumer_heartbeat_interval_ms: 5_000,
            consumer_session_timeout_ms: 45_000,
            shutdown_timeout: Duration::from_secs(10),
            auth: None,
        }
    }
}

/// What an append answered: its base offset and the append time (-1 unless the stream
/// stamps LogAppendTime), or a Kafka error code and message.
pub(crate) type Landed = Result<(i64, i64), (i16, String)>;

/// Live figures of the listener, for /metrics.
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// Requests read.
    pub requests: AtomicU64,
    /// Produced partitions answered with an error.
    pub request_errors: AtomicU64,
    /// Connections closed for a request the listener cannot read.
    pub closed_malformed: AtomicU64,
    /// Connections closed for sending nothing within `idle_timeout`.
    pub closed_idle: AtomicU64,
    /// Idempotent producers' batches sent again and answered, not written.
    pub duplicates: AtomicU64,
    /// Idempotent producers' batches refused out of sequence.
    pub out_of_order: AtomicU64,
}

/// The listener's shared state.
pub struct Kafka {
    pub(crate) broker: Broker,
    pub(crate) config: KafkaConfig,
    pub(crate) producers: Mutex<producers::Producers<watch::Receiver<Option<Landed>>>>,
    /// Partitions whose producer state was rebuilt since the start (`produce::restore_partition`).
    pub(crate) restored: Mutex<std::collections::HashSet<producers::PartitionKey>>,
    next_producer_id: AtomicI64,
    /// Share groups' members, sessions and acquired records.
    pub(crate) shares: Mutex<share::Shares>,
    /// Consumer-protocol members' last heartbeats.
    pub(crate) members: Mutex<consumer::MemberViews>,
    /// Topic ids of the streams seen, for requests that name topics by id.
    topic_ids: Mutex<HashMap<uuid::Uuid, String>>,
    /// KiB of requests being handled across connections.
    pub(crate) memory: Arc<Semaphore>,
    pub stats: Arc<KafkaStats>,
    /// Random at start: SCRAM's salts for unknown users derive from it.
    pub(crate) process_secret: [u8; 32],
}

impl Kafka {
    pub fn new(broker: Broker, config: KafkaConfig, stats: Arc<KafkaStats>) -> Arc<Kafka> {
        // Producer ids unique across restarts without storing anything: they start from
        // the time (ms << 12), so a restart starts past any id handed out before it unless
        // more than 4,096 a millisecond were taken.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Arc::new(Kafka {
            producers: Mutex::new(producers::Producers::new(config.max_producer_states)),
            restored: Mutex::new(std::collections::HashSet::new()),
            next_producer_id: AtomicI64::new(now_ms << 12),
            topic_ids: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            shares: Mutex::new(share::Shares::default()),
            memory: Arc::new(Semaphore::new(
                config.max_request_bytes_in_flight.div_ceil(1024),
            )),
            stats,
            broker,
            config,
            process_secret: {
                let mut secret = [0u8; 32];
                rand::Rng::fill_bytes(&mut rand::rng(), &mut secret);
                secret
            },
        })
    }

    /// A new producer id (InitProducerId).
    pub(crate) fn new_producer_id(&self) -> i64 {
        self.next_producer_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes up to `bytes` of the listener's memory budget for a response, without waiting
    /// (a response waiting for room held by requests queued behind it on its own connection
    /// would wait for ever): what is free, if less. Returns the bytes the response may use
    /// (at least 1 KiB: a fetch answers at least one batch) and the permit.
    pub(crate) fn hold(&self, bytes: usize) -> (usize, Option<tokio::sync::OwnedSemaphorePermit>) {
        let free = self.memory.available_permits();
        let kib = bytes.div_ceil(1024).min(free);
        if kib == 0 {
            return (1024, None);
        }
        let permit = self
            .memory
            .clone()
            .try_acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX))
            .ok();
        let granted = if permit.is_some() { kib * 1024 } else { 1024 };
        (granted.min(bytes.max(1)), permit)
    }

    /// The topic id of a stream (or a queue): its name's hash and its first partition's (the
    /// queue's) log uid, so one deleted and made again under the same name gets another id.
    pub(crate) fn topic_id(&self, stream: &str) -> uuid::Uuid {
        // A stream, else a queue (a one-partition topic for share consumers).
        let Ok(uid) = self
            .broker
            .stream_uid(stream)
            .or_else(|_| self.broker.queue_uid(stream))
        else {
            return uuid::Uuid::nil();
        };
        let hash = xxhash_rust::xxh3::xxh3_64(stream.as_bytes());
        let id = uuid::Uuid::from_u64_pair(hash, uid);
        let mut ids = self.topic_ids.lock();
        if ids.len() > 100_000 {
            ids.clear();
        }
        ids.insert(id, stream.to_string());
        id
    }

    /// The stream a topic id names, if it still exists.
    pub(crate) fn topic_name(&self, id: &uuid::Uuid) -> Option<String> {
        let known = self.topic_ids.lock().get(id).cloned();
        if let Some(name) = known
            && self.topic_id(&name) == *id
        {
            return Some(name);
        }
        // Not seen yet (a client with ids from before a restart): look through them all.
        self.broker
            .list_streams()
            .into_iter()
            .map(|s| s.name)
            .chain(self.broker.list_queues().into_iter().map(|q| q.name))
            .find(|name| self.topic_id(name) == *id)
    }
}
