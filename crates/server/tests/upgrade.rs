//! Data directories written by the previous release open, and their queues work unchanged.
//!
//! The fixtures were written by `tidewater` at commit c9bac48 (the last release before
//! streams; see ../fixtures/upgrade-c9bac48/README.md for the commands): `clean` was shut
//! down with SIGTERM (recovery reads a checkpoint), `killed` with SIGKILL after more work
//! (recovery also replays the journal).

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
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/upgrade-c9bac48")
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
