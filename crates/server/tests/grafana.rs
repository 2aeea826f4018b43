//! deploy/grafana/tidewater.json is built only on tidewater's metrics: every metric a panel
//! queries is a family a real server exposes on /metrics, and every label a panel groups by
//! or names in a legend is a label of that family's series.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::support::{Server, metrics_text, receipts};

const DASHBOARD: &str = include_str!("../../../deploy/grafana/tidewater.json");

/// Family name -> the label names its series carry, from the text exposition.
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap();
            out.entry(name.to_string()).or_default();
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, labels) = match line.split_once('{') {
                Some((name, rest)) => (name, rest.split_once('}').unwrap().0),
                None => (line.split_whitespace().next().unwrap(), ""),
            };
            let family = out
                .keys()
                .filter(|f| series.starts_with(f.as_str()))
                .max_by_key(|f| f.len())
                .cloned()
                .unwrap_or_else(|| panic!("a series before its family: {line}"));
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let label = pair.split_once('=').unwrap().0;
                if label != "le" {
                    out.get_mut(&family).unwrap().insert(label.to_string());
                }
            }
        }
    }
    out
}

/// The metric names an expression reads (`tidewater_...`), and the labels it groups by.
fn reads(expr: &str) -> (Vec<String>, Vec<String>) {
    let mut metrics = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tidewater_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        metrics.push(name);
    }
    let mut by = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let inside = &rest[at + 4..];
        let end = inside.find(')').unwrap();
        by.extend(
            inside[..end]
                .split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| l != "le"),
        );
        rest = &inside[end..];
    }
    (metrics, by)
}

/// A series name's family: counters end in _total, histograms in _bucket/_sum/_count.
fn family_of(metric: &str, families: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    [
        metric,
        metric.trim_end_matches("_total"),
        metric.trim_end_matches("_bucket"),
        metric.trim_end_matches("_sum"),
        metric.trim_end_matches("_count"),
    ]
    .into_iter()
    .find(|name| families.contains_key(*name))
    .map(str::to_string)
}

#[test]
fn every_metric_and_label_the_dashboard_queries_exists() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    // Something of everything the dashboard draws: a queue with a refusal and a DLQ, a
    // stream with a subscription and a group that committed.
    server.create_queue("orders", json!({"max_messages": 2, "max_deliveries": 1}));
    server.publish("orders", json!([{"body": "a"}, {"body": "b"}]));
    server
        .try_call(
            "POST",
            "/v1/queues/orders/messages",
            Some(&json!({"messages": [{"body": "c"}]})),
        )
        .unwrap();
    let got = server.ok("POST", "/v1/queues/orders/receive", Some(json!({"max": 1})));
    let messages = got["messages"].as_array().unwrap().clone();
    server.ok(
        "POST",
        "/v1/queues/orders/nack",
        Some(json!({"receipts": receipts(&messages)})),
    );
    server.ok("PUT", "/v1/streams/events", Some(json!({"partitions": 1})));
    server.ok(
        "PUT",
        "/v1/streams/events/subscriptions/billing",
        Some(json!({})),
    );
    server.ok(
        "POST",
        "/v1/streams/events/records",
        Some(json!({"records": [{"value": "x"}]})),
    );
    server.join_fetch_commit("readers", "events");

    let families = families(&metrics_text(&server.url));
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
                target["legendFormat"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["definition"].as_str() {
            exprs.push(("variables".into(), query.into(), String::new()));
        }
    }
    assert!(exprs.len() >= 20, "{}", exprs.len());
    for (title, expr, legend) in &exprs {
        let (metrics, by) = reads(expr);
        assert!(
            !metrics.is_empty(),
            "{title}: {expr} reads no tidewater metric"
        );
        let mut labels: Vec<String> = by;
        let mut rest = legend.as_str();
        while let Some(at) = rest.find("{{") {
            let end = rest[at..].find("}}").unwrap();
            labels.push(rest[at + 2..at + end].trim().to_string());
            rest = &rest[at + end + 2..];
        }
        for metric in &metrics {
            let family = family_of(metric, &families)
                .unwrap_or_else(|| panic!("{title}: {metric} is not on /metrics"));
            let has = &families[&family];
            // Families without series here (no push endpoint) have nothing to check.
            if has.is_empty() {
                continue;
            }
            for label in &labels {
                assert!(
                    has.contains(label),
                    "{title}: {family} has no label '{label}' (it has {has:?})"
                );
            }
        }
    }
}
