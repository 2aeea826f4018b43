//! The CLI as a user runs it: real binary, real server.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use serde_json::{Value, json};

use crate::support::{BIN, Server};

pub fn run(server: &Server, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("TIDEWATER_SERVER", &server.url)
        .env("TIDEWATER_PROTOCOL_SERVER", &server.protocol)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn queue_publish_consume_and_dlq_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);

    let (code, out, err) = run(
        &server,
        &[
            "queue",
            "create",
            "tasks",
            "--max-deliveries",
            "1",
            "--lease-ms",
            "60000",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created queue 'tasks'"), "{out}");
    let (code, out, _) = run(&server, &["publish", "tasks", "alpha", "beta"], None);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "one id per message: {out}");
    let lines: String = (0..250).map(|i| format!("line {i}\n")).collect();
    let (code, out, _) = run(
        &server,
        &["publish", "tasks", "--batch", "100"],
        Some(&lines),
    );
    assert_eq!(code, 0);
    assert!(out.contains("published 250 messages"), "{out}");

    let (code, out, _) = run(&server, &["--json", "queue", "stats", "tasks"], None);
    assert_eq!(code, 0);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["stats"]["total"], 252);
    let (_, out, _) = run(&server, &["queue", "list"], None);
    assert!(out.starts_with("QUEUE") && out.contains("tasks"), "{out}");

    // A handler that fails on "beta": beta is nacked and (max_deliveries 1) dead-lettered.
    let (code, out, err) = run(
        &server,
        &[
            "consume",
            "tasks",
            "--max",
            "2",
            "--batch",
            "2",
            "--exec",
            "grep -qv beta",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alpha") && out.contains("beta"), "{out}");
    assert!(err.contains("1 acked, 1 nacked"), "{err}");
    let (code, out, _) = run(
        &server,
        &["--json", "consume", "tasks", "--max", "3", "--wait-ms", "0"],
        None,
    );
    assert_eq!(code, 0);
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["body"], "line 0");

    let (code, out, _) = run(&server, &["dlq", "list", "tasks-dlq"], None);
    assert_eq!(code, 0);
    assert!(out.contains("beta") && out.contains("tasks"), "{out}");
    // A dead-letter queue that no message reached yet is empty, not an error.
    server.create_queue("calm", json!({}));
    let (code, out, _) = run(&server, &["dlq", "list", "calm-dlq"], None);
    assert_eq!(code, 0);
    assert!(out.contains("is empty"), "{out}");
    let (code, _, _) = run(&server, &["dlq", "list", "no-such-dlq"], None);
    assert_eq!(code, 3, "a name no queue uses is still not found");
    let (code, out, err) = run(
        &server,
        &["dlq", "redrive", "tasks-dlq", "--rate", "100"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("moved 1"), "{out}");

    let (_, out, _) = run(&server, &["queue", "config", "tasks"], None);
    assert!(out.contains("lease_ms") && out.contains("60000"), "{out}");
    let (code, out, _) = run(&server, &["queue", "purge", "tasks"], None);
    assert_eq!(code, 0);
    assert!(out.contains("purged 248"), "{out}");
    let (code, _, _) = run(&server, &["queue", "delete", "tasks"], None);
    assert_eq!(code, 0);

    // Exit codes that mean something.
    let (code, _, err) = run(&server, &["queue", "stats", "tasks"], None);
    assert_eq!(code, 3, "not found: {err}");
    let (code, _, err) = run(&server, &["queue", "create", "x", "--lease-ms", "0"], None);
    assert_eq!(code, 2, "bad input: {err}");
    assert!(err.contains("lease_ms"), "{err}");
    server.create_queue("tiny", json!({"max_messages": 1}));
    server.publish("tiny", json!([{"body": "x"}]));
    let (code, _, err) = run(
        &server,
        &["publish", "tiny", "y", "--retry-for-s", "0"],
        None,
    );
    assert_eq!(code, 4, "refused by backpressure: {err}");
    let (code, _, err) = run(
        &server,
        &["--server", "http://127.0.0.1:9", "queue", "list"],
        None,
    );
    assert_eq!(code, 5, "unreachable: {err}");
    assert!(err.contains("tidewater serve"), "{err}");
    let (code, out, _) = run(&server, &["--help"], None);
    assert_eq!(code, 0);
    assert!(out.contains("serve") && out.contains("publish") && out.contains("consume"));
}

/// Runs the binary with its standard output a pipe nobody reads (`| head` after it exited).
fn run_with_closed_stdout(server: Option<&Server>, args: &[&str]) -> (ExitStatus, String) {
    let mut command = Command::new(BIN);
    if let Some(server) = server {
        command
            .env("TIDEWATER_SERVER", &server.url)
            .env("TIDEWATER_PROTOCOL_SERVER", &server.protocol);
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_standard_output_ends_every_command_quietly() {
    // `tidewater scenario all | head -1` used to panic (exit 101): println! on EPIPE.
    let (status, err) = run_with_closed_stdout(None, &["scenario", "all", "--small"]);
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let (status, err) = run_with_closed_stdout(None, &["--json", "scenario", "tenant-skew"]);
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("q", json!({}));
    for args in [&["queue", "list"][..], &["--json", "queue", "stats", "q"]] {
        let (status, err) = run_with_closed_stdout(Some(&server), args);
        assert_eq!(status.signal(), Some(libc::SIGPIPE), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
    // consume stops at the first message it cannot print, and gives that one back.
    server.publish("q", json!([{"body": "one"}, {"body": "two"}]));
    let (status, err) = run_with_closed_stdout(Some(&server), &["consume", "q", "--wait-ms", "0"]);
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
    // Given back after the pushes stopped: none of it came back to the exiting consumer
    // (it did when the nack went first, and stayed leased after the exit: a flaky CI run).
    let stats = server.stats("q");
    assert_eq!(stats["acked"], 0, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["depth"], 2, "{stats}");
}

#[test]
fn a_handler_that_does_not_read_its_message_does_not_kill_consume() {
    // SIGPIPE is not reset to SIG_DFL for the process (see client::write_stdout): the
    // handler's stdin is a pipe too, and a handler may exit without reading it.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("jobs", json!({}));
    let big = "x".repeat(512 * 1024); // far more than a pipe's buffer
    server.publish("jobs", json!([{"body": big}, {"body": big}]));
    let (code, _, err) = run(
        &server,
        &["consume", "jobs", "--wait-ms", "0", "--exec", "exit 0"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 acked, 0 nacked"), "{err}");
}

#[test]
fn publish_refusals_exit_4_with_the_real_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue(
        "metered",
        json!({"quota": {"msgs_per_s": 0.01, "burst_msgs": 1}}),
    );
    server.publish("metered", json!([{"body": "uses the burst"}]));
    let (code, _, err) = run(
        &server,
        &["publish", "metered", "over", "--retry-for-s", "0"],
        None,
    );
    assert_eq!(code, 4, "over quota is backpressure: {err}");
    assert!(
        err.contains("quota_exceeded") && err.contains("429") && !err.contains("500"),
        "{err}"
    );
    drop(server);

    // A full disk: 507 over HTTP, so 507 here too (it was labelled 429).
    let server = Server::start(
        &dir.path().join("full"),
        Some("[limits]\nmin_free_disk_bytes = 4611686018427387904\n"),
    );
    server.create_queue("q", json!({}));
    let (code, _, err) = run(&server, &["publish", "q", "x", "--retry-for-s", "0"], None);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("disk_full") && err.contains("507"), "{err}");
    let (code, _, err) = run(&server, &["publish", "nope", "x"], None);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("queue_not_found") && err.contains("404"),
        "{err}"
    );
}

#[test]
fn consume_from_an_unreachable_server_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), None);
    server.create_queue("q", json!({}));
    for json in [false, true] {
        let mut args = vec!["--protocol-server", "127.0.0.1:9", "consume", "q"];
        if json {
            args.insert(0, "--json");
        }
        let (code, out, err) = run(&server, &args, None);
        assert_eq!(code, 5, "unreachable: {out} {err}");
        assert!(!err.contains("consumed 0"), "{err}");
        assert!(err.contains("tidewater serve"), "{err}");
    }
    let (code, _, err) = run(
        &server,
        &["--protocol-server", "127.0.0.1:9", "publish", "q", "x"],
        None,
    );
    assert_eq!(code, 5, "{err}");
    // Reachable and empty is still fine; a server gone by the end is not.
    let (code, _, err) = run(&server, &["consume", "q", "--wait-ms", "0"], None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("consumed 0 messages"), "{err}");
    server.kill9();
    let (code, _, err) = run(&server, &["consume", "q", "--wait-ms", "0"], None);
    assert_eq!(code, 5, "{err}");
}

#[test]
fn server_logs_carry_no_colours_when_not_on_a_terminal() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path().join("data"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--protocol-listen",
            &format!("127.0.0.1:{}", crate::support::free_port()),
        ])
        .env("TIDEWATER_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !matches!(
        crate::support::call(&url, "GET", "/readyz", None),
        Ok((200, _))
    ) {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    child.wait().unwrap();
    assert!(log.contains("ready"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a piped log: {log:?}"
    );
}

#[test]
fn queue_config_set_merges_into_the_current_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue(
        "q",
        json!({"quota": {"msgs_per_s": 100, "burst_msgs": 50, "tenants": {"acme": {"msgs_per_s": 5}, "zeta": {"msgs_per_s": 7}}},
               "dispatch_rate": {"per_s": 10, "burst": 4}}),
    );
    let (code, _, err) = run(
        &server,
        &[
            "queue",
            "config",
            "q",
            "--set",
            "quota.msgs_per_s=200",
            "--set",
            "dispatch_rate.per_s=20",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let config = server.ok("GET", "/v1/queues/q", None)["config"].clone();
    assert_eq!(
        config["quota"],
        json!({"msgs_per_s": 200.0, "burst_msgs": 50, "tenants": {"acme": {"msgs_per_s": 5.0}, "zeta": {"msgs_per_s": 7.0}}}),
        "{config}"
    );
    assert_eq!(config["dispatch_rate"], json!({"per_s": 20.0, "burst": 4}));
    // A nested --unset removes the member; a top-level one turns the policy off.
    let (code, _, err) = run(
        &server,
        &[
            "queue",
            "config",
            "q",
            "--unset",
            "quota.tenants.acme",
            "--unset",
            "dispatch_rate",
            "--config",
            r#"{"quota": {"tenants": {"zeta": {"burst_msgs": 3}}}}"#,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let config = server.ok("GET", "/v1/queues/q", None)["config"].clone();
    assert_eq!(
        config["quota"],
        json!({"msgs_per_s": 200.0, "burst_msgs": 50, "tenants": {"zeta": {"msgs_per_s": 7.0, "burst_msgs": 3}}}),
        "{config}"
    );
    assert!(config["dispatch_rate"].is_null(), "{config}");
    // A policy that was off starts from nothing.
    let (code, _, err) = run(
        &server,
        &["queue", "config", "q", "--set", "coalesce.window_ms=50"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let config = server.ok("GET", "/v1/queues/q", None)["config"].clone();
    assert_eq!(config["coalesce"]["window_ms"], 50, "{config}");
    // `queue config` never creates a queue; `queue create` does.
    let (code, _, err) = run(
        &server,
        &["queue", "config", "nope", "--set", "lease_ms=5"],
        None,
    );
    assert_eq!(code, 3, "{err}");
    server.err("GET", "/v1/queues/nope", None, 404, "queue_not_found");
    let (code, _, err) = run(
        &server,
        &["queue", "create", "fresh", "--set", "dispatch_rate.per_s=5"],
        None,
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn publish_sets_tenant_priority_id_ttl_jitter_and_deliver_at() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("q", json!({"priority_levels": 3}));
    let (code, out, err) = run(
        &server,
        &[
            "publish",
            "q",
            "one",
            "two",
            "--tenant",
            "acme",
            "--priority",
            "2",
            "--ttl-ms",
            "60000",
            "--id",
            "order-1",
            "--id",
            "order-2",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["order-1", "order-2"]);
    let peeked = server.peek_all("q");
    assert_eq!(peeked.len(), 2);
    for (m, id) in peeked.iter().zip(["order-1", "order-2"]) {
        assert_eq!(m["id"], id);
        let h = &m["headers"];
        assert_eq!(h["tidewater-tenant"], "acme", "{m}");
        assert_eq!(h["tidewater-priority"], "2", "{m}");
        assert_eq!(h["tidewater-ttl-ms"], "60000", "{m}");
    }
    // The same id again is deduplicated: acknowledged, not enqueued.
    let (code, _, err) = run(&server, &["publish", "q", "again", "--id", "order-1"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(server.stats("q")["total"], 2);

    // deliver_at in the future and jitter: delayed, not deliverable now.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 3_600_000;
    let (code, _, err) = run(
        &server,
        &["publish", "q", "later", "--deliver-at", &later.to_string()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &server,
        &[
            "publish",
            "q",
            "spread-1",
            "spread-2",
            "--jitter-ms",
            "3600000",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(server.stats("q")["delayed"], 3, "{}", server.stats("q"));

    // Bad input is refused before anything is sent, with exit 2.
    for bad in [
        &["publish", "q", "a", "b", "--id", "only-one"][..],
        &["publish", "q", "a", "--tenant", ""],
        &["publish", "q", "a", "--ttl-ms", "0"],
        &["publish", "q", "a", "--priority", "256"],
        &["publish", "q", "a", "--delay-ms", "5", "--deliver-at", "5"],
    ] {
        let (code, _, err) = run(&server, bad, None);
        assert_eq!(code, 2, "{bad:?}: {err}");
    }
    let (code, _, err) = run(
        &server,
        &["publish", "q", "--id", "x", "--id", "y"],
        Some("l1\nl2\nl3\n"),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--id was given 2 times for 3 or more messages"),
        "{err}"
    );
    assert_eq!(server.stats("q")["total"], 5);
}

#[test]
fn consume_prints_labelled_columns_for_people_and_json_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("q", json!({}));
    server.publish(
        "q",
        json!([{"body": "first", "key": "k1", "id": "m-1"}, {"body": "two\nlines", "id": "m-2"}, {"body_base64": "AAE=", "id": "m-3"}]),
    );
    let (code, out, err) = run(&server, &["consume", "q", "--max", "3", "--nack"], None);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "a header and one line per message: {out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["ID", "DELIVERY", "KEY", "BODY"], "{out}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row, ["m-1", "1", "k1", "first"], "{out}");
    assert!(
        lines[2].starts_with("m-2")
            && lines[2].ends_with(r"two\nlines")
            && lines[2].contains(" - "),
        "{out}"
    );
    assert!(lines[3].ends_with("base64:AAE="), "{out}");
    // --json: one object per line, no header.
    server.create_queue("j", json!({}));
    server.publish("j", json!([{"body": "first"}, {"body_base64": "AAE="}]));
    let (code, out, err) = run(&server, &["--json", "consume", "j", "--max", "2"], None);
    assert_eq!(code, 0, "{err}");
    let got: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 2, "{out}");
    assert_eq!(got[0]["body"], "first");
    assert_eq!(got[1]["body_base64"], "AAE=");
}

#[test]
fn json_errors_are_one_json_object_on_standard_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("tiny", json!({"max_messages": 1}));
    server.publish("tiny", json!([{"body": "x"}]));
    let cases: [(&[&str], i32, &str); 7] = [
        (&["--json", "queue", "stats", "nope"], 3, "queue_not_found"),
        (
            &["--json", "publish", "tiny", "y", "--retry-for-s", "0"],
            4,
            "queue_full",
        ),
        (
            &["--json", "queue", "create", "x", "--lease-ms", "0"],
            2,
            "invalid_config",
        ),
        (
            &["--json", "--server", "http://127.0.0.1:9", "queue", "list"],
            5,
            "unreachable",
        ),
        (
            &[
                "--json",
                "--protocol-server",
                "127.0.0.1:9",
                "consume",
                "tiny",
            ],
            5,
            "unreachable",
        ),
        (
            &["--json", "publish", "tiny", "a", "b", "--id", "one"],
            2,
            "usage",
        ),
        // clap's own refusals too
        (&["--json", "queue", "create"], 2, "usage"),
    ];
    for (args, exit_code, code) in cases {
        let (got, out, err) = run(&server, args, None);
        assert_eq!(got, exit_code, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: errors never go to stdout: {out}");
        let error: Value = serde_json::from_str(err.trim())
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {err}"));
        assert_eq!(error["code"], code, "{args:?}: {error}");
        assert_eq!(error["exit_code"], exit_code, "{error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
    }
    let (_, _, err) = run(&server, &["--json", "queue", "stats", "nope"], None);
    assert_eq!(serde_json::from_str::<Value>(&err).unwrap()["status"], 404);
    // Help is not an error.
    let (code, out, _) = run(&server, &["--json", "--help"], None);
    assert_eq!(code, 0);
    assert!(out.contains("Usage"), "{out}");
}

/// Ctrl-C on `consume` dropped the acks of the messages it had handled (every one came back
/// when its lease expired): a signal now stops taking messages, then sends the acks and
/// releases what was prefetched.
#[test]
fn a_signal_stops_consume_without_losing_its_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("sig", json!({"lease_ms": 600000}));
    let messages: Vec<Value> = (0..40).map(|i| json!({"body": format!("m{i}")})).collect();
    server.publish("sig", json!(messages));
    let mut child = Command::new(BIN)
        .args(["consume", "sig", "--follow", "--exec", "cat > /dev/null"])
        .env("TIDEWATER_SERVER", &server.url)
        .env("TIDEWATER_PROTOCOL_SERVER", &server.protocol)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until every message was handled (printed), then interrupt.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.lines().filter(|l| l.contains(" m")).count() < 40 {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "consume ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("40 acked"), "{stderr}");
    let stats = server.stats("sig");
    assert_eq!(
        (stats["acked"].as_u64(), stats["in_flight"].as_u64()),
        (Some(40), Some(0)),
        "{stats}"
    );
}

/// A JSON line per record, as `fetch --json` prints them.
fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn streams_produce_and_fetch_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);

    let (code, out, err) = run(
        &server,
        &["stream", "create", "readings", "--partitions", "3"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("created stream 'readings'") && out.contains("partitions"),
        "{out}"
    );
    let (code, out, _) = run(&server, &["stream", "list"], None);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("STREAM") && out.contains("readings"),
        "{out}"
    );
    // Grow, set a field, show the configuration.
    let (code, out, err) = run(
        &server,
        &[
            "stream",
            "config",
            "readings",
            "--partitions",
            "4",
            "--set",
            "timestamp_type=create_time",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("updated stream 'readings'"), "{out}");
    let (_, out, _) = run(&server, &["--json", "stream", "config", "readings"], None);
    let config: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(config["partitions"], 4);
    let (code, _, err) = run(
        &server,
        &["stream", "config", "readings", "--partitions", "2"],
        None,
    );
    assert_eq!(code, 1, "shrinking is a conflict: {err}");
    assert!(err.contains("config_conflict"), "{err}");

    // stdin, one record per line, with a key and headers: one partition (the key's).
    let lines: String = (0..120).map(|i| format!("reading {i}\n")).collect();
    let (code, out, err) = run(
        &server,
        &[
            "--json",
            "produce",
            "readings",
            "--key",
            "sensor-17",
            "--header",
            "unit=C",
            "--header",
            "src=cli",
            "--batch",
            "50",
        ],
        Some(&lines),
    );
    assert_eq!(code, 0, "{err}");
    let produced: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(produced["produced"], 120);
    let offsets = produced["offsets"].as_array().unwrap();
    let p = offsets[0]["partition"].as_u64().unwrap();
    assert!(
        offsets.iter().all(|o| o["partition"] == p),
        "one key, one partition"
    );
    assert_eq!(offsets[119]["offset"], 119);
    // An argument to a chosen partition.
    let other = ((p + 1) % 4).to_string();
    let third = (p + 2) % 4;
    let (code, out, _) = run(
        &server,
        &[
            "produce",
            "readings",
            "tick",
            "--partition",
            &third.to_string(),
        ],
        None,
    );
    assert_eq!(code, 0);
    let said = format!("produced 1 record to 'readings': partition {third}, offset 0");
    assert!(out.contains(&said), "{out}");
    // A file (CRLF or LF; an empty line is an empty value).
    let file = dir.path().join("records.txt");
    std::fs::write(&file, "a\r\nb\n\nd").unwrap();
    let (code, out, err) = run(
        &server,
        &[
            "produce",
            "readings",
            "--file",
            file.to_str().unwrap(),
            "--partition",
            &other,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "produced 4 records to 'readings' (partition: {other})"
        )),
        "{out}"
    );

    // Every partition from the start: everything, each record with its partition.
    let (code, out, err) = run(
        &server,
        &["--json", "fetch", "readings", "--wait-ms", "0"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let all = json_lines(&out);
    assert_eq!(all.len(), 125, "{out}");
    let keyed: Vec<&Value> = all.iter().filter(|r| r["key"] == "sensor-17").collect();
    assert_eq!(keyed.len(), 120);
    assert!(keyed.iter().all(|r| r["partition"] == p));
    assert_eq!(keyed[7]["value"], "reading 7");
    assert_eq!(keyed[7]["headers"], json!({"unit": "C", "src": "cli"}));
    let offsets: Vec<u64> = keyed
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order");
    // One partition, for people: one value per line.
    let (code, out, _) = run(
        &server,
        &[
            "fetch",
            "readings",
            "--partition",
            &other,
            "--from",
            "1",
            "--wait-ms",
            "0",
        ],
        None,
    );
    assert_eq!(code, 0);
    assert_eq!(out, "b\n\nd\n");
    let (code, out, _) = run(
        &server,
        &[
            "fetch",
            "readings",
            "--partition",
            &p.to_string(),
            "--from",
            "earliest",
            "--max",
            "2",
            "--wait-ms",
            "0",
        ],
        None,
    );
    assert_eq!(code, 0);
    assert_eq!(out, "reading 0\nreading 1\n");
    let (code, out, _) = run(
        &server,
        &["fetch", "readings", "--from", "latest", "--wait-ms", "0"],
        None,
    );
    assert_eq!((code, out.as_str()), (0, ""));

    // --from a time: in each partition, the first record at or after it.
    server.ok("PUT", "/v1/streams/timed", Some(json!({"partitions": 2})));
    let base: i64 = 1_796_032_800_000; // 2026-11-30T10:00:00Z
    let records: Vec<Value> = (0..10)
        .map(|i| json!({"value": format!("t{i}"), "partition": i % 2, "timestamp": base + i * 60_000}))
        .collect();
    server.ok(
        "POST",
        "/v1/streams/timed/records",
        Some(json!({ "records": records })),
    );
    let (code, out, err) = run(
        &server,
        &[
            "--json",
            "fetch",
            "timed",
            "--from",
            "2026-11-30T11:05:30+01:00",
            "--wait-ms",
            "0",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let mut values: Vec<String> = json_lines(&out)
        .iter()
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    values.sort();
    assert_eq!(values, vec!["t6", "t7", "t8", "t9"]);
    let (code, out, _) = run(
        &server,
        &[
            "fetch",
            "timed",
            "--from",
            "2027-01-01T00:00:00Z",
            "--wait-ms",
            "0",
        ],
        None,
    );
    assert_eq!((code, out.as_str()), (0, ""), "every record is older");

    // Bad input and missing things get their exit codes.
    let cases: [(&[&str], i32, &str); 7] = [
        (&["stream", "stats", "nope"], 3, "stream_not_found"),
        (&["fetch", "nope"], 3, "stream_not_found"),
        (
            &["fetch", "timed", "--partition", "7"],
            3,
            "partition_not_found",
        ),
        (&["fetch", "timed", "--from", "yesterday"], 2, "RFC 3339"),
        (
            &["fetch", "timed", "--from", "2026-11-30T10:00:00"],
            2,
            "add Z for UTC",
        ),
        (&["produce", "nope", "x"], 3, "stream_not_found"),
        (
            &["produce", "timed", "x", "--header", "novalue"],
            2,
            "name=value",
        ),
    ];
    for (args, want, text) in cases {
        let (code, out, err) = run(&server, args, None);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }

    let (code, out, _) = run(&server, &["stream", "stats", "timed"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("PARTITION")
            && out.contains("START")
            && out.contains("BYTES")
            && out.contains("SEGMENTS")
            && out.contains("cleanup delete"),
        "{out}"
    );
    // A compacted stream from the command line: created so, and it refuses keyless records.
    let (code, json_out, err) = run(
        &server,
        &[
            "--json",
            "stream",
            "create",
            "prices",
            "--cleanup",
            "compact",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let created: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(created["config"]["cleanup"], "compact", "{json_out}");
    let (code, _, err) = run(&server, &["produce", "prices"], Some("no key\n"));
    assert_eq!(code, 2, "bad input (400): {err}");
    assert!(err.contains("needs one"), "{err}");
    // Values and a tombstone by key, read back as a table of keys.
    for args in [
        &["produce", "prices", "--key", "SKU-1", "9.99"][..],
        &["produce", "prices", "--key", "SKU-2", "4.50"],
        &["produce", "prices", "--key", "SKU-2", "--tombstone"],
    ] {
        let (code, _, err) = run(&server, args, None);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let (code, table_out, err) = run(&server, &["fetch", "prices", "--keys"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(table_out, "SKU-1\t9.99\nSKU-2\t4.50\nSKU-2\tnull\n");
    let (_, json_lines, _) = run(&server, &["--json", "fetch", "prices"], None);
    let last: Value = serde_json::from_str(json_lines.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["key"].as_str(), last.get("value")),
        (Some("SKU-2"), None),
        "{last}"
    );
    // Changing a stream that does not exist is an error, not a create.
    let (code, _, err) = run(
        &server,
        &["stream", "config", "typo", "--cleanup", "compact"],
        None,
    );
    assert_eq!(code, 3, "{err}");
    let (code, _, _) = run(&server, &["stream", "stats", "typo"], None);
    assert_eq!(code, 3, "nothing was created");
    assert_eq!(
        out.lines().count(),
        4,
        "a title, a header, two partitions: {out}"
    );
    let (code, out, _) = run(&server, &["stream", "delete", "timed"], None);
    assert_eq!(code, 0);
    assert!(out.contains("deleted stream 'timed'"), "{out}");
    let (code, _, _) = run(&server, &["stream", "delete", "timed"], None);
    assert_eq!(code, 3);
    let (_, out, _) = run(&server, &["--json", "stream", "list"], None);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["streams"].as_array().unwrap().len(), 2, "{list}");
}

/// `fetch --group`: each run continues where the group's last one stopped (it commits what
/// it printed, and only that: --max stops mid-batch); describe shows the lag; resets are a
/// dry run until --execute; delete.
#[test]
fn groups_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.ok("PUT", "/v1/streams/orders", Some(json!({"partitions": 2})));
    let lines: String = (0..10).map(|i| format!("o{i}\n")).collect();
    let (code, _, err) = run(
        &server,
        &["produce", "orders", "--partition", "0"],
        Some(&lines),
    );
    assert_eq!(code, 0, "{err}");
    let lines: String = (10..16).map(|i| format!("o{i}\n")).collect();
    let (code, _, err) = run(
        &server,
        &["produce", "orders", "--partition", "1"],
        Some(&lines),
    );
    assert_eq!(code, 0, "{err}");

    let fetch = |args: &[&str]| {
        let mut all = vec![
            "--json",
            "fetch",
            "orders",
            "--group",
            "billing",
            "--wait-ms",
            "0",
        ];
        all.extend_from_slice(args);
        let (code, out, err) = run(&server, &all, None);
        assert_eq!(code, 0, "{err}");
        json_lines(&out)
    };
    let first = fetch(&["--max", "5"]);
    assert_eq!(first.len(), 5);
    let second = fetch(&[]);
    assert_eq!(second.len(), 11, "the rest, nothing twice");
    let mut seen: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    seen.sort_by_key(|v| v[1..].parse::<u32>().unwrap());
    assert_eq!(seen, (0..16).map(|i| format!("o{i}")).collect::<Vec<_>>());
    assert!(fetch(&[]).is_empty(), "caught up");

    // Lag: two new records in partition 0.
    server.ok(
        "POST",
        "/v1/streams/orders/records",
        Some(
            json!({"records": [{"value": "n0", "partition": 0}, {"value": "n1", "partition": 0}]}),
        ),
    );
    let (code, out, _) = run(&server, &["group", "describe", "billing"], None);
    assert_eq!(code, 0);
    assert!(out.contains("has no active members"), "{out}");
    let header = out.lines().nth(1).unwrap();
    assert!(
        header.starts_with("STREAM")
            && header.contains("CURRENT-OFFSET  END-OFFSET  LAG  LAG-TIME  MEMBER"),
        "{out}"
    );
    let row = |out: &str, partition: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(partition) && l.starts_with("orders"))
            .unwrap_or_else(|| panic!("no row for partition {partition}: {out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row(&out, "0")[2..5], ["10", "12", "2"]);
    assert_eq!(row(&out, "1")[2..5], ["6", "6", "0"]);
    let (_, out, _) = run(&server, &["--json", "group", "describe", "billing"], None);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["offsets"][0]["lag"], 2);
    let (code, out, _) = run(&server, &["group", "list"], None);
    assert_eq!(code, 0);
    assert!(out.starts_with("GROUP") && out.contains("billing"), "{out}");
    let (_, out, _) = run(&server, &["--json", "group", "list"], None);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list["groups"][0]["group"], "billing",
        "the table's columns: {list}"
    );
    assert!(list["groups"][0]["lag"].is_u64(), "{list}");

    // Reset: a dry run by default, then --execute.
    let (code, out, err) = run(
        &server,
        &["group", "reset-offsets", "billing", "--to-earliest"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("NEW-OFFSET") && err.contains("dry run"),
        "{out}{err}"
    );
    assert_eq!(row(&out, "0")[2..4], ["10", "0"]);
    let (_, out, _) = run(&server, &["group", "describe", "billing"], None);
    assert_eq!(row(&out, "0")[2], "10", "a dry run changes nothing");
    let (code, out, err) = run(
        &server,
        &[
            "--json",
            "group",
            "reset-offsets",
            "billing",
            "--stream",
            "orders",
            "--shift-by",
            "-3",
            "--execute",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["dry_run"], false);
    assert_eq!(plan["offsets"][0]["to"], 7);
    assert_eq!(plan["offsets"][1]["to"], 3);
    let again = fetch(&[]);
    assert_eq!(again.len(), 5 + 3, "{again:?}");
    let cases: [(&[&str], i32, &str); 5] = [
        (&["group", "reset-offsets", "billing"], 2, "--to-earliest"),
        (
            &[
                "group",
                "reset-offsets",
                "billing",
                "--to-earliest",
                "--to-latest",
            ],
            2,
            "cannot be used",
        ),
        (
            &["group", "reset-offsets", "billing", "--to-datetime", "noon"],
            2,
            "RFC 3339",
        ),
        (
            &[
                "group",
                "reset-offsets",
                "billing",
                "--stream",
                "nope",
                "--to-latest",
            ],
            3,
            "stream_not_found",
        ),
        (&["group", "describe", "nobody"], 3, "group_not_found"),
    ];
    for (args, want, text) in cases {
        let (code, _, err) = run(&server, args, None);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
    }
    // A group with a member cannot be reset or deleted.
    let member = server.ok(
        "POST",
        "/v1/groups/billing/consumers",
        Some(json!({"streams": ["orders"]})),
    )["member"]
        .as_str()
        .unwrap()
        .to_string();
    for args in [
        &[
            "group",
            "reset-offsets",
            "billing",
            "--to-latest",
            "--execute",
        ][..],
        &["group", "delete", "billing"],
    ] {
        let (code, _, err) = run(&server, args, None);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("group_not_empty") && err.contains("409"),
            "{err}"
        );
    }
    server.ok(
        "DELETE",
        &format!("/v1/groups/billing/consumers/{member}"),
        None,
    );
    let (code, out, _) = run(&server, &["group", "delete", "billing"], None);
    assert_eq!(code, 0);
    assert!(out.contains("deleted group 'billing'"), "{out}");
    let (code, out, _) = run(&server, &["group", "list"], None);
    assert_eq!(code, 0);
    assert!(out.contains("no groups yet"), "{out}");
    // Without commits, --from applies: a new group starting at offset 9 of each partition.
    let from = fetch(&["--from", "9"]);
    let mut values: Vec<&str> = from.iter().map(|r| r["value"].as_str().unwrap()).collect();
    values.sort();
    assert_eq!(
        values,
        vec!["n0", "n1", "o9"],
        "partition 1 has 6 records: from its end"
    );
}

/// Ctrl-C on `fetch --group --follow` leaves the group (no member lingers until its
/// session times out) with what it printed committed; a refused produce exits 4.
#[test]
fn a_signal_ends_fetch_group_cleanly_and_refused_produces_exit_4() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.ok("PUT", "/v1/streams/s", Some(json!({"partitions": 2})));
    let records: Vec<Value> = (0..30).map(|i| json!({"value": format!("v{i}")})).collect();
    server.ok(
        "POST",
        "/v1/streams/s/records",
        Some(json!({ "records": records })),
    );
    let mut child = Command::new(BIN)
        .args(["fetch", "s", "--group", "live", "--follow"])
        .env("TIDEWATER_SERVER", &server.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.lines().count() < 30 {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "fetch ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // Printed, so committed (the commit follows the print): wait for it, then interrupt.
    let describe = || server.ok("GET", "/v1/groups/live", None);
    let committed = |info: &Value| -> u64 {
        info["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["committed"].as_u64().unwrap())
            .sum()
    };
    while committed(&describe()) < 30 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("fetched 30 records") && stderr.contains("signal"),
        "{stderr}"
    );
    let info = describe();
    assert_eq!(info["members"], json!([]), "it left: {info}");
    assert_eq!(committed(&info), 30);
    drop(server);

    let server = Server::start(
        &dir.path().join("full"),
        Some("[limits]\nmin_free_disk_bytes = 4611686018427387904\n"),
    );
    server.ok("PUT", "/v1/streams/s", Some(json!({"partitions": 1})));
    let (code, _, err) = run(&server, &["produce", "s", "x", "--retry-for-s", "0"], None);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("disk_full") && err.contains("507"), "{err}");
}

/// A newcomer's finding: lines from a pipe that stays open (`tail -f | tidewater produce`)
/// waited for a full batch of 500, and Ctrl-C lost them. Now a line goes out within the
/// linger, and a signal sends what was read, says so, and exits 0. The same signal sent
/// twice at once (as `timeout` does, to the process and its group) still stops cleanly.
#[test]
fn produce_from_an_open_pipe_sends_each_line_soon_and_a_signal_sends_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.ok("PUT", "/v1/streams/s", Some(json!({"partitions": 1})));
    let mut child = Command::new(BIN)
        .args(["produce", "s"])
        .env("TIDEWATER_SERVER", &server.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"one\ntwo\n").unwrap();
    let end = || {
        server.ok("GET", "/v1/streams/s", None)["partitions"][0]["end_offset"]
            .as_u64()
            .unwrap()
    };
    // The pipe stays open: the two lines must arrive anyway (no deadline but the test's).
    while end() < 2 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::io::Write::write_all(&mut stdin, b"three\n").unwrap();
    std::io::Write::flush(&mut stdin).unwrap();
    while end() < 3 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signals to our own child, twice at once.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("produced 3 records") && stdout.contains("signal"),
        "{stdout}"
    );
    let (code, values, _) = run(&server, &["fetch", "s", "--from", "earliest"], None);
    assert_eq!((code, values.as_str()), (0, "one\ntwo\nthree\n"));
}

/// A newcomer's finding: `fetch --group g | head -2` was ended by SIGPIPE still a member,
/// holding its partitions until its session timed out. It leaves the group first now
/// (committing nothing more).
#[test]
fn fetch_group_leaves_when_nobody_reads_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.ok("PUT", "/v1/streams/s", Some(json!({"partitions": 2})));
    let records: Vec<Value> = (0..20).map(|i| json!({"value": format!("v{i}")})).collect();
    server.ok(
        "POST",
        "/v1/streams/s/records",
        Some(json!({ "records": records })),
    );
    let (status, err) = run_with_closed_stdout(
        Some(&server),
        &["fetch", "s", "--group", "g", "--from", "earliest"],
    );
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
    // It left, and committed nothing: the group is gone.
    server.err("GET", "/v1/groups/g", None, 404, "group_not_found");
}

/// `stream create` on an existing stream changed it (grew its partitions, switched its
/// timestamp type) and said "updated"; as `kafka-topics --create`, it is refused now.
#[test]
fn stream_create_does_not_change_an_existing_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    let (code, _, err) = run(
        &server,
        &["stream", "create", "s", "--partitions", "2"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &server,
        &["stream", "create", "s", "--partitions", "4"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("exists") && err.contains("stream config"),
        "{err}"
    );
    let info = server.ok("GET", "/v1/streams/s", None);
    assert_eq!(info["config"]["partitions"], 2, "unchanged: {info}");
}

/// Subscriptions as a newcomer uses them: create one on a stream, consume it by
/// STREAM/SUBSCRIPTION, see its stats per partition, change it, purge and delete it.
#[test]
fn subscriptions_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    let (code, _, err) = run(
        &server,
        &["stream", "create", "orders", "--partitions", "2"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let lines: String = (0..20).map(|i| format!("order {i}\n")).collect();
    let (code, _, err) = run(&server, &["produce", "orders"], Some(&lines));
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(
        &server,
        &[
            "subscription",
            "create",
            "orders/billing",
            "--set",
            "key_concurrency=1",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("20 messages") && out.contains("tidewater consume orders/billing"),
        "{out}"
    );
    // A create of one that exists changes nothing and says how to change it.
    let (code, _, err) = run(&server, &["subscription", "create", "orders/billing"], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("subscription config"), "{err}");
    // Names are STREAM/SUBSCRIPTION; a missing one is 404 (exit 3).
    let (code, _, err) = run(&server, &["subscription", "stats", "billing"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("STREAM/SUBSCRIPTION"), "{err}");
    let (code, _, err) = run(&server, &["subscription", "stats", "orders/nope"], None);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = run(
        &server,
        &[
            "subscription",
            "create",
            "orders/late",
            "--start",
            "not-a-time",
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(
        &server,
        &["subscription", "create", "orders/late", "--start", "latest"],
        None,
    );
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = run(
        &server,
        &[
            "consume",
            "orders/billing",
            "--max",
            "20",
            "--wait-ms",
            "1000",
            "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let consumed = json_lines(&out);
    assert_eq!(consumed.len(), 20, "{out}");
    let (code, out, err) = run(&server, &["subscription", "stats", "orders/billing"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 to deliver") && out.contains("20 acked"),
        "{out}"
    );
    assert!(
        out.contains("PARTITION") && out.contains("FLOOR") && out.contains("PENDING"),
        "{out}"
    );
    let (code, out, err) = run(&server, &["subscription", "list"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("orders/billing") && out.contains("orders/late"),
        "{out}"
    );
    let (code, out, err) = run(&server, &["subscription", "list", "orders", "--json"], None);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["subscriptions"].as_array().unwrap().len(), 2);
    let (code, _, err) = run(
        &server,
        &[
            "subscription",
            "config",
            "orders/billing",
            "--set",
            "lease_ms=5000",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(
        &server,
        &["subscription", "config", "orders/billing", "--json"],
        None,
    );
    assert_eq!(code, 0);
    let config: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            config["lease_ms"].as_u64(),
            config["key_concurrency"].as_u64()
        ),
        (Some(5000), Some(1))
    );
    let (code, _, err) = run(
        &server,
        &[
            "subscription",
            "config",
            "orders/billing",
            "--set",
            "max_messages=5",
        ],
        None,
    );
    assert_eq!(code, 2, "invalid_config is a 400: {err}");
    run(&server, &["produce", "orders"], Some("one more\n"));
    let (code, out, err) = run(&server, &["subscription", "purge", "orders/late"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged 1"), "{out}");
    let (code, _, err) = run(&server, &["subscription", "delete", "orders/late"], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = run(&server, &["subscription", "stats", "orders/late"], None);
    assert_eq!(code, 3);
}
