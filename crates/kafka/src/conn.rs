//! One Kafka connection. The reader reads a size-prefixed request, waits for room in the
//! listener's memory budget (`max_request_bytes_in_flight`), decodes and starts it, and
//! queues its answer; the writer task writes answers in the order the requests came, as
//! Kafka's protocol requires. At most `max_requests_in_flight` answers are queued: past
//! it the reader waits, and the writer drains only to the socket, so the connection cannot
//! wait on itself. A malformed request, an unknown API or an oversized frame closes only
//! this connection (Kafka does the same); a refusal is an error code in a response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::task::JoinHandle;

use crate::Kafka;
use crate::versions::Answer;

/// An answer on its way, and the memory its request holds until it is written.
struct Queued {
    answer: JoinHandle<Answer>,
    _memory: OwnedSemaphorePermit,
}

/// Serves one connection until the client closes it, it idles past `idle_timeout`, it
/// sends something malformed, or the listener shuts down.
pub async fn serve_connection(
    kafka: Arc<Kafka>,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (queue, mut answers) = mpsc::channel::<Queued>(kafka.config.max_requests_in_flight.max(1));
    let writing = tokio::spawn(async move {
        while let Some(queued) = answers.recv().await {
            match queued.answer.await {
                Ok(Ok(Some(frame))) => {
                    if writer.write_all(&frame.bytes).await.is_err() {
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
        let reply = match crate::versions::start(&kafka, frame.freeze(), peer) {
            Ok(reply) => reply,
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
        if queue.send(queued).await.is_err() {
            break;
        }
    }
    // Answers already started are still written (a produce's outcome reaches its client).
    drop(queue);
    let _ = writing.await;
}
