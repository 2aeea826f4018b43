//! A stream producer: records sent close together travel in one Kafka record batch per
//! partition; each `send` resolves to the record's partition and offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidewater_format::kafka::{KafkaBatchBuilder, NewKafkaRecord, partition_for_key};
use tidewater_proto::{Ack, Frame};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::{Client, ClientError};

#[derive(Debug, Clone)]
pub struct StreamProducerOptions {
    /// How long the first record of a batch waits for company.
    pub linger: Duration,
    /// Records per batch (the broker refuses more than its `max_batch_messages`).
    pub max_batch_records: usize,
    /// Bytes per batch (about).
    pub max_batch_bytes: usize,
    /// Batches awaiting their reply at once. Batches are appended in the order sent; only
    /// a batch resent after a throttle reply can land after later ones.
    pub max_in_flight_batches: usize,
    /// Durable (after fsync, the default) or written (after write(2)).
    pub ack: Ack,
    /// Records waiting to be batched; `send` waits when it is full.
    pub buffer: usize,
    /// Give up on a batch the broker keeps refusing with throttle replies after this long.
    pub max_throttle_wait: Duration,
    /// How old the stream's partition count may get before it is asked again (a stream's
    /// partitions can grow; keyed records move with them, as in Kafka).
    pub metadata_max_age: Duration,
}

impl Default for StreamProducerOptions {
    fn default() -> Self {
        StreamProducerOptions {
            linger: Duration::from_millis(1),
            max_batch_records: 5_000,
            max_batch_bytes: 1 << 20,
            max_in_flight_batches: 8,
            ack: Ack::Durable,
            buffer: 100_000,
            max_throttle_wait: Duration::from_secs(300),
            metadata_max_age: Duration::from_secs(30),
        }
    }
}

/// A record to produce to a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Header names are text; values are bytes or null.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's time (ms since the epoch); now when absent.
    pub timestamp: Option<i64>,
    /// The partition; else the key's (Kafka's partitioner), else one partition per batch.
    pub partition: Option<u32>,
}

impl Record {
    pub fn new(value: impl Into<Vec<u8>>) -> Record {
        Record {
            value: Some(value.into()),
            ..Record::default()
        }
    }
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Record {
        self.key = Some(key.into());
        self
    }
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Record {
        self.headers.push((name.into(), Some(value.into())));
        self
    }
    pub fn with_partition(mut self, partition: u32) -> Record {
        self.partition = Some(partition);
        self
    }
    pub fn with_timestamp(mut self, ms: i64) -> Record {
        self.timestamp = Some(ms);
        self
    }
    fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 4)
                .sum::<usize>()
            + 12
    }
}

/// Where a record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    pub offset: u64,
}

type Done = oneshot::Sender<Result<RecordMetadata, ClientError>>;

/// Produces to one stream. Dropping it stops batching once queued records are sent.
pub struct StreamProducer {
    tx: mpsc::Sender<(Record, Done)>,
}

impl StreamProducer {
    pub(crate) fn start(client: Client, stream: String, opts: StreamProducerOptions) -> Self {
        let (tx, rx) = mpsc::channel(opts.buffer.max(1));
        tokio::spawn(batcher(client, stream, opts, rx));
        StreamProducer { tx }
    }

    /// Queues a record now (when the buffer has room) and returns a future that resolves
    /// to its partition and offset once the broker acknowledged it at the producer's ack
    /// level. Records of one partition are appended in the order sent.
    pub fn send(
        &self,
        record: Record,
    ) -> impl Future<Output = Result<RecordMetadata, ClientError>> + Send + 'static {
        let (done, wait) = oneshot::channel();
        crate::enqueue(&self.tx, Some((record, done)), wait)
    }
}

/// One partition's batch being filled.
struct Open {
    builder: KafkaBatchBuilder,
    waiting: Vec<Done>,
    /// Its first record's arrival: sent once `linger` has passed since.
    since: Instant,
}

struct Batcher {
    client: Client,
    stream: String,
    opts: StreamProducerOptions,
    partitions: Option<(u32, Instant)>,
    sticky: u32,
    open: HashMap<u32, Open>,
    in_flight: Arc<Semaphore>,
}

async fn batcher(
    client: Client,
    stream: String,
    opts: StreamProducerOptions,
    mut rx: mpsc::Receiver<(Record, Done)>,
) {
    let mut b = Batcher {
        in_flight: Arc::new(Semaphore::new(opts.max_in_flight_batches.max(1))),
        client,
        stream,
        opts,
        partitions: None,
        sticky: fastrand::u32(..),
        open: HashMap::new(),
    };
    loop {
        let next = match b.open.values().map(|o| o.since).min() {
            None => rx.recv().await,
            Some(since) => match tokio::time::timeout_at(since + b.opts.linger, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    b.flush_due().await;
                    continue;
                }
            },
        };
        let Some((record, done)) = next else {
            b.flush_all().await;
            return;
        };
        b.place(record, done).await;
        // Take what is already queued without a timer each.
        while let Ok((record, done)) = rx.try_recv() {
            b.place(record, done).await;
        }
        b.flush_due().await;
    }
}

impl Batcher {
    /// The stream's partition count, asked again once it is older than `metadata_max_age`.
    async fn partitions(&mut self, refresh: bool) -> Result<u32, ClientError> {
        if let Some((n, at)) = self.partitions
            && !refresh
            && at.elapsed() < self.opts.metadata_max_age
        {
            return Ok(n);
        }
        let reply = self
            .client
            .request(Frame::StreamMetadata {
                stream: self.stream.clone(),
            })
            .await?;
        match reply {
            Frame::StreamInfo { partitions } if !partitions.is_empty() => {
                let n = u32::try_from(partitions.len()).unwrap_or(u32::MAX);
                self.partitions = Some((n, Instant::now()));
                Ok(n)
            }
            other => Err(ClientError::Protocol(format!(
                "unexpected reply to StreamMetadata: {other:?}"
            ))),
        }
    }

    async fn place(&mut self, record: Record, done: Done) {
        let partitions = match self.partitions(false).await {
            Ok(n) => n,
            Err(err) => {
                let _ = done.send(Err(err));
                return;
            }
        };
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p >= partitions => {
                // The stream may have grown since the count was taken.
                match self.partitions(true).await {
                    Ok(n) if p < n => p,
                    Ok(n) => {
                        let _ = done.send(Err(ClientError::Server {
                            code: "partition_not_found".into(),
                            message: format!(
                                "stream '{}' has no partition {p} (its partitions are 0..={})",
                                self.stream,
                                n - 1
                            ),
                        }));
                        return;
                    }
                    Err(err) => {
                        let _ = done.send(Err(err));
                        return;
                    }
                }
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => self.sticky % partitions,
        };
        let headers: Vec<(&[u8], Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_deref()))
            .collect();
        let size = record.size();
        let full = {
            let open = self.open.entry(partition).or_insert_with(|| Open {
                builder: KafkaBatchBuilder::new(),
                waiting: Vec::new(),
                since: Instant::now(),
            });
            !open.waiting.is_empty()
                && open.builder.encoded_len() + size > self.opts.max_batch_bytes
        };
        if full {
            self.send(partition).await;
            self.open.insert(
                partition,
                Open {
                    builder: KafkaBatchBuilder::new(),
                    waiting: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
        let open = self.open.get_mut(&partition).expect("inserted above");
        open.builder.push(&NewKafkaRecord {
            key: record.key.as_deref(),
            value: record.value.as_deref(),
            headers: &headers,
            timestamp: record.timestamp.unwrap_or_else(now_ms),
        });
        open.waiting.push(done);
        if open.waiting.len() >= self.opts.max_batch_records.max(1)
            || open.builder.encoded_len() >= self.opts.max_batch_bytes
        {
            self.send(partition).await;
        }
    }

    async fn flush_due(&mut self) {
        let due: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, o)| o.since.elapsed() >= self.opts.linger)
            .map(|(p, _)| *p)
            .collect();
        for partition in due {
            self.send(partition).await;
        }
    }

    async fn flush_all(&mut self) {
        let all: Vec<u32> = self.open.keys().copied().collect();
        for partition in all {
            self.send(partition).await;
        }
    }

    /// Sends a partition's batch: the frame is queued for the socket here, in order, and
    /// the reply awaited in a task of its own.
    async fn send(&mut self, partition: u32) {
        let Some(open) = self.open.remove(&partition) else {
            return;
        };
        if open.waiting.is_empty() {
            return;
        }
        if partition == self.sticky % self.partitions.map_or(1, |(n, _)| n) {
            // Keyless records move on to another partition with each batch (KIP-480).
            self.sticky = self.sticky.wrapping_add(1);
        }
        let frame = Frame::StreamProduce {
            stream: self.stream.clone(),
            partition,
            ack: self.opts.ack,
            batch: open.builder.finish(),
        };
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let waiting = open.waiting;
        let reply = self.client.start_request(&frame).await;
        let (client, opts) = (self.client.clone(), self.opts.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut reply = reply;
            let result = loop {
                let answer = match reply {
                    Ok(wait) => wait.await,
                    Err(err) => Err(err),
                };
                match answer {
                    Ok(Frame::Produced { base_offset, .. }) => break Ok(base_offset),
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
                        reply = client.start_request(&frame).await;
                    }
                    Ok(other) => {
                        break Err(ClientError::Protocol(format!(
                            "unexpected reply to StreamProduce: {other:?}"
                        )));
                    }
                    Err(err) => break Err(err),
                }
            };
            for (i, done) in waiting.into_iter().enumerate() {
                let _ = done.send(result.clone().map(|base| RecordMetadata {
                    partition,
                    offset: base + i as u64,
                }));
            }
            drop(permit);
        });
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
