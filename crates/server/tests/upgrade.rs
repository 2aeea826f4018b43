//! Data directories written by earlier builds open, and what they hold works unchanged.
//!
//! The fixtures were written by `tidewater` at commit c9bac48 (the last release before
//! streams; see ../fixtures/upgrade-c9bac48/README.md for the commands) and at 6bba711
//! (streams, groups, compaction; scripts/make-upgrade-fixture): `clean` was shut down with
//! SIGTERM (recovery reads a checkpoint), `killed` with SIGKILL after more work (recovery
//! also replays the journal).

use std::path::Path;

use serde_json::json;

use crate::support::Server;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of a fixture, served by this build.
fn open(fixture: &str) -> (tempfile::TempDir, Server) {
    open_from("upgrade-c9bac48", fixture)
}

fn open_from(release: &str, fixture: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(release)
            .join(fixture),
        &data,
    );
    let server = Server::start(&data, None);
    (dir, server)
}

fn ids(messages: &[serde_json::Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_data_directory_of_the_previous_release_opens_and_its_queues_work() {
    for (fixture, waiting) in [
        ("clean", vec!["o3", "o4", "o5"]),
        ("killed", vec!["o4", "o5", "o6"]),
    ] {
        let (_dir, mut server) = open(fixture);
        // The configuration as it was set.
        let orders = server.ok("GET", "/v1/queues/orders", None);
        assert_eq!(orders["config"]["max_deliveries"], 3, "{fixture}: {orders}");
        assert_eq!(server.stats("later")["total"], 1, "{fixture}");
        // What was acked stays acked; what was not comes, in order, with its fields.
        let got = server.receive("orders", 10, 0, None);
        assert_eq!(ids(&got), waiting, "{fixture}");
        if fixture == "clean" {
            assert_eq!(got[0]["body"], "three");
            assert_eq!(got[0]["headers"]["h"], "v");
        }
        let receipts: Vec<&str> = got.iter().map(|m| m["receipt"].as_str().unwrap()).collect();
        server.ok(
            "POST",
            "/v1/queues/orders/ack",
            Some(json!({"receipts": receipts})),
        );
        // New work lands next to the old, and streams come to an old directory too.
        server.publish("orders", json!([{"id": "n1", "body": "new"}]));
        server.ok("PUT", "/v1/streams/s", Some(json!({"partitions": 2})));
        server.ok(
            "POST",
            "/v1/streams/s/records",
            Some(json!({"records": [{"value": "v", "partition": 1}]})),
        );
        server.kill_and_restart();
        assert_eq!(
            ids(&server.receive("orders", 10, 0, None)),
            ["n1"],
            "{fixture}"
        );
        let info = server.ok("GET", "/v1/streams/s", None);
        assert_eq!(info["partitions"][1]["end_offset"], 1, "{fixture}: {info}");
    }
}

#[test]
fn a_data_directory_with_streams_groups_and_compaction_opens_and_works() {
    for (fixture, waiting, events) in [
        ("clean", vec!["o3", "o4"], 6),
        ("killed", vec!["o3", "o4", "o5"], 7),
    ] {
        let (_dir, mut server) = open_from("upgrade-6bba711", fixture);
        // The queue: o1 in the dead-letter queue with its history, o2 acked, the rest waiting.
        let dead = server.receive("orders-dlq", 10, 0, None);
        assert_eq!(ids(&dead), ["o1"], "{fixture}");
        assert_eq!(
            dead[0]["headers"]["tidewater-source-queue"], "orders",
            "{fixture}: {}",
            dead[0]
        );
        assert_eq!(
            ids(&server.receive("orders", 10, 0, None)),
            waiting,
            "{fixture}"
        );
        // The stream, its records and the group's commits.
        let info = server.ok("GET", "/v1/streams/events", None);
        let ends: u64 = info["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["end_offset"].as_u64().unwrap())
            .sum();
        assert_eq!(ends, events, "{fixture}: {info}");
        let group = server.ok("GET", "/v1/groups/g", None);
        let committed: u64 = group["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["committed"].as_u64().unwrap())
            .sum();
        assert_eq!(
            committed, 6,
            "{fixture}: every record of the first run: {group}"
        );
        // The compacted stream keeps its configuration and refuses keyless records.
        let table = server.ok("GET", "/v1/streams/table", None);
        assert_eq!(table["config"]["cleanup"], "compact", "{fixture}");
        let records = server.ok("GET", "/v1/streams/table/partitions/0/records", None);
        let values: Vec<serde_json::Value> = records["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"].clone())
            .collect();
        assert_eq!(
            values,
            [
                json!("x1"),
                json!("y1"),
                json!("x2"),
                serde_json::Value::Null
            ],
            "{fixture}"
        );
        server.err(
            "POST",
            "/v1/streams/table/records",
            Some(json!({"records": [{"value": "no key"}]})),
            400,
            "invalid_message",
        );
        // New work lands beside the old and survives a crash.
        server.publish("orders", json!([{"id": "n1", "body": "new"}]));
        server.ok(
            "POST",
            "/v1/streams/events/records",
            Some(json!({"records": [{"key": "k9", "value": "new"}]})),
        );
        server.kill_and_restart();
        let after = server.ok("GET", "/v1/streams/events", None);
        let ends_after: u64 = after["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["end_offset"].as_u64().unwrap())
            .sum();
        assert_eq!(ends_after, events + 1, "{fixture}");
        // A work-queue subscription over the old stream, from its start, delivers every
        // record once (and the tombstone of the old compacted stream, marked); it survives
        // a crash (the first checkpoint with a view is version 04).
        server.ok("PUT", "/v1/streams/events/subscriptions/work", None);
        server.ok("PUT", "/v1/streams/table/subscriptions/work", None);
        let mut delivered = 0;
        for _ in 0..20 {
            let got = server.ok(
                "POST",
                "/v1/streams/events/subscriptions/work/receive",
                Some(json!({"max": 100, "wait_ms": 50})),
            );
            let messages = got["messages"].as_array().unwrap();
            if messages.is_empty() {
                break;
            }
            delivered += messages.len() as u64;
            let receipts: Vec<&str> = messages
                .iter()
                .map(|m| m["receipt"].as_str().unwrap())
                .collect();
            server.ok(
                "POST",
                "/v1/streams/events/subscriptions/work/ack",
                Some(json!({"receipts": receipts})),
            );
        }
        assert_eq!(delivered, events + 1, "{fixture}");
        let table = server.ok(
            "POST",
            "/v1/streams/table/subscriptions/work/receive",
            Some(json!({"max": 100})),
        );
        let table = table["messages"].as_array().unwrap();
        assert_eq!(table.len(), 4, "{fixture}: {table:?}");
        assert_eq!(table[3]["headers"]["tidewater-tombstone"], "1", "{fixture}");
        server.kill_and_restart();
        let work = server.ok("GET", "/v1/streams/events/subscriptions/work", None);
        assert_eq!(work["stats"]["total"], 0, "{fixture}: {work}");
        let table = server.ok("GET", "/v1/streams/table/subscriptions/work", None);
        assert_eq!(
            table["stats"]["total"], 4,
            "{fixture}: leases are not durable: {table}"
        );
    }
}
