//! Authentication and authorization at the listeners: the `[auth]` settings, the checks
//! every listener shares (`Guard`: credentials, failed attempts per address, the audit of
//! refusals), what a caller may do (`Caller`), and what each HTTP route and each binary
//! frame needs (`ROUTES`, `frame_needs`). The keys and grants are the broker's; what they
//! mean is tidewater-auth's.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use tidewater_auth::{AuthState, Identity, Operation, Resource, ResourceKind};
use tidewater_core::{Broker, BrokerError, ErrorCode};
use tidewater_proto::Frame;

/// `[auth]` in the configuration file (docs/configuration.md, docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Every request needs credentials (or an anonymous grant); off by default, for a
    /// server on loopback.
    pub enabled: bool,
    /// Failed attempts one address may make at once, then one per `failed_refill_ms`.
    pub failed_burst: u32,
    pub failed_refill_ms: u64,
    /// Addresses whose failures are remembered at most (the oldest forgotten first).
    pub failed_max_addresses: usize,
    /// Where the audit events also go, as JSON lines (they always reach the server's log
    /// under the target `tidewater::audit`).
    pub audit_file: Option<std::path::PathBuf>,
    /// The audit file's bound: past it, it becomes `<file>.1` and a new one begins.
    pub audit_max_bytes: u64,
    /// JWT bearer tokens from an identity provider (`[auth.jwt]`; off without jwks_file).
    pub jwt: tidewater_auth::jwt::JwtConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            failed_burst: 10,
            failed_refill_ms: 6_000,
            failed_max_addresses: 10_000,
            audit_file: None,
            audit_max_bytes: 64 << 20,
            jwt: tidewater_auth::jwt::JwtConfig::default(),
        }
    }
}

/// The principal and grant a bootstrap key gets (`tidewater auth bootstrap`,
/// `TIDEWATER_ADMIN_KEY`).
pub const BOOTSTRAP_PRINCIPAL: &str = "admin";

/// The environment variable that makes the first admin key at a start with no key.
pub const ADMIN_KEY_ENV: &str = "TIDEWATER_ADMIN_KEY";

/// Makes an admin key (principal `admin`) and grants it every operation on everything.
pub async fn bootstrap(
    broker: &Broker,
    chosen: Option<(String, String)>,
) -> Result<tidewater_core::broker::NewKey, BrokerError> {
    let made = broker
        .create_key(
            tidewater_auth::KeySpec {
                principal: BOOTSTRAP_PRINCIPAL.into(),
                description: "bootstrap admin key".into(),
                ..tidewater_auth::KeySpec::default()
            },
            chosen,
        )
        .await?;
    broker
        .grant(tidewater_auth::AclSpec {
            subject: tidewater_auth::Subject::Principal(BOOTSTRAP_PRINCIPAL.into()),
            resource: ResourceKind::Any,
            name: "*".into(),
            matching: tidewater_auth::Match::Glob,
            operations: Operation::ALL.into_iter().collect(),
        })
        .await?;
    Ok(made)
}

/// The listeners' shared authentication (tidewater-auth's `Guard`: whether auth is on,
/// the failures per address, the JWKS in force), answering in the broker's error codes.
pub struct Guard {
    pub enabled: bool,
    pub inner: Arc<tidewater_auth::Guard>,
    /// The identity provider's JWKS file, when `[auth.jwt] jwks_file` is set.
    jwks: Option<Arc<Jwks>>,
}

/// The JWKS file, loaded again on SIGHUP and when it changes (as the TLS files are): an
/// identity provider rotates its keys without a restart here. A file that does not load
/// keeps the keys in force, and the error is logged.
struct Jwks {
    config: tidewater_auth::jwt::JwtConfig,
    path: std::path::PathBuf,
    /// (modification time, length) at the last load.
    stamp: std::sync::Mutex<Option<(std::time::SystemTime, u64)>>,
}

impl Jwks {
    fn stamp(&self) -> Option<(std::time::SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    fn load(&self) -> anyhow::Result<tidewater_auth::jwt::JwtVerifier> {
        let path = self.path.display();
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| anyhow::anyhow!("[auth.jwt] jwks_file {path}: {e}"))?;
        tidewater_auth::jwt::JwtVerifier::new(&text, self.config.clone())
            .map_err(|e| anyhow::anyhow!("[auth.jwt] jwks_file {path}: {e}"))
    }

    /// Loads the file again into `guard`; on failure keeps the keys in force and says why.
    fn reload(&self, guard: &tidewater_auth::Guard) {
        let stamp = self.stamp();
        // Not again until the file changes once more, whatever the outcome.
        *self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stamp;
        match self.load() {
            Ok(verifier) => {
                tracing::info!(keys = verifier.key_count(), "JWKS reloaded");
                guard.set_jwt(verifier);
            }
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "JWKS reload failed; the keys in force stay");
            }
        }
    }

    fn changed(&self) -> bool {
        self.stamp()
            != *self
                .stamp
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Guard {
    pub fn new(config: &AuthConfig) -> anyhow::Result<Guard> {
        let mut inner = tidewater_auth::Guard::new(
            config.enabled,
            config.failed_burst,
            config.failed_refill_ms,
            config.failed_max_addresses,
            {
                let mut key = [0u8; 32];
                rand::Rng::fill_bytes(&mut rand::rng(), &mut key);
                key
            },
        );
        let jwks = config.jwt.jwks_file.as_ref().map(|path| Jwks {
            config: config.jwt.clone(),
            path: path.clone(),
            stamp: std::sync::Mutex::new(None),
        });
        if let Some(jwks) = &jwks {
            *jwks
                .stamp
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = jwks.stamp();
            inner = inner.with_jwt(jwks.load()?);
        }
        Ok(Guard {
            enabled: config.enabled,
            inner: Arc::new(inner),
            jwks: jwks.map(Arc::new),
        })
    }

    /// With a JWKS file: loads it again on SIGHUP and when it changes (checked every
    /// `[auth.jwt] reload_check_ms`), until the process ends.
    pub fn spawn_jwks_reloader(&self) -> Option<tokio::task::JoinHandle<()>> {
        let jwks = self.jwks.clone()?;
        let every = (jwks.config.reload_check_ms > 0)
            .then(|| std::time::Duration::from_millis(jwks.config.reload_check_ms.max(100)));
        let (on_hup, guard) = ((jwks.clone(), self.inner.clone()), self.inner.clone());
        Some(crate::reload::spawn(
            every,
            move || on_hup.0.reload(&on_hup.1),
            move || {
                if jwks.changed() {
                    jwks.reload(&guard);
                }
            },
        ))
    }

    /// Who presents `token`; without one, the principal of the connection's verified
    /// client certificate (`certificate`), else the anonymous principal. Refused while
    /// `peer` has used up its failed attempts.
    pub fn authenticate(
        &self,
        broker: &Broker,
        token: Option<&str>,
        certificate: Option<&str>,
        peer: IpAddr,
        listener: &'static str,
    ) -> Result<(Arc<AuthState>, Identity), BrokerError> {
        let state = broker.auth();
        match self
            .inner
            .authenticate(&state, broker.now_ms(), token, certificate, peer, listener)
        {
            Ok(identity) => Ok((state, identity)),
            Err(refused) => {
                let err = BrokerError::new(ErrorCode::Unauthenticated, refused.to_string());
                Err(match refused {
                    tidewater_auth::Refused::Blocked { retry_after_ms } => {
                        err.retry_after(retry_after_ms)
                    }
                    tidewater_auth::Refused::Failed(_) | tidewater_auth::Refused::Token(_) => err,
                })
            }
        }
    }
}

/// Who is calling, and what they may do. `Open` when authentication is off: everything.
#[derive(Clone)]
pub enum Caller {
    Open,
    Known {
        state: Arc<AuthState>,
        identity: Arc<Identity>,
    },
}

impl Caller {
    pub fn may(&self, op: Operation, resource: &Resource<'_>) -> bool {
        match self {
            Caller::Open => true,
            Caller::Known { state, identity } => state.allows(identity, op, resource),
        }
    }

    /// Refuses what no grant allows: `unauthenticated` to a caller without credentials
    /// (it should present some), `forbidden` to one with.
    pub fn check(&self, op: Operation, resource: &Resource<'_>) -> Result<(), BrokerError> {
        if self.may(op, resource) {
            return Ok(());
        }
        Err(self.denied(op, resource))
    }

    pub fn denied(&self, op: Operation, resource: &Resource<'_>) -> BrokerError {
        match self {
            Caller::Known { identity, .. } if identity.is_anonymous() => BrokerError::new(
                ErrorCode::Unauthenticated,
                format!(
                    "authentication is on: {} on {resource} needs credentials (an API key's token <key id>.<secret>: --token or TIDEWATER_TOKEN for the CLI, Authorization: Bearer over HTTP)",
                    op.as_str()
                ),
            ),
            Caller::Known { identity, .. } => BrokerError::new(
                ErrorCode::Forbidden,
                format!(
                    "principal '{}' has no grant of {} on {resource}",
                    identity.principal,
                    op.as_str()
                ),
            ),
            Caller::Open => BrokerError::new(ErrorCode::Internal, "an open caller was denied"),
        }
    }

    /// A receipt as handed to this caller: bound to its principal with authentication on.
    pub fn bind_receipt(&self, binder: &tidewater_auth::ReceiptBinder, receipt: &mut String) {
        if let Caller::Known { identity, .. } = self {
            *receipt = binder.bind(receipt, &identity.principal);
        }
    }

    /// Receipts presented to settle on `resource`: (index, receipt as the broker knows it)
    /// of those this caller may settle (its own; any with admin on the resource), and the
    /// indexes of the others.
    pub fn unbind_receipts<'a, S: AsRef<str>>(
        &self,
        binder: &tidewater_auth::ReceiptBinder,
        resource: &Resource<'_>,
        receipts: &'a [S],
    ) -> (Vec<(usize, &'a str)>, Vec<usize>) {
        let Caller::Known { identity, .. } = self else {
            return (
                receipts.iter().map(AsRef::as_ref).enumerate().collect(),
                Vec::new(),
            );
        };
        let admin = self.may(Operation::Admin, resource);
        let mut mine = Vec::with_capacity(receipts.len());
        let mut others = Vec::new();
        for (i, bound) in receipts.iter().map(AsRef::as_ref).enumerate() {
            if admin {
                mine.push((i, tidewater_auth::ReceiptBinder::strip(bound)));
                continue;
            }
            match binder.check(bound, &identity.principal) {
                Ok(raw) => mine.push((i, raw)),
                Err(_) => others.push(i),
            }
        }
        (mine, others)
    }

    /// The identity, when authentication is on.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Open => None,
            Caller::Known { identity, .. } => Some(identity),
        }
    }

    /// The tenant a publish or produce counts against: the one asked for when the caller
    /// may set tenants on `resource` (or auth is off), else the caller's own; asking for
    /// another without the grant is refused.
    pub fn tenant_for(
        &self,
        asked: Option<&str>,
        resource: &Resource<'_>,
    ) -> Result<Option<String>, BrokerError> {
        let Caller::Known { identity, .. } = self else {
            return Ok(asked.map(str::to_string));
        };
        match asked {
            None => Ok(Some(identity.tenant.clone())),
            Some(t) if t == identity.tenant => Ok(Some(identity.tenant.clone())),
            Some(t) => {
                if self.may(Operation::SetTenant, resource) {
                    Ok(Some(t.to_string()))
                } else {
                    Err(BrokerError::new(
                        ErrorCode::Forbidden,
                        format!(
                            "principal '{}' publishes as tenant '{}'; setting tenant '{t}' on {resource} needs the set_tenant grant",
                            identity.principal, identity.tenant
                        ),
                    ))
                }
            }
        }
    }
}

/// The first tenant a record batch names (the `tidewater-tenant` header) other than
/// `own`, if any. A batch that does not decode names none: the broker refuses it.
pub fn foreign_tenant(batch: &[u8], own: &str) -> Option<String> {
    use tidewater_storage::format::{BATCH_HEADER_LEN, FormatError, check_batch, visit_records};
    let header = check_batch(batch).ok()?;
    let mut found = None;
    let _ = visit_records::<FormatError>(&header, &batch[BATCH_HEADER_LEN..], |record| {
        for (name, value) in record.headers() {
            if name == tidewater_core::queue::HEADER_TENANT.as_bytes() && value != own.as_bytes() {
                found.get_or_insert_with(|| String::from_utf8_lossy(value).into_owned());
            }
        }
        Ok(())
    });
    found
}

/// What an HTTP route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health, readiness, the API's description.
    Open,
    /// `op` on the resource its path names (`param`, or for a subscription the stream's and
    /// the subscription's params), or on the cluster.
    Op(Operation, Target),
    /// A listing: any caller; the reply holds only what it may describe.
    List(ResourceKind),
    /// A webhook to a hook: its signature authenticates it; a hook with no signature
    /// (preset `none`) needs produce on the hook instead.
    Hook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cluster,
    Param(ResourceKind, &'static str),
    /// `stream/subscription` from the `stream` and `sub` params.
    Subscription,
}

/// One route of the HTTP API and what it needs. Every route the router serves is here: a
/// route missing from this table is refused to everyone once auth is on (and the auth
/// test, which walks the OpenAPI document, fails).
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub need: Need,
}

const fn route(method: &'static str, path: &'static str, need: Need) -> Route {
    Route { method, path, need }
}

use Operation::{Admin, Consume, Describe, Produce};
use ResourceKind as K;
const Q: Target = Target::Param(K::Queue, "queue");
const S: Target = Target::Param(K::Stream, "stream");
const G: Target = Target::Param(K::Group, "group");
const SUB: Target = Target::Subscription;
const CLUSTER: Target = Target::Cluster;
const HOOK: Target = Target::Param(K::Hook, "hook");
const PUSH: Target = Target::Param(K::Push, "push");

pub const ROUTES: &[Route] = &[
    // The console's page and files: no data in them (what it shows, it asks the API for).
    route("GET", "/", Need::Open),
    route("GET", "/console/{file}", Need::Open),
    route("GET", "/healthz", Need::Open),
    route("GET", "/readyz", Need::Open),
    route("GET", "/v1/openapi.json", Need::Open),
    route("GET", "/metrics", Need::Op(Describe, CLUSTER)),
    route("GET", "/v1/queues", Need::List(K::Queue)),
    route("GET", "/v1/queues/{queue}", Need::Op(Describe, Q)),
    route("GET", "/v1/queues/{queue}/forecast", Need::Op(Describe, Q)),
    route("GET", "/v1/queues/{queue}/busiest", Need::Op(Describe, Q)),
    route("GET", "/v1/queues/{queue}/history", Need::Op(Describe, Q)),
    route("PUT", "/v1/queues/{queue}", Need::Op(Admin, Q)),
    route("DELETE", "/v1/queues/{queue}", Need::Op(Admin, Q)),
    route("POST", "/v1/queues/{queue}/purge", Need::Op(Admin, Q)),
    route("POST", "/v1/queues/{queue}/messages", Need::Op(Produce, Q)),
    route("GET", "/v1/queues/{queue}/messages", Need::Op(Describe, Q)),
    route("POST", "/v1/queues/{queue}/receive", Need::Op(Consume, Q)),
    route("POST", "/v1/queues/{queue}/ack", Need::Op(Consume, Q)),
    route("POST", "/v1/queues/{queue}/nack", Need::Op(Consume, Q)),
    route("POST", "/v1/queues/{queue}/extend", Need::Op(Consume, Q)),
    route("POST", "/v1/queues/{queue}/redrive", Need::Op(Admin, Q)),
    route("GET", "/v1/redrives", Need::Op(Describe, CLUSTER)),
    route("GET", "/v1/redrives/{id}", Need::Op(Describe, CLUSTER)),
    route("DELETE", "/v1/redrives/{id}", Need::Op(Admin, CLUSTER)),
    route("GET", "/v1/streams", Need::List(K::Stream)),
    route("GET", "/v1/streams/{stream}", Need::Op(Describe, S)),
    route("PUT", "/v1/streams/{stream}", Need::Op(Admin, S)),
    route("DELETE", "/v1/streams/{stream}", Need::Op(Admin, S)),
    route("POST", "/v1/streams/{stream}/records", Need::Op(Produce, S)),
    route(
        "GET",
        "/v1/streams/{stream}/partitions/{partition}/records",
        Need::Op(Consume, S),
    ),
    route(
        "GET",
        "/v1/streams/{stream}/partitions/{partition}/offsets",
        Need::Op(Describe, S),
    ),
    route("GET", "/v1/groups", Need::List(K::Group)),
    route("GET", "/v1/groups/{group}", Need::Op(Describe, G)),
    route("GET", "/v1/groups/{group}/forecast", Need::Op(Describe, G)),
    route("GET", "/v1/groups/{group}/history", Need::Op(Describe, G)),
    route("DELETE", "/v1/groups/{group}", Need::Op(Admin, G)),
    route(
        "POST",
        "/v1/groups/{group}/offsets/reset",
        Need::Op(Admin, G),
    ),
    route("POST", "/v1/groups/{group}/consumers", Need::Op(Consume, G)),
    route(
        "DELETE",
        "/v1/groups/{group}/consumers/{member}",
        Need::Op(Consume, G),
    ),
    route(
        "GET",
        "/v1/groups/{group}/consumers/{member}/records",
        Need::Op(Consume, G),
    ),
    route(
        "POST",
        "/v1/groups/{group}/consumers/{member}/commit",
        Need::Op(Consume, G),
    ),
    route("GET", "/v1/subscriptions", Need::List(K::Subscription)),
    route(
        "GET",
        "/v1/streams/{stream}/subscriptions",
        Need::List(K::Subscription),
    ),
    route(
        "GET",
        "/v1/streams/{stream}/subscriptions/{sub}",
        Need::Op(Describe, SUB),
    ),
    route(
        "GET",
        "/v1/streams/{stream}/subscriptions/{sub}/forecast",
        Need::Op(Describe, SUB),
    ),
    route(
        "GET",
        "/v1/streams/{stream}/subscriptions/{sub}/history",
        Need::Op(Describe, SUB),
    ),
    route(
        "PUT",
        "/v1/streams/{stream}/subscriptions/{sub}",
        Need::Op(Admin, SUB),
    ),
    route(
        "DELETE",
        "/v1/streams/{stream}/subscriptions/{sub}",
        Need::Op(Admin, SUB),
    ),
    route(
        "POST",
        "/v1/streams/{stream}/subscriptions/{sub}/receive",
        Need::Op(Consume, SUB),
    ),
    route(
        "POST",
        "/v1/streams/{stream}/subscriptions/{sub}/ack",
        Need::Op(Consume, SUB),
    ),
    route(
        "POST",
        "/v1/streams/{stream}/subscriptions/{sub}/nack",
        Need::Op(Consume, SUB),
    ),
    route(
        "POST",
        "/v1/streams/{stream}/subscriptions/{sub}/extend",
        Need::Op(Consume, SUB),
    ),
    route(
        "POST",
        "/v1/streams/{stream}/subscriptions/{sub}/purge",
        Need::Op(Admin, SUB),
    ),
    route("GET", "/v1/hooks", Need::List(K::Hook)),
    route("GET", "/v1/hooks/{hook}", Need::Op(Describe, HOOK)),
    route("PUT", "/v1/hooks/{hook}", Need::Op(Admin, HOOK)),
    route("DELETE", "/v1/hooks/{hook}", Need::Op(Admin, HOOK)),
    route("POST", "/v1/hooks/{hook}", Need::Hook),
    route("GET", "/v1/pushes", Need::List(K::Push)),
    route("GET", "/v1/pushes/{push}", Need::Op(Describe, PUSH)),
    route("PUT", "/v1/pushes/{push}", Need::Op(Admin, PUSH)),
    route("DELETE", "/v1/pushes/{push}", Need::Op(Admin, PUSH)),
    route("GET", "/v1/auth/whoami", Need::List(K::Cluster)),
    route("GET", "/v1/auth/keys", Need::Op(Admin, CLUSTER)),
    route("POST", "/v1/auth/keys", Need::Op(Admin, CLUSTER)),
    route("DELETE", "/v1/auth/keys/{id}", Need::Op(Admin, CLUSTER)),
    route("GET", "/v1/auth/acls", Need::Op(Admin, CLUSTER)),
    route("POST", "/v1/auth/acls", Need::Op(Admin, CLUSTER)),
    route("DELETE", "/v1/auth/acls/{id}", Need::Op(Admin, CLUSTER)),
];

/// The route of a method and a matched path template.
pub fn route_of(method: &str, path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.method == method && r.path == path)
}

/// What a subscription to `queue` (or `stream/subscription`) needs.
pub fn subscription_needs(queue: &str) -> (Operation, Resource<'_>) {
    if queue.contains('/') {
        (Consume, Resource::new(K::Subscription, queue))
    } else {
        (Consume, Resource::new(K::Queue, queue))
    }
}

/// What a binary protocol frame needs: each (operation, resource) must be allowed.
/// Exhaustive on purpose: a new frame kind does not compile until it says what it needs.
pub fn frame_needs(frame: &Frame) -> Vec<(Operation, Resource<'_>)> {
    fn queue_or_subscription(name: &str) -> Resource<'_> {
        if name.contains('/') {
            Resource::new(K::Subscription, name)
        } else {
            Resource::new(K::Queue, name)
        }
    }
    match frame {
        Frame::Hello { .. } | Frame::Ping | Frame::Credit { .. } | Frame::Unsubscribe { .. } => {
            Vec::new()
        }
        Frame::Produce { queue, .. } => vec![(Produce, Resource::new(K::Queue, queue))],
        Frame::Subscribe { queue, .. }
        | Frame::Ack { queue, .. }
        | Frame::Nack { queue, .. }
        | Frame::Extend { queue, .. } => vec![(Consume, queue_or_subscription(queue))],
        Frame::StreamProduce { stream, .. } => vec![(Produce, Resource::new(K::Stream, stream))],
        Frame::Fetch { partitions, .. } => {
            let mut needs: Vec<(Operation, Resource<'_>)> = Vec::new();
            for p in partitions {
                let r = Resource::new(K::Stream, &p.stream);
                if !needs.contains(&(Consume, r)) {
                    needs.push((Consume, r));
                }
            }
            needs
        }
        Frame::ListOffset { stream, .. } | Frame::StreamMetadata { stream } => {
            vec![(Describe, Resource::new(K::Stream, stream))]
        }
        Frame::JoinGroup { group, streams, .. } => {
            let mut needs = vec![(Consume, Resource::new(K::Group, group))];
            needs.extend(
                streams
                    .iter()
                    .map(|s| (Consume, Resource::new(K::Stream, s))),
            );
            needs
        }
        Frame::Heartbeat { group, .. }
        | Frame::LeaveGroup { group, .. }
        | Frame::Commit { group, .. } => vec![(Consume, Resource::new(K::Group, group))],
        Frame::FetchCommitted { group, .. } => vec![(Describe, Resource::new(K::Group, group))],
        // Server -> client frames: a client sending one is refused by the dispatch; nothing
        // to allow.
        Frame::HelloOk { .. }
        | Frame::Produced { .. }
        | Frame::Subscribed { .. }
        | Frame::Deliver { .. }
        | Frame::Settled { .. }
        | Frame::Throttle { .. }
        | Frame::Error { .. }
        | Frame::Pong
        | Frame::Ok
        | Frame::Fetched { .. }
        | Frame::Offset { .. }
        | Frame::Joined { .. }
        | Frame::Assignment { .. }
        | Frame::Committed { .. }
        | Frame::StreamInfo { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_listed_once() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
            if let Need::Op(_, Target::Param(_, param)) = a.need {
                assert!(
                    a.path.contains(&format!("{{{param}}}")),
                    "{} {} names no {{{param}}}",
                    a.method,
                    a.path
                );
            }
        }
    }
}
