//! Webhook hooks over HTTP: the ingress answers 2xx only once an event is durable, refuses
//! with a code and Retry-After otherwise, and a flood killed with SIGKILL mid-way loses no
//! event it acknowledged and stores none twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, agent, call_as, metrics_text};

const SECRET: &str = "It's a Secret to Everybody";

fn github_signature(secret: &str, body: &[u8]) -> String {
    tidewater_auth::webhook::sign_github(secret.as_bytes(), body)
}

/// The answer to one webhook: status, Retry-After (seconds), body.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

/// POSTs a GitHub-style delivery to hook `hook`.
fn send(
    agent: &ureq::Agent,
    base: &str,
    hook: &str,
    delivery: &str,
    secret: &str,
    body: &[u8],
) -> Result<Answer, String> {
    let signature = github_signature(secret, body);
    let response = agent
        .post(&format!("{base}/v1/hooks/{hook}"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", &signature)
        .send(body);
    let mut response = response.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let text = response
        .body_mut()
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    let body = serde_json::from_slice(&text).unwrap_or(Value::Null);
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

fn github_hook(server: &Server, hook: &str, queue: &str) {
    server.ok(
        "PUT",
        &format!("/v1/hooks/{hook}"),
        Some(json!({"target": {"queue": queue}, "signature": {"preset": "github", "secrets": [SECRET]}})),
    );
}

#[test]
fn webhooks_are_stored_once_refused_with_a_reason_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    server.create_queue("github", json!({"max_messages": 2}));
    server.err(
        "PUT",
        "/v1/hooks/gh",
        Some(json!({"target": {"queue": "nope"}, "signature": {"preset": "github", "secrets": [SECRET]}})),
        404,
        "queue_not_found",
    );
    server.err(
        "PUT",
        "/v1/hooks/gh",
        Some(json!({"target": {"queue": "github"}, "signature": {"preset": "github", "secret": SECRET}})),
        400,
        "invalid_config",
    );
    github_hook(&server, "gh", "github");
    let shown = server.ok("GET", "/v1/hooks/gh", None);
    assert!(!shown.to_string().contains(SECRET), "{shown}");

    let agent = agent();
    let body = br#"{"ref":"refs/heads/main"}"#;
    let first = send(&agent, &server.url, "gh", "d-1", SECRET, body).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body, json!({"id": "d-1", "duplicate": false}));
    let replay = send(&agent, &server.url, "gh", "d-1", SECRET, body).unwrap();
    assert_eq!(replay.body, json!({"id": "d-1", "duplicate": true}));
    let forged = send(&agent, &server.url, "gh", "d-2", "guess", body).unwrap();
    assert_eq!(forged.status, 401);
    assert_eq!(forged.body["code"], "invalid_signature");
    send(&agent, &server.url, "gh", "d-2", SECRET, body).unwrap();
    // The queue holds 2: the third is refused with Retry-After, not dropped.
    let full = send(&agent, &server.url, "gh", "d-3", SECRET, body).unwrap();
    assert_eq!(
        (full.status, full.body["code"].as_str()),
        (429, Some("queue_full"))
    );
    assert!(full.retry_after.is_some());
    let unknown = send(&agent, &server.url, "nohook", "d-4", SECRET, body).unwrap();
    assert_eq!(
        (unknown.status, unknown.body["code"].as_str()),
        (404, Some("hook_not_found"))
    );

    let messages = server.peek_all("github");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["body"], String::from_utf8_lossy(body).as_ref());
    assert_eq!(messages[0]["headers"]["x-github-delivery"], "d-1");
    assert_eq!(
        messages[0]["headers"]["x-hub-signature-256"],
        github_signature(SECRET, body)
    );

    let stats = server.ok("GET", "/v1/hooks/gh", None)["stats"].clone();
    assert_eq!(
        stats,
        json!({"accepted": 2, "duplicates": 1, "signature_failures": 1,
            "refused": {"invalid_signature": 1, "queue_full": 1}})
    );
    let metrics = metrics_text(&server.url);
    for line in [
        "tidewater_hook_accepted_total{hook=\"gh\"} 2",
        "tidewater_hook_duplicates_total{hook=\"gh\"} 1",
        "tidewater_hook_signature_failures_total{hook=\"gh\"} 1",
        "tidewater_hook_refused_total{hook=\"gh\",reason=\"queue_full\"} 1",
        "tidewater_hook_durable_seconds_count{hook=\"gh\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in /metrics");
    }
    let list = server.ok("GET", "/v1/hooks", None);
    assert_eq!(list["hooks"].as_array().map(Vec::len), Some(1));
    server.ok("DELETE", "/v1/hooks/gh", None);
    server.err("GET", "/v1/hooks/gh", None, 404, "hook_not_found");
}

#[test]
fn signed_hooks_need_no_credentials_when_auth_is_on_and_unsigned_ones_need_a_grant() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "twadmin0000000001.admin-secret-0123456789abcdefghij";
    let server = Server::start_env(
        dir.path(),
        Some({
            let path = dir.path().with_extension("toml");
            std::fs::write(&path, "[auth]\nenabled = true\n").unwrap();
            path
        }),
        &[("TIDEWATER_ADMIN_KEY", admin)],
    );
    let as_admin = |method: &str, path: &str, body: Option<Value>| {
        let (status, value) = call_as(&server.url, Some(admin), method, path, body.as_ref());
        assert!((200..300).contains(&status), "{method} {path}: {value}");
        value
    };
    as_admin("PUT", "/v1/queues/q", Some(json!({})));
    as_admin(
        "PUT",
        "/v1/hooks/gh",
        Some(
            json!({"target": {"queue": "q"}, "signature": {"preset": "github", "secrets": [SECRET]}}),
        ),
    );
    as_admin(
        "PUT",
        "/v1/hooks/open",
        Some(json!({"target": {"queue": "q"}, "signature": {"preset": "none"}})),
    );
    let agent = agent();
    let signed = send(&agent, &server.url, "gh", "d-1", SECRET, b"{}").unwrap();
    assert_eq!(signed.status, 200, "{}", signed.body);
    let forged = send(&agent, &server.url, "gh", "d-2", "guess", b"{}").unwrap();
    assert_eq!(forged.status, 401);
    let (status, value) = call_as(
        &server.url,
        None,
        "POST",
        "/v1/hooks/open",
        Some(&json!({})),
    );
    assert_eq!(
        (status, value["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let key = as_admin(
        "POST",
        "/v1/auth/keys",
        Some(json!({"principal": "sender"})),
    )["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = call_as(
        &server.url,
        Some(&key),
        "POST",
        "/v1/hooks/open",
        Some(&json!({})),
    );
    assert_eq!(status, 403);
    as_admin(
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"principal": "sender", "resource": "hook", "name": "open", "operations": ["produce"]}),
        ),
    );
    let (status, value) = call_as(
        &server.url,
        Some(&key),
        "POST",
        "/v1/hooks/open",
        Some(&json!({})),
    );
    assert_eq!(status, 200, "{value}");
    // Pointing a hook at a queue needs produce there.
    as_admin(
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"principal": "sender", "resource": "hook", "name": "mine", "operations": ["admin"]}),
        ),
    );
    let (status, value) = call_as(
        &server.url,
        Some(&key),
        "PUT",
        "/v1/hooks/mine",
        Some(&json!({"target": {"queue": "q"}, "signature": {"preset": "none"}})),
    );
    assert_eq!(
        (status, value["code"].as_str()),
        (403, Some("forbidden")),
        "{value}"
    );

    // An admin of a hook alone may tune it, not decide what reaches its target: who may
    // post (the signature) or the tenant events count against.
    as_admin(
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"principal": "sender", "resource": "hook", "name": "gh", "operations": ["admin"]}),
        ),
    );
    for (change, allowed) in [
        (json!({"headers": ["x-request-id"]}), true),
        (json!({"max_body_bytes": 4096}), true),
        (json!({"signature": {"preset": "none"}}), false),
        (json!({"tenant": "someone-else"}), false),
        (json!({"target": {"queue": "q"}}), false),
    ] {
        let (status, value) = call_as(
            &server.url,
            Some(&key),
            "PUT",
            "/v1/hooks/gh",
            Some(&change),
        );
        assert_eq!(status == 200, allowed, "{change}: {status} {value}");
    }
    // The same for a push endpoint: where its messages go needs consume on its source.
    as_admin(
        "PUT",
        "/v1/pushes/out",
        Some(json!({"source": {"queue": "q"}, "url": "https://push.example/x"})),
    );
    as_admin(
        "POST",
        "/v1/auth/acls",
        Some(
            json!({"principal": "sender", "resource": "push", "name": "out", "operations": ["admin"]}),
        ),
    );
    for (change, allowed) in [
        (json!({"concurrency": 2}), true),
        (json!({"breaker": {"open_ms": 5000}}), true),
        (json!({"url": "https://elsewhere.example/steal"}), false),
        (
            json!({"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}),
            false,
        ),
    ] {
        let (status, value) = call_as(
            &server.url,
            Some(&key),
            "PUT",
            "/v1/pushes/out",
            Some(&change),
        );
        assert_eq!(status == 200, allowed, "{change}: {status} {value}");
    }
}

/// Retries of one delivery, as a sender does: after Retry-After, or shortly when the
/// server cannot be reached.
struct Sender {
    acked: Mutex<BTreeMap<u64, bool>>,
    /// Requests the server answered (any status).
    answered: AtomicU64,
    refusals: AtomicU64,
    refusals_without_retry_after: AtomicU64,
    unreachable: AtomicU64,
}

/// `FLOOD_RATE` webhooks a second for `FLOOD_SECONDS` from `FLOOD_SENDERS` connections,
/// into a queue a slow consumer drains, the server killed with SIGKILL half-way and
/// started again: every delivery ends acknowledged (retries after Retry-After or a
/// refused connection land it), and every delivery is stored exactly once (one offset per
/// delivery id among everything consumed and left). The defaults suit a debug build on a
/// shared machine; scripts/webhook-flood runs it at 10,000 a second for 10 s on a release
/// build (BENCHMARKS.md).
#[test]
fn a_webhook_flood_killed_mid_way_loses_nothing_it_acknowledged() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rate = env("FLOOD_RATE", 1_500);
    let seconds = env("FLOOD_SECONDS", 4);
    let senders = env("FLOOD_SENDERS", 32) as usize;
    let total = rate * seconds;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    // Small enough that the flood fills it: refusals with Retry-After are part of the test.
    server.create_queue("inbox", json!({"max_messages": total / 2}));
    github_hook(&server, "gh", "inbox");
    let base = server.url.clone();

    let state = Arc::new(Sender {
        acked: Mutex::new(BTreeMap::new()),
        answered: AtomicU64::new(0),
        refusals: AtomicU64::new(0),
        refusals_without_retry_after: AtomicU64::new(0),
        unreachable: AtomicU64::new(0),
    });
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let flood_done = Arc::new(AtomicBool::new(false));
    // When the last delivery was first sent: the flood's length as paced.
    let last_first_send: Arc<Mutex<Option<Duration>>> = Arc::default();
    let mut threads = Vec::new();
    for s in 0..senders {
        let (state, next, base) = (state.clone(), next.clone(), base.clone());
        let last_first_send = last_first_send.clone();
        threads.push(std::thread::spawn(move || {
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .new_agent();
            // (due, delivery) to send again.
            let mut again: Vec<(Instant, u64)> = Vec::new();
            let deadline = started + Duration::from_secs(seconds + 120);
            loop {
                let now = Instant::now();
                assert!(
                    now < deadline,
                    "sender {s}: deliveries still refused after 120 s"
                );
                let delivery = if let Some(i) = again.iter().position(|(due, _)| *due <= now) {
                    again.swap_remove(i).1
                } else {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n + 1 == total {
                        *last_first_send.lock().unwrap() = Some(started.elapsed());
                    }
                    if n >= total {
                        next.fetch_sub(1, Ordering::Relaxed);
                        if again.is_empty() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    // Paced: delivery n goes out at n / rate seconds.
                    let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(now) {
                        std::thread::sleep(wait);
                    }
                    n
                };
                let body = format!(r#"{{"delivery":{delivery},"pad":"{}"}}"#, "x".repeat(200));
                let answer = send(
                    &agent,
                    &base,
                    "gh",
                    &format!("d-{delivery}"),
                    SECRET,
                    body.as_bytes(),
                );
                if answer.is_ok() {
                    state.answered.fetch_add(1, Ordering::Relaxed);
                }
                match answer {
                    Ok(answer) if answer.status == 200 => {
                        state
                            .acked
                            .lock()
                            .unwrap()
                            .insert(delivery, answer.body["duplicate"] == true);
                    }
                    Ok(answer) => {
                        assert!(
                            matches!(answer.status, 429 | 503 | 507),
                            "delivery {delivery}: {} {}",
                            answer.status,
                            answer.body
                        );
                        state.refusals.fetch_add(1, Ordering::Relaxed);
                        let wait = match answer.retry_after {
                            Some(s) => s,
                            None => {
                                state
                                    .refusals_without_retry_after
                                    .fetch_add(1, Ordering::Relaxed);
                                1
                            }
                        };
                        again.push((Instant::now() + Duration::from_secs(wait), delivery));
                    }
                    Err(_) => {
                        state.unreachable.fetch_add(1, Ordering::Relaxed);
                        again.push((Instant::now() + Duration::from_millis(100), delivery));
                    }
                }
            }
        }));
    }
    // The slow consumer: a quarter of the rate; records the offset each delivery is stored
    // at.
    let consumed: Arc<Mutex<BTreeMap<String, BTreeSet<u64>>>> = Arc::default();
    let consumer = {
        let (consumed, base, flood_done) = (consumed.clone(), base.clone(), flood_done.clone());
        std::thread::spawn(move || {
            let agent = agent();
            let per_round = (rate / 4 / 10).max(1);
            while !flood_done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let Ok((200, got)) = crate::support::call_with(
                    &agent,
                    &format!("{base}/v1/queues/inbox/receive"),
                    "POST",
                    Some(json!({"max": per_round}).to_string().as_bytes()),
                ) else {
                    continue;
                };
                let messages = got["messages"].as_array().cloned().unwrap_or_default();
                if messages.is_empty() {
                    continue;
                }
                for m in &messages {
                    consumed
                        .lock()
                        .unwrap()
                        .entry(m["id"].as_str().unwrap().to_string())
                        .or_default()
                        .insert(m["offset"].as_u64().unwrap());
                }
                let receipts: Vec<&str> = messages
                    .iter()
                    .map(|m| m["receipt"].as_str().unwrap())
                    .collect();
                let _ = crate::support::call_with(
                    &agent,
                    &format!("{base}/v1/queues/inbox/ack"),
                    "POST",
                    Some(json!({"receipts": receipts}).to_string().as_bytes()),
                );
            }
        })
    };
    std::thread::sleep(Duration::from_secs_f64(seconds as f64 / 2.0));
    let sent_before_kill = next.load(Ordering::Relaxed);
    server.kill_and_restart();
    for t in threads {
        t.join().unwrap();
    }
    let flood_s = started.elapsed().as_secs_f64();
    flood_done.store(true, Ordering::Relaxed);
    consumer.join().unwrap();

    let acked = state.acked.lock().unwrap().clone();
    assert_eq!(
        acked.len() as u64,
        total,
        "every delivery ends acknowledged"
    );
    let mut stored = consumed.lock().unwrap().clone();
    for m in server.peek_all("inbox") {
        stored
            .entry(m["id"].as_str().unwrap().to_string())
            .or_default()
            .insert(m["offset"].as_u64().unwrap());
    }
    let twice: Vec<_> = stored.iter().filter(|(_, o)| o.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "stored more than once: {:?}",
        &twice[..twice.len().min(5)]
    );
    let missing: Vec<u64> = (0..total)
        .filter(|d| !stored.contains_key(&format!("d-{d}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged deliveries lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(stored.len() as u64, total);
    assert_eq!(
        state.refusals_without_retry_after.load(Ordering::Relaxed),
        0
    );
    let duplicates = acked.values().filter(|d| **d).count();
    let paced_s = last_first_send
        .lock()
        .unwrap()
        .map_or(f64::NAN, |d| d.as_secs_f64());
    let answered = state.answered.load(Ordering::Relaxed);
    eprintln!(
        "webhook flood: {total} deliveries asked at {rate}/s from {senders} senders, first sent in {paced_s:.1} s ({:.0}/s; {sent_before_kill} before the kill), all acknowledged after {flood_s:.1} s; {answered} requests answered ({:.0}/s), {} of them refusals with Retry-After; {} unreachable during the restart, {duplicates} acknowledged as duplicates; 0 lost, 0 stored twice",
        total as f64 / paced_s,
        answered as f64 / flood_s,
        state.refusals.load(Ordering::Relaxed),
        state.unreachable.load(Ordering::Relaxed),
    );
}

#[test]
fn hooks_from_the_command_line() {
    use crate::cli::run;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    server.create_queue("gh-events", json!({}));
    let secret_file = dir.path().join("gh.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let secret_arg = secret_file.to_str().unwrap();
    let (code, out, err) = run(
        &server,
        &[
            "hook",
            "create",
            "github",
            "--queue",
            "gh-events",
            "--preset",
            "github",
            "--secret-file",
            secret_arg,
            "--header",
            "X-Request-Id",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("senders POST to http://") && out.contains("/v1/hooks/github"),
        "{out}"
    );
    // A second create is refused; no signature without secrets.
    let (code, _, err) = run(
        &server,
        &[
            "hook",
            "create",
            "github",
            "--queue",
            "gh-events",
            "--preset",
            "github",
            "--secret",
            "x",
        ],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("exists"), "{err}");
    let (code, _, err) = run(
        &server,
        &[
            "hook",
            "create",
            "other",
            "--queue",
            "gh-events",
            "--preset",
            "stripe",
        ],
        None,
    );
    assert_eq!(code, 2, "usage error: {err}");
    assert!(err.contains("secrets"), "{err}");

    let agent = agent();
    assert_eq!(
        send(&agent, &server.url, "github", "d-1", SECRET, b"{}")
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        send(&agent, &server.url, "github", "d-2", "guess", b"{}")
            .unwrap()
            .status,
        401
    );
    let (code, out, _) = run(&server, &["hook", "list"], None);
    assert_eq!(code, 0);
    let row = out
        .lines()
        .find(|l| l.starts_with("github"))
        .unwrap_or_default();
    assert!(
        row.contains("queue gh-events") && row.contains("invalid_signature 1"),
        "{out}"
    );
    let (code, out, _) = run(&server, &["hook", "stats", "github"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("1 accepted") && out.contains("1 bad signatures"),
        "{out}"
    );

    // Rotation: the new secret and the old one, then the new only; the preset is kept.
    let (code, out, err) = run(
        &server,
        &[
            "hook",
            "config",
            "github",
            "--secret",
            "new-secret",
            "--secret-file",
            secret_arg,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("updated hook 'github'") && !out.contains(SECRET),
        "{out}"
    );
    assert_eq!(
        send(&agent, &server.url, "github", "d-3", "new-secret", b"{}")
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        send(&agent, &server.url, "github", "d-4", SECRET, b"{}")
            .unwrap()
            .status,
        200
    );
    let (code, _, err) = run(
        &server,
        &["hook", "config", "github", "--secret", "new-secret"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        send(&agent, &server.url, "github", "d-5", SECRET, b"{}")
            .unwrap()
            .status,
        401
    );
    let (code, out, _) = run(&server, &["--json", "hook", "config", "github"], None);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["config"]["signature"]["preset"], "github");
    assert_eq!(shown["config"]["headers"], json!(["x-request-id"]));
    assert!(!out.contains("new-secret"), "{out}");

    let (code, _, _) = run(&server, &["hook", "delete", "github"], None);
    assert_eq!(code, 0);
    let (code, _, err) = run(&server, &["hook", "stats", "github"], None);
    assert_eq!(code, 3, "not found exits 3: {err}");
}

#[test]
fn a_listener_of_its_own_takes_webhooks_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let server = Server::start(
        &dir.path().join("data"),
        Some(&format!(
            "[hooks]\nlisten = \"127.0.0.1:{port}\"\npath_prefix = \"/in/\"\n"
        )),
    );
    server.create_queue("q", json!({}));
    github_hook(&server, "gh", "q");
    let agent = agent();
    let ingress = format!("http://127.0.0.1:{port}");
    let signature = github_signature(SECRET, b"{}");
    let mut response = agent
        .post(&format!("{ingress}/in/gh"))
        .header("x-hub-signature-256", &signature)
        .header("x-github-delivery", "d-1")
        .send(b"{}".as_slice())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = serde_json::from_slice(&response.body_mut().read_to_vec().unwrap()).unwrap();
    assert_eq!(body, json!({"id": "d-1", "duplicate": false}));
    // The API is not there.
    for path in ["/v1/queues", "/v1/hooks/gh", "/metrics"] {
        let (status, value) =
            crate::support::call_with(&agent, &format!("{ingress}{path}"), "GET", None).unwrap();
        assert_eq!(
            (status, value["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    let (status, _) =
        crate::support::call_with(&agent, &format!("{ingress}/healthz"), "GET", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(server.peek_all("q").len(), 1);
    let metrics = metrics_text(&server.url);
    assert!(
        metrics.contains("tidewater_connections_accepted_total{listener=\"hooks\"}"),
        "the listener's connections are counted"
    );
}
