//! The KEDA external scaler (docs/autoscaling.md): KEDA's `externalscaler.proto` served
//! over gRPC on `[keda] listen`, answering from the backlog forecast of the queue,
//! subscription or group a ScaledObject's trigger names. Tonic generates the service; its
//! HTTP/2 connections are served here, under the listener's connection cap and shutdown
//! deadline (`listener::accept_loop`), plain or TLS as every listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tidewater_auth::{Operation, Resource, ResourceKind};
use tidewater_core::forecast::{Forecast, Objectives};
use tidewater_core::{Broker, BrokerError, ErrorCode, Subject};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::listener::{Bounds, Stats, accept_loop};

#[allow(clippy::all, clippy::pedantic)]
mod proto {
    tonic::include_proto!("externalscaler");
}

use proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// `[keda]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KedaConfig {
    /// Off unless set (e.g. `0.0.0.0:7072` for KEDA in the cluster).
    pub listen: Option<String>,
    pub max_connections: usize,
    /// gRPC calls at once on one connection.
    pub max_streams_per_connection: u32,
    /// How often StreamIsActive looks again (it sends when the answer changes).
    pub stream_interval_ms: u64,
    /// With authentication on: whose grants the scaler's requests have (it needs
    /// `describe` on what ScaledObjects name). Required then; KEDA sends no credentials.
    pub principal: Option<String>,
}

impl Default for KedaConfig {
    fn default() -> Self {
        KedaConfig {
            listen: None,
            max_connections: 64,
            max_streams_per_connection: 64,
            stream_interval_ms: 5_000,
            principal: None,
        }
    }
}

impl KedaConfig {
    /// The listen address, when on; checks the rest.
    pub fn listen(&self, auth_on: bool) -> anyhow::Result<Option<SocketAddr>> {
        let Some(text) = &self.listen else {
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().map_err(|_| {
            anyhow::anyhow!("[keda] listen '{text}' is not an address like 127.0.0.1:7072")
        })?;
        if self.max_connections == 0 || self.max_streams_per_connection == 0 {
            anyhow::bail!("[keda] max_connections and max_streams_per_connection must be positive");
        }
        if !(100..=600_000).contains(&self.stream_interval_ms) {
            anyhow::bail!("[keda] stream_interval_ms must be 100..=600000");
        }
        if auth_on && self.principal.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!(
                "[keda] principal is required with authentication on: KEDA sends no credentials, so name the principal whose grants the scaler has (grant it describe on the queues, subscriptions and groups it scales on)"
            );
        }
        Ok(Some(addr))
    }
}

/// What a trigger scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Unsettled messages (a group: its lag).
    Backlog,
    /// The same, asked for as `lag` (and so named).
    Lag,
    /// The oldest message's age, in seconds.
    OldestAgeSeconds,
    /// The forecast's consumers needed to drain within `drain_target_ms`.
    ConsumersNeeded,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Backlog => "backlog",
            Metric::Lag => "lag",
            Metric::OldestAgeSeconds => "oldest_age_seconds",
            Metric::ConsumersNeeded => "consumers_needed",
        }
    }

    /// The per-replica target when the trigger gives none.
    fn default_target(self) -> f64 {
        match self {
            Metric::Backlog | Metric::Lag => 100.0,
            Metric::OldestAgeSeconds => 60.0,
            Metric::ConsumersNeeded => 1.0,
        }
    }
}

/// A trigger's metadata, read (sans-IO).
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub subject: Subject,
    pub metric: Metric,
    /// The value one replica handles (KEDA divides the metric by it).
    pub target: f64,
    /// Active (scale from zero) above this.
    pub activation: f64,
    /// Objectives the trigger sets; the server's `[forecast]` fill the rest.
    pub rate_window_ms: Option<u64>,
    pub age_objective_ms: Option<u64>,
    pub drain_target_ms: Option<u64>,
}

/// Reads a trigger's metadata: exactly one of `queue`, `subscription` (STREAM/SUBSCRIPTION)
/// and `group`; `metric` (backlog, lag, oldest_age_seconds, consumers_needed); `target`;
/// `activation`; and the objectives. KEDA's own keys (`scalerAddress`, TLS settings) and
/// any other are left alone.
pub fn trigger(metadata: &HashMap<String, String>) -> Result<Trigger, String> {
    let named: Vec<(&str, &String)> = ["queue", "subscription", "group"]
        .into_iter()
        .filter_map(|k| metadata.get(k).map(|v| (k, v)))
        .collect();
    let subject = match named.as_slice() {
        [("queue", name)] if !name.is_empty() && !name.contains('/') => {
            Subject::Queue(name.to_string())
        }
        [("subscription", name)]
            if name
                .split_once('/')
                .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty()) =>
        {
            Subject::Queue(name.to_string())
        }
        [("group", name)] if !name.is_empty() => Subject::Group(name.to_string()),
        [] | [_, _, ..] => {
            return Err(
                "the trigger's metadata needs exactly one of queue, subscription (STREAM/SUBSCRIPTION) and group".into(),
            );
        }
        [(key, name)] => return Err(format!("{key} '{name}' is not a valid name")),
    };
    let metric = match metadata.get("metric").map(String::as_str) {
        None | Some("backlog") => Metric::Backlog,
        Some("lag") => Metric::Lag,
        Some("oldest_age_seconds") => Metric::OldestAgeSeconds,
        Some("consumers_needed") => Metric::ConsumersNeeded,
        Some(other) => {
            return Err(format!(
                "metric '{other}' is not one of backlog, lag, oldest_age_seconds, consumers_needed"
            ));
        }
    };
    let number = |key: &str, default: f64| -> Result<f64, String> {
        match metadata.get(key) {
            None => Ok(default),
            Some(text) => match text.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                _ => Err(format!("{key} '{text}' must be a number (0 or more)")),
            },
        }
    };
    let ms = |key: &str| -> Result<Option<u64>, String> {
        metadata
            .get(key)
            .map(|text| {
                text.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|v| (1..=604_800_000).contains(v))
                    .ok_or_else(|| format!("{key} '{text}' is not 1..=604800000 (ms)"))
            })
            .transpose()
    };
    let target = number("target", metric.default_target())?;
    if target <= 0.0 {
        return Err("target must be a number above 0".into());
    }
    Ok(Trigger {
        subject,
        metric,
        target,
        activation: number("activation", 0.0)?,
        rate_window_ms: ms("rate_window_ms")?,
        age_objective_ms: ms("age_objective_ms")?,
        drain_target_ms: ms("drain_target_ms")?,
    })
}

impl Trigger {
    /// The metric's value in a forecast.
    pub fn value(&self, forecast: &Forecast) -> f64 {
        match self.metric {
            Metric::Backlog | Metric::Lag => forecast.backlog as f64,
            Metric::OldestAgeSeconds => forecast.oldest_age_ms as f64 / 1000.0,
            Metric::ConsumersNeeded => f64::from(forecast.consumers_needed),
        }
    }

    /// The metric's name: `tidewater-<kind>-<name>-<metric>`, in the characters Kubernetes
    /// takes in a metric name.
    pub fn metric_name(&self) -> String {
        let (kind, name) = match &self.subject {
            Subject::Queue(name) if name.contains('/') => ("subscription", name),
            Subject::Queue(name) => ("queue", name),
            Subject::Group(name) => ("group", name),
        };
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!(
            "tidewater-{kind}-{clean}-{}",
            self.metric.name().replace('_', "-")
        )
    }

    fn objectives(&self, defaults: Objectives) -> Objectives {
        Objectives {
            rate_window_ms: self.rate_window_ms.unwrap_or(defaults.rate_window_ms),
            age_objective_ms: self.age_objective_ms.unwrap_or(defaults.age_objective_ms),
            drain_target_ms: self.drain_target_ms.unwrap_or(defaults.drain_target_ms),
        }
    }

    fn resource(&self) -> Resource<'_> {
        match &self.subject {
            Subject::Queue(name) if name.contains('/') => {
                Resource::new(ResourceKind::Subscription, name)
            }
            Subject::Queue(name) => Resource::new(ResourceKind::Queue, name),
            Subject::Group(name) => Resource::new(ResourceKind::Group, name),
        }
    }
}

/// The service: the broker, and whose grants apply.
#[derive(Clone)]
struct Scaler {
    broker: Broker,
    caller: Option<String>,
    stream_interval: Duration,
}

fn status(err: BrokerError) -> Status {
    let message = format!("{}: {}", err.code.as_str(), err.message);
    match err.code {
        ErrorCode::QueueNotFound
        | ErrorCode::GroupNotFound
        | ErrorCode::SubscriptionNotFound
        | ErrorCode::StreamNotFound => Status::not_found(message),
        ErrorCode::InvalidRequest => Status::invalid_argument(message),
        _ => Status::unavailable(message),
    }
}

impl Scaler {
    /// The trigger of a request, and its forecast, if the principal may see it.
    fn forecast(&self, object: &ScaledObjectRef) -> Result<(Trigger, Forecast), Status> {
        let trigger = trigger(&object.scaler_metadata).map_err(|e| {
            Status::invalid_argument(format!(
                "ScaledObject {}/{}: {e}",
                object.namespace, object.name
            ))
        })?;
        if let Some(principal) = &self.caller {
            let caller = Caller::Known {
                state: self.broker.auth(),
                identity: Arc::new(tidewater_auth::Identity {
                    principal: principal.clone(),
                    roles: Vec::new(),
                    tenant: principal.clone(),
                    key_id: None,
                    expires_at_ms: None,
                }),
            };
            if !caller.may(Operation::Describe, &trigger.resource()) {
                return Err(Status::permission_denied(format!(
                    "principal '{principal}' ([keda] principal) has no describe grant on {}",
                    trigger.subject.name()
                )));
            }
        }
        let objectives = trigger.objectives(self.broker.forecast_options().objectives);
        let forecast = self
            .broker
            .forecast(&trigger.subject, Some(objectives))
            .map_err(status)?;
        Ok((trigger, forecast))
    }
}

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let (trigger, forecast) = self.forecast(request.get_ref())?;
        Ok(Response::new(IsActiveResponse {
            result: trigger.value(&forecast) > trigger.activation,
        }))
    }

    type StreamIsActiveStream =
        tonic::codegen::tokio_stream::wrappers::ReceiverStream<Result<IsActiveResponse, Status>>;

    /// Sends the answer at once, then again whenever it changes (looking every
    /// `stream_interval_ms`), until KEDA hangs up.
    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let object = request.into_inner();
        self.forecast(&object)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let scaler = self.clone();
        tokio::spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let answer = scaler
                    .forecast(&object)
                    .map(|(trigger, forecast)| trigger.value(&forecast) > trigger.activation);
                let send = match &answer {
                    Ok(active) => last != Some(*active),
                    Err(_) => true,
                };
                if send {
                    let failed = answer.is_err();
                    last = answer.as_ref().ok().copied();
                    let item = answer.map(|result| IsActiveResponse { result });
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(scaler.stream_interval) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let (trigger, _) = self.forecast(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: trigger.metric_name(),
                target_size: trigger.target.ceil() as i64,
                target_size_float: trigger.target,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.into_inner();
        let object = request
            .scaled_object_ref
            .ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let (trigger, forecast) = self.forecast(&object)?;
        let value = trigger.value(&forecast);
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: trigger.metric_name(),
                metric_value: value.ceil() as i64,
                metric_value_float: value,
            }],
        }))
    }

    type StreamMetricSpecStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
        Result<GetMetricSpecResponse, Status>,
    >;

    /// Optional in KEDA: the spec never changes while the trigger's metadata does not, so
    /// KEDA's GetMetricSpec is enough (KEDA falls back to it on Unimplemented).
    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented(
            "a trigger's metric spec does not change: KEDA asks GetMetricSpec",
        ))
    }
}

/// Serves the scaler until `shutdown` changes. `config.principal` is whose grants apply
/// (None: authentication is off, everything is visible).
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    config: KedaConfig,
    tls: Option<Arc<crate::tls::Tls>>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
    shutdown_timeout: Duration,
) {
    let scaler = Scaler {
        broker,
        caller: config.principal.clone(),
        stream_interval: Duration::from_millis(config.stream_interval_ms),
    };
    let service = ExternalScalerServer::new(scaler)
        .max_decoding_message_size(64 << 10)
        .max_encoding_message_size(64 << 10);
    let bounds = Bounds {
        name: "KEDA scaler",
        max_connections: config.max_connections,
        shutdown_timeout,
    };
    let streams = config.max_streams_per_connection;
    let stop = shutdown.clone();
    let serve_one = move |stream: TcpStream, addr: SocketAddr| {
        let (service, tls, stop) = (service.clone(), tls.clone(), stop.clone());
        async move {
            match tls {
                None => serve_connection(stream, service, streams, stop).await,
                Some(tls) => match tls.accept_alpn(stream, Some(b"h2")).await {
                    Ok(stream) => serve_connection(stream, service, streams, stop).await,
                    Err(err) => {
                        tracing::debug!(%addr, error = %err, "KEDA scaler TLS handshake failed")
                    }
                },
            }
        }
    };
    accept_loop(listener, bounds, stats, shutdown, |_, _| {}, serve_one).await;
}

async fn serve_connection<S>(
    stream: S,
    service: ExternalScalerServer<Scaler>,
    max_streams: u32,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams)
        .max_header_list_size(16 << 10)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_listener_is_off_by_default_and_needs_a_principal_with_authentication() {
        assert_eq!(KedaConfig::default().listen(true).unwrap(), None);
        let on = KedaConfig {
            listen: Some("127.0.0.1:7072".into()),
            ..KedaConfig::default()
        };
        assert!(on.listen(false).unwrap().is_some());
        let err = on.listen(true).unwrap_err().to_string();
        assert!(err.contains("[keda] principal is required"), "{err}");
        let with = KedaConfig {
            principal: Some("keda".into()),
            ..on.clone()
        };
        assert!(with.listen(true).unwrap().is_some());
        for bad in [
            KedaConfig {
                listen: Some("nowhere".into()),
                ..KedaConfig::default()
            },
            KedaConfig {
                stream_interval_ms: 0,
                ..on.clone()
            },
            KedaConfig {
                max_connections: 0,
                ..on
            },
        ] {
            assert!(bad.listen(false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn triggers_name_one_subject_and_a_metric() {
        let t = trigger(&meta(&[
            ("scalerAddress", "tidewater:7072"),
            ("queue", "orders"),
            ("metric", "consumers_needed"),
            ("drain_target_ms", "120000"),
        ]))
        .unwrap();
        assert_eq!(t.subject, Subject::Queue("orders".into()));
        assert_eq!(t.metric, Metric::ConsumersNeeded);
        assert_eq!(t.target, 1.0);
        assert_eq!(t.drain_target_ms, Some(120_000));
        assert_eq!(t.metric_name(), "tidewater-queue-orders-consumers-needed");

        let t = trigger(&meta(&[
            ("subscription", "events/Billing"),
            ("target", "500"),
        ]))
        .unwrap();
        assert_eq!(t.subject, Subject::Queue("events/Billing".into()));
        assert_eq!((t.metric, t.target), (Metric::Backlog, 500.0));
        assert_eq!(
            t.metric_name(),
            "tidewater-subscription-events-billing-backlog"
        );
        let t = trigger(&meta(&[("group", "readers"), ("metric", "lag")])).unwrap();
        assert_eq!(t.subject, Subject::Group("readers".into()));

        for bad in [
            meta(&[]),
            meta(&[("queue", "a"), ("group", "b")]),
            meta(&[("queue", "a/b")]),
            meta(&[("subscription", "nostream")]),
            meta(&[("queue", "a"), ("metric", "depth")]),
            meta(&[("queue", "a"), ("target", "0")]),
            meta(&[("queue", "a"), ("target", "-1")]),
            meta(&[("queue", "a"), ("activation", "NaN")]),
            meta(&[("queue", "a"), ("drain_target_ms", "0")]),
        ] {
            assert!(trigger(&bad).is_err(), "{bad:?}");
        }
    }
}
