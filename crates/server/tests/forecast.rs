//! Backlog forecasts through a real server: the forecast and history routes of queues,
//! subscriptions and groups, consumers counted by name or connection, objectives from the
//! query, the figures in stats and `/metrics`, and the CLI. (The model's arithmetic is
//! tested in tidewater-core with simulated time; nothing here asserts a rate.)

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::run;
use crate::support::{Server, metrics_text, receipts};

const CONFIG: &str = "[forecast]\nsample_interval_ms = 100\nrate_window_ms = 1000\n";

/// Polls `path` until `done` holds (at most 20 s).
fn until(server: &Server, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let value = server.ok("GET", path, None);
        if done(&value) {
            return value;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{path}: {value}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn queues_subscriptions_and_groups_have_forecasts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(CONFIG));
    server.create_queue("orders", json!({}));
    let bodies: Vec<Value> = (0..100).map(|i| json!({"body": format!("o{i}")})).collect();
    server.publish("orders", json!(bodies));

    // Two named consumers, one of them twice, and one without a name: three.
    for consumer in ["w1", "w2", "w1"] {
        let got = server.ok(
            "POST",
            "/v1/queues/orders/receive",
            Some(json!({"max": 5, "consumer": consumer})),
        );
        let messages = got["messages"].as_array().unwrap().clone();
        server.ok(
            "POST",
            "/v1/queues/orders/ack",
            Some(json!({"receipts": receipts(&messages)})),
        );
    }
    server.ok("POST", "/v1/queues/orders/receive", Some(json!({"max": 5})));
    let reply = until(&server, "/v1/queues/orders/forecast", |v| {
        v["forecast"]["window_ms"].as_u64() > Some(0)
    });
    assert_eq!(reply["kind"], "queue");
    assert_eq!(reply["name"], "orders");
    let f = &reply["forecast"];
    assert_eq!(f["consumers"], 3, "{f}");
    assert_eq!(f["backlog"], 85, "{f}");
    assert_eq!(f["in_flight"], 5, "{f}");
    assert!(
        f["arrival_per_s"].is_number() && f["service_per_s"].is_number(),
        "{f}"
    );
    // Which, depends on when the samples fell (the rates are the core tests' business).
    assert!(
        ["draining", "growing", "stalled"].contains(&f["trend"].as_str().unwrap()),
        "{f}"
    );
    // The server's objectives, and others on request.
    assert_eq!(f["drain_target_ms"], 300_000);
    let f = server.ok(
        "GET",
        "/v1/queues/orders/forecast?drain_target_ms=1000&age_objective_ms=1",
        None,
    );
    assert_eq!(f["forecast"]["drain_target_ms"], 1000);
    assert_eq!(f["forecast"]["age_objective_breach_ms"], 0);
    // In the queue's stats, as the console and `queue stats` show it.
    let stats = server.stats("orders");
    assert_eq!(stats["forecast"]["backlog"], 85, "{stats}");

    // History: samples oldest first, with the rates between them.
    let history = until(&server, "/v1/queues/orders/history", |v| {
        v["samples"].as_array().is_some_and(|s| s.len() >= 2)
    });
    assert_eq!(history["interval_ms"], 100);
    let samples = history["samples"].as_array().unwrap();
    assert!(samples[0]["arrival_per_s"].is_null());
    assert!(samples[1]["arrival_per_s"].is_number());
    assert!(
        samples
            .windows(2)
            .all(|w| w[0]["at_ms"].as_i64() < w[1]["at_ms"].as_i64())
    );

    // Bad objectives, a name with a slash on a queue route, unknown subjects.
    for query in ["rate_window_ms=0", "drain_target_ms=x", "bogus=1"] {
        server.err(
            "GET",
            &format!("/v1/queues/orders/forecast?{query}"),
            None,
            400,
            "invalid_request",
        );
    }
    server.err(
        "GET",
        "/v1/queues/nope/forecast",
        None,
        404,
        "queue_not_found",
    );
    server.err(
        "GET",
        "/v1/queues/a%2Fb/forecast",
        None,
        404,
        "queue_not_found",
    );
    server.err(
        "GET",
        "/v1/groups/nope/forecast",
        None,
        404,
        "group_not_found",
    );

    // A subscription and a group.
    server.ok("PUT", "/v1/streams/events", Some(json!({"partitions": 1})));
    server.ok(
        "PUT",
        "/v1/streams/events/subscriptions/billing",
        Some(json!({})),
    );
    server.ok(
        "POST",
        "/v1/streams/events/records",
        Some(json!({"records": [{"value": "a"}, {"value": "b"}, {"value": "c"}]})),
    );
    server.ok(
        "POST",
        "/v1/streams/events/subscriptions/billing/receive",
        Some(json!({"max": 1, "consumer": "biller"})),
    );
    let sub = until(
        &server,
        "/v1/streams/events/subscriptions/billing/forecast",
        |v| v["forecast"]["backlog"] == 3,
    );
    assert_eq!(sub["kind"], "subscription");
    assert_eq!(sub["forecast"]["consumers"], 1);
    server.join_fetch_commit("readers", "events");
    let group = until(&server, "/v1/groups/readers/forecast", |v| {
        v["forecast"]["consumers"] == 1
    });
    assert_eq!(group["kind"], "group");
    assert!(group["forecast"]["backlog"].as_u64() < Some(3), "{group}");
    server.ok("GET", "/v1/groups/readers/history", None);

    // /metrics: the forecast's families, labelled by queue.
    until(&server, "/v1/queues/orders/forecast", |v| {
        v["forecast"]["consumers_needed"].is_number()
    });
    let metrics = metrics_text(&server.url);
    for family in [
        "tidewater_queue_arrival_rate{queue=\"orders\"}",
        "tidewater_queue_service_rate{queue=\"orders\"}",
        "tidewater_queue_consumers{queue=\"orders\"} 3",
        "tidewater_queue_consumers_needed{queue=\"orders\"}",
        "tidewater_queue_service_limited{queue=\"orders\"} 0",
        "tidewater_subscription_consumers{stream=\"events\",subscription=\"billing\"} 1",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }

    // The CLI: a table, and --json as the API answers.
    let (code, out, err) = run(&server, &["queue", "forecast", "orders"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("queue 'orders': "), "{out}");
    assert!(out.contains("consumers needed"), "{out}");
    let (code, out, err) = run(
        &server,
        &[
            "--json",
            "subscription",
            "forecast",
            "events/billing",
            "--drain-target-ms",
            "5000",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["forecast"]["drain_target_ms"], 5000);
    let (code, _, err) = run(&server, &["queue", "forecast", "nope"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("queue_not_found") || err.contains("nope"),
        "{err}"
    );
}
