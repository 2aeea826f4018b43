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
    assert_eq!(server.stats("q")["acked"], 0);
    assert_eq!(server.stats("q")["depth"], 2, "{}", server.stats("q"));
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
