//! Push endpoints through a real server: durable across a restart, from a queue and from a
//! stream subscription, and from the command line. (Receivers with failures, Retry-After,
//! a 30 s outage and the rate limit are in tests/edges/test_push.py, whose signatures the
//! `standardwebhooks` reference library checks.)

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::run;
use crate::support::Server;

/// A request the receiver got: its headers (lower-case names) and body.
type Got = (HashMap<String, String>, Vec<u8>);

/// An HTTP/1.1 receiver on a thread that answers 200 to every POST and keeps them.
fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/in", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let keep = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut headers = HashMap::new();
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let text = line.trim_end();
                        if text.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = text.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let n: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; n];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    keep.lock().unwrap().push((headers, body));
                    if writer
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, got)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const ALLOW_LOOPBACK: &str = "[push]\nallow = [\"127.0.0.1\"]\n";

#[test]
fn push_endpoints_survive_a_restart_and_push_subscriptions_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), Some(ALLOW_LOOPBACK));
    let (url, got) = receiver();
    server.create_queue("emails", json!({}));
    server.ok("PUT", "/v1/streams/orders", Some(json!({"partitions": 2})));
    server.ok(
        "PUT",
        "/v1/streams/orders/subscriptions/billing",
        Some(json!({})),
    );
    let created = server.ok(
        "PUT",
        "/v1/pushes/mailer",
        Some(json!({"source": {"queue": "emails"}, "url": url})),
    );
    let secret = created["secret"].as_str().unwrap().to_string();
    server.ok(
        "PUT",
        "/v1/pushes/billing",
        Some(json!({"source": {"subscription": "orders/billing"}, "url": url, "format": "json", "batch": 10})),
    );
    server.restart();
    let info = server.ok("GET", "/v1/pushes/mailer", None);
    assert_eq!(info["config"]["url"], url.as_str());
    assert_eq!(
        info["config"]["secret_fingerprint"],
        tidewater_core::hook::fingerprint(&secret)
    );
    server.publish(
        "emails",
        json!([{"body": "hello", "id": "e1"}, {"body": "again", "id": "e2"}]),
    );
    server.ok(
        "POST",
        "/v1/streams/orders/records",
        Some(json!({"records": [{"key": "k1", "value": "o1"}, {"key": "k2", "value": "o2"}, {"key": "k3", "value": "o3"}]})),
    );
    wait_for("2 emails and 3 orders", || {
        let got = got.lock().unwrap();
        let emails = got
            .iter()
            .filter(|(h, _)| h["tidewater-source"] == "emails")
            .count();
        let orders: usize = got
            .iter()
            .filter(|(h, _)| h["tidewater-source"] == "orders/billing")
            .map(|(_, b)| {
                serde_json::from_slice::<Value>(b).unwrap()["messages"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .sum();
        emails == 2 && orders == 3
    });
    let got = got.lock().unwrap();
    let email = got
        .iter()
        .find(|(h, _)| h.get("webhook-id").map(String::as_str) == Some("e1"))
        .unwrap();
    assert_eq!(email.1, b"hello");
    assert!(email.0["webhook-signature"].starts_with("v1,"));
    wait_for("the subscription settled", || {
        server.ok("GET", "/v1/streams/orders/subscriptions/billing", None)["stats"]["total"] == 0
    });
    server.ok("DELETE", "/v1/pushes/billing", None);
    server.restart();
    server.err("GET", "/v1/pushes/billing", None, 404, "push_not_found");
    assert_eq!(
        server.ok("GET", "/v1/pushes", None)["pushes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn push_endpoints_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some(ALLOW_LOOPBACK));
    let (url, got) = receiver();
    server.create_queue("emails", json!({}));
    let (code, out, err) = run(
        &server,
        &[
            "push",
            "create",
            "mailer",
            "--queue",
            "emails",
            "--url",
            &url,
            "--concurrency",
            "2",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("signing secret (shown once") && out.contains("whsec_"),
        "{out}"
    );
    let (code, _, err) = run(
        &server,
        &["push", "create", "other", "--queue", "emails"],
        None,
    );
    assert_eq!(code, 2, "--url is required: {err}");
    let (code, _, err) = run(
        &server,
        &[
            "push", "create", "bad", "--queue", "emails", "--url", "ftp://x/",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("https://"), "{err}");
    server.publish("emails", json!([{"body": "hi"}]));
    wait_for("the push", || got.lock().unwrap().len() == 1);
    wait_for("the ack", || server.stats("emails")["total"] == 0);
    let (code, out, _) = run(&server, &["push", "list"], None);
    assert_eq!(code, 0);
    let row = out
        .lines()
        .find(|l| l.starts_with("mailer"))
        .unwrap_or_default();
    assert!(
        row.contains("queue emails") && row.contains("closed") && row.contains("2xx 1"),
        "{out}"
    );
    let (code, out, _) = run(&server, &["push", "stats", "mailer"], None);
    assert_eq!(code, 0);
    assert!(out.contains("1 delivered in 1 requests"), "{out}");
    let (code, out, err) = run(
        &server,
        &[
            "push",
            "config",
            "mailer",
            "--set",
            "breaker.open_ms=5000",
            "--timeout-ms",
            "2000",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("whsec_"),
        "the secret is never shown again: {out}"
    );
    let (code, out, _) = run(&server, &["--json", "push", "config", "mailer"], None);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["config"]["breaker"]["open_ms"], 5000);
    assert_eq!(shown["config"]["timeout_ms"], 2000);
    let (code, _, _) = run(&server, &["push", "delete", "mailer"], None);
    assert_eq!(code, 0);
    let (code, _, _) = run(&server, &["push", "stats", "mailer"], None);
    assert_eq!(code, 3);
}

#[test]
fn a_failed_push_names_no_url_in_the_message_history() {
    // A URL's path may hold a token (Slack's incoming webhooks): errors kept with the
    // message (and logged) must not carry it.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some(ALLOW_LOOPBACK));
    server.create_queue("alerts-dlq", json!({}));
    server.create_queue(
        "alerts",
        json!({"max_deliveries": 1, "dead_letter_queue": "alerts-dlq"}),
    );
    let closed = crate::support::free_port();
    server.ok(
        "PUT",
        "/v1/pushes/slack",
        Some(json!({"source": {"queue": "alerts"}, "url": format!("http://127.0.0.1:{closed}/services/T000/B000/s3cr3tT0k3n")})),
    );
    server.publish("alerts", json!([{"body": "disk full"}]));
    wait_for("the dead letter", || {
        !server.peek_all("alerts-dlq").is_empty()
    });
    let dead = &server.peek_all("alerts-dlq")[0];
    let error = dead["headers"]["tidewater-last-error"].as_str().unwrap();
    assert!(error.starts_with("push: "), "{error}");
    assert!(!error.contains("s3cr3tT0k3n"), "{error}");
}
