//! What both listeners (binary protocol, HTTP) do with their sockets: accept under a
//! connection cap (a connection over it is told why and closed, never queued), back off on
//! accept errors instead of spinning (EMFILE), count what happens for /metrics, and at
//! shutdown give connections a deadline, then cut them off.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Live figures of a listener, for /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub closed_idle: AtomicU64,
    pub accept_errors: AtomicU64,
}

/// Counts a connection open for as long as it lives.
struct OpenGuard(Arc<Stats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One listener's bounds.
pub struct Bounds {
    /// For log lines: "binary protocol", "HTTP".
    pub name: &'static str,
    pub max_connections: usize,
    /// How long connections may take to finish after the shutdown signal.
    pub shutdown_timeout: Duration,
}

/// Accepts until `shutdown` changes, running `serve` for each connection within the cap
/// and `refuse` (which must not wait) for each one over it; then waits for connections up
/// to the shutdown deadline and aborts the rest.
pub async fn accept_loop<S, F>(
    listener: TcpListener,
    bounds: Bounds,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
    refuse: fn(&TcpStream, usize),
    serve: S,
) where
    S: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::ZERO;
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        refuse(&stream, bounds.max_connections);
                        continue;
                    };
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.open.fetch_add(1, Ordering::Relaxed);
                    let open = OpenGuard(stats.clone());
                    let _ = stream.set_nodelay(true);
                    let connection = serve(stream, peer);
                    connections.spawn(async move {
                        connection.await;
                        drop((slot, open));
                    });
                }
                Err(err) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    // Out of file descriptors (or a transient error): wait, do not spin.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(
                            error = %err,
                            backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                            "{}: accept failed; backing off (further failures are counted in tidewater_connection_accept_errors_total)",
                            bounds.name
                        );
                    }
                    tokio::time::sleep(backoff).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    // Each connection saw the signal itself: give them the grace period, then cut them off.
    let drained = tokio::time::timeout(bounds.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "{}: connections still open at the shutdown deadline; closing them",
            bounds.name
        );
        connections.shutdown().await;
    }
}
