//! The binary protocol listener (docs/protocol.md).
//!
//! Each connection has a reader (the connection's task: decodes requests and starts them)
//! and a writer task, the only drain of the connection's outbox, which waits on nothing but
//! the socket. The outbox is bounded in bytes: whoever queues a reply (the reader for inline
//! replies, request tasks, subscriptions) waits for room, and room comes only from the
//! writer. So a client that pipelines any number of requests gets every reply, and the only
//! backpressure is TCP's when the client itself stops reading.
//!
//! Every connection is bounded: a cap per listener, a handshake deadline, a small frame
//! limit until `Hello`, an idle timeout, requests in flight, bytes queued to write, and
//! what subscriptions lease (only what the outbox can take).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tidewater_core::broker::FetchWant;
use tidewater_core::{AckLevel, Broker, BrokerError, ErrorCode, NackReason};
use tidewater_proto::{
    Ack, CommittedOffset, DEFAULT_MAX_FRAME, DeliverWriter, Failure, FetchPartition, FetchedWriter,
    Frame, FrameCode, PROTOCOL_VERSION, PartitionRange, SUBSCRIPTION_ID_BIT, StreamPartition,
    decode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::auth::{Caller, Guard, frame_needs};
use crate::errors::Code;
use crate::listener::{Bounds, Stats, accept_loop};

/// How often a connection with authentication on checks that its key still holds (not
/// revoked, not expired) and its subscriptions are still granted, when no frame arrives.
pub const AUTH_RECHECK: Duration = Duration::from_secs(1);

/// Requests one connection may have in flight; beyond, the server stops reading (TCP
/// backpressure) until some finish.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// Subscriptions per connection.
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 64;
/// Fetches one connection may have waiting at once (each may hold a reply of up to half
/// the outbox); one fetch names every partition a consumer reads.
const MAX_FETCHES_PER_CONNECTION: usize = 16;
/// Deliveries per frame.
const MAX_DELIVER_BATCH: usize = 1000;
/// Largest frame before `Hello` succeeds (a Hello is a few dozen bytes).
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
/// How long a closing connection may take to hand its last replies to the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// The writer coalesces queued frames into writes of about this size.
const WRITE_CHUNK: usize = 1 << 20;

/// Default largest frame.
pub const MAX_FRAME_DEFAULT: usize = DEFAULT_MAX_FRAME;

/// The listener's limits (docs/configuration.md, `[protocol]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub outbox_bytes: usize,
    /// How long shutdown waits for connections to finish what they started.
    pub shutdown_timeout: Duration,
}

pub async fn serve(
    listener: TcpListener,
    broker: Arc<OnceLock<Broker>>,
    limits: Limits,
    guard: Arc<Guard>,
    tls: Option<Arc<crate::tls::Tls>>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) {
    let bounds = Bounds {
        name: "binary protocol",
        max_connections: limits.max_connections,
        shutdown_timeout: limits.shutdown_timeout,
    };
    let limits = Arc::new(limits);
    let tls_on = tls.is_some();
    let serve_one = {
        let (stats, shutdown) = (stats.clone(), shutdown.clone());
        move |stream: TcpStream, peer: SocketAddr| {
            let (broker, limits, guard, stats, shutdown, tls) = (
                broker.clone(),
                limits.clone(),
                guard.clone(),
                stats.clone(),
                shutdown.clone(),
                tls.clone(),
            );
            async move {
                let ended = match tls {
                    None => {
                        let who = Who {
                            peer,
                            certificate: None,
                        };
                        connection(stream, who, broker, &limits, &guard, &stats, shutdown).await
                    }
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => {
                            let who = Who {
                                peer,
                                certificate: crate::tls::peer_principal(&stream),
                            };
                            connection(stream, who, broker, &limits, &guard, &stats, shutdown).await
                        }
                        Err(err) => {
                            tracing::debug!(%peer, error = %err, "binary protocol TLS handshake failed");
                            return;
                        }
                    },
                };
                match ended {
                    End::Told(frame) => {
                        tracing::debug!(%peer, ?frame, "binary connection closed by the server");
                    }
                    end => tracing::debug!(%peer, ?end, "binary connection ended"),
                }
            }
        }
    };
    let refusal: fn(&TcpStream, usize) = if tls_on { |_, _| {} } else { refuse };
    accept_loop(listener, bounds, stats, shutdown, refusal, serve_one).await;
}

/// Tells a connection over the cap why it is closed, without waiting for it.
fn refuse(stream: &TcpStream, max: usize) {
    let frame = Frame::Error {
        code: ErrorCode::Overloaded.as_str().into(),
        message: format!(
            "the server holds its maximum of {max} binary protocol connections (max_connections); retry later or reuse a connection"
        ),
    };
    // A small frame fits in an empty socket buffer; if it does not, the close says enough.
    let _ = stream.try_write(&encode(&frame, 0));
}

fn ack_level(ack: Ack) -> AckLevel {
    match ack {
        Ack::Written => AckLevel::Written,
        Ack::Durable => AckLevel::Durable,
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

fn connection_error(code: impl Into<Code>, message: impl Into<String>) -> Frame {
    Frame::Error {
        code: code.into().as_str().into(),
        message: message.into(),
    }
}

/// The connection is gone (its writer ended).
#[derive(Debug)]
struct Closed;

/// Frames waiting for the writer, bounded in bytes: a frame takes its size in permits (at
/// least 1, at most the whole capacity) and gives them back once written.
#[derive(Clone)]
struct Outbox {
    frames: mpsc::UnboundedSender<(Vec<u8>, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
    capacity: usize,
}

impl Outbox {
    fn permits(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.clamp(1, self.capacity)).unwrap_or(u32::MAX)
    }

    /// Queues a frame once there is room for it.
    async fn send(&self, frame: Vec<u8>) -> Result<(), Closed> {
        let permit = self
            .room
            .clone()
            .acquire_many_owned(self.permits(frame.len()))
            .await
            .map_err(|_| Closed)?;
        self.frames.send((frame, permit)).map_err(|_| Closed)
    }

    async fn reply(&self, frame: &Frame, request_id: u32) -> Result<(), Closed> {
        self.send(encode(frame, request_id)).await
    }

    /// Waits until at least `bytes` are free (without taking them).
    async fn wait_for_room(&self, bytes: usize) -> Result<(), Closed> {
        let permit = self
            .room
            .acquire_many(self.permits(bytes))
            .await
            .map_err(|_| Closed)?;
        drop(permit);
        Ok(())
    }
}

/// The only drain of the outbox: writes what is queued, gives the room back, and ends the
/// socket (FIN) when every sender is gone. A client that takes nothing for `stalled` is
/// cut off (its connection fails: whoever waits for room is woken with `Closed`).
async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::UnboundedReceiver<(Vec<u8>, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
    stalled: Duration,
) {
    let mut held = Vec::new();
    while let Some((first, permit)) = frames.recv().await {
        let mut out = first;
        held.push(permit);
        while out.len() < WRITE_CHUNK {
            match frames.try_recv() {
                Ok((more, permit)) => {
                    out.extend_from_slice(&more);
                    held.push(permit);
                }
                Err(_) => break,
            }
        }
        match tokio::time::timeout(stalled, writer.write_all(&out)).await {
            Ok(Ok(())) => held.clear(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Wake and fail anyone waiting for room: nothing will be written any more.
    room.close();
    let _ = writer.shutdown().await;
}

struct Subscription {
    credit: AtomicU32,
    wake: Notify,
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed its side; what it asked for was answered.
    Eof,
    /// The socket failed or the writer is gone.
    Broken,
    /// A protocol violation, a timeout or shutdown: told with a final error frame.
    Told(Frame),
}

/// Who is at the other end of a connection.
struct Who {
    peer: SocketAddr,
    /// The principal its verified TLS client certificate names.
    certificate: Option<String>,
}

async fn connection<S>(
    stream: S,
    who: Who,
    broker: Arc<OnceLock<Broker>>,
    limits: &Limits,
    guard: &Guard,
    stats: &Stats,
    mut shutdown: watch::Receiver<bool>,
) -> End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Who { peer, certificate } = who;
    let (mut reader, writer) = tokio::io::split(stream);
    let (frames, frames_rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(limits.outbox_bytes.max(1)));
    // Aborted if this task is (at the shutdown deadline), so nothing outlives the connection.
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(
        writer,
        frames_rx,
        room.clone(),
        limits.idle_timeout,
    )));
    let outbox = Outbox {
        frames,
        room,
        capacity: limits.outbox_bytes.max(1),
    };
    let mut session = Session {
        broker,
        outbox: outbox.clone(),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION)),
        fetches: Arc::new(Semaphore::new(MAX_FETCHES_PER_CONNECTION)),
        tasks: JoinSet::new(),
        subscriptions: HashMap::new(),
        next_subscription: SUBSCRIPTION_ID_BIT | 1,
        max_frame: limits.max_frame,
        caller: Caller::Open,
        guard: guard.inner.clone(),
    };

    let handshake_deadline = Instant::now() + limits.handshake_timeout;
    let mut recheck = tokio::time::interval(AUTH_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut greeted = false;
    let mut last_frame = Instant::now();
    let mut buf: Vec<u8> = Vec::with_capacity(HANDSHAKE_MAX_FRAME);
    let outcome: Result<End, Frame> = async {
        loop {
            // Serve every complete frame in the buffer.
            let mut used = 0;
            loop {
                let limit = if greeted { limits.max_frame } else { HANDSHAKE_MAX_FRAME };
                let (frame, request_id, len) = match decode_frame(&buf[used..], limit) {
                    Ok(Some(decoded)) => decoded,
                    Ok(None) => break,
                    Err(err) => {
                        let code = err.code();
                        let message = if greeted {
                            err.to_string()
                        } else {
                            format!("{err} (before Hello, frames are at most {HANDSHAKE_MAX_FRAME} bytes)")
                        };
                        return Err(connection_error(code, message));
                    }
                };
                used += len;
                last_frame = Instant::now();
                if !greeted {
                    match frame {
                        Frame::Hello { version: PROTOCOL_VERSION, credentials, .. } => {
                            if guard.enabled {
                                let Some(broker) = session.broker.get() else {
                                    return Err(connection_error(Code::NotReady, "the server is still recovering; authentication needs its keys"));
                                };
                                let token = (!credentials.is_empty()).then_some(credentials.as_str());
                                match guard.authenticate(broker, token, certificate.as_deref(), peer.ip(), "binary") {
                                    Ok((state, identity)) => {
                                        session.caller = Caller::Known { state, identity: Arc::new(identity) };
                                    }
                                    Err(err) => return Err(error_frame(&err)),
                                }
                            }
                            greeted = true;
                            buf.reserve(64 << 10);
                            let ok = Frame::HelloOk {
                                version: PROTOCOL_VERSION,
                                max_frame: u32::try_from(limits.max_frame).unwrap_or(u32::MAX),
                                server: format!("tidewater {}", env!("CARGO_PKG_VERSION")),
                            };
                            if outbox.reply(&ok, request_id).await.is_err() {
                                return Ok(End::Broken);
                            }
                            continue;
                        }
                        Frame::Hello { version, .. } => {
                            return Err(connection_error(FrameCode::UnsupportedVersion, format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}")));
                        }
                        _ => return Err(connection_error(FrameCode::InvalidFrame, "the first frame must be Hello")),
                    }
                }
                match session.serve(frame, request_id).await {
                    Ok(()) => {}
                    Err(Stop::Closed) => return Ok(End::Broken),
                    Err(Stop::Violation(frame)) => return Err(frame),
                }
            }
            buf.drain(..used);
            if buf.capacity() > (1 << 20) && buf.len() < (64 << 10) {
                buf.shrink_to(64 << 10); // a large frame does not pin its buffer for life
            }
            let deadline = if greeted { last_frame + limits.idle_timeout } else { handshake_deadline };
            tokio::select! {
                read = reader.read_buf(&mut buf) => match read {
                    Ok(0) => return Ok(End::Eof),
                    Ok(_) => {}
                    Err(_) => return Ok(End::Broken),
                },
                _ = recheck.tick(), if greeted && guard.enabled => {
                    session.recheck_auth()?;
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(if greeted {
                        stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                        connection_error(Code::ConnectionTimeout, format!("idle for {} ms (idle_timeout_ms): closing; send Ping to keep an idle connection open", limits.idle_timeout.as_millis()))
                    } else {
                        connection_error(Code::ConnectionTimeout, format!("no Hello within {} ms (handshake_timeout_ms)", limits.handshake_timeout.as_millis()))
                    });
                }
                _ = shutdown.changed() => {
                    return Err(connection_error(ErrorCode::ShuttingDown, "the server is shutting down"));
                }
            }
        }
    }
    .await;

    // Stop pushing deliveries; let requests already started answer (bounded), then the
    // final error frame if any, then the writer drains and closes the socket.
    session.stop_subscriptions().await;
    let end = match outcome {
        Ok(End::Broken) => {
            session.tasks.shutdown().await;
            End::Broken
        }
        Ok(end) => {
            session.finish_requests(limits.shutdown_timeout).await;
            end
        }
        Err(frame) => {
            session.finish_requests(limits.shutdown_timeout).await;
            let _ = tokio::time::timeout(CLOSE_LINGER, outbox.reply(&frame, 0)).await;
            End::Told(frame)
        }
    };
    drop(outbox);
    drop(session);
    // If the client stopped reading, what it did not take is dropped with the writer.
    let _ = tokio::time::timeout(CLOSE_LINGER, &mut writer.0).await;
    end
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why serving a frame stops the connection.
enum Stop {
    Closed,
    Violation(Frame),
}

impl From<Closed> for Stop {
    fn from(_: Closed) -> Stop {
        Stop::Closed
    }
}

/// A greeted connection's requests and subscriptions.
struct Session {
    broker: Arc<OnceLock<Broker>>,
    outbox: Outbox,
    in_flight: Arc<Semaphore>,
    fetches: Arc<Semaphore>,
    tasks: JoinSet<()>,
    /// Each subscription's state, task and queue (or `stream/subscription`).
    subscriptions: HashMap<u32, (Arc<Subscription>, tokio::task::JoinHandle<()>, String)>,
    next_subscription: u32,
    max_frame: usize,
    /// Who authenticated in Hello (`Open` with authentication off).
    caller: Caller,
    /// The listeners' authentication (receipt bindings).
    guard: Arc<tidewater_auth::Guard>,
}

impl Drop for Session {
    /// Subscriptions lease messages: none may outlive its connection (the connection's task
    /// is aborted at the shutdown deadline).
    fn drop(&mut self) {
        for (_, (_, task, _)) in self.subscriptions.drain() {
            task.abort();
        }
    }
}

impl Session {
    /// With authentication on: the key still holds (else the connection ends), and takes
    /// the grants in force now; a subscription whose grant went is ended with the
    /// connection.
    fn recheck_auth(&mut self) -> Result<(), Frame> {
        let Caller::Known { state, identity } = &self.caller else {
            return Ok(());
        };
        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let now = broker.auth();
        if now.epoch() == state.epoch() && identity.expires_at_ms.is_none() {
            return Ok(());
        }
        if !now.still_valid(identity, broker.now_ms()) {
            return Err(connection_error(
                ErrorCode::Unauthenticated,
                "the connection's key was revoked or expired: closing",
            ));
        }
        let caller = Caller::Known {
            state: now,
            identity: identity.clone(),
        };
        for (_, _, queue) in self.subscriptions.values() {
            let (op, resource) = crate::auth::subscription_needs(queue);
            if !caller.may(op, &resource) {
                return Err(error_frame(&caller.denied(op, &resource)));
            }
        }
        self.caller = caller;
        Ok(())
    }

    async fn serve(&mut self, frame: Frame, request_id: u32) -> Result<(), Stop> {
        while self.tasks.try_join_next().is_some() {}
        let Some(broker) = self.broker.get().cloned() else {
            let frame = connection_error(Code::NotReady, "the server is still recovering");
            return Ok(self.outbox.reply(&frame, request_id).await?);
        };
        if !matches!(self.caller, Caller::Open) {
            self.recheck_auth().map_err(Stop::Violation)?;
            let denied = frame_needs(&frame)
                .into_iter()
                .find(|(op, r)| !self.caller.may(*op, r))
                .map(|(op, r)| self.caller.denied(op, &r));
            if let Some(err) = denied {
                let principal = self.caller.identity().map_or("-", |i| i.principal.as_str());
                tracing::warn!(target: "tidewater::audit", listener = "binary", principal, reason = %err.message, "request denied");
                return Ok(self.outbox.reply(&error_frame(&err), request_id).await?);
            }
        }
        match frame {
            Frame::Subscribe {
                queue,
                lease_ms,
                credit,
            } => {
                let lease = (lease_ms > 0).then_some(lease_ms);
                let checked = if self.subscriptions.len() >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
                    Err(BrokerError::invalid(format!(
                        "at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions per connection"
                    )))
                } else {
                    broker
                        .check_lease_ms(lease)
                        .and_then(|()| broker.check_receivable(&queue))
                };
                if let Err(err) = checked {
                    return Ok(self.outbox.reply(&error_frame(&err), request_id).await?);
                }
                let id = self.next_subscription;
                self.next_subscription =
                    SUBSCRIPTION_ID_BIT | self.next_subscription.wrapping_add(1);
                let sub = Arc::new(Subscription {
                    credit: AtomicU32::new(credit),
                    wake: Notify::new(),
                });
                self.outbox
                    .reply(&Frame::Subscribed { subscription: id }, request_id)
                    .await?;
                let task = tokio::spawn(subscription(
                    broker,
                    queue.clone(),
                    lease,
                    id,
                    sub.clone(),
                    self.outbox.clone(),
                    self.max_frame,
                    (self.caller.clone(), self.guard.clone()),
                ));
                self.subscriptions.insert(id, (sub, task, queue));
            }
            Frame::Credit {
                subscription,
                credit,
            } => {
                if let Some((sub, _, _)) = self.subscriptions.get(&subscription) {
                    // Saturates: a client granting "everything" twice does not wrap to little.
                    let _ = sub
                        .credit
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                            Some(c.saturating_add(credit))
                        });
                    sub.wake.notify_one();
                }
            }
            Frame::Unsubscribe { subscription } => {
                if let Some((_, task, _)) = self.subscriptions.remove(&subscription) {
                    task.abort();
                }
                self.outbox.reply(&Frame::Ok, request_id).await?;
            }
            Frame::Ping => self.outbox.reply(&Frame::Pong, request_id).await?,
            Frame::Produce { queue, ack, batch } => {
                // A tenant other than the principal's own needs set_tenant on the queue.
                if let Caller::Known { identity, .. } = &self.caller
                    && let Some(tenant) = crate::auth::foreign_tenant(&batch, &identity.tenant)
                {
                    let resource =
                        tidewater_auth::Resource::new(tidewater_auth::ResourceKind::Queue, &queue);
                    if let Err(err) = self.caller.tenant_for(Some(&tenant), &resource) {
                        return Ok(self.outbox.reply(&error_frame(&err), request_id).await?);
                    }
                }
                // Submitted here, in frame order, so a connection's batches are appended in
                // the order they were sent; only the wait is concurrent.
                let permit = self.request_permit().await?;
                // With authentication on, records naming no tenant count against the
                // principal's.
                let tenant = self.caller.identity().map(|i| i.tenant.clone());
                let started =
                    broker.start_publish_batch_as(&queue, batch, ack_level(ack), tenant.as_deref());
                self.answer_produce(started, permit, request_id).await?;
            }
            Frame::StreamProduce {
                stream,
                partition,
                ack,
                batch,
            } => {
                // A record naming a tenant other than the principal's needs set_tenant.
                if let Caller::Known { identity, .. } = &self.caller
                    && let Ok(Some(tenant)) = tidewater_storage::format::kafka::header_other_than(
                        &batch,
                        tidewater_core::queue::HEADER_TENANT.as_bytes(),
                        identity.tenant.as_bytes(),
                    )
                {
                    let tenant = String::from_utf8_lossy(tenant).into_owned();
                    let resource = tidewater_auth::Resource::new(
                        tidewater_auth::ResourceKind::Stream,
                        &stream,
                    );
                    if let Err(err) = self.caller.tenant_for(Some(&tenant), &resource) {
                        return Ok(self.outbox.reply(&error_frame(&err), request_id).await?);
                    }
                }
                // As Produce.
                let permit = self.request_permit().await?;
                let started = broker
                    .start_produce_batch(&stream, partition, batch, ack_level(ack))
                    .map(|appending| async move {
                        appending.await.map(|(base, count, _)| (base, count))
                    });
                self.answer_produce(started, permit, request_id).await?;
            }
            Frame::Fetch {
                wait_ms,
                max_bytes,
                partitions,
            } => {
                let Ok(fetch) = self.fetches.clone().try_acquire_owned() else {
                    let err = BrokerError::invalid(format!(
                        "at most {MAX_FETCHES_PER_CONNECTION} fetches may wait at once on one connection: name every partition in one fetch"
                    ));
                    return Ok(self.outbox.reply(&error_frame(&err), request_id).await?);
                };
                let permit = self.request_permit().await?;
                // A reply fits half the outbox and a frame.
                let room = (self.outbox.capacity / 2).min(self.max_frame / 2).max(1);
                let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX).min(room);
                let outbox = self.outbox.clone();
                self.tasks.spawn(async move {
                    let reply =
                        fetch_reply(&broker, partitions, max_bytes, wait_ms, request_id).await;
                    let _ = outbox.send(reply).await;
                    drop((permit, fetch));
                });
            }
            Frame::ListOffset { .. }
            | Frame::JoinGroup { .. }
            | Frame::Heartbeat { .. }
            | Frame::LeaveGroup { .. }
            | Frame::Commit { .. }
            | Frame::FetchCommitted { .. }
            | Frame::StreamMetadata { .. } => {
                let permit = self.request_permit().await?;
                let outbox = self.outbox.clone();
                self.tasks.spawn(async move {
                    let reply = stream_request(&broker, frame)
                        .await
                        .unwrap_or_else(|err| error_frame(&err));
                    let _ = outbox.reply(&reply, request_id).await;
                    drop(permit);
                });
            }
            Frame::Ack { .. } | Frame::Nack { .. } | Frame::Extend { .. } => {
                let permit = self.request_permit().await?;
                let outbox = self.outbox.clone();
                let (caller, guard) = (self.caller.clone(), self.guard.clone());
                self.tasks.spawn(async move {
                    let reply = request(&broker, frame, &caller, &guard.receipts).await;
                    let _ = outbox.reply(&reply, request_id).await;
                    drop(permit);
                });
            }
            other => {
                return Err(Stop::Violation(connection_error(
                    FrameCode::InvalidFrame,
                    format!(
                        "frame kind 0x{:02x} is sent by servers, not clients",
                        other.kind()
                    ),
                )));
            }
        }
        Ok(())
    }

    /// A place among the requests in flight (waits for one: TCP backpressure).
    async fn request_permit(&self) -> Result<OwnedSemaphorePermit, Closed> {
        self.in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Closed)
    }

    /// Answers a produce that was started (or refused) now: the wait for its write is a
    /// task of its own, holding its place among the requests in flight.
    async fn answer_produce(
        &mut self,
        started: Result<
            impl Future<Output = Result<(u64, u32), BrokerError>> + Send + 'static,
            BrokerError,
        >,
        permit: OwnedSemaphorePermit,
        request_id: u32,
    ) -> Result<(), Closed> {
        match started {
            Ok(appended) => {
                let outbox = self.outbox.clone();
                self.tasks.spawn(async move {
                    let reply = match appended.await {
                        Ok((base_offset, count)) => Frame::Produced { base_offset, count },
                        Err(err) => error_frame(&err),
                    };
                    let _ = outbox.reply(&reply, request_id).await;
                    drop(permit);
                });
                Ok(())
            }
            Err(err) => self.outbox.reply(&error_frame(&err), request_id).await,
        }
    }

    async fn stop_subscriptions(&mut self) {
        for (_, (_, task, _)) in self.subscriptions.drain() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Waits (bounded) for started requests to put their replies in the outbox.
    async fn finish_requests(&mut self, within: Duration) {
        let tasks = &mut self.tasks;
        let finished =
            tokio::time::timeout(within, async { while tasks.join_next().await.is_some() {} })
                .await;
        if finished.is_err() {
            self.tasks.shutdown().await;
        }
    }
}

async fn request(
    broker: &Broker,
    frame: Frame,
    caller: &Caller,
    binder: &tidewater_auth::ReceiptBinder,
) -> Frame {
    // The receipts the caller may settle go to the broker (as it knows them); the others
    // fail as forbidden. Failures are reported by index into the frame's receipts.
    let settle = |queue: &str, receipts: &tidewater_proto::Receipts| {
        let sent: Vec<&str> = receipts.iter().collect();
        let resource = crate::auth::subscription_needs(queue).1;
        let (mine, others) = caller.unbind_receipts(binder, &resource, &sent);
        let mine: Vec<(usize, String)> =
            mine.into_iter().map(|(i, r)| (i, r.to_string())).collect();
        (mine, others)
    };
    let settled = |reply: tidewater_core::SettleReply,
                   mine: &[(usize, String)],
                   others: &[usize]| {
        // Failures come in receipt order: find each one's index from the previous one on.
        let mut from = 0;
        let mut failed: Vec<Failure> = reply
            .failed
            .iter()
            .map(|f| {
                let at = mine[from..]
                    .iter()
                    .position(|(_, r)| *r == f.receipt)
                    .map(|i| from + i)
                    .or_else(|| mine.iter().position(|(_, r)| *r == f.receipt))
                    .unwrap_or(0);
                from = at + 1;
                Failure {
                    index: u32::try_from(mine.get(at).map_or(0, |(i, _)| *i)).unwrap_or(u32::MAX),
                    code: f.code.into(),
                }
            })
            .collect();
        failed.extend(others.iter().map(|&i| Failure {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            code: ErrorCode::Forbidden.as_str().into(),
        }));
        failed.sort_by_key(|f| f.index);
        Frame::Settled {
            ok: u32::try_from(reply.ok).unwrap_or(u32::MAX),
            failed,
        }
    };
    let raw =
        |mine: &[(usize, String)]| -> Vec<String> { mine.iter().map(|(_, r)| r.clone()).collect() };
    let result = match frame {
        Frame::Ack { queue, receipts } => {
            let (mine, others) = settle(&queue, &receipts);
            let receipts = raw(&mine);
            broker
                .ack(&queue, &receipts)
                .await
                .map(|r| settled(r, &mine, &others))
        }
        Frame::Nack {
            queue,
            delay_ms,
            error,
            receipts,
            overloaded,
        } => {
            let delay = u64::try_from(delay_ms).ok();
            let error = (!error.is_empty()).then_some(error.as_str());
            let reason = if overloaded {
                NackReason::Overloaded
            } else {
                NackReason::Failed
            };
            let (mine, others) = settle(&queue, &receipts);
            let receipts = raw(&mine);
            broker
                .nack(&queue, &receipts, delay, error, reason)
                .await
                .map(|r| settled(r, &mine, &others))
        }
        Frame::Extend {
            queue,
            lease_ms,
            receipts,
        } => {
            let lease = (lease_ms > 0).then_some(lease_ms);
            let (mine, others) = settle(&queue, &receipts);
            let receipts = raw(&mine);
            broker
                .extend(&queue, &receipts, lease)
                .map(|r| settled(r, &mine, &others))
        }
        _ => unreachable!("only requests are passed here"),
    };
    result.unwrap_or_else(|err| error_frame(&err))
}

/// A Fetch's answer, encoded: each partition's stored batches, or why it could not be read.
async fn fetch_reply(
    broker: &Broker,
    partitions: Vec<FetchPartition>,
    max_bytes: usize,
    wait_ms: u32,
    request_id: u32,
) -> Vec<u8> {
    let wants: Vec<FetchWant> = partitions
        .into_iter()
        .map(|p| FetchWant {
            stream: p.stream,
            partition: p.partition,
            offset: p.offset,
            max_bytes: usize::try_from(p.max_bytes).unwrap_or(usize::MAX),
        })
        .collect();
    match broker
        .fetch_many(&wants, max_bytes, 1, u64::from(wait_ms))
        .await
    {
        Ok(answers) => {
            let size: usize = answers
                .iter()
                .flatten()
                .flat_map(|f| &f.batches)
                .map(|b| b.kafka.len())
                .sum();
            let mut frame = FetchedWriter::new(request_id, size + wants.len() * 64);
            for (want, answer) in wants.iter().zip(answers) {
                match answer {
                    Ok(fetched) => {
                        let batches: Vec<&[u8]> =
                            fetched.batches.iter().map(|b| b.kafka.as_ref()).collect();
                        frame.push(
                            &want.stream,
                            want.partition,
                            fetched.start_offset,
                            fetched.end_offset,
                            &batches,
                        );
                    }
                    Err(err) => frame.push_error(
                        &want.stream,
                        want.partition,
                        err.code.as_str(),
                        &err.message,
                    ),
                }
            }
            frame.finish()
        }
        Err(err) => encode(&error_frame(&err), request_id),
    }
}

/// The stream and group requests that answer with one frame.
async fn stream_request(broker: &Broker, frame: Frame) -> Result<Frame, BrokerError> {
    let pairs = |partitions: std::collections::BTreeSet<(String, u32)>| {
        partitions
            .into_iter()
            .map(|(stream, partition)| StreamPartition { stream, partition })
            .collect()
    };
    Ok(match frame {
        Frame::ListOffset {
            stream,
            partition,
            at,
        } => Frame::Offset {
            offset: broker.list_offset(&stream, partition, at)?,
        },
        Frame::JoinGroup {
            group,
            instance,
            session_timeout_ms,
            streams,
        } => {
            let instance = (!instance.is_empty()).then_some(instance.as_str());
            let member =
                broker.join_group(&group, instance, &streams, u64::from(session_timeout_ms))?;
            Frame::Joined {
                member,
                heartbeat_ms: (session_timeout_ms / 3).max(1),
            }
        }
        Frame::Heartbeat {
            group,
            member,
            owned,
        } => {
            let owned = owned.into_iter().map(|p| (p.stream, p.partition)).collect();
            let assignment = broker.heartbeat(&group, &member, &owned)?;
            Frame::Assignment {
                generation: assignment.generation,
                assigned: pairs(assignment.assigned),
                revoked: pairs(assignment.revoked),
            }
        }
        Frame::LeaveGroup { group, member } => {
            broker.leave_group(&group, &member)?;
            Frame::Ok
        }
        Frame::Commit {
            group,
            member,
            offsets,
        } => {
            let commits: Vec<(String, u32, u64, String)> = offsets
                .into_iter()
                .map(|o| (o.stream, o.partition, o.offset, o.metadata))
                .collect();
            let member = (!member.is_empty()).then_some(member.as_str());
            broker.commit_as_member(&group, member, &commits).await?;
            Frame::Ok
        }
        Frame::FetchCommitted { group, partitions } => {
            let mut offsets = Vec::with_capacity(partitions.len());
            for p in partitions {
                let committed = broker.committed(&group, &p.stream, p.partition).await;
                offsets.push(CommittedOffset {
                    stream: p.stream,
                    partition: p.partition,
                    offset: committed.as_ref().map(|c| c.offset),
                    metadata: committed.map(|c| c.metadata).unwrap_or_default(),
                });
            }
            Frame::Committed { offsets }
        }
        Frame::StreamMetadata { stream } => Frame::StreamInfo {
            partitions: broker
                .get_stream(&stream)?
                .partitions
                .iter()
                .map(|p| PartitionRange {
                    start_offset: p.start_offset,
                    end_offset: p.end_offset,
                })
                .collect(),
        },
        _ => unreachable!("only stream and group requests are passed here"),
    })
}

/// Pushes deliveries while the consumer has credit and its connection has room: a
/// subscription leases only what its outbox can take (half of it per batch, sized by the
/// messages seen so far), so a client that grants endless credit and never reads holds at
/// most about one outbox of messages, not the queue. Ends with an error frame if the queue
/// goes away.
#[allow(clippy::too_many_arguments)]
async fn subscription(
    broker: Broker,
    queue: String,
    lease_ms: Option<u64>,
    id: u32,
    sub: Arc<Subscription>,
    outbox: Outbox,
    max_frame: usize,
    (caller, guard): (Caller, Arc<tidewater_auth::Guard>),
) {
    let window = (outbox.capacity / 2).clamp(1, max_frame);
    // Each subscription of a connection is one consumer in the queue's forecast.
    let consumer = fastrand::u64(1..);
    // Average encoded delivery size seen so far; starts small so the first batch is full.
    let mut average = 256usize;
    loop {
        let credit = sub.credit.load(Ordering::SeqCst);
        if credit == 0 {
            sub.wake.notified().await;
            continue;
        }
        if broker.is_closing() {
            return;
        }
        if outbox.wait_for_room(window).await.is_err() {
            return;
        }
        let by_room = (window / average.max(1)).max(1);
        let max = usize::try_from(credit)
            .unwrap_or(usize::MAX)
            .min(MAX_DELIVER_BATCH)
            .min(by_room);
        match broker
            .receive_as(consumer, &queue, max, 1_000, lease_ms)
            .await
        {
            Ok(deliveries) if deliveries.is_empty() => continue,
            Ok(mut deliveries) => {
                // Receipts bound to the principal (authentication on).
                for d in &mut deliveries {
                    caller.bind_receipt(&guard.receipts, &mut d.receipt);
                }
                let n = u32::try_from(deliveries.len()).unwrap_or(u32::MAX);
                let _ = sub
                    .credit
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                        Some(c.saturating_sub(n))
                    });
                // Records are encoded straight into the frame (sized up front).
                let size: usize = deliveries
                    .iter()
                    .map(|d| DeliverWriter::overhead(&d.receipt) + d.record.encoded_len())
                    .sum();
                average = (size / deliveries.len()).max(1);
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
                if outbox.send(frame.finish()).await.is_err() {
                    return; // connection gone: the leases expire and the messages come back
                }
            }
            Err(err) => {
                let _ = outbox.reply(&error_frame(&err), id).await;
                return;
            }
        }
    }
}
