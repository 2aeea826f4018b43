//! The OpenAPI 3.1 description served at /v1/openapi.json.

use serde_json::{Value, json};
use tidewater_core::ErrorCode;

fn error_responses(codes: &[u16]) -> Value {
    let mut out = serde_json::Map::new();
    for code in codes {
        out.insert(code.to_string(), json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}));
    }
    Value::Object(out)
}

fn op(summary: &str, body: Option<&str>, ok: (u16, &str), errors: &[u16]) -> Value {
    let mut responses = error_responses(errors);
    responses[ok.0.to_string()] = json!({"description": "success", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", ok.1)}}}});
    let mut operation = json!({"summary": summary, "responses": responses});
    if let Some(body) = body {
        operation["requestBody"] = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body}")}}}});
    }
    operation
}

pub fn document() -> Value {
    let queue_param = json!([{"name": "queue", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,200}$"}}]);
    let codes: Vec<Value> = ErrorCode::ALL.iter().map(|c| json!(c.as_str())).collect();
    // Apart: one json! literal of the whole document exceeds the macro recursion limit.
    let queue_stats = json!({"type": "object", "properties": {
                "depth": {"type": "integer"}, "in_flight": {"type": "integer"}, "delayed": {"type": "integer"}, "total": {"type": "integer"},
                "bytes": {"type": "integer"}, "oldest_age_ms": {"type": "integer"}, "published": {"type": "integer"}, "delivered": {"type": "integer"},
                "acked": {"type": "integer"}, "nacked": {"type": "integer"}, "expired": {"type": "integer"}, "dead_lettered": {"type": "integer"},
                "redriven": {"type": "integer"}, "purged": {"type": "integer"}, "ttl_expired": {"type": "integer"}, "deduplicated": {"type": "integer"}, "parked": {"type": "integer", "description": "of delayed: long delays waiting in the delay log"}, "superseded": {"type": "integer"}, "dedup_ids": {"type": "integer", "description": "client ids remembered for deduplication"}, "coalesced_in": {"type": "integer"}, "coalesced_out": {"type": "integer"}, "coalesce_windows": {"type": "integer"},
                "keys_in_flight": {"type": "integer"}, "keys_blocked": {"type": "integer"},
                "waiting_by_priority": {"type": "array", "items": {"type": "integer"}, "description": "highest level first"}, "fair_flows": {"type": "integer"},
                "throttle_cuts": {"type": "integer"}, "throttle_raises": {"type": "integer"},
                "dispatch_rate_per_s": {"type": "number", "description": "the rate limit in force; absent when unlimited"}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tidewater", "version": "1", "description": "Durable work queues. Errors are {code, message}; codes are listed in docs/errors.md."},
        "paths": {
            "/v1/queues": {"get": op("List queues", None, (200, "QueueList"), &[503])},
            "/v1/queues/{queue}": {
                "parameters": queue_param,
                "put": op("Create a queue or update its configuration (201 created, 200 updated)", Some("QueueConfig"), (200, "Queue"), &[400, 409, 503]),
                "get": op("Get a queue with its stats", None, (200, "Queue"), &[404]),
                "delete": {"summary": "Delete a queue and its messages", "responses": {"204": {"description": "deleted"}, "404": {"description": "unknown queue"}}}
            },
            "/v1/queues/{queue}/purge": {"parameters": queue_param, "post": op("Remove every message", None, (200, "Purged"), &[404])},
            "/v1/queues/{queue}/messages": {
                "parameters": queue_param,
                "post": op("Publish a batch, whole or not at all", Some("PublishRequest"), (200, "PublishReply"), &[400, 404, 413, 429, 507]),
                "get": {"summary": "Peek at unleased messages without leasing them", "parameters": [
                    {"name": "max", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "from", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "encoding", "in": "query", "schema": {"type": "string", "enum": ["auto", "base64"], "default": "auto"}, "description": "base64: body_base64 for every message (see Messages)"}],
                    "responses": {"200": {"description": "messages", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Messages"}}}}}}
            },
            "/v1/queues/{queue}/receive": {"parameters": queue_param, "post": op("Lease up to max messages, waiting up to wait_ms", Some("ReceiveRequest"), (200, "Messages"), &[400, 404])},
            "/v1/queues/{queue}/ack": {"parameters": queue_param, "post": op("Acknowledge by receipt", Some("Receipts"), (200, "SettleReply"), &[400, 404])},
            "/v1/queues/{queue}/nack": {"parameters": queue_param, "post": op("Negatively acknowledge; retry after delay_ms or the backoff", Some("Receipts"), (200, "SettleReply"), &[400, 404])},
            "/v1/queues/{queue}/extend": {"parameters": queue_param, "post": op("Extend leases to lease_ms from now", Some("Receipts"), (200, "SettleReply"), &[400, 404])},
            "/v1/queues/{queue}/redrive": {"parameters": queue_param, "post": op("Move dead-lettered messages back at a bounded rate (only those held at the start; never into the source itself)", Some("RedriveRequest"), (202, "Redrive"), &[400, 404, 409, 429])},
            "/v1/redrives": {"get": op("Redrives kept (the last 100), oldest first", None, (200, "RedriveList"), &[503])},
            "/v1/redrives/{id}": {"parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "get": op("Redrive progress", None, (200, "Redrive"), &[404]),
                "delete": op("Cancel a redrive after its current step (what it moved stays moved)", None, (200, "Redrive"), &[404])},
            "/healthz": {"get": {"summary": "The process is alive", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Recovered and serving", "responses": {"200": {"description": "ready"}, "503": {"description": "recovering"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (OpenMetrics text)", "responses": {"200": {"description": "metrics"}}}}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "enum": codes}, "message": {"type": "string"}, "retry_after_ms": {"type": "integer"}}},
            "QueueConfig": {"type": "object", "additionalProperties": false, "properties": {
                "lease_ms": {"type": "integer", "minimum": 1, "maximum": 43200000, "default": 30000},
                "max_deliveries": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 10, "description": "0 = unlimited"},
                "backoff": {"type": "object", "properties": {"base_ms": {"type": "integer", "default": 1000}, "multiplier": {"type": "number", "default": 2.0}, "max_ms": {"type": "integer", "default": 300000}}},
                "dead_letter_queue": {"type": ["string", "null"], "description": "default <queue>-dlq; null disables"},
                "max_messages": {"type": "integer", "minimum": 1}, "max_bytes": {"type": "integer", "minimum": 1},
                "max_in_flight": {"type": "integer", "minimum": 1},
                "priority_levels": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1, "description": "messages carry priority 0 (lowest) ..levels-1"},
                "priority_min_share": {"type": "number", "minimum": 0, "maximum": 0.5, "default": 0.1, "description": "share of deliveries kept for lower levels while higher ones wait"},
                "fairness": {"type": ["object", "null"], "description": "weighted fair scheduling (deficit round robin)", "properties": {
                    "by": {"type": "string", "description": "tenant | key | header:<name>", "default": "tenant"},
                    "weights": {"type": "object", "additionalProperties": {"type": "number"}}}},
                "coalesce": {"type": ["object", "null"], "description": "debounce by key", "properties": {
                    "window_ms": {"type": "integer", "minimum": 1}, "mode": {"type": "string", "enum": ["latest", "merge"], "default": "latest"},
                    "max_wait_ms": {"type": "integer", "description": "default 10 x window_ms"}}},
                "supersede": {"type": "boolean", "default": false, "description": "a newer message with a key cancels pending older ones with that key; leased ones learn it on extend/ack"},
                "key_concurrency": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000, "description": "messages with one key leased or awaiting a retry at once; 1 = strict per-key order"},
                "dedup_window_ms": {"type": "integer", "minimum": 0, "maximum": 86400000, "default": 300000, "description": "client-chosen ids accepted this recently are not enqueued again; 0 = off"},
                "quota": {"type": ["object", "null"], "description": "producer token buckets per tenant; the top level is the default, tenants override it", "properties": {
                    "msgs_per_s": {"type": "number"}, "bytes_per_s": {"type": "number"}, "burst_msgs": {"type": "integer"}, "burst_bytes": {"type": "integer"},
                    "tenants": {"type": "object", "additionalProperties": {"type": "object"}}}},
                "dispatch_rate": {"type": ["object", "null"], "description": "deliveries per second (GCRA); null = unlimited", "properties": {
                    "per_s": {"type": "number", "minimum": 0.001}, "burst": {"type": "integer", "minimum": 1, "default": 1}}},
                "adaptive": {"type": ["object", "null"], "description": "AIMD on the dispatch rate, driven by overloaded nacks and expired leases", "properties": {
                    "min_per_s": {"type": "number"}, "max_per_s": {"type": "number"}}},
                "ttl_ms": {"type": ["integer", "null"], "minimum": 1, "maximum": 2_592_000_000u64, "description": "maximum age of a message; null = forever"},
                "on_expire": {"type": "string", "enum": ["drop", "dead_letter"], "default": "drop"}}},
            "Queue": {"type": "object", "properties": {"name": {"type": "string"}, "config": {"$ref": "#/components/schemas/QueueConfig"}, "stats": {"$ref": "#/components/schemas/QueueStats"}}},
            "QueueStats": queue_stats,
            "QueueList": {"type": "object", "properties": {"queues": {"type": "array", "items": {"$ref": "#/components/schemas/Queue"}}}},
            "Purged": {"type": "object", "properties": {"purged": {"type": "integer"}}},
            "PublishRequest": {"type": "object", "required": ["messages"], "properties": {
                "ack": {"type": "string", "enum": ["durable", "written"], "default": "durable"},
                "tenant": {"type": "string", "description": "tenant of messages that name none"},
                "messages": {"type": "array", "items": {"type": "object", "additionalProperties": false, "properties": {
                    "body": {"type": "string"}, "body_base64": {"type": "string"}, "key": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "delay_ms": {"type": "integer", "minimum": 0}, "deliver_at": {"type": "integer"}, "id": {"type": "string"},
                    "jitter_ms": {"type": "integer", "minimum": 0, "description": "up to this many ms added at random to the delivery time"},
                    "ttl_ms": {"type": "integer", "minimum": 1, "description": "this message's time to live"},
                    "tenant": {"type": "string", "description": "the producer, for quotas and fairness (default: the request's tenant)"},
                    "priority": {"type": "integer", "minimum": 0, "maximum": 255, "description": "0 = lowest; clamped to the queue's levels"}}}}}},
            "PublishReply": {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "string"}},
                "duplicates": {"type": "array", "items": {"type": "integer"}, "description": "indexes of messages acknowledged but not enqueued (id seen within dedup_window_ms)"}}},
            "ReceiveRequest": {"type": "object", "additionalProperties": false, "properties": {
                "max": {"type": "integer", "minimum": 1, "default": 1}, "wait_ms": {"type": "integer", "minimum": 0, "default": 0}, "lease_ms": {"type": "integer", "minimum": 1},
                "encoding": {"type": "string", "enum": ["auto", "base64"], "default": "auto", "description": "base64: body_base64 for every message (see Messages)"}}},
            "Messages": {"type": "object", "description": "Each message has exactly one of body and body_base64. With encoding auto (the default), body (a JSON string) when the bytes are valid UTF-8 with no control character (U+0000-U+001F, U+007F-U+009F) other than tab, line feed and carriage return, else body_base64 (standard alphabet, padded); the empty body is \"body\": \"\". With encoding base64, body_base64 always.", "properties": {"messages": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "receipt": {"type": "string"}, "body": {"type": "string"}, "body_base64": {"type": "string"},
                "key": {"type": "string"}, "headers": {"type": "object"}, "delivery_count": {"type": "integer"},
                "published_at": {"type": "integer"}, "offset": {"type": "integer"}}}}}},
            "Receipts": {"type": "object", "required": ["receipts"], "properties": {
                "receipts": {"type": "array", "items": {"type": "string"}}, "delay_ms": {"type": "integer"}, "error": {"type": "string"}, "lease_ms": {"type": "integer"},
                "reason": {"type": "string", "enum": ["failed", "overloaded"], "description": "nack only: overloaded slows an adaptive queue's dispatch"}}},
            "SettleReply": {"type": "object", "properties": {"ok": {"type": "integer"}, "failed": {"type": "array", "items": {"type": "object", "properties": {
                "receipt": {"type": "string"}, "code": {"type": "string", "enum": ["invalid_receipt", "stale_receipt", "superseded"]}}}},
                "superseded": {"type": "array", "items": {"type": "string"}, "description": "ack only: receipts whose message a newer one with its key superseded"}}},
            "RedriveRequest": {"type": "object", "properties": {
                "to": {"type": "string"}, "rate_per_s": {"type": "integer", "default": 1000}, "max": {"type": "integer", "default": 0},
                "filter": {"type": "object", "properties": {"key": {"type": "string"}, "error_contains": {"type": "string"}}}}},
            "Redrive": {"type": "object", "properties": {"id": {"type": "string"}, "queue": {"type": "string"}, "moved": {"type": "integer"},
                "remaining": {"type": "integer"}, "skipped": {"type": "integer"}, "state": {"type": "string", "enum": ["running", "done", "failed", "cancelled"]}, "error": {"type": ["string", "null"]}}},
            "RedriveList": {"type": "object", "properties": {"redrives": {"type": "array", "items": {"$ref": "#/components/schemas/Redrive"}}}}
        }}
    })
}
