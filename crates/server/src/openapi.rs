//! The OpenAPI 3.1 description served at /v1/openapi.json.
//!
//! The document is exact: every status an operation can answer, request schemas as strict as
//! the server (unknown fields refused, ranges from the queue configuration's checks and from
//! the running server's `Limits`), response schemas as the server writes them, and links
//! between operations (for clients and for stateful testing: `scripts/schemathesis`).
//! What JSON Schema cannot say is in the descriptions: byte lengths (`maxLength` counts
//! characters, the server counts UTF-8 bytes), rules across fields (`backoff.base_ms <=
//! max_ms` after the patch is applied, `coalesce.window_ms <= max_wait_ms`,
//! `adaptive.min_per_s <= max_per_s`), `deliver_at` at most `max_delay_ms` ahead of now, and
//! the request body limit (`max_request_bytes`).

use serde_json::{Map, Value, json};
use tidewater_core::config::{
    MAX_DEDUP_WINDOW_MS, MAX_FAIRNESS_WEIGHTS, MAX_LEASE_MS, MAX_PRIORITY_LEVELS,
    MAX_QUEUE_NAME_LEN, MAX_QUOTA_TENANTS, MAX_RATE, MAX_TENANT_LEN, MAX_TTL_MS, MIN_RATE,
};
use tidewater_core::{ErrorCode, Limits};

use crate::errors::Code;

/// Longest backoff delay (`QueueConfig::validate`): 7 days.
const MAX_BACKOFF_MS: u64 = 7 * 86_400_000;
/// Redrive rates (`Broker::start_redrive`).
const MAX_REDRIVE_RATE: u64 = 100_000;

/// The error statuses and what each means, in the order they are listed.
const STATUSES: &[(u16, &str, &str)] = &[
    (
        400,
        "BadRequest",
        "malformed or invalid input (the message names the field)",
    ),
    (
        401,
        "Unauthenticated",
        "authentication is on and the request has no valid credentials (Authorization: Bearer <key id>.<secret>), or its address failed too often (Retry-After)",
    ),
    (
        403,
        "Forbidden",
        "the principal has no grant for this operation on this resource (x-tidewater-permission says which)",
    ),
    (404, "NotFound", "unknown queue or redrive"),
    (
        408,
        "RequestTimeout",
        "the request body did not arrive within body_timeout_ms",
    ),
    (
        409,
        "Conflict",
        "conflicts with the queue's or the broker's state",
    ),
    (
        413,
        "TooLarge",
        "too large: the body (max_request_bytes), a message (max_message_bytes), a batch (max_batch_messages, max_receive_messages) or more than the queue can ever hold",
    ),
    (
        429,
        "TooManyRequests",
        "refused by backpressure or quota; nothing was done: retry after Retry-After",
    ),
    (
        500,
        "ServerError",
        "the storage engine failed (the message says whether anything was stored), or a bug",
    ),
    (
        503,
        "Unavailable",
        "not ready (recovering), shutting down, or at the HTTP connection cap",
    ),
    (
        507,
        "InsufficientStorage",
        "free disk space is below the watermark; publishes wait, everything else works",
    ),
];

/// Codes that travel only inside 200 replies (per receipt) or only over the binary protocol.
fn http_error_code(code: Code) -> bool {
    !matches!(
        code,
        Code::Broker(ErrorCode::InvalidReceipt | ErrorCode::StaleReceipt | ErrorCode::Superseded)
            | Code::Frame(_)
    )
}

/// The error codes an HTTP reply with `status` can carry.
pub fn error_codes(status: u16) -> Vec<&'static str> {
    let mut codes: Vec<&str> = Code::ALL
        .iter()
        .filter(|c| c.http_status() == status && http_error_code(**c))
        .map(|c| c.as_str())
        .collect();
    if status == 503 {
        // A connection over http.max_connections is answered before any request is read.
        codes.push(ErrorCode::Overloaded.as_str());
    }
    codes
}

fn error_schema(status: u16) -> Value {
    let retry = matches!(status, 429 | 507);
    let mut required = vec!["code", "message"];
    if retry {
        required.push("retry_after_ms");
    }
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": {
        "code": {"type": "string", "enum": error_codes(status)},
        "message": {"type": "string"},
        "retry_after_ms": {"type": "integer", "minimum": 0, "description": "when to retry; also in Retry-After (seconds, rounded up)"}}})
}

fn error_response(status: u16, description: &str) -> Value {
    let mut response = json!({"description": description, "content": {"application/json": {
        "schema": {"$ref": format!("#/components/schemas/Error{status}")}}}});
    if matches!(status, 429 | 507) {
        response["headers"] = json!({"Retry-After": {"required": true, "description": "seconds to wait",
            "schema": {"type": "integer", "minimum": 1}}});
    }
    response
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn ok_json(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema_ref(schema)}}})
}

/// What an operation can answer besides success.
#[derive(Clone, Copy, Default)]
struct Fails {
    /// Reads a request body: invalid JSON (400), too large (413), too slow (408), the
    /// broker-wide body budget (429).
    body: bool,
    /// 400 for invalid input other than the body (path, query, values).
    bad: bool,
    not_found: bool,
    conflict: bool,
    /// 413 beyond the body (messages, batches, capacity).
    too_large: bool,
    /// Writes to storage: the write queue full (429), a failed write (500), the disk full
    /// (507).
    writes: bool,
    /// 429 beyond the body budget and writes (queue full, quota).
    refused: bool,
    /// 500 (a failed read, the store refusing writes).
    server: bool,
}

fn operation(id: &str, summary: &str, success: Map<String, Value>, fails: Fails) -> Value {
    let mut responses = success;
    let wanted = |status: u16| match status {
        400 => fails.body || fails.bad,
        404 => fails.not_found,
        408 => fails.body,
        409 => fails.conflict,
        413 => fails.body || fails.too_large,
        429 => fails.body || fails.writes || fails.refused,
        500 => fails.writes || fails.server,
        503 => true,
        507 => fails.writes,
        _ => false,
    };
    for &(status, name, _) in STATUSES {
        if wanted(status) {
            responses.insert(
                status.to_string(),
                json!({"$ref": format!("#/components/responses/{name}")}),
            );
        }
    }
    json!({"operationId": id, "summary": summary, "responses": responses})
}

fn responses(list: &[(u16, Value)]) -> Map<String, Value> {
    list.iter()
        .map(|(status, response)| (status.to_string(), response.clone()))
        .collect()
}

fn with_body(mut operation: Value, schema: &str, required: bool, description: &str) -> Value {
    operation["requestBody"] = json!({"required": required, "description": description,
        "content": {"application/json": {"schema": schema_ref(schema)}}});
    operation
}

fn with_links(mut operation: Value, statuses: &[u16], links: &Value) -> Value {
    for status in statuses {
        operation["responses"][status.to_string()]["links"] = links.clone();
    }
    operation
}

fn link(target: &str, description: &str) -> Value {
    json!({"operationId": target, "description": description,
        "parameters": {"queue": "$request.path.queue"}})
}

fn link_with_body(target: &str, description: &str, body: Value) -> Value {
    let mut link = link(target, description);
    link["requestBody"] = body;
    link
}

/// An integer in `min..=max`.
fn int(min: u64, max: u64) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

/// The same, or null.
fn int_or_null(min: u64, max: u64) -> Value {
    json!({"type": ["integer", "null"], "minimum": min, "maximum": max})
}

fn number_or_null(min: f64, max: f64) -> Value {
    json!({"type": ["number", "null"], "minimum": min, "maximum": max})
}

fn described(mut schema: Value, description: &str) -> Value {
    schema["description"] = json!(description);
    schema
}

/// A body sent as text: no control character but tab, line feed and carriage return.
const PLAIN_TEXT_PATTERN: &str =
    "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$";

/// Base64 as the server decodes it: the standard alphabet, padded, canonical.
const BASE64_PATTERN: &str =
    "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// `stream/subscription`: two names of the queue name's rule (together at most 254 bytes:
/// past that the server refuses it, which the schema cannot say).
fn subscription_path() -> Value {
    let name = queue_name()["pattern"]
        .as_str()
        .expect("a pattern")
        .trim_start_matches('^')
        .trim_end_matches('$')
        .to_string();
    json!({"type": "string", "pattern": format!("^{name}/{name}$")})
}

fn queue_name() -> Value {
    // 1 to MAX_QUEUE_NAME_LEN of [A-Za-z0-9._-], but not "." or ".." (without lookaround,
    // which not every schema tool supports): a first character that is not a dot, or one
    // dot then a non-dot, or two dots then anything.
    let n = MAX_QUEUE_NAME_LEN;
    json!({"type": "string", "pattern": format!(
        "^([A-Za-z0-9_-][A-Za-z0-9._-]{{0,{}}}|\\.[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{}}}|\\.\\.[A-Za-z0-9._-]{{1,{}}})$",
        n - 1, n - 2, n - 2
    )})
}

/// The queue configuration: a patch (PUT) and the whole object (replies).
fn config_schemas(limits: &Limits) -> (Value, Value) {
    let rate = || number_or_null(MIN_RATE, 1e12);
    let burst = || int_or_null(1, u64::MAX);
    let quota_limits = json!({"type": "object", "additionalProperties": false, "properties": {
        "msgs_per_s": rate(), "bytes_per_s": rate(), "burst_msgs": burst(), "burst_bytes": burst()}});
    let quota = json!({"type": "object", "additionalProperties": false,
        "description": "producer token buckets per tenant: the top level is the default for any tenant, `tenants` overrides it field by field; an absent (or null) field is no limit; a missing burst is one second of the rate",
        "properties": {
            "msgs_per_s": rate(), "bytes_per_s": rate(), "burst_msgs": burst(), "burst_bytes": burst(),
            "tenants": {"type": "object", "maxProperties": MAX_QUOTA_TENANTS,
                "propertyNames": {"minLength": 1, "maxLength": MAX_TENANT_LEN, "description": "1 to 128 bytes"},
                "additionalProperties": schema_ref("QuotaLimits")}}});
    let fairness = json!({"type": "object", "additionalProperties": false,
        "description": "weighted fair scheduling (deficit round robin) across the values of `by`",
        "properties": {
            "by": {"type": "string", "pattern": "^(?:tenant|key|header:[\\s\\S]+)$", "default": "tenant",
                "description": "tenant | key | header:<name>"},
            "weights": {"type": "object", "maxProperties": MAX_FAIRNESS_WEIGHTS,
                "additionalProperties": {"type": "number", "minimum": 0.01, "maximum": 1000},
                "description": "weight per value (default 1)"}}});
    let coalesce = json!({"type": "object", "additionalProperties": false, "required": ["window_ms"],
        "description": "debounce by key; window_ms <= max_wait_ms",
        "properties": {
            "window_ms": int(1, 3_600_000),
            "mode": {"type": "string", "enum": ["latest", "merge"], "default": "latest"},
            "max_wait_ms": described(int_or_null(1, 86_400_000), "at least window_ms; default (absent or null) 10 x window_ms, at most 86400000")}});
    let dispatch_rate = json!({"type": "object", "additionalProperties": false, "required": ["per_s"],
        "description": "deliveries per second (GCRA); `burst` may go at once",
        "properties": {"per_s": {"type": "number", "minimum": MIN_RATE, "maximum": MAX_RATE},
            "burst": {"type": "integer", "minimum": 1, "maximum": limits.max_receive_messages, "default": 1}}});
    let adaptive = json!({"type": "object", "additionalProperties": false, "required": ["min_per_s", "max_per_s"],
        "description": "AIMD on the dispatch rate, driven by overloaded nacks and expired leases; min_per_s <= max_per_s",
        "properties": {"min_per_s": {"type": "number", "minimum": MIN_RATE, "maximum": MAX_RATE},
            "max_per_s": {"type": "number", "minimum": MIN_RATE, "maximum": MAX_RATE}}});
    let nullable = |schema: &str| json!({"anyOf": [schema_ref(schema), {"type": "null"}]});
    let patch = json!({"type": "object", "additionalProperties": false,
        "description": "every field optional: an absent field keeps its value. For `dead_letter_queue`, `quota`, `fairness`, `coalesce`, `key_concurrency`, `dispatch_rate`, `adaptive` and `ttl_ms`, null turns the feature off; for the other fields null is the same as absent. The patched configuration must satisfy backoff.base_ms <= backoff.max_ms, must not name the queue itself as its dead_letter_queue (409), and on_expire dead_letter needs a dead_letter_queue (409).",
        "properties": {
            "lease_ms": described(int_or_null(1, MAX_LEASE_MS), "default lease (visibility timeout) of a receive; default 30000"),
            "max_deliveries": described(int_or_null(0, 1000), "deliveries before a message moves to the dead-letter queue; 0 = unlimited; default 10"),
            "backoff": {"type": ["object", "null"], "additionalProperties": false,
                "description": "full jitter: a uniform delay in [0, min(max_ms, base_ms x multiplier^(deliveries-1))]",
                "properties": {
                    "base_ms": described(int_or_null(0, MAX_BACKOFF_MS), "default 1000"),
                    "multiplier": described(number_or_null(1.0, 10.0), "default 2.0"),
                    "max_ms": described(int_or_null(0, MAX_BACKOFF_MS), "default 300000")}},
            "dead_letter_queue": {"anyOf": [queue_name(), {"type": "null"}], "description": "default <queue>-dlq (created when needed); null = none (messages are retried forever)"},
            "max_messages": described(int_or_null(1, limits.max_queue_messages), &format!("capacity in messages; default {}", limits.default_max_messages)),
            "max_bytes": described(int_or_null(1, limits.max_queue_bytes), &format!("capacity in bytes; default {}", limits.default_max_bytes)),
            "max_in_flight": described(int_or_null(1, limits.max_in_flight), &format!("messages leased at once; default {}", limits.default_max_in_flight)),
            "quota": nullable("Quota"),
            "dedup_window_ms": described(int_or_null(0, MAX_DEDUP_WINDOW_MS), "client-chosen ids accepted this recently are not enqueued again; 0 = off; default 300000"),
            "supersede": {"type": ["boolean", "null"], "description": "a newer message with a key cancels pending older ones with that key; default false"},
            "priority_levels": described(int_or_null(1, MAX_PRIORITY_LEVELS.into()), "messages carry priority 0 (lowest) ..levels-1; default 1"),
            "priority_min_share": described(number_or_null(0.0, 0.5), "share of deliveries kept for lower levels while higher ones wait; default 0.1"),
            "fairness": nullable("Fairness"),
            "coalesce": nullable("Coalesce"),
            "key_concurrency": described(int_or_null(1, 10_000), "messages with one key leased or awaiting a retry at once; 1 = strict per-key order; null = no limit"),
            "dispatch_rate": nullable("DispatchRate"),
            "adaptive": nullable("Adaptive"),
            "ttl_ms": described(int_or_null(1, MAX_TTL_MS), "maximum age of a message; null = forever"),
            "on_expire": {"type": ["string", "null"], "enum": ["drop", "dead_letter", null], "description": "default drop"}}});
    let whole = json!({"type": "object", "additionalProperties": false,
        "required": ["lease_ms", "max_deliveries", "backoff", "dead_letter_queue", "max_messages", "max_bytes", "max_in_flight",
            "quota", "dedup_window_ms", "supersede", "priority_levels", "priority_min_share", "fairness", "coalesce",
            "key_concurrency", "dispatch_rate", "adaptive", "ttl_ms", "on_expire"],
        "properties": {
            "lease_ms": int(1, MAX_LEASE_MS),
            "max_deliveries": int(0, 1000),
            "backoff": {"type": "object", "additionalProperties": false, "required": ["base_ms", "multiplier", "max_ms"], "properties": {
                "base_ms": int(0, MAX_BACKOFF_MS), "multiplier": {"type": "number", "minimum": 1.0, "maximum": 10.0}, "max_ms": int(0, MAX_BACKOFF_MS)}},
            "dead_letter_queue": {"anyOf": [queue_name(), {"type": "null"}]},
            "max_messages": int(1, limits.max_queue_messages),
            "max_bytes": int(1, limits.max_queue_bytes),
            "max_in_flight": int(1, limits.max_in_flight),
            "quota": nullable("Quota"),
            "dedup_window_ms": int(0, MAX_DEDUP_WINDOW_MS),
            "supersede": {"type": "boolean"},
            "priority_levels": int(1, MAX_PRIORITY_LEVELS.into()),
            "priority_min_share": {"type": "number", "minimum": 0.0, "maximum": 0.5},
            "fairness": nullable("Fairness"),
            "coalesce": nullable("Coalesce"),
            "key_concurrency": int_or_null(1, 10_000),
            "dispatch_rate": nullable("DispatchRate"),
            "adaptive": nullable("Adaptive"),
            "ttl_ms": int_or_null(1, MAX_TTL_MS),
            "on_expire": {"type": "string", "enum": ["drop", "dead_letter"]}}});
    let mut schemas = json!({"Quota": quota, "QuotaLimits": quota_limits, "Fairness": fairness,
        "Coalesce": coalesce, "DispatchRate": dispatch_rate, "Adaptive": adaptive});
    schemas["QueueConfigPatch"] = patch;
    (schemas, whole)
}

/// A subscription's retention settings (how it holds back the stream's retention).
fn subscription_retention_schemas() -> [(&'static str, Value); 3] {
    [
        (
            "pin_max_ms",
            json!({"type": ["integer", "null"], "minimum": -1, "maximum": i64::MAX,
            "description": "how much older than the stream's retention_ms a record it has not settled may be held; null: the stream's retention_ms; 0: retention wins; -1: no cap"}),
        ),
        (
            "pin_max_bytes",
            json!({"type": ["integer", "null"], "minimum": -1, "maximum": i64::MAX,
            "description": "bytes per partition retention would delete that it may hold; null: the stream's retention_bytes; 0: retention wins; -1: no cap"}),
        ),
        (
            "on_retention",
            json!({"type": "string", "enum": ["drop", "dead_letter"],
            "description": "past its caps, its oldest records are dropped or moved to its dead-letter queue (counted in retention_expired either way); default drop"}),
        ),
    ]
}

fn queue_stats() -> Value {
    let counters = [
        "depth",
        "in_flight",
        "delayed",
        "parked",
        "total",
        "bytes",
        "oldest_age_ms",
        "published",
        "delivered",
        "acked",
        "nacked",
        "expired",
        "dead_lettered",
        "redriven",
        "purged",
        "ttl_expired",
        "deduplicated",
        "superseded",
        "dedup_ids",
        "coalesced_in",
        "coalesced_out",
        "throttle_cuts",
        "throttle_raises",
    ];
    let count = json!({"type": "integer", "minimum": 0});
    let mut properties: Map<String, Value> = counters
        .iter()
        .map(|name| (name.to_string(), count.clone()))
        .collect();
    let optional = [
        (
            "coalesce_windows",
            "coalescing windows open now (queues that coalesce)",
        ),
        (
            "keys_in_flight",
            "keys with a message leased or awaiting a retry (queues with key_concurrency)",
        ),
        (
            "keys_blocked",
            "keys with messages waiting behind them (queues with key_concurrency)",
        ),
        (
            "fair_flows",
            "values (tenants, keys, ...) with messages waiting (queues with fairness)",
        ),
    ];
    for (name, description) in optional {
        properties.insert(name.into(), described(count.clone(), description));
    }
    properties.insert(
        "waiting_by_priority".into(),
        json!({"type": "array", "items": count,
        "description": "messages waiting per level, highest first (queues with priority levels)"}),
    );
    properties.insert("dispatch_rate_per_s".into(), json!({"type": "number", "minimum": 0,
        "description": "the dispatch rate in force (adaptive throttling moves it); absent when unlimited"}));
    properties["parked"] = described(
        count.clone(),
        "of delayed: long delays waiting in the delay log",
    );
    properties["dedup_ids"] = described(count, "client ids remembered for deduplication");
    properties.insert(
        "forecast".into(),
        described(
            schema_ref("Forecast"),
            "the backlog forecast with the server's default objectives ([forecast])",
        ),
    );
    json!({"type": "object", "additionalProperties": false, "required": counters, "properties": properties})
}

fn message_schemas(limits: &Limits) -> Value {
    let max_id = limits.max_id_bytes.min(255);
    let max_b64 = limits.max_message_bytes.div_ceil(3) * 4;
    let headers = json!({"type": "object", "maxProperties": limits.max_headers,
        "propertyNames": {"minLength": 1, "maxLength": limits.max_header_bytes},
        "additionalProperties": {"type": "string", "maxLength": limits.max_header_bytes},
        "description": format!("at most max_headers ({}) headers; names 1 to max_header_bytes ({}) bytes, values at most that many bytes. The headers tidewater-tenant, tidewater-ttl-ms and tidewater-priority are reserved: use the fields", limits.max_headers, limits.max_header_bytes)});
    let null_only = json!({"type": "null"});
    let in_message = json!({"type": "object", "additionalProperties": false,
        "description": "exactly one of body and body_base64; at most one of delay_ms and deliver_at (null is the same as absent)",
        "oneOf": [
            {"required": ["body"], "properties": {"body": {"type": "string"}, "body_base64": null_only}},
            {"required": ["body_base64"], "properties": {"body_base64": {"type": "string"}, "body": null_only}}],
        "not": {"required": ["delay_ms", "deliver_at"], "properties": {"delay_ms": {"type": "integer"}, "deliver_at": {"type": "integer"}}},
        "properties": {
            "body": {"type": ["string", "null"], "maxLength": limits.max_message_bytes,
                "description": format!("UTF-8 text of at most max_message_bytes ({}) bytes (413 message_too_large)", limits.max_message_bytes)},
            "body_base64": {"type": ["string", "null"], "maxLength": max_b64, "pattern": BASE64_PATTERN,
                "description": "standard base64 with padding; at most max_message_bytes once decoded"},
            "key": {"type": ["string", "null"], "maxLength": limits.max_key_bytes,
                "description": format!("at most max_key_bytes ({}) bytes", limits.max_key_bytes)},
            "headers": headers,
            "delay_ms": described(int_or_null(0, limits.max_delay_ms), "deliver after this long (at most max_delay_ms)"),
            "deliver_at": {"type": ["integer", "null"], "minimum": i64::MIN, "maximum": i64::MAX,
                "description": "deliver at this time (ms since the epoch): at most max_delay_ms ahead of now; a past time is now"},
            "id": {"type": ["string", "null"], "minLength": 1, "maxLength": max_id,
                "description": format!("client-chosen id, 1 to {max_id} bytes; a repeated id within the queue's dedup_window_ms is acknowledged, not enqueued")},
            "jitter_ms": described(int_or_null(0, limits.max_delay_ms), "up to this many ms added at random to the delivery time"),
            "ttl_ms": described(int_or_null(1, MAX_TTL_MS), "this message's time to live (the queue's ttl_ms applies if shorter)"),
            "tenant": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_TENANT_LEN,
                "description": "the producer, for quotas and fairness (default: the request's tenant); 1 to 128 bytes"},
            "priority": described(int_or_null(0, 255), "0 = lowest; clamped to the queue's levels")}});
    let publish = json!({"type": "object", "additionalProperties": false, "required": ["messages"], "properties": {
        "messages": {"type": "array", "minItems": 1, "maxItems": limits.max_batch_messages, "items": schema_ref("InMessage"),
            "description": format!("1 to max_batch_messages ({}) messages, accepted whole or refused whole", limits.max_batch_messages)},
        "ack": {"type": ["string", "null"], "enum": ["durable", "written", null], "default": "durable",
            "description": "durable: after fsync; written: after write(2)"},
        "tenant": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_TENANT_LEN,
            "description": "tenant of messages that name none"}}});
    let out_headers = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let out = |receipt: bool| {
        let mut required = vec!["id", "headers", "delivery_count", "published_at", "offset"];
        let mut properties = json!({
            "id": {"type": "string"},
            "body": {"type": "string", "pattern": PLAIN_TEXT_PATTERN,
                "description": "the body, with encoding auto (the default), when its bytes are valid UTF-8 with no control character (U+0000-U+001F, U+007F-U+009F) other than tab, line feed and carriage return; the empty body is \"\""},
            "body_base64": {"type": "string", "pattern": BASE64_PATTERN,
                "description": "the body otherwise (standard alphabet, padded), and always with encoding base64"},
            "key": {"type": "string"},
            "headers": out_headers.clone(),
            "delivery_count": {"type": "integer", "minimum": if receipt { 1 } else { 0 }},
            "published_at": {"type": "integer", "description": "ms since the epoch"},
            "offset": {"type": "integer", "minimum": 0}});
        if receipt {
            required.push("receipt");
            properties["receipt"] = json!({"type": "string", "description": "names this lease: ack, nack or extend with it"});
            properties["partition"] = json!({"type": "integer", "minimum": 0,
                "description": "a subscription's delivery from a stream partition: which one (offset is in it); absent for a queue's, and for a subscription's merged or redriven messages"});
        }
        json!({"type": "object", "additionalProperties": false, "required": required, "properties": properties,
            "oneOf": [{"required": ["body"]}, {"required": ["body_base64"]}]})
    };
    json!({
        "InMessage": in_message,
        "PublishRequest": publish,
        "PublishReply": {"type": "object", "additionalProperties": false, "required": ["ids", "duplicates"], "properties": {
            "ids": {"type": "array", "minItems": 1, "items": {"type": "string"}, "description": "in request order"},
            "duplicates": {"type": "array", "items": {"type": "integer", "minimum": 0},
                "description": "indexes of messages acknowledged but not enqueued (id seen within dedup_window_ms)"}}},
        "ReceiveRequest": {"type": "object", "additionalProperties": false, "properties": {
            "max": {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_receive_messages, "default": 1},
            "wait_ms": {"type": ["integer", "null"], "minimum": 0, "maximum": limits.max_wait_ms, "default": 0,
                "description": "long-poll for the first message up to this long"},
            "lease_ms": described(int_or_null(1, MAX_LEASE_MS), "default: the queue's lease_ms"),
            "consumer": {"type": ["string", "null"], "minLength": 1, "maxLength": 200,
                "description": "who receives, for the forecast's consumer count (without it, each connection counts as a consumer)"},
            "encoding": {"type": "string", "enum": ["auto", "base64"], "default": "auto",
                "description": "how bodies come back: base64 gives body_base64 for every message (see DeliveredMessage)"}}},
        "DeliveredMessage": out(true),
        "PeekedMessage": out(false),
        "Messages": {"type": "object", "additionalProperties": false, "required": ["messages"], "properties": {
            "messages": {"type": "array", "maxItems": limits.max_receive_messages, "items": schema_ref("DeliveredMessage")}}},
        "Peeked": {"type": "object", "additionalProperties": false, "required": ["messages", "next_from"], "properties": {
            "messages": {"type": "array", "maxItems": limits.max_receive_messages, "items": schema_ref("PeekedMessage")},
            "next_from": {"type": ["integer", "null"], "minimum": 0, "description": "`from` for the next page; null when this one is empty"}}},
    })
}

/// Streams: configuration, produce, fetch.
fn stream_schemas(limits: &Limits) -> Value {
    let max_b64 = limits.max_message_bytes.div_ceil(3) * 4;
    let null_only = json!({"type": "null"});
    let timestamp_type = json!({"type": "string", "enum": ["create_time", "log_append_time"],
        "description": "create_time: the producer's timestamp (the broker's when it gives none); log_append_time: the broker's at append, for every record"});
    let partitions = json!({"type": "integer", "minimum": 1, "maximum": limits.max_partitions,
        "description": format!("1 to max_partitions ({}); can grow, never shrink (409)", limits.max_partitions)});
    let mut partitions_or_null = partitions.clone();
    partitions_or_null["type"] = json!(["integer", "null"]);
    // -1 or at least 1: JSON Schema says "not 0 and at least -1".
    let retention = |what: &str| json!({"type": "integer", "minimum": -1, "maximum": i64::MAX, "not": {"enum": [0]}, "description": what});
    let retention_ms = retention(
        "records go once their batch's largest timestamp is this old (ms), whole sealed segments at a time (Kafka's retention.ms; default 7 days); -1 keeps them forever",
    );
    let retention_bytes = retention(
        "bytes a partition keeps: its oldest sealed segments go while what stays is still at least this (Kafka's retention.bytes); -1 (the default): no limit",
    );
    let or_null = |schema: &Value| {
        let mut s = schema.clone();
        s["type"] = json!(["integer", "null"]);
        s
    };
    let (retention_ms_or_null, retention_bytes_or_null) =
        (or_null(&retention_ms), or_null(&retention_bytes));
    let cleanup = json!({"type": "string", "enum": ["delete", "compact", "compact+delete"],
        "description": "delete (the default): retention deletes old records; compact: the latest record per key stays (every record needs a key; retention deletes nothing); compact+delete: both (Kafka's cleanup.policy; compact,delete is taken too)"});
    let mut cleanup_or_null = cleanup.clone();
    cleanup_or_null["type"] = json!(["string", "null"]);
    cleanup_or_null["enum"] = json!([
        "delete",
        "compact",
        "compact+delete",
        "compact,delete",
        "delete,compact",
        null
    ]);
    let delete_retention_ms = json!({"type": "integer", "minimum": 0, "maximum": i64::MAX,
        "description": "on a compacted stream, how long (ms) a tombstone stays after the compaction that first kept it (Kafka's delete.retention.ms; default a day)"});
    let min_dirty_ratio = json!({"type": "number", "minimum": 0, "maximum": 1,
        "description": "on a compacted stream, a partition is compacted once this share of its sealed bytes was written since its last compaction (Kafka's min.cleanable.dirty.ratio; default 0.5)"});
    let (delete_retention_ms_or_null, min_dirty_ratio_or_null) = {
        let (mut a, mut b) = (delete_retention_ms.clone(), min_dirty_ratio.clone());
        a["type"] = json!(["integer", "null"]);
        b["type"] = json!(["number", "null"]);
        (a, b)
    };
    let segment_bytes = json!({"type": "integer", "anyOf": [{"const": 0}, {"minimum": 1_048_576, "maximum": 1_073_741_824}],
        "description": "bytes at which a partition's segment rolls (Kafka's segment.bytes): 1 MiB to 1 GiB, or 0 (the default) for the server's segment_roll_bytes"});
    let segment_ms = json!({"type": "integer", "minimum": 0, "maximum": u64::MAX,
        "description": "age (ms) at which a partition's segment rolls, at its next append (Kafka's segment.ms); 0 (the default): the server's segment_roll_ms"});
    let max_message_bytes = json!({"type": "integer", "minimum": 0, "maximum": tidewater_core::stream::records::MAX_STREAM_BATCH_BYTES,
        "description": "the largest record batch a produce may append, uncompressed (Kafka's max.message.bytes); 0 (the default): no limit but the server's"});
    let mut timestamp_type_or_null = timestamp_type.clone();
    timestamp_type_or_null["type"] = json!(["string", "null"]);
    timestamp_type_or_null["enum"] = json!(["create_time", "log_append_time", null]);
    let headers = json!({"type": "object", "maxProperties": limits.max_headers,
        "propertyNames": {"minLength": 1, "maxLength": limits.max_header_bytes},
        "additionalProperties": {"type": "string", "maxLength": limits.max_header_bytes},
        "description": format!("at most max_headers ({}) headers; names 1 to max_header_bytes ({}) bytes, values at most that many bytes", limits.max_headers, limits.max_header_bytes)});
    let one_of_pair = |field: &str| {
        json!([
            {"properties": {field: {"type": "string"}, format!("{field}_base64"): null_only}},
            {"properties": {format!("{field}_base64"): {"type": "string"}, field: null_only}},
            {"properties": {field: null_only, format!("{field}_base64"): null_only}}])
    };
    let in_record = json!({"type": "object", "additionalProperties": false,
        "description": "a key as key (text) or key_base64, or none; a value as value (text) or value_base64, or none (a tombstone); not both forms of either",
        "allOf": [{"anyOf": one_of_pair("key")}, {"anyOf": one_of_pair("value")}],
        "properties": {
            "key": {"type": ["string", "null"], "maxLength": limits.max_key_bytes,
                "description": format!("at most max_key_bytes ({}) bytes; chooses the partition (Kafka's murmur2) unless partition is given", limits.max_key_bytes)},
            "key_base64": {"type": ["string", "null"], "maxLength": limits.max_key_bytes.div_ceil(3) * 4, "pattern": BASE64_PATTERN},
            "value": {"type": ["string", "null"], "maxLength": limits.max_message_bytes,
                "description": format!("UTF-8 text of at most max_message_bytes ({}) bytes (413 message_too_large)", limits.max_message_bytes)},
            "value_base64": {"type": ["string", "null"], "maxLength": max_b64, "pattern": BASE64_PATTERN,
                "description": "standard base64 with padding; at most max_message_bytes once decoded"},
            "headers": headers,
            "partition": {"type": ["integer", "null"], "minimum": 0, "maximum": u32::MAX,
                "description": "this partition (404 partition_not_found past the stream's); default: by key, or one partition per produce for keyless records"},
            "timestamp": {"type": ["integer", "null"], "minimum": 0, "maximum": i64::MAX,
                "description": "ms since the epoch (default: now); ignored by log_append_time streams"}}});
    let out_record = json!({"type": "object", "additionalProperties": false, "required": ["offset", "timestamp", "headers"],
        "not": {"anyOf": [{"required": ["key", "key_base64"]}, {"required": ["value", "value_base64"]}]},
        "properties": {
            "offset": {"type": "integer", "minimum": 0},
            "timestamp": {"type": "integer", "description": "ms since the epoch"},
            "key": {"type": "string", "pattern": PLAIN_TEXT_PATTERN, "description": "the key when its bytes are plain text (the rule of message bodies); absent when none"},
            "key_base64": {"type": "string", "pattern": BASE64_PATTERN, "description": "the key otherwise"},
            "value": {"type": "string", "pattern": PLAIN_TEXT_PATTERN, "description": "the value when its bytes are plain text; absent when none (a tombstone)"},
            "value_base64": {"type": "string", "pattern": BASE64_PATTERN, "description": "the value otherwise"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}}}});
    json!({
        "StreamConfig": {"type": "object", "additionalProperties": false, "required": ["partitions", "timestamp_type", "retention_ms", "retention_bytes", "cleanup", "delete_retention_ms", "min_dirty_ratio"], "properties": {
            "partitions": partitions, "timestamp_type": timestamp_type,
            "retention_ms": retention_ms, "retention_bytes": retention_bytes,
            "cleanup": cleanup, "delete_retention_ms": delete_retention_ms, "min_dirty_ratio": min_dirty_ratio,
            "segment_bytes": segment_bytes, "segment_ms": segment_ms, "max_message_bytes": max_message_bytes}},
        "StreamConfigPatch": {"type": "object", "additionalProperties": false, "properties": {
            "partitions": partitions_or_null, "timestamp_type": timestamp_type_or_null,
            "retention_ms": retention_ms_or_null, "retention_bytes": retention_bytes_or_null,
            "cleanup": cleanup_or_null, "delete_retention_ms": delete_retention_ms_or_null,
            "min_dirty_ratio": min_dirty_ratio_or_null,
            "segment_bytes": or_null(&segment_bytes), "segment_ms": or_null(&segment_ms),
            "max_message_bytes": or_null(&max_message_bytes)}},
        "PutStreamRequest": {
            "description": "the configuration patch, or {\"config\": patch} as GET returns it",
            "anyOf": [schema_ref("StreamConfigPatch"),
                {"type": "object", "additionalProperties": false, "required": ["config"], "properties": {"config": schema_ref("StreamConfigPatch")}}]},
        "Partition": {"type": "object", "additionalProperties": false, "required": ["partition", "start_offset", "end_offset", "bytes", "segments"], "properties": {
            "partition": {"type": "integer", "minimum": 0},
            "start_offset": {"type": "integer", "minimum": 0, "description": "the first offset a fetch can return"},
            "end_offset": {"type": "integer", "minimum": 0, "description": "the offset the next record gets; records below it are durable"},
            "bytes": {"type": "integer", "minimum": 0, "description": "bytes of its segment files"},
            "segments": {"type": "integer", "minimum": 1, "description": "its segment files, the one being written included (retention and compaction act on the others)"}}},
        "Stream": {"type": "object", "additionalProperties": false, "required": ["name", "config", "partitions"], "properties": {
            "name": {"type": "string"}, "config": schema_ref("StreamConfig"),
            "partitions": {"type": "array", "minItems": 1, "items": schema_ref("Partition")}}},
        "StreamList": {"type": "object", "additionalProperties": false, "required": ["streams"], "properties": {
            "streams": {"type": "array", "items": schema_ref("Stream")}}},
        "InRecord": in_record,
        "ProduceRequest": {"type": "object", "additionalProperties": false, "required": ["records"], "properties": {
            "records": {"type": "array", "minItems": 1, "maxItems": limits.max_batch_messages, "items": schema_ref("InRecord"),
                "description": format!("1 to max_batch_messages ({}) records, accepted whole (every partition's in one write) or refused whole", limits.max_batch_messages)},
            "ack": {"type": ["string", "null"], "enum": ["durable", "written", null], "default": "durable",
                "description": "durable: after fsync; written: after write(2) (fetches see records once durable)"}}},
        "ProduceReply": {"type": "object", "additionalProperties": false, "required": ["offsets"], "properties": {
            "offsets": {"type": "array", "minItems": 1, "description": "each record's partition and offset, in request order",
                "items": {"type": "object", "additionalProperties": false, "required": ["partition", "offset"], "properties": {
                    "partition": {"type": "integer", "minimum": 0}, "offset": {"type": "integer", "minimum": 0}}}}}},
        "OutRecord": out_record,
        "Records": {"type": "object", "additionalProperties": false, "required": ["records", "next_offset", "start_offset", "end_offset"], "properties": {
            "records": {"type": "array", "items": schema_ref("OutRecord")},
            "next_offset": {"type": "integer", "minimum": 0, "description": "the offset to fetch next"},
            "start_offset": {"type": "integer", "minimum": 0},
            "end_offset": {"type": "integer", "minimum": 0, "description": "the partition's end: records below it are durable"}}},
        "OffsetForTime": {"type": "object", "additionalProperties": false, "required": ["offset"], "properties": {
            "offset": {"type": ["integer", "null"], "minimum": 0,
                "description": "the first offset whose record's timestamp is at least the time asked; null when every record is older"}}},
    })
}

/// Consumer groups: consumer instances, fetch, commit, describe.
fn group_schemas(limits: &Limits) -> Value {
    let partition_ref = json!({"type": "object", "additionalProperties": false, "required": ["stream", "partition"], "properties": {
        "stream": {"type": "string"}, "partition": {"type": "integer", "minimum": 0}}});
    let mut member_record = stream_schemas(limits)["OutRecord"].clone();
    member_record["required"] = json!(["stream", "partition", "offset", "timestamp", "headers"]);
    member_record["properties"]["stream"] = json!({"type": "string"});
    member_record["properties"]["partition"] = json!({"type": "integer", "minimum": 0});
    json!({
        "GroupList": {"type": "object", "additionalProperties": false, "required": ["groups"], "properties": {
            "groups": {"type": "array", "items": {"type": "string"}, "description": "groups with members or committed offsets"}}},
        "Group": {"type": "object", "additionalProperties": false, "required": ["name", "generation", "members", "offsets"], "properties": {
            "name": {"type": "string"},
            "generation": {"type": "integer", "minimum": 0, "description": "bumped at each change of assignment"},
            "members": {"type": "array", "items": {"type": "object", "additionalProperties": false, "required": ["member", "assigned"], "properties": {
                "member": {"type": "string"}, "assigned": {"type": "array", "items": partition_ref}}}},
            "offsets": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                "required": ["stream", "partition", "committed", "metadata", "end_offset", "lag", "lag_ms"], "properties": {
                "stream": {"type": "string"}, "partition": {"type": "integer", "minimum": 0},
                "committed": {"type": "integer", "minimum": 0, "description": "the next offset the group consumes"},
                "metadata": {"type": "string"},
                "end_offset": {"type": "integer", "minimum": 0},
                "lag": {"type": "integer", "minimum": 0, "description": "records not consumed yet: end_offset - committed"},
                "lag_ms": {"type": "integer", "minimum": 0, "description": "age of the oldest record not consumed yet (0 when none)"}}}}}},
        "ConsumerRequest": {"type": "object", "additionalProperties": false, "required": ["streams"], "properties": {
            "streams": {"type": "array", "minItems": 1, "maxItems": tidewater_core::broker::MAX_MEMBER_STREAMS, "items": queue_name(), "description": "the streams this member reads (each must exist: 404 stream_not_found)"},
            "instance": {"type": ["string", "null"], "pattern": queue_name()["pattern"],
                "description": "a stable name (Kafka's group.instance.id), 1 to 200 characters of A-Z a-z 0-9 . _ - (not . or ..): creating it again gives a new member id that takes the old one's partitions, and fences the old one"},
            "session_timeout_ms": {"type": ["integer", "null"], "minimum": 1000, "maximum": limits.max_session_timeout_ms,
                "description": "the member is removed after this long without a fetch (default 30000)"},
            "start_at": {"description": "where to start in a partition the group has committed nothing for (default earliest): its start, its end, an offset (kept within its range), or the first record at or after a time (ms since the epoch; the end when every record is older)",
                "anyOf": [
                    {"type": ["string", "null"], "enum": ["earliest", "latest", null]},
                    {"type": "object", "additionalProperties": false, "required": ["offset"], "properties": {"offset": {"type": "integer", "minimum": 0, "maximum": u64::MAX}}},
                    {"type": "object", "additionalProperties": false, "required": ["time"], "properties": {"time": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX}}}]}}},
        "Consumer": {"type": "object", "additionalProperties": false, "required": ["group", "member", "session_timeout_ms"], "properties": {
            "group": {"type": "string"}, "member": {"type": "string"}, "session_timeout_ms": {"type": "integer", "minimum": 1000}}},
        "MemberRecord": member_record,
        "MemberRecords": {"type": "object", "additionalProperties": false, "required": ["records"], "properties": {
            "records": {"type": "array", "items": schema_ref("MemberRecord")}}},
        "CommitRequest": {"type": "object", "additionalProperties": false, "properties": {
            "offsets": {"type": ["array", "null"], "maxItems": limits.max_partitions,
                "description": "the offsets to commit (the next offset to consume of each partition); default: the member's positions",
                "items": {"type": "object", "additionalProperties": false, "required": ["stream", "partition", "offset"], "properties": {
                    "stream": queue_name(), "partition": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                    "offset": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "description": "400 offset_out_of_range past the partition's end"}}}}}},
        "ResetOffsetsRequest": {"type": "object", "additionalProperties": false,
            "description": "exactly one target: to, to_datetime, shift_by or to_offset (else 400 invalid_request); every target is kept within each partition's range",
            "properties": {
                "streams": {"type": ["array", "null"], "minItems": 1, "maxItems": limits.max_streams, "items": queue_name(),
                    "description": "the streams to reset, every partition of each (each must exist: 404 stream_not_found); default: every stream the group has committed offsets for"},
                "to": {"type": ["string", "null"], "enum": ["earliest", "latest", null], "description": "each partition's start or end"},
                "to_datetime": {"type": ["string", "integer", "null"], "minimum": i64::MIN, "maximum": i64::MAX,
                    "description": "RFC 3339 (e.g. 2026-11-30T10:00:00Z) or ms since the epoch: the first offset whose record's timestamp is at least that time, the end when every record is older"},
                "shift_by": {"type": ["integer", "null"], "minimum": i64::MIN, "maximum": i64::MAX,
                    "description": "move the committed offset by this many (from the partition's start where nothing is committed)"},
                "to_offset": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX},
                "dry_run": {"type": ["boolean", "null"], "default": false, "description": "only answer the plan; commit nothing"}}},
        "OffsetResetReply": {"type": "object", "additionalProperties": false, "required": ["group", "dry_run", "offsets"], "properties": {
            "group": {"type": "string"},
            "dry_run": {"type": "boolean"},
            "offsets": {"type": "array", "description": "by stream, then partition",
                "items": {"type": "object", "additionalProperties": false, "required": ["stream", "partition", "from", "to"], "properties": {
                    "stream": {"type": "string"}, "partition": {"type": "integer", "minimum": 0},
                    "from": {"type": ["integer", "null"], "minimum": 0, "description": "the committed offset before (null: none)"},
                    "to": {"type": "integer", "minimum": 0, "description": "the committed offset after (unless dry_run)"}}}}}},
        "Empty": {"type": "object", "additionalProperties": false, "properties": {}},
    })
}

/// The body of ack, nack or extend: one shape on the server, where each takes its own fields
/// and ignores (without checking) the others'.
fn settle_request(limits: &Limits, op: &str) -> Value {
    let receipts = json!({"type": "array", "maxItems": limits.max_receive_messages, "items": {"type": "string"},
        "description": format!("at most max_receive_messages ({}); each receipt that fails is listed in the reply's `failed`", limits.max_receive_messages)});
    let ignored = |kind: &str| json!({"type": [kind, "null"], "description": "nack's or extend's field: ignored here"});
    let unsigned_ignored = || json!({"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX, "description": "nack's or extend's field: ignored here"});
    let mut properties = json!({
        "receipts": receipts,
        "delay_ms": unsigned_ignored(),
        "error": ignored("string"),
        "reason": ignored("string"),
        "lease_ms": unsigned_ignored()});
    if op == "nack" {
        properties["delay_ms"] = described(
            int_or_null(0, limits.max_delay_ms),
            "deliver again after this long; default: the queue's backoff",
        );
        properties["error"] = json!({"type": ["string", "null"], "description": "kept for the dead-letter queue (its first 1024 bytes)"});
        properties["reason"] = json!({"type": ["string", "null"], "enum": ["failed", "overloaded", null], "default": "failed",
            "description": "overloaded slows an adaptive queue's dispatch"});
    }
    if op == "extend" {
        properties["lease_ms"] = described(
            int_or_null(1, MAX_LEASE_MS),
            "the new lease from now; default: the queue's lease_ms",
        );
    }
    json!({"type": "object", "additionalProperties": false, "required": ["receipts"], "properties": properties})
}

fn settle_schemas(limits: &Limits) -> Value {
    json!({
        "AckRequest": settle_request(limits, "ack"),
        "NackRequest": settle_request(limits, "nack"),
        "ExtendRequest": settle_request(limits, "extend"),
        "SettleReply": {"type": "object", "additionalProperties": false, "required": ["ok", "failed"], "properties": {
            "ok": {"type": "integer", "minimum": 0},
            "failed": {"type": "array", "items": {"type": "object", "additionalProperties": false, "required": ["receipt", "code"], "properties": {
                "receipt": {"type": "string"},
                "code": {"type": "string", "enum": ["invalid_receipt", "stale_receipt", "superseded"]}}}},
            "superseded": {"type": "array", "minItems": 1, "items": {"type": "string"},
                "description": "ack only: receipts whose message a newer one with its key superseded"}}},
    })
}

fn auth_schemas() -> Value {
    let names = |v: &[&str]| json!({"type": "string", "enum": v});
    let operations: Vec<&str> = tidewater_auth::Operation::ALL.map(|o| o.as_str()).to_vec();
    let resources: Vec<&str> = tidewater_auth::ResourceKind::ALL
        .map(|k| k.as_str())
        .to_vec();
    let name = json!({"type": "string", "minLength": 1, "maxLength": tidewater_auth::acl::MAX_NAME_LEN,
            "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$", "description": "at most 128 bytes of UTF-8, no control characters"});
    let key = json!({"type": "object", "additionalProperties": false,
        "required": ["id", "principal", "roles", "tenant", "description", "created_at_ms", "expires_at_ms"], "properties": {
            "id": {"type": "string"}, "principal": {"type": "string"},
            "roles": {"type": "array", "items": {"type": "string"}},
            "tenant": {"type": ["string", "null"], "description": "the tenant its requests count against; null: the principal"},
            "description": {"type": "string"}, "created_at_ms": {"type": "integer"},
            "expires_at_ms": {"type": ["integer", "null"]}}});
    let acl = json!({"type": "object", "additionalProperties": false,
        "required": ["id", "resource", "name", "match", "operations", "created_at_ms"], "properties": {
            "id": {"type": "string"}, "principal": {"type": "string"}, "role": {"type": "string"},
            "resource": names(&resources), "name": {"type": "string"},
            "match": names(&["exact", "prefix", "glob"]),
            "operations": {"type": "array", "items": names(&operations)},
            "created_at_ms": {"type": "integer"}}});
    json!({
        "KeyRequest": {"type": "object", "additionalProperties": false, "required": ["principal"],
            "not": {"required": ["expires_at_ms", "expires_in_ms"],
                "properties": {"expires_at_ms": {"type": "integer"}, "expires_in_ms": {"type": "integer"}}},
            "description": "expires_at_ms or expires_in_ms, not both (null is not given)", "properties": {
            "principal": {"allOf": [name.clone(), {"not": {"const": tidewater_auth::ANONYMOUS}}]},
            "roles": {"type": "array", "maxItems": tidewater_auth::keys::MAX_ROLES, "items": name.clone()},
            "tenant": {"anyOf": [name.clone(), {"type": "null"}]},
            "description": {"type": "string", "maxLength": tidewater_auth::keys::MAX_DESCRIPTION_LEN},
            "expires_at_ms": {"type": ["integer", "null"], "minimum": 0, "maximum": i64::MAX, "description": "ms since the epoch, in the future"},
            "expires_in_ms": {"type": ["integer", "null"], "minimum": 1, "maximum": u64::MAX}}},
        "Key": key,
        "KeyCreated": {"type": "object", "additionalProperties": false, "required": ["key", "secret", "token"], "properties": {
            "key": schema_ref("Key"), "secret": {"type": "string", "description": "shown once, never stored"},
            "token": {"type": "string", "description": "<key id>.<secret>: Authorization: Bearer <token>"}}},
        "KeyList": {"type": "object", "additionalProperties": false, "required": ["keys"], "properties": {
            "keys": {"type": "array", "items": schema_ref("Key")}}},
        "KeyRevoked": {"type": "object", "additionalProperties": false, "required": ["revoked"], "properties": {"revoked": schema_ref("Key")}},
        "AclRequest": {"type": "object", "additionalProperties": false, "required": ["resource", "operations"],
            "description": "one of principal or role; the operations must mean something on the resource kind, and the name must be given unless match is prefix (docs/security.md)",
            "oneOf": [{"required": ["principal"], "not": {"required": ["role"]}}, {"required": ["role"], "not": {"required": ["principal"]}}],
            "properties": {
            "principal": name.clone(), "role": name,
            "resource": names(&resources),
            "name": {"type": "string", "maxLength": tidewater_auth::acl::MAX_PATTERN_LEN},
            "match": names(&["exact", "prefix", "glob"]),
            "operations": {"type": "array", "minItems": 1, "items": names(&operations)}}},
        "Acl": acl,
        "AclCreated": {"type": "object", "additionalProperties": false, "required": ["acl"], "properties": {"acl": schema_ref("Acl")}},
        "AclList": {"type": "object", "additionalProperties": false, "required": ["acls"], "properties": {
            "acls": {"type": "array", "items": schema_ref("Acl")}}},
        "AclRevoked": {"type": "object", "additionalProperties": false, "required": ["revoked"], "properties": {"revoked": schema_ref("Acl")}},
        "Whoami": {"type": "object", "required": ["authentication"], "properties": {
            "authentication": {"type": "boolean"}, "principal": {"type": "string"},
            "roles": {"type": "array", "items": {"type": "string"}}, "tenant": {"type": "string"},
            "key_id": {"type": ["string", "null"]}, "anonymous": {"type": "boolean"},
            "grants": {"type": "array", "items": schema_ref("Acl")}}},
    })
}

fn hook_schemas(limits: &Limits) -> Value {
    use tidewater_core::hook::{
        MAX_HEADER_NAME, MAX_KEPT_HEADERS, MAX_PREFIX_CHARS, MAX_SECRET_CHARS, MAX_SECRETS,
        MAX_TOLERANCE_S,
    };
    let header = json!({"type": "string", "minLength": 1, "maxLength": MAX_HEADER_NAME,
        "pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"});
    let header_or_null = json!({"anyOf": [header.clone(), {"type": "null"}]});
    let target = json!({"type": "object", "additionalProperties": false, "minProperties": 1, "maxProperties": 1,
        "description": "where accepted events go: {\"queue\": name} or {\"stream\": name}; it must exist",
        "properties": {"queue": queue_name(), "stream": queue_name()}});
    let presets = [
        "github",
        "stripe",
        "slack",
        "standard_webhooks",
        "hmac",
        "none",
    ];
    let secret = json!({"type": "string", "minLength": 1, "maxLength": MAX_SECRET_CHARS});
    let secrets = |item: Value| {
        json!({"type": "array", "minItems": 1, "maxItems": MAX_SECRETS,
        "description": "several while rotating: a signature by any passes; never shown again", "items": item})
    };
    // A whsec_ secret is the base64 of its key (canonical, as the server decodes it); any
    // other text is the key's own bytes.
    let whsec = json!({"anyOf": [
        {"allOf": [secret.clone(), {"pattern": format!("^whsec_{}", &BASE64_PATTERN[1..])}]},
        {"allOf": [secret.clone(), {"not": {"pattern": "^whsec_"}}]}]});
    let tolerance = int(1, MAX_TOLERANCE_S);
    let variant = |names: &[&str], extra: Value| {
        let mut properties =
            json!({"preset": {"type": "string", "enum": names}, "tolerance_s": tolerance.clone()});
        for (k, v) in extra.as_object().expect("an object") {
            properties[k] = v.clone();
        }
        json!({"type": "object", "additionalProperties": false, "required": ["preset"], "properties": properties})
    };
    let mut hmac = variant(
        &["hmac"],
        json!({"secrets": secrets(secret.clone()), "header": header.clone(),
        "algorithm": {"type": "string", "enum": ["sha256", "sha512"]},
        "encoding": {"type": "string", "enum": ["hex", "base64"]},
        "prefix": {"type": "string", "maxLength": MAX_PREFIX_CHARS}}),
    );
    hmac["required"] = json!(["preset", "secrets", "header"]);
    let signed = |names: &[&str], item: Value| {
        let mut v = variant(names, json!({"secrets": secrets(item)}));
        v["required"] = json!(["preset", "secrets"]);
        v
    };
    let signature = json!({"oneOf": [
            signed(&["github", "stripe", "slack"], secret.clone()),
            signed(&["standard_webhooks"], whsec),
            hmac,
            variant(&["none"], json!({"secrets": {"type": "array", "maxItems": 0}}))],
        "description": "github, stripe, slack and standard_webhooks take secrets (standard_webhooks: whsec_<base64> as Svix shows them); hmac also header, algorithm, encoding, prefix; none takes no secrets (and needs produce on the hook once authentication is on)"});
    let shown_signature = json!({"type": "object", "required": ["preset", "tolerance_s", "secret_fingerprints"], "properties": {
            "preset": {"type": "string", "enum": presets},
            "secret_fingerprints": {"type": "array", "items": {"type": "string"}, "description": "the first 8 hex digits of each secret's SHA-256"},
            "tolerance_s": {"type": "integer"},
            "header": {"type": "string"}, "algorithm": {"type": "string"}, "encoding": {"type": "string"}, "prefix": {"type": "string"}}});
    let fields = |signature: Value| {
        json!({
        "target": target.clone(),
        "signature": signature,
        "id_header": header_or_null.clone(),
        "key_header": header_or_null.clone(),
        "headers": {"type": "array", "maxItems": MAX_KEPT_HEADERS, "items": header.clone()},
        "max_body_bytes": int(1, limits.max_message_bytes as u64),
        "tenant": {"type": ["string", "null"], "minLength": 1, "maxLength": tidewater_core::config::MAX_TENANT_LEN}})
    };
    json!({
        "HookPut": {"type": "object", "additionalProperties": false, "properties": fields(signature),
            "description": "a new hook needs target and signature; an update changes the fields given (signature whole, secrets included)"},
        "Hook": {"type": "object", "additionalProperties": false, "required": ["name", "config", "created_at_ms", "stats"], "properties": {
            "name": {"type": "string"},
            "config": {"type": "object", "additionalProperties": false, "required": ["target", "signature", "headers", "max_body_bytes"],
                "properties": fields(shown_signature)},
            "created_at_ms": {"type": "integer"},
            "stats": {"type": "object", "additionalProperties": false, "required": ["accepted", "duplicates", "signature_failures", "refused"], "properties": {
                "accepted": {"type": "integer", "minimum": 0}, "duplicates": {"type": "integer", "minimum": 0},
                "signature_failures": {"type": "integer", "minimum": 0},
                "refused": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "description": "refusals by error code since the server started"}}}}},
        "HookList": {"type": "object", "additionalProperties": false, "required": ["hooks"], "properties": {
            "hooks": {"type": "array", "items": schema_ref("Hook")}}},
        "Ingested": {"type": "object", "additionalProperties": false, "properties": {
            "id": {"type": "string", "description": "the message id (the sender's delivery id when it names one), or partition:offset for a stream"},
            "duplicate": {"type": "boolean", "description": "true: this delivery id was already stored; nothing was stored again"},
            "challenge": {"type": "string", "description": "Slack's url_verification: the challenge, echoed"}}},
    })
}

fn push_schemas(limits: &Limits) -> Value {
    use tidewater_core::push::{MAX_PUSH_BATCH, MAX_PUSH_CONCURRENCY, MAX_TIMEOUT_MS, MAX_URL_LEN};
    let source = json!({"type": "object", "additionalProperties": false, "minProperties": 1, "maxProperties": 1,
        "description": "where messages come from: {\"queue\": name} or {\"subscription\": \"stream/name\"}; it must exist",
        "properties": {"queue": queue_name(), "subscription": subscription_path()}});
    let breaker = |required: bool| {
        let mut b = json!({"type": "object", "additionalProperties": false, "properties": {
            "consecutive_failures": int(1, u32::MAX as u64),
            "failure_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "window_ms": int(1_000, 3_600_000),
            "min_requests": int(1, u32::MAX as u64),
            "open_ms": int(100, tidewater_core::config::MAX_LEASE_MS),
            "probes": int(1, MAX_PUSH_CONCURRENCY as u64)}});
        if required {
            b["required"] = json!([
                "consecutive_failures",
                "failure_rate",
                "window_ms",
                "min_requests",
                "open_ms",
                "probes"
            ]);
        }
        b
    };
    let max_batch = (MAX_PUSH_BATCH as u64).min(limits.max_receive_messages as u64);
    let fields = |breaker: Value| {
        json!({
        "source": source.clone(),
        "url": {"type": "string", "maxLength": MAX_URL_LEN,
            "pattern": "^https?://([A-Za-z0-9.-]+|\\[[0-9A-Fa-f:.]+\\])(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][!-~]*)?$",
            "description": "http(s); addresses that are not public are refused unless [push] allows them"},
        "format": {"type": "string", "enum": ["raw", "json"]},
        "batch": int(1, max_batch),
        "concurrency": int(1, MAX_PUSH_CONCURRENCY as u64),
        "connect_timeout_ms": int(1, MAX_TIMEOUT_MS),
        "timeout_ms": int(1, MAX_TIMEOUT_MS),
        "on_client_error": {"type": "string", "enum": ["retry", "dead_letter"]},
        "breaker": breaker})
    };
    let mut put = fields(breaker(false));
    put["secret"] = json!({"type": "string", "minLength": 38, "maxLength": 94, "pattern": format!("^whsec_{}", &BASE64_PATTERN[1..]),
        "description": "the Standard Webhooks secret requests are signed with; made when left out (and shown once)"});
    let mut shown = fields(breaker(true));
    shown["secret_fingerprint"] = json!({"type": "string"});
    json!({
        "PushPut": {"type": "object", "additionalProperties": false, "properties": put,
            "description": "a new endpoint needs source and url (raw format: batch 1); an update changes the fields given"},
        "Push": {"type": "object", "additionalProperties": false,
            "required": ["name", "config", "created_at_ms", "breaker", "breaker_opens", "stats"], "properties": {
            "name": {"type": "string"},
            "config": {"type": "object", "additionalProperties": false, "properties": shown},
            "created_at_ms": {"type": "integer"},
            "breaker": {"type": "string", "enum": ["closed", "half_open", "open"]},
            "breaker_opens": {"type": "integer", "minimum": 0},
            "secret": {"type": "string", "description": "in the reply that created it only"},
            "stats": {"type": "object", "additionalProperties": false, "required": ["delivered", "requests", "in_flight", "held", "replies"], "properties": {
                "delivered": {"type": "integer", "minimum": 0}, "requests": {"type": "integer", "minimum": 0},
                "in_flight": {"type": "integer", "minimum": 0},
                "held": {"type": "integer", "minimum": 0, "description": "messages held (leases extended) while a Retry-After runs or the breaker is open"},
                "replies": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                    "description": "by class: 2xx, 3xx, 4xx, 429, 5xx, timeout, connect_error"}}}}},
        "PushList": {"type": "object", "additionalProperties": false, "required": ["pushes"], "properties": {
            "pushes": {"type": "array", "items": schema_ref("Push")}}},
    })
}

/// Marks each operation with what it needs once authentication is on
/// (`x-tidewater-permission`, from `auth::ROUTES`) and the 401 and 403 it may answer.
fn add_permissions(document: &mut Value) {
    use crate::auth::{Need, Target};
    let paths = document["paths"].as_object_mut().expect("an object");
    for (path, item) in paths.iter_mut() {
        let item = item.as_object_mut().expect("an object");
        for (method, operation) in item.iter_mut() {
            if method == "parameters" {
                continue;
            }
            let route = crate::auth::route_of(&method.to_uppercase(), path);
            let permission = match route.map(|r| r.need) {
                None => json!("none: refused while authentication is on"),
                Some(Need::Open) => json!("open"),
                Some(Need::List(kind)) => json!({"list": kind.as_str(),
                    "note": "any caller; the reply holds only what it may describe"}),
                Some(Need::Hook) => {
                    json!({"operation": "produce", "resource": "hook", "name": "hook",
                    "note": "a signed hook's webhooks need no credentials: the signature authenticates them; a hook with preset none needs produce on the hook"})
                }
                Some(Need::Op(op, target)) => {
                    let (resource, from) = match target {
                        Target::Cluster => ("cluster", Value::Null),
                        Target::Param(kind, param) => (kind.as_str(), json!(param)),
                        Target::Subscription => ("subscription", json!("{stream}/{sub}")),
                    };
                    json!({"operation": op.as_str(), "resource": resource, "name": from})
                }
            };
            operation["x-tidewater-permission"] = permission;
            if !matches!(route.map(|r| r.need), Some(Need::Open)) {
                let responses = operation["responses"].as_object_mut().expect("an object");
                responses.insert(
                    "401".into(),
                    json!({"$ref": "#/components/responses/Unauthenticated"}),
                );
                responses.insert(
                    "403".into(),
                    json!({"$ref": "#/components/responses/Forbidden"}),
                );
                operation["security"] = json!([{}, {"bearer": []}]);
            }
        }
    }
}

fn redrive_schemas(limits: &Limits) -> Value {
    let redrive = json!({"type": "object", "additionalProperties": false,
        "required": ["id", "queue", "moved", "remaining", "skipped", "state", "error"], "properties": {
            "id": {"type": "string"}, "queue": {"type": "string", "description": "the dead-letter queue it reads"},
            "moved": {"type": "integer", "minimum": 0}, "remaining": {"type": "integer", "minimum": 0},
            "skipped": {"type": "integer", "minimum": 0, "description": "left behind by the filter"},
            "state": {"type": "string", "enum": ["running", "done", "failed", "cancelled"]},
            "error": {"type": ["string", "null"]}}});
    json!({
        "RedriveRequest": {"type": "object", "additionalProperties": false, "properties": {
            "to": {"anyOf": [queue_name(), {"type": "null"}],
                "description": "an existing queue other than this one; default (absent or null): each message's source queue"},
            "rate_per_s": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_REDRIVE_RATE, "default": 1000},
            "max": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX, "default": 0, "description": "0 = all"},
            "filter": {"type": "object", "additionalProperties": false, "properties": {
                "key": {"type": ["string", "null"], "description": "only messages with this key"},
                "error_contains": {"type": ["string", "null"], "description": "only messages whose last error contains this text"},
                "ids": {"type": ["array", "null"], "minItems": 1, "maxItems": limits.max_receive_messages, "items": {"type": "string"},
                    "description": "only these messages, by id"}}}}},
        "Redrive": redrive,
        "RedriveList": {"type": "object", "additionalProperties": false, "required": ["redrives"], "properties": {
            "redrives": {"type": "array", "maxItems": 100, "items": schema_ref("Redrive")}}},
    })
}

pub fn document(limits: &Limits) -> Value {
    let queue_param =
        json!([{"name": "queue", "in": "path", "required": true, "schema": queue_name()}]);
    let (mut schemas, whole_config) = config_schemas(limits);
    let schemas_map = schemas.as_object_mut().expect("an object");
    for part in [
        message_schemas(limits),
        settle_schemas(limits),
        redrive_schemas(limits),
        stream_schemas(limits),
        group_schemas(limits),
        auth_schemas(),
        hook_schemas(limits),
        push_schemas(limits),
    ] {
        schemas_map.extend(part.as_object().expect("an object").clone());
    }
    for &(status, _, _) in STATUSES {
        schemas_map.insert(format!("Error{status}"), error_schema(status));
    }
    schemas_map.insert("QueueConfig".into(), whole_config);
    schemas_map.insert("QueueStats".into(), queue_stats());
    schemas_map.insert("Queue".into(), json!({"type": "object", "additionalProperties": false, "required": ["name", "config", "stats"], "properties": {
        "name": {"type": "string"}, "config": schema_ref("QueueConfig"), "stats": schema_ref("QueueStats"),
        "quota_refused": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "integer", "minimum": 0},
            "description": "publishes refused by quota per tenant (the top tenants, then \"other\"); absent when none"}}}));
    schemas_map.insert("QueueList".into(), json!({"type": "object", "additionalProperties": false, "required": ["queues"], "properties": {
        "queues": {"type": "array", "items": schema_ref("Queue")}}}));
    schemas_map.insert("PutQueueRequest".into(), json!({
        "description": "the configuration patch, or {\"config\": patch} as GET returns it",
        "anyOf": [schema_ref("QueueConfigPatch"),
            {"type": "object", "additionalProperties": false, "required": ["config"], "properties": {"config": schema_ref("QueueConfigPatch")}}]}));
    // Subscriptions: the queue patch without what acts at publish, plus `start`.
    let mut sub_patch = schemas_map["QueueConfigPatch"].clone();
    if let Some(props) = sub_patch["properties"].as_object_mut() {
        for refused in ["quota", "dedup_window_ms", "max_messages", "max_bytes"] {
            props.remove(refused);
        }
        for (name, props_of) in subscription_retention_schemas() {
            props.insert(name.into(), props_of);
        }
        props.insert("start".into(), json!({"description": "where a new subscription starts on every partition (create only: a different start on an existing subscription is 409 config_conflict)",
            "anyOf": [{"type": "null"}, {"type": "string", "enum": ["earliest", "latest"]},
                {"type": "object", "additionalProperties": false, "required": ["time"], "properties": {"time": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX, "description": "ms since the epoch: each partition's first record at or after it"}}}],
            "default": "earliest"}));
    }
    sub_patch["description"] = json!(
        "a queue configuration patch (quota, dedup_window_ms, max_messages and max_bytes act at publish and do not apply to subscriptions: 400 invalid_config), and start"
    );
    schemas_map.insert("SubscriptionPatch".into(), sub_patch);
    schemas_map.insert("PutSubscriptionRequest".into(), json!({
        "description": "the configuration patch, or {\"config\": patch} as GET returns it",
        "anyOf": [schema_ref("SubscriptionPatch"),
            {"type": "object", "additionalProperties": false, "required": ["config"], "properties": {"config": schema_ref("SubscriptionPatch")}}]}));
    let mut sub_config = schemas_map["QueueConfig"].clone();
    let not_for = tidewater_core::stream::subscription::NOT_FOR_SUBSCRIPTIONS;
    if let Some(props) = sub_config["properties"].as_object_mut() {
        for field in not_for {
            props.remove(field);
        }
        for (name, schema) in subscription_retention_schemas() {
            props.insert(name.into(), schema);
        }
    }
    if let Some(required) = sub_config["required"].as_array_mut() {
        required.retain(|f| !not_for.contains(&f.as_str().unwrap_or("")));
        required.extend([
            json!("pin_max_ms"),
            json!("pin_max_bytes"),
            json!("on_retention"),
        ]);
    }
    schemas_map.insert("SubscriptionConfig".into(), sub_config);
    schemas_map.insert("Subscription".into(), json!({"type": "object", "additionalProperties": false,
        "required": ["stream", "name", "config", "stats", "retention_expired", "partitions"], "properties": {
        "stream": {"type": "string"}, "name": {"type": "string"},
        "config": schema_ref("SubscriptionConfig"), "stats": schema_ref("QueueStats"),
        "retention_expired": {"type": "integer", "minimum": 0, "description": "messages dropped unsettled because retention deleted their records"},
        "partitions": {"type": "array", "items": {"type": "object", "additionalProperties": false, "required": ["partition", "floor", "end", "pending"], "properties": {
            "partition": {"type": "integer", "minimum": 0},
            "floor": {"type": "integer", "minimum": 0, "description": "every offset below is settled"},
            "end": {"type": "integer", "minimum": 0, "description": "the partition's durable end"},
            "pending": {"type": "integer", "minimum": 0, "description": "offsets from the floor to the end not settled yet"}}}}}}));
    schemas_map.insert("SubscriptionList".into(), json!({"type": "object", "additionalProperties": false, "required": ["subscriptions"], "properties": {
        "subscriptions": {"type": "array", "items": schema_ref("Subscription")}}}));
    schemas_map.insert("Purged".into(), json!({"type": "object", "additionalProperties": false, "required": ["purged"], "properties": {
        "purged": {"type": "integer", "minimum": 0}}}));
    let rate = json!({"type": ["number", "null"], "minimum": 0});
    let ms_or_null = json!({"type": ["integer", "null"], "minimum": 0});
    let count = json!({"type": "integer", "minimum": 0});
    schemas_map.insert("Forecast".into(), json!({"type": "object", "additionalProperties": false,
        "description": "A backlog forecast (docs/autoscaling.md says how each figure is computed)",
        "required": ["at_ms", "window_ms", "backlog", "ready", "in_flight", "delayed", "oldest_age_ms", "arrival_per_s", "service_per_s",
            "consumers", "per_consumer_per_s", "per_consumer_source", "trend", "drain_ms", "age_objective_ms", "age_objective_breach_ms",
            "drain_target_ms", "consumers_needed", "service_ceiling_per_s", "limited_by"],
        "properties": {
            "at_ms": {"type": "integer"},
            "window_ms": described(count.clone(), "the span the rates were measured over (0: none yet)"),
            "backlog": described(count.clone(), "unsettled messages (a group: its lag)"),
            "ready": count.clone(), "in_flight": count.clone(), "delayed": count.clone(), "oldest_age_ms": count.clone(),
            "arrival_per_s": described(rate.clone(), "messages arriving a second (null: no window yet)"),
            "service_per_s": described(rate.clone(), "messages leaving the backlog a second"),
            "consumers": described(count.clone(), "consumers seen within forecast.consumer_idle_ms (a group: its members)"),
            "per_consumer_per_s": rate.clone(),
            "per_consumer_source": {"type": ["string", "null"], "enum": ["busy", "idle", null],
                "description": "busy: measured while a backlog was ready for the same consumers throughout (their capacity); idle: a lower bound"},
            "trend": {"type": "string", "enum": ["empty", "draining", "growing", "stalled", "unknown"],
                "description": "stalled: a backlog, and nothing arrives or is served"},
            "drain_ms": described(ms_or_null.clone(), "time to drain at the current rates (null: growing, stalled or unknown)"),
            "age_objective_ms": count.clone(),
            "age_objective_breach_ms": described(ms_or_null.clone(), "time until the oldest message is older than the objective (0: it is; null: not heading there)"),
            "drain_target_ms": count.clone(),
            "consumers_needed": described(json!({"type": "integer", "minimum": 0}),
                "consumers to drain within drain_target_ms while keeping up with arrivals: ceil((arrival + backlog/target) / per consumer), at most ceil(service_ceiling_per_s / per consumer), and at most the consumers there are while limited_by is max_in_flight or key_concurrency; without a per-consumer rate, the consumers there are (at least 1) while there is a backlog, else 0"),
            "service_ceiling_per_s": described(rate.clone(), "the queue's dispatch rate in force: no more is served a second, whatever the consumers (null: none)"),
            "limited_by": {"type": ["string", "null"], "enum": ["dispatch_rate", "max_in_flight", "key_concurrency", null],
                "description": "a limit of the queue's own holding its service now (messages wait, and the service runs at the dispatch rate, or every lease max_in_flight allows is held, or every ready message waits for a slot of its key): more consumers would be handed nothing more"}}}));
    schemas_map.insert("Busiest".into(), json!({"type": "object", "additionalProperties": false,
        "required": ["keys", "fair_by", "flows"], "properties": {
        "keys": {"type": ["array", "null"], "description": "with key_concurrency (else null): keys by messages waiting for a slot, then by slots held",
            "items": {"type": "object", "additionalProperties": false, "required": ["key", "key_base64", "in_flight", "waiting"], "properties": {
                "key": {"type": ["string", "null"], "description": "the key as UTF-8 (null when it is not UTF-8)"},
                "key_base64": {"type": "string"},
                "in_flight": described(count.clone(), "its messages leased or awaiting a retry (at most key_concurrency)"),
                "waiting": described(count.clone(), "its messages waiting for one of its slots")}}},
        "fair_by": {"type": ["string", "null"], "description": "what fairness is by: tenant, key or header:<name> (null without fairness)"},
        "flows": {"type": ["array", "null"], "description": "with fairness (else null): values by messages waiting, of those the scheduler has looked ahead at",
            "items": {"type": "object", "additionalProperties": false, "required": ["flow", "waiting", "weight"], "properties": {
                "flow": {"type": "string"}, "waiting": count.clone(), "weight": {"type": "number", "minimum": 0}}}}}}));
    let kind = json!({"type": "string", "enum": ["queue", "subscription", "group"]});
    schemas_map.insert("ForecastReply".into(), json!({"type": "object", "additionalProperties": false, "required": ["kind", "name", "forecast"], "properties": {
        "kind": kind.clone(), "name": {"type": "string"}, "forecast": schema_ref("Forecast")}}));
    schemas_map.insert("History".into(), json!({"type": "object", "additionalProperties": false, "required": ["kind", "name", "interval_ms", "samples"], "properties": {
        "kind": kind, "name": {"type": "string"}, "interval_ms": count.clone(),
        "samples": {"type": "array", "description": "oldest first, one every interval_ms (forecast.history_ms of them at most)",
            "items": {"type": "object", "additionalProperties": false,
                "required": ["at_ms", "backlog", "ready", "in_flight", "delayed", "oldest_age_ms", "arrived", "consumers", "serving", "arrival_per_s", "service_per_s"],
                "properties": {"at_ms": {"type": "integer"}, "backlog": count.clone(), "ready": count.clone(), "in_flight": count.clone(),
                    "delayed": count.clone(), "oldest_age_ms": count.clone(),
                    "arrived": described(count.clone(), "messages arrived since the server started"),
                    "consumers": count.clone(),
                    "serving": described(count.clone(), "of the consumers, those handed messages within the rate window (a group: its members)"),
                    "dispatch_rate_per_s": described(json!({"type": "number", "minimum": 0}), "the queue's dispatch rate in force (absent: none)"),
                    "max_in_flight": described(count.clone(), "the queue's max_in_flight (absent for a group)"),
                    "key_waiting": described(count, "with key_concurrency: of the ready messages, those waiting for a slot of their key"),
                    "arrival_per_s": described(rate.clone(), "since the sample before (null for the first)"),
                    "service_per_s": rate}}}}}));
    schemas_map.insert("Status".into(), json!({"type": "object", "additionalProperties": false, "required": ["status"], "properties": {
        "status": {"type": "string", "enum": ["alive", "ready"]}}}));

    let mut components_responses = Map::new();
    for &(status, name, description) in STATUSES {
        components_responses.insert(name.into(), error_response(status, description));
    }

    // Links: what stateful clients (and schemathesis) can do next with a reply's values.
    let on_queue = json!({
        "GetQueue": link("getQueue", "the queue just created or updated"),
        "DeleteQueue": link("deleteQueue", "delete it"),
        "PurgeQueue": link("purgeQueue", "remove its messages"),
        "Publish": link("publish", "publish to it"),
        "Peek": link("peek", "look at its messages"),
        "Receive": link("receive", "lease its messages"),
        "Redrive": link("redrive", "redrive it (as a dead-letter queue)"),
    });
    let on_published = json!({
        "Receive": link("receive", "lease what was published"),
        "Peek": link("peek", "look at what was published"),
        "GetQueue": link("getQueue", "its stats"),
    });
    let receipt = "$response.body#/messages/0/receipt";
    let on_received = json!({
        "Ack": link_with_body("ack", "acknowledge the first message received", json!({"receipts": [receipt]})),
        "Nack": link_with_body("nack", "give the first message received back", json!({"receipts": [receipt]})),
        "Extend": link_with_body("extend", "extend the first message's lease", json!({"receipts": [receipt]})),
        "GetQueue": link("getQueue", "its stats"),
    });
    let on_redrive = json!({
        "GetRedrive": {"operationId": "getRedrive", "parameters": {"id": "$response.body#/id"}, "description": "its progress"},
        "CancelRedrive": {"operationId": "cancelRedrive", "parameters": {"id": "$response.body#/id"}, "description": "cancel it"},
    });

    let body = Fails {
        body: true,
        ..Fails::default()
    };
    let queue_missing = Fails {
        bad: true,
        not_found: true,
        ..Fails::default()
    };
    let put_queue = with_body(
        operation(
            "putQueue",
            "Create a queue (201) or update its configuration (200); an update that changes nothing writes nothing",
            responses(&[
                (201, ok_json("created", "Queue")),
                (200, ok_json("updated", "Queue")),
            ]),
            Fails {
                conflict: true,
                writes: true,
                ..body
            },
        ),
        "PutQueueRequest",
        false,
        "no body is {}: a new queue with the defaults, or no change",
    );
    let publish = with_body(
        operation(
            "publish",
            "Publish a batch, whole or not at all; replies after fsync (ack durable) or write(2) (ack written)",
            responses(&[(
                200,
                ok_json("published (or recognised as duplicates)", "PublishReply"),
            )]),
            Fails {
                not_found: true,
                too_large: true,
                writes: true,
                refused: true,
                ..body
            },
        ),
        "PublishRequest",
        true,
        "",
    );
    let receive = with_body(
        operation(
            "receive",
            "Lease up to max messages, waiting up to wait_ms for the first",
            responses(&[(
                200,
                ok_json(
                    "the messages leased (none when none was ready in time)",
                    "Messages",
                ),
            )]),
            Fails {
                not_found: true,
                server: true,
                ..body
            },
        ),
        "ReceiveRequest",
        false,
        "no body is {}",
    );
    let settle = |id: &str, summary: &str, schema: &str, writes: bool| {
        with_body(
            operation(
                id,
                summary,
                responses(&[(
                    200,
                    ok_json(
                        "how many succeeded, and each receipt that failed",
                        "SettleReply",
                    ),
                )]),
                Fails {
                    not_found: true,
                    too_large: true,
                    writes,
                    ..body
                },
            ),
            schema,
            true,
            "",
        )
    };
    let redrive = with_body(
        operation(
            "redrive",
            "Move dead-lettered messages back at a bounded rate (only those held at the start; never into the source itself; 409 against a redrive running the other way)",
            responses(&[(202, ok_json("started", "Redrive"))]),
            Fails {
                not_found: true,
                conflict: true,
                refused: true,
                ..body
            },
        ),
        "RedriveRequest",
        false,
        "no body is {}",
    );
    let id_param =
        json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let max_receive = limits.max_receive_messages;
    let peek = {
        let mut op = operation(
            "peek",
            "Unleased messages from offset `from` on, without leasing them",
            responses(&[(200, ok_json("messages", "Peeked"))]),
            Fails {
                server: true,
                ..queue_missing
            },
        );
        op["parameters"] = json!([
            {"name": "max", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": max_receive, "default": max_receive.min(10)}},
            {"name": "from", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "default": 0}},
            {"name": "encoding", "in": "query", "schema": {"type": "string", "enum": ["auto", "base64"], "default": "auto"},
                "description": "base64: body_base64 for every message (see PeekedMessage)"}]);
        op
    };

    let busiest_op = {
        let mut op = operation(
            "queueBusiest",
            "Where the queue's messages wait: its keys with the most messages waiting for a slot (with key_concurrency) and its fair-scheduling values with the most waiting (with fairness)",
            responses(&[(200, ok_json("the busiest keys and values", "Busiest"))]),
            Fails {
                bad: true,
                server: true,
                ..queue_missing
            },
        );
        op["parameters"] = json!([
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": tidewater_core::broker::MAX_BUSIEST, "default": 20},
                "description": "at most this many keys, and this many values"}]);
        op
    };

    let forecast_op = |id: &str, summary: &str, fails: Fails| {
        let mut op = operation(
            id,
            summary,
            responses(&[(200, ok_json("the forecast", "ForecastReply"))]),
            Fails { bad: true, ..fails },
        );
        let ms = json!({"type": "integer", "minimum": 1, "maximum": 604_800_000u64});
        op["parameters"] = json!([
            {"name": "rate_window_ms", "in": "query", "schema": ms, "description": "measure the rates over this window (default: forecast.rate_window_ms)"},
            {"name": "age_objective_ms", "in": "query", "schema": ms, "description": "default: forecast.age_objective_ms"},
            {"name": "drain_target_ms", "in": "query", "schema": ms, "description": "consumers_needed drains within this (default: forecast.drain_target_ms)"}]);
        op
    };
    let history_op = |id: &str, summary: &str, fails: Fails| {
        operation(
            id,
            summary,
            responses(&[(200, ok_json("the samples", "History"))]),
            fails,
        )
    };
    let stream_param =
        json!([{"name": "stream", "in": "path", "required": true, "schema": queue_name()}]);
    let partition_params = json!([
        {"name": "stream", "in": "path", "required": true, "schema": queue_name()},
        {"name": "partition", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
            "description": "0 to the stream's partitions - 1 (404 partition_not_found past them)"}]);
    let stream_link = |target: &str, description: &str| json!({"operationId": target, "description": description, "parameters": {"stream": "$request.path.stream"}});
    let on_stream = json!({
        "GetStream": stream_link("getStream", "the stream just created or changed"),
        "DeleteStream": stream_link("deleteStream", "delete it"),
        "Produce": stream_link("produce", "produce to it"),
        "Fetch": {"operationId": "fetch", "description": "fetch its first partition",
            "parameters": {"stream": "$request.path.stream", "partition": "$response.body#/partitions/0/partition"}},
    });
    let on_produced = json!({
        "Fetch": {"operationId": "fetch", "description": "fetch the first record produced",
            "parameters": {"stream": "$request.path.stream", "partition": "$response.body#/offsets/0/partition",
                "offset": "$response.body#/offsets/0/offset"}},
        "GetStream": stream_link("getStream", "its partitions' ends"),
    });
    let put_stream = with_body(
        operation(
            "putStream",
            "Create a stream (201) or change its configuration (200): partitions can grow, never shrink; every partition is created or changed in one write",
            responses(&[
                (201, ok_json("created", "Stream")),
                (200, ok_json("changed (or unchanged)", "Stream")),
            ]),
            Fails {
                bad: true,
                conflict: true,
                writes: true,
                ..body
            },
        ),
        "PutStreamRequest",
        false,
        "no body is {}: a new stream of one partition, or no change",
    );
    let produce = with_body(
        operation(
            "produce",
            "Append records to a stream, each to its partition (given, else by key with Kafka's partitioner, else one partition per produce); whole or not at all",
            responses(&[(
                200,
                ok_json("each record's partition and offset", "ProduceReply"),
            )]),
            Fails {
                bad: true,
                not_found: true,
                too_large: true,
                writes: true,
                ..body
            },
        ),
        "ProduceRequest",
        true,
        "",
    );
    let max_wait = limits.max_wait_ms;
    let fetch = {
        let mut op = operation(
            "fetch",
            "Records of a partition from offset on (whole stored batches: about max_bytes of them, at least one), waiting up to wait_ms when there are none yet",
            responses(&[(200, ok_json("the records", "Records"))]),
            Fails {
                bad: true,
                not_found: true,
                server: true,
                ..Fails::default()
            },
        );
        op["parameters"] = json!([
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "default": 0},
                "description": "400 offset_out_of_range past the partition's end"},
            {"name": "max_bytes", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "default": crate::http::FETCH_BYTES_DEFAULT.min(limits.max_fetch_bytes)},
                "description": format!("about this many bytes of records (at most max_fetch_bytes, {})", limits.max_fetch_bytes)},
            {"name": "wait_ms", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": max_wait, "default": 0}},
            {"name": "encoding", "in": "query", "schema": {"type": "string", "enum": ["auto", "base64"], "default": "auto"},
                "description": "base64: key_base64 and value_base64 for every record"}]);
        op
    };
    let offset_for_time = {
        let mut op = operation(
            "offsetForTime",
            "The first offset of a partition whose record's timestamp is at least time (null when every record is older)",
            responses(&[(200, ok_json("the offset", "OffsetForTime"))]),
            Fails {
                bad: true,
                not_found: true,
                server: true,
                ..Fails::default()
            },
        );
        op["parameters"] = json!([
            {"name": "time", "in": "query", "required": true, "schema": {"type": "integer", "minimum": -2, "maximum": i64::MAX},
                "description": "ms since the epoch; -1: the partition's end offset, -2: its start offset (Kafka's ListOffsets)"}]);
        op
    };

    let sub_params = json!([
        {"name": "stream", "in": "path", "required": true, "schema": queue_name()},
        {"name": "sub", "in": "path", "required": true, "schema": queue_name(),
            "description": "the subscription's name; with its stream's at most 254 bytes (consumers name it stream/sub)"}]);
    let sub_link = |target: &str, description: &str| {
        json!({"operationId": target, "description": description,
        "parameters": {"stream": "$request.path.stream", "sub": "$request.path.sub"}})
    };
    let on_subscription = json!({
        "GetSubscription": sub_link("getSubscription", "the subscription just created or changed"),
        "DeleteSubscription": sub_link("deleteSubscription", "delete it"),
        "SubscriptionReceive": sub_link("subscriptionReceive", "lease its messages"),
    });
    let on_sub_received = json!({
        "SubscriptionAck": {"operationId": "subscriptionAck", "description": "acknowledge the first message received",
            "parameters": {"stream": "$request.path.stream", "sub": "$request.path.sub"}, "requestBody": {"receipts": [receipt]}},
        "SubscriptionNack": {"operationId": "subscriptionNack", "description": "give the first message received back",
            "parameters": {"stream": "$request.path.stream", "sub": "$request.path.sub"}, "requestBody": {"receipts": [receipt]}},
    });
    let sub_missing = Fails {
        bad: true,
        not_found: true,
        ..Fails::default()
    };
    let put_subscription = with_body(
        operation(
            "putSubscription",
            "Create a work-queue subscription on a stream (201: its own log and a view of every partition, in one write) or change its configuration (200); it delivers every record of the stream from its start as a queue does, independently of other subscriptions and of consumer groups",
            responses(&[
                (201, ok_json("created", "Subscription")),
                (200, ok_json("changed (or unchanged)", "Subscription")),
            ]),
            Fails {
                bad: true,
                not_found: true,
                conflict: true,
                writes: true,
                ..body
            },
        ),
        "PutSubscriptionRequest",
        false,
        "no body is {}: a new subscription at earliest with the defaults, or no change",
    );
    let sub_receive = {
        let mut op = receive.clone();
        op["operationId"] = json!("subscriptionReceive");
        op["summary"] = json!(
            "Lease up to max of the subscription's messages (each names its partition and offset), waiting up to wait_ms for the first"
        );
        op
    };
    let sub_settle = |id: &str, summary: &str, schema: &str, writes: bool| {
        let mut op = settle(id, summary, schema, writes);
        op["operationId"] = json!(id);
        op
    };

    let group_param =
        json!([{"name": "group", "in": "path", "required": true, "schema": queue_name()}]);
    let member_params = json!([
        {"name": "group", "in": "path", "required": true, "schema": queue_name()},
        {"name": "member", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let member_link = |target: &str, description: &str| {
        json!({"operationId": target, "description": description,
            "parameters": {"group": "$request.path.group", "member": "$response.body#/member"}})
    };
    let on_consumer = json!({
        "ConsumerFetch": member_link("consumerFetch", "fetch as this member"),
        "ConsumerCommit": member_link("consumerCommit", "commit its positions"),
        "DeleteConsumer": member_link("deleteConsumer", "leave the group"),
        "DescribeGroup": {"operationId": "describeGroup", "description": "the group", "parameters": {"group": "$request.path.group"}},
    });
    let create_consumer = with_body(
        operation(
            "createConsumer",
            "Join a consumer group as a member the broker runs: fetch and commit with the member id; partitions are assigned by the broker (balanced, sticky) and the member is removed after session_timeout_ms without a fetch",
            responses(&[(201, ok_json("the member", "Consumer"))]),
            Fails {
                bad: true,
                not_found: true,
                ..body
            },
        ),
        "ConsumerRequest",
        true,
        "",
    );
    let consumer_fetch = {
        let mut op = operation(
            "consumerFetch",
            "Records of the member's partitions from its positions (about max_bytes, waiting up to wait_ms for a first record); positions move past what is returned, commit them with consumerCommit; each fetch is a heartbeat",
            responses(&[(200, ok_json("the records", "MemberRecords"))]),
            Fails {
                bad: true,
                not_found: true,
                writes: true,
                ..Fails::default()
            },
        );
        op["parameters"] = json!([
            {"name": "max_bytes", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX, "default": crate::http::FETCH_BYTES_DEFAULT.min(limits.max_fetch_bytes)}},
            {"name": "max_records", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": u64::MAX},
                "description": "at most this many records (default: no limit but max_bytes); positions move past the last one returned"},
            {"name": "wait_ms", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": max_wait, "default": 0}},
            {"name": "encoding", "in": "query", "schema": {"type": "string", "enum": ["auto", "base64"], "default": "auto"}}]);
        op
    };
    let consumer_commit = with_body(
        operation(
            "consumerCommit",
            "Commit the member's positions (or the offsets given), durably",
            responses(&[(200, ok_json("committed", "Empty"))]),
            Fails {
                bad: true,
                not_found: true,
                writes: true,
                ..body
            },
        ),
        "CommitRequest",
        false,
        "no body is {}: the member's positions",
    );

    let reset_offsets = with_body(
        operation(
            "resetOffsets",
            "Move a group's committed offsets (as kafka-consumer-groups --reset-offsets): to each partition's start or end, a time, a shift, or an offset; with dry_run, only the plan. 409 group_not_empty while the group has members; the new offsets are committed in one write, all or none",
            responses(&[(
                200,
                ok_json("the plan, committed unless dry_run", "OffsetResetReply"),
            )]),
            Fails {
                bad: true,
                not_found: true,
                conflict: true,
                writes: true,
                ..body
            },
        ),
        "ResetOffsetsRequest",
        true,
        "",
    );

    let delete_consumer = {
        let mut op = operation(
            "deleteConsumer",
            "Leave the group, committing the member's positions first (unless commit=false)",
            responses(&[(204, json!({"description": "left"}))]),
            Fails {
                not_found: true,
                bad: true,
                writes: true,
                ..Fails::default()
            },
        );
        op["parameters"] = json!([{"name": "commit", "in": "query", "schema": {"type": "boolean", "default": true},
            "description": "false: leave without committing (a client that could not hand its last records on)"}]);
        op
    };

    let subscription_paths = json!({
            "/v1/subscriptions": {"get": operation("listAllSubscriptions", "Every stream's subscriptions (by stream, then name)", responses(&[(200, ok_json("the subscriptions", "SubscriptionList"))]), Fails::default())},
            "/v1/streams/{stream}/subscriptions": {"parameters": stream_param,
                "get": operation("listSubscriptions", "A stream's subscriptions (by name)", responses(&[(200, ok_json("the subscriptions", "SubscriptionList"))]), queue_missing)},
            "/v1/streams/{stream}/subscriptions/{sub}": {"parameters": sub_params,
                "put": with_links(put_subscription, &[200, 201], &on_subscription),
                "get": operation("getSubscription", "A subscription: its configuration, stats and place in each partition", responses(&[(200, ok_json("the subscription", "Subscription"))]), sub_missing),
                "delete": operation("deleteSubscription", "Delete a subscription (the stream and its other readers are untouched; leased messages' receipts go invalid)", responses(&[(204, json!({"description": "deleted"}))]), Fails {writes: true, ..sub_missing})},
            "/v1/streams/{stream}/subscriptions/{sub}/receive": {"parameters": sub_params, "post": with_links(sub_receive, &[200], &on_sub_received)},
            "/v1/streams/{stream}/subscriptions/{sub}/ack": {"parameters": sub_params, "post": sub_settle("subscriptionAck", "Acknowledge by receipt: settled for good in this subscription", "AckRequest", true)},
            "/v1/streams/{stream}/subscriptions/{sub}/nack": {"parameters": sub_params, "post": sub_settle("subscriptionNack", "Give back by receipt: delivered again after delay_ms or the backoff, or dead-lettered after max_deliveries", "NackRequest", false)},
            "/v1/streams/{stream}/subscriptions/{sub}/extend": {"parameters": sub_params, "post": sub_settle("subscriptionExtend", "Extend leases to lease_ms from now", "ExtendRequest", false)},
            "/v1/streams/{stream}/subscriptions/{sub}/purge": {"parameters": sub_params,
                "post": operation("purgeSubscription", "Settle everything the subscription has not (leased messages too: their receipts go stale); the stream keeps its records", responses(&[(200, ok_json("how many were settled", "Purged"))]), Fails {writes: true, ..sub_missing})},
    });

    let mut document = json!({
        "openapi": "3.1.0",
        "info": {"title": "tidewater", "version": "1",
            "description": "Durable work queues and streams. Every error is {code, message} (and retry_after_ms with 429 and 507); codes are listed in docs/errors.md. Ranges that depend on the server's limits are this server's. A request body is at most max_request_bytes."},
        "paths": {
            "/v1/queues": {"get": operation("listQueues", "List queues (by name)", responses(&[(200, ok_json("the queues", "QueueList"))]), Fails::default())},
            "/v1/queues/{queue}": {
                "parameters": queue_param,
                "put": with_links(put_queue, &[200, 201], &on_queue),
                "get": operation("getQueue", "A queue with its configuration and stats", responses(&[(200, ok_json("the queue", "Queue"))]), queue_missing),
                "delete": operation("deleteQueue", "Delete a queue and its messages", responses(&[(204, json!({"description": "deleted"}))]), Fails {writes: true, ..queue_missing}),
            },
            "/v1/queues/{queue}/purge": {"parameters": queue_param,
                "post": operation("purgeQueue", "Remove every message (leased ones too: their receipts go stale)", responses(&[(200, ok_json("how many were removed", "Purged"))]), Fails {writes: true, ..queue_missing})},
            "/v1/queues/{queue}/messages": {"parameters": queue_param,
                "post": with_links(publish, &[200], &on_published),
                "get": peek},
            "/v1/queues/{queue}/receive": {"parameters": queue_param, "post": with_links(receive, &[200], &on_received)},
            "/v1/queues/{queue}/ack": {"parameters": queue_param, "post": settle("ack", "Acknowledge by receipt: settled for good", "AckRequest", true)},
            "/v1/queues/{queue}/nack": {"parameters": queue_param, "post": settle("nack", "Give back by receipt: delivered again after delay_ms or the backoff, or dead-lettered after max_deliveries", "NackRequest", false)},
            "/v1/queues/{queue}/extend": {"parameters": queue_param, "post": settle("extend", "Extend leases to lease_ms from now", "ExtendRequest", false)},
            "/v1/queues/{queue}/redrive": {"parameters": queue_param, "post": with_links(redrive, &[202], &on_redrive)},
            "/v1/redrives": {"get": operation("listRedrives", "Redrives kept (the last 100), oldest first", responses(&[(200, ok_json("the redrives", "RedriveList"))]), Fails::default())},
            "/v1/redrives/{id}": {"parameters": id_param,
                "get": operation("getRedrive", "A redrive's progress", responses(&[(200, ok_json("its progress", "Redrive"))]), queue_missing),
                "delete": operation("cancelRedrive", "Cancel a redrive after its current step (what it moved stays moved; cancelling a finished one changes nothing)", responses(&[(200, ok_json("its progress", "Redrive"))]), queue_missing)},
            "/v1/streams": {"get": operation("listStreams", "List streams (by name)", responses(&[(200, ok_json("the streams", "StreamList"))]), Fails::default())},
            "/v1/streams/{stream}": {
                "parameters": stream_param,
                "put": with_links(put_stream, &[200, 201], &on_stream),
                "get": operation("getStream", "A stream: its configuration and each partition's range and size", responses(&[(200, ok_json("the stream", "Stream"))]), queue_missing),
                "delete": operation("deleteStream", "Delete a stream and its records", responses(&[(204, json!({"description": "deleted"}))]), Fails {writes: true, ..queue_missing}),
            },
            "/v1/streams/{stream}/records": {"parameters": stream_param, "post": with_links(produce, &[200], &on_produced)},
            "/v1/streams/{stream}/partitions/{partition}/records": {"parameters": partition_params, "get": fetch},
            "/v1/streams/{stream}/partitions/{partition}/offsets": {"parameters": partition_params, "get": offset_for_time},
            "/v1/groups": {"get": operation("listGroups", "Consumer groups with members or committed offsets", responses(&[(200, ok_json("the groups", "GroupList"))]), Fails::default())},
            "/v1/groups/{group}": {"parameters": group_param,
                "get": operation("describeGroup", "A group's members and what they are assigned, and each committed partition's lag (records and age)", responses(&[(200, ok_json("the group", "Group"))]), Fails {not_found: true, ..Fails::default()}),
                "delete": operation("deleteGroup", "Delete a group: its committed offsets are removed (409 group_not_empty while it has members)", responses(&[(204, json!({"description": "deleted"}))]), Fails {bad: true, not_found: true, conflict: true, writes: true, ..Fails::default()})},
            "/v1/groups/{group}/offsets/reset": {"parameters": group_param, "post": reset_offsets},
            "/v1/groups/{group}/consumers": {"parameters": group_param, "post": with_links(create_consumer, &[201], &on_consumer)},
            "/v1/groups/{group}/consumers/{member}": {"parameters": member_params,
                "delete": delete_consumer},
            "/v1/groups/{group}/consumers/{member}/records": {"parameters": member_params, "get": consumer_fetch},
            "/v1/groups/{group}/consumers/{member}/commit": {"parameters": member_params, "post": consumer_commit},
            "/healthz": {"get": operation("healthz", "The process is alive", responses(&[(200, ok_json("alive", "Status"))]), Fails::default())},
            "/readyz": {"get": operation("readyz", "Recovered, serving, and the store takes writes", responses(&[(200, ok_json("ready", "Status"))]), Fails {server: true, ..Fails::default()})},
            "/metrics": {"get": operation("metrics", "Prometheus metrics (OpenMetrics text)", responses(&[(200, json!({"description": "metrics",
                "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}))]), Fails::default())},
            "/v1/openapi.json": {"get": operation("openapi", "This document", responses(&[(200, json!({"description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}}}))]), Fails::default())},
        },
        "components": {"schemas": schemas, "responses": components_responses}
    });
    let console_paths = json!({
        "/": {"get": operation("console", "The web console's page (text/html; [console] enabled; 404 when off)",
            responses(&[(200, json!({"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}))]),
            Fails {not_found: true, ..Fails::default()})},
        "/console/{file}": {
            "parameters": [{"name": "file", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1}}],
            "get": operation("consoleFile", "The console's script (app.js) and style sheet (app.css); 404 for any other name",
                responses(&[(200, json!({"description": "the file", "content": {"text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}}}}))]),
                Fails {not_found: true, ..Fails::default()})},
    });
    let forecast_paths = json!({
            "/v1/queues/{queue}/forecast": {"parameters": queue_param,
                "get": forecast_op("queueForecast", "The queue's backlog forecast", queue_missing)},
            "/v1/queues/{queue}/history": {"parameters": queue_param,
                "get": history_op("queueHistory", "The queue's samples over the last forecast.history_ms (the console's charts)", queue_missing)},
            "/v1/queues/{queue}/busiest": {"parameters": queue_param, "get": busiest_op},
            "/v1/streams/{stream}/subscriptions/{sub}/forecast": {"parameters": sub_params,
                "get": forecast_op("subscriptionForecast", "The subscription's backlog forecast", sub_missing)},
            "/v1/streams/{stream}/subscriptions/{sub}/history": {"parameters": sub_params,
                "get": history_op("subscriptionHistory", "The subscription's samples over the last forecast.history_ms", sub_missing)},
            "/v1/groups/{group}/forecast": {"parameters": group_param,
                "get": forecast_op("groupForecast", "The group's lag forecast over its committed partitions (its consumers are its members)", Fails {not_found: true, ..Fails::default()})},
            "/v1/groups/{group}/history": {"parameters": group_param,
                "get": history_op("groupHistory", "The group's samples over the last forecast.history_ms", Fails {not_found: true, ..Fails::default()})}
    });
    let paths = document["paths"].as_object_mut().expect("an object");
    for (path, item) in subscription_paths.as_object().expect("an object") {
        paths.insert(path.clone(), item.clone());
    }
    for (path, item) in console_paths.as_object().expect("an object") {
        paths.insert(path.clone(), item.clone());
    }
    for (path, item) in forecast_paths.as_object().expect("an object") {
        paths.insert(path.clone(), item.clone());
    }
    let id_param = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1}}]);
    let admin = Fails {
        body: true,
        bad: true,
        conflict: true,
        writes: true,
        ..Fails::default()
    };
    let auth_paths = json!({
        "/v1/auth/whoami": {"get": operation("whoami", "Who the credentials are, and their grants (authentication: false when it is off)",
            responses(&[(200, ok_json("the caller", "Whoami"))]), Fails::default())},
        "/v1/auth/keys": {
            "get": operation("listKeys", "The API keys in force (never their secrets)", responses(&[(200, ok_json("the keys", "KeyList"))]), Fails::default()),
            "post": with_body(operation("createKey", "Make an API key: the secret is in this reply only", responses(&[(201, ok_json("the key, its secret and token", "KeyCreated"))]), admin), "KeyRequest", true, "the key to make")},
        "/v1/auth/keys/{id}": {"parameters": id_param.clone(),
            "delete": operation("revokeKey", "Revoke a key: refused from its next request on", responses(&[(200, ok_json("the key revoked", "KeyRevoked"))]), Fails { not_found: true, writes: true, ..Fails::default() })},
        "/v1/auth/acls": {
            "get": operation("listAcls", "The grants in force", responses(&[(200, ok_json("the grants", "AclList"))]), Fails::default()),
            "post": with_body(operation("grant", "Grant a principal or a role operations on resources (the same grant twice is one)", responses(&[(201, ok_json("the grant", "AclCreated"))]), admin), "AclRequest", true, "the grant to make")},
        "/v1/auth/acls/{id}": {"parameters": id_param,
            "delete": operation("revokeAcl", "Revoke a grant", responses(&[(200, ok_json("the grant revoked", "AclRevoked"))]), Fails { not_found: true, writes: true, ..Fails::default() })},
    });
    for (path, item) in auth_paths.as_object().expect("an object") {
        paths.insert(path.clone(), item.clone());
    }
    let hook_param =
        json!([{"name": "hook", "in": "path", "required": true, "schema": queue_name()}]);
    let hook_missing = Fails {
        bad: true,
        not_found: true,
        ..Fails::default()
    };
    let mut ingest = operation(
        "ingestWebhook",
        "A sender's webhook: checked against the hook's signature, stored byte for byte with its headers, answered 200 once durable (a replayed delivery id: 200, duplicate). Nothing is stored unless the answer is 200.",
        responses(&[(200, ok_json("stored, or already stored", "Ingested"))]),
        Fails {
            body: true,
            too_large: true,
            writes: true,
            refused: true,
            ..hook_missing
        },
    );
    ingest["requestBody"] = json!({"required": false, "description": "the event, as the sender signs it (any content type)",
        "content": {"*/*": {"schema": {}}}});
    let hook_paths = json!({
        "/v1/hooks": {"get": operation("listHooks", "Webhook hooks (by name), with their counters; never their secrets", responses(&[(200, ok_json("the hooks", "HookList"))]), Fails::default())},
        "/v1/hooks/{hook}": {"parameters": hook_param,
            "get": operation("getHook", "A hook: its configuration (secrets as fingerprints) and counters", responses(&[(200, ok_json("the hook", "Hook"))]), hook_missing),
            "put": with_body(operation("putHook", "Create a hook (201) or change it (200); its target must exist", responses(&[(201, ok_json("created", "Hook")), (200, ok_json("updated", "Hook"))]), Fails { not_found: true, ..admin }), "HookPut", false, "the hook's configuration"),
            "delete": operation("deleteHook", "Delete a hook (its events already stored stay)", responses(&[(204, json!({"description": "deleted"}))]), Fails { writes: true, ..hook_missing }),
            "post": ingest},
    });
    for (path, item) in hook_paths.as_object().expect("an object") {
        paths.insert(path.clone(), item.clone());
    }
    let push_param =
        json!([{"name": "push", "in": "path", "required": true, "schema": queue_name()}]);
    let push_missing = Fails {
        bad: true,
        not_found: true,
        ..Fails::default()
    };
    let push_paths = json!({
        "/v1/pushes": {"get": operation("listPushes", "Push endpoints (by name): breaker state and counters; never their secrets", responses(&[(200, ok_json("the endpoints", "PushList"))]), Fails::default())},
        "/v1/pushes/{push}": {"parameters": push_param,
            "get": operation("getPush", "A push endpoint: configuration (secret as a fingerprint), breaker, counters", responses(&[(200, ok_json("the endpoint", "Push"))]), push_missing),
            "put": with_body(operation("putPush", "Create a push endpoint (201, with its signing secret, shown this once) or change it (200); its source must exist", responses(&[(201, ok_json("created", "Push")), (200, ok_json("updated", "Push"))]), Fails { not_found: true, ..admin }), "PushPut", false, "the endpoint's configuration"),
            "delete": operation("deletePush", "Delete a push endpoint: its worker stops; messages it held go back to the source", responses(&[(204, json!({"description": "deleted"}))]), Fails { writes: true, ..push_missing })},
    });
    for (path, item) in push_paths.as_object().expect("an object") {
        paths.insert(path.clone(), item.clone());
    }
    document["components"]["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer",
        "description": "an API key's token, <key id>.<secret>; only when [auth] enabled = true (docs/security.md)"}});
    add_permissions(&mut document);
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    out.push(target.clone());
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_and_every_operation_has_an_id() {
        let doc = document(&Limits::default());
        let mut targets = Vec::new();
        refs(&doc, &mut targets);
        assert!(!targets.is_empty());
        for target in targets {
            let pointer = target.strip_prefix('#').expect("local reference");
            assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
        }
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path}"));
                assert!(ids.insert(id.to_string()), "{id} twice");
            }
        }
        // Links name operations that exist.
        let mut links = Vec::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for response in op["responses"]
                    .as_object()
                    .into_iter()
                    .flat_map(|r| r.values())
                {
                    for link in response["links"]
                        .as_object()
                        .into_iter()
                        .flat_map(|l| l.values())
                    {
                        links.push(link["operationId"].as_str().unwrap().to_string());
                    }
                }
            }
        }
        assert!(links.len() >= 10);
        for target in links {
            assert!(ids.contains(&target), "a link to {target}");
        }
    }

    #[test]
    fn ranges_follow_the_limits() {
        let limits = Limits {
            max_batch_messages: 7,
            max_receive_messages: 9,
            max_wait_ms: 250,
            ..Limits::default()
        };
        let doc = document(&limits);
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["PublishRequest"]["properties"]["messages"]["maxItems"],
            7
        );
        assert_eq!(schemas["ReceiveRequest"]["properties"]["max"]["maximum"], 9);
        assert_eq!(
            schemas["ReceiveRequest"]["properties"]["wait_ms"]["maximum"],
            250
        );
        assert_eq!(
            schemas["AckRequest"]["properties"]["receipts"]["maxItems"],
            9
        );
    }

    /// Every operation of the document has a permission in `auth::ROUTES`, and every
    /// route there is an operation of the document: the auth test walks the document.
    #[test]
    fn every_operation_has_a_permission_and_every_permission_an_operation() {
        let doc = document(&Limits::default());
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if method == "parameters" {
                    continue;
                }
                let method = method.to_uppercase();
                assert!(
                    crate::auth::route_of(&method, path).is_some(),
                    "{method} {path} has no entry in auth::ROUTES"
                );
                documented.insert((method, path.clone()));
            }
        }
        for route in crate::auth::ROUTES {
            assert!(
                documented.contains(&(route.method.to_string(), route.path.to_string())),
                "{} {} is in auth::ROUTES but not in the document",
                route.method,
                route.path
            );
        }
    }

    #[test]
    fn error_codes_by_status_cover_every_http_code() {
        let mut seen = std::collections::HashSet::new();
        for &(status, _, _) in STATUSES {
            seen.extend(error_codes(status));
        }
        for code in Code::ALL {
            if http_error_code(*code) && code.http_status() != 405 {
                assert!(seen.contains(code.as_str()), "{code} is in no status");
            }
        }
    }
}
