//! Batching producer: messages sent close together travel in one record batch.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidewater_format::{BatchBuilder, NewRecord};
use tidewater_proto::{Ack, Frame};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::{Client, ClientError, hex};

#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// How long the first message of a batch waits for company.
    pub linger: Duration,
    pub max_batch_messages: usize,
    pub max_batch_bytes: usize,
    /// Batches awaiting their reply at once. Batches are appended in send order; only a
    /// batch resent after a throttle reply can land after later ones (set 1 for strict order
    /// under backpressure too).
    pub max_in_flight_batches: usize,
    /// Durable (after fsync, the default) or written (after write(2)).
    pub ack: Ack,
    /// Messages waiting to be batched; `send` waits when it is full.
    pub buffer: usize,
    /// Give up on a batch the broker keeps refusing with throttle replies after this long.
    pub max_throttle_wait: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            linger: Duration::from_millis(1),
            max_batch_messages: 1_000,
            max_batch_bytes: 1 << 20,
            max_in_flight_batches: 8,
            ack: Ack::Durable,
            buffer: 100_000,
            max_throttle_wait: Duration::from_secs(300),
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// Your id for it (at most 255 bytes); a random one is generated otherwise.
    pub id: Option<String>,
    pub body: Vec<u8>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Deliver no earlier than this time (ms since the epoch); 0 = at once.
    pub deliver_at_ms: i64,
    /// This message's ack level; None = the producer's (`ProducerOptions::ack`).
    pub ack: Option<Ack>,
}

impl Message {
    /// Acknowledge this message at `ack` (durable: after fsync; written: after write(2)).
    pub fn with_ack(mut self, ack: Ack) -> Message {
        self.ack = Some(ack);
        self
    }

    pub fn new(body: impl Into<Vec<u8>>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.key = Some(key.into());
        self
    }
    pub fn with_id(mut self, id: impl Into<String>) -> Message {
        self.id = Some(id.into());
        self
    }
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Deliver no earlier than `delay` from now.
    pub fn with_delay(mut self, delay: Duration) -> Message {
        self.deliver_at_ms = now_ms() + delay.as_millis() as i64;
        self
    }
    /// Adds a random delay of up to `jitter` (after any delay), to spread bursts such as
    /// every cron job firing on the hour.
    pub fn with_jitter(mut self, jitter: Duration) -> Message {
        let base = if self.deliver_at_ms > 0 {
            self.deliver_at_ms
        } else {
            now_ms()
        };
        self.deliver_at_ms = base + fastrand::i64(0..=jitter.as_millis() as i64);
        self
    }
    /// Priority level (0 = lowest) on queues with several `priority_levels`. Sent as the
    /// reserved header `tidewater-priority`.
    pub fn with_priority(self, priority: u8) -> Message {
        self.with_header("tidewater-priority", priority.to_string())
    }
    /// The producer this message counts against (quotas, fairness). Sent as the reserved
    /// header `tidewater-tenant`.
    pub fn with_tenant(self, tenant: impl Into<String>) -> Message {
        self.with_header("tidewater-tenant", tenant)
    }
    /// Drop (or dead-letter, as the queue says) the message if not delivered within `ttl`
    /// of its publish. Sent as the reserved header `tidewater-ttl-ms`.
    pub fn with_ttl(self, ttl: Duration) -> Message {
        self.with_header("tidewater-ttl-ms", ttl.as_millis().to_string())
    }
    fn size(&self) -> usize {
        self.body.len()
            + self.key.as_ref().map_or(0, |k| k.len())
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 32
    }
}

type Pending = (Message, oneshot::Sender<Result<String, ClientError>>);

/// Publishes to one queue. Dropping it stops batching once queued messages are sent.
pub struct Producer {
    tx: mpsc::Sender<Pending>,
}

impl Producer {
    pub(crate) fn start(client: Client, queue: String, opts: ProducerOptions) -> Producer {
        let (tx, rx) = mpsc::channel(opts.buffer.max(1));
        tokio::spawn(batcher(client, queue, opts, rx));
        Producer { tx }
    }

    /// Queues a message now (when the buffer has room) and returns a future that resolves
    /// to its id once the broker acknowledged it at the producer's ack level. Holding many
    /// such futures costs no task each; they travel in shared batches.
    pub fn send(
        &self,
        message: Message,
    ) -> impl Future<Output = Result<String, ClientError>> + Send + 'static {
        let invalid = if message
            .id
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > 255)
        {
            Some("ids are 1 to 255 bytes")
        } else if message
            .key
            .as_ref()
            .is_some_and(|k| k.len() > u16::MAX as usize)
        {
            Some("keys are at most 65535 bytes")
        } else {
            None
        };
        let (done, wait) = oneshot::channel();
        let item = match invalid {
            Some(why) => {
                // Refused here: answered at once, never queued.
                let _ = done.send(Err(ClientError::Server {
                    code: "invalid_message".into(),
                    message: why.into(),
                }));
                None
            }
            None => Some((message, done)),
        };
        crate::enqueue(&self.tx, item, wait)
    }
}

async fn batcher(
    client: Client,
    queue: String,
    opts: ProducerOptions,
    mut rx: mpsc::Receiver<Pending>,
) {
    let permits = Arc::new(Semaphore::new(opts.max_in_flight_batches.max(1)));
    while let Some(first) = rx.recv().await {
        let mut bytes = first.0.size();
        let mut batch = vec![first];
        let deadline = Instant::now() + opts.linger;
        while batch.len() < opts.max_batch_messages && bytes < opts.max_batch_bytes {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(next)) => {
                    bytes += next.0.size();
                    batch.push(next);
                }
                _ => break,
            }
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (client, queue, opts) = (client.clone(), queue.clone(), opts.clone());
        tokio::spawn(async move {
            send_batch(&client, queue, &opts, batch).await;
            drop(permit);
        });
    }
}

fn generated_id() -> [u8; 16] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&now.to_be_bytes()[2..]);
    id[6..14].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    id[14..].copy_from_slice(&fastrand::u16(..).to_le_bytes());
    id
}

/// Sends a batch; messages asking for different ack levels travel in separate frames.
async fn send_batch(client: &Client, queue: String, opts: &ProducerOptions, batch: Vec<Pending>) {
    if batch
        .iter()
        .all(|(m, _)| m.ack.unwrap_or(opts.ack) == opts.ack)
    {
        return send_frame(client, queue, opts.ack, opts, batch).await;
    }
    let (same, other): (Vec<Pending>, Vec<Pending>) = batch
        .into_iter()
        .partition(|(m, _)| m.ack.unwrap_or(opts.ack) == opts.ack);
    let other_ack = if opts.ack == Ack::Durable {
        Ack::Written
    } else {
        Ack::Durable
    };
    if !same.is_empty() {
        send_frame(client, queue.clone(), opts.ack, opts, same).await;
    }
    send_frame(client, queue, other_ack, opts, other).await;
}

async fn send_frame(
    client: &Client,
    queue: String,
    ack: Ack,
    opts: &ProducerOptions,
    batch: Vec<Pending>,
) {
    let mut builder = BatchBuilder::new(0, 0);
    let mut ids = Vec::with_capacity(batch.len());
    for (message, _) in &batch {
        let generated;
        let (id, is_generated): (&[u8], bool) = match &message.id {
            Some(id) => (id.as_bytes(), false),
            None => {
                generated = generated_id();
                (&generated, true)
            }
        };
        ids.push(if is_generated {
            hex(id)
        } else {
            message.id.clone().unwrap_or_default()
        });
        builder.push(&NewRecord {
            id,
            generated_id: is_generated,
            key: message.key.as_deref().map(str::as_bytes),
            headers: message
                .headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                .collect(),
            deliver_at_ms: message.deliver_at_ms,
            body: &message.body,
        });
    }
    let bytes = builder.finish();
    let started = Instant::now();
    let result = loop {
        let frame = Frame::Produce {
            queue: queue.clone(),
            ack,
            batch: bytes.clone(),
        };
        match client.request(frame).await {
            Ok(Frame::Produced { .. }) => break Ok(()),
            // Refused whole, nothing stored: waiting and resending cannot duplicate.
            Ok(Frame::Throttle {
                retry_after_ms,
                code,
                message,
            }) => {
                client.inner.stats.throttled.fetch_add(1, Ordering::Relaxed);
                let wait = Duration::from_millis(retry_after_ms.max(1));
                if started.elapsed() + wait > opts.max_throttle_wait {
                    break Err(ClientError::Server { code, message });
                }
                tokio::time::sleep(wait).await;
            }
            Ok(other) => {
                break Err(ClientError::Protocol(format!(
                    "unexpected reply to produce: {other:?}"
                )));
            }
            Err(err) => break Err(err),
        }
    };
    for ((_, done), id) in batch.into_iter().zip(ids) {
        let _ = done.send(result.clone().map(|()| id));
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
