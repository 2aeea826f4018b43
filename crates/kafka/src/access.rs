//! Who a request comes from and what they may do. With authentication on, a connection
//! authenticates with SASL first (`sasl.rs`); each of its requests then runs with the
//! principal's grants in scope (`ACCESS`, a task-local set around the request's handling),
//! and the handlers ask `may` for each topic or group they touch, answering Kafka's
//! authorization error codes for what is not granted, as Kafka's broker does.
//!
//! Missing scope means denied: a handler that spawned work outside the request's task and
//! asked there would be refused, never let through.

use std::sync::Arc;

use tidewater_auth::{AuthState, Identity, Operation, Resource, ResourceKind};

/// What a connection's requests may do.
#[derive(Clone)]
pub(crate) enum Access {
    /// Authentication is off: everything.
    Open,
    /// A SASL-authenticated principal and the grants in force when the request came.
    Known {
        state: Arc<AuthState>,
        identity: Arc<Identity>,
    },
}

impl Access {
    pub(crate) fn may(&self, op: Operation, kind: ResourceKind, name: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Known { state, identity } => {
                state.allows(identity, op, &Resource::new(kind, name))
            }
        }
    }
}

tokio::task_local! {
    static ACCESS: Access;
}

/// Runs a request's future with `access` in scope.
pub(crate) fn scope<F: std::future::Future>(
    access: Access,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    ACCESS.scope(access, future)
}

/// Runs synchronous work (a produce's start) with `access` in scope.
pub(crate) fn sync_scope<R>(access: Access, work: impl FnOnce() -> R) -> R {
    ACCESS.sync_scope(access, work)
}

/// Whether the request in scope may do `op` on the resource (false outside any scope); a
/// refusal is audited.
pub(crate) fn may(op: Operation, kind: ResourceKind, name: &str) -> bool {
    let allowed = visible(op, kind, name);
    if !allowed {
        let principal = principal().unwrap_or_else(|| "-".into());
        tracing::warn!(target: "tidewater::audit", listener = "kafka", principal = %principal, operation = op.as_str(), resource = %Resource::new(kind, name), "request denied");
    }
    allowed
}

/// `may` without auditing a refusal: for what a listing leaves out.
pub(crate) fn visible(op: Operation, kind: ResourceKind, name: &str) -> bool {
    ACCESS.try_with(|a| a.may(op, kind, name)).unwrap_or(false)
}

/// `may` on a topic: a stream.
pub(crate) fn topic(op: Operation, name: &str) -> bool {
    may(op, ResourceKind::Stream, name)
}

/// `may` on a group.
pub(crate) fn group(op: Operation, name: &str) -> bool {
    may(op, ResourceKind::Group, name)
}

/// `may` on what share group `group` reads of `topic`: a queue itself, or the stream's
/// subscription `topic/group` (share groups are work-queue subscriptions).
pub(crate) fn share(kafka: &crate::Kafka, op: Operation, topic: &str, group: &str) -> bool {
    if kafka.broker.queue_uid(topic).is_ok() {
        may(op, ResourceKind::Queue, topic)
    } else {
        may(op, ResourceKind::Subscription, &format!("{topic}/{group}"))
    }
}

/// The principal of the request in scope (None with authentication off).
pub(crate) fn principal() -> Option<String> {
    ACCESS
        .try_with(|a| match a {
            Access::Open => None,
            Access::Known { identity, .. } => Some(identity.principal.clone()),
        })
        .ok()
        .flatten()
}

/// An admin operation of the Kafka listener, for the audit log (target `tidewater::audit`).
pub(crate) fn audit(action: &str, resource: &str, error_code: i16) {
    let principal = principal().unwrap_or_else(|| "-".into());
    tracing::info!(target: "tidewater::audit", listener = "kafka", principal = %principal, action, resource, error_code, "admin operation");
}

/// The tenant of the request in scope's principal (None with authentication off).
pub(crate) fn tenant() -> Option<String> {
    ACCESS
        .try_with(|a| match a {
            Access::Open => None,
            Access::Known { identity, .. } => Some(identity.tenant.clone()),
        })
        .ok()
        .flatten()
}
