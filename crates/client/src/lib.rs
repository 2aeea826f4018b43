//! The Rust client for tidewater's binary protocol (docs/protocol.md): queues (`producer`,
//! `consumer`) and streams (`stream_producer`, `group_consumer`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tidewater_client::ClientError> {
//! use tidewater_client::{Client, ClientOptions, ConsumerOptions, Message, ProducerOptions};
//!
//! let client = Client::new("127.0.0.1:7071", ClientOptions::default());
//! let producer = client.producer("orders", ProducerOptions::default());
//! // Each send resolves to the message's id once the broker made it durable;
//! // sends made together travel in one batch.
//! let (a, b) = tokio::join!(producer.send(Message::new("one")), producer.send(Message::new("two")));
//! println!("{} {}", a?, b?);
//!
//! let mut consumer = client.consumer("orders", ConsumerOptions::default());
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("{}", String::from_utf8_lossy(&delivery.body));
//!     consumer.ack(&delivery); // batched behind the scenes
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Resilience by default: connect and request timeouts, reconnect with exponential backoff
//! and full jitter, a circuit breaker, obedience to throttle replies (a refused batch is
//! retried after the wait the broker names). A produce is retried only when it provably did
//! not reach the broker (never after its frame was sent), so retries never duplicate messages.

mod conn;
mod consumer;
mod group_consumer;
mod producer;
mod stream_producer;
mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidewater_proto::Frame;

pub use consumer::{Consumer, ConsumerOptions, Delivery};
pub use group_consumer::{
    GroupConsumer, GroupConsumerOptions, Rebalance, RebalanceCallback, StartFrom, StreamRecord,
};
pub use producer::{Message, Producer, ProducerOptions};
pub use stream_producer::{Record, RecordMetadata, StreamProducer, StreamProducerOptions};
pub use tls::{ClientTls, Roots, TlsOptions};

use crate::conn::Conn;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Longest wait for one reply.
    pub request_timeout: Duration,
    /// Reconnect backoff: full jitter in [0, min(max, base * 2^attempt)].
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// Consecutive failures that open the circuit breaker, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_open_for: Duration,
    pub client_name: String,
    /// A connection that sent nothing for this long sends a Ping, so the server's
    /// `idle_timeout_ms` (5 min by default, at least 1 s) never closes a quiet subscriber.
    pub heartbeat_interval: Duration,
    /// An API key's token, `<key id>.<secret>`, sent in Hello, for a server with
    /// authentication on. Never logged, nor shown by `Debug`.
    pub credentials: Option<Credentials>,
    /// TLS to the server (`ClientTls::new`); None: plain TCP.
    pub tls: Option<ClientTls>,
}

/// A secret the client presents; `Debug` shows only the key id.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials(String);

impl Credentials {
    pub fn token(token: impl Into<String>) -> Credentials {
        Credentials(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.0.split_once('.').map_or("?", |(id, _)| id);
        write!(f, "Credentials({id}.***)")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            reconnect_base: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(5),
            client_name: format!("tidewater-client {}", env!("CARGO_PKG_VERSION")),
            heartbeat_interval: Duration::from_secs(10),
            credentials: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The request never reached the broker (no connection): safe to retry.
    Unavailable(String),
    /// The connection dropped after the request was sent: it may or may not have applied.
    Disconnected,
    /// No reply within `request_timeout`: it may or may not have applied.
    Timeout,
    /// The circuit breaker is open after repeated failures: failing fast.
    CircuitOpen,
    /// The broker refused the request; `code` is a stable code from docs/errors.md.
    Server { code: String, message: String },
    /// The broker sent something this client does not understand.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unavailable(why) => write!(f, "broker unavailable: {why}"),
            ClientError::Disconnected => {
                f.write_str("connection lost after sending; the outcome is unknown")
            }
            ClientError::Timeout => f.write_str("no reply in time; the outcome is unknown"),
            ClientError::CircuitOpen => f.write_str("circuit breaker open after repeated failures"),
            ClientError::Server { code, message } => write!(f, "{message} ({code})"),
            ClientError::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Closed -> (failures) -> Open -> (time) -> HalfOpen -> success: Closed / failure: Open.
#[derive(Debug)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    half_open_probe: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Counters a caller can read (for tests and metrics).
#[derive(Debug, Default)]
pub struct ClientStats {
    pub throttled: AtomicU64,
    pub reconnects: AtomicU64,
    pub ack_failures: AtomicU64,
}

pub(crate) struct Inner {
    addr: String,
    opts: ClientOptions,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    breaker: Mutex<Breaker>,
    pub(crate) stats: ClientStats,
}

/// A connection to one broker, shared by producers and consumers; cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl Client {
    /// Creates a client; it connects on first use and reconnects as needed.
    pub fn new(addr: &str, opts: ClientOptions) -> Client {
        Client {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                opts,
                conn: tokio::sync::Mutex::new(None),
                breaker: Mutex::new(Breaker {
                    failures: 0,
                    open_until: None,
                    half_open_probe: false,
                }),
                stats: ClientStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    pub fn breaker_state(&self) -> BreakerState {
        let b = self.inner.breaker.lock();
        match b.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    pub fn producer(&self, queue: &str, opts: ProducerOptions) -> Producer {
        Producer::start(self.clone(), queue.to_string(), opts)
    }

    pub fn consumer(&self, queue: &str, opts: ConsumerOptions) -> Consumer {
        Consumer::start(self.clone(), queue.to_string(), opts)
    }

    /// Consumes a work-queue subscription on a stream (the broker names it
    /// `stream/subscription`): a consumer as for a queue, whose deliveries say their
    /// partition (`Delivery::partition`).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), tidewater_client::ClientError> {
    /// use tidewater_client::{Client, ClientOptions, ConsumerOptions};
    ///
    /// let client = Client::new("127.0.0.1:7071", ClientOptions::default());
    /// let mut billing = client.subscription("orders", "billing", ConsumerOptions::default());
    /// while let Some(delivery) = billing.next().await {
    ///     let delivery = delivery?;
    ///     println!("partition {:?} offset {}", delivery.partition(), delivery.offset);
    ///     billing.ack(&delivery);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn subscription(
        &self,
        stream: &str,
        subscription: &str,
        opts: ConsumerOptions,
    ) -> Consumer {
        self.consumer(&format!("{stream}/{subscription}"), opts)
    }

    /// Produces to a stream: records batch per partition; each send resolves to where its
    /// record went.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), tidewater_client::ClientError> {
    /// use tidewater_client::{Client, ClientOptions, Record, StreamProducerOptions};
    ///
    /// let client = Client::new("127.0.0.1:7071", ClientOptions::default());
    /// let producer = client.stream_producer("readings", StreamProducerOptions::default());
    /// // One key, one partition: a sensor's readings stay in order.
    /// let sent = producer.send(Record::new("21.5").with_key("sensor-7")).await?;
    /// println!("partition {} offset {}", sent.partition, sent.offset);
    /// # Ok(())
    /// # }
    /// ```
    pub fn stream_producer(&self, stream: &str, opts: StreamProducerOptions) -> StreamProducer {
        StreamProducer::start(self.clone(), stream.to_string(), opts)
    }

    /// Joins consumer group `group` for `streams`: the broker hands this member a share of
    /// their partitions (see `GroupConsumer`).
    pub fn group_consumer(
        &self,
        group: &str,
        streams: &[&str],
        opts: GroupConsumerOptions,
    ) -> GroupConsumer {
        GroupConsumer::start(self.clone(), group, streams, opts)
    }

    /// Round trip to the broker.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(Frame::Ping).await? {
            Frame::Pong => Ok(()),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    fn breaker_admit(&self) -> Result<(), ClientError> {
        let mut b = self.inner.breaker.lock();
        match b.open_until {
            None => Ok(()),
            Some(until) if Instant::now() < until => Err(ClientError::CircuitOpen),
            Some(_) if b.half_open_probe => Err(ClientError::CircuitOpen),
            Some(_) => {
                b.half_open_probe = true; // one probe at a time
                Ok(())
            }
        }
    }

    fn breaker_result(&self, ok: bool) {
        let mut b = self.inner.breaker.lock();
        b.half_open_probe = false;
        if ok {
            b.failures = 0;
            b.open_until = None;
        } else {
            b.failures += 1;
            if b.failures >= self.inner.opts.breaker_failures || b.open_until.is_some() {
                b.open_until = Some(Instant::now() + self.inner.opts.breaker_open_for);
            }
        }
    }

    /// The live connection, connecting if needed.
    async fn connection(&self) -> Result<Arc<Conn>, ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.is_alive()
        {
            return Ok(conn.clone());
        }
        let was_connected = slot.is_some();
        let conn = Conn::connect(&self.inner.addr, &self.inner.opts).await?;
        if was_connected {
            self.inner.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends one request and waits for its reply. Retries with backoff while the broker is
    /// unreachable (nothing was sent); never after the request went out.
    pub(crate) async fn request(&self, frame: Frame) -> Result<Frame, ClientError> {
        self.request_with(frame, None).await.map(|(reply, _)| reply)
    }

    pub(crate) async fn request_with(
        &self,
        frame: Frame,
        on_subscribed: Option<tokio::sync::mpsc::UnboundedSender<Frame>>,
    ) -> Result<(Frame, Arc<Conn>), ClientError> {
        let deadline = Instant::now() + self.inner.opts.request_timeout;
        let mut attempt = 0u32;
        // Why the last try failed: a breaker that opens on this call's own failures says
        // that, not only that it is open (a TLS handshake refused, say).
        let mut last: Option<String> = None;
        loop {
            if let Err(open) = self.breaker_admit() {
                return Err(last.map_or(open, ClientError::Unavailable));
            }
            let result = match self.connection().await {
                Ok(conn) => match tokio::time::timeout_at(
                    deadline.into(),
                    conn.call(&frame, on_subscribed.clone()),
                )
                .await
                {
                    Ok(result) => result.map(|reply| (reply, conn)),
                    Err(_) => Err(ClientError::Timeout),
                },
                Err(err) => Err(err),
            };
            match result {
                Ok((Frame::Error { code, message }, _)) => {
                    self.breaker_result(true);
                    return Err(ClientError::Server { code, message });
                }
                Ok(reply) => {
                    self.breaker_result(true);
                    return Ok(reply);
                }
                Err(ClientError::Unavailable(why)) => {
                    self.breaker_result(false);
                    let wait = backoff(&self.inner.opts, attempt);
                    attempt += 1;
                    if Instant::now() + wait >= deadline {
                        return Err(ClientError::Unavailable(why));
                    }
                    last = Some(why);
                    tokio::time::sleep(wait).await;
                }
                Err(err) => {
                    self.breaker_result(false);
                    return Err(err);
                }
            }
        }
    }
}

impl Client {
    /// Sends a request now (requests started one after another reach the broker in that
    /// order, on one connection) and returns a future for its reply. Waits for a
    /// connection while the broker is unreachable, as `request` does.
    pub(crate) async fn start_request(
        &self,
        frame: &Frame,
    ) -> Result<impl Future<Output = Result<Frame, ClientError>> + Send + use<>, ClientError> {
        let deadline = Instant::now() + self.inner.opts.request_timeout;
        let mut attempt = 0u32;
        let mut last: Option<String> = None;
        let wait = loop {
            if let Err(open) = self.breaker_admit() {
                return Err(last.map_or(open, ClientError::Unavailable));
            }
            let sent = match self.connection().await {
                Ok(conn) => conn.send_request(frame, None).await,
                Err(err) => Err(err),
            };
            match sent {
                Ok(wait) => break wait,
                Err(ClientError::Unavailable(why)) => {
                    self.breaker_result(false);
                    let pause = backoff(&self.inner.opts, attempt);
                    attempt += 1;
                    if Instant::now() + pause >= deadline {
                        return Err(ClientError::Unavailable(why));
                    }
                    last = Some(why);
                    tokio::time::sleep(pause).await;
                }
                Err(err) => {
                    self.breaker_result(false);
                    return Err(err);
                }
            }
        };
        let client = self.clone();
        Ok(async move {
            let reply = match tokio::time::timeout_at(deadline.into(), wait).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => {
                    client.breaker_result(false);
                    return Err(ClientError::Disconnected);
                }
                Err(_) => {
                    client.breaker_result(false);
                    return Err(ClientError::Timeout);
                }
            };
            client.breaker_result(true);
            match reply {
                Frame::Error { code, message } => Err(ClientError::Server { code, message }),
                reply => Ok(reply),
            }
        })
    }
}

/// Queues `item` for a producer's batcher at once when its buffer has room, and returns a
/// future that waits for room otherwise, then for the batcher's answer on `wait`: sends made
/// together keep their order, and holding many such futures costs no task each. Without an
/// item (refused before it was queued), the answer is already on `wait`.
pub(crate) fn enqueue<T: Send + 'static, R: Send + 'static>(
    tx: &tokio::sync::mpsc::Sender<T>,
    item: Option<T>,
    wait: tokio::sync::oneshot::Receiver<Result<R, ClientError>>,
) -> impl Future<Output = Result<R, ClientError>> + Send + 'static + use<T, R> {
    use tokio::sync::mpsc::error::TrySendError;
    let pending = match item.map(|item| tx.try_send(item)) {
        None | Some(Ok(())) => None,
        Some(Err(TrySendError::Full(item))) => Some(Ok(item)),
        Some(Err(TrySendError::Closed(_))) => Some(Err(())),
    };
    let tx = tx.clone();
    async move {
        let stopped = || ClientError::Unavailable("producer stopped".into());
        match pending {
            None => {}
            Some(Ok(item)) => tx.send(item).await.map_err(|_| stopped())?,
            Some(Err(())) => return Err(stopped()),
        }
        wait.await.map_err(|_| ClientError::Disconnected)?
    }
}

/// Lowercase hex of generated ids (a table lookup: this runs once per message).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Full jitter: uniform in [0, min(max, base * 2^attempt)].
pub(crate) fn backoff(opts: &ClientOptions, attempt: u32) -> Duration {
    let cap = opts
        .reconnect_base
        .saturating_mul(1u32 << attempt.min(20))
        .min(opts.reconnect_max);
    cap.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let opts = ClientOptions {
            reconnect_base: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(100),
            ..Default::default()
        };
        for attempt in 0..40 {
            let cap = Duration::from_millis(10)
                .saturating_mul(1 << attempt.min(20))
                .min(Duration::from_millis(100));
            assert!(backoff(&opts, attempt) <= cap);
        }
    }

    #[tokio::test]
    async fn the_breaker_opens_after_failures_and_fails_fast() {
        // Port 9 (discard) on loopback refuses connections here.
        let opts = ClientOptions {
            breaker_failures: 3,
            breaker_open_for: Duration::from_secs(3600),
            request_timeout: Duration::from_millis(300),
            reconnect_base: Duration::from_millis(1),
            reconnect_max: Duration::from_millis(5),
            ..Default::default()
        };
        let client = Client::new("127.0.0.1:9", opts);
        let first = client.ping().await;
        assert!(
            matches!(
                first,
                Err(ClientError::Unavailable(_)) | Err(ClientError::CircuitOpen)
            ),
            "{first:?}"
        );
        assert_eq!(client.breaker_state(), BreakerState::Open);
        assert_eq!(client.ping().await, Err(ClientError::CircuitOpen));
    }
}
