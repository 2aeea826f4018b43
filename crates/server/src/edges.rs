//! The HTTP edges (docs/edges.md): webhook hooks (`/v1/hooks`), their management and the
//! ingress senders POST to, which answers 2xx only once the event is durable; and push
//! endpoints (`/v1/pushes`), whose workers are `crate::push`.

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use tidewater_auth::{Operation, Resource, ResourceKind};
use tidewater_core::Ingested;
use tidewater_core::hook::{HookPatch, HookRequest, HookTarget};
use tidewater_core::push::{PushPatch, PushSource};

use crate::auth::Caller;
use tidewater_core::ErrorCode;

use crate::http::{
    ApiError, ApiResult, AppState, CONFIG_VALUES, config_body, created_or_ok, json, read_body,
    visible,
};

pub(crate) async fn list_hooks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let mut hooks = state.broker()?.hooks();
    hooks.retain(|h| visible(&caller, ResourceKind::Hook, &h.name));
    json(StatusCode::OK, &serde_json::json!({ "hooks": hooks }))
}

pub(crate) async fn get_hook(State(state): State<AppState>, Path(hook): Path<String>) -> ApiResult {
    json(StatusCode::OK, &state.broker()?.hook(&hook)?)
}

fn target_resource(target: &HookTarget) -> Resource<'_> {
    match target {
        HookTarget::Queue(name) => Resource::new(ResourceKind::Queue, name),
        HookTarget::Stream(name) => Resource::new(ResourceKind::Stream, name),
    }
}

pub(crate) async fn put_hook(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(hook): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (patch, _permit): (HookPatch, _) = config_body(
        &state,
        body,
        CONFIG_VALUES,
        "hook",
        r#"{"target": {"queue": "orders"}, "signature": {"preset": "github", "secrets": ["..."]}}"#,
    )
    .await?;
    // A hook produces to its target for its senders: whoever decides what reaches it
    // (the target, who may post: the signature, the tenant events count against) must be
    // allowed to produce there (and to name a tenant: set_tenant). An admin of the hook
    // alone may change only what does not (headers kept, sizes, ids).
    let current = broker.hook_config(&hook).ok().map(|c| c.target);
    if let Some(target) = patch.target.as_ref().or(current.as_ref())
        && (patch.target.is_some() || patch.signature.is_some() || current.is_none())
    {
        caller.check(Operation::Produce, &target_resource(target))?;
    }
    if let (Some(target), Some(Some(_))) =
        (patch.target.as_ref().or(current.as_ref()), &patch.tenant)
    {
        caller.check(Operation::SetTenant, &target_resource(target))?;
    }
    let (created, info) = broker.put_hook(&hook, &patch).await?;
    created_or_ok(created, &info)
}

pub(crate) async fn delete_hook(
    State(state): State<AppState>,
    Path(hook): Path<String>,
) -> ApiResult {
    state.broker()?.delete_hook(&hook).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A sender's request: the raw body and headers, checked and stored by the broker. 200
/// once durable (or a duplicate of a delivery already stored); 401 for a bad signature;
/// 413 past the hook's size; 429/503/507 with Retry-After when the target cannot take it
/// now: nothing is stored unless the answer is 2xx.
pub(crate) async fn ingest(
    State(state): State<AppState>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    ingest_checked(&state, &hook, &headers, body).await
}

/// `ingest` on the webhook listener ([hooks] listen): signed hooks only while
/// authentication is on.
pub(crate) async fn ingest_public(
    State(state): State<AppState>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    if state.guard.enabled && state.broker()?.hook_unsigned(&hook) == Some(true) {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            format!(
                "hook '{hook}' is unsigned (preset none): with authentication on it takes webhooks only at POST /v1/hooks/{hook} on the API listener, with an API key granted produce on it"
            ),
        ));
    }
    ingest_checked(&state, &hook, &headers, body).await
}

async fn ingest_checked(
    state: &AppState,
    hook: &str,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (bytes, _permit) = read_body(state, body).await?;
    let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let request = HookRequest {
        header: &lookup,
        body: &bytes,
    };
    match broker.ingest(hook, &request).await? {
        Ingested::Accepted { id } => json(
            StatusCode::OK,
            &serde_json::json!({ "id": id, "duplicate": false }),
        ),
        Ingested::Duplicate { id } => json(
            StatusCode::OK,
            &serde_json::json!({ "id": id, "duplicate": true }),
        ),
        Ingested::Challenge(challenge) => json(
            StatusCode::OK,
            &serde_json::json!({ "challenge": challenge }),
        ),
    }
}

pub(crate) async fn list_pushes(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let mut pushes = state.broker()?.pushes();
    pushes.retain(|p| visible(&caller, ResourceKind::Push, &p.name));
    json(StatusCode::OK, &serde_json::json!({ "pushes": pushes }))
}

pub(crate) async fn get_push(State(state): State<AppState>, Path(push): Path<String>) -> ApiResult {
    json(StatusCode::OK, &state.broker()?.push(&push)?)
}

fn source_resource(source: &PushSource) -> Resource<'_> {
    match source {
        PushSource::Queue(name) => Resource::new(ResourceKind::Queue, name),
        PushSource::Subscription(name) => Resource::new(ResourceKind::Subscription, name),
    }
}

/// Creates (201, with the signing secret, shown this once) or changes (200) a push
/// endpoint.
pub(crate) async fn put_push(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(push): Path<String>,
    body: Body,
) -> ApiResult {
    let broker = state.broker()?;
    let (patch, _permit): (PushPatch, _) = config_body(
        &state,
        body,
        CONFIG_VALUES,
        "push endpoint",
        r#"{"source": {"queue": "emails"}, "url": "https://mail.example.com/send"}"#,
    )
    .await?;
    // A push endpoint consumes its source for whoever made it: deciding where its
    // messages go (the source, the URL, the secret receivers check) needs consume there. An
    // admin of the endpoint alone may tune it (concurrency, timeouts, the breaker).
    let current = broker.push_handle(&push).ok().map(|p| p.config().source);
    if let Some(source) = patch.source.as_ref().or(current.as_ref())
        && (patch.source.is_some()
            || patch.url.is_some()
            || patch.secret.is_some()
            || current.is_none())
    {
        caller.check(Operation::Consume, &source_resource(source))?;
    }
    let (created, info, secret) = broker.put_push(&push, &patch).await?;
    let mut value = serde_json::to_value(&info).expect("serializes");
    if let Some(secret) = secret {
        value["secret"] = secret.into();
    }
    created_or_ok(created, &value)
}

pub(crate) async fn delete_push(
    State(state): State<AppState>,
    Path(push): Path<String>,
) -> ApiResult {
    state.broker()?.delete_push(&push).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
