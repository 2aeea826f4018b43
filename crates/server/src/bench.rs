//! `tidewater bench`: publish N messages durably over HTTP in batches, then receive and ack
//! them; report msgs/s, publish latency percentiles, and the server's peak RSS and CPU.
//! A benchmark, never a test: numbers go to BENCHMARKS.md with the command and machine.
// Output goes through `outln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Client, outln};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Benchmark a running server at this URL instead of starting one (RSS and CPU are then
    /// not measured).
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// Messages to publish and consume.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Messages per publish request.
    #[arg(long, default_value_t = 5_000)]
    pub batch: usize,
    /// Concurrent publishing connections.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Concurrent consuming connections.
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Messages per receive (and receipts per ack).
    #[arg(long, default_value_t = 2_000)]
    pub receive_batch: usize,
    /// http (JSON API) or binary (the data-plane protocol through tidewater-client).
    #[arg(long, default_value = "http", value_parser = ["http", "binary"])]
    pub protocol: String,
    /// throughput (publish a backlog, then drain it), latency (a fixed publish rate,
    /// end-to-end latency measured at the consumer; binary protocol) or stream (produce
    /// --messages records to --streams streams of --partitions partitions through one
    /// stream producer, then read them all with one group consumer committing every
    /// second; binary protocol) or compaction (fill a stream with --messages records of
    /// --keys keys, then produce keyed records at --rate for --duration-s twice: before
    /// the stream is compacted and while it is; compaction MB/s and produce latency) or
    /// subscriptions (produce --messages records to one stream of --partitions partitions,
    /// then for each N of --subs drain N work-queue subscriptions at once, one binary
    /// consumer each; baselines in the same run: a group consumer reading the stream, and
    /// a queue of the same messages consumed and acked).
    #[arg(long, default_value = "throughput", value_parser = ["throughput", "latency", "stream", "compaction", "subscriptions"])]
    pub workload: String,
    /// Subscriptions workload: the numbers of subscriptions to drain at once.
    #[arg(long, default_value = "1,2,4,8", value_name = "N,N,...")]
    pub subs: String,
    /// Stream workload: streams to spread the records over.
    #[arg(long, default_value_t = 1)]
    pub streams: u32,
    /// Stream workload: partitions per stream.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Compaction workload: the server's [limits] compaction_bytes_per_s (0: no limit).
    #[arg(long, default_value_t = 64 << 20)]
    pub compaction_bytes_per_s: u64,
    /// Latency workload: messages per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Latency workload: seconds of paced publishing.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Extra configuration of the bench queue as JSON (flow-control policies), e.g.
    /// '{"fairness": {"by": "tenant"}, "key_concurrency": 4}'.
    #[arg(long, value_name = "JSON")]
    pub queue_config: Option<String>,
    /// Binary protocol: spread messages over this many tenants, half of them from the first.
    #[arg(long, default_value_t = 0)]
    pub tenants: u64,
    /// Binary protocol: spread messages over this many keys, half of them on the first.
    #[arg(long, default_value_t = 0)]
    pub keys: u64,
    /// With --target: the binary protocol address of that server.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7071")]
    pub target_protocol: String,
    /// Security of the server bench starts (throughput and latency workloads): off, auth
    /// (API keys and grants: every request authenticated and authorized, receipts bound to
    /// the principal), tls (every listener over TLS, a certificate made for the run), or
    /// tls+auth; the clients present the admin key and trust the run's CA.
    #[arg(long, default_value = "off", value_parser = ["off", "auth", "tls", "tls+auth"])]
    pub security: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The admin token a secured bench server is started with.
const BENCH_ADMIN: &str = "twbench.bench-admin-secret-0123456789abcdefghij";

/// Options of the benchmark's binary clients: the run's token and TLS, if any.
fn client_options() -> tidewater_client::ClientOptions {
    tidewater_client::ClientOptions {
        credentials: crate::client::token().map(tidewater_client::Credentials::token),
        tls: crate::client::binary_tls().ok().flatten(),
        ..tidewater_client::ClientOptions::default()
    }
}

/// The configuration and environment of a server with `security`, with what clients must
/// present; a certificate for 127.0.0.1 is made in `dir` for TLS.
fn security_setup(
    security: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let mut config = String::new();
    let mut env = Vec::new();
    let mut tls = crate::client::TlsFlags::default();
    if security.contains("auth") {
        config.push_str("[auth]\nenabled = true\n");
        env.push(("TIDEWATER_ADMIN_KEY".to_string(), BENCH_ADMIN.to_string()));
        crate::client::set_token(Some(BENCH_ADMIN.to_string()));
    }
    if security.contains("tls") {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
                .signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        std::fs::write(dir.join("server.pem"), cert.pem())?;
        std::fs::write(dir.join("server.key"), key.serialize_pem())?;
        config.push_str(&format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            dir.join("server.pem"),
            dir.join("server.key")
        ));
        tls.cacert = Some(dir.join("ca.pem"));
        tls.https = true;
    }
    crate::client::set_tls(tls);
    Ok((config, env))
}

/// Server process started for the run (killed on drop).
struct Spawned {
    child: Child,
    _dir: tempfile_dir::Dir,
    /// The run's certificates, for a TLS server.
    _pki: Option<tempfile_dir::Dir>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown, then make sure.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory without a dev-dependency in the binary.
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> std::io::Result<Dir> {
            let path = std::env::temp_dir().join(format!(
                "tidewater-bench-{}-{}",
                std::process::id(),
                fastrand::u32(..)
            ));
            std::fs::create_dir_all(&path)?;
            Ok(Dir(path))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_server() -> anyhow::Result<(String, String, Spawned)> {
    spawn_server_with(None)
}

/// A server with `security` (see `BenchArgs::security`).
fn spawn_secured(security: &str) -> anyhow::Result<(String, String, Spawned)> {
    if security == "off" {
        return spawn_server();
    }
    let dir = tempfile_dir::Dir::new()?;
    let (config, env) = security_setup(security, &dir.0)?;
    let (url, addr, mut spawned) = spawn_server_env(Some(&config), &env)?;
    spawned._pki = Some(dir);
    Ok((url, addr, spawned))
}

/// A server on a new directory, with a configuration file of `config` when given.
fn spawn_server_with(config: Option<&str>) -> anyhow::Result<(String, String, Spawned)> {
    spawn_server_env(config, &[])
}

fn spawn_server_env(
    config: Option<&str>,
    env: &[(String, String)],
) -> anyhow::Result<(String, String, Spawned)> {
    let dir = tempfile_dir::Dir::new()?;
    let port = free_port()?;
    let protocol_port = free_port()?;
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command.args(["serve", "--data"]).arg(dir.0.join("data"));
    if let Some(config) = config {
        let path = dir.0.join("bench.toml");
        std::fs::write(&path, config)?;
        command.arg("--config").arg(path);
    }
    let child = command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--protocol-listen", &format!("127.0.0.1:{protocol_port}")])
        .env("TIDEWATER_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .spawn()
        .context("starting the server")?;
    let scheme = if config.is_some_and(|c| c.contains("[tls]")) {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://127.0.0.1:{port}");
    let client = Client::new(&url);
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get("/readyz").is_err() {
        if Instant::now() > deadline {
            bail!("the server did not become ready in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((
        url,
        format!("127.0.0.1:{protocol_port}"),
        Spawned {
            child,
            _dir: dir,
            _pki: None,
        },
    ))
}

/// (peak RSS bytes, CPU seconds) of a process, from /proc.
fn process_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?) / ticks;
    Some((hwm_kb * 1024, cpu))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Deserialize)]
struct Received {
    messages: Vec<ReceivedMessage>,
}

#[derive(Deserialize)]
struct ReceivedMessage {
    receipt: String,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.producers == 0 || args.consumers == 0 || args.receive_batch == 0 {
        bail!("--batch, --producers, --consumers and --receive-batch must be at least 1");
    }
    if args.workload == "compaction" {
        return compaction_workload(&args);
    }
    if args.workload == "subscriptions" {
        return subscriptions_workload(&args);
    }
    let (url, protocol_addr, spawned) = match &args.target {
        Some(url) => (url.clone(), args.target_protocol.clone(), None),
        None => {
            let (url, protocol_addr, spawned) = spawn_secured(&args.security)?;
            (url, protocol_addr, Some(spawned))
        }
    };
    let pid = spawned.as_ref().map(|s| s.child.id());
    let client = Client::new(&url);
    let queue = format!("bench-{}", fastrand::u32(..));
    let capacity = (args.messages * 2).max(1_000);
    let mut config = json!({"max_messages": capacity, "max_bytes": 1u64 << 40});
    if let Some(extra) = &args.queue_config {
        let extra: Value = serde_json::from_str(extra).context("--queue-config is not JSON")?;
        let Some(extra) = extra.as_object() else {
            anyhow::bail!("--queue-config must be a JSON object");
        };
        for (k, v) in extra {
            config[k] = v.clone();
        }
    }
    if (args.tenants > 0 || args.keys > 0) && args.protocol != "binary" {
        anyhow::bail!("--tenants and --keys need --protocol binary");
    }
    client.call(
        "PUT",
        &format!("/v1/queues/{queue}"),
        Some(config.to_string().as_bytes()),
    )?;
    let cpu_before = pid.and_then(process_usage).map_or(0.0, |u| u.1);
    if args.workload == "stream" {
        let _ = client.call("DELETE", &format!("/v1/queues/{queue}"), None);
        let result = stream_workload(&args, &client, &protocol_addr, pid)?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            outln!(
                "tidewater bench stream: {} records of {} B into {} streams x {} partitions, one producer, one group consumer (commits every second), binary protocol",
                args.messages,
                args.size,
                args.streams,
                args.partitions
            );
            let f = |k: &str| result[k].as_f64().unwrap_or(0.0);
            outln!(
                "  produce (durable)   {:>10.0} records/s",
                f("produce_records_per_s")
            );
            outln!(
                "  fetch + commit      {:>10.0} records/s",
                f("fetch_records_per_s")
            );
            if pid.is_some() {
                outln!(
                    "  server CPU          {:>10.3} us per record produced, {:.3} us per record fetched",
                    f("server_cpu_us_per_record_produced"),
                    f("server_cpu_us_per_record_fetched")
                );
                outln!(
                    "  server RSS          {:>10.1} MiB peak, {:.1} MiB at the end (records retained)",
                    f("server_peak_rss_mib"),
                    f("server_rss_end_mib")
                );
            }
        }
        drop(spawned);
        return Ok(());
    }
    if args.workload == "latency" {
        let mut latencies = latency_workload(&args, &protocol_addr, &queue)?;
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let usage_end = pid.and_then(process_usage);
        let _ = client.call("DELETE", &format!("/v1/queues/{queue}"), None);
        let ms = |p: f64| percentile(&latencies, p) * 1000.0;
        let max_ms = latencies.last().copied().unwrap_or(0.0) * 1000.0;
        let result = json!({
            "workload": "latency",
            "rate": args.rate,
            "duration_s": args.duration_s,
            "size": args.size,
            "messages": latencies.len(),
            "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": max_ms,
            "server_cpu_us_per_msg": usage_end.map(|u| (u.1 - cpu_before) * 1e6 / latencies.len().max(1) as f64),
        });
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            outln!(
                "tidewater bench latency: {} msgs/s for {} s, {} B, durable, binary protocol ({} messages)",
                args.rate,
                args.duration_s,
                args.size,
                latencies.len()
            );
            outln!(
                "  end to end: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                max_ms
            );
        }
        drop(spawned);
        return Ok(());
    }

    let started = Instant::now();
    let mut latencies = if args.protocol == "binary" {
        binary_publish(&args, &protocol_addr, &queue)?
    } else {
        http_publish(&args, &url, &queue)?
    };
    let publish_s = started.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let usage_after_publish = pid.and_then(process_usage);

    let started = Instant::now();
    if args.protocol == "binary" {
        binary_consume(&args, &protocol_addr, &queue)?;
    } else {
        http_consume(&args, &url, &queue)?;
    }
    let consume_s = started.elapsed().as_secs_f64();
    let usage_end = pid.and_then(process_usage);
    let _ = client.call("DELETE", &format!("/v1/queues/{queue}"), None);

    let n = args.messages as f64;
    // Server CPU of the receive + ack phase alone (what a shaping policy adds shows here).
    let consume_cpu_s = usage_after_publish
        .zip(usage_end)
        .map(|(after, end)| end.1 - after.1);
    let result = json!({
        "security": args.security,
        "messages": args.messages,
        "size": args.size,
        "batch": args.batch,
        "producers": args.producers,
        "consumers": args.consumers,
        "receive_batch": args.receive_batch,
        "publish_msgs_per_s": (n / publish_s).round(),
        "publish_latency_p50_ms": percentile(&latencies, 0.5) * 1000.0,
        "publish_latency_p99_ms": percentile(&latencies, 0.99) * 1000.0,
        "consume_ack_msgs_per_s": (n / consume_s).round(),
        "server_peak_rss_mib": usage_end.map(|u| u.0 as f64 / (1 << 20) as f64),
        "server_rss_after_publish_mib": usage_after_publish.map(|u| u.0 as f64 / (1 << 20) as f64),
        "server_cpu_s": usage_end.map(|u| u.1 - cpu_before),
        "server_cpu_us_per_msg": usage_end.map(|u| (u.1 - cpu_before) * 1e6 / (2.0 * n)),
        "server_cpu_us_per_msg_consumed": consume_cpu_s.map(|s| s * 1e6 / n),
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        outln!(
            "tidewater bench: {} messages of {} B, publish batches of {}, {} producers, {} consumers (receive {}), security {}",
            args.messages,
            args.size,
            args.batch,
            args.producers,
            args.consumers,
            args.receive_batch,
            args.security
        );
        outln!(
            "  publish (durable)   {:>10.0} msgs/s   request p50 {:.1} ms  p99 {:.1} ms",
            n / publish_s,
            percentile(&latencies, 0.5) * 1000.0,
            percentile(&latencies, 0.99) * 1000.0
        );
        outln!("  receive + ack       {:>10.0} msgs/s", n / consume_s);
        if let Some((rss, cpu)) = usage_end {
            outln!(
                "  server peak RSS     {:>10.1} MiB",
                rss as f64 / (1 << 20) as f64
            );
            outln!(
                "  server CPU          {:>10.2} s  ({:.2} us per message published + consumed)",
                cpu - cpu_before,
                (cpu - cpu_before) * 1e6 / (2.0 * n)
            );
            if let Some(consume) = consume_cpu_s {
                outln!(
                    "    of which consume {:>10.2} s  ({:.2} us per message received + acked)",
                    consume,
                    consume * 1e6 / n
                );
            }
        } else {
            outln!("  (server RSS and CPU are measured only when bench starts the server itself)");
        }
    }
    drop(spawned);
    Ok(())
}

/// Publishes with pre-encoded JSON batches from `producers` threads; returns request latencies.
fn http_publish(args: &BenchArgs, url: &str, queue: &str) -> anyhow::Result<Vec<f64>> {
    // Publish: every request carries the same pre-encoded batch (ids are assigned by the server).
    let body = "x".repeat(args.size);
    let one = json!({"body": body}).to_string();
    let batch_body = |n: usize| {
        format!(
            "{{\"ack\":\"durable\",\"messages\":[{}]}}",
            vec![one.as_str(); n].join(",")
        )
    };
    let full = Arc::new(batch_body(args.batch));
    let remaining = Arc::new(AtomicU64::new(args.messages));
    let mut workers = Vec::new();
    for _ in 0..args.producers {
        let (client, full, remaining, queue) = (
            Client::new(url),
            full.clone(),
            remaining.clone(),
            queue.to_string(),
        );
        let batch = args.batch as u64;
        let size_one = one.clone();
        workers.push(std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            let mut latencies = Vec::new();
            let path = format!("/v1/queues/{queue}/messages");
            loop {
                let take = remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                    if r == 0 { None } else { Some(r - r.min(batch)) }
                });
                let Ok(before) = take else { break };
                let n = before.min(batch) as usize;
                let started = Instant::now();
                if n as u64 == batch {
                    client.call_raw("POST", &path, Some(full.as_bytes()))?;
                } else {
                    let body = format!(
                        "{{\"ack\":\"durable\",\"messages\":[{}]}}",
                        vec![size_one.as_str(); n].join(",")
                    );
                    client.call_raw("POST", &path, Some(body.as_bytes()))?;
                }
                latencies.push(started.elapsed().as_secs_f64());
            }
            Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("producer panicked"))??,
        );
    }
    Ok(latencies)
}

/// Receives and acks with `consumers` threads until everything is acked.
fn http_consume(args: &BenchArgs, url: &str, queue: &str) -> anyhow::Result<()> {
    // Consume: receive a batch, ack its receipts, until everything is acked.
    let acked = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.consumers {
        let (client, acked, queue) = (Client::new(url), acked.clone(), queue.to_string());
        let (total, max) = (args.messages, args.receive_batch);
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let receive = json!({"max": max, "wait_ms": 200}).to_string();
            while acked.load(Ordering::SeqCst) < total {
                let (_, bytes) = client.call_raw(
                    "POST",
                    &format!("/v1/queues/{queue}/receive"),
                    Some(receive.as_bytes()),
                )?;
                let got: Received = serde_json::from_slice(&bytes)?;
                if got.messages.is_empty() {
                    continue;
                }
                let receipts: Vec<&str> = got.messages.iter().map(|m| m.receipt.as_str()).collect();
                let body = serde_json::to_vec(&json!({ "receipts": receipts }))?;
                let (_, reply) =
                    client.call("POST", &format!("/v1/queues/{queue}/ack"), Some(&body))?;
                acked.fetch_add(reply["ok"].as_u64().unwrap_or(0), Ordering::SeqCst);
            }
            Ok(())
        }));
    }
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
    }
    Ok(())
}

/// RSS now (VmRSS) of a process, from /proc.
fn current_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The stream workload: produce through one `StreamProducer` per stream (one client, one
/// connection), then read everything back with one `GroupConsumer` that commits every
/// second.
fn stream_workload(
    args: &BenchArgs,
    http: &Client,
    addr: &str,
    pid: Option<u32>,
) -> anyhow::Result<Value> {
    use tidewater_client::{
        Client as BinaryClient, GroupConsumerOptions, Record, StreamProducerOptions,
    };
    if args.streams == 0 || args.partitions == 0 {
        bail!("--streams and --partitions must be at least 1");
    }
    let run = fastrand::u32(..);
    let names: Vec<String> = (0..args.streams)
        .map(|i| format!("bench-{run}-{i}"))
        .collect();
    for name in &names {
        http.call(
            "PUT",
            &format!("/v1/streams/{name}"),
            Some(
                json!({"partitions": args.partitions})
                    .to_string()
                    .as_bytes(),
            ),
        )?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let usage = |pid: Option<u32>| pid.and_then(process_usage);
    let before = usage(pid);
    let n = args.messages;
    let produce_s = runtime.block_on(async {
        let client = BinaryClient::new(addr, client_options());
        let producers: Vec<_> = names
            .iter()
            .map(|name| {
                client.stream_producer(
                    name,
                    StreamProducerOptions {
                        max_batch_records: args.batch,
                        max_batch_bytes: 4 << 20,
                        ..StreamProducerOptions::default()
                    },
                )
            })
            .collect();
        let value = vec![b'x'; args.size];
        send_all(n, |i| {
            let producer = &producers[(i % producers.len() as u64) as usize];
            producer.send(Record::new(value.clone()))
        })
        .await
    })?;
    let after_produce = usage(pid);
    let fetch_s = runtime.block_on(async {
        let client = BinaryClient::new(addr, client_options());
        let streams: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut consumer = client.group_consumer(
            &format!("bench-{run}"),
            &streams,
            GroupConsumerOptions {
                auto_commit: Some(Duration::from_secs(1)),
                ..GroupConsumerOptions::default()
            },
        );
        let started = Instant::now();
        let mut bytes = 0usize;
        for _ in 0..n {
            let record = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .context("no record for 60 s")?
                .context("the consumer stopped")??;
            bytes += record.value.map_or(0, |v| v.len());
        }
        let elapsed = started.elapsed().as_secs_f64();
        anyhow::ensure!(bytes == n as usize * args.size, "fetched {bytes} bytes");
        consumer.close().await?;
        Ok::<_, anyhow::Error>(elapsed)
    })?;
    let end = usage(pid);
    let rss_end = pid.and_then(current_rss);
    for name in &names {
        let _ = http.call("DELETE", &format!("/v1/streams/{name}"), None);
    }
    let cpu = |a: Option<(u64, f64)>, b: Option<(u64, f64)>| a.zip(b).map(|(a, b)| b.1 - a.1);
    let nf = n as f64;
    Ok(json!({
        "workload": "stream",
        "records": n,
        "size": args.size,
        "streams": args.streams,
        "partitions": args.partitions,
        "batch": args.batch,
        "produce_records_per_s": (nf / produce_s).round(),
        "fetch_records_per_s": (nf / fetch_s).round(),
        "server_cpu_us_per_record_produced": cpu(before, after_produce).map(|s| s * 1e6 / nf),
        "server_cpu_us_per_record_fetched": cpu(after_produce, end).map(|s| s * 1e6 / nf),
        "server_peak_rss_mib": end.map(|u| u.0 as f64 / (1 << 20) as f64),
        "server_rss_end_mib": rss_end.map(|b| b as f64 / (1 << 20) as f64),
    }))
}

/// Sends `n` records (`send(i)` queues the i-th), at most 50,000 unanswered at a time, and
/// waits for every answer; returns the seconds it took.
async fn send_all<F>(n: u64, mut send: impl FnMut(u64) -> F) -> anyhow::Result<f64>
where
    F: std::future::Future<
            Output = Result<tidewater_client::RecordMetadata, tidewater_client::ClientError>,
        >,
{
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for i in 0..n {
        window.push_back(Box::pin(send(i)));
        if window.len() >= 50_000 {
            window.pop_front().unwrap().await?;
        }
    }
    for sent in window {
        sent.await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The subscriptions workload (its own server): what each extra work-queue subscription on
/// one stream costs. Produces `--messages` records of `--size` bytes to a stream of
/// `--partitions` partitions; then, for each N of `--subs`, creates N subscriptions at
/// earliest and drains them all at once (N binary consumers, one connection each,
/// prefetch 5,000, batched acks), measuring deliveries per second and server CPU per
/// delivery; the subscriptions are deleted between rounds. Baselines in the same run: one
/// group consumer reading the stream once (fetch + commit), and a queue holding the same
/// number of messages consumed and acked by one binary consumer.
fn subscriptions_workload(args: &BenchArgs) -> anyhow::Result<()> {
    use tidewater_client::{
        Client as BinaryClient, ConsumerOptions, GroupConsumerOptions, Message, ProducerOptions,
        Record, StreamProducerOptions,
    };
    let subs: Vec<usize> = args
        .subs
        .split(',')
        .map(|n| n.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("--subs takes numbers, e.g. 1,2,4,8")?;
    if subs.is_empty() || subs.contains(&0) || args.partitions == 0 {
        bail!("--subs needs numbers of at least 1, --partitions at least 1");
    }
    if args.target.is_some() {
        bail!("the subscriptions workload starts its own server (it measures its CPU)");
    }
    let (url, addr, spawned) = spawn_server()?;
    let pid = spawned.child.id();
    let http = Client::new(&url);
    let cpu = || process_usage(pid).map_or(0.0, |u| u.1);
    let n = args.messages;
    let stream = "bench-fanout";
    http.call(
        "PUT",
        &format!("/v1/streams/{stream}"),
        Some(
            json!({"partitions": args.partitions})
                .to_string()
                .as_bytes(),
        ),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let value = vec![b'x'; args.size];
    let produce_s = runtime.block_on(async {
        let client = BinaryClient::new(&addr, client_options());
        let producer = client.stream_producer(
            stream,
            StreamProducerOptions {
                max_batch_records: args.batch,
                max_batch_bytes: 4 << 20,
                ..StreamProducerOptions::default()
            },
        );
        send_all(n, |_| producer.send(Record::new(value.clone()))).await
    })?;
    // Baseline: one group consumer reads the stream once.
    let before = cpu();
    let group_s = runtime.block_on(async {
        let client = BinaryClient::new(&addr, client_options());
        let mut consumer = client.group_consumer(
            "bench-fanout-group",
            &[stream],
            GroupConsumerOptions {
                auto_commit: Some(Duration::from_secs(1)),
                ..GroupConsumerOptions::default()
            },
        );
        let started = Instant::now();
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .context("no record for 60 s")?
                .context("the consumer stopped")??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        consumer.close().await?;
        Ok::<_, anyhow::Error>(elapsed)
    })?;
    let group_cpu = cpu() - before;
    // Drains `names` at once, one consumer (connection) each; returns the seconds.
    let drain = |names: Vec<String>| -> anyhow::Result<f64> {
        runtime.block_on(async {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for name in names {
                let addr = addr.clone();
                tasks.push(tokio::spawn(async move {
                    let client = BinaryClient::new(&addr, client_options());
                    let mut consumer = client.consumer(
                        &name,
                        ConsumerOptions {
                            prefetch: 5_000,
                            ack_batch: 5_000,
                            ..ConsumerOptions::default()
                        },
                    );
                    for _ in 0..n {
                        let delivery =
                            tokio::time::timeout(Duration::from_secs(60), consumer.next())
                                .await
                                .context("no delivery for 60 s")?
                                .context("the consumer stopped")??;
                        consumer.ack(&delivery);
                    }
                    consumer.flush().await;
                    consumer.close().await;
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for task in tasks {
                task.await??;
            }
            Ok(started.elapsed().as_secs_f64())
        })
    };
    // Baseline: a queue of the same messages, consumed and acked.
    let queue = "bench-fanout-queue";
    http.call(
        "PUT",
        &format!("/v1/queues/{queue}"),
        Some(
            json!({"max_messages": n.max(1) * 2, "max_bytes": 1u64 << 40})
                .to_string()
                .as_bytes(),
        ),
    )?;
    runtime.block_on(async {
        let client = BinaryClient::new(&addr, client_options());
        let producer = client.producer(queue, ProducerOptions::default());
        // At most 50,000 unanswered at a time (as `send_all`).
        let mut window = std::collections::VecDeque::new();
        for _ in 0..n {
            window.push_back(producer.send(Message::new(value.clone())));
            if window.len() >= 50_000 {
                window.pop_front().expect("not empty").await?;
            }
        }
        for sent in window {
            sent.await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let before = cpu();
    let queue_s = drain(vec![queue.to_string()])?;
    let queue_cpu = cpu() - before;
    let mut rounds = Vec::new();
    for &count in &subs {
        let names: Vec<String> = (0..count).map(|i| format!("s{count}-{i}")).collect();
        for name in &names {
            http.call(
                "PUT",
                &format!("/v1/streams/{stream}/subscriptions/{name}"),
                Some(b"{}"),
            )?;
        }
        let before = cpu();
        let seconds = drain(names.iter().map(|s| format!("{stream}/{s}")).collect())?;
        let used = cpu() - before;
        for name in &names {
            let _ = http.call(
                "DELETE",
                &format!("/v1/streams/{stream}/subscriptions/{name}"),
                None,
            );
        }
        let delivered = (n * count as u64) as f64;
        rounds.push(json!({
            "subscriptions": count,
            "deliveries_per_s": (delivered / seconds).round(),
            "seconds": seconds,
            "server_cpu_s": used,
            "server_cpu_us_per_delivery": used * 1e6 / delivered,
        }));
    }
    let nf = n as f64;
    let result = json!({
        "workload": "subscriptions",
        "records": n,
        "size": args.size,
        "partitions": args.partitions,
        "produce_records_per_s": (nf / produce_s).round(),
        "group_records_per_s": (nf / group_s).round(),
        "group_server_cpu_us_per_record": group_cpu * 1e6 / nf,
        "queue_deliveries_per_s": (nf / queue_s).round(),
        "queue_server_cpu_us_per_delivery": queue_cpu * 1e6 / nf,
        "rounds": rounds,
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        outln!(
            "tidewater bench subscriptions: {n} records of {} B in one stream of {} partitions (produced at {:.0}/s), binary protocol",
            args.size,
            args.partitions,
            nf / produce_s
        );
        outln!(
            "  baseline: one group consumer   {:>9.0} records/s, {:.3} us server CPU per record",
            nf / group_s,
            group_cpu * 1e6 / nf
        );
        outln!(
            "  baseline: a queue, consume+ack {:>9.0} msgs/s,    {:.3} us server CPU per message",
            nf / queue_s,
            queue_cpu * 1e6 / nf
        );
        for r in &rounds {
            outln!(
                "  {:>2} subscriptions drained at once: {:>9.0} deliveries/s, {:.3} us server CPU per delivery",
                r["subscriptions"],
                r["deliveries_per_s"].as_f64().unwrap_or(0.0),
                r["server_cpu_us_per_delivery"].as_f64().unwrap_or(0.0)
            );
        }
    }
    drop(spawned);
    Ok(())
}

/// The compaction workload (its own server: 8 MiB segments, checkpoints each second):
/// fill one partition with `--messages` records of `--size` bytes over `--keys` keys; then
/// produce keyed records at `--rate` for `--duration-s`, measuring each send-to-ack
/// latency, twice: with the stream not compacted (`cleanup: delete`, nothing else running)
/// and right after it is switched to `compact`, while the background pass runs. Reports
/// the pass's throughput (segment bytes rewritten per second of pass), what it reclaimed,
/// and both latency distributions.
fn compaction_workload(args: &BenchArgs) -> anyhow::Result<()> {
    use tidewater_client::{Client as BinaryClient, Record, StreamProducerOptions};
    if args.keys == 0 || args.rate == 0 || args.duration_s == 0 {
        bail!("the compaction workload needs --keys, --rate and --duration-s of at least 1");
    }
    if args.target.is_some() {
        bail!("the compaction workload starts its own server (it needs small segments)");
    }
    let (url, addr, spawned) = spawn_server_with(Some(&format!(
        "[storage]\nsegment_roll_bytes = 8388608\ncheckpoint_interval_ms = 1000\n[limits]\ncompaction_bytes_per_s = {}\n",
        args.compaction_bytes_per_s
    )))?;
    let http = Client::new(&url);
    http.call(
        "PUT",
        "/v1/streams/table",
        Some(
            json!({"partitions": 1, "cleanup": "delete", "retention_ms": -1})
                .to_string()
                .as_bytes(),
        ),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let keys = args.keys;
    let size = args.size.max(8);
    let fill_s = runtime.block_on(async {
        let client = BinaryClient::new(&addr, client_options());
        let producer = client.stream_producer(
            "table",
            StreamProducerOptions {
                max_batch_records: args.batch,
                ..StreamProducerOptions::default()
            },
        );
        send_all(args.messages, |i| {
            producer.send(Record::new(vec![b'v'; size]).with_key(format!("key-{}", i % keys)))
        })
        .await
    })?;
    let paced = |phase: &str| -> anyhow::Result<Vec<f64>> {
        runtime.block_on(async {
            let client = BinaryClient::new(&addr, client_options());
            let producer = client.stream_producer("table", StreamProducerOptions::default());
            let total = args.rate * args.duration_s;
            let per_tick = (args.rate / 1000).max(1);
            let mut interval = tokio::time::interval(Duration::from_millis(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut pending = Vec::with_capacity(total as usize);
            let mut sent = 0;
            while sent < total {
                interval.tick().await;
                for _ in 0..per_tick.min(total - sent) {
                    let record = Record::new(vec![b'n'; size])
                        .with_key(format!("key-{}", fastrand::u64(..keys)));
                    let started = Instant::now();
                    let send = producer.send(record);
                    pending.push(tokio::spawn(async move {
                        send.await.map(|_| started.elapsed().as_secs_f64())
                    }));
                    sent += 1;
                }
            }
            let mut latencies = Vec::with_capacity(pending.len());
            for send in pending {
                latencies.push(
                    send.await?
                        .with_context(|| format!("a produce ({phase})"))?,
                );
            }
            latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
            Ok(latencies)
        })
    };
    let metric = |name: &str| -> f64 {
        let text = http
            .call_raw("GET", "/metrics", None)
            .map(|(_, bytes)| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "tidewater_stream_compaction_{name}{{stream=\"table\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    // Twice before: the spread between the two is the noise the third is compared with.
    let control = paced("before compaction")?;
    let before = paced("before compaction")?;
    let bytes_before = http.get("/v1/streams/table")?["partitions"][0]["bytes"]
        .as_u64()
        .unwrap_or(0);
    http.call(
        "PUT",
        "/v1/streams/table",
        Some(json!({"cleanup": "compact"}).to_string().as_bytes()),
    )?;
    let during = paced("during compaction")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while metric("dirty_ratio") > 0.5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = http.get("/v1/streams/table")?;
    let bytes_now = info["partitions"][0]["bytes"].as_u64().unwrap_or(0);
    let pass_s = metric("milliseconds_total") / 1000.0;
    let rewritten = metric("reclaimed_bytes_total");
    let passes = metric("passes_total");
    drop(spawned);
    let ms = |l: &[f64], p: f64| percentile(l, p) * 1000.0;
    let bytes_in = args.messages as f64 * (size as f64 + 20.0);
    let result = json!({
        "workload": "compaction",
        "records": args.messages,
        "keys": keys,
        "size": size,
        "fill_records_per_s": (args.messages as f64 / fill_s).round(),
        "compaction_passes": passes,
        "compaction_bytes_per_s_limit": args.compaction_bytes_per_s,
        "compaction_pass_s": pass_s,
        "reclaimed_mib": rewritten / (1 << 20) as f64,
        "compaction_mib_per_s": if pass_s > 0.0 { bytes_before as f64 / (1 << 20) as f64 / pass_s } else { 0.0 },
        "stream_mib_before": bytes_before as f64 / (1 << 20) as f64,
        "records_mib": bytes_in / (1 << 20) as f64,
        "stream_mib_after": bytes_now as f64 / (1 << 20) as f64,
        "rate": args.rate,
        "duration_s": args.duration_s,
        "produce_p99_ms_control": ms(&control, 0.99),
        "produce_p50_ms_before": ms(&before, 0.5),
        "produce_p99_ms_before": ms(&before, 0.99),
        "produce_p50_ms_during": ms(&during, 0.5),
        "produce_p99_ms_during": ms(&during, 0.99),
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        let f = |k: &str| result[k].as_f64().unwrap_or(0.0);
        outln!(
            "tidewater bench compaction: {} records of {} B over {} keys in one partition, then {} keyed records/s for {} s before and during compaction (durable, binary protocol)",
            args.messages,
            size,
            keys,
            args.rate,
            args.duration_s
        );
        outln!(
            "  fill                {:>10.0} records/s",
            f("fill_records_per_s")
        );
        outln!(
            "  compaction          {:>10.1} MiB/s over {:.2} s of passes ({} passes), {:.1} MiB reclaimed",
            f("compaction_mib_per_s"),
            f("compaction_pass_s"),
            f("compaction_passes"),
            f("reclaimed_mib")
        );
        outln!(
            "  produce latency     p50 {:.2} ms, p99 {:.2} ms before (p99 {:.2} ms in a first run before); p50 {:.2} ms, p99 {:.2} ms during compaction",
            f("produce_p50_ms_before"),
            f("produce_p99_ms_before"),
            f("produce_p99_ms_control"),
            f("produce_p50_ms_during"),
            f("produce_p99_ms_during")
        );
    }
    Ok(())
}

/// Publishes through tidewater-client: `producers` producers, each sending its share as
/// individual messages (the client batches them); returns per-message send-to-ack latencies.
fn binary_publish(args: &BenchArgs, addr: &str, queue: &str) -> anyhow::Result<Vec<f64>> {
    use tidewater_client::{Client as BinaryClient, Message, ProducerOptions};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = BinaryClient::new(addr, client_options());
        let body = vec![b'x'; args.size];
        let per_producer = args.messages / args.producers as u64;
        let mut tasks = Vec::new();
        for p in 0..args.producers {
            let n = if p == 0 {
                args.messages - per_producer * (args.producers as u64 - 1)
            } else {
                per_producer
            };
            let opts = ProducerOptions {
                max_batch_messages: args.batch,
                max_batch_bytes: 16 << 20,
                ..ProducerOptions::default()
            };
            let producer = client.producer(queue, opts);
            let body = body.clone();
            let (tenants, keys) = (args.tenants, args.keys);
            tasks.push(tokio::spawn(async move {
                // A window of sends in flight; sample the latency of every 100th message.
                let mut window = std::collections::VecDeque::new();
                let mut latencies = Vec::new();
                for i in 0..n {
                    let started = Instant::now();
                    let message = skewed(Message::new(body.clone()), i, tenants, keys);
                    window.push_back((i, started, Box::pin(producer.send(message))));
                    if window.len() >= 20_000 {
                        let (i, started, send) = window.pop_front().unwrap();
                        send.await?;
                        if i % 100 == 0 {
                            latencies.push(started.elapsed().as_secs_f64());
                        }
                    }
                }
                for (i, started, send) in window {
                    send.await?;
                    if i % 100 == 0 {
                        latencies.push(started.elapsed().as_secs_f64());
                    }
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await??);
        }
        Ok(latencies)
    })
}

/// Consumes through tidewater-client with `consumers` consumers until everything is acked.
fn binary_consume(args: &BenchArgs, addr: &str, queue: &str) -> anyhow::Result<()> {
    use tidewater_client::{Client as BinaryClient, ConsumerOptions};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = BinaryClient::new(addr, client_options());
        let received = Arc::new(AtomicU64::new(0));
        let total = args.messages;
        let mut tasks = Vec::new();
        for _ in 0..args.consumers {
            let opts = ConsumerOptions {
                prefetch: args.receive_batch as u32,
                ack_batch: args.receive_batch,
                ..ConsumerOptions::default()
            };
            let mut consumer = client.consumer(queue, opts);
            let received = received.clone();
            tasks.push(tokio::spawn(async move {
                while received.load(Ordering::SeqCst) < total {
                    match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                        Ok(Some(delivery)) => {
                            consumer.ack(&delivery?);
                            received.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(None) => anyhow::bail!("the subscription ended"),
                        Err(_) => {} // idle: check whether the others finished
                    }
                }
                consumer.flush().await;
                Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    })
}

/// Publishes at a fixed rate (a burst of rate/1000 every 1 ms tick, each body starting with
/// its send time) and measures publish-to-delivery latency at one consumer that acks all.
fn latency_workload(args: &BenchArgs, addr: &str, queue: &str) -> anyhow::Result<Vec<f64>> {
    use tidewater_client::{Client as BinaryClient, ConsumerOptions, Message, ProducerOptions};
    if args.rate == 0 || args.duration_s == 0 || args.size < 8 {
        bail!("--rate and --duration-s must be at least 1 and --size at least 8");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = BinaryClient::new(addr, client_options());
        let epoch = Instant::now();
        let total = args.rate * args.duration_s;
        let mut consumer = client.consumer(
            queue,
            ConsumerOptions {
                prefetch: 2_000,
                ..ConsumerOptions::default()
            },
        );
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total as usize);
            while (latencies.len() as u64) < total {
                let delivery = match tokio::time::timeout(Duration::from_secs(30), consumer.next())
                    .await
                {
                    Ok(Some(delivery)) => delivery?,
                    _ => anyhow::bail!("deliveries stopped after {} of {total}", latencies.len()),
                };
                let sent_ns = u64::from_le_bytes(delivery.body[..8].try_into().unwrap());
                latencies
                    .push((epoch.elapsed().as_nanos() as u64).saturating_sub(sent_ns) as f64 / 1e9);
                consumer.ack(&delivery);
            }
            consumer.close().await;
            Ok(latencies)
        });
        let producer = client.producer(queue, ProducerOptions::default());
        let per_tick = (args.rate / 1000).max(1);
        let ticks = total.div_ceil(per_tick);
        let mut interval = tokio::time::interval(Duration::from_millis(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut pending = Vec::with_capacity(total as usize);
        let mut sent = 0;
        for _ in 0..ticks {
            interval.tick().await;
            for _ in 0..per_tick.min(total - sent) {
                let mut body = vec![b'x'; args.size];
                body[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                pending.push(producer.send(Message::new(body)));
                sent += 1;
            }
        }
        for send in pending {
            send.await?;
        }
        receiver.await?
    })
}

/// Gives message `i` a tenant and a key when asked: half of all messages go to the first
/// tenant and key (the skew), the rest spread evenly over the others.
fn skewed(
    message: tidewater_client::Message,
    i: u64,
    tenants: u64,
    keys: u64,
) -> tidewater_client::Message {
    let pick = |n: u64| {
        if i.is_multiple_of(2) || n < 2 {
            0
        } else {
            1 + i / 2 % (n - 1)
        }
    };
    let mut message = message;
    if tenants > 0 {
        message = message.with_tenant(format!("tenant-{}", pick(tenants)));
    }
    if keys > 0 {
        message = message.with_key(format!("key-{}", pick(keys)));
    }
    message
}
