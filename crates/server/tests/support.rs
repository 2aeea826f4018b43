//! Starting, killing and talking to a real server process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_tidewater");

pub struct Server {
    pub child: Child,
    pub url: String,
    /// host:port of the binary protocol.
    pub protocol: String,
    pub data: PathBuf,
    config: Option<PathBuf>,
    ports: (u16, u16),
    /// The open-files limit (soft and hard) the server runs under, when one is set.
    open_files: Option<u64>,
    /// Where its standard error goes (appended; info level), when not the test's own.
    pub log: Option<PathBuf>,
    /// The CA its TLS certificate is checked against, when it speaks TLS (`TLS_CA`).
    pub ca: Option<PathBuf>,
    /// The environment it was started with (restarts get it again).
    env: Vec<(String, String)>,
}

/// A port that is free now, chosen below the kernel's ephemeral range so that
/// no outgoing connection (which takes its local port from that range) can
/// occupy it between this call and the server's bind. Port 0 would not do:
/// restarts must come back on the same port.
pub fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let range = 10_000..ephemeral_low.max(10_001);
    loop {
        let port = fastrand::u16(range.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Server {
    /// Starts a server on `data` with an optional TOML config text, and waits until ready.
    pub fn start(data: &Path, config: Option<&str>) -> Server {
        let config = config.map(|text| {
            let path = data.with_extension("toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        Server::start_with(data, config)
    }

    fn start_with(data: &Path, config: Option<PathBuf>) -> Server {
        Server::start_env(data, config, &[])
    }

    /// Starts with extra environment variables (fault injection).
    pub fn start_env(data: &Path, config: Option<PathBuf>, env: &[(&str, &str)]) -> Server {
        Server::start_limited(data, config, env, None)
    }

    /// Starts under an open-files limit of `open_files` (soft and hard, as `ulimit -n`
    /// sets them), kept across restarts.
    pub fn start_with_open_files(data: &Path, config: &str, open_files: u64) -> Server {
        let path = data.with_extension("toml");
        std::fs::write(&path, config).unwrap();
        Server::start_limited(data, Some(path), &[], Some(open_files))
    }

    fn start_limited(
        data: &Path,
        config: Option<PathBuf>,
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Server {
        for _ in 0..5 {
            let ports = (free_port(), free_port());
            match Server::try_start(data, config.clone(), env, ports, open_files) {
                Ok(server) => return server,
                // Another test took a port between our check and the bind: new ports.
                Err(status) => eprintln!("server exited before ready ({status}); new ports"),
            }
        }
        panic!("server did not start on five sets of free ports");
    }

    /// Starts on given (HTTP, binary protocol) ports, retrying a while if the
    /// ports are still held (a killed predecessor's sockets).
    pub fn start_on(
        data: &Path,
        config: Option<PathBuf>,
        env: &[(&str, &str)],
        ports: (u16, u16),
    ) -> Server {
        Server::start_on_limited(data, config, env, ports, None)
    }

    fn start_on_limited(
        data: &Path,
        config: Option<PathBuf>,
        env: &[(&str, &str)],
        ports: (u16, u16),
        open_files: Option<u64>,
    ) -> Server {
        for _ in 0..50 {
            match Server::try_start(data, config.clone(), env, ports, open_files) {
                Ok(server) => return server,
                Err(status) => eprintln!("server exited before ready ({status}); retrying"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server did not start on ports {ports:?}");
    }

    /// Starts one process and waits until it is ready; Err if it exits first.
    fn try_start(
        data: &Path,
        config: Option<PathBuf>,
        env: &[(&str, &str)],
        ports: (u16, u16),
        open_files: Option<u64>,
    ) -> Result<Server, std::process::ExitStatus> {
        let (port, protocol_port) = ports;
        let mut command = match open_files {
            None => Command::new(BIN),
            Some(limit) => {
                // The shell sets the limit and becomes the server (its pid is the server's).
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
                    BIN,
                ]);
                sh
            }
        };
        let log = env
            .iter()
            .find(|(k, _)| *k == LOG_TO)
            .map(|(_, v)| PathBuf::from(v));
        let ca = env
            .iter()
            .find(|(k, _)| *k == TLS_CA)
            .map(|(_, v)| PathBuf::from(v));
        command.envs(
            env.iter()
                .copied()
                .filter(|(k, _)| *k != LOG_TO && *k != TLS_CA),
        );
        command
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        command.args(["--protocol-listen", &format!("127.0.0.1:{protocol_port}")]);
        if let Some(path) = &config {
            command.arg("--config").arg(path);
        }
        let stderr = match &log {
            Some(path) => {
                command.env("TIDEWATER_LOG", "info");
                Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .unwrap(),
                )
            }
            None => {
                command.env("TIDEWATER_LOG", "warn");
                Stdio::inherit()
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let server = Server {
            child,
            url: format!(
                "{}://127.0.0.1:{port}",
                if ca.is_some() { "https" } else { "http" }
            ),
            protocol: format!("127.0.0.1:{protocol_port}"),
            data: data.to_path_buf(),
            config,
            ports,
            open_files,
            log,
            ca,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let mut server = server;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = server.try_call("GET", "/readyz", None) {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                return Err(status);
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then start again on the same data, config and ports.
    pub fn kill_and_restart(&mut self) {
        self.kill9();
        self.start_again();
    }

    /// SIGTERM, then start again on the same data, config and ports.
    pub fn restart(&mut self) {
        assert_eq!(self.stop(), 0);
        self.start_again();
    }

    /// Starts a stopped server again as it was: data, config, environment, ports, limits.
    fn start_again(&mut self) {
        let saved = self.env.clone();
        let env: Vec<(&str, &str)> = saved
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        *self = Server::start_on_limited(
            &self.data.clone(),
            self.config.clone(),
            &env,
            self.ports,
            self.open_files,
        );
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code().unwrap_or(-1)
    }

    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        match &self.ca {
            None => call(&self.url, method, path, body),
            Some(ca) => {
                let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
                call_with(
                    &tls_agent(ca),
                    &format!("{}{path}", self.url),
                    method,
                    bytes.as_deref(),
                )
            }
        }
    }

    /// A call that must succeed with a 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.try_call(method, path, body.as_ref()).unwrap();
        assert!(
            (200..300).contains(&status),
            "{method} {path} -> {status} {value}"
        );
        value
    }

    /// A call that must fail with this status and code.
    pub fn err(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
        code: &str,
    ) -> Value {
        let (got, value) = self.try_call(method, path, body.as_ref()).unwrap();
        assert_eq!(
            (got, value["code"].as_str().unwrap_or("")),
            (status, code),
            "{method} {path}: {value}"
        );
        assert!(
            value["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {value}"
        );
        value
    }

    /// Joins `group` on `stream` as an HTTP consumer, fetches once and commits what it
    /// fetched (the member stays); returns the member id.
    pub fn join_fetch_commit(&self, group: &str, stream: &str) -> String {
        let member = self.ok(
            "POST",
            &format!("/v1/groups/{group}/consumers"),
            Some(serde_json::json!({"streams": [stream]})),
        );
        let member = member["member"].as_str().expect("a member id").to_string();
        let base = format!("/v1/groups/{group}/consumers/{member}");
        let fetched = self.ok("GET", &format!("{base}/records"), None);
        assert!(
            !fetched["records"].as_array().unwrap().is_empty(),
            "{fetched}"
        );
        self.ok(
            "POST",
            &format!("{base}/commit"),
            Some(serde_json::json!({})),
        );
        member
    }

    pub fn create_queue(&self, name: &str, config: Value) {
        self.ok("PUT", &format!("/v1/queues/{name}"), Some(config));
    }

    pub fn publish(&self, queue: &str, messages: Value) -> Vec<String> {
        let reply = self.ok(
            "POST",
            &format!("/v1/queues/{queue}/messages"),
            Some(json!({ "messages": messages })),
        );
        reply["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn receive(
        &self,
        queue: &str,
        max: usize,
        wait_ms: u64,
        lease_ms: Option<u64>,
    ) -> Vec<Value> {
        let mut body = json!({"max": max, "wait_ms": wait_ms});
        if let Some(lease) = lease_ms {
            body["lease_ms"] = json!(lease);
        }
        self.ok("POST", &format!("/v1/queues/{queue}/receive"), Some(body))["messages"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn stats(&self, queue: &str) -> Value {
        self.ok("GET", &format!("/v1/queues/{queue}"), None)["stats"].clone()
    }

    /// Every unleased message of a queue, by paging through peek.
    pub fn peek_all(&self, queue: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let reply = self.ok(
                "GET",
                &format!("/v1/queues/{queue}/messages?max=1000&from={from}"),
                None,
            );
            let messages = reply["messages"].as_array().unwrap();
            if messages.is_empty() {
                return out;
            }
            from = reply["next_from"].as_u64().unwrap();
            out.extend(messages.iter().cloned());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // A server logging to a file: no secret the test made (registered with
        // `remember_secret`) may appear in it.
        if let Some(log) = &self.log
            && !std::thread::panicking()
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let secrets =
                std::fs::read_to_string(log.with_extension("secrets")).unwrap_or_default();
            for secret in secrets.lines().filter(|s| !s.is_empty()) {
                assert!(
                    !text.contains(secret),
                    "a secret appears in the server's log {}",
                    log.display()
                );
            }
        }
    }
}

impl Server {
    /// Registers a secret the server's log (with `LOG_TO`) must never contain: checked
    /// when the server is dropped.
    pub fn remember_secret(&self, secret: &str) {
        if let Some(log) = &self.log {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log.with_extension("secrets"))
                .unwrap();
            writeln!(file, "{secret}").unwrap();
        }
    }
}

/// A server configuration under which compaction runs within a test's time: small
/// segments, a checkpoint every 100 ms (only checkpointed segments are compacted), no I/O
/// budget.
pub const COMPACTING: &str = "[storage]\nsegment_roll_bytes = 65536\ncheckpoint_interval_ms = 100\n[limits]\ncompaction_bytes_per_s = 0\n";

impl Server {
    /// Produces round `round` of the compaction tests to `stream`: keys item-0..item-9,
    /// values `"{round}:ppp..."` (600 B, so 40 rounds fill several segments).
    pub fn produce_round(&self, stream: &str, round: usize) {
        let records: Vec<Value> = (0..10)
            .map(|k| json!({"key": format!("item-{k}"), "value": format!("{round}:{}", "p".repeat(600))}))
            .collect();
        self.ok(
            "POST",
            &format!("/v1/streams/{stream}/records"),
            Some(json!({ "records": records })),
        );
    }

    /// Waits (up to a minute) until the background compaction removed records of `stream`.
    pub fn wait_for_compaction(&self, stream: &str) {
        let series =
            format!("tidewater_stream_compaction_superseded_records_total{{stream=\"{stream}\"}} ");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !metrics_text(&self.url)
            .lines()
            .any(|l| l.strip_prefix(&series).is_some_and(|v| v != "0"))
        {
            assert!(
                Instant::now() < deadline,
                "no compaction of {stream} within a minute"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The Prometheus text of a server.
pub fn metrics_text(base: &str) -> String {
    agent()
        .get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// An environment entry for `Server::start_env`: the server speaks TLS (its configuration
/// says so) with a certificate this CA file signed; calls go over https.
pub const TLS_CA: &str = "TIDEWATER_TEST_TLS_CA";

/// An HTTP agent that trusts the CA in `ca` (PEM).
pub fn tls_agent(ca: &Path) -> ureq::Agent {
    use ureq::tls::{PemItem, RootCerts, TlsConfig, parse_pem};
    let pem = std::fs::read(ca).unwrap();
    let certs: Vec<_> = parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::new_with_certs(&certs))
                .build(),
        )
        .build()
        .into()
}

/// An environment entry for `Server::start_env`: the server's standard error goes to this
/// file (appended, info level) instead of the test's.
pub const LOG_TO: &str = "TIDEWATER_TEST_LOG_TO";

/// A call with a bearer token (None: no Authorization header). Replies that are not JSON
/// come back as a string.
pub fn call_as(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let url = format!("{base}{path}");
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    AGENT.with(|agent| {
        let bearer = token.map(|t| format!("Bearer {t}"));
        macro_rules! go {
            ($request:expr, $send:ident $(, $arg:expr)?) => {{
                let mut request = $request;
                if let Some(bearer) = &bearer {
                    request = request.header("authorization", bearer);
                }
                request.$send($($arg)?)
            }};
        }
        let result = match method {
            "GET" => go!(agent.get(&url), call),
            "DELETE" => go!(agent.delete(&url), call),
            "PUT" => go!(agent.put(&url), send, bytes.as_deref().unwrap_or(b"")),
            _ => go!(agent.post(&url), send, bytes.as_deref().unwrap_or(b"")),
        };
        let mut response = result.unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_vec().unwrap();
        let value = serde_json::from_slice(&text)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into_owned()));
        (status, value)
    })
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

thread_local! {
    static AGENT: ureq::Agent = agent();
}

pub fn call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let url = format!("{base}{path}");
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    call_raw(&url, method, bytes.as_deref())
}

pub fn call_raw(url: &str, method: &str, body: Option<&[u8]>) -> Result<(u16, Value), String> {
    AGENT.with(|agent| call_with(agent, url, method, body))
}

pub fn call_with(
    agent: &ureq::Agent,
    url: &str,
    method: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Value), String> {
    {
        let result = match method {
            "GET" => agent.get(url).call(),
            "DELETE" => agent.delete(url).call(),
            "PUT" => agent.put(url).send(body.unwrap_or(b"")),
            "PATCH" => agent.patch(url).send(body.unwrap_or(b"")),
            _ => agent.post(url).send(body.unwrap_or(b"")),
        };
        let mut response = result.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&text)
                .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&text)))?
        };
        Ok((status, value))
    }
}

pub fn receipts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["receipt"].as_str().unwrap().to_string())
        .collect()
}

pub fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}
