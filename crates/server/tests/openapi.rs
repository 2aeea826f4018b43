//! Real replies against /v1/openapi.json: each status is one the document lists for the
//! operation, and each body matches the schema it gives (a small validator for the JSON
//! Schema keywords the document uses; `pattern` is not checked here, schemathesis does).
//! scripts/schemathesis checks far more cases; this runs with every `cargo test`.

use serde_json::{Value, json};

use crate::support::{Server, call, receipts};

/// Why `value` does not match `schema`, if it does not.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let resolved = doc
            .pointer(target.trim_start_matches('#'))
            .ok_or_else(|| format!("{target} does not resolve"))?;
        return check(doc, resolved, value, at);
    }
    let fail = |why: String| Err(format!("{at}: {why} (value {value}, schema {schema})"));
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let is = |t: &str| match t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            "number" => value.is_number(),
            "integer" => {
                value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        };
        if !types.iter().any(|t| is(t)) {
            return fail(format!("not of type {types:?}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return fail("not in the enum".into());
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            return fail(format!("below {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            return fail(format!("above {max}"));
        }
    }
    if let Some(text) = value.as_str() {
        let chars = text.chars().count() as u64;
        if schema
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| chars < m)
        {
            return fail("too short".into());
        }
        if schema
            .get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| chars > m)
        {
            return fail("too long".into());
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
        {
            return fail("too few items".into());
        }
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n > m)
        {
            return fail("too many items".into());
        }
        if let Some(item) = schema.get("items") {
            for (i, v) in items.iter().enumerate() {
                check(doc, item, v, &format!("{at}/{i}"))?;
            }
        }
    }
    if let Some(map) = value.as_object() {
        let n = map.len() as u64;
        if schema
            .get("minProperties")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
        {
            return fail("too few properties".into());
        }
        if schema
            .get("maxProperties")
            .and_then(Value::as_u64)
            .is_some_and(|m| n > m)
        {
            return fail("too many properties".into());
        }
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !map.contains_key(name.as_str().unwrap_or_default()) {
                return fail(format!("{name} is missing"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, v) in map {
            let here = format!("{at}/{name}");
            if let Some(names) = schema.get("propertyNames") {
                check(doc, names, &json!(name), &here)?;
            }
            match properties.and_then(|p| p.get(name)) {
                Some(property) => check(doc, property, v, &here)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => return fail(format!("{name} is not allowed")),
                    Some(extra @ Value::Object(_)) => check(doc, extra, v, &here)?,
                    _ => {}
                },
            }
        }
    }
    if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = branches
            .iter()
            .filter(|b| check(doc, b, value, at).is_ok())
            .count();
        if matching != 1 {
            return fail(format!("{matching} of oneOf match"));
        }
    }
    if let Some(branches) = schema.get("anyOf").and_then(Value::as_array)
        && !branches.iter().any(|b| check(doc, b, value, at).is_ok())
    {
        return fail("no branch of anyOf matches".into());
    }
    if let Some(not) = schema.get("not")
        && check(doc, not, value, at).is_ok()
    {
        return fail("matches `not`".into());
    }
    Ok(())
}

/// Calls the operation and checks the reply against the document; returns the body.
fn conform(
    server: &Server,
    doc: &Value,
    (method, template, path): (&str, &str, &str),
    body: Option<Value>,
) -> (u16, Value) {
    let (status, reply) = call(&server.url, method, path, body.as_ref()).unwrap();
    let operation = &doc["paths"][template][method.to_lowercase()];
    assert!(
        operation.is_object(),
        "{method} {template} is not in the document"
    );
    let mut response = &operation["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list: {reply}"
    );
    if let Some(target) = response.get("$ref").and_then(Value::as_str) {
        response = doc.pointer(target.trim_start_matches('#')).unwrap();
    }
    match response["content"]["application/json"]["schema"].as_object() {
        Some(_) => {
            let schema = &response["content"]["application/json"]["schema"];
            if let Err(why) = check(doc, schema, &reply, "") {
                panic!("{method} {path} -> {status}: {why}\nreply: {reply}");
            }
        }
        None => assert!(
            reply.is_null(),
            "{method} {path}: a body the document does not describe"
        ),
    }
    (status, reply)
}

#[test]
fn real_replies_match_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        Some("[limits]\nmax_receive_messages = 50\n"),
    );
    let doc = server.ok("GET", "/v1/openapi.json", None);
    // The validator refuses what it should.
    let schema = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    for (name, wrong) in [
        ("Queue", json!({"name": "x"})),
        (
            "PublishReply",
            json!({"ids": ["a"], "duplicates": [], "extra": 1}),
        ),
        ("InMessage", json!({"body": "a", "body_base64": "AA=="})),
        (
            "InMessage",
            json!({"body": "a", "delay_ms": 1, "deliver_at": 2}),
        ),
        ("ReceiveRequest", json!({"max": 51})),
        ("Error404", json!({"code": "invalid_json", "message": "m"})),
    ] {
        assert!(
            check(&doc, &schema(name), &wrong, "").is_err(),
            "{name} took {wrong}"
        );
    }
    assert!(
        check(
            &doc,
            &schema("InMessage"),
            &json!({"body": "a", "body_base64": null, "delay_ms": 1, "deliver_at": null}),
            ""
        )
        .is_ok()
    );
    let q = |op: &'static str, path: &str| (op, "/v1/queues/{queue}", path.to_string());
    let go = |(method, template, path): (&str, &str, String), body: Option<Value>| {
        conform(&server, &doc, (method, template, &path), body)
    };

    assert_eq!(
        go(
            q("PUT", "/v1/queues/work"),
            Some(json!({"max_deliveries": 1}))
        )
        .0,
        201
    );
    assert_eq!(
        go(
            q("PUT", "/v1/queues/work"),
            Some(json!({"config": {"lease_ms": 5000}}))
        )
        .0,
        200
    );
    go(q("PUT", "/v1/queues/other"), None);
    go(q("PUT", "/v1/queues/work"), Some(json!({"lease_ms": 0})));
    go(
        q("PUT", "/v1/queues/work"),
        Some(json!({"dead_letter_queue": "work"})),
    );
    go(q("PUT", "/v1/queues/bad%20name"), None);
    go(q("GET", "/v1/queues/work"), None);
    // A queue whose stats show the optional fields.
    go(
        q("PUT", "/v1/queues/fancy"),
        Some(
            json!({"key_concurrency": 2, "priority_levels": 3, "fairness": {"by": "key"},
            "coalesce": {"window_ms": 1000}, "dispatch_rate": {"per_s": 5.0}}),
        ),
    );
    go(q("GET", "/v1/queues/fancy"), None);
    go(q("GET", "/v1/queues/nope"), None);
    go(("GET", "/v1/queues", "/v1/queues".into()), None);

    let m = |op: &'static str, queue: &str| {
        (
            op,
            "/v1/queues/{queue}/messages",
            format!("/v1/queues/{queue}/messages"),
        )
    };
    let published = go(
        m("POST", "work"),
        Some(json!({"messages": [
            {"body": "text", "key": "k", "headers": {"h": "v"}, "id": "one", "priority": 2},
            {"body_base64": "/wAB", "delay_ms": 0},
            {"body": "later", "deliver_at": 1},
            {"body": "bell \u{7}"}],
            "ack": "written"})),
    );
    assert_eq!(published.0, 200);
    go(
        m("POST", "work"),
        Some(json!({"messages": [{"body": "dup", "id": "one"}]})),
    );
    go(m("POST", "work"), Some(json!({"messages": []})));
    go(
        m("POST", "work"),
        Some(json!({"messages": [{"body": "a", "body_base64": "AA=="}]})),
    );
    go(
        m("POST", "nope"),
        Some(json!({"messages": [{"body": "a"}]})),
    );
    let peek = |query: &str| {
        (
            "GET",
            "/v1/queues/{queue}/messages",
            format!("/v1/queues/work/messages{query}"),
        )
    };
    go(peek(""), None);
    go(peek("?max=1&from=1"), None);
    go(peek("?encoding=base64"), None);
    go(peek("?encoding=hex"), None);
    go(peek("?max=0"), None);
    go(peek("?max=x"), None);

    let r = |op: &'static str, queue: &str| {
        (
            "POST",
            op,
            format!("/v1/queues/{queue}/{}", op.rsplit('/').next().unwrap()),
        )
    };
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while got.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        let (_, reply) = go(
            r("/v1/queues/{queue}/receive", "work"),
            Some(json!({"max": 10, "wait_ms": 1000})),
        );
        got.extend(reply["messages"].as_array().unwrap().iter().cloned());
    }
    go(r("/v1/queues/{queue}/receive", "work"), None);
    go(
        r("/v1/queues/{queue}/receive", "work"),
        Some(json!({"encoding": "base64", "max": 1})),
    );
    go(
        r("/v1/queues/{queue}/receive", "work"),
        Some(json!({"encoding": null})),
    );
    go(
        r("/v1/queues/{queue}/receive", "work"),
        Some(json!({"max": 51})),
    );
    go(r("/v1/queues/{queue}/receive", "work"), Some(json!("{")));
    let all = receipts(&got);
    go(
        r("/v1/queues/{queue}/extend", "work"),
        Some(json!({"receipts": [all[0], "junk"], "lease_ms": 10000})),
    );
    go(
        r("/v1/queues/{queue}/ack", "work"),
        Some(json!({"receipts": [all[0]]})),
    );
    go(
        r("/v1/queues/{queue}/ack", "work"),
        Some(json!({"receipts": [all[0]]})),
    );
    go(
        r("/v1/queues/{queue}/nack", "work"),
        Some(json!({"receipts": [all[1]], "error": "boom", "delay_ms": 0})),
    );
    go(
        r("/v1/queues/{queue}/nack", "work"),
        Some(json!({"receipts": [], "reason": "tired"})),
    );
    go(
        r("/v1/queues/{queue}/ack", "nope"),
        Some(json!({"receipts": []})),
    );

    // The nacked message went to work-dlq (max_deliveries 1): redrive it.
    let (status, redrive) = go(
        r("/v1/queues/{queue}/redrive", "work-dlq"),
        Some(json!({"rate_per_s": 100})),
    );
    assert_eq!(status, 202, "{redrive}");
    let id = redrive["id"].as_str().unwrap().to_string();
    go(
        r("/v1/queues/{queue}/redrive", "work-dlq"),
        Some(json!({"to": "work-dlq"})),
    );
    go(
        r("/v1/queues/{queue}/redrive", "work-dlq"),
        Some(json!({"to": "nope"})),
    );
    go(
        r("/v1/queues/{queue}/redrive", "work-dlq"),
        Some(json!({"rate_per_s": 0})),
    );
    go(
        ("GET", "/v1/redrives/{id}", format!("/v1/redrives/{id}")),
        None,
    );
    go(("GET", "/v1/redrives", "/v1/redrives".into()), None);
    go(
        ("DELETE", "/v1/redrives/{id}", format!("/v1/redrives/{id}")),
        None,
    );
    go(
        ("GET", "/v1/redrives/{id}", "/v1/redrives/rd-999".into()),
        None,
    );

    go(r("/v1/queues/{queue}/purge", "work"), None);
    go(r("/v1/queues/{queue}/purge", "nope"), None);
    assert_eq!(go(q("DELETE", "/v1/queues/other"), None).0, 204);
    go(q("DELETE", "/v1/queues/other"), None);
    go(("GET", "/healthz", "/healthz".into()), None);
    go(("GET", "/readyz", "/readyz".into()), None);

    // Streams.
    let st = |method: &'static str, template: &'static str, path: &str| {
        (method, template, path.to_string())
    };
    let stream = "/v1/streams/{stream}";
    assert_eq!(
        go(
            st("PUT", stream, "/v1/streams/s"),
            Some(json!({"partitions": 2}))
        )
        .0,
        201
    );
    go(
        st("PUT", stream, "/v1/streams/s"),
        Some(json!({"config": {"timestamp_type": "log_append_time"}})),
    );
    go(
        st("PUT", stream, "/v1/streams/s"),
        Some(json!({"partitions": 1})),
    );
    go(
        st("PUT", stream, "/v1/streams/s"),
        Some(json!({"partitions": 0})),
    );
    go(st("PUT", stream, "/v1/streams/bad%20name"), None);
    go(st("GET", stream, "/v1/streams/s"), None);
    go(st("GET", stream, "/v1/streams/nope"), None);
    go(st("GET", "/v1/streams", "/v1/streams"), None);
    let records = "/v1/streams/{stream}/records";
    go(
        st("POST", records, "/v1/streams/s/records"),
        Some(json!({"records": [
            {"key": "k", "value": "v", "headers": {"h": "1"}},
            {"value_base64": "AAE=", "partition": 1, "timestamp": 5},
            {}
        ]})),
    );
    go(
        st("POST", records, "/v1/streams/s/records"),
        Some(json!({"records": [{"partition": 9}]})),
    );
    go(
        st("POST", records, "/v1/streams/s/records"),
        Some(json!({"records": []})),
    );
    go(
        st("POST", records, "/v1/streams/nope/records"),
        Some(json!({"records": [{}]})),
    );
    let fetch = "/v1/streams/{stream}/partitions/{partition}/records";
    for path in [
        "/v1/streams/s/partitions/0/records",
        "/v1/streams/s/partitions/1/records?offset=0&encoding=base64&max_bytes=0",
        "/v1/streams/s/partitions/1/records?offset=99",
        "/v1/streams/s/partitions/5/records",
        "/v1/streams/s/partitions/x/records",
        "/v1/streams/s/partitions/0/records?wait_ms=999999999",
    ] {
        go(st("GET", fetch, path), None);
    }
    let offsets = "/v1/streams/{stream}/partitions/{partition}/offsets";
    go(
        st("GET", offsets, "/v1/streams/s/partitions/1/offsets?time=0"),
        None,
    );
    go(
        st(
            "GET",
            offsets,
            "/v1/streams/s/partitions/1/offsets?time=9999999999999",
        ),
        None,
    );
    go(
        st("GET", offsets, "/v1/streams/s/partitions/1/offsets"),
        None,
    );

    // Consumer groups.
    go(st("GET", "/v1/groups", "/v1/groups"), None);
    go(st("GET", "/v1/groups/{group}", "/v1/groups/g"), None);
    let consumers = "/v1/groups/{group}/consumers";
    let (status, created) = go(
        st("POST", consumers, "/v1/groups/g/consumers"),
        Some(json!({"streams": ["s"]})),
    );
    assert_eq!(status, 201, "{created}");
    let member = created["member"].as_str().unwrap().to_string();
    go(
        st("POST", consumers, "/v1/groups/g/consumers"),
        Some(json!({"streams": []})),
    );
    go(
        st("POST", consumers, "/v1/groups/g/consumers"),
        Some(json!({"streams": ["nope"]})),
    );
    go(
        st("POST", consumers, "/v1/groups/g/consumers"),
        Some(json!({"streams": ["s"], "session_timeout_ms": 1})),
    );
    for (group, start_at) in [
        ("o1", json!({"offset": 1})),
        ("o2", json!({"time": 0})),
        ("o3", json!({"offset": -1})),
    ] {
        let (status, other) = go(
            st("POST", consumers, &format!("/v1/groups/{group}/consumers")),
            Some(json!({"streams": ["s"], "start_at": start_at})),
        );
        if status == 201 {
            let member = other["member"].as_str().unwrap();
            let (_, got) = go(
                st(
                    "GET",
                    "/v1/groups/{group}/consumers/{member}/records",
                    &format!("/v1/groups/{group}/consumers/{member}/records?max_records=1"),
                ),
                None,
            );
            assert_eq!(
                got["records"].as_array().unwrap().len(),
                1,
                "{start_at}: {got}"
            );
            go(
                st(
                    "DELETE",
                    "/v1/groups/{group}/consumers/{member}",
                    &format!("/v1/groups/{group}/consumers/{member}"),
                ),
                None,
            );
        }
    }
    let fetch_records = "/v1/groups/{group}/consumers/{member}/records";
    go(
        st(
            "GET",
            fetch_records,
            &format!("/v1/groups/g/consumers/{member}/records?encoding=base64"),
        ),
        None,
    );
    go(
        st(
            "GET",
            fetch_records,
            "/v1/groups/g/consumers/nobody/records",
        ),
        None,
    );
    let commit = "/v1/groups/{group}/consumers/{member}/commit";
    go(
        st(
            "POST",
            commit,
            &format!("/v1/groups/g/consumers/{member}/commit"),
        ),
        None,
    );
    go(
        st(
            "POST",
            commit,
            &format!("/v1/groups/g/consumers/{member}/commit"),
        ),
        Some(json!({"offsets": [{"stream": "s", "partition": 0, "offset": 99}]})),
    );
    go(st("GET", "/v1/groups/{group}", "/v1/groups/g"), None);
    let reset = "/v1/groups/{group}/offsets/reset";
    let group = "/v1/groups/{group}";
    // A group with a member: 409.
    go(
        st("POST", reset, "/v1/groups/g/offsets/reset"),
        Some(json!({"to": "earliest"})),
    );
    go(st("DELETE", group, "/v1/groups/g"), None);
    let one = "/v1/groups/{group}/consumers/{member}";
    assert_eq!(
        go(
            st("DELETE", one, &format!("/v1/groups/g/consumers/{member}")),
            None
        )
        .0,
        204
    );
    go(
        st("DELETE", one, &format!("/v1/groups/g/consumers/{member}")),
        None,
    );

    for body in [
        json!({"to": "latest", "dry_run": true}),
        json!({"streams": ["s"], "to_datetime": "2026-11-30T10:00:00Z", "dry_run": null}),
        json!({"to_datetime": 0, "to": null}),
        json!({"shift_by": -1}),
        json!({"to_offset": 1}),
        json!({"to_offset": 1, "shift_by": 1}),
        json!({}),
        json!({"to": "now"}),
        json!({"to_datetime": "yesterday"}),
        json!({"streams": ["nope"], "to": "latest"}),
        json!({"streams": [], "to": "latest"}),
    ] {
        go(st("POST", reset, "/v1/groups/g/offsets/reset"), Some(body));
    }
    go(
        st("POST", reset, "/v1/groups/fresh/offsets/reset"),
        Some(json!({"to": "latest"})),
    );
    assert_eq!(go(st("DELETE", group, "/v1/groups/g"), None).0, 204);
    go(st("DELETE", group, "/v1/groups/g"), None);
    assert_eq!(go(st("DELETE", stream, "/v1/streams/s"), None).0, 204);
    go(st("DELETE", stream, "/v1/streams/s"), None);
}
