"""Schemathesis hooks for tidewater (scripts/schemathesis, schemathesis.toml).

`map_case` shapes generated schema-valid publishes so that most are accepted and the run
reaches the broker's logic instead of its input checks: a deliver_at far in the future is
brought within max_delay_ms of now, and strings are cut to their limits in UTF-8 bytes (the
document's maxLength counts characters). Only positive cases are touched: a case meant to be
invalid stays as generated.

`filter_failure` excuses "created resource not found" (ST302) only when the 404 is
`stream_not_found` for a stream the request's body names (a commit to a missing stream: the
member just created exists), and "deleted resource still available" (ST301) for redrives
only: DELETE /v1/redrives/{id} cancels a redrive, and GET keeps reporting it (state
"cancelled", or "done" if it had finished) among the last 100, as documented.

It excuses "schema-violating request accepted" (ST201) for one case: a body of only whitespace
to an operation whose body is optional (PUT queue, receive, redrive). The server takes it as
no body, as it takes an empty one (`echo | curl --data-binary @-` sends a line feed); no
schema can say so.

It excuses a "schema-valid request rejected" failure (ST202) only when
the server refused the request for a rule that JSON Schema cannot state, and only after
checking, from the request that was sent, that the rule really was broken. Every other failure
stands. The rules (each is also in the document's descriptions):

- grants and keys: operations that mean nothing on the grant's resource kind, a grant's name
  required unless it matches by prefix, a key's expiry already past;
- byte lengths: `maxLength` counts characters, the server counts UTF-8 bytes (keys, ids,
  tenants, header names and values, bodies, quota tenant names);
- base64 bodies: `maxLength` allows up to two bytes more than max_message_bytes once decoded;
- rules across fields: a subscription's on_retention "dead_letter" needs a
  dead_letter_queue; backoff.base_ms <= backoff.max_ms in the configuration after the patch
  (a patch may give one of them: the other is the queue's), coalesce.window_ms <= max_wait_ms,
  adaptive.min_per_s <= adaptive.max_per_s;
- time: deliver_at may be at most max_delay_ms ahead of now;
- the whole body: at most max_request_bytes;
- how a number is written: an integer written as a float (`820.0`) is taken below 2^53 in
  magnitude, where the float is exactly the number written; past that one float stands for
  many integers, and an integer field refuses it (400; README: write an integer as one);
- the queue's state: a batch larger than the queue's whole capacity (max_messages, max_bytes:
  its configuration, which the stateful phase may have set to 1) is 413 exceeds_capacity;
- names across fields: a subscription's stream and subscription names together are at most
  254 bytes (consumers name it stream/subscription, a binary frame's name);
- the stream's state: a fetch from an offset past its partition's end is 400
  offset_out_of_range (the reply names the end, checked against the offset asked); a
  record without a key produced to a compacted stream (its configuration, which the stateful
  phase may have set) is 400 invalid_message (the reply names the record, checked keyless);
  a produce whose batch is larger than the stream's max_message_bytes (its configuration, set
  by an earlier PUT) is 413 message_too_large (the reply names both sizes, checked).

- hooks and push endpoints: a new one needs target and signature (source and url) though an
  update may leave them out; a hook's tenant in bytes; a push endpoint's batch over 1 needs
  the json format (in the request or already); a webhook's signature (an HMAC of its body),
  a body over the hook's own max_body_bytes, a hook whose target was deleted since.

`map_case` does for stream produces what it does for publishes: record keys, values and
header names and values are cut to their limits in UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from typing import Any

import schemathesis

_FLOAT_FOR_INTEGER = re.compile(r"invalid type: floating point `([-+0-9.eE]+)`, expected [ui](?:8|16|32|64|size)")

# Set to a file path to have each excused failure's reason appended there (one per line).
_LOG = os.environ.get("SCHEMATHESIS_HOOKS_LOG")


def _excuse(reason: str) -> bool:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(reason + "\n")
    return False


def _sent(response: Any) -> Any:
    body = getattr(response.request, "body", None)
    if body is None:
        return None
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error(response: Any) -> tuple[str, str]:
    try:
        reply = json.loads(response.content)
    except ValueError:
        return "", ""
    if not isinstance(reply, dict):
        return "", ""
    return str(reply.get("code", "")), str(reply.get("message", ""))


def _schema(operation: Any, name: str) -> dict:
    raw = operation.schema.raw_schema if operation is not None else {}
    return raw.get("components", {}).get("schemas", {}).get(name, {})


def _over(text: Any, limit: Any) -> bool:
    """More UTF-8 bytes than `limit`, though no more characters."""
    return (
        isinstance(text, str)
        and isinstance(limit, int)
        and len(text) <= limit < len(text.encode("utf-8", "surrogatepass"))
    )


def _message_bytes_over(operation: Any, request: Any) -> bool:
    schema = _schema(operation, "InMessage").get("properties", {})
    limit = lambda field: schema.get(field, {}).get("maxLength")  # noqa: E731
    headers = schema.get("headers", {})
    name_limit = headers.get("propertyNames", {}).get("maxLength")
    value_limit = headers.get("additionalProperties", {}).get("maxLength")
    if not isinstance(request, dict):
        return False
    if _over(request.get("tenant"), _schema(operation, "PublishRequest").get("properties", {}).get("tenant", {}).get("maxLength")):
        return True
    for message in request.get("messages") or []:
        if not isinstance(message, dict):
            continue
        for field in ("key", "id", "tenant"):
            if _over(message.get(field), limit(field)):
                return True
        for name, value in (message.get("headers") or {}).items():
            if _over(name, name_limit) or _over(value, value_limit):
                return True
    return False


def _body_over(operation: Any, request: Any) -> bool:
    """A body longer than max_message_bytes in bytes (text) or once decoded (base64)."""
    schema = _schema(operation, "InMessage").get("properties", {})
    max_bytes = schema.get("body", {}).get("maxLength")
    if not isinstance(request, dict) or not isinstance(max_bytes, int):
        return False
    for message in request.get("messages") or []:
        if not isinstance(message, dict):
            continue
        if _over(message.get("body"), max_bytes):
            return True
        encoded = message.get("body_base64")
        if isinstance(encoded, str):
            try:
                if len(base64.b64decode(encoded, validate=True)) > max_bytes:
                    return True
            except binascii.Error:
                pass
    return False


def _number(value: Any) -> bool:
    """A JSON number (820.0 is the integer 820 to the server, a float to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _patch(request: Any) -> dict:
    if isinstance(request, dict) and list(request) == ["config"] and isinstance(request["config"], dict):
        return request["config"]
    return request if isinstance(request, dict) else {}


def _config_rule_broken(request: Any, message: str) -> bool:
    patch = _patch(request)
    if message.startswith("backoff needs"):
        backoff = patch.get("backoff") or {}
        base, high = backoff.get("base_ms"), backoff.get("max_ms")
        # Only a patch that gives both, in order, has no excuse: otherwise the queue's own
        # value takes part.
        return not (_number(base) and _number(high) and base <= high)
    if message.startswith("coalesce needs"):
        coalesce = patch.get("coalesce") or {}
        window = coalesce.get("window_ms")
        wait = coalesce.get("max_wait_ms")
        if wait is None and _number(window):
            wait = window * 10
        return _number(window) and _number(wait) and not window <= wait <= 86_400_000
    if message.startswith("adaptive needs"):
        adaptive = patch.get("adaptive") or {}
        low, high = adaptive.get("min_per_s"), adaptive.get("max_per_s")
        return _number(low) and _number(high) and low > high
    if message.startswith('on_retention "dead_letter" needs a dead_letter_queue'):
        # With the subscription's current settings, which earlier requests may have set.
        return patch.get("on_retention") == "dead_letter" or (
            "dead_letter_queue" in patch and patch["dead_letter_queue"] is None
        )
    if message.startswith("quota.tenants: names are"):
        tenants = (patch.get("quota") or {}).get("tenants") or {}
        return any(_over(name, 128) for name in tenants)
    return False


def _fit(text: Any, limit: Any) -> Any:
    """`text` cut to at most `limit` UTF-8 bytes (whole characters)."""
    if not isinstance(text, str) or not isinstance(limit, int):
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def _fit_records(operation: Any, body: dict) -> None:
    schema = _schema(operation, "InRecord").get("properties", {})
    limit = lambda field: schema.get(field, {}).get("maxLength")  # noqa: E731
    headers = schema.get("headers", {})
    name_limit = headers.get("propertyNames", {}).get("maxLength")
    value_limit = headers.get("additionalProperties", {}).get("maxLength")
    for record in body.get("records") or []:
        if not isinstance(record, dict):
            continue
        for field in ("key", "value"):
            if field in record:
                record[field] = _fit(record[field], limit(field))
        if isinstance(record.get("headers"), dict):
            record["headers"] = {
                _fit(name, name_limit): _fit(value, value_limit) for name, value in record["headers"].items()
            }


def _decoded_len(text: Any) -> int:
    if not isinstance(text, str):
        return 0
    try:
        return len(base64.b64decode(text, validate=True))
    except binascii.Error:
        return 0


def _record_bytes_over(operation: Any, request: Any) -> bool:
    """A record whose key, value or a header is over its limit in UTF-8 bytes, or, as
    base64, once decoded (maxLength allows up to two bytes more)."""
    schema = _schema(operation, "InRecord").get("properties", {})
    limit = lambda field: schema.get(field, {}).get("maxLength")  # noqa: E731
    headers = schema.get("headers", {})
    name_limit = headers.get("propertyNames", {}).get("maxLength")
    value_limit = headers.get("additionalProperties", {}).get("maxLength")
    if not isinstance(request, dict):
        return False
    for record in request.get("records") or []:
        if not isinstance(record, dict):
            continue
        for field in ("key", "value"):
            if _over(record.get(field), limit(field)):
                return True
            maximum = limit(field)
            if isinstance(maximum, int) and _decoded_len(record.get(f"{field}_base64")) > maximum:
                return True
        for name, value in (record.get("headers") or {}).items():
            if _over(name, name_limit) or _over(value, value_limit):
                return True
    return False


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    operation = case.operation
    label = f"{operation.method.upper()} {operation.path}"
    if label == "POST /v1/streams/{stream}/records" and isinstance(case.body, dict):
        _fit_records(operation, case.body)
        return case
    if label != "POST /v1/queues/{queue}/messages":
        return case
    if not isinstance(case.body, dict):
        return case
    schema = _schema(operation, "InMessage").get("properties", {})
    limit = lambda field: schema.get(field, {}).get("maxLength")  # noqa: E731
    headers = schema.get("headers", {})
    name_limit = headers.get("propertyNames", {}).get("maxLength")
    value_limit = headers.get("additionalProperties", {}).get("maxLength")
    max_delay = schema.get("delay_ms", {}).get("maximum")
    now = int(time.time() * 1000)
    if "tenant" in case.body:
        case.body["tenant"] = _fit(case.body["tenant"], limit("tenant"))
    for message in case.body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        at = message.get("deliver_at")
        if _number(at) and isinstance(max_delay, int) and at > now + max_delay // 2:
            message["deliver_at"] = now + int(at) % (max_delay // 2 + 1)
        for field in ("key", "id", "tenant", "body"):
            if field in message:
                message[field] = _fit(message[field], limit(field))
        if isinstance(message.get("headers"), dict):
            message["headers"] = {
                _fit(name, name_limit): _fit(value, value_limit) for name, value in message["headers"].items()
            }
    return case


# The auth crate's validation messages (crates/auth/src/acl.rs, keys.rs).
_AUTH_RULES = (
    "operation '",
    "a grant names",
    "a grant on the cluster",
    "a grant's name pattern",
    "a principal name",
    "a role name",
    "a tenant name",
    "the key would expire",
)


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """False (drop the failure) only for what is explained above."""
    if getattr(failure, "code", None) == "ST301":
        return "DELETE /v1/redrives/" not in failure.message or _excuse("redrive cancelled, still reported")
    if getattr(failure, "code", None) == "ST302" and response is not None:
        # "Created resource not found": a 404 for something the request's body names (a
        # commit to a stream that does not exist), not for the resource just created (the
        # member): the reply names what is missing.
        code, message = _error(response)
        body = _sent(response)
        named = [o.get("stream") for o in (body or {}).get("offsets", []) if isinstance(o, dict)]
        missing = re.match(r"stream '(.*)' does not exist", message)
        if code == "stream_not_found" and missing and missing.group(1) in named:
            return _excuse("commit: a stream named in the body does not exist")
        return True
    if getattr(failure, "code", None) == "ST201" and response is not None:
        body = getattr(response.request, "body", None)
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogatepass")
        optional = not case.operation.definition.raw.get("requestBody", {}).get("required", False)
        if body is not None and body.strip(b" \t\r\n") == b"" and optional:
            return _excuse("a body of only whitespace is no body")
        return True
    if getattr(failure, "code", None) != "ST202" or response is None:
        return True
    operation = case.operation
    label = f"{operation.method.upper()} {operation.path}"
    code, message = _error(response)
    request = _sent(response)
    written = _FLOAT_FOR_INTEGER.search(message)
    if code == "invalid_request" and written and abs(float(written.group(1))) >= 2**53:
        return _excuse("an integer written as a float past 2^53")
    if code == "request_too_large" and "exceeds max_request_bytes" in message:
        return _excuse("body over max_request_bytes")
    if label == "POST /v1/queues/{queue}/messages":
        if code == "invalid_message" and "bytes" in message and _message_bytes_over(operation, request):
            return _excuse("publish: a field's UTF-8 bytes over its limit")
        if code == "message_too_large" and _body_over(operation, request):
            return _excuse("publish: a body's bytes over max_message_bytes")
        if code == "invalid_message" and "deliver_at is more than max_delay_ms" in message:
            return _excuse("publish: deliver_at too far ahead of now")
        if code == "exceeds_capacity":
            return _excuse("publish: batch over the queue's capacity")
    if label == "GET /v1/streams/{stream}/partitions/{partition}/records" and code == "offset_out_of_range":
        end = re.search(r"its records are at \d+\.\.(\d+)", message)
        asked = re.search(r"^offset (\d+) is past the end", message)
        if end and asked and int(asked.group(1)) > int(end.group(1)):
            return _excuse("fetch: offset past the partition's end")
        # A stream made with a small retention_bytes or retention_ms (and records whose
        # timestamps roll segments on age) has its oldest records deleted.
        start = re.search(r"retention deleted the records below (\d+)", message)
        asked = re.search(r"^offset (\d+) is before the start", message)
        if start and asked and int(asked.group(1)) < int(start.group(1)):
            return _excuse("fetch: offset before the partition's start (retention)")
    if label == "POST /v1/streams/{stream}/records" and code in ("invalid_message", "message_too_large"):
        if _record_bytes_over(operation, request):
            return _excuse("produce: a key, value or header over its limit in bytes")
        over = re.match(r"a batch of (\d+) bytes exceeds the stream's max_message_bytes (\d+)", message)
        if code == "message_too_large" and over and int(over.group(1)) > int(over.group(2)) > 0:
            return _excuse("produce: a batch over the stream's max_message_bytes (its configuration)")
        keyless = re.match(r"record (\d+) has no key: the stream is compacted", message)
        records = request.get("records") if isinstance(request, dict) else None
        if keyless and isinstance(records, list) and int(keyless.group(1)) < len(records):
            record = records[int(keyless.group(1))]
            if isinstance(record, dict) and record.get("key") is None and record.get("key_base64") is None:
                return _excuse("produce: a keyless record to a compacted stream")
    if label == "POST /v1/groups/{group}/offsets/reset" and code == "invalid_request":
        body = request if isinstance(request, dict) else {}
        targets = [k for k in ("to", "to_datetime", "shift_by", "to_offset") if body.get(k) is not None]
        if len(targets) != 1 and message.startswith(("name only one of", "name where to reset")):
            return _excuse("reset offsets: not exactly one target")
        if message.startswith("to_datetime") and isinstance(body.get("to_datetime"), str):
            return _excuse("reset offsets: to_datetime text that is not RFC 3339")
    if label == "PUT /v1/queues/{queue}" and code == "invalid_config":
        if _config_rule_broken(request, message):
            return _excuse("put queue: " + message.split(",")[0])
    if label == "PUT /v1/streams/{stream}/subscriptions/{sub}" and code == "invalid_config":
        if _config_rule_broken(request, message):
            return _excuse("put subscription: " + message.split(",")[0])
    if label in ("POST /v1/auth/keys", "POST /v1/auth/acls") and code == "invalid_request":
        # What a grant or a key means, beyond the schema: operations that mean nothing on the
        # resource kind, a name required unless matching by prefix, names in bytes (the
        # schema counts characters), an expiry already past.
        if message.startswith(_AUTH_RULES):
            return _excuse("auth: " + message.split(" (")[0][:60])
    if label in ("PUT /v1/hooks/{hook}", "PUT /v1/pushes/{push}") and code == "invalid_config":
        body = request if isinstance(request, dict) else {}
        # A new hook or push endpoint needs what an update may leave out: the schema
        # (one document for both) cannot say which the request is.
        if message.startswith("a new hook needs") and not (body.get("target") and body.get("signature")):
            return _excuse("put hook: a new hook without target or signature")
        if message.startswith("a new push endpoint needs") and not (body.get("source") and body.get("url")):
            return _excuse("put push: a new endpoint without source or url")
        if message.startswith("tenant: give 1 to") and _over(body.get("tenant"), _schema(operation, "HookPut").get("properties", {}).get("tenant", {}).get("maxLength")):
            return _excuse("put hook: a tenant's UTF-8 bytes over its limit")
        # batch > 1 needs the json format: in this request, or already the endpoint's.
        batch = body.get("batch")
        if message.startswith("batch: the raw format") and isinstance(batch, (int, float)) and batch > 1 and body.get("format") != "json":
            return _excuse("put push: a batch with the raw format")
    if label == "PUT /v1/pushes/{push}" and code == "invalid_subscription_name":
        source = (request or {}).get("source") if isinstance(request, dict) else None
        path = source.get("subscription") if isinstance(source, dict) else None
        if isinstance(path, str) and len(path.encode()) > 254:
            return _excuse("put push: stream and subscription names over 254 bytes together")
    if label == "POST /v1/hooks/{hook}":
        # A webhook's signature is an HMAC of its body: no schema can say which are valid.
        if code == "invalid_signature":
            return _excuse("webhook: not signed by the hook's secret")
        if code == "request_too_large" and "past its max_body_bytes" in message:
            return _excuse("webhook: a body over the hook's max_body_bytes (its configuration)")
        if code == "target_unavailable":
            return _excuse("webhook: the hook's target was deleted")
        if code == "exceeds_capacity":
            return _excuse("webhook: an event over the queue's capacity")
    if "/subscriptions/{sub}" in label and code == "invalid_subscription_name":
        params = case.path_parameters or {}
        stream, sub = str(params.get("stream", "")), str(params.get("sub", ""))
        if len(stream.encode()) + 1 + len(sub.encode()) > 255:
            return _excuse("subscription: stream and subscription names over 254 bytes together")
    return True
