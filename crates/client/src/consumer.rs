//! Credit-based consumer: the broker pushes up to `prefetch` deliveries ahead of the
//! application; acks are batched behind the scenes; a lost connection resubscribes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tidewater_proto::Frame;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{Client, ClientError, backoff};

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Deliveries the broker may push ahead of the application.
    pub prefetch: u32,
    /// Lease per delivery; None = the queue's default.
    pub lease_ms: Option<u64>,
    /// Acks wait this long for company before they are sent.
    pub ack_linger: Duration,
    /// Acks per request, at most (capped at `MAX_ACK_BATCH`).
    pub ack_batch: usize,
    /// Keep extending the lease of every delivery the application holds (received, not yet
    /// acked or nacked), every third of `lease_ms`, so a slow handler does not lose its
    /// message to another consumer. Needs `lease_ms`.
    pub auto_extend: bool,
    /// Stop asking for deliveries after this many (credit never exceeds it): for a
    /// consumer that handles N messages and exits without leaving others leased.
    pub max_messages: Option<u64>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            prefetch: 1_000,
            lease_ms: None,
            ack_linger: Duration::from_millis(2),
            ack_batch: 1_000,
            max_messages: None,
            auto_extend: false,
        }
    }
}

/// A leased message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub receipt: String,
    pub body: Vec<u8>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub delivery_count: u32,
    /// The offset in its queue, or in its partition (a subscription's).
    pub offset: u64,
    pub published_at_ms: i64,
}

impl Delivery {
    /// The stream partition a subscription's delivery came from (its id is
    /// `<partition>-<offset>`); `None` for a queue's message, and for a subscription's
    /// merged or redriven ones.
    pub fn partition(&self) -> Option<u32> {
        let (partition, offset) = self.id.split_once('-')?;
        (offset.parse::<u64>().ok()? == self.offset)
            .then(|| partition.parse().ok())
            .flatten()
    }
}

enum AckCmd {
    Ack(String),
    Flush(oneshot::Sender<()>),
}

pub struct Consumer {
    client: Client,
    queue: String,
    rx: mpsc::Receiver<Result<Delivery, ClientError>>,
    consumed: Arc<AtomicU32>,
    credit_threshold: u32,
    wake: Arc<Notify>,
    acks: mpsc::UnboundedSender<AckCmd>,
    close: Option<oneshot::Sender<oneshot::Sender<()>>>,
    /// Receipts held by the application, when auto-extending.
    held: Option<Arc<Mutex<HashSet<String>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Consumer {
    pub(crate) fn start(client: Client, queue: String, opts: ConsumerOptions) -> Consumer {
        let prefetch = opts.prefetch.max(1);
        let (tx, rx) = mpsc::channel(prefetch as usize);
        let consumed = Arc::new(AtomicU32::new(0));
        let wake = Arc::new(Notify::new());
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (close, close_rx) = oneshot::channel();
        let subscriber = tokio::spawn(subscriber(
            client.clone(),
            queue.clone(),
            opts.clone(),
            tx,
            consumed.clone(),
            wake.clone(),
            close_rx,
        ));
        let mut tasks = vec![subscriber];
        let held = match (opts.auto_extend, opts.lease_ms) {
            (true, Some(lease_ms)) => {
                let held = Arc::new(Mutex::new(HashSet::new()));
                tasks.push(tokio::spawn(extender(
                    client.clone(),
                    queue.clone(),
                    lease_ms,
                    held.clone(),
                )));
                Some(held)
            }
            (true, None) => {
                tracing::warn!("auto_extend needs lease_ms; not extending");
                None
            }
            _ => None,
        };
        tasks.push(tokio::spawn(acker(
            client.clone(),
            queue.clone(),
            opts,
            ack_rx,
        )));
        Consumer {
            client,
            queue,
            rx,
            consumed,
            credit_threshold: (prefetch / 4).max(1),
            wake,
            acks,
            close: Some(close),
            held,
            tasks,
        }
    }

    /// The application is done with a delivery: stop extending it.
    fn release(&self, delivery: &Delivery) {
        if let Some(held) = &self.held {
            held.lock().remove(&delivery.receipt);
        }
    }

    /// The next delivery; None when the consumer ended (after an error it reported).
    pub async fn next(&mut self) -> Option<Result<Delivery, ClientError>> {
        let item = self.rx.recv().await?;
        if let (Some(held), Ok(delivery)) = (&self.held, &item) {
            held.lock().insert(delivery.receipt.clone());
        }
        if item.is_ok() && self.consumed.fetch_add(1, Ordering::SeqCst) + 1 >= self.credit_threshold
        {
            self.wake.notify_one();
        }
        Some(item)
    }

    /// Acks a delivery; acks are sent in batches. See `flush` to wait for them.
    pub fn ack(&self, delivery: &Delivery) {
        self.release(delivery);
        let _ = self.acks.send(AckCmd::Ack(delivery.receipt.clone()));
    }

    /// Waits until every ack given so far was answered by the broker.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.acks.send(AckCmd::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Stops the subscription, releases deliveries that were pushed but never handed to the
    /// application (so they are not left leased until their lease runs out), and sends
    /// pending acks. Released messages keep the delivery they were counted for.
    pub async fn close(self) {
        self.close_giving_back(&[]).await;
    }

    /// `close`, and gives back at once (no backoff) deliveries the application took but did
    /// not handle. The pushes stop first, so nothing given back comes back to this consumer.
    pub async fn close_giving_back(mut self, handed: &[&Delivery]) {
        for delivery in handed {
            self.release(delivery);
        }
        if let Some(close) = self.close.take() {
            let (done, wait) = oneshot::channel();
            if close.send(done).is_ok() {
                let _ = wait.await;
            }
        }
        self.rx.close();
        let mut unused: Vec<_> = handed.iter().map(|d| d.receipt.clone()).collect();
        while let Ok(Ok(delivery)) = self.rx.try_recv() {
            unused.push(delivery.receipt);
        }
        if !unused.is_empty() {
            let frame = Frame::Nack {
                queue: self.queue.clone(),
                delay_ms: 0,
                error: String::new(),
                receipts: unused.into(),
                overloaded: false,
            };
            let _ = self.client.request(frame).await;
        }
        self.flush().await;
    }

    /// Ends the lease without success: another delivery after `delay` (None = the queue's
    /// backoff), or the dead-letter queue once max deliveries is reached.
    pub async fn nack(
        &self,
        delivery: &Delivery,
        delay: Option<Duration>,
        error: &str,
    ) -> Result<bool, ClientError> {
        self.nack_with(delivery, delay, error, false).await
    }

    /// Gives the message back because the handler, or what is behind it, is overloaded:
    /// on a queue with adaptive throttling the broker slows its dispatch rate.
    pub async fn nack_overloaded(
        &self,
        delivery: &Delivery,
        delay: Option<Duration>,
    ) -> Result<bool, ClientError> {
        self.nack_with(delivery, delay, "overloaded", true).await
    }

    async fn nack_with(
        &self,
        delivery: &Delivery,
        delay: Option<Duration>,
        error: &str,
        overloaded: bool,
    ) -> Result<bool, ClientError> {
        self.release(delivery);
        let delay_ms = delay.map_or(-1, |d| d.as_millis() as i64);
        let frame = Frame::Nack {
            queue: self.queue.clone(),
            delay_ms,
            error: error.into(),
            receipts: [&delivery.receipt].into_iter().collect(),
            overloaded,
        };
        settled_one(self.client.request(frame).await?)
    }

    /// Extends the lease to `lease` from now; false when the lease already expired.
    pub async fn extend(&self, delivery: &Delivery, lease: Duration) -> Result<bool, ClientError> {
        let frame = Frame::Extend {
            queue: self.queue.clone(),
            lease_ms: lease.as_millis().max(1) as u64,
            receipts: [&delivery.receipt].into_iter().collect(),
        };
        settled_one(self.client.request(frame).await?)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // The subscription ends with the connection's task; unacked leases expire and the
        // messages come back. Queued acks are still sent by the acker before it stops.
        self.tasks[0].abort();
        if self.held.is_some() {
            self.tasks[1].abort(); // the extender
        }
    }
}

fn settled_one(reply: Frame) -> Result<bool, ClientError> {
    match reply {
        Frame::Settled { ok, .. } => Ok(ok == 1),
        other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

fn decode(d: tidewater_proto::WireDelivery) -> Result<Delivery, ClientError> {
    let record = tidewater_format::decode_record(&d.record, d.offset, d.published_at_ms)
        .map_err(|e| ClientError::Protocol(format!("bad record in a delivery: {e}")))?;
    let id = if record.flags & tidewater_format::RECORD_FLAG_GENERATED_ID != 0 {
        crate::hex(&record.id)
    } else {
        String::from_utf8_lossy(&record.id).into_owned()
    };
    let text = |b: bytes::Bytes| String::from_utf8_lossy(&b).into_owned();
    Ok(Delivery {
        id,
        receipt: d.receipt,
        body: record.body.to_vec(),
        key: record.key.map(text),
        headers: record
            .headers
            .into_iter()
            .map(|(k, v)| (text(k), text(v)))
            .collect(),
        delivery_count: d.delivery_count,
        offset: d.offset,
        published_at_ms: d.published_at_ms,
    })
}

async fn subscriber(
    client: Client,
    queue: String,
    opts: ConsumerOptions,
    out: mpsc::Sender<Result<Delivery, ClientError>>,
    consumed: Arc<AtomicU32>,
    wake: Arc<Notify>,
    mut close: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let prefetch = opts.prefetch.max(1);
    let mut attempt = 0;
    // Deliveries this consumer may still ask for (max_messages).
    let mut allowance = opts.max_messages.unwrap_or(u64::MAX);
    let grant = |wanted: u32, allowance: &mut u64| {
        let n = (wanted as u64).min(*allowance) as u32;
        *allowance -= n as u64;
        n
    };
    loop {
        // Credit for what the application does not hold yet.
        let buffered = (out.max_capacity() - out.capacity()) as u32;
        consumed.store(0, Ordering::SeqCst);
        let credit = grant(prefetch.saturating_sub(buffered).max(1), &mut allowance);
        if credit == 0 {
            // Everything allowed was asked for; wait for close.
            if let Ok(done) = close.await {
                let _ = done.send(());
            }
            return;
        }
        let (sink, mut frames) = mpsc::unbounded_channel();
        let subscribe = Frame::Subscribe {
            queue: queue.clone(),
            lease_ms: opts.lease_ms.unwrap_or(0),
            credit,
        };
        let (subscription, conn) = match client.request_with(subscribe, Some(sink)).await {
            Ok((Frame::Subscribed { subscription }, conn)) => (subscription, conn),
            Ok((other, _)) => {
                let _ = out
                    .send(Err(ClientError::Protocol(format!(
                        "unexpected reply {other:?}"
                    ))))
                    .await;
                return;
            }
            Err(err @ ClientError::Server { .. }) => {
                let _ = out.send(Err(err)).await;
                return;
            }
            Err(_) => {
                tokio::time::sleep(backoff(&client.inner.opts, attempt)).await;
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(Frame::Deliver { deliveries }) => {
                        for d in deliveries {
                            if out.send(decode(d)).await.is_err() {
                                return; // the consumer was dropped
                            }
                        }
                    }
                    Some(Frame::Error { code, message }) => {
                        let _ = out.send(Err(ClientError::Server { code, message })).await;
                        return;
                    }
                    Some(_) => {}
                    None => break, // connection lost: resubscribe
                },
                _ = wake.notified() => {
                    let n = grant(consumed.swap(0, Ordering::SeqCst), &mut allowance);
                    if n > 0 && conn.send(&Frame::Credit { subscription, credit: n }).await.is_err() {
                        break;
                    }
                }
                done = &mut close => {
                    // Stop the pushes; deliveries already on their way arrive before the
                    // reply (one ordered outbox), land in `out`, and close() releases them.
                    let _ = client.request(Frame::Unsubscribe { subscription }).await;
                    while let Ok(frame) = frames.try_recv() {
                        if let Frame::Deliver { deliveries } = frame {
                            for d in deliveries {
                                let _ = out.try_send(decode(d));
                            }
                        }
                    }
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }
}

/// Receipts per ack request at most: the server's default `max_receive_messages`.
pub const MAX_ACK_BATCH: usize = 10_000;

async fn acker(
    client: Client,
    queue: String,
    opts: ConsumerOptions,
    mut rx: mpsc::UnboundedReceiver<AckCmd>,
) {
    let mut receipts = Vec::new();
    let mut flushes = Vec::new();
    // The server refuses larger ack requests (its max_receive_messages, 10,000 by default).
    let batch_limit = opts.ack_batch.clamp(1, MAX_ACK_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let deadline = tokio::time::Instant::now() + opts.ack_linger;
        while let Some(cmd) = next.take() {
            match cmd {
                AckCmd::Ack(receipt) => receipts.push(receipt),
                AckCmd::Flush(done) => flushes.push(done),
            }
            if receipts.len() >= batch_limit || !flushes.is_empty() {
                break;
            }
            if let Ok(Some(cmd)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                next = Some(cmd);
            }
        }
        if !receipts.is_empty() {
            let sent = receipts.len() as u64;
            let frame = Frame::Ack {
                queue: queue.clone(),
                receipts: std::mem::take(&mut receipts).into(),
            };
            let failed = match client.request(frame).await {
                Ok(Frame::Settled { failed, .. }) => failed.len() as u64,
                Ok(_) | Err(_) => sent,
            };
            // A failed ack only means a redelivery later (at-least-once).
            client
                .inner
                .stats
                .ack_failures
                .fetch_add(failed, Ordering::Relaxed);
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Extends the leases of held deliveries every third of the lease; a receipt the broker
/// refuses (the lease was lost anyway) stops being extended.
async fn extender(client: Client, queue: String, lease_ms: u64, held: Arc<Mutex<HashSet<String>>>) {
    let period = Duration::from_millis((lease_ms / 3).max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let receipts: Vec<String> = held.lock().iter().cloned().collect();
        for chunk in receipts.chunks(1_000) {
            let frame = Frame::Extend {
                queue: queue.clone(),
                lease_ms,
                receipts: chunk.iter().collect(),
            };
            if let Ok(Frame::Settled { failed, .. }) = client.request(frame).await {
                let mut held = held.lock();
                for failure in failed {
                    if let Some(receipt) = chunk.get(failure.index as usize) {
                        held.remove(receipt);
                    }
                }
            }
        }
    }
}
