//! One Kafka connection. The reader reads a size-prefixed request, waits for room in the
//! listener's memory budget (`max_request_bytes_in_flight`), decodes and starts it, and
//! queues its answer; the writer task writes answers in the order the requests came, as
//! Kafka's protocol requires. Requests are also *handled* in order, as Kafka's broker
//! handles them: a request starts once the one before it is done (a commit of offset 200
//! after one of 100 is never applied first). A produce is done once its batches are handed
//! to storage, so a producer's pipelined produces still wait for their writes together. At most `max_requests_in_flight` answers are queued: past
//! it the reader waits, and the writer drains only to the socket, so the connection cannot
//! wait on itself. A malformed request, an unknown API or an oversized frame closes only
//! this connection (Kafka does the same); a refusal is an error code in a response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::Kafka;
use crate::versions::{Answer, Started};

/// An answer on its way, and the memory its request holds until it is written.
struct Queued {
    answer: JoinHandle<Answer>,
    _memory: OwnedSemaphorePermit,
}

/// Serves one connection until the client closes it, it idles past `idle_timeout`, it
/// sends something malformed, or the listener shuts down.
/// `certificate`: the principal a verified TLS client certificate names, if the listener
/// speaks TLS and the client showed one (with authentication on, it authenticates the
/// connection as SASL would: `security.protocol=SSL` with a client certificate).
pub async fn serve_connection<S>(
    kafka: Arc<Kafka>,
    stream: S,
    peer: SocketAddr,
    certificate: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let idle = kafka.config.idle_timeout;
    let (queue, mut answers) = mpsc::channel::<Queued>(kafka.config.max_requests_in_flight.max(1));
    let writing = tokio::spawn(async move {
        while let Some(queued) = answers.recv().await {
            match queued.answer.await {
                Ok(Ok(Some(frame))) => {
                    // A client that stops reading holds its answers (and their memory) no
                    // longer than the idle timeout.
                    let written = tokio::time::timeout(idle, writer.write_all(&frame.bytes)).await;
                    if !matches!(written, Ok(Ok(()))) {
                        break;
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(reason)) => {
                    tracing::debug!(%peer, reason, "Kafka connection closed");
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = writer.shutdown().await;
    });
    let max = kafka.config.max_request_bytes;
    let mut session = crate::sasl::Session::new(&kafka, peer, certificate);
    let mut previous: Option<oneshot::Receiver<()>> = None;
    loop {
        let size = tokio::select! {
            read = tokio::time::timeout(kafka.config.idle_timeout, reader.read_i32()) => match read {
                Ok(Ok(size)) => size,
                Ok(Err(_)) => break,
                Err(_) => {
                    kafka.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "Kafka connection idle past idle_timeout_ms; closing");
                    break;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Some(size) = usize::try_from(size).ok().filter(|s| *s <= max) else {
            kafka.stats.closed_malformed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, size, max, "Kafka request size out of bounds (max_request_bytes); closing the connection");
            break;
        };
        let kib = u32::try_from(size.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let memory = tokio::select! {
            permit = kafka.memory.clone().acquire_many_owned(kib) => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let mut frame = BytesMut::zeroed(size);
        let read = tokio::select! {
            read = tokio::time::timeout(kafka.config.idle_timeout, reader.read_exact(&mut frame)) => read,
            _ = shutdown.changed() => break,
        };
        if !matches!(read, Ok(Ok(_))) {
            break;
        }
        kafka.stats.requests.fetch_add(1, Ordering::Relaxed);
        // The request before must be done first (Kafka's order of handling).
        if let Some(done) = previous.take() {
            tokio::select! {
                _ = done => {}
                _ = shutdown.changed() => break,
            }
        }
        let reply = match crate::versions::start(&kafka, frame.freeze(), &mut session) {
            Ok(Started::Handed(reply)) => reply,
            Ok(Started::Later(reply)) => {
                let (done, wait) = oneshot::channel();
                previous = Some(wait);
                Box::pin(async move {
                    let answer = reply.await;
                    let _ = done.send(());
                    answer
                })
            }
            Err(reason) => {
                kafka.stats.closed_malformed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, reason, "Kafka request refused; closing the connection");
                break;
            }
        };
        let queued = Queued {
            answer: tokio::spawn(reply),
            _memory: memory,
        };
        tokio::select! {
            sent = queue.send(queued) => if sent.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
    // Answers already started are still written (a produce's outcome reaches its client).
    drop(queue);
    let _ = writing.await;
}
