//! HTTP API v1 over the broker. Thin glue: parse, call the broker, shape the reply.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tidewater_core::{Broker, BrokerError, ConfigPatch, ErrorCode, NackReason, RedriveRequest};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::{self, ErrorBody, OutMessage};
use crate::binary::{OpenGuard, Stats};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    /// Set once recovery finishes; until then the API answers 503 not_ready.
    pub broker: Arc<OnceLock<Broker>>,
    pub metrics: Arc<Metrics>,
    pub max_request_bytes: usize,
    /// A request body must arrive within this long.
    pub body_timeout: std::time::Duration,
}

impl AppState {
    fn broker(&self) -> Result<&Broker, ApiError> {
        self.broker.get().ok_or_else(|| {
            ApiError(BrokerError::new(
                ErrorCode::NotReady,
                "the server is still recovering its data",
            ))
        })
    }
}

/// A `BrokerError` as an HTTP response: status from its code, JSON body, Retry-After.
pub struct ApiError(pub BrokerError);

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        ApiError(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let err = self.0;
        let status = StatusCode::from_u16(err.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: err.code.as_str(),
            message: &err.message,
            retry_after_ms: err.retry_after_ms,
        };
        let mut response = (status, json_body(&body)).into_response();
        if let Some(ms) = err.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

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

fn json<T: Serialize>(status: StatusCode, value: &T) -> ApiResult {
    let mut response = json_body(value);
    *response.status_mut() = status;
    Ok(response)
}

/// Reads a bounded body and parses it; an empty body parses as `default`.
async fn parse_body<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
    default: Option<T>,
) -> Result<T, ApiError> {
    let read = tokio::time::timeout(
        state.body_timeout,
        axum::body::to_bytes(body, state.max_request_bytes),
    )
    .await
    .map_err(|_| {
        ApiError(BrokerError::new(
            ErrorCode::ConnectionTimeout,
            format!(
                "the request body did not arrive within {} ms (body_timeout_ms)",
                state.body_timeout.as_millis()
            ),
        ))
    })?;
    let bytes = read.map_err(|_| {
        ApiError(BrokerError::new(
            ErrorCode::RequestTooLarge,
            format!(
                "the request body exceeds max_request_bytes ({} bytes)",
                state.max_request_bytes
            ),
        ))
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace)
        && let Some(default) = default
    {
        return Ok(default);
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidRequest,
            _ => ErrorCode::InvalidJson,
        };
        ApiError(BrokerError::new(code, format!("request body: {e}")))
    })
}

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
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    backoff = Duration::ZERO;
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        refuse(&stream, limits.max_connections);
                        continue;
                    };
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.open.fetch_add(1, Ordering::Relaxed);
                    let open = OpenGuard(stats.clone());
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(router.clone());
                    let mut stop = shutdown.clone();
                    let header_timeout = limits.header_timeout;
                    connections.spawn(async move {
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
                        drop((slot, open));
                    });
                }
                Err(err) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "HTTP: accept failed; backing off (further failures are counted in tidewater_connection_accept_errors_total)");
                    }
                    tokio::time::sleep(backoff).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "HTTP: connections still open at the shutdown deadline; closing them"
        );
        connections.shutdown().await;
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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/queues", get(list_queues))
        .route(
            "/v1/queues/{queue}",
            get(get_queue).put(put_queue).delete(delete_queue),
        )
        .route("/v1/queues/{queue}/purge", post(purge))
        .route("/v1/queues/{queue}/messages", post(publish).get(peek))
        .route("/v1/queues/{queue}/receive", post(receive))
        .route("/v1/queues/{queue}/ack", post(ack))
        .route("/v1/queues/{queue}/nack", post(nack))
        .route("/v1/queues/{queue}/extend", post(extend))
        .route("/v1/queues/{queue}/redrive", post(redrive))
        .route("/v1/redrives", get(list_redrives))
        .route(
            "/v1/redrives/{id}",
            get(redrive_progress).delete(cancel_redrive),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError(BrokerError::new(
        ErrorCode::NotFound,
        "no such endpoint; the API is described at /v1/openapi.json",
    ))
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError(BrokerError::new(
        ErrorCode::MethodNotAllowed,
        format!("this endpoint does not take {method}"),
    ))
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
        return Err(ApiError(BrokerError::new(
            ErrorCode::StorageFailed,
            format!("the store refuses writes after {why}"),
        )));
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

async fn openapi() -> Response {
    json_body(&crate::openapi::document())
}

async fn list_queues(State(state): State<AppState>) -> ApiResult {
    let queues = state.broker()?.list_queues();
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
    let value: serde_json::Value = parse_body(&state, body, Some(serde_json::json!({}))).await?;
    // Accept the config object itself, or {"config": {...}} as GET returns it.
    let config = match value {
        serde_json::Value::Object(mut map)
            if map.len() == 1 && map.get("config").is_some_and(|c| c.is_object()) =>
        {
            map.remove("config").unwrap()
        }
        other => other,
    };
    let patch: ConfigPatch = serde_json::from_value(config).map_err(|e| {
        ApiError(BrokerError::new(
            ErrorCode::InvalidConfig,
            format!("queue configuration: {e}"),
        ))
    })?;
    let (created, info) = broker.put_queue(&queue, &patch).await?;
    json(
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &info,
    )
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
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let request: api::PublishRequest = parse_body(&state, body, None).await?;
    let level = api::ack_level(request.ack.as_deref())?;
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(idx, m)| m.into_message(idx))
        .map(|m| {
            m.map(|mut m| {
                m.tenant = m.tenant.or_else(|| request.tenant.clone());
                m
            })
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
    let peeked = state
        .broker()?
        .peek(&queue, query.from.unwrap_or(0), query.max.unwrap_or(10))?;
    let next_from = peeked.last().map(|p| p.record.offset + 1);
    let messages: Vec<OutMessage> = peeked
        .iter()
        .map(|p| OutMessage {
            record: &p.record,
            receipt: None,
            delivery_count: p.delivery_count,
            encoding: query.encoding.unwrap_or_default(),
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "messages": messages, "next_from": next_from }),
    )
}

async fn receive(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let request: api::ReceiveRequest =
        parse_body(&state, body, Some(api::ReceiveRequest::default())).await?;
    let deliveries = broker
        .receive(
            &queue,
            request.max.unwrap_or(1),
            request.wait_ms.unwrap_or(0),
            request.lease_ms,
        )
        .await?;
    let messages: Vec<OutMessage> = deliveries
        .iter()
        .map(|d| OutMessage::delivered(d, request.encoding))
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "messages": messages }))
}

async fn receipts_body(state: &AppState, body: Body) -> Result<api::ReceiptsRequest, ApiError> {
    parse_body(state, body, None).await
}

async fn ack(State(state): State<AppState>, Path(queue): Path<String>, body: Body) -> ApiResult {
    let broker = state.broker()?;
    let request = receipts_body(&state, body).await?;
    json(
        StatusCode::OK,
        &broker.ack(&queue, &request.receipts).await?,
    )
}

async fn nack(State(state): State<AppState>, Path(queue): Path<String>, body: Body) -> ApiResult {
    let broker = state.broker()?;
    let request = receipts_body(&state, body).await?;
    let reply = broker
        .nack(
            &queue,
            &request.receipts,
            request.delay_ms,
            request.error.as_deref(),
            NackReason::parse(request.reason.as_deref())?,
        )
        .await?;
    json(StatusCode::OK, &reply)
}

async fn extend(State(state): State<AppState>, Path(queue): Path<String>, body: Body) -> ApiResult {
    let broker = state.broker()?;
    let request = receipts_body(&state, body).await?;
    json(
        StatusCode::OK,
        &broker.extend(&queue, &request.receipts, request.lease_ms)?,
    )
}

async fn redrive(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let request: api::RedriveBody =
        parse_body(&state, body, Some(api::RedriveBody::default())).await?;
    let progress = broker.start_redrive(
        &queue,
        RedriveRequest {
            to: request.to,
            rate_per_s: request.rate_per_s.unwrap_or(1_000),
            max: request.max.unwrap_or(0),
            key: request.filter.key,
            error_contains: request.filter.error_contains,
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
