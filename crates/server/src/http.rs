//! HTTP API v1 over the broker. Thin glue: parse, call the broker, shape the reply.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tidewater_auth::{Operation, Resource, ResourceKind};
use tidewater_core::forecast::consumer_id;
use tidewater_core::stream::config::StreamPatch;
use tidewater_core::{Broker, BrokerError, ConfigPatch, ErrorCode, NackReason, RedriveRequest};

use crate::observe;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::api::{self, ErrorBody, OutMessage};
use crate::auth::{Caller, Guard, Need, Target};
use crate::edges;
use crate::errors::Code;
use crate::listener::{Bounds, Stats, accept_loop};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    /// Set once recovery finishes; until then the API answers 503 not_ready.
    pub broker: Arc<OnceLock<Broker>>,
    pub metrics: Arc<Metrics>,
    pub max_request_bytes: usize,
    /// Bytes of request bodies in flight, across connections (in KiB permits).
    pub body_budget: Arc<Semaphore>,
    pub max_request_bytes_in_flight: usize,
    /// A request body must arrive within this long.
    pub body_timeout: std::time::Duration,
    /// The broker's limits (known before recovery ends): /v1/openapi.json states them.
    pub limits: Arc<tidewater_core::Limits>,
    /// Authentication, shared with the other listeners.
    pub guard: Arc<Guard>,
    /// Serve the web console at `/` (`[console] enabled`).
    pub console: bool,
}

/// The client's address, and the principal its verified TLS client certificate names, put
/// in each request by the listener.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<Arc<str>>,
}

impl AppState {
    pub(crate) fn broker(&self) -> Result<&Broker, ApiError> {
        self.broker.get().ok_or_else(|| {
            ApiError::new(Code::NotReady, "the server is still recovering its data")
                .retry_after(1_000)
        })
    }
}

/// An error as an HTTP response: status from its code, JSON body, Retry-After. Mostly a
/// `BrokerError`; the listener's own refusals (not ready, no route, a body that is not
/// JSON or too slow) carry the server's codes.
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: impl Into<Code>, message: impl Into<String>) -> Self {
        ApiError {
            code: code.into(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        ApiError {
            code: Code::Broker(err.code),
            message: err.message,
            retry_after_ms: err.retry_after_ms,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.code.as_str(),
            message: &self.message,
            retry_after_ms: self.retry_after_ms,
        };
        let mut response = (status, json_body(&body)).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// A PUT's reply: 201 with the resource when it created it, else 200.
pub(crate) fn created_or_ok<T: Serialize>(created: bool, value: &T) -> ApiResult {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json(status, value)
}

fn json_body<T: Serialize>(value: &T) -> Response {
    let bytes = serde_json::to_vec(value).expect("replies serialize");
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResult {
    let mut response = json_body(value);
    *response.status_mut() = status;
    Ok(response)
}

/// Request bodies being read or handled hold this much of the broker-wide budget
/// (`max_request_bytes_in_flight`); dropped when the handler returns.
pub struct BodyPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Reserves `kib` more of the body budget, or refuses at once (overloaded, Retry-After).
fn reserve(
    state: &AppState,
    held: &mut Option<OwnedSemaphorePermit>,
    kib: u32,
) -> Result<(), ApiError> {
    if kib == 0 {
        return Ok(());
    }
    let more = state
        .body_budget
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| {
            ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "request bodies in flight hold the server's budget of {} bytes (max_request_bytes_in_flight); nothing was done, retry shortly",
                    state.max_request_bytes_in_flight
                ),
            )
            .retry_after(1_000)
        })?;
    match held {
        Some(permit) => permit.merge(more),
        None => *held = Some(more),
    }
    Ok(())
}

/// Reads a body within max_request_bytes and body_timeout_ms, holding its size of the
/// broker-wide budget (all of a declared Content-Length at once, else as it arrives).
pub(crate) async fn read_body(
    state: &AppState,
    body: Body,
) -> Result<(Bytes, BodyPermit), ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::RequestTooLarge,
            format!(
                "the request body exceeds max_request_bytes ({} bytes)",
                state.max_request_bytes
            ),
        )
    };
    let kib = |bytes: u64| u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
    let mut held = None;
    let mut body = body;
    if let Some(declared) = http_body::Body::size_hint(&body).exact() {
        let refused = if declared > state.max_request_bytes as u64 {
            Err(too_large())
        } else {
            reserve(state, &mut held, kib(declared))
        };
        if let Err(refused) = refused {
            drain(state, &mut body).await;
            return Err(refused);
        }
    }
    let read = async {
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::from(BrokerError::invalid(format!(
                    "the request body could not be read: {e}"
                )))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if buf.len() + data.len() > state.max_request_bytes {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
            let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
            let need = kib(buf.len() as u64) as usize;
            if need > have {
                reserve(
                    state,
                    &mut held,
                    u32::try_from(need - have).unwrap_or(u32::MAX),
                )?;
            }
        }
        Ok(Bytes::from(buf))
    };
    let bytes = tokio::time::timeout(state.body_timeout, read)
        .await
        .map_err(|_| {
            ApiError::new(
                Code::ConnectionTimeout,
                format!(
                    "the request body did not arrive within {} ms (body_timeout_ms)",
                    state.body_timeout.as_millis()
                ),
            )
        })?;
    let bytes = match bytes {
        Err(err)
            if matches!(
                err.code,
                Code::Broker(ErrorCode::Overloaded | ErrorCode::RequestTooLarge)
            ) =>
        {
            drain(state, &mut body).await;
            return Err(err);
        }
        other => other?,
    };
    Ok((bytes, BodyPermit(held)))
}

/// Reads and drops the rest of a refused body (it costs no memory) for at most
/// `DRAIN_BYTES` and `body_timeout_ms`, so a client still sending it gets the refusal
/// instead of a broken pipe (a "lingering close").
async fn drain(state: &AppState, body: &mut Body) {
    let drain = async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, Bytes::len);
            if n >= left {
                break;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(state.body_timeout, drain).await;
}

/// Most bytes of a refused body read and dropped before the connection is closed.
const DRAIN_BYTES: usize = 64 << 20;

/// Rewrites numbers like `820.0` (a float with no fraction) as integers, when that is exact:
/// below 2^53 in magnitude every integer is a float, so the float is the number written.
/// Beyond, one float stands for many integers (`-9223372036854775809` parses as the float of
/// i64::MIN): it stays a float, which an integer field refuses, instead of becoming another
/// number.
fn integral_floats_to_integers(value: &mut serde_json::Value) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        serde_json::Value::Number(n) => {
            if let Some(f) = n
                .as_f64()
                .filter(|f| n.is_f64() && f.fract() == 0.0 && f.abs() < EXACT)
            {
                *n = if f >= 0.0 {
                    serde_json::Number::from(f as u64)
                } else {
                    serde_json::Number::from(f as i64)
                };
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

/// Refuses a document of more than `max` JSON values before anything is built from it
/// (a scan that allocates nothing): parsed structures cost tens of bytes per value, so a
/// body of millions of tiny values would cost many times its size. Returns whether it
/// holds a float with no fraction (`820.0`), which typed parsing would refuse as an
/// integer.
fn check_value_count(bytes: &[u8], max: usize) -> Result<bool, ApiError> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;

    struct Count<'a>(&'a Cell<usize>, &'a Cell<bool>);
    impl Count<'_> {
        fn tick<E: serde::de::Error>(&self) -> Result<(), E> {
            let left = self.0.get();
            if left == 0 {
                return Err(E::custom("too many values"));
            }
            self.0.set(left - 1);
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
            self.tick()
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
            self.tick()
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
            self.tick()
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
            if v.fract() == 0.0 {
                self.1.set(true);
            }
            self.tick()
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            self.tick()
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            self.tick()
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            self.tick()?;
            while seq.next_element_seed(Count(self.0, self.1))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            self.tick()?;
            while map.next_key::<IgnoredAny>()?.is_some() {
                self.tick()?; // the key
                map.next_value_seed(Count(self.0, self.1))?;
            }
            Ok(())
        }
    }

    let left = Cell::new(max);
    let integral_floats = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match Count(&left, &integral_floats).deserialize(&mut de) {
        Err(e) if left.get() == 0 && e.to_string().starts_with("too many values") => {
            Err(ApiError::new(
                ErrorCode::RequestTooLarge,
                format!(
                    "the request body holds more than {max} JSON values, more than this request can use (see max_batch_messages, max_headers, max_receive_messages)"
                ),
            ))
        }
        _ => Ok(integral_floats.get()), // malformed JSON: the parse below says where
    }
}

/// Reads a bounded body and parses it as a JSON object; an empty body parses as `default`.
/// `max_values` bounds the JSON values the body may hold (what the request can use, plus a
/// margin).
async fn parse_body<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
    default: Option<T>,
    max_values: usize,
) -> Result<(T, BodyPermit), ApiError> {
    parse_json(state, body, default, max_values, true).await
}

/// `parse_body`; `objects_only`: an array is refused as `invalid_request`.
async fn parse_json<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
    default: Option<T>,
    max_values: usize,
    objects_only: bool,
) -> Result<(T, BodyPermit), ApiError> {
    let (bytes, permit) = read_body(state, body).await?;
    // JSON's whitespace only: a form feed is ASCII whitespace, but no JSON text.
    if bytes
        .iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        && let Some(default) = default
    {
        return Ok((default, permit));
    }
    // Every request body is a JSON object; serde would also fill a struct from an array
    // of its fields in order.
    if let Some(&first) = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        && first == b'['
        && objects_only
    {
        return Err(ApiError::new(
            Code::Broker(ErrorCode::InvalidRequest),
            "request body: must be a JSON object ({...}), not an array",
        ));
    }
    let integral_floats = check_value_count(&bytes, max_values)?;
    let invalid = |e: serde_json::Error| {
        let code = match e.classify() {
            serde_json::error::Category::Data => Code::Broker(ErrorCode::InvalidRequest),
            _ => Code::InvalidJson,
        };
        ApiError::new(code, format!("request body: {e}"))
    };
    let value = if integral_floats {
        // JSON has one number type: 820.0 is the integer 820 (JSON Schema agrees). Rare:
        // only such bodies take the slower way through a Value.
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).map_err(invalid)?;
        integral_floats_to_integers(&mut value);
        serde_json::from_value(value).map_err(invalid)?
    } else {
        serde_json::from_slice(&bytes).map_err(invalid)?
    };
    Ok((value, permit))
}

/// JSON values a publish may hold: per message its fields and headers.
fn publish_values(limits: &tidewater_core::Limits) -> usize {
    (limits.max_batch_messages + 1).saturating_mul(24 + 2 * limits.max_headers) + 64
}

/// JSON values of the largest valid queue configuration: every fairness weight (a key and
/// a value each), every tenant of a quota with its four limits (ten values each), and a
/// margin for the other fields.
pub(crate) const CONFIG_VALUES: usize = 2 * tidewater_core::config::MAX_FAIRNESS_WEIGHTS
    + 10 * tidewater_core::config::MAX_QUOTA_TENANTS
    + 1_000;
/// JSON values of the largest valid produce: per record its fields and headers.
fn produce_values(limits: &tidewater_core::Limits) -> usize {
    (limits.max_batch_messages + 1).saturating_mul(20 + 2 * limits.max_headers) + 64
}

/// JSON values of the small request bodies (receive, redrive).
const SMALL_VALUES: usize = 256;

/// The HTTP listener's limits (docs/configuration.md, `[http]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// A request head (and, between requests, the next one) must arrive within this long.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub shutdown_timeout: Duration,
}

/// Serves HTTP/1.1 with a connection cap, header and body deadlines, and a shutdown that
/// ends within `shutdown_timeout` whatever clients do (in-flight requests finish first).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<crate::tls::Tls>>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) {
    let bounds = Bounds {
        name: "HTTP",
        max_connections: limits.max_connections,
        shutdown_timeout: limits.shutdown_timeout,
    };
    let header_timeout = limits.header_timeout;
    let stop = shutdown.clone();
    let refusal: fn(&TcpStream, usize) = if tls.is_some() {
        |_, _| {} // a plain-text refusal means nothing to a TLS client: just close
    } else {
        refuse
    };
    let serve_one = move |stream: TcpStream, addr: SocketAddr| {
        let (router, stop, tls) = (router.clone(), stop.clone(), tls.clone());
        async move {
            match tls {
                None => {
                    let peer = Peer {
                        addr,
                        certificate: None,
                    };
                    serve_connection(stream, peer, router, header_timeout, stop).await;
                }
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        let peer = Peer {
                            addr,
                            certificate: crate::tls::peer_principal(&stream).map(Arc::from),
                        };
                        serve_connection(stream, peer, router, header_timeout, stop).await;
                    }
                    Err(err) => tracing::debug!(%addr, error = %err, "HTTP TLS handshake failed"),
                },
            }
        }
    };
    accept_loop(listener, bounds, stats, shutdown, refusal, serve_one).await;
}

/// Serves one connection (plain or TLS) until it closes or the listener shuts down.
async fn serve_connection<S>(
    stream: S,
    peer: Peer,
    router: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(peer.clone());
            let mut router = router.clone();
            async move { tower::Service::call(&mut router, request).await }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            // Finish the request in progress, then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.as_mut().await;
        }
    }
}

/// Answers a connection over the cap with a 503 and closes it, without waiting for it.
fn refuse(stream: &TcpStream, max: usize) {
    let body = format!(
        "{{\"code\":\"overloaded\",\"message\":\"the server holds its maximum of {max} HTTP connections (http.max_connections); retry later\",\"retry_after_ms\":1000}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(crate::console::index))
        .route("/console/{file}", get(crate::console::asset))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/queues", get(list_queues))
        .route(
            "/v1/queues/{queue}",
            get(get_queue).put(put_queue).delete(delete_queue),
        )
        .route("/v1/queues/{queue}/forecast", get(observe::queue_forecast))
        .route("/v1/queues/{queue}/history", get(observe::queue_history))
        .route("/v1/queues/{queue}/busiest", get(observe::queue_busiest))
        .route("/v1/queues/{queue}/purge", post(purge))
        .route("/v1/queues/{queue}/messages", post(publish).get(peek))
        .route("/v1/queues/{queue}/receive", post(receive))
        .route("/v1/queues/{queue}/ack", post(ack))
        .route("/v1/queues/{queue}/nack", post(nack))
        .route("/v1/queues/{queue}/extend", post(extend))
        .route("/v1/queues/{queue}/redrive", post(redrive))
        .route("/v1/redrives", get(list_redrives))
        .route("/v1/streams", get(list_streams))
        .route(
            "/v1/streams/{stream}",
            get(get_stream).put(put_stream).delete(delete_stream),
        )
        .route("/v1/streams/{stream}/records", post(produce))
        .route(
            "/v1/streams/{stream}/partitions/{partition}/records",
            get(fetch),
        )
        .route(
            "/v1/streams/{stream}/partitions/{partition}/offsets",
            get(offset_for_time),
        )
        .route("/v1/groups", get(list_groups))
        .route(
            "/v1/groups/{group}",
            get(describe_group).delete(delete_group),
        )
        .route("/v1/groups/{group}/forecast", get(observe::group_forecast))
        .route("/v1/groups/{group}/history", get(observe::group_history))
        .route("/v1/groups/{group}/offsets/reset", post(reset_offsets))
        .route("/v1/groups/{group}/consumers", post(create_consumer))
        .route(
            "/v1/groups/{group}/consumers/{member}",
            axum::routing::delete(delete_consumer),
        )
        .route(
            "/v1/groups/{group}/consumers/{member}/records",
            get(consumer_fetch),
        )
        .route(
            "/v1/groups/{group}/consumers/{member}/commit",
            post(consumer_commit),
        )
        .route(
            "/v1/redrives/{id}",
            get(redrive_progress).delete(cancel_redrive),
        )
        .route("/v1/subscriptions", get(list_all_subscriptions))
        .route(
            "/v1/streams/{stream}/subscriptions",
            get(list_subscriptions),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}",
            get(get_subscription)
                .put(put_subscription)
                .delete(delete_subscription),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/forecast",
            get(observe::subscription_forecast),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/history",
            get(observe::subscription_history),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/receive",
            post(subscription_receive),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/ack",
            post(subscription_ack),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/nack",
            post(subscription_nack),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/extend",
            post(subscription_extend),
        )
        .route(
            "/v1/streams/{stream}/subscriptions/{sub}/purge",
            post(subscription_purge),
        )
        .route("/v1/hooks", get(edges::list_hooks))
        .route(
            "/v1/hooks/{hook}",
            get(edges::get_hook)
                .put(edges::put_hook)
                .delete(edges::delete_hook)
                .post(edges::ingest),
        )
        .route("/v1/pushes", get(edges::list_pushes))
        .route(
            "/v1/pushes/{push}",
            get(edges::get_push)
                .put(edges::put_push)
                .delete(edges::delete_push),
        )
        .route("/v1/auth/whoami", get(whoami))
        .route("/v1/auth/keys", get(list_keys).post(create_key))
        .route("/v1/auth/keys/{id}", axum::routing::delete(revoke_key))
        .route("/v1/auth/acls", get(list_acls).post(grant))
        .route("/v1/auth/acls/{id}", axum::routing::delete(revoke_acl))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The webhook ingress listener's routes: POST {prefix}/{hook} and /healthz, nothing else
/// (the API stays on its own listener). A hook with preset none is refused here while
/// authentication is on: it needs an API key, which only the API listener checks.
pub fn hooks_router(state: AppState, prefix: &str) -> Router {
    Router::new()
        .route(&format!("{prefix}/{{hook}}"), post(edges::ingest_public))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Authenticates the request (a bearer token, or none: the anonymous principal) and
/// checks what its route needs (`auth::ROUTES`) before the handler runs; the handler
/// finds the `Caller` in the request's extensions. A route missing from the table is
/// refused to everyone.
async fn authorize(
    State(state): State<AppState>,
    matched: axum::extract::MatchedPath,
    params: axum::extract::RawPathParams,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().as_str().to_string();
    let route = crate::auth::route_of(&method, matched.as_str());
    // Admin operations are audited with their outcome (key and grant changes by their
    // handlers, which name what they made).
    let audited = route.is_some_and(|r| {
        matches!(r.need, Need::Op(tidewater_auth::Operation::Admin, _))
            && !r.path.starts_with("/v1/auth/")
    });
    // Kept only for what is audited (no copy on the hot path of publishes and receives).
    let path = if audited {
        request.uri().path().to_string()
    } else {
        String::new()
    };
    let peer = request.extensions().get::<Peer>().map(|p| p.addr);
    if !state.guard.enabled {
        request.extensions_mut().insert(Caller::Open);
        let response = next.run(request).await;
        if audited {
            tracing::info!(target: "tidewater::audit", peer = ?peer, principal = "-", method = %method, path = %path, status = response.status().as_u16(), "admin operation");
        }
        return response;
    }
    let Some(route) = route else {
        let refusal = ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "{method} {} has no permission defined: refused while authentication is on",
                matched.as_str()
            ),
        );
        return refuse_unread(&state, request, refusal.into_response()).await;
    };
    if route.need == Need::Open {
        return next.run(request).await;
    }
    if route.need == Need::Hook {
        // The signature is the sender's credential, checked by the handler.
        let name = params
            .iter()
            .find(|(k, _)| *k == "hook")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        let unsigned = state
            .broker()
            .ok()
            .and_then(|b| b.hook_unsigned(&name))
            .unwrap_or(false);
        if !unsigned {
            return next.run(request).await;
        }
    }
    let broker = match state.broker() {
        Ok(broker) => broker,
        Err(err) => return refuse_unread(&state, request, err.into_response()).await,
    };
    let (peer, certificate) = request
        .extensions()
        .get::<Peer>()
        .map_or((std::net::IpAddr::from([0, 0, 0, 0]), None), |p| {
            (p.addr.ip(), p.certificate.clone())
        });
    let authenticated = bearer(request.headers()).and_then(|token| {
        state
            .guard
            .authenticate(broker, token, certificate.as_deref(), peer, "http")
            .map_err(ApiError::from)
    });
    let (auth, identity) = match authenticated {
        Ok(found) => found,
        Err(err) => return refuse_unread(&state, request, err.into_response()).await,
    };
    let caller = Caller::Known {
        state: auth,
        identity: Arc::new(identity),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    let checked = match route.need {
        // A listing by a caller without credentials, when nothing is granted to
        // `anonymous`: tell it to authenticate rather than answer an empty list.
        Need::List(kind)
            if kind != tidewater_auth::ResourceKind::Cluster
                && matches!(&caller, Caller::Known { state, identity }
                if identity.is_anonymous() && state.grants_of(identity).next().is_none()) =>
        {
            Err(BrokerError::new(
                ErrorCode::Unauthenticated,
                "authentication is on: listing needs credentials (an API key's token <key id>.<secret>: --token or TIDEWATER_TOKEN for the CLI, Authorization: Bearer over HTTP)",
            ))
        }
        Need::Open | Need::List(_) => Ok(()),
        Need::Hook => caller.check(
            tidewater_auth::Operation::Produce,
            &tidewater_auth::Resource::new(tidewater_auth::ResourceKind::Hook, &param("hook")),
        ),
        Need::Op(op, Target::Cluster) => caller.check(op, &tidewater_auth::Resource::CLUSTER),
        Need::Op(op, Target::Param(kind, name)) => {
            caller.check(op, &tidewater_auth::Resource::new(kind, &param(name)))
        }
        Need::Op(op, Target::Subscription) => {
            let name = subscription_name(&param("stream"), &param("sub"));
            caller.check(
                op,
                &tidewater_auth::Resource::new(tidewater_auth::ResourceKind::Subscription, &name),
            )
        }
    };
    if let Err(err) = checked {
        if let Some(identity) = caller.identity() {
            tracing::warn!(target: "tidewater::audit", %peer, listener = "http", principal = %identity.principal, method = %method, path = %request.uri().path(), reason = %err.message, "request denied");
        }
        return refuse_unread(&state, request, ApiError::from(err).into_response()).await;
    }
    let principal = caller
        .identity()
        .map(|i| i.principal.clone())
        .unwrap_or_default();
    let key = caller
        .identity()
        .and_then(|i| i.key_id.clone())
        .unwrap_or_else(|| "-".into());
    request.extensions_mut().insert(caller);
    let response = next.run(request).await;
    if audited {
        tracing::info!(target: "tidewater::audit", %peer, principal = %principal, key = %key, method = %method, path = %path, status = response.status().as_u16(), "admin operation");
    }
    response
}

/// A refusal before the handler read the request's body: the body is drained first, as
/// for a body refused while read (`drain`).
async fn refuse_unread(
    state: &AppState,
    request: axum::extract::Request,
    response: Response,
) -> Response {
    drain(state, &mut request.into_body()).await;
    response
}

/// The bearer token of `Authorization`, if any.
fn bearer(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    text.map(Some).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "the Authorization header is not 'Bearer <key id>.<secret>'",
        )
    })
}

/// Every error is `{code, message}`: rejections made before a handler runs (a query string
/// that does not parse, a path that is not UTF-8) come as plain text from axum, and are
/// wrapped here with the code their status means.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (_, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status.as_u16() {
        404 => Code::NotFound,
        405 => Code::MethodNotAllowed,
        408 => Code::ConnectionTimeout,
        413 => Code::Broker(ErrorCode::RequestTooLarge),
        503 => Code::NotReady,
        500..=599 => Code::Broker(ErrorCode::Internal),
        _ => Code::Broker(ErrorCode::InvalidRequest),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut response = ApiError::new(code, message).into_response();
    *response.status_mut() = status;
    response
}

async fn not_found(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    let refusal = ApiError::new(
        Code::NotFound,
        "no such endpoint; the API is described at /v1/openapi.json",
    );
    refuse_unread(&state, request, refusal.into_response()).await
}

async fn method_not_allowed(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Response {
    let refusal = ApiError::new(
        Code::MethodNotAllowed,
        format!("this endpoint does not take {}", request.method()),
    );
    refuse_unread(&state, request, refusal.into_response()).await
}

async fn healthz() -> ApiResult {
    json(StatusCode::OK, &serde_json::json!({"status": "alive"}))
}

async fn readyz(State(state): State<AppState>) -> ApiResult {
    let broker = state.broker()?;
    if broker.store().is_poisoned() {
        let why = broker
            .store()
            .poison_reason()
            .unwrap_or_else(|| "a storage failure".to_string());
        return Err(ApiError::new(
            ErrorCode::StorageFailed,
            format!("the store refuses writes after {why}"),
        ));
    }
    json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn openapi(State(state): State<AppState>) -> Response {
    json_body(&crate::openapi::document(&state.limits))
}

/// Whether the caller may see the resource in a listing.
pub(crate) fn visible(caller: &Caller, kind: ResourceKind, name: &str) -> bool {
    caller.may(Operation::Describe, &Resource::new(kind, name))
}

async fn list_queues(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let mut queues = state.broker()?.list_queues();
    queues.retain(|q| visible(&caller, ResourceKind::Queue, &q.name));
    json(StatusCode::OK, &serde_json::json!({ "queues": queues }))
}

async fn get_queue(State(state): State<AppState>, Path(queue): Path<String>) -> ApiResult {
    json(StatusCode::OK, &state.broker()?.get_queue(&queue)?)
}

async fn put_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (patch, _permit): (ConfigPatch, _) = config_body(
        &state,
        body,
        CONFIG_VALUES,
        "queue",
        "{\"lease_ms\": 30000}",
    )
    .await?;
    let (created, info) = broker.put_queue(&queue, &patch).await?;
    created_or_ok(created, &info)
}

/// The configuration patch of a PUT: the patch object itself, or `{"config": patch}` as a
/// GET returns it; no body is `{}`. Anything but an object is `invalid_config` (serde would
/// take an array for a struct).
pub(crate) async fn config_body<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
    max_values: usize,
    what: &str,
    example: &str,
) -> Result<(T, BodyPermit), ApiError> {
    // (An array is refused below, as invalid_config.)
    let (value, permit): (serde_json::Value, _) =
        parse_json(state, body, Some(serde_json::json!({})), max_values, false).await?;
    let config = match value {
        serde_json::Value::Object(mut map)
            if map.len() == 1 && map.get("config").is_some_and(|c| c.is_object()) =>
        {
            map.remove("config").unwrap()
        }
        other => other,
    };
    if !config.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidConfig,
            format!("{what} configuration: give a JSON object, like {example}"),
        ));
    }
    let patch = serde_json::from_value(config).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidConfig,
            format!("{what} configuration: {e}"),
        )
    })?;
    Ok((patch, permit))
}

async fn delete_queue(State(state): State<AppState>, Path(queue): Path<String>) -> ApiResult {
    state.broker()?.delete_queue(&queue).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn purge(State(state): State<AppState>, Path(queue): Path<String>) -> ApiResult {
    let purged = state.broker()?.purge(&queue).await?;
    json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
}

async fn publish(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::PublishRequest, _) =
        parse_body(&state, body, None, publish_values(broker.limits())).await?;
    let level = api::ack_level(request.ack.as_deref())?;
    let resource = Resource::new(ResourceKind::Queue, &queue);
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(idx, m)| m.into_message(idx))
        .map(|m| {
            let mut m = m?;
            let asked = m.tenant.take().or_else(|| request.tenant.clone());
            m.tenant = caller.tenant_for(asked.as_deref(), &resource)?;
            Ok::<_, ApiError>(m)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let published = broker.publish(&queue, &messages, level).await?;
    json(
        StatusCode::OK,
        &api::PublishReply {
            ids: published.ids,
            duplicates: published.duplicates,
        },
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PeekQuery {
    max: Option<usize>,
    from: Option<u64>,
    encoding: Option<api::BodyEncoding>,
}

async fn peek(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    Query(query): Query<PeekQuery>,
) -> ApiResult {
    let broker = state.broker()?;
    // The default page is 10, or max_receive_messages when that is lower.
    let max = query
        .max
        .unwrap_or(10.min(broker.limits().max_receive_messages));
    let peeked = broker.peek(&queue, query.from.unwrap_or(0), max)?;
    let next_from = peeked.last().map(|p| p.record.offset + 1);
    let messages: Vec<OutMessage> = peeked
        .iter()
        .map(|p| OutMessage {
            record: &p.record,
            receipt: None,
            delivery_count: p.delivery_count,
            encoding: query.encoding.unwrap_or_default(),
            partition: None,
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "messages": messages, "next_from": next_from }),
    )
}

async fn receive(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    peer: Option<Extension<Peer>>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    receive_from(&state, &caller, peer, &queue, body, false).await
}

/// Receive from a queue, or from a subscription (`stream/subscription`).
async fn receive_from(
    state: &AppState,
    caller: &Caller,
    peer: Option<Extension<Peer>>,
    queue: &str,
    body: Body,
    subscription: bool,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::ReceiveRequest, _) = parse_body(
        state,
        body,
        Some(api::ReceiveRequest::default()),
        SMALL_VALUES,
    )
    .await?;
    let consumer = match (&request.consumer, peer) {
        (Some(name), _) if name.is_empty() || name.chars().count() > 200 => {
            return Err(BrokerError::invalid("consumer must be 1 to 200 characters").into());
        }
        (Some(name), _) => consumer_id(format!("name:{name}").as_bytes()),
        (None, Some(Extension(peer))) => consumer_id(format!("peer:{}", peer.addr).as_bytes()),
        (None, None) => tidewater_core::broker::ANONYMOUS_CONSUMER,
    };
    let mut deliveries = broker
        .receive_as(
            consumer,
            queue,
            request.max.unwrap_or(1),
            request.wait_ms.unwrap_or(0),
            request.lease_ms,
        )
        .await?;
    for d in &mut deliveries {
        caller.bind_receipt(&state.guard.inner.receipts, &mut d.receipt);
    }
    let messages: Vec<OutMessage> = deliveries
        .iter()
        .map(|d| OutMessage::delivered(d, request.encoding, subscription))
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "messages": messages }))
}

async fn receipts_body(
    state: &AppState,
    broker: &Broker,
    body: Body,
) -> Result<(api::ReceiptsRequest, BodyPermit), ApiError> {
    let max = broker.limits().max_receive_messages + SMALL_VALUES;
    parse_body(state, body, None, max).await
}

async fn ack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    ack_in(&state, &caller, &queue, body).await
}

/// The queue or subscription a settle names, as a resource.
fn settle_resource(queue: &str) -> Resource<'_> {
    if queue.contains('/') {
        Resource::new(ResourceKind::Subscription, queue)
    } else {
        Resource::new(ResourceKind::Queue, queue)
    }
}

/// Settles the receipts the caller may settle (`settle` gets them as the broker knows
/// them); the others fail as `forbidden`, each reply names receipts as the caller sent them.
async fn settle_receipts<F, Fut>(
    state: &AppState,
    caller: &Caller,
    queue: &str,
    receipts: &[String],
    settle: F,
) -> Result<tidewater_core::SettleReply, ApiError>
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<tidewater_core::SettleReply, BrokerError>>,
{
    let (mine, others) = caller.unbind_receipts(
        &state.guard.inner.receipts,
        &settle_resource(queue),
        receipts,
    );
    let raw: Vec<String> = mine.iter().map(|(_, r)| (*r).to_string()).collect();
    let mut reply = if raw.is_empty() && !receipts.is_empty() {
        tidewater_core::SettleReply::default()
    } else {
        settle(raw).await?
    };
    if matches!(caller, Caller::Known { .. }) {
        // Name receipts as the caller sent them.
        let sent: std::collections::HashMap<&str, usize> =
            mine.iter().map(|(i, raw)| (*raw, *i)).collect();
        let shown = |raw: &str| {
            sent.get(raw)
                .map_or_else(|| raw.to_string(), |&i| receipts[i].clone())
        };
        for f in &mut reply.failed {
            f.receipt = shown(&f.receipt);
        }
        for s in &mut reply.superseded {
            *s = shown(s);
        }
        for i in others {
            reply.failed.push(tidewater_core::broker::ReceiptFailure {
                receipt: receipts[i].clone(),
                code: ErrorCode::Forbidden.as_str(),
            });
        }
    }
    Ok(reply)
}

async fn ack_in(state: &AppState, caller: &Caller, queue: &str, body: Body) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit) = receipts_body(state, broker, body).await?;
    let reply = settle_receipts(state, caller, queue, &request.receipts, |raw| async move {
        broker.ack(queue, &raw).await
    })
    .await?;
    json(StatusCode::OK, &reply)
}

async fn nack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    nack_in(&state, &caller, &queue, body).await
}

async fn nack_in(state: &AppState, caller: &Caller, queue: &str, body: Body) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit) = receipts_body(state, broker, body).await?;
    let reason = NackReason::parse(request.reason.as_deref())?;
    let error = request.error.as_deref();
    let delay = request.delay_ms;
    let reply = settle_receipts(state, caller, queue, &request.receipts, |raw| async move {
        broker.nack(queue, &raw, delay, error, reason).await
    })
    .await?;
    json(StatusCode::OK, &reply)
}

async fn extend(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    extend_in(&state, &caller, &queue, body).await
}

async fn extend_in(state: &AppState, caller: &Caller, queue: &str, body: Body) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit) = receipts_body(state, broker, body).await?;
    let lease = request.lease_ms;
    let reply = settle_receipts(state, caller, queue, &request.receipts, |raw| async move {
        broker.extend(queue, &raw, lease)
    })
    .await?;
    json(StatusCode::OK, &reply)
}

async fn redrive(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::RedriveBody, _) = parse_body(
        &state,
        body,
        Some(api::RedriveBody::default()),
        SMALL_VALUES,
    )
    .await?;
    if let Some(to) = &request.to {
        caller.check(Operation::Produce, &Resource::new(ResourceKind::Queue, to))?;
    }
    let progress = broker.start_redrive(
        &queue,
        RedriveRequest {
            to: request.to,
            rate_per_s: request.rate_per_s.unwrap_or(1_000),
            max: request.max.unwrap_or(0),
            key: request.filter.key,
            error_contains: request.filter.error_contains,
            ids: request.filter.ids,
        },
    )?;
    json(StatusCode::ACCEPTED, &progress)
}

async fn redrive_progress(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult {
    json(StatusCode::OK, &state.broker()?.redrive_progress(&id)?)
}

async fn list_redrives(State(state): State<AppState>) -> ApiResult {
    let redrives = state.broker()?.list_redrives();
    json(StatusCode::OK, &serde_json::json!({ "redrives": redrives }))
}

async fn cancel_redrive(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult {
    json(StatusCode::OK, &state.broker()?.cancel_redrive(&id).await?)
}

// ---- subscriptions ----

/// The name a subscription is received, acked and nacked by.
fn subscription_name(stream: &str, sub: &str) -> String {
    tidewater_core::stream::subscription::subscription_path(stream, sub)
}

async fn list_all_subscriptions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let mut subscriptions = state.broker()?.list_subscriptions(None)?;
    subscriptions.retain(|s| {
        visible(
            &caller,
            ResourceKind::Subscription,
            &subscription_name(&s.stream, &s.name),
        )
    });
    json(
        StatusCode::OK,
        &serde_json::json!({ "subscriptions": subscriptions }),
    )
}

async fn list_subscriptions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(stream): Path<String>,
) -> ApiResult {
    let mut subscriptions = state.broker()?.list_subscriptions(Some(&stream))?;
    subscriptions.retain(|s| {
        visible(
            &caller,
            ResourceKind::Subscription,
            &subscription_name(&s.stream, &s.name),
        )
    });
    json(
        StatusCode::OK,
        &serde_json::json!({ "subscriptions": subscriptions }),
    )
}

async fn get_subscription(
    State(state): State<AppState>,
    Path((stream, sub)): Path<(String, String)>,
) -> ApiResult {
    json(
        StatusCode::OK,
        &state.broker()?.get_subscription(&stream, &sub)?,
    )
}

async fn put_subscription(
    State(state): State<AppState>,
    Path((stream, sub)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (value, _permit): (serde_json::Value, _) = config_body(
        &state,
        body,
        CONFIG_VALUES,
        "subscription",
        "{\"start\": \"earliest\", \"key_concurrency\": 1}",
    )
    .await?;
    let patch = tidewater_core::stream::subscription::SubscriptionPatch::from_value(value)?;
    let (created, info) = broker.put_subscription(&stream, &sub, &patch).await?;
    created_or_ok(created, &info)
}

async fn delete_subscription(
    State(state): State<AppState>,
    Path((stream, sub)): Path<(String, String)>,
) -> ApiResult {
    state.broker()?.delete_subscription(&stream, &sub).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn subscription_receive(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    peer: Option<Extension<Peer>>,
    Path((stream, sub)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    receive_from(
        &state,
        &caller,
        peer,
        &subscription_name(&stream, &sub),
        body,
        true,
    )
    .await
}

async fn subscription_ack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((stream, sub)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    ack_in(&state, &caller, &subscription_name(&stream, &sub), body).await
}

async fn subscription_nack(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((stream, sub)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    nack_in(&state, &caller, &subscription_name(&stream, &sub), body).await
}

async fn subscription_extend(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((stream, sub)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    extend_in(&state, &caller, &subscription_name(&stream, &sub), body).await
}

async fn subscription_purge(
    State(state): State<AppState>,
    Path((stream, sub)): Path<(String, String)>,
) -> ApiResult {
    let purged = state
        .broker()?
        .purge(&subscription_name(&stream, &sub))
        .await?;
    json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
}

// ---- streams ----

async fn list_streams(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let mut streams = state.broker()?.list_streams();
    streams.retain(|s| visible(&caller, ResourceKind::Stream, &s.name));
    json(StatusCode::OK, &serde_json::json!({ "streams": streams }))
}

async fn get_stream(State(state): State<AppState>, Path(stream): Path<String>) -> ApiResult {
    json(StatusCode::OK, &state.broker()?.get_stream(&stream)?)
}

async fn put_stream(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (patch, _permit): (StreamPatch, _) =
        config_body(&state, body, SMALL_VALUES, "stream", "{\"partitions\": 4}").await?;
    let (created, info) = broker.put_stream(&stream, &patch).await?;
    created_or_ok(created, &info)
}

async fn delete_stream(State(state): State<AppState>, Path(stream): Path<String>) -> ApiResult {
    state.broker()?.delete_stream(&stream).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn produce(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(stream): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::ProduceRequest, _) =
        parse_body(&state, body, None, produce_values(broker.limits())).await?;
    let level = api::ack_level(request.ack.as_deref())?;
    let records = request
        .records
        .into_iter()
        .enumerate()
        .map(|(idx, r)| r.into_record(idx))
        .collect::<Result<Vec<_>, _>>()?;
    // A record naming a tenant other than the principal's needs set_tenant on the stream
    // (work-queue subscriptions count it against that tenant).
    let resource = Resource::new(ResourceKind::Stream, &stream);
    for record in &records {
        for (name, value) in &record.headers {
            if name == tidewater_core::queue::HEADER_TENANT {
                let asked = value.as_deref().map(String::from_utf8_lossy);
                caller.tenant_for(asked.as_deref(), &resource)?;
            }
        }
    }
    let produced = broker.produce(&stream, &records, level).await?;
    let offsets: Vec<serde_json::Value> = produced
        .offsets
        .iter()
        .map(|(partition, offset)| serde_json::json!({"partition": partition, "offset": offset}))
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "offsets": offsets }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchQuery {
    offset: Option<u64>,
    max_bytes: Option<usize>,
    wait_ms: Option<u64>,
    encoding: Option<api::BodyEncoding>,
}

/// Bytes of records a fetch returns unless asked otherwise.
pub const FETCH_BYTES_DEFAULT: usize = 1 << 20;

async fn fetch(
    State(state): State<AppState>,
    Path((stream, partition)): Path<(String, u32)>,
    Query(query): Query<FetchQuery>,
) -> ApiResult {
    let broker = state.broker()?;
    let offset = query.offset.unwrap_or(0);
    let max_bytes = query
        .max_bytes
        .unwrap_or(FETCH_BYTES_DEFAULT.min(broker.limits().max_fetch_bytes));
    let (records, next_offset, fetched) = broker
        .fetch_records(
            &stream,
            partition,
            offset,
            max_bytes,
            query.wait_ms.unwrap_or(0),
        )
        .await?;
    let encoding = query.encoding.unwrap_or_default();
    let out: Vec<api::OutRecord> = records
        .iter()
        .map(|record| api::OutRecord { record, encoding })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "records": out,
            "next_offset": next_offset,
            "start_offset": fetched.start_offset,
            "end_offset": fetched.end_offset,
        }),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetQuery {
    time: i64,
}

async fn offset_for_time(
    State(state): State<AppState>,
    Path((stream, partition)): Path<(String, u32)>,
    Query(query): Query<OffsetQuery>,
) -> ApiResult {
    // Kafka's ListOffsets: -1 the end, -2 the start, else the first record at or after.
    let offset = state
        .broker()?
        .list_offset(&stream, partition, query.time)?;
    json(StatusCode::OK, &serde_json::json!({ "offset": offset }))
}

// ---- consumer groups ----

/// A member's session unless it asks for another.
const SESSION_TIMEOUT_DEFAULT_MS: u64 = 30_000;

async fn list_groups(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let mut groups = state.broker()?.list_groups().await;
    groups.retain(|g| visible(&caller, ResourceKind::Group, g));
    json(StatusCode::OK, &serde_json::json!({ "groups": groups }))
}

async fn describe_group(State(state): State<AppState>, Path(group): Path<String>) -> ApiResult {
    json(
        StatusCode::OK,
        &state.broker()?.describe_group(&group).await?,
    )
}

async fn delete_group(State(state): State<AppState>, Path(group): Path<String>) -> ApiResult {
    state.broker()?.delete_group(&group).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reset_offsets(
    State(state): State<AppState>,
    Path(group): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let max_streams = broker.limits().max_streams;
    let (request, _permit): (api::ResetOffsetsRequest, _) =
        parse_body(&state, body, None, SMALL_VALUES + max_streams).await?;
    let to = request.target()?;
    if request
        .streams
        .as_ref()
        .is_some_and(|s| s.len() > max_streams)
    {
        return Err(BrokerError::invalid(format!(
            "streams names at most max_streams ({max_streams}) streams"
        ))
        .into());
    }
    let dry_run = request.dry_run.unwrap_or(false);
    let offsets = broker
        .reset_offsets(&group, request.streams.as_deref(), to, dry_run)
        .await?;
    json(
        StatusCode::OK,
        &serde_json::json!({ "group": group, "dry_run": dry_run, "offsets": offsets }),
    )
}

async fn create_consumer(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(group): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::ConsumerRequest, _) =
        parse_body(&state, body, None, SMALL_VALUES).await?;
    for stream in &request.streams {
        caller.check(
            Operation::Consume,
            &Resource::new(ResourceKind::Stream, stream),
        )?;
    }
    let session = request
        .session_timeout_ms
        .unwrap_or(SESSION_TIMEOUT_DEFAULT_MS.min(broker.limits().max_session_timeout_ms));
    let member = broker.create_consumer(
        &group,
        request.instance.as_deref(),
        &request.streams,
        session,
        request.start_at.unwrap_or_default(),
    )?;
    json(
        StatusCode::CREATED,
        &serde_json::json!({ "group": group, "member": member, "session_timeout_ms": session }),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteConsumerQuery {
    commit: Option<bool>,
}

async fn delete_consumer(
    State(state): State<AppState>,
    Path((group, member)): Path<(String, String)>,
    Query(query): Query<DeleteConsumerQuery>,
) -> ApiResult {
    state
        .broker()?
        .delete_consumer(&group, &member, query.commit.unwrap_or(true))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerFetchQuery {
    max_bytes: Option<usize>,
    max_records: Option<usize>,
    wait_ms: Option<u64>,
    encoding: Option<api::BodyEncoding>,
}

async fn consumer_fetch(
    State(state): State<AppState>,
    Path((group, member)): Path<(String, String)>,
    Query(query): Query<ConsumerFetchQuery>,
) -> ApiResult {
    let broker = state.broker()?;
    let max_bytes = query
        .max_bytes
        .unwrap_or(FETCH_BYTES_DEFAULT.min(broker.limits().max_fetch_bytes));
    if query.max_records == Some(0) {
        return Err(BrokerError::invalid("max_records must be at least 1").into());
    }
    let records = broker
        .consumer_fetch_records(
            &group,
            &member,
            max_bytes,
            query.max_records.unwrap_or(usize::MAX),
            query.wait_ms.unwrap_or(0),
        )
        .await?;
    let encoding = query.encoding.unwrap_or_default();
    let out: Vec<api::OutMemberRecord> = records
        .iter()
        .map(|record| api::OutMemberRecord { record, encoding })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "records": out }))
}

async fn consumer_commit(
    State(state): State<AppState>,
    Path((group, member)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::CommitRequest, _) = parse_body(
        &state,
        body,
        Some(api::CommitRequest::default()),
        SMALL_VALUES + 4 * broker.limits().max_partitions as usize,
    )
    .await?;
    let offsets: Option<Vec<(String, u32, u64)>> = request.offsets.map(|list| {
        list.into_iter()
            .map(|o| (o.stream, o.partition, o.offset))
            .collect()
    });
    broker
        .commit_consumer(&group, &member, offsets.as_deref())
        .await?;
    json(StatusCode::OK, &serde_json::json!({}))
}

// ---- auth ----

/// Who the caller is, and its grants (or that authentication is off).
async fn whoami(Extension(caller): Extension<Caller>) -> ApiResult {
    let Caller::Known { state, identity } = &caller else {
        return json(
            StatusCode::OK,
            &serde_json::json!({ "authentication": false }),
        );
    };
    let grants: Vec<_> = state.grants_of(identity).cloned().collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "authentication": true,
            "principal": identity.principal,
            "roles": identity.roles,
            "tenant": identity.tenant,
            "key_id": identity.key_id,
            "anonymous": identity.is_anonymous(),
            "grants": grants,
        }),
    )
}

async fn list_keys(State(state): State<AppState>) -> ApiResult {
    let auth = state.broker()?.auth();
    let keys: Vec<_> = auth.keys().map(tidewater_auth::ApiKey::info).collect();
    json(StatusCode::OK, &serde_json::json!({ "keys": keys }))
}

async fn create_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::KeyRequest, _) =
        parse_body(&state, body, None, SMALL_VALUES).await?;
    let spec = request.into_spec(broker.now_ms())?;
    let made = broker.create_key(spec, None).await?;
    audit(
        &caller,
        "key.create",
        &made.info.id,
        &format!("principal {}", made.info.principal),
    );
    json(
        StatusCode::CREATED,
        &serde_json::json!({ "key": made.info, "secret": made.secret, "token": made.token() }),
    )
}

async fn revoke_key(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let key = state.broker()?.revoke_key(&id).await?;
    audit(
        &caller,
        "key.revoke",
        &id,
        &format!("principal {}", key.principal),
    );
    json(StatusCode::OK, &serde_json::json!({ "revoked": key }))
}

async fn list_acls(State(state): State<AppState>) -> ApiResult {
    let auth = state.broker()?.auth();
    let acls: Vec<_> = auth.acls().cloned().collect();
    json(StatusCode::OK, &serde_json::json!({ "acls": acls }))
}

async fn grant(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (request, _permit): (api::AclRequest, _) =
        parse_body(&state, body, None, SMALL_VALUES).await?;
    let acl = broker.grant(request.into_spec()?).await?;
    audit(
        &caller,
        "acl.grant",
        &acl.id,
        &serde_json::to_string(&acl).unwrap_or_default(),
    );
    json(StatusCode::CREATED, &serde_json::json!({ "acl": acl }))
}

async fn revoke_acl(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let acl = state.broker()?.revoke_acl(&id).await?;
    audit(
        &caller,
        "acl.revoke",
        &id,
        &serde_json::to_string(&acl).unwrap_or_default(),
    );
    json(StatusCode::OK, &serde_json::json!({ "revoked": acl }))
}

/// An admin change, in the audit log.
fn audit(caller: &Caller, action: &str, target: &str, detail: &str) {
    let principal = caller.identity().map_or("-", |i| i.principal.as_str());
    let key = caller
        .identity()
        .and_then(|i| i.key_id.as_deref())
        .unwrap_or("-");
    tracing::info!(target: "tidewater::audit", principal, key, action, target, detail, "admin change");
}
