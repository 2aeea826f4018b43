//! One harness, one run: tidewater, Redis Streams (AOF `always` and `everysec`) and NATS
//! JetStream (file storage) under the same workloads with 100-byte messages:
//! 1. publish N messages from one producer (durable where the system can be);
//! 2. consume and ack that backlog with one consumer;
//! 3. end-to-end latency at a fixed rate (paced producer, send time in the body);
//! 4. server RSS holding the backlog and server CPU per message (from /proc).
//!
//! Run through `scripts/peers`, which installs and starts the peers on 127.0.0.1.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;

#[derive(Parser)]
struct Args {
    /// Messages for the throughput workloads.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Latency workload rate (msgs/s) and duration.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// tidewater: binary protocol address and server pid.
    #[arg(long)]
    tidewater: Option<String>,
    /// Redis with appendfsync always: host:port,pid
    #[arg(long)]
    redis_always: Option<String>,
    /// Redis with appendfsync everysec: host:port,pid
    #[arg(long)]
    redis_everysec: Option<String>,
    /// NATS with JetStream: host:port,pid
    #[arg(long)]
    jetstream: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Clone)]
struct Result {
    system: String,
    durability: &'static str,
    publish_per_s: f64,
    consume_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    rss_mib: f64,
    cpu_us_per_msg: f64,
}

/// (RSS bytes, CPU seconds) of a process.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss_kb * 1024, cpu / ticks)
}

fn split(spec: &str) -> anyhow::Result<(String, u32)> {
    let (addr, pid) = spec.split_once(',').context("expected host:port,pid")?;
    Ok((addr.to_string(), pid.parse()?))
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize] * 1000.0
        }
    };
    (p(0.5), p(0.99), p(0.999))
}

fn stamped(epoch: Instant, size: usize) -> Vec<u8> {
    let mut body = vec![b'x'; size];
    body[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    body
}

fn since(epoch: Instant, body: &[u8]) -> f64 {
    let sent = u64::from_le_bytes(body[..8].try_into().unwrap());
    (epoch.elapsed().as_nanos() as u64).saturating_sub(sent) as f64 / 1e9
}

// ---- tidewater ----

async fn tidewater(addr: &str, pid: u32, args: &Args) -> anyhow::Result<Result> {
    use tidewater_client::{Client, ClientOptions, ConsumerOptions, Message, ProducerOptions};
    let client = Client::new(addr, ClientOptions::default());
    let http = std::env::var("TIDEWATER_HTTP")
        .context("TIDEWATER_HTTP (the server's HTTP address) is needed to create queues")?;
    for queue in ["peers-throughput", "peers-latency"] {
        let status = std::process::Command::new("curl")
            .args([
                "-sf",
                "-o",
                "/dev/null",
                "-X",
                "PUT",
                &format!("http://{http}/v1/queues/{queue}"),
                "-d",
                r#"{"max_messages": 100000000}"#,
            ])
            .status()?;
        if !status.success() {
            bail!("cannot create queue {queue} on {http}");
        }
    }
    let cpu0 = usage(pid).1;
    let producer = client.producer(
        "peers-throughput",
        ProducerOptions {
            max_batch_messages: 5_000,
            ..ProducerOptions::default()
        },
    );
    let body = vec![b'x'; args.size];
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for _ in 0..args.messages {
        window.push_back(producer.send(Message::new(body.clone())));
        if window.len() >= 20_000 {
            window.pop_front().unwrap().await?;
        }
    }
    for send in window {
        send.await?;
    }
    let publish = args.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("  published: {publish:.0} msgs/s");
    let rss = usage(pid).0;
    let mut consumer = client.consumer(
        "peers-throughput",
        ConsumerOptions {
            prefetch: 5_000,
            ack_batch: 5_000,
            ..ConsumerOptions::default()
        },
    );
    let started = Instant::now();
    for _ in 0..args.messages {
        let delivery = consumer.next().await.context("subscription ended")??;
        consumer.ack(&delivery);
    }
    consumer.flush().await;
    let consume = args.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("  consumed: {consume:.0} msgs/s; latency run next");
    let cpu = usage(pid).1 - cpu0;
    consumer.close().await;

    // Latency.
    let epoch = Instant::now();
    let total = args.rate * args.duration_s;
    let mut consumer = client.consumer(
        "peers-latency",
        ConsumerOptions {
            prefetch: 2_000,
            ..ConsumerOptions::default()
        },
    );
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        while (latencies.len() as u64) < total {
            let delivery = consumer.next().await.context("subscription ended")??;
            latencies.push(since(epoch, &delivery.body));
            consumer.ack(&delivery);
        }
        consumer.close().await;
        anyhow::Ok(latencies)
    });
    let producer = client.producer("peers-latency", ProducerOptions::default());
    let mut pending = Vec::new();
    pace(args, |n| {
        for _ in 0..n {
            pending.push(producer.send(Message::new(stamped(epoch, args.size))));
        }
    })
    .await;
    for send in pending {
        send.await?;
    }
    let (p50, p99, p999) = percentiles(receiver.await??);
    Ok(Result {
        system: "tidewater".into(),
        durability: "fsync before ack",
        publish_per_s: publish,
        consume_per_s: consume,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        rss_mib: rss as f64 / (1 << 20) as f64,
        cpu_us_per_msg: cpu * 1e6 / (2.0 * args.messages as f64),
    })
}

/// Calls `send(n)` every 1 ms tick with n = rate/1000 until rate * duration messages went out.
async fn pace(args: &Args, mut send: impl FnMut(u64)) {
    let total = args.rate * args.duration_s;
    let per_tick = (args.rate / 1000).max(1);
    let mut interval = tokio::time::interval(Duration::from_millis(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    while sent < total {
        interval.tick().await;
        let n = per_tick.min(total - sent);
        send(n);
        sent += n;
    }
}

// ---- Redis Streams ----

async fn redis_system(
    name: &str,
    durability: &'static str,
    addr: &str,
    pid: u32,
    args: &Args,
) -> anyhow::Result<Result> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("s")
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await?;
    let cpu0 = usage(pid).1;
    let body = vec![b'x'; args.size];
    let started = Instant::now();
    let mut left = args.messages;
    while left > 0 {
        let n = left.min(1_000);
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg("s")
                .arg("*")
                .arg("d")
                .arg(&body)
                .ignore();
        }
        let _: () = pipe.query_async(&mut con).await?;
        left -= n;
    }
    let publish = args.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("  published: {publish:.0} msgs/s");
    let rss = usage(pid).0;
    let started = Instant::now();
    let mut done = 0;
    while done < args.messages {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(1_000)
            .arg("STREAMS")
            .arg("s")
            .arg(">")
            .query_async(&mut con)
            .await?;
        let ids: Vec<String> = reply
            .keys
            .iter()
            .flat_map(|k| k.ids.iter().map(|i| i.id.clone()))
            .collect();
        if ids.is_empty() {
            continue;
        }
        let _: u64 = redis::cmd("XACK")
            .arg("s")
            .arg("g")
            .arg(&ids)
            .query_async(&mut con)
            .await?;
        done += ids.len() as u64;
    }
    let consume = args.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("  consumed: {consume:.0} msgs/s; latency run next");
    let cpu = usage(pid).1 - cpu0;

    // Latency: XADD per tick (pipelined), a blocking group reader acks what it gets.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("l")
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await?;
    let epoch = Instant::now();
    let total = args.rate * args.duration_s;
    let mut reader = client.get_multiplexed_async_connection().await?;
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        while (latencies.len() as u64) < total {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(1_000)
                .arg("BLOCK")
                .arg(100)
                .arg("STREAMS")
                .arg("l")
                .arg(">")
                .query_async(&mut reader)
                .await?;
            let mut ids = Vec::new();
            for key in &reply.keys {
                for entry in &key.ids {
                    if let Some(redis::Value::BulkString(body)) = entry.map.get("d") {
                        latencies.push(since(epoch, body));
                    }
                    ids.push(entry.id.clone());
                }
            }
            if !ids.is_empty() {
                let _: u64 = redis::cmd("XACK")
                    .arg("l")
                    .arg("g")
                    .arg(&ids)
                    .query_async(&mut reader)
                    .await?;
            }
        }
        anyhow::Ok(latencies)
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Vec<u8>>>();
    let mut writer = con.clone();
    let sender = tokio::spawn(async move {
        while let Some(bodies) = rx.recv().await {
            let mut pipe = redis::pipe();
            for body in bodies {
                pipe.cmd("XADD")
                    .arg("l")
                    .arg("*")
                    .arg("d")
                    .arg(body)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut writer).await?;
        }
        anyhow::Ok(())
    });
    pace(args, |n| {
        let _ = tx.send((0..n).map(|_| stamped(epoch, args.size)).collect());
    })
    .await;
    drop(tx);
    sender.await??;
    let (p50, p99, p999) = percentiles(receiver.await??);
    Ok(Result {
        system: name.into(),
        durability,
        publish_per_s: publish,
        consume_per_s: consume,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        rss_mib: rss as f64 / (1 << 20) as f64,
        cpu_us_per_msg: cpu * 1e6 / (2.0 * args.messages as f64),
    })
}

// ---- NATS JetStream ----

async fn jetstream(addr: &str, pid: u32, args: &Args) -> anyhow::Result<Result> {
    use async_nats::jetstream::{self, consumer::PullConsumer, stream::StorageType};
    let nc = async_nats::connect(format!("nats://{addr}")).await?;
    let js = jetstream::new(nc);
    for name in ["PEERS", "PEERSLAT"] {
        let _ = js.delete_stream(name).await;
    }
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "PEERS".into(),
            subjects: vec!["peers.t".into()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await?;
    let cpu0 = usage(pid).1;
    let body = bytes::Bytes::from(vec![b'x'; args.size]);
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for _ in 0..args.messages {
        window.push_back(js.publish("peers.t", body.clone()).await?);
        if window.len() >= 1_024 {
            window.pop_front().unwrap().await?;
        }
    }
    for ack in window {
        ack.await?;
    }
    let publish = args.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("  published: {publish:.0} msgs/s");
    let rss = usage(pid).0;
    let consumer: PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("c".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut done = 0;
    while done < args.messages {
        let mut batch = consumer
            .fetch()
            .max_messages(1_000)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            done += 1;
        }
    }
    let consume = args.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("  consumed: {consume:.0} msgs/s; latency run next");
    let cpu = usage(pid).1 - cpu0;

    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "PEERSLAT".into(),
            subjects: vec!["peers.l".into()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await?;
    let consumer: PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("l".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let epoch = Instant::now();
    let total = args.rate * args.duration_s;
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        while (latencies.len() as u64) < total {
            let message = messages
                .next()
                .await
                .context("stream ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            latencies.push(since(epoch, &message.payload));
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        anyhow::Ok(latencies)
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Vec<u8>>>();
    let js2 = js.clone();
    // Publish acks are awaited as they come, in their own task (async-nats bounds how many
    // may be outstanding).
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let acker = tokio::spawn(async move {
        while let Some(ack) = ack_rx.recv().await {
            let ack: async_nats::jetstream::context::PublishAckFuture = ack;
            ack.await?;
        }
        anyhow::Ok(())
    });
    let sender = tokio::spawn(async move {
        while let Some(bodies) = rx.recv().await {
            for body in bodies {
                let _ = ack_tx.send(js2.publish("peers.l", body.into()).await?);
            }
        }
        drop(ack_tx);
        acker.await??;
        anyhow::Ok(())
    });
    pace(args, |n| {
        let _ = tx.send((0..n).map(|_| stamped(epoch, args.size)).collect());
    })
    .await;
    drop(tx);
    sender.await??;
    let (p50, p99, p999) = percentiles(receiver.await??);
    Ok(Result {
        system: "NATS JetStream 2.9 (file)".into(),
        durability: "write(2) before ack, no fsync",
        publish_per_s: publish,
        consume_per_s: consume,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        rss_mib: rss as f64 / (1 << 20) as f64,
        cpu_us_per_msg: cpu * 1e6 / (2.0 * args.messages as f64),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    if let Some(spec) = &args.tidewater {
        let (addr, pid) = split(spec)?;
        eprintln!("tidewater ...");
        results.push(tidewater(&addr, pid, &args).await.context("tidewater")?);
    }
    let redis_modes = [
        (
            &args.redis_always,
            "Redis 7.0 Streams, AOF always",
            "fsync before reply",
        ),
        (
            &args.redis_everysec,
            "Redis 7.0 Streams, AOF everysec",
            "write(2) before reply, fsync every 1 s",
        ),
    ];
    for (spec, name, durability) in redis_modes {
        if let Some(spec) = spec {
            let (addr, pid) = split(spec)?;
            eprintln!("{name} ...");
            results.push(
                redis_system(name, durability, &addr, pid, &args)
                    .await
                    .context(name)?,
            );
        }
    }
    if let Some(spec) = &args.jetstream {
        let (addr, pid) = split(spec)?;
        eprintln!("jetstream ...");
        results.push(jetstream(&addr, pid, &args).await.context("jetstream")?);
    }
    if args.json {
        let rows: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({"system": r.system, "durability": r.durability, "publish_per_s": r.publish_per_s.round(),
                    "consume_ack_per_s": r.consume_per_s.round(), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "p999_ms": r.p999_ms,
                    "rss_mib_with_backlog": r.rss_mib, "server_cpu_us_per_msg": r.cpu_us_per_msg})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{} x {} B messages; latency at {} msgs/s for {} s; one producer and one consumer per system",
        args.messages, args.size, args.rate, args.duration_s
    );
    println!(
        "| system | durability at ack | publish msgs/s | consume+ack msgs/s | e2e p50 | p99 | p99.9 | RSS with backlog | server CPU/msg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} MiB | {:.2} us |",
            r.system,
            r.durability,
            r.publish_per_s,
            r.consume_per_s,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.rss_mib,
            r.cpu_us_per_msg
        );
    }
    if let Some(tw) = results.iter().find(|r| r.system == "tidewater") {
        println!(
            "\nRatios, tidewater / peer (throughput: higher is better for tidewater; latency, RSS, CPU: lower is better):"
        );
        for r in results.iter().filter(|r| r.system != "tidewater") {
            println!(
                "- vs {}: publish {:.1}x, consume+ack {:.1}x, p99 {:.2}x, RSS {:.2}x, CPU/msg {:.2}x",
                r.system,
                tw.publish_per_s / r.publish_per_s,
                tw.consume_per_s / r.consume_per_s,
                tw.p99_ms / r.p99_ms,
                tw.rss_mib / r.rss_mib,
                tw.cpu_us_per_msg / r.cpu_us_per_msg
            );
        }
    }
    Ok(())
}
