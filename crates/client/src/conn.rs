//! One TCP connection: a writer task, a reader task that routes replies by request id and
//! deliveries by subscription id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use parking_lot::Mutex;
use tidewater_proto::{DEFAULT_MAX_FRAME, Frame, PROTOCOL_VERSION, decode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use tidewater_proto::SUBSCRIPTION_ID_BIT;

use crate::{ClientError, ClientOptions};

/// A connection's byte stream: TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

struct Waiting {
    reply: oneshot::Sender<Frame>,
    /// For a Subscribe: where the subscription's deliveries go once it is confirmed.
    on_subscribed: Option<mpsc::UnboundedSender<Frame>>,
}

pub(crate) struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    waiting: Mutex<HashMap<u32, Waiting>>,
    subscriptions: Mutex<HashMap<u32, mpsc::UnboundedSender<Frame>>>,
    next_id: AtomicU32,
    alive: AtomicBool,
}

impl Conn {
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub(crate) async fn connect(
        addr: &str,
        opts: &ClientOptions,
    ) -> Result<Arc<Conn>, ClientError> {
        let unavailable =
            |e: &dyn std::fmt::Display| ClientError::Unavailable(format!("{addr}: {e}"));
        let tcp = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unavailable(&e)),
            Err(_) => return Err(unavailable(&"connect timed out")),
        };
        let _ = tcp.set_nodelay(true);
        let mut stream: Box<dyn Io> = match &opts.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = tls.name_for(addr).map_err(ClientError::Protocol)?;
                let handshake = tls.connector.connect(name, tcp);
                match tokio::time::timeout(opts.connect_timeout, handshake).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(e)) => return Err(unavailable(&format!("TLS handshake: {e}"))),
                    Err(_) => return Err(unavailable(&"TLS handshake timed out")),
                }
            }
        };
        let mut hello = Vec::new();
        Frame::Hello {
            version: PROTOCOL_VERSION,
            client: opts.client_name.clone(),
            credentials: opts
                .credentials
                .as_ref()
                .map(|c| c.as_str().to_string())
                .unwrap_or_default(),
        }
        .encode(0, &mut hello);
        stream
            .write_all(&hello)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut buf = Vec::with_capacity(64 << 10);
        let max_frame = loop {
            match decode_frame(&buf, DEFAULT_MAX_FRAME) {
                Ok(Some((Frame::HelloOk { max_frame, .. }, _, used))) => {
                    buf.drain(..used);
                    break max_frame as usize;
                }
                Ok(Some((Frame::Error { code, message }, _, _))) => {
                    return Err(ClientError::Server { code, message });
                }
                Ok(Some((other, _, _))) => {
                    return Err(ClientError::Protocol(format!(
                        "expected HelloOk, got {other:?}"
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let read = tokio::time::timeout(opts.connect_timeout, stream.read_buf(&mut buf))
                .await
                .map_err(|_| unavailable(&"handshake timed out"))?
                .map_err(|e| unavailable(&e))?;
            if read == 0 {
                return Err(unavailable(&"closed during the handshake"));
            }
        };
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let conn = Arc::new(Conn {
            tx,
            waiting: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            alive: AtomicBool::new(true),
        });
        let writer_conn = conn.clone();
        let heartbeat = opts
            .heartbeat_interval
            .max(std::time::Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                let first = match tokio::time::timeout(heartbeat, rx.recv()).await {
                    Ok(Some(first)) => first,
                    Ok(None) => break,
                    Err(_) => {
                        // Quiet for a while: a Ping keeps the server's idle timeout away
                        // (its Pong matches no waiting request and is dropped).
                        let mut ping = Vec::new();
                        Frame::Ping.encode(writer_conn.request_id(), &mut ping);
                        ping
                    }
                };
                let mut out = first;
                while out.len() < (1 << 20) {
                    match rx.try_recv() {
                        Ok(more) => out.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if writer.write_all(&out).await.is_err() {
                    break;
                }
            }
            writer_conn.fail();
        });
        let reader_conn = conn.clone();
        tokio::spawn(async move {
            loop {
                let mut used = 0;
                loop {
                    match decode_frame(&buf[used..], max_frame.max(DEFAULT_MAX_FRAME)) {
                        Ok(Some((frame, id, len))) => {
                            used += len;
                            if !reader_conn.route(frame, id) {
                                reader_conn.fail();
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable frame from the broker; dropping the connection");
                            reader_conn.fail();
                            return;
                        }
                    }
                }
                buf.drain(..used);
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        reader_conn.fail();
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
        Ok(conn)
    }

    /// Routes one incoming frame; false when the connection must end.
    fn route(&self, frame: Frame, id: u32) -> bool {
        if id == 0 {
            // Connection-level error: the broker closes after it.
            if let Frame::Error { code, message } = &frame {
                tracing::warn!(%code, %message, "the broker closed the connection");
            }
            return false;
        }
        if id & SUBSCRIPTION_ID_BIT != 0 {
            if let Some(sub) = self.subscriptions.lock().get(&id).cloned() {
                let _ = sub.send(frame);
            }
            return true;
        }
        let Some(waiting) = self.waiting.lock().remove(&id) else {
            return true; // a reply to a request that timed out
        };
        if let (Frame::Subscribed { subscription }, Some(sink)) = (&frame, waiting.on_subscribed) {
            // Registered before the reply is handed over, so no delivery is missed.
            self.subscriptions.lock().insert(*subscription, sink);
        }
        let _ = waiting.reply.send(frame);
        true
    }

    fn fail(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.waiting.lock().clear(); // dropping the senders wakes every waiter
        self.subscriptions.lock().clear(); // consumers see their channel close and resubscribe
    }

    /// A fresh request id. Ids live in 1..2^31; 0 is connection-level, the high bit marks
    /// subscriptions.
    fn request_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) & !SUBSCRIPTION_ID_BIT;
            if id != 0 {
                return id;
            }
        }
    }

    /// Sends a request and waits for its reply.
    pub(crate) async fn call(
        &self,
        frame: &Frame,
        on_subscribed: Option<mpsc::UnboundedSender<Frame>>,
    ) -> Result<Frame, ClientError> {
        let wait = self.send_request(frame, on_subscribed).await?;
        wait.await.map_err(|_| ClientError::Disconnected)
    }

    /// Queues a request for the socket (requests queued one after another are sent in
    /// that order) and returns where its reply will come.
    pub(crate) async fn send_request(
        &self,
        frame: &Frame,
        on_subscribed: Option<mpsc::UnboundedSender<Frame>>,
    ) -> Result<oneshot::Receiver<Frame>, ClientError> {
        if !self.is_alive() {
            return Err(ClientError::Unavailable("connection closed".into()));
        }
        let id = self.request_id();
        let (reply, wait) = oneshot::channel();
        self.waiting.lock().insert(
            id,
            Waiting {
                reply,
                on_subscribed,
            },
        );
        let mut bytes = Vec::new();
        frame.encode(id, &mut bytes);
        if self.tx.send(bytes).await.is_err() {
            self.waiting.lock().remove(&id);
            return Err(ClientError::Unavailable("connection closed".into()));
        }
        Ok(wait)
    }

    /// Sends a frame that has no reply (credit).
    pub(crate) async fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        let mut bytes = Vec::new();
        frame.encode(0, &mut bytes);
        self.tx
            .send(bytes)
            .await
            .map_err(|_| ClientError::Disconnected)
    }
}
