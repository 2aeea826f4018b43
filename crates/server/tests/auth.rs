//! Authentication and authorization against a real server with `[auth] enabled = true`:
//! every route of the OpenAPI document and every binary request refused without
//! credentials, refused without the grant and allowed with it; tenants from identity;
//! revocation on an open connection; limits on failed attempts; keys and grants durable;
//! no secret in the server's log.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tidewater_proto::{
    Ack, CommitOffset, DEFAULT_MAX_FRAME, FetchPartition, Frame, PROTOCOL_VERSION, Receipts,
    StreamPartition, decode_frame,
};

use crate::support::{LOG_TO, Server, call_as};

const ADMIN: &str = "twadmin.Secret-for-the-auth-tests-0123456789abcdef";

/// A server with authentication on and the admin key from the environment; its log goes
/// to `<dir>/server.log`.
fn secured(dir: &Path, extra: &str) -> Server {
    let config = dir.join("auth.toml");
    std::fs::write(&config, format!("[auth]\nenabled = true\n{extra}")).unwrap();
    let log = dir.join("server.log");
    let server = Server::start_env(
        &dir.join("data"),
        Some(config),
        &[
            ("TIDEWATER_ADMIN_KEY", ADMIN),
            (LOG_TO, log.to_str().unwrap()),
        ],
    );
    server.remember_secret(ADMIN.split_once('.').unwrap().1);
    server
}

fn admin(server: &Server, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, value) = call_as(&server.url, Some(ADMIN), method, path, body.as_ref());
    assert!(
        (200..300).contains(&status),
        "{method} {path} -> {status} {value}"
    );
    value
}

/// A new key for `principal` (with `roles`); its token.
fn key(server: &Server, principal: &str, roles: &[&str]) -> String {
    let made = admin(
        server,
        "POST",
        "/v1/auth/keys",
        Some(json!({"principal": principal, "roles": roles})),
    );
    server.remember_secret(made["secret"].as_str().unwrap());
    made["token"].as_str().unwrap().to_string()
}

fn grant(server: &Server, principal: &str, resource: &str, name: &str, ops: &[&str]) -> String {
    let made = admin(
        server,
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"principal": principal, "resource": resource, "name": name, "operations": ops}),
        ),
    );
    made["acl"]["id"].as_str().unwrap().to_string()
}

fn revoke_grant(server: &Server, id: &str) {
    admin(server, "DELETE", &format!("/v1/auth/acls/{id}"), None);
}

/// The resources the table test acts on: queue `q`, stream `s`, subscription `s/sub`,
/// hook `h`, push endpoint `p` (on `pq`), group `g` with member `m`.
fn resources(server: &Server) -> String {
    admin(server, "PUT", "/v1/queues/q", Some(json!({})));
    admin(server, "PUT", "/v1/queues/q2", Some(json!({})));
    admin(
        server,
        "PUT",
        "/v1/streams/s",
        Some(json!({"partitions": 1})),
    );
    admin(
        server,
        "PUT",
        "/v1/streams/s/subscriptions/sub",
        Some(json!({})),
    );
    // Unsigned, so its webhooks need produce on the hook (a signed one's need none).
    admin(
        server,
        "PUT",
        "/v1/hooks/h",
        Some(json!({"target": {"queue": "q"}, "signature": {"preset": "none"}})),
    );
    admin(server, "PUT", "/v1/queues/pq", Some(json!({})));
    admin(
        server,
        "PUT",
        "/v1/pushes/p",
        Some(json!({"source": {"queue": "pq"}, "url": "https://push.example/x"})),
    );
    let member = admin(
        server,
        "POST",
        "/v1/groups/g/consumers",
        Some(json!({"streams": ["s"]})),
    );
    member["member"].as_str().unwrap().to_string()
}

/// A concrete path for a template of the document.
fn concrete(template: &str, member: &str) -> String {
    let path = template
        .replace("{queue}", "q")
        .replace("{stream}", "s")
        .replace("{sub}", "sub")
        .replace("{group}", "g")
        .replace("{hook}", "h")
        .replace("{push}", "p")
        .replace("{partition}", "0")
        .replace("{member}", member)
        .replace("{id}", "missing")
        .replace("{file}", "app.js");
    if path.ends_with("/records") {
        format!("{path}?wait_ms=0") // no long poll
    } else {
        path
    }
}

/// Not refused by authentication or authorization (any other answer will do: the request
/// got past the checks).
fn allowed(status: u16, value: &Value) -> bool {
    !(status == 401 || status == 403)
        || !matches!(
            value["code"].as_str(),
            Some("unauthenticated" | "forbidden")
        )
}

#[test]
fn every_route_is_refused_without_credentials_and_without_a_grant_and_allowed_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path(), "");
    let member = resources(&server);
    let nobody = key(&server, "nobody", &[]);
    let tester = key(&server, "tester", &[]);
    let doc = call_as(&server.url, None, "GET", "/v1/openapi.json", None).1;
    let mut checked = 0;
    // Deletions last: they remove what the other routes act on.
    let mut operations: Vec<(String, String, Value)> = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let permission = operation["x-tidewater-permission"].clone();
            operations.push((method.to_uppercase(), template.clone(), permission));
        }
    }
    operations.sort_by_key(|(method, path, _)| (method == "DELETE", path.clone()));
    for (method, template, permission) in operations {
        let path = concrete(&template, &member);
        let what = format!("{method} {template}");
        let anonymous = call_as(&server.url, None, &method, &path, None);
        if permission == json!("open") {
            assert!(
                (200..300).contains(&anonymous.0),
                "{what} is open: {anonymous:?}"
            );
            checked += 1;
            continue;
        }
        if let Some(kind) = permission["list"].as_str() {
            // Anyone may list; the reply holds only what they may describe.
            let (status, value) = call_as(&server.url, Some(&nobody), &method, &path, None);
            assert_eq!(status, 200, "{what}: {value}");
            let items = value
                .as_object()
                .unwrap()
                .values()
                .find_map(Value::as_array);
            if kind != "cluster" {
                assert_eq!(items.map(Vec::len), Some(0), "{what} shows nobody {value}");
            }
            checked += 1;
            continue;
        }
        let op = permission["operation"]
            .as_str()
            .unwrap_or_else(|| panic!("{what} has no permission: {permission}"));
        let resource = permission["resource"].as_str().unwrap();
        let name = match resource {
            "cluster" => "",
            "queue" => "q",
            "stream" => "s",
            "group" => "g",
            "subscription" => "s/sub",
            "hook" => "h",
            "push" => "p",
            other => panic!("{what}: resource {other}"),
        };
        assert_eq!(
            (anonymous.0, anonymous.1["code"].as_str()),
            (401, Some("unauthenticated")),
            "{what} without credentials: {:?}",
            anonymous.1
        );
        let denied = call_as(&server.url, Some(&nobody), &method, &path, None);
        assert_eq!(
            (denied.0, denied.1["code"].as_str()),
            (403, Some("forbidden")),
            "{what} without a grant: {:?}",
            denied.1
        );
        let id = grant(&server, "tester", resource, name, &[op]);
        let with = call_as(&server.url, Some(&tester), &method, &path, None);
        assert!(
            allowed(with.0, &with.1),
            "{what} with {op} on {resource} '{name}': {with:?}"
        );
        revoke_grant(&server, &id);
        let after = call_as(&server.url, Some(&tester), &method, &path, None);
        assert_eq!(
            after.0, 403,
            "{what} after the grant was revoked: {:?}",
            after.1
        );
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} operations in the document");
}

/// Reads frames from a raw binary connection until one answers `request_id`, or an error
/// that ends the connection (request id 0) comes, or the connection closes (None).
fn read_reply(
    stream: &mut std::net::TcpStream,
    buf: &mut Vec<u8>,
    request_id: u32,
) -> Option<Frame> {
    loop {
        while let Ok(Some((frame, id, used))) = decode_frame(buf, DEFAULT_MAX_FRAME) {
            buf.drain(..used);
            if id == request_id || (id == 0 && matches!(frame, Frame::Error { .. })) {
                return Some(frame);
            }
        }
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A binary connection that said Hello with `token`; the Hello's answer.
fn hello(addr: &str, token: Option<&str>) -> (std::net::TcpStream, Vec<u8>, Option<Frame>) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    Frame::Hello {
        version: PROTOCOL_VERSION,
        client: "auth-test".into(),
        credentials: token.unwrap_or_default().into(),
    }
    .encode(1, &mut out);
    stream.write_all(&out).unwrap();
    let mut buf = Vec::new();
    let reply = read_reply(&mut stream, &mut buf, 1);
    (stream, buf, reply)
}

fn request(
    stream: &mut std::net::TcpStream,
    buf: &mut Vec<u8>,
    frame: &Frame,
    id: u32,
) -> Option<Frame> {
    let mut out = Vec::new();
    frame.encode(id, &mut out);
    stream.write_all(&out).unwrap();
    read_reply(stream, buf, id)
}

fn code(frame: &Option<Frame>) -> Option<&str> {
    match frame {
        Some(Frame::Error { code, .. }) => Some(code),
        _ => None,
    }
}

/// (operation, resource kind, name).
type Need = (&'static str, &'static str, &'static str);

/// Every request frame a client sends, with what it needs.
fn binary_requests() -> Vec<(Frame, Vec<Need>)> {
    let mut receipts = Receipts::default();
    receipts.push("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    vec![
        (
            Frame::Produce {
                queue: "q".into(),
                ack: Ack::Durable,
                batch: vec![],
            },
            vec![("produce", "queue", "q")],
        ),
        (
            Frame::Subscribe {
                queue: "q".into(),
                lease_ms: 0,
                credit: 0,
            },
            vec![("consume", "queue", "q")],
        ),
        (
            Frame::Subscribe {
                queue: "s/sub".into(),
                lease_ms: 0,
                credit: 0,
            },
            vec![("consume", "subscription", "s/sub")],
        ),
        (
            Frame::Ack {
                queue: "q".into(),
                receipts: receipts.clone(),
            },
            vec![("consume", "queue", "q")],
        ),
        (
            Frame::Nack {
                queue: "q".into(),
                delay_ms: -1,
                error: String::new(),
                receipts: receipts.clone(),
                overloaded: false,
            },
            vec![("consume", "queue", "q")],
        ),
        (
            Frame::Extend {
                queue: "q".into(),
                lease_ms: 1000,
                receipts,
            },
            vec![("consume", "queue", "q")],
        ),
        (
            Frame::StreamProduce {
                stream: "s".into(),
                partition: 0,
                ack: Ack::Durable,
                batch: vec![],
            },
            vec![("produce", "stream", "s")],
        ),
        (
            Frame::Fetch {
                wait_ms: 0,
                max_bytes: 1 << 20,
                partitions: vec![FetchPartition {
                    stream: "s".into(),
                    partition: 0,
                    offset: 0,
                    max_bytes: 1 << 20,
                }],
            },
            vec![("consume", "stream", "s")],
        ),
        (
            Frame::ListOffset {
                stream: "s".into(),
                partition: 0,
                at: -1,
            },
            vec![("describe", "stream", "s")],
        ),
        (
            Frame::StreamMetadata { stream: "s".into() },
            vec![("describe", "stream", "s")],
        ),
        (
            Frame::JoinGroup {
                group: "g".into(),
                instance: String::new(),
                session_timeout_ms: 10_000,
                streams: vec!["s".into()],
            },
            vec![("consume", "group", "g"), ("consume", "stream", "s")],
        ),
        (
            Frame::Heartbeat {
                group: "g".into(),
                member: "nobody".into(),
                owned: vec![],
            },
            vec![("consume", "group", "g")],
        ),
        (
            Frame::LeaveGroup {
                group: "g".into(),
                member: "nobody".into(),
            },
            vec![("consume", "group", "g")],
        ),
        (
            Frame::Commit {
                group: "g".into(),
                member: String::new(),
                offsets: vec![CommitOffset {
                    stream: "s".into(),
                    partition: 0,
                    offset: 0,
                    metadata: String::new(),
                }],
            },
            vec![("consume", "group", "g")],
        ),
        (
            Frame::FetchCommitted {
                group: "g".into(),
                partitions: vec![StreamPartition {
                    stream: "s".into(),
                    partition: 0,
                }],
            },
            vec![("describe", "group", "g")],
        ),
    ]
}

#[test]
fn every_binary_request_is_refused_without_credentials_and_without_a_grant_and_allowed_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path(), "");
    resources(&server);
    let nobody = key(&server, "nobody", &[]);
    let tester = key(&server, "tester", &[]);
    // A bad token ends the connection at Hello.
    let (_, _, reply) = hello(&server.protocol, Some("twnobody.wrong-secret"));
    assert_eq!(code(&reply), Some("unauthenticated"), "{reply:?}");
    for (n, (frame, needs)) in binary_requests().into_iter().enumerate() {
        let id = 10 + n as u32;
        let (mut anon, mut anon_buf, reply) = hello(&server.protocol, None);
        assert!(matches!(reply, Some(Frame::HelloOk { .. })), "{reply:?}");
        let reply = request(&mut anon, &mut anon_buf, &frame, id);
        assert_eq!(
            code(&reply),
            Some("unauthenticated"),
            "{frame:?} anonymous: {reply:?}"
        );
        let (mut denied, mut denied_buf, _) = hello(&server.protocol, Some(&nobody));
        let reply = request(&mut denied, &mut denied_buf, &frame, id);
        assert_eq!(
            code(&reply),
            Some("forbidden"),
            "{frame:?} without a grant: {reply:?}"
        );
        // Each grant it needs, but one, is not enough; all of them are.
        let mut ids = Vec::new();
        for (i, (op, resource, name)) in needs.iter().enumerate() {
            let (mut conn, mut buf, _) = hello(&server.protocol, Some(&tester));
            let reply = request(&mut conn, &mut buf, &frame, id);
            assert_eq!(
                code(&reply),
                Some("forbidden"),
                "{frame:?} with {i} of {} grants: {reply:?}",
                needs.len()
            );
            ids.push(grant(&server, "tester", resource, name, &[op]));
        }
        let (mut conn, mut buf, _) = hello(&server.protocol, Some(&tester));
        let reply = request(&mut conn, &mut buf, &frame, id);
        assert!(
            !matches!(code(&reply), Some("unauthenticated" | "forbidden")),
            "{frame:?} with its grants: {reply:?}"
        );
        for id in ids {
            revoke_grant(&server, &id);
        }
    }
}

#[test]
fn tenants_come_from_identity_unless_granted_set_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path(), "");
    admin(&server, "PUT", "/v1/queues/q", Some(json!({})));
    let worker = key(&server, "worker", &[]);
    let gateway = key(&server, "gateway", &[]);
    grant(&server, "worker", "queue", "q", &["produce", "describe"]);
    grant(&server, "gateway", "queue", "q", &["produce", "set_tenant"]);
    let publish = |token: &str, body: Value| {
        call_as(
            &server.url,
            Some(token),
            "POST",
            "/v1/queues/q/messages",
            Some(&body),
        )
    };
    // Its own tenant, implicitly or by name.
    assert_eq!(
        publish(&worker, json!({"messages": [{"body": "a"}]})).0,
        200
    );
    assert_eq!(
        publish(
            &worker,
            json!({"messages": [{"body": "b"}], "tenant": "worker"})
        )
        .0,
        200
    );
    // Another tenant: refused, in the body or per message, and nothing is stored.
    for body in [
        json!({"messages": [{"body": "c"}], "tenant": "acme"}),
        json!({"messages": [{"body": "c", "tenant": "acme"}]}),
    ] {
        let (status, value) = publish(&worker, body);
        assert_eq!(
            (status, value["code"].as_str()),
            (403, Some("forbidden")),
            "{value}"
        );
    }
    assert_eq!(
        publish(
            &gateway,
            json!({"messages": [{"body": "d", "tenant": "acme"}]})
        )
        .0,
        200
    );
    // Over the binary protocol: a record naming another tenant is refused without the
    // grant.
    let batch = |tenant: Option<&str>| {
        let mut builder = tidewater_storage::BatchBuilder::new(0, 0);
        builder.push(&tidewater_storage::NewRecord {
            id: b"x",
            generated_id: true,
            headers: tenant
                .map(|t| vec![(&b"tidewater-tenant"[..], t.as_bytes())])
                .unwrap_or_default(),
            body: b"e",
            ..Default::default()
        });
        builder.finish()
    };
    // A record naming no tenant counts against the principal's.
    for (token, tenant, refused) in [
        (&worker, Some("acme"), true),
        (&worker, Some("worker"), false),
        (&gateway, Some("acme"), false),
        (&worker, None, false),
    ] {
        let (mut conn, mut buf, _) = hello(&server.protocol, Some(token));
        let produce = Frame::Produce {
            queue: "q".into(),
            ack: Ack::Durable,
            batch: batch(tenant),
        };
        let reply = request(&mut conn, &mut buf, &produce, 7);
        assert_eq!(
            code(&reply) == Some("forbidden"),
            refused,
            "{tenant:?}: {reply:?}"
        );
        if !refused {
            assert!(matches!(reply, Some(Frame::Produced { .. })), "{reply:?}");
        }
    }
    // Streams: a record naming another tenant (subscriptions would count it there).
    admin(
        &server,
        "PUT",
        "/v1/streams/s",
        Some(json!({"partitions": 1})),
    );
    grant(&server, "worker", "stream", "s", &["produce"]);
    grant(
        &server,
        "gateway",
        "stream",
        "s",
        &["produce", "set_tenant"],
    );
    let produce = |token: &str, tenant: &str| {
        let body = json!({"records": [{"value": "v", "headers": {"tidewater-tenant": tenant}}]});
        call_as(
            &server.url,
            Some(token),
            "POST",
            "/v1/streams/s/records",
            Some(&body),
        )
        .0
    };
    assert_eq!(produce(&worker, "acme"), 403);
    assert_eq!(produce(&worker, "worker"), 200);
    assert_eq!(produce(&gateway, "acme"), 200);
    let peek = admin(&server, "GET", "/v1/queues/q/messages?max=10", None);
    let tenants: Vec<&str> = peek["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["headers"]["tidewater-tenant"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        tenants,
        ["worker", "worker", "acme", "worker", "acme", "worker"],
        "{peek}"
    );
}

#[test]
fn a_revoked_key_stops_working_on_an_open_connection_and_keys_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = secured(dir.path(), "");
    admin(&server, "PUT", "/v1/queues/q", Some(json!({})));
    let worker = key(&server, "worker", &[]);
    grant(&server, "worker", "queue", "q", &["consume"]);
    // Keys and grants are durable.
    server.kill_and_restart();
    let (mut conn, mut buf, reply) = hello(&server.protocol, Some(&worker));
    assert!(matches!(reply, Some(Frame::HelloOk { .. })), "{reply:?}");
    let subscribe = Frame::Subscribe {
        queue: "q".into(),
        lease_ms: 0,
        credit: 10,
    };
    let reply = request(&mut conn, &mut buf, &subscribe, 5);
    assert!(matches!(reply, Some(Frame::Subscribed { .. })), "{reply:?}");
    // Revoked while the connection is open and idle: it is told and closed within the
    // recheck interval (1 s).
    let keys = admin(&server, "GET", "/v1/auth/keys", None);
    let id = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["principal"] == "worker")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    admin(&server, "DELETE", &format!("/v1/auth/keys/{id}"), None);
    let end = read_reply(&mut conn, &mut buf, 0);
    assert_eq!(code(&end), Some("unauthenticated"), "{end:?}");
    assert!(
        read_reply(&mut conn, &mut buf, 0).is_none(),
        "the connection stays open"
    );
    let (status, _) = call_as(&server.url, Some(&worker), "GET", "/v1/queues/q", None);
    assert_eq!(status, 401);
}

#[test]
fn failed_attempts_are_limited_per_address_and_no_secret_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path(), "failed_burst = 3\nfailed_refill_ms = 600000\n");
    let worker = key(&server, "worker", &[]);
    let wrong = format!("{}.not-the-secret", worker.split_once('.').unwrap().0);
    for _ in 0..3 {
        let (status, value) = call_as(&server.url, Some(&wrong), "GET", "/v1/queues", None);
        assert_eq!(
            (status, value["code"].as_str()),
            (401, Some("unauthenticated"))
        );
    }
    // Past the burst: refused with a time to retry, the right secret too.
    let (status, value) = call_as(&server.url, Some(&worker), "GET", "/v1/queues", None);
    assert_eq!(status, 401, "{value}");
    assert!(value["retry_after_ms"].as_u64().unwrap() > 0, "{value}");
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("authentication failed"), "{log}");
    for token in [ADMIN, worker.as_str()] {
        let secret = token.split_once('.').unwrap().1;
        assert!(!log.contains(secret), "a secret in the log:\n{log}");
    }
}

#[test]
fn a_receipt_is_settled_only_by_the_principal_it_was_delivered_to_or_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path(), "");
    admin(&server, "PUT", "/v1/queues/q", Some(json!({})));
    admin(
        &server,
        "POST",
        "/v1/queues/q/messages",
        Some(json!({"messages": [{"body": "a"}, {"body": "b"}, {"body": "c"}]})),
    );
    let alice = key(&server, "alice", &["workers"]);
    let bob = key(&server, "bob", &["workers"]);
    admin(
        &server,
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"role": "workers", "resource": "queue", "name": "q", "operations": ["consume"]}),
        ),
    );
    let (status, got) = call_as(
        &server.url,
        Some(&alice),
        "POST",
        "/v1/queues/q/receive",
        Some(&json!({"max": 2})),
    );
    assert_eq!(status, 200, "{got}");
    let receipts: Vec<String> = got["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["receipt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(receipts.len(), 2);
    let ack = |token: &str, receipts: &[&str]| {
        call_as(
            &server.url,
            Some(token),
            "POST",
            "/v1/queues/q/ack",
            Some(&json!({ "receipts": receipts })),
        )
    };
    // bob holds alice's receipt (and its bare form): refused per receipt, nothing settled.
    let bare = receipts[0].rsplit_once('.').unwrap().0;
    let (status, reply) = ack(&bob, &[&receipts[0], bare]);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["ok"], 0, "{reply}");
    let codes: Vec<&str> = reply["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["forbidden", "forbidden"], "{reply}");
    assert_eq!(reply["failed"][0]["receipt"], receipts[0].as_str());
    // alice settles her own; an admin of the queue may settle anyone's.
    let (_, reply) = ack(&alice, &[&receipts[0]]);
    assert_eq!(
        (
            reply["ok"].as_u64(),
            reply["failed"].as_array().map(Vec::len)
        ),
        (Some(1), Some(0)),
        "{reply}"
    );
    let (_, reply) = ack(ADMIN, &[&receipts[1]]);
    assert_eq!(reply["ok"], 1, "{reply}");

    // Over the binary protocol: alice's delivery, bob's ack refused at its index.
    let (mut conn, mut buf, _) = hello(&server.protocol, Some(&alice));
    let subscribe = Frame::Subscribe {
        queue: "q".into(),
        lease_ms: 0,
        credit: 1,
    };
    assert!(matches!(
        request(&mut conn, &mut buf, &subscribe, 2),
        Some(Frame::Subscribed { .. })
    ));
    let receipt = loop {
        match decode_frame(&buf, DEFAULT_MAX_FRAME) {
            Ok(Some((Frame::Deliver { deliveries }, _, used))) => {
                buf.drain(..used);
                break deliveries[0].receipt.clone();
            }
            Ok(Some((_, _, used))) => {
                buf.drain(..used);
            }
            _ => {
                let mut chunk = [0u8; 4096];
                let n = conn.read(&mut chunk).unwrap();
                assert!(n > 0, "closed before a delivery");
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    };
    let (mut other, mut other_buf, _) = hello(&server.protocol, Some(&bob));
    let mut receipts = Receipts::default();
    receipts.push(&receipt);
    let reply = request(
        &mut other,
        &mut other_buf,
        &Frame::Ack {
            queue: "q".into(),
            receipts: receipts.clone(),
        },
        3,
    );
    match reply {
        Some(Frame::Settled { ok, failed }) => {
            assert_eq!(ok, 0);
            assert_eq!(failed.len(), 1);
            assert_eq!((failed[0].index, failed[0].code.as_str()), (0, "forbidden"));
        }
        other => panic!("{other:?}"),
    }
    let reply = request(
        &mut conn,
        &mut buf,
        &Frame::Ack {
            queue: "q".into(),
            receipts,
        },
        4,
    );
    assert!(
        matches!(reply, Some(Frame::Settled { ok: 1, .. })),
        "{reply:?}"
    );
}

#[test]
fn the_audit_file_records_admin_operations_key_changes_denials_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let server = secured(dir.path(), &format!("audit_file = {audit:?}\n"));
    admin(&server, "PUT", "/v1/queues/q", Some(json!({})));
    let worker = key(&server, "worker", &[]);
    let (status, _) = call_as(&server.url, Some(&worker), "DELETE", "/v1/queues/q", None);
    assert_eq!(status, 403);
    let (status, _) = call_as(
        &server.url,
        Some("twnobody.wrong-secret"),
        "GET",
        "/v1/queues",
        None,
    );
    assert_eq!(status, 401);
    let text = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |message: &str| {
        events
            .iter()
            .find(|e| e["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no '{message}' in the audit file:\n{text}"))
            .clone()
    };
    let op = find("admin operation");
    assert_eq!(
        (
            op["fields"]["principal"].as_str(),
            op["fields"]["method"].as_str(),
            op["fields"]["path"].as_str()
        ),
        (Some("admin"), Some("PUT"), Some("/v1/queues/q"))
    );
    assert_eq!(find("admin change")["fields"]["action"], "key.create");
    let denied = find("request denied");
    assert_eq!(denied["fields"]["principal"], "worker");
    assert!(
        denied["fields"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1")
    );
    assert_eq!(find("authentication failed")["fields"]["key"], "twnobody");
    for secret in [ADMIN, worker.as_str()] {
        assert!(
            !text.contains(secret.split_once('.').unwrap().1),
            "a secret in the audit file"
        );
    }
}

#[test]
fn jwt_bearer_tokens_from_an_identity_providers_keys_name_the_principal() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let dir = tempfile::tempdir().unwrap();
    // The provider's signing key (ES256) and its JWKS, as an identity provider publishes it.
    let signing = rcgen::KeyPair::generate().unwrap();
    let point = signing.public_key_raw();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "idp-1", "alg": "ES256", "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let server = secured(
        dir.path(),
        &format!(
            "[auth.jwt]\njwks_file = {jwks_file:?}\nissuer = \"https://idp.example\"\naudience = \"tidewater\"\ntenant_claim = \"org\"\nroles_claim = \"groups\"\n"
        ),
    );
    admin(&server, "PUT", "/v1/queues/q", Some(json!({})));
    let key = jsonwebtoken::EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = |claims: Value| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("idp-1".into());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let good = token(json!({"sub": "carol", "org": "acme", "groups": ["readers"],
        "iss": "https://idp.example", "aud": "tidewater", "exp": now + 600}));
    let (status, me) = call_as(&server.url, Some(&good), "GET", "/v1/auth/whoami", None);
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (
            me["principal"].as_str(),
            me["tenant"].as_str(),
            me["roles"][0].as_str()
        ),
        (Some("carol"), Some("acme"), Some("readers"))
    );
    assert_eq!(
        call_as(&server.url, Some(&good), "GET", "/v1/queues/q", None).0,
        403
    );
    admin(
        &server,
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"role": "readers", "resource": "queue", "name": "q", "operations": ["describe"]}),
        ),
    );
    assert_eq!(
        call_as(&server.url, Some(&good), "GET", "/v1/queues/q", None).0,
        200
    );
    // Expired, another audience, another issuer: refused.
    for claims in [
        json!({"sub": "carol", "iss": "https://idp.example", "aud": "tidewater", "exp": now - 600}),
        json!({"sub": "carol", "iss": "https://idp.example", "aud": "other", "exp": now + 600}),
        json!({"sub": "carol", "iss": "https://evil.example", "aud": "tidewater", "exp": now + 600}),
    ] {
        let (status, reply) = call_as(
            &server.url,
            Some(&token(claims.clone())),
            "GET",
            "/v1/queues/q",
            None,
        );
        assert_eq!(status, 401, "{claims}: {reply}");
        // Says what is wrong with the token, not with an API key.
        let message = reply["message"].as_str().unwrap_or_default();
        let says = if claims["exp"].as_i64() < Some(now) {
            "the token has expired"
        } else {
            "invalid token"
        };
        assert!(message.contains(says), "{claims}: {reply}");
    }
    // The binary protocol takes it in Hello.
    let (mut conn, mut buf, reply) = hello(&server.protocol, Some(&good));
    assert!(matches!(reply, Some(Frame::HelloOk { .. })), "{reply:?}");
    let reply = request(
        &mut conn,
        &mut buf,
        &Frame::StreamMetadata { stream: "s".into() },
        2,
    );
    assert_eq!(code(&reply), Some("forbidden"));
}

/// A bootstrap key from the environment is made at the first start only: revoked, it does
/// not come back when the server restarts with the variable still set.
#[test]
fn a_revoked_bootstrap_key_stays_revoked_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = secured(dir.path(), "");
    admin(&server, "DELETE", "/v1/auth/keys/twadmin", None);
    assert_eq!(
        call_as(&server.url, Some(ADMIN), "GET", "/v1/auth/whoami", None).0,
        401
    );
    server.restart();
    assert_eq!(
        call_as(&server.url, Some(ADMIN), "GET", "/v1/auth/whoami", None).0,
        401,
        "the revoked bootstrap key came back"
    );
}

/// An identity provider rotates its keys: the JWKS saved over the file is in force after
/// SIGHUP (`systemctl reload`), with no restart; a file that does not load leaves the keys
/// in force, and says why in the log.
#[test]
fn a_rotated_jwks_is_taken_on_sighup_and_a_bad_one_keeps_the_keys_in_force() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let dir = tempfile::tempdir().unwrap();
    let jwks = |signing: &rcgen::KeyPair, kid: &str| {
        let point = signing.public_key_raw();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])}]})
        .to_string()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = |signing: &rcgen::KeyPair, kid: &str| {
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes()).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &json!({"sub": "carol", "exp": now + 600}), &key).unwrap()
    };
    let (old, new) = (
        rcgen::KeyPair::generate().unwrap(),
        rcgen::KeyPair::generate().unwrap(),
    );
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&old, "idp-1")).unwrap();
    // SIGHUP only: no check for changes that could race the test.
    let server = secured(
        dir.path(),
        &format!("[auth.jwt]\njwks_file = {jwks_file:?}\nreload_check_ms = 0\n"),
    );
    let whoami = |t: &str| call_as(&server.url, Some(t), "GET", "/v1/auth/whoami", None).0;
    let (old_token, new_token) = (token(&old, "idp-1"), token(&new, "idp-2"));
    assert_eq!(whoami(&old_token), 200);
    assert_eq!(whoami(&new_token), 401);

    let log = dir.path().join("server.log");
    let hangup_until = |what: &str, times: usize| {
        // SAFETY: a signal to the child this test started.
        assert_eq!(
            unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches(what).count() >= times {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no '{what}' in the log: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // The provider's new JWKS, saved over the file: in force after SIGHUP.
    std::fs::write(&jwks_file, jwks(&new, "idp-2")).unwrap();
    hangup_until("JWKS reloaded", 1);
    assert_eq!(whoami(&new_token), 200);
    assert_eq!(whoami(&old_token), 401, "the key the provider removed");
    // A half-written file: the keys in force stay, and the log says why.
    std::fs::write(&jwks_file, "{\"keys\": [").unwrap();
    let text = hangup_until("JWKS reload failed", 1);
    assert!(text.contains("jwks.json"), "{text}");
    assert_eq!(whoami(&new_token), 200);
}

/// A request refused before its body was read (401 here) still has its body read: a
/// client that sends the body after the headers gets the answer and keeps its connection
/// for the next request. The connection used to close at once: the client met a broken
/// pipe writing the body, and a pooled connection failed the next request (a flaky test).
#[test]
fn a_refused_request_with_a_body_keeps_its_connection() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = secured(dir.path(), "");
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let body = vec![b' '; 200_000];
    write!(
        conn,
        "POST /v1/queues/q/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    // The headers alone reach the server first, as a client writing them apart sends them.
    std::thread::sleep(std::time::Duration::from_millis(200));
    conn.write_all(&body)
        .expect("the body is read, not refused by a closed connection");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("HTTP/1.1 200") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        text.contains("HTTP/1.1 200"),
        "the next request on the connection: {text}"
    );
    // The same for a path that does not exist (404) and a method a path does not take
    // (405, or 403 when authentication finds no permission for it first).
    for (line, status) in [
        ("POST /v1/nowhere", "HTTP/1.1 404"),
        ("PATCH /v1/queues/q", "HTTP/1.1 40"),
    ] {
        write!(
            conn,
            "{line} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        conn.write_all(&body).expect("the body is read");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        while String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() < 2 {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(status), "{line}: {text}");
        assert!(text.contains("HTTP/1.1 200"), "{line}, then: {text}");
    }
}
