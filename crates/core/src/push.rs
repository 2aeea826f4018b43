//! Push delivery, sans-IO: a push endpoint takes messages from a queue (or a stream
//! subscription) as a consumer does, POSTs them to a URL, and settles each by the reply.
//! This module holds an endpoint's configuration and its checks, what a reply means
//! (`settlement`), the circuit breaker (`Breaker`), and the counters; the server's push
//! workers do the I/O (docs/edges.md).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::{Limits, MAX_LEASE_MS, validate_name};
use crate::error::{BrokerError, ErrorCode};

pub const MAX_PUSH_BATCH: u32 = 1_000;
pub const MAX_PUSH_CONCURRENCY: u32 = 256;
pub const MAX_URL_LEN: usize = 2_048;
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// A Retry-After up to this long is waited out holding the lease (the delivery is not
/// counted again); a longer one gives the message back with that delay.
pub const MAX_HELD_RETRY_AFTER_MS: u64 = 60_000;
/// A Retry-After is taken as at least a second (0, or a date past, would resend at once
/// in a loop) and at most a week (the endpoint pauses that long at most).
pub const MIN_RETRY_AFTER_MS: u64 = 1_000;
pub const MAX_RETRY_AFTER_MS: u64 = 7 * 86_400_000;

/// Where an endpoint's messages come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PushSource {
    Queue(String),
    /// `stream/subscription`.
    Subscription(String),
}

impl PushSource {
    /// The name receive, ack and nack take.
    pub fn name(&self) -> &str {
        match self {
            PushSource::Queue(name) | PushSource::Subscription(name) => name,
        }
    }
}

/// What a request carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushFormat {
    /// One message per request: its body as the request body, its metadata in headers.
    #[default]
    Raw,
    /// `{"messages": [...]}`, up to `batch` messages per request.
    Json,
}

/// What a 4xx reply other than 408 and 429 does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnClientError {
    /// Given back with the queue's backoff, dead-lettered after max_deliveries.
    #[default]
    Retry,
    /// Straight to the dead-letter queue (the receiver will never take it).
    DeadLetter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Opens after this many failures in a row.
    pub consecutive_failures: u32,
    /// ... or when this share of the requests of the last `window_ms` failed,
    pub failure_rate: f64,
    pub window_ms: u64,
    /// ... once the window holds at least this many.
    pub min_requests: u32,
    /// Open this long, then half-open: `probes` requests try; success closes it.
    pub open_ms: u64,
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window_ms: 30_000,
            min_requests: 20,
            open_ms: 30_000,
            probes: 1,
        }
    }
}

/// A push endpoint's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushConfig {
    pub source: PushSource,
    pub url: String,
    pub format: PushFormat,
    /// Messages per request (json format; raw sends one).
    pub batch: u32,
    /// Requests in flight at once.
    pub concurrency: u32,
    pub connect_timeout_ms: u64,
    /// The whole request, reply included.
    pub timeout_ms: u64,
    pub on_client_error: OnClientError,
    pub breaker: BreakerConfig,
    /// The Standard Webhooks secret requests are signed with (`whsec_<base64>`).
    pub secret: String,
}

/// A change to an endpoint (every field optional; `breaker` fields too).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushPatch {
    pub source: Option<PushSource>,
    pub url: Option<String>,
    pub format: Option<PushFormat>,
    pub batch: Option<u32>,
    pub concurrency: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub on_client_error: Option<OnClientError>,
    pub breaker: Option<BreakerPatch>,
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPatch {
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<f64>,
    pub window_ms: Option<u64>,
    pub min_requests: Option<u32>,
    pub open_ms: Option<u64>,
    pub probes: Option<u32>,
}

fn invalid(message: impl Into<String>) -> BrokerError {
    BrokerError::new(ErrorCode::InvalidConfig, message)
}

pub fn validate_push_name(name: &str) -> Result<(), BrokerError> {
    validate_name(name, "push endpoint", ErrorCode::InvalidPushName)
}

/// The scheme, host and port of an http(s) URL, or why it is not one. Strict, as the API
/// document's pattern says: a host of A-Z a-z 0-9 . - (or an IPv6 address in brackets), a
/// port of at most 65535, then printable ASCII only; no credentials.
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("the URL must start with https:// or http://".into());
    };
    if url.len() > MAX_URL_LEN {
        return Err(format!("the URL must be at most {MAX_URL_LEN} bytes"));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !tail.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(
            "the URL's path must be printable ASCII, without spaces (percent-encode the rest)"
                .into(),
        );
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(inside) => {
            let (host, after) = inside
                .split_once(']')
                .ok_or("the URL's [IPv6 address] is not closed")?;
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err("the URL's [IPv6 address] is not one".into());
            }
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or("junk after the URL's ]")?),
                ),
            }
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return Err(
                    "the URL's host must be A-Z a-z 0-9 . - (an IPv6 address in brackets; user@host is refused)"
                        .into(),
                );
            }
            (host, port)
        }
    };
    let port = match port {
        Some(text) => {
            let digits =
                !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
            let five_without_zero = text.len() < 5 || !text.starts_with('0');
            match text.parse::<u16>() {
                Ok(port) if digits && five_without_zero => port,
                _ => return Err(format!("the URL's port '{text}' is not 0 to 65535")),
            }
        }
        None if https => 443,
        None => 80,
    };
    Ok((https, host.to_ascii_lowercase(), port))
}

impl PushConfig {
    /// A new endpoint from a patch: `source` and `url` are required; `secret` is made by
    /// the caller when not given.
    pub fn create(
        patch: &PushPatch,
        secret: String,
        limits: &Limits,
    ) -> Result<PushConfig, BrokerError> {
        let (Some(source), Some(url)) = (&patch.source, &patch.url) else {
            return Err(invalid(
                r#"a new push endpoint needs a source and a url, like {"source": {"queue": "emails"}, "url": "https://mail.example.com/send"}"#,
            ));
        };
        let config = PushConfig {
            source: source.clone(),
            url: url.clone(),
            format: PushFormat::Raw,
            batch: 1,
            concurrency: 4,
            connect_timeout_ms: 5_000,
            timeout_ms: 30_000,
            on_client_error: OnClientError::Retry,
            breaker: BreakerConfig::default(),
            secret,
        };
        let config = config.apply(patch);
        config.validate(limits)?;
        Ok(config)
    }

    pub fn apply(&self, patch: &PushPatch) -> PushConfig {
        let mut next = self.clone();
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(value) = &patch.$field {
                    next.$field = value.clone();
                }
            )*};
        }
        set!(
            source,
            url,
            format,
            batch,
            concurrency,
            connect_timeout_ms,
            timeout_ms,
            on_client_error,
            secret
        );
        if let Some(b) = &patch.breaker {
            let breaker = &mut next.breaker;
            macro_rules! set_breaker {
                ($($field:ident),*) => {$(
                    if let Some(value) = b.$field {
                        breaker.$field = value;
                    }
                )*};
            }
            set_breaker!(
                consecutive_failures,
                failure_rate,
                window_ms,
                min_requests,
                open_ms,
                probes
            );
        }
        next
    }

    pub fn validate(&self, limits: &Limits) -> Result<(), BrokerError> {
        match &self.source {
            PushSource::Queue(q) => crate::config::validate_queue_name(q)?,
            PushSource::Subscription(path) => {
                let Some((stream, sub)) =
                    crate::stream::subscription::split_subscription_path(path)
                else {
                    return Err(invalid(format!(
                        "source.subscription: name it STREAM/SUBSCRIPTION; got '{path}'"
                    )));
                };
                crate::stream::subscription::validate_subscription_name(stream, sub)?;
            }
        }
        parse_url(&self.url).map_err(|e| invalid(format!("url: {e}")))?;
        if !(1..=MAX_PUSH_BATCH).contains(&self.batch)
            || self.batch as usize > limits.max_receive_messages
        {
            return Err(invalid(format!(
                "batch: give 1 to {} messages per request",
                MAX_PUSH_BATCH.min(limits.max_receive_messages as u32)
            )));
        }
        if self.format == PushFormat::Raw && self.batch != 1 {
            return Err(invalid(
                "batch: the raw format sends one message per request; use format json for batches",
            ));
        }
        if !(1..=MAX_PUSH_CONCURRENCY).contains(&self.concurrency) {
            return Err(invalid(format!(
                "concurrency: give 1 to {MAX_PUSH_CONCURRENCY} requests in flight"
            )));
        }
        for (field, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("timeout_ms", self.timeout_ms),
        ] {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                return Err(invalid(format!("{field}: give 1 to {MAX_TIMEOUT_MS} ms")));
            }
        }
        let b = &self.breaker;
        let valid = b.consecutive_failures > 0
            && b.failure_rate > 0.0
            && b.failure_rate <= 1.0
            && (1_000..=3_600_000).contains(&b.window_ms)
            && b.min_requests > 0
            && (100..=MAX_LEASE_MS).contains(&b.open_ms)
            && (1..=MAX_PUSH_CONCURRENCY).contains(&b.probes);
        if !valid {
            return Err(invalid(
                "breaker: consecutive_failures and min_requests at least 1, failure_rate in (0, 1], window_ms 1000 to 3600000, open_ms 100 to 43200000, probes 1 to 256",
            ));
        }
        // whsec_ and 32 to 88 characters of canonical base64: a key of 22 to 66 bytes.
        let encoded = self.secret.strip_prefix("whsec_").unwrap_or("");
        let decodes = tidewater_auth::webhook::keys(
            &tidewater_auth::webhook::Scheme::StandardWebhooks,
            std::slice::from_ref(&self.secret),
        )
        .is_ok();
        if !decodes || !(32..=88).contains(&encoded.len()) {
            return Err(invalid(
                "secret: a Standard Webhooks secret, whsec_ and the base64 of 24 to 64 random bytes (leave it out to have one made)",
            ));
        }
        Ok(())
    }

    /// What is shown of it: the secret as a fingerprint only.
    pub fn shown(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("a push endpoint serializes");
        if let Some(object) = value.as_object_mut() {
            object.remove("secret");
            object.insert(
                "secret_fingerprint".into(),
                crate::hook::fingerprint(&self.secret).into(),
            );
        }
        value
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered this status (with Retry-After in ms, if it said).
    Status {
        status: u16,
        retry_after_ms: Option<u64>,
    },
    /// No answer within timeout_ms.
    Timeout,
    /// No connection (refused, reset, TLS, DNS, or an address refused as private).
    Connect(String),
}

/// What the reply does to the messages of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    /// Send them again after this long, holding their leases: not a failed delivery.
    RetryAfter(u64),
    /// Give them back with this delay (a Retry-After too long to hold): counted.
    Delay(u64, String),
    /// Give them back with the queue's backoff (counted; max_deliveries, then the DLQ).
    Nack(String),
    /// The same, as overloaded (the receiver said so: adaptive throttling slows down).
    NackOverloaded(String),
    /// Straight to the dead-letter queue.
    Reject(String),
}

/// A reply's class, for counters and metrics.
pub fn class(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Status { status, .. } => match status {
            200..=299 => "2xx",
            429 => "429",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        Outcome::Timeout => "timeout",
        Outcome::Connect(_) => "connect_error",
    }
}

impl Outcome {
    /// Whether the breaker counts it: a success, a failure, or neither (the receiver asked
    /// to slow down, or refused the message itself: it is up).
    pub fn health(&self) -> Option<bool> {
        match self {
            Outcome::Status { status, .. } if (200..300).contains(status) => Some(true),
            Outcome::Status {
                status: 429 | 503,
                retry_after_ms: Some(_),
            } => None,
            Outcome::Status { status, .. }
                if (400..500).contains(status) && !matches!(status, 408 | 429) =>
            {
                None
            }
            _ => Some(false),
        }
    }
}

/// What `outcome` does to the request's messages.
pub fn settlement(outcome: &Outcome, on_client_error: OnClientError) -> Settlement {
    match outcome {
        Outcome::Status { status, .. } if (200..300).contains(status) => Settlement::Ack,
        Outcome::Status {
            status: status @ (429 | 503),
            retry_after_ms: Some(ms),
        } => {
            let ms = (*ms).clamp(MIN_RETRY_AFTER_MS, MAX_RETRY_AFTER_MS);
            if ms <= MAX_HELD_RETRY_AFTER_MS {
                Settlement::RetryAfter(ms)
            } else {
                Settlement::Delay(ms, format!("push: HTTP {status} with Retry-After {ms} ms"))
            }
        }
        Outcome::Status {
            status: status @ (429 | 503),
            retry_after_ms: None,
        } => Settlement::NackOverloaded(format!("push: HTTP {status} without Retry-After")),
        Outcome::Status { status, .. }
            if (400..500).contains(status) && !matches!(status, 408 | 429) =>
        {
            let error = format!("push: HTTP {status} from the receiver");
            match on_client_error {
                OnClientError::Retry => Settlement::Nack(error),
                OnClientError::DeadLetter => Settlement::Reject(error),
            }
        }
        Outcome::Status { status, .. } => Settlement::Nack(format!("push: HTTP {status}")),
        Outcome::Timeout => Settlement::Nack("push: no reply within timeout_ms".into()),
        Outcome::Connect(why) => Settlement::Nack(format!("push: {why}")),
    }
}

/// The breaker's state, as shown and as a metric (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// What the breaker allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// Send.
    Yes,
    /// Send, as one of the half-open probes.
    Probe,
    /// Send nothing before this time (open, all probes out, or paused by Retry-After).
    Until(i64),
}

/// A circuit breaker per endpoint: closed (requests flow), open (none: messages stay in
/// the queue), half-open (a few probes; success closes it, failure opens it again). Also
/// holds a pause the receiver asked for with Retry-After.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive: u32,
    /// (time, failed) of the requests in the window.
    window: VecDeque<(i64, bool)>,
    opened_at: i64,
    probes_out: u32,
    paused_until: i64,
    pub opens: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: BreakerState::Closed,
            consecutive: 0,
            window: VecDeque::new(),
            opened_at: 0,
            probes_out: 0,
            paused_until: 0,
            opens: 0,
        }
    }

    pub fn reconfigure(&mut self, config: BreakerConfig) {
        self.config = config;
    }

    pub fn state(&self, now: i64) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.opened_at + self.config.open_ms as i64 => {
                BreakerState::HalfOpen
            }
            state => state,
        }
    }

    pub fn allow(&mut self, now: i64) -> Allow {
        if now < self.paused_until {
            return Allow::Until(self.paused_until);
        }
        if self.state == BreakerState::Open {
            let half_open_at = self.opened_at + self.config.open_ms as i64;
            if now < half_open_at {
                return Allow::Until(half_open_at);
            }
            self.state = BreakerState::HalfOpen;
            self.probes_out = 0;
        }
        match self.state {
            BreakerState::Closed => Allow::Yes,
            BreakerState::HalfOpen if self.probes_out < self.config.probes => {
                self.probes_out += 1;
                Allow::Probe
            }
            // Probes are out: wait for one to come back.
            _ => Allow::Until(now + 100),
        }
    }

    /// The receiver asked for a pause (Retry-After): nothing is sent before `until`.
    pub fn pause(&mut self, until: i64) {
        self.paused_until = self.paused_until.max(until);
    }

    /// A request ended: `health` from `Outcome::health` (None: neither).
    pub fn record(&mut self, now: i64, probe: bool, health: Option<bool>) {
        if probe {
            self.probes_out = self.probes_out.saturating_sub(1);
        }
        let Some(ok) = health else {
            return;
        };
        let horizon = now - self.config.window_ms as i64;
        while self.window.front().is_some_and(|(t, _)| *t < horizon) {
            self.window.pop_front();
        }
        self.window.push_back((now, !ok));
        if ok {
            self.consecutive = 0;
            if self.state == BreakerState::HalfOpen && probe {
                self.state = BreakerState::Closed;
                self.window.clear();
            }
            return;
        }
        self.consecutive += 1;
        let failed = self.window.iter().filter(|(_, f)| *f).count();
        let rate_tripped = self.window.len() >= self.config.min_requests as usize
            && failed as f64 >= self.config.failure_rate * self.window.len() as f64;
        let trips = match self.state {
            BreakerState::HalfOpen => probe,
            BreakerState::Closed => {
                self.consecutive >= self.config.consecutive_failures || rate_tripped
            }
            BreakerState::Open => false,
        };
        if trips {
            self.state = BreakerState::Open;
            self.opened_at = now;
            self.opens += 1;
            self.window.clear();
            self.consecutive = 0;
        }
    }
}

/// An endpoint's counters since the server started.
#[derive(Default)]
pub struct PushCounters {
    pub delivered: AtomicU64,
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    /// Messages held by the worker (leases extended) while a Retry-After runs or the
    /// breaker is open: neither given back nor counted as failed deliveries.
    pub held: AtomicU64,
    /// Replies by class (`class`).
    replies: Mutex<BTreeMap<&'static str, u64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PushStats {
    /// Messages acknowledged by a 2xx.
    pub delivered: u64,
    pub requests: u64,
    pub in_flight: u64,
    pub held: u64,
    pub replies: BTreeMap<&'static str, u64>,
}

impl PushCounters {
    pub fn reply(&self, outcome: &Outcome) {
        *self.replies.lock().entry(class(outcome)).or_default() += 1;
    }

    pub fn stats(&self) -> PushStats {
        PushStats {
            delivered: self.delivered.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            replies: self.replies.lock().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, retry_after_ms: Option<u64>) -> Outcome {
        Outcome::Status {
            status,
            retry_after_ms,
        }
    }

    #[test]
    fn replies_settle_as_the_issue_says() {
        let retry = OnClientError::Retry;
        assert_eq!(settlement(&status(204, None), retry), Settlement::Ack);
        assert_eq!(
            settlement(&status(429, Some(2_000)), retry),
            Settlement::RetryAfter(2_000)
        );
        assert_eq!(
            settlement(&status(503, Some(5_000)), retry),
            Settlement::RetryAfter(5_000)
        );
        assert!(matches!(
            settlement(&status(429, Some(3_600_000)), retry),
            Settlement::Delay(3_600_000, _)
        ));
        // Without Retry-After: a failure with the backoff, as overloaded.
        assert!(matches!(
            settlement(&status(429, None), retry),
            Settlement::NackOverloaded(_)
        ));
        assert_eq!(status(429, None).health(), Some(false));
        // Retry-After 0 (or a date past) waits a second; a year waits a week.
        assert_eq!(
            settlement(&status(429, Some(0)), retry),
            Settlement::RetryAfter(MIN_RETRY_AFTER_MS)
        );
        assert!(matches!(
            settlement(&status(503, Some(u64::MAX)), retry),
            Settlement::Delay(MAX_RETRY_AFTER_MS, _)
        ));
        assert!(matches!(
            settlement(&status(404, None), retry),
            Settlement::Nack(_)
        ));
        assert!(matches!(
            settlement(&status(422, None), OnClientError::DeadLetter),
            Settlement::Reject(_)
        ));
        assert!(matches!(
            settlement(&status(408, None), OnClientError::DeadLetter),
            Settlement::Nack(_)
        ));
        assert!(matches!(
            settlement(&status(500, None), retry),
            Settlement::Nack(_)
        ));
        assert!(matches!(
            settlement(&Outcome::Timeout, retry),
            Settlement::Nack(_)
        ));
        // The breaker: 5xx, timeouts and refused connections count against the receiver;
        // Retry-After and a refused message do not.
        assert_eq!(status(500, None).health(), Some(false));
        assert_eq!(Outcome::Timeout.health(), Some(false));
        assert_eq!(status(429, Some(1)).health(), None);
        assert_eq!(status(422, None).health(), None);
        assert_eq!(status(200, None).health(), Some(true));
    }

    #[test]
    fn the_breaker_opens_on_consecutive_failures_and_closes_after_a_probe() {
        let mut b = Breaker::new(BreakerConfig::default());
        for t in 0..4 {
            assert_eq!(b.allow(t), Allow::Yes);
            b.record(t, false, Some(false));
        }
        assert_eq!(b.state(4), BreakerState::Closed);
        b.record(4, false, Some(false));
        assert_eq!(b.state(5), BreakerState::Open);
        assert_eq!(b.allow(5), Allow::Until(30_004));
        // Half-open: one probe; a failed one opens it again.
        assert_eq!(b.allow(30_004), Allow::Probe);
        assert_eq!(b.allow(30_005), Allow::Until(30_105));
        b.record(30_010, true, Some(false));
        assert_eq!(b.state(30_011), BreakerState::Open);
        assert_eq!(b.allow(60_010), Allow::Probe);
        b.record(60_020, true, Some(true));
        assert_eq!(b.state(60_021), BreakerState::Closed);
        assert_eq!(b.allow(60_021), Allow::Yes);
        assert_eq!(b.opens, 2);
        // Neutral outcomes do not count; successes reset the run.
        for t in 0..10 {
            b.record(70_000 + t, false, None);
        }
        assert_eq!(b.state(70_100), BreakerState::Closed);
    }

    #[test]
    fn the_breaker_opens_on_the_failure_rate() {
        let mut b = Breaker::new(BreakerConfig {
            consecutive_failures: 100,
            ..BreakerConfig::default()
        });
        // Alternating: never 5 in a row, but half of 20 failed.
        for t in 0..19 {
            b.record(t, false, Some(t % 2 == 0));
        }
        assert_eq!(b.state(19), BreakerState::Closed);
        b.record(19, false, Some(false));
        assert_eq!(b.state(20), BreakerState::Open);
    }

    #[test]
    fn a_pause_holds_requests_back() {
        let mut b = Breaker::new(BreakerConfig::default());
        b.pause(5_000);
        assert_eq!(b.allow(1_000), Allow::Until(5_000));
        assert_eq!(b.allow(5_000), Allow::Yes);
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("https://Mail.Example.com/send?x=1"),
            Ok((true, "mail.example.com".into(), 443))
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8080/x"),
            Ok((false, "127.0.0.1".into(), 8080))
        );
        assert_eq!(parse_url("http://[::1]:9/x"), Ok((false, "::1".into(), 9)));
        assert_eq!(parse_url("http://[::1]/x"), Ok((false, "::1".into(), 80)));
        for bad in [
            "ftp://x",
            "https://",
            "https://user:pw@host/",
            "https://host:port/",
            "https://ho st/",
            "https://host:65536/",
            "https://host:01234/",
            "https://hôst/",
            "https://host/pa th",
            "https://[zz]/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
