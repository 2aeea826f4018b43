//! Flow-control policies through every surface: CLI `queue config`, HTTP, the binary
//! protocol's nack reason, /metrics, and a restart. Exact behaviour under a manual clock
//! is in crates/core/tests/policies.rs; here nothing depends on timing.

use std::time::Duration;

use serde_json::{Value, json};
use tidewater_client::{Client, ClientOptions, ConsumerOptions, Message, ProducerOptions};

use crate::binary::runtime;
use crate::cli::run;
use crate::support::{Server, metrics_text, receipts};

#[test]
fn dispatch_rate_and_ttl_from_the_cli_survive_restart_and_show_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None);
    let (code, _, err) = run(
        &server,
        &[
            "queue",
            "create",
            "mail",
            "--set",
            "dispatch_rate.per_s=0.01",
            "--set",
            "dispatch_rate.burst=3",
            "--set",
            "ttl_ms=600000",
            "--set",
            "on_expire=dead_letter",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&server, &["queue", "config", "mail", "--json"], None);
    assert_eq!(code, 0);
    let config: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(config["dispatch_rate"], json!({"per_s": 0.01, "burst": 3}));
    assert_eq!(
        (config["ttl_ms"].as_u64(), config["on_expire"].as_str()),
        (Some(600_000), Some("dead_letter"))
    );

    let messages: Vec<Value> = (0..10).map(|i| json!({"body": format!("m{i}")})).collect();
    server.publish("mail", json!(messages));
    // The burst goes at once; the next delivery conforms only in 100 s.
    assert_eq!(server.receive("mail", 10, 0, None).len(), 3);
    assert!(server.receive("mail", 10, 0, None).is_empty());
    assert_eq!(server.stats("mail")["dispatch_rate_per_s"], json!(0.01));
    assert!(
        metrics_text(&server.url)
            .contains("tidewater_queue_dispatch_rate_per_second{queue=\"mail\"} 0.01"),
        "rate gauge missing"
    );
    let (code, out, _) = run(&server, &["queue", "stats", "mail"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("dispatch_rate_per_s") && out.contains("ttl_expired"),
        "{out}"
    );

    server.restart();
    let config = server.ok("GET", "/v1/queues/mail", None)["config"].clone();
    assert_eq!(config["dispatch_rate"]["burst"], 3, "persisted");
    let (code, _, err) = run(
        &server,
        &["queue", "config", "mail", "--unset", "dispatch_rate"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(server.stats("mail").get("dispatch_rate_per_s").is_none());
    assert_eq!(
        server.receive("mail", 10, 0, None).len(),
        10,
        "unlimited now; leases were lost in the restart"
    );

    // Bad values are refused with the field named, and a bad --set is a usage error.
    let err = server.err(
        "PUT",
        "/v1/queues/mail",
        Some(json!({"ttl_ms": 0})),
        400,
        "invalid_config",
    );
    assert!(err["message"].as_str().unwrap().contains("ttl_ms"));
    let (code, _, err) = run(
        &server,
        &["queue", "config", "mail", "--set", "ttl_ms"],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("FIELD=VALUE"), "{err}");
}

#[test]
fn overloaded_nacks_slow_an_adaptive_queue_over_http_and_binary() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue(
        "api",
        json!({"adaptive": {"min_per_s": 1, "max_per_s": 1000}, "dispatch_rate": {"per_s": 1000, "burst": 100}}),
    );
    let messages: Vec<Value> = (0..20).map(|i| json!({"body": format!("m{i}")})).collect();
    server.publish("api", json!(messages));
    let got = server.receive("api", 2, 0, Some(60_000));
    let receipts = receipts(&got);
    server.err(
        "POST",
        "/v1/queues/api/nack",
        Some(json!({"receipts": [receipts[0]], "reason": "tired"})),
        400,
        "invalid_request",
    );
    server.ok(
        "POST",
        "/v1/queues/api/nack",
        Some(json!({"receipts": [receipts[0]], "reason": "overloaded", "delay_ms": 0})),
    );
    let stats = server.stats("api");
    assert_eq!(
        (
            stats["dispatch_rate_per_s"].as_f64(),
            stats["throttle_cuts"].as_u64()
        ),
        (Some(500.0), Some(1))
    );

    // The same signal through the binary protocol (cuts are at most one a second, so
    // wait for the second one on the broker's own counter).
    runtime().block_on(async {
        let client = Client::new(&server.protocol, ClientOptions::default());
        client
            .producer("api", ProducerOptions::default())
            .send(Message::new("x"))
            .await
            .unwrap();
        let mut consumer = client.consumer("api", ConsumerOptions::default());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.stats("api")["throttle_cuts"].as_u64() < Some(2) {
            assert!(std::time::Instant::now() < deadline, "no second cut");
            let delivery = consumer.next().await.unwrap().unwrap();
            assert!(
                consumer
                    .nack_overloaded(&delivery, Some(Duration::ZERO))
                    .await
                    .unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        consumer.close().await;
    });
    assert_eq!(
        server.stats("api")["dispatch_rate_per_s"].as_f64(),
        Some(250.0)
    );
    assert!(metrics_text(&server.url).contains("tidewater_throttle_cuts_total{queue=\"api\"} 2"));
}

#[test]
fn quotas_refuse_per_tenant_with_429_and_count_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue(
        "events",
        json!({"quota": {"msgs_per_s": 0.01, "burst_msgs": 2}}),
    );
    let path = "/v1/queues/events/messages";
    let batch =
        |tenant: &str| json!({"tenant": tenant, "messages": [{"body": "a"}, {"body": "b"}]});
    server.ok("POST", path, Some(batch("noisy")));
    let err = server.err("POST", path, Some(batch("noisy")), 429, "quota_exceeded");
    // Two tokens at 0.01/s: 200 s less the moments since (exact figures: core tests).
    let wait = err["retry_after_ms"].as_u64().unwrap();
    assert!((190_000..=200_000).contains(&wait), "{wait}");
    server.ok("POST", path, Some(batch("quiet")));
    // A message may name its own tenant, overriding the request's.
    server.err(
        "POST",
        path,
        Some(json!({"tenant": "fresh", "messages": [{"body": "c", "tenant": "noisy"}]})),
        429,
        "quota_exceeded",
    );
    server.err(
        "POST",
        path,
        Some(json!({"messages": [{"body": "c", "tenant": ""}]})),
        400,
        "invalid_message",
    );
    let info = server.ok("GET", "/v1/queues/events", None);
    assert_eq!(info["quota_refused"], json!({"noisy": 2}));
    let metrics = metrics_text(&server.url);
    assert!(
        metrics.contains("tidewater_quota_refused_total{queue=\"events\",tenant=\"noisy\"} 2"),
        "per-tenant refusals missing"
    );
    // The stored message carries its tenant for consumers (and for fairness).
    let got = server.receive("events", 1, 0, None);
    assert_eq!(got[0]["headers"]["tidewater-tenant"], "noisy");
}

#[test]
fn duplicates_are_marked_over_http_and_dropped_on_the_binary_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None);
    server.create_queue("orders", json!({}));
    let path = "/v1/queues/orders/messages";
    let reply = server.ok(
        "POST",
        path,
        Some(json!({"messages": [{"body": "a", "id": "order-1"}]})),
    );
    assert_eq!(reply["duplicates"], json!([]));
    let reply = server.ok(
        "POST",
        path,
        Some(json!({"messages": [{"body": "b", "id": "order-2"}, {"body": "a again", "id": "order-1"}]})),
    );
    assert_eq!(
        (reply["ids"].clone(), reply["duplicates"].clone()),
        (json!(["order-2", "order-1"]), json!([1]))
    );
    server.kill_and_restart();
    runtime().block_on(async {
        let client = Client::new(&server.protocol, ClientOptions::default());
        let producer = client.producer("orders", ProducerOptions::default());
        // Same ids again, after a crash, through the binary protocol: acknowledged.
        let sends: Vec<_> = ["order-1", "order-3", "order-2"]
            .iter()
            .map(|id| producer.send(Message::new("x").with_id(*id)))
            .collect();
        for send in sends {
            send.await.unwrap();
        }
    });
    let stats = server.stats("orders");
    assert_eq!(
        (stats["total"].as_u64(), stats["deduplicated"].as_u64()),
        (Some(3), Some(2))
    );
    let bodies: Vec<String> = server
        .peek_all("orders")
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bodies, ["a", "b", "x"], "only order-3 was new");
}

#[test]
fn priorities_fairness_and_coalescing_through_cli_http_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    let (code, _, err) = run(
        &server,
        &[
            "queue",
            "create",
            "mixed",
            "--set",
            "priority_levels=2",
            "--set",
            "priority_min_share=0",
            "--set",
            r#"fairness={"by": "tenant"}"#,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let path = "/v1/queues/mixed/messages";
    server.ok(
        "POST",
        path,
        Some(
            json!({"tenant": "big", "messages": [{"body": "b1"}, {"body": "b2"}, {"body": "b3"}]}),
        ),
    );
    server.ok(
        "POST",
        path,
        Some(json!({"tenant": "small", "messages": [{"body": "s1"}]})),
    );
    runtime().block_on(async {
        let client = Client::new(&server.protocol, ClientOptions::default());
        client
            .producer("mixed", ProducerOptions::default())
            .send(Message::new("urgent").with_priority(1).with_tenant("big"))
            .await
            .unwrap();
    });
    let stats = server.stats("mixed");
    assert_eq!(
        stats["waiting_by_priority"],
        json!([0, 0]),
        "sorted only when receives scan"
    );
    let bodies: Vec<String> = server
        .receive("mixed", 5, 0, None)
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    // Highest level first; then the two tenants alternate.
    assert_eq!(bodies, ["urgent", "b1", "s1", "b2", "b3"]);

    server.create_queue(
        "debounce",
        json!({"coalesce": {"window_ms": 60000, "mode": "merge"}}),
    );
    server.ok(
        "POST",
        "/v1/queues/debounce/messages",
        Some(json!({"messages": [{"body": "a", "key": "k"}, {"body": "b", "key": "k"}]})),
    );
    let stats = server.stats("debounce");
    assert_eq!(
        (
            stats["coalesce_windows"].as_u64(),
            stats["delayed"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert!(
        server.receive("debounce", 5, 0, None).is_empty(),
        "held for the window"
    );
    assert!(
        metrics_text(&server.url).contains("tidewater_coalesced_in_total{queue=\"debounce\"} 2")
    );
}

#[test]
fn long_delays_from_the_client_are_parked_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None);
    server.create_queue("reminders", json!({}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, ClientOptions::default());
        let producer = client.producer("reminders", ProducerOptions::default());
        let later =
            producer.send(Message::new("in two hours").with_delay(Duration::from_secs(7_200)));
        let now = producer.send(Message::new("now"));
        later.await.unwrap();
        now.await.unwrap();
    });
    let stats = server.stats("reminders");
    assert_eq!(
        (stats["total"].as_u64(), stats["parked"].as_u64()),
        (Some(2), Some(1))
    );
    server.kill_and_restart();
    let stats = server.stats("reminders");
    assert_eq!(
        (stats["total"].as_u64(), stats["parked"].as_u64()),
        (Some(2), Some(1))
    );
    let got = server.receive("reminders", 10, 0, None);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["body"], "now");
    // The delay log is not a queue.
    let queues = server.ok("GET", "/v1/queues", None);
    assert_eq!(queues["queues"].as_array().unwrap().len(), 1);
}

/// Where a queue's messages wait, by key: over HTTP (a key that is not UTF-8 by its
/// base64), as a CLI table, and nothing for a queue without the policies.
#[test]
fn the_busiest_keys_over_http_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("plain", json!({}));
    assert_eq!(
        server.ok("GET", "/v1/queues/plain/busiest", None),
        json!({"keys": null, "fair_by": null, "flows": null})
    );
    let (code, out, err) = run(&server, &["queue", "busiest", "plain"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("neither key_concurrency nor fairness"),
        "{out}"
    );

    server.create_queue("orders", json!({"key_concurrency": 1}));
    server.ok(
        "POST",
        "/v1/queues/orders/messages",
        Some(json!({"messages": [
            {"body": "1", "key": "customer-7"}, {"body": "2", "key": "customer-7"},
            {"body": "3", "key": "customer-7"}, {"body": "4", "key": "customer-9"}]})),
    );
    assert_eq!(server.receive("orders", 10, 0, None).len(), 2);
    let busiest = server.ok("GET", "/v1/queues/orders/busiest?limit=1", None);
    assert_eq!(
        busiest["keys"],
        json!([{"key": "customer-7", "key_base64": "Y3VzdG9tZXItNw==", "in_flight": 1, "waiting": 2}])
    );
    let err = server.err(
        "GET",
        "/v1/queues/orders/busiest?limit=0",
        None,
        400,
        "invalid_request",
    );
    assert!(err["message"].as_str().unwrap().contains("limit"), "{err}");
    let (code, out, err) = run(&server, &["queue", "busiest", "orders"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("KEY") && out.contains("customer-7"), "{out}");
    assert!(out.contains("customer-9"), "{out}");
}
