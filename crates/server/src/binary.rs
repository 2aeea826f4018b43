//! The binary protocol listener (docs/protocol.md): one reader loop and one writer task per
//! connection; requests are served concurrently and answered by request id (pipelining).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use tidewater_core::{AckLevel, Broker, BrokerError, ErrorCode, NackReason};
use tidewater_proto::{
    Ack, DEFAULT_MAX_FRAME, DeliverWriter, Failure, Frame, PROTOCOL_VERSION, ProtoError,
    SUBSCRIPTION_ID_BIT, decode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

/// Requests one connection may have in flight; beyond, the server stops reading (TCP
/// backpressure) until some finish.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// Subscriptions per connection.
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 64;
/// Deliveries per frame.
const MAX_DELIVER_BATCH: u32 = 1000;
/// Outgoing frames queued per connection before handlers wait for the socket.
const OUTBOX_FRAMES: usize = 1024;

pub async fn serve(
    listener: TcpListener,
    broker: Arc<OnceLock<Broker>>,
    max_frame: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (broker, shutdown) = (broker.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        if let Err(err) = connection(stream, broker, max_frame, shutdown).await {
                            tracing::debug!(%peer, error = %err, "binary connection ended");
                        }
                    });
                }
                Err(err) => tracing::warn!(error = %err, "accept failed"),
            },
            _ = shutdown.changed() => return,
        }
    }
}

fn encode(frame: &Frame, request_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    frame.encode(request_id, &mut out);
    out
}

/// A broker error as a reply frame: backpressure becomes `Throttle`, the rest `Error`.
fn error_frame(err: &BrokerError) -> Frame {
    match (err.code, err.retry_after_ms) {
        (
            ErrorCode::QueueFull
            | ErrorCode::Overloaded
            | ErrorCode::DiskFull
            | ErrorCode::QuotaExceeded,
            Some(ms),
        ) => Frame::Throttle {
            retry_after_ms: ms,
            code: err.code.as_str().into(),
            message: err.message.clone(),
        },
        _ => Frame::Error {
            code: err.code.as_str().into(),
            message: err.message.clone(),
        },
    }
}

struct Subscription {
    credit: AtomicU32,
    wake: Notify,
}

async fn connection(
    mut stream: TcpStream,
    broker: Arc<OnceLock<Broker>>,
    max_frame: usize,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTBOX_FRAMES);
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut greeted = false;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let mut subscriptions: HashMap<u32, (Arc<Subscription>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut next_subscription = SUBSCRIPTION_ID_BIT | 1;
    let mut tasks = tokio::task::JoinSet::new();

    let result: std::io::Result<()> = async {
        loop {
            // Decode every complete frame in the buffer.
            let mut used = 0;
            loop {
                let decoded = match decode_frame(&buf[used..], max_frame) {
                    Ok(Some(decoded)) => decoded,
                    Ok(None) => break,
                    Err(err) => {
                        let code = match err {
                            ProtoError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                            _ => ErrorCode::InvalidFrame,
                        };
                        let frame = Frame::Error { code: code.as_str().into(), message: err.to_string() };
                        return close_with(&tx, &mut rx, &mut writer, frame).await;
                    }
                };
                let (frame, request_id, len) = decoded;
                used += len;
                if !greeted {
                    match frame {
                        Frame::Hello { version: PROTOCOL_VERSION, .. } => {
                            greeted = true;
                            let ok = Frame::HelloOk { version: PROTOCOL_VERSION, max_frame: max_frame as u32, server: format!("tidewater {}", env!("CARGO_PKG_VERSION")) };
                            writer.write_all(&encode(&ok, request_id)).await?;
                            continue;
                        }
                        Frame::Hello { version, .. } => {
                            let frame = Frame::Error {
                                code: ErrorCode::UnsupportedVersion.as_str().into(),
                                message: format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
                            };
                            return close_with(&tx, &mut rx, &mut writer, frame).await;
                        }
                        _ => {
                            let frame = Frame::Error { code: ErrorCode::InvalidFrame.as_str().into(), message: "the first frame must be Hello".into() };
                            return close_with(&tx, &mut rx, &mut writer, frame).await;
                        }
                    }
                }
                let Some(broker) = broker.get().cloned() else {
                    let frame = Frame::Error { code: ErrorCode::NotReady.as_str().into(), message: "the server is still recovering".into() };
                    let _ = tx.send(encode(&frame, request_id)).await;
                    continue;
                };
                match frame {
                    Frame::Subscribe { queue, lease_ms, credit } => {
                        if subscriptions.len() >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
                            let err = BrokerError::invalid(format!("at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions per connection"));
                            let _ = tx.send(encode(&error_frame(&err), request_id)).await;
                            continue;
                        }
                        if let Err(err) = broker.get_queue(&queue) {
                            let _ = tx.send(encode(&error_frame(&err), request_id)).await;
                            continue;
                        }
                        let id = next_subscription;
                        next_subscription = SUBSCRIPTION_ID_BIT | next_subscription.wrapping_add(1);
                        let sub = Arc::new(Subscription { credit: AtomicU32::new(credit), wake: Notify::new() });
                        let _ = tx.send(encode(&Frame::Subscribed { subscription: id }, request_id)).await;
                        let lease = (lease_ms > 0).then_some(lease_ms);
                        let task = tokio::spawn(subscription(broker, queue, lease, id, sub.clone(), tx.clone()));
                        subscriptions.insert(id, (sub, task));
                    }
                    Frame::Credit { subscription, credit } => {
                        if let Some((sub, _)) = subscriptions.get(&subscription) {
                            sub.credit.fetch_add(credit, Ordering::SeqCst);
                            sub.wake.notify_one();
                        }
                    }
                    Frame::Unsubscribe { subscription } => {
                        if let Some((_, task)) = subscriptions.remove(&subscription) {
                            task.abort();
                        }
                        let _ = tx.send(encode(&Frame::Ok, request_id)).await;
                    }
                    Frame::Ping => {
                        let _ = tx.send(encode(&Frame::Pong, request_id)).await;
                    }
                    Frame::Produce { queue, ack, batch } => {
                        // Submitted here, in frame order, so a connection's batches are
                        // appended in the order they were sent; only the wait is concurrent.
                        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
                        let level = if ack == Ack::Written { AckLevel::Written } else { AckLevel::Durable };
                        match broker.start_publish_batch(&queue, batch, level) {
                            Ok(appended) => {
                                let tx = tx.clone();
                                tasks.spawn(async move {
                                    let reply = match appended.await {
                                        Ok((base_offset, count)) => Frame::Produced { base_offset, count },
                                        Err(err) => error_frame(&err),
                                    };
                                    let _ = tx.send(encode(&reply, request_id)).await;
                                    drop(permit);
                                });
                            }
                            Err(err) => {
                                let _ = tx.send(encode(&error_frame(&err), request_id)).await;
                            }
                        }
                    }
                    Frame::Ack { .. } | Frame::Nack { .. } | Frame::Extend { .. } => {
                        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
                        let tx = tx.clone();
                        tasks.spawn(async move {
                            let reply = request(&broker, frame).await;
                            let _ = tx.send(encode(&reply, request_id)).await;
                            drop(permit);
                        });
                    }
                    other => {
                        let frame = Frame::Error {
                            code: ErrorCode::InvalidFrame.as_str().into(),
                            message: format!("frame kind 0x{:02x} is sent by servers, not clients", other.kind()),
                        };
                        return close_with(&tx, &mut rx, &mut writer, frame).await;
                    }
                }
            }
            buf.drain(..used);
            while tasks.try_join_next().is_some() {}
            // Flush queued replies, then wait for more bytes or more replies.
            tokio::select! {
                read = reader.read_buf(&mut buf) => {
                    if read? == 0 {
                        return Ok(());
                    }
                }
                Some(first) = rx.recv() => {
                    let mut out = first;
                    while out.len() < (1 << 20) {
                        match rx.try_recv() {
                            Ok(more) => out.extend_from_slice(&more),
                            Err(_) => break,
                        }
                    }
                    writer.write_all(&out).await?;
                }
                _ = shutdown.changed() => {
                    let frame = Frame::Error { code: ErrorCode::ShuttingDown.as_str().into(), message: "the server is shutting down".into() };
                    return close_with(&tx, &mut rx, &mut writer, frame).await;
                }
            }
        }
    }
    .await;
    for (_, (_, task)) in subscriptions {
        task.abort();
    }
    tasks.abort_all();
    let _ = stream.shutdown().await;
    result
}

/// Sends what is queued, then a final connection-level error frame (request id 0).
async fn close_with(
    tx: &mpsc::Sender<Vec<u8>>,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    writer: &mut tokio::net::tcp::WriteHalf<'_>,
    frame: Frame,
) -> std::io::Result<()> {
    let _ = tx;
    while let Ok(queued) = rx.try_recv() {
        writer.write_all(&queued).await?;
    }
    writer.write_all(&encode(&frame, 0)).await?;
    writer.flush().await
}

async fn request(broker: &Broker, frame: Frame) -> Frame {
    // Failures come in receipt order: find each one's index from the previous one on.
    let settled = |reply: tidewater_core::SettleReply, receipts: &[&str]| {
        let mut from = 0;
        let failed = reply
            .failed
            .iter()
            .map(|f| {
                let at = receipts[from..]
                    .iter()
                    .position(|r| *r == f.receipt)
                    .map(|i| from + i)
                    .or_else(|| receipts.iter().position(|r| *r == f.receipt))
                    .unwrap_or(0);
                from = at + 1;
                Failure {
                    index: at as u32,
                    code: f.code.into(),
                }
            })
            .collect();
        Frame::Settled {
            ok: reply.ok as u32,
            failed,
        }
    };
    let result = match frame {
        Frame::Ack { queue, receipts } => {
            let receipts: Vec<&str> = receipts.iter().collect();
            broker
                .ack(&queue, &receipts)
                .await
                .map(|r| settled(r, &receipts))
        }
        Frame::Nack {
            queue,
            delay_ms,
            error,
            receipts,
            overloaded,
        } => {
            let delay = (delay_ms >= 0).then_some(delay_ms as u64);
            let error = (!error.is_empty()).then_some(error.as_str());
            let reason = if overloaded {
                NackReason::Overloaded
            } else {
                NackReason::Failed
            };
            let receipts: Vec<&str> = receipts.iter().collect();
            broker
                .nack(&queue, &receipts, delay, error, reason)
                .await
                .map(|r| settled(r, &receipts))
        }
        Frame::Extend {
            queue,
            lease_ms,
            receipts,
        } => {
            let lease = (lease_ms > 0).then_some(lease_ms);
            let receipts: Vec<&str> = receipts.iter().collect();
            broker
                .extend(&queue, &receipts, lease)
                .map(|r| settled(r, &receipts))
        }
        _ => unreachable!("only requests are passed here"),
    };
    result.unwrap_or_else(|err| error_frame(&err))
}

/// Pushes deliveries while the consumer has credit; ends with an error frame if the queue
/// goes away.
async fn subscription(
    broker: Broker,
    queue: String,
    lease_ms: Option<u64>,
    id: u32,
    sub: Arc<Subscription>,
    tx: mpsc::Sender<Vec<u8>>,
) {
    loop {
        let credit = sub.credit.load(Ordering::SeqCst);
        if credit == 0 {
            sub.wake.notified().await;
            continue;
        }
        if broker.is_closing() {
            return;
        }
        let max = credit.min(MAX_DELIVER_BATCH) as usize;
        match broker.receive(&queue, max, 1_000, lease_ms).await {
            Ok(deliveries) if deliveries.is_empty() => continue,
            Ok(deliveries) => {
                sub.credit
                    .fetch_sub(deliveries.len() as u32, Ordering::SeqCst);
                // Records are encoded straight into the frame (sized up front).
                let size = deliveries
                    .iter()
                    .map(|d| DeliverWriter::overhead(&d.receipt) + d.record.encoded_len())
                    .sum();
                let mut frame = DeliverWriter::new(id, size);
                for d in &deliveries {
                    let record = &d.record;
                    frame.push(
                        &d.receipt,
                        d.delivery_count,
                        record.offset,
                        record.published_at_ms,
                        |buf| record.encode(buf),
                    );
                }
                if tx.send(frame.finish()).await.is_err() {
                    return; // connection gone: the leases expire and the messages come back
                }
            }
            Err(err) => {
                let _ = tx.send(encode(&error_frame(&err), id)).await;
                return;
            }
        }
    }
}

/// Default largest frame.
pub const MAX_FRAME_DEFAULT: usize = DEFAULT_MAX_FRAME;
