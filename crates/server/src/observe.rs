//! Forecasts and sample histories over HTTP: `GET .../forecast` and `GET .../history` for
//! queues, subscriptions and groups (the model is `tidewater_core::forecast`); and where a
//! queue's messages wait, by key and fairness value (`GET /v1/queues/{q}/busiest`).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use tidewater_core::forecast::{Objectives, Sample};
use tidewater_core::{BrokerError, Subject};

use crate::http::{ApiError, ApiResult, AppState, json};

/// Objectives a request may set; the server's `[forecast]` defaults fill the others.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ObjectivesQuery {
    rate_window_ms: Option<u64>,
    age_objective_ms: Option<u64>,
    drain_target_ms: Option<u64>,
}

impl ObjectivesQuery {
    pub(crate) fn over(&self, defaults: Objectives) -> Objectives {
        Objectives {
            rate_window_ms: self.rate_window_ms.unwrap_or(defaults.rate_window_ms),
            age_objective_ms: self.age_objective_ms.unwrap_or(defaults.age_objective_ms),
            drain_target_ms: self.drain_target_ms.unwrap_or(defaults.drain_target_ms),
        }
    }
}

/// A queue's name in a queue route: a name with a slash is a subscription's, which has its
/// own routes (and grants).
fn queue(name: String) -> Result<Subject, ApiError> {
    if name.contains('/') {
        return Err(BrokerError::queue_not_found(&name).into());
    }
    Ok(Subject::Queue(name))
}

fn forecast_of(state: &AppState, subject: Subject, query: &ObjectivesQuery) -> ApiResult {
    let broker = state.broker()?;
    let objectives = query.over(broker.forecast_options().objectives);
    let forecast = broker.forecast(&subject, Some(objectives))?;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "kind": kind(&subject),
            "name": subject.name(),
            "forecast": forecast,
        }),
    )
}

fn history_of(state: &AppState, subject: Subject) -> ApiResult {
    let broker = state.broker()?;
    let samples = broker.history(&subject)?;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "kind": kind(&subject),
            "name": subject.name(),
            "interval_ms": broker.forecast_options().sample_interval_ms,
            "samples": with_rates(&samples),
        }),
    )
}

fn kind(subject: &Subject) -> &'static str {
    match subject {
        Subject::Queue(name) if name.contains('/') => "subscription",
        Subject::Queue(_) => "queue",
        Subject::Group(_) => "group",
    }
}

/// Samples as the console draws them: each with the rates since the one before it.
fn with_rates(samples: &[Sample]) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(samples.len());
    let mut previous: Option<&Sample> = None;
    for s in samples {
        let rates = previous.and_then(|p| {
            let span = (s.at_ms - p.at_ms) as f64 / 1000.0;
            (span > 0.0 && s.arrived >= p.arrived).then(|| {
                let arrived = (s.arrived - p.arrived) as f64;
                let served = (arrived + p.backlog as f64 - s.backlog as f64).max(0.0);
                (arrived / span, served / span)
            })
        });
        let mut value = serde_json::to_value(s).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "arrival_per_s".into(),
                serde_json::json!(rates.map(|r| r.0)),
            );
            map.insert(
                "service_per_s".into(),
                serde_json::json!(rates.map(|r| r.1)),
            );
        }
        out.push(value);
        previous = Some(s);
    }
    out
}

pub(crate) async fn queue_forecast(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<ObjectivesQuery>,
) -> ApiResult {
    forecast_of(&state, queue(name)?, &query)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BusiestQuery {
    limit: Option<usize>,
}

/// The keys and fair-scheduling values of a queue with the most messages waiting.
pub(crate) async fn queue_busiest(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<BusiestQuery>,
) -> ApiResult {
    let broker = state.broker()?;
    let busiest = broker.busiest(queue(name)?.name(), query.limit.unwrap_or(20))?;
    json(StatusCode::OK, &busiest)
}

pub(crate) async fn queue_history(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult {
    history_of(&state, queue(name)?)
}

pub(crate) async fn subscription_forecast(
    State(state): State<AppState>,
    Path((stream, sub)): Path<(String, String)>,
    Query(query): Query<ObjectivesQuery>,
) -> ApiResult {
    forecast_of(&state, Subject::Queue(format!("{stream}/{sub}")), &query)
}

pub(crate) async fn subscription_history(
    State(state): State<AppState>,
    Path((stream, sub)): Path<(String, String)>,
) -> ApiResult {
    history_of(&state, Subject::Queue(format!("{stream}/{sub}")))
}

pub(crate) async fn group_forecast(
    State(state): State<AppState>,
    Path(group): Path<String>,
    Query(query): Query<ObjectivesQuery>,
) -> ApiResult {
    forecast_of(&state, Subject::Group(group), &query)
}

pub(crate) async fn group_history(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> ApiResult {
    history_of(&state, Subject::Group(group))
}
