//! `tidewater scenario NAME`: replays an incident from the brief against an embedded broker
//! twice, without and with the policy that answers it, and prints the figures from the
//! broker's own counters side by side. Time is simulated (a manual clock), so a scenario of
//! minutes runs in seconds and gives the same figures on any machine.
// Output goes through `outln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};
use tidewater_core::clock::RandomJitter;
use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_core::queue::Delivery;
use tidewater_core::{AckLevel, Delay, NewMessage};

use crate::client::outln;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Name {
    /// One tenant publishes 95% of the work (fairness).
    TenantSkew,
    /// An email provider that allows 100 requests a second (dispatch rate).
    EmailRate,
    /// 100,000 cache invalidations over 10,000 keys (coalescing).
    CacheStorm,
    /// Every cron job fires on the hour (delay jitter).
    CronBurst,
    /// Pushes to the same branches while builds run (supersede).
    CiSupersede,
    /// Producers outrun a slow consumer (bounded queue, Retry-After).
    SlowConsumer,
    /// IoT readings: one consumer falls 15 minutes behind; a group of 8 catches up.
    IotLag,
    /// A log flood on a small disk (retention by size).
    LogFlood,
    /// A webhook flood into a slow receiver that restarts mid-way (signed ingress, durable
    /// before 200, Retry-After, deduplication by delivery id).
    WebhookFlood,
    /// An order spike leaves a backlog of 120,000 with too few consumers; the forecast says
    /// how many to add and when it drains (backlog forecast).
    OrderSpike,
    /// Every scenario above.
    All,
}

#[derive(Debug, clap::Args)]
pub struct ScenarioArgs {
    /// Which incident to replay.
    #[arg(value_enum)]
    name: Name,
    /// A tenth of the sizes (what the tests run).
    #[arg(long)]
    small: bool,
}

/// One figure, before and after the policy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    pub what: &'static str,
    pub before: f64,
    pub after: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub incident: &'static str,
    pub policy: String,
    pub figures: Vec<Figure>,
}

#[cfg(test)]
impl Report {
    pub fn figure(&self, what: &str) -> &Figure {
        self.figures
            .iter()
            .find(|f| f.what == what)
            .expect("known figure")
    }
}

pub fn run(args: ScenarioArgs, json_out: bool) -> anyhow::Result<()> {
    let names = match args.name {
        Name::All => vec![
            Name::TenantSkew,
            Name::EmailRate,
            Name::CacheStorm,
            Name::CronBurst,
            Name::CiSupersede,
            Name::SlowConsumer,
            Name::IotLag,
            Name::LogFlood,
            Name::WebhookFlood,
            Name::OrderSpike,
        ],
        one => vec![one],
    };
    let scale = if args.small { 10 } else { 1 };
    let mut reports = Vec::new();
    for name in names {
        let report = replay(name, scale)?;
        if !json_out {
            print_report(&report);
        }
        reports.push(report);
    }
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}

fn print_report(report: &Report) {
    outln!("== {}: {}", report.scenario, report.incident);
    outln!("   policy: {}", report.policy);
    let width = report
        .figures
        .iter()
        .map(|f| f.what.len())
        .max()
        .unwrap_or(0);
    outln!("   {:width$}  {:>12}  {:>12}", "", "before", "after");
    for f in &report.figures {
        outln!(
            "   {:width$}  {:>12}  {:>12}",
            f.what,
            show(f.before),
            show(f.after)
        );
    }
    outln!();
}

fn show(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.3}")
    }
}

/// Runs one scenario at 1/`scale` of its size.
pub fn replay(name: Name, scale: usize) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match name {
            Name::TenantSkew => tenant_skew(scale).await,
            Name::EmailRate => email_rate(scale).await,
            Name::CacheStorm => cache_storm(scale).await,
            Name::CronBurst => cron_burst(scale).await,
            Name::CiSupersede => ci_supersede(scale).await,
            Name::SlowConsumer => slow_consumer(scale).await,
            Name::IotLag => iot_lag(scale).await,
            Name::LogFlood => log_flood(scale).await,
            Name::WebhookFlood => webhook_flood(scale).await,
            Name::OrderSpike => order_spike(scale).await,
            Name::All => unreachable!("expanded by the caller"),
        }
    })
}

/// The shared harness (`tidewater_core::harness`): a broker on a temporary directory with
/// simulated time, and real randomness for jitter.
struct Sim {
    harness: Harness,
}

impl Sim {
    fn new() -> anyhow::Result<Sim> {
        Sim::with(HarnessOptions::default())
    }

    fn with(options: HarnessOptions) -> anyhow::Result<Sim> {
        let harness = Harness::temporary(HarnessOptions {
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            jitter: Arc::new(RandomJitter),
            ..options
        })
        .context("opening the scenario's broker")?;
        Ok(Sim { harness })
    }

    async fn queue(&self, name: &str, config: Value) -> anyhow::Result<()> {
        Ok(self.harness.queue(name, config).await?)
    }

    async fn publish(&self, queue: &str, messages: Vec<NewMessage>) -> anyhow::Result<()> {
        self.harness.publish(queue, &messages).await?;
        Ok(())
    }

    async fn receive(&self, queue: &str, max: usize) -> anyhow::Result<Vec<Delivery>> {
        Ok(self.harness.receive(queue, max).await?)
    }

    async fn ack(&self, queue: &str, deliveries: &[Delivery]) -> anyhow::Result<()> {
        Ok(self.harness.ack(queue, deliveries).await?)
    }

    async fn advance(&self, ms: i64) {
        self.harness.advance(ms).await;
    }

    fn stats(&self, queue: &str) -> anyhow::Result<tidewater_core::queue::QueueStats> {
        Ok(self.harness.stats(queue)?)
    }
}

fn message(body: String) -> NewMessage {
    NewMessage {
        body: body.into_bytes(),
        ..NewMessage::default()
    }
}

fn tenant_of(d: &Delivery) -> String {
    tidewater_core::broker::header(&d.record, "tidewater-tenant").unwrap_or_default()
}

/// Incident 20: one tenant starves the others.
async fn tenant_skew(scale: usize) -> anyhow::Result<Report> {
    let total = 20_000 / scale;
    // While every tenant still has work waiting (the small ones hold total / 80 each).
    let deliveries = total / 20;
    let tenants = ["big", "t1", "t2", "t3", "t4"];
    let mut figures = [[0.0; 3]; 2];
    for (run, config) in [json!({}), json!({"fairness": {"by": "tenant"}})]
        .into_iter()
        .enumerate()
    {
        let sim = Sim::new()?;
        sim.queue("jobs", config).await?;
        let messages = (0..total)
            .map(|i| NewMessage {
                tenant: Some(
                    if i % 20 == 0 {
                        tenants[1 + i / 20 % 4]
                    } else {
                        "big"
                    }
                    .into(),
                ),
                ..message(format!("job {i}"))
            })
            .collect();
        sim.publish("jobs", messages).await?;
        let mut per_tenant: HashMap<String, f64> = HashMap::new();
        let mut done = 0;
        while done < deliveries {
            let got = sim.receive("jobs", 10).await?;
            for d in &got {
                *per_tenant.entry(tenant_of(d)).or_default() += 1.0;
            }
            done += got.len();
            sim.ack("jobs", &got).await?;
        }
        let shares: Vec<f64> = tenants
            .iter()
            .map(|t| per_tenant.get(*t).copied().unwrap_or(0.0))
            .collect();
        let small: f64 = shares[1..].iter().sum();
        figures[run] = [
            shares[0] / done as f64 * 100.0,
            small,
            tidewater_core::policy::shaper::jain_index(&shares),
        ];
    }
    Ok(Report {
        scenario: "tenant-skew",
        incident: "one tenant publishes 95% of the work; the other four wait behind it",
        policy: r#"fairness {"by": "tenant"}"#.into(),
        figures: vec![
            fig("big tenant's share of deliveries (%)", figures, 0),
            fig("small tenants' jobs done", figures, 1),
            fig("Jain's fairness index (1 = even)", figures, 2),
        ],
    })
}

/// Figure `i` of a scenario's two runs (before, after).
fn fig<const N: usize>(what: &'static str, values: [[f64; N]; 2], i: usize) -> Figure {
    Figure {
        what,
        before: values[0][i],
        after: values[1][i],
    }
}

/// Incident 7: an email provider limits 100 requests a second.
async fn email_rate(scale: usize) -> anyhow::Result<Report> {
    let total = 2_000 / scale.min(4);
    let seconds = 10;
    let mut figures = [[0.0; 3]; 2];
    for (run, config) in [
        json!({}),
        json!({"dispatch_rate": {"per_s": 100, "burst": 10}}),
    ]
    .into_iter()
    .enumerate()
    {
        let sim = Sim::new()?;
        sim.queue("email", config).await?;
        sim.publish(
            "email",
            (0..total).map(|i| message(format!("mail {i}"))).collect(),
        )
        .await?;
        // A greedy sender polls every 10 ms and sends all it gets.
        let mut sent_at = Vec::new();
        for tick in 0..seconds * 100 {
            let got = sim.receive("email", 1_000).await?;
            sent_at.extend(std::iter::repeat_n(tick * 10, got.len()));
            sim.ack("email", &got).await?;
            sim.advance(10).await;
        }
        let busiest = (0..seconds * 1_000)
            .step_by(10)
            .map(|start| {
                sent_at
                    .iter()
                    .filter(|&&t| t >= start && t < start + 1_000)
                    .count()
            })
            .max()
            .unwrap_or(0);
        figures[run] = [busiest as f64, sent_at.len() as f64, 0.0];
    }
    Ok(Report {
        scenario: "email-rate",
        incident: "the provider allows 100 requests/s; a backlog drains at full speed and the domain is blocked",
        policy: r#"dispatch_rate {"per_s": 100, "burst": 10}"#.into(),
        figures: vec![
            fig("most sends in any one second", figures, 0),
            fig("sent in 10 s", figures, 1),
        ],
    })
}

/// Incident 9: a cache-invalidation storm, most events repeats.
async fn cache_storm(scale: usize) -> anyhow::Result<Report> {
    let (events, keys) = (100_000 / scale, 10_000 / scale);
    let mut figures = [[0.0; 3]; 2];
    for (run, config) in [
        json!({}),
        json!({"coalesce": {"window_ms": 1000, "mode": "latest"}}),
    ]
    .into_iter()
    .enumerate()
    {
        let sim = Sim::new()?;
        sim.queue("invalidate", config).await?;
        // The storm arrives over one second, in ten bursts.
        for burst in 0..10 {
            let messages = (0..events / 10)
                .map(|i| NewMessage {
                    key: Some(format!("product:{}", (burst * events / 10 + i) % keys)),
                    ..message(format!("purge {i}"))
                })
                .collect();
            sim.publish("invalidate", messages).await?;
            sim.advance(100).await;
        }
        sim.advance(1_000).await;
        let mut delivered = 0;
        loop {
            let got = sim.receive("invalidate", 5_000).await?;
            if got.is_empty() {
                break;
            }
            delivered += got.len();
            sim.ack("invalidate", &got).await?;
        }
        let stats = sim.stats("invalidate")?;
        figures[run] = [events as f64, delivered as f64, stats.coalesced_in as f64];
    }
    Ok(Report {
        scenario: "cache-storm",
        incident: "100,000 invalidations over 10,000 keys in a second; the cache cluster melts",
        policy: r#"coalesce {"window_ms": 1000, "mode": "latest"}"#.into(),
        figures: vec![
            fig("events published", figures, 0),
            fig("purges delivered", figures, 1),
            fig("events coalesced (broker counter)", figures, 2),
        ],
    })
}

/// Incident 4: every cron job fires on the hour.
async fn cron_burst(scale: usize) -> anyhow::Result<Report> {
    let jobs = 10_000 / scale;
    let mut figures = [[0.0; 3]; 2];
    for (run, jitter) in [None, Some(60_000)].into_iter().enumerate() {
        let sim = Sim::new()?;
        sim.queue("reports", json!({})).await?;
        let messages = (0..jobs)
            .map(|i| NewMessage {
                delay: Delay::AfterMs(60_000),
                jitter_ms: jitter,
                ..message(format!("report {i}"))
            })
            .collect();
        sim.publish("reports", messages).await?;
        sim.advance(60_000).await;
        // Workers take whatever is due, every 100 ms, for two minutes.
        let mut per_second = vec![0usize; 121];
        for tick in 0..1_200 {
            let got = sim.receive("reports", 10_000).await?;
            per_second[tick / 10] += got.len();
            sim.ack("reports", &got).await?;
            sim.advance(100).await;
        }
        let peak = per_second.iter().copied().max().unwrap_or(0);
        let busy = per_second.iter().filter(|&&n| n > 0).count();
        figures[run] = [
            peak as f64,
            busy as f64,
            per_second.iter().sum::<usize>() as f64,
        ];
    }
    Ok(Report {
        scenario: "cron-burst",
        incident: "every report is scheduled at 00:00; workers and database fall over, then idle",
        policy: "message jitter_ms 60000 on the same schedule".into(),
        figures: vec![
            fig("peak jobs started in one second", figures, 0),
            fig("seconds with jobs starting", figures, 1),
            fig("jobs run", figures, 2),
        ],
    })
}

/// CI "cancel in progress": pushes to the same branches while builds run.
async fn ci_supersede(scale: usize) -> anyhow::Result<Report> {
    let pushes = 60 / scale.min(3);
    let branches = ["main", "release", "feature"];
    let mut figures = [[0.0; 3]; 2];
    for (run, config) in [json!({}), json!({"supersede": true})]
        .into_iter()
        .enumerate()
    {
        let sim = Sim::new()?;
        sim.queue("builds", config).await?;
        // Two build agents; a build takes 120 s and checks every 10 s (extend) whether a
        // newer push replaced it, stopping early if so.
        let mut running: Vec<(Delivery, i64)> = Vec::new();
        let (mut finished, mut agent_ms) = (0, 0i64);
        let mut now = 0i64;
        let mut pushed = 0;
        while pushed < pushes || !running.is_empty() || sim.stats("builds")?.total > 0 {
            if pushed < pushes && now % 20_000 == 0 {
                let branch = branches[pushed % branches.len()];
                sim.publish(
                    "builds",
                    vec![NewMessage {
                        key: Some(branch.into()),
                        ..message(format!("{branch} @ push {pushed}"))
                    }],
                )
                .await?;
                pushed += 1;
            }
            let mut still = Vec::new();
            for (build, done_at) in running {
                let extended = sim.harness.broker().extend(
                    "builds",
                    std::slice::from_ref(&build.receipt),
                    Some(300_000),
                )?;
                if extended.failed.iter().any(|f| f.code == "superseded") {
                    agent_ms += 120_000 - (done_at - now);
                    sim.ack("builds", &[build]).await?;
                } else if now >= done_at {
                    finished += 1;
                    agent_ms += 120_000;
                    sim.ack("builds", &[build]).await?;
                } else {
                    still.push((build, done_at));
                }
            }
            running = still;
            if running.len() < 2 {
                for build in sim.receive("builds", 2 - running.len()).await? {
                    running.push((build, now + 120_000));
                }
            }
            sim.advance(10_000).await;
            now += 10_000;
        }
        figures[run] = [
            finished as f64,
            (agent_ms / 60_000) as f64,
            (now / 60_000) as f64,
        ];
    }
    Ok(Report {
        scenario: "ci-supersede",
        incident: "pushes every 20 s to three branches; every push queues a full 2-minute build",
        policy: "supersede true (older pending builds cancelled, running ones told on extend)"
            .into(),
        figures: vec![
            fig("builds run to the end", figures, 0),
            fig("agent-minutes spent", figures, 1),
            fig("minutes until the queue is idle", figures, 2),
        ],
    })
}

/// Incidents 1-2: producers outrun a slow consumer.
async fn slow_consumer(scale: usize) -> anyhow::Result<Report> {
    let seconds = 60 / scale.min(6);
    let mut figures = [[0.0; 3]; 2];
    for (run, config) in [json!({}), json!({"max_messages": 2000})]
        .into_iter()
        .enumerate()
    {
        let sim = Sim::new()?;
        sim.queue("orders", config).await?;
        let (mut peak, mut refused, mut waits) = (0u64, 0u64, Vec::new());
        for tick in 0..seconds * 10 {
            // The producer: 1,000/s in batches of 100 every 100 ms, obeying Retry-After by
            // dropping the batch back to its own buffer (not counted as published).
            let batch: Vec<NewMessage> = (0..100)
                .map(|i| message(format!("order {tick}/{i}")))
                .collect();
            match sim
                .harness
                .broker()
                .publish("orders", &batch, AckLevel::Durable)
                .await
            {
                Ok(_) => {}
                Err(err) => {
                    refused += 1;
                    waits.push(err.retry_after_ms.unwrap_or(0) as f64);
                }
            }
            // The consumer: 100/s.
            let got = sim.receive("orders", 10).await?;
            sim.ack("orders", &got).await?;
            peak = peak.max(sim.stats("orders")?.total);
            sim.advance(100).await;
        }
        waits.sort_by(f64::total_cmp);
        let median_wait = waits.get(waits.len() / 2).copied().unwrap_or(0.0);
        figures[run] = [peak as f64, refused as f64, median_wait / 1000.0];
    }
    Ok(Report {
        scenario: "slow-consumer",
        incident: "producers publish 1,000/s, the consumer handles 100/s; the backlog grows without bound",
        policy: r#"max_messages 2000 (429 queue_full with Retry-After from the drain rate)"#.into(),
        figures: vec![
            fig("largest backlog (messages)", figures, 0),
            fig("publishes refused", figures, 1),
            fig("median Retry-After (s)", figures, 2),
        ],
    })
}

/// Brief incidents 2 and 6: an order spike leaves 120,000 orders waiting for 4 workers
/// (each handles about 100 a second, every order taking 5 to 15 ms at random) while 100 a
/// second keep arriving. After 20 s of measuring, the forecast says when the backlog drains
/// with these 4, and how many workers drain it within 2 minutes. Before: the pool stays at
/// 4. After: it grows to the forecast's `consumers_needed` at once. Each run measures when
/// the backlog is first empty and compares it with what the forecast said at the start of
/// the drain (with the new pool: backlog / (consumers × per-consumer rate − arrivals)).
async fn order_spike(scale: usize) -> anyhow::Result<Report> {
    use tidewater_core::forecast::Objectives;
    use tidewater_core::{ForecastOptions, Subject};
    let backlog = 120_000 / scale;
    let warm_up_ms = 20_000;
    let drain_target_ms = 120_000 / scale as u64;
    let mut figures = [[0.0; 4]; 2];
    for (run, scale_up) in [false, true].into_iter().enumerate() {
        let sim = Sim::with(HarnessOptions {
            forecast: ForecastOptions {
                sample_interval_ms: 1_000,
                history_ms: 3_600_000,
                consumer_idle_ms: 5_000,
                objectives: Objectives {
                    rate_window_ms: 15_000,
                    age_objective_ms: 600_000,
                    drain_target_ms,
                },
            },
            ..HarnessOptions::default()
        })?;
        sim.queue("orders", json!({})).await?;
        let orders: Vec<NewMessage> = (0..backlog)
            .map(|i| message(format!("order {i}")))
            .collect();
        sim.publish("orders", orders).await?;
        let mut rng = fastrand::Rng::with_seed(7 + run as u64);
        // Each worker's time left over from the last tick (ms), and its next order's time.
        let mut workers: Vec<(f64, f64)> = Vec::new();
        let service_ms = |rng: &mut fastrand::Rng| 5.0 + rng.f64() * 10.0;
        let (mut now_ms, mut forecast, mut needed) = (0u64, 0.0, 4usize);
        let mut published = backlog;
        let drained_at = loop {
            let pool = if scale_up && now_ms >= warm_up_ms {
                needed
            } else {
                4
            };
            while workers.len() < pool {
                workers.push((0.0, service_ms(&mut rng)));
            }
            // 100 a second arrive: 5 to 15 each 100 ms.
            let arriving = 5 + rng.usize(0..=10);
            let batch: Vec<NewMessage> = (0..arriving)
                .map(|i| message(format!("order {published}+{i}")))
                .collect();
            published += arriving;
            sim.publish("orders", batch).await?;
            for (i, (budget, next)) in workers.iter_mut().enumerate() {
                *budget += 100.0;
                let mut can = 0;
                while *budget >= *next {
                    *budget -= *next;
                    *next = service_ms(&mut rng);
                    can += 1;
                }
                if can > 0 {
                    let got = sim
                        .harness
                        .receive_as(&format!("worker-{i}"), "orders", can)
                        .await?;
                    if got.len() < can {
                        *budget = 0.0; // idle: time does not bank up
                    }
                    sim.ack("orders", &got).await?;
                }
            }
            sim.advance(100).await;
            now_ms += 100;
            if now_ms == warm_up_ms {
                let f = sim
                    .harness
                    .broker()
                    .forecast(&Subject::Queue("orders".into()), None)?;
                let per_consumer = f.per_consumer_per_s.context("a per-consumer rate")?;
                let arrival = f.arrival_per_s.context("an arrival rate")?;
                needed = f.consumers_needed as usize;
                forecast = if scale_up {
                    f.backlog as f64 / (needed as f64 * per_consumer - arrival)
                } else {
                    f.drain_ms.context("a drain time")? as f64 / 1000.0
                };
                figures[run][0] = if scale_up { needed as f64 } else { 4.0 };
            }
            if now_ms > warm_up_ms && sim.stats("orders")?.depth == 0 {
                break now_ms;
            }
            anyhow::ensure!(now_ms < 3_600_000, "the backlog did not drain in an hour");
        };
        let measured = (drained_at - warm_up_ms) as f64 / 1000.0;
        figures[run][1] = forecast.round();
        figures[run][2] = measured.round();
        // (+ 0.0: no "-0" in the report.)
        figures[run][3] = ((forecast - measured) / measured * 100.0).round() + 0.0;
    }
    Ok(Report {
        scenario: "order-spike",
        incident: "an order spike leaves 120,000 orders (12,000 with --small) to 4 workers while 100/s keep arriving",
        policy: format!(
            "forecast after 20 s: workers scaled to consumers_needed (drain within {} s)",
            drain_target_ms / 1000
        ),
        figures: vec![
            fig("workers", figures, 0),
            fig("forecast drain at its start (s)", figures, 1),
            fig("measured drain (s)", figures, 2),
            fig("forecast error (%)", figures, 3),
        ],
    })
}

/// Brief incident 15: a provider floods a receiver with 2,000 signed webhooks a second for
/// 10 s; the receiver handles 500 a second and restarts 5 s in (a deploy, a crash). Before:
/// a typical receiver answers 200 at once and keeps the events in memory for its workers;
/// the restart loses what was waiting, and the provider, told 200, never sends them again.
/// After: a tidewater hook (GitHub's signature) in front of a queue of 5,000: 200 only once
/// the event is durable, 429 with Retry-After when the queue is full (the provider retries
/// then), and a delivery id seen before answered 200 without storing it twice. The
/// provider retries any answer but 2xx, at Retry-After (or after 1 s), as providers do.
async fn webhook_flood(scale: usize) -> anyhow::Result<Report> {
    use std::collections::{BTreeMap, VecDeque};

    use tidewater_core::hook::{HookPatch, HookRequest};
    use tidewater_core::{ErrorCode, Ingested};

    const SECRET: &str = "webhook-flood-secret";
    let per_tick = 200 / scale as u64; // 2,000/s (small: 200/s), in ticks of 100 ms
    let handled_per_tick = per_tick / 4; // the receiver: a quarter of the rate
    let flood_ticks = 100u64; // 10 s
    let restart_tick = 50;
    let total = per_tick * flood_ticks;
    let sign = |body: &[u8]| tidewater_auth::webhook::sign_github(SECRET.as_bytes(), body);
    let mut figures = [[0.0; 5]; 2];
    for (run, figure) in figures.iter_mut().enumerate() {
        let tidewater = run == 1;
        let mut sim = Sim::new()?;
        if tidewater {
            sim.queue("github", json!({"max_messages": 5_000 / scale}))
                .await?;
            let patch: HookPatch = serde_json::from_value(json!({
                "target": {"queue": "github"},
                "signature": {"preset": "github", "secrets": [SECRET]}
            }))?;
            sim.harness.broker().put_hook("github", &patch).await?;
        }
        // The naive receiver's memory: events answered 200 and not yet handled.
        let mut memory: VecDeque<u64> = VecDeque::new();
        let mut acknowledged = vec![false; total as usize];
        let mut attempts = vec![0u32; total as usize];
        let mut handled: BTreeMap<u64, u32> = BTreeMap::new();
        // (tick due, delivery) the provider sends again.
        let mut retries: Vec<(u64, u64)> = Vec::new();
        let (mut refusals, mut lost_in_restart) = (0u64, 0u64);
        let mut tick = 0u64;
        while tick < flood_ticks || !retries.is_empty() || (!tidewater && !memory.is_empty()) {
            anyhow::ensure!(tick < 100_000, "the scenario did not settle");
            let mut sends: Vec<u64> = Vec::new();
            if tick < flood_ticks {
                sends.extend(tick * per_tick..(tick + 1) * per_tick);
            }
            retries.retain(|&(due, d)| {
                if due <= tick {
                    sends.push(d);
                    false
                } else {
                    true
                }
            });
            for delivery in sends {
                if !tidewater {
                    memory.push_back(delivery);
                    acknowledged[delivery as usize] = true;
                    continue;
                }
                let body = format!(r#"{{"delivery":{delivery}}}"#);
                let signature = sign(body.as_bytes());
                let id = format!("{delivery}");
                let headers = [
                    ("x-hub-signature-256", signature.as_str()),
                    ("x-github-delivery", id.as_str()),
                ];
                let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
                let request = HookRequest {
                    header: &lookup,
                    body: body.as_bytes(),
                };
                match sim.harness.broker().ingest("github", &request).await {
                    Ok(Ingested::Accepted { .. } | Ingested::Duplicate { .. }) => {
                        acknowledged[delivery as usize] = true;
                    }
                    Ok(Ingested::Challenge(_)) => anyhow::bail!("no challenge was sent"),
                    Err(err) => {
                        anyhow::ensure!(
                            err.code != ErrorCode::InvalidSignature,
                            "the scenario signs every webhook: {err}"
                        );
                        refusals += 1;
                        // Providers back off exponentially, never sooner than Retry-After.
                        let attempt = &mut attempts[delivery as usize];
                        *attempt += 1;
                        let backoff_ms = 1_000u64 << (*attempt).min(6);
                        let wait_ms = err.retry_after_ms.unwrap_or(0).max(backoff_ms);
                        retries.push((tick + wait_ms.div_ceil(100), delivery));
                    }
                }
            }
            // The receiver's workers.
            if tidewater {
                let got = sim.receive("github", handled_per_tick as usize).await?;
                for d in &got {
                    let n: u64 = std::str::from_utf8(&d.record.id)?.parse()?;
                    *handled.entry(n).or_default() += 1;
                }
                sim.ack("github", &got).await?;
            } else {
                for _ in 0..handled_per_tick {
                    let Some(n) = memory.pop_front() else { break };
                    *handled.entry(n).or_default() += 1;
                }
            }
            if tick == restart_tick {
                if tidewater {
                    sim.harness.restart();
                } else {
                    lost_in_restart = memory.len() as u64;
                    memory.clear();
                }
            }
            sim.advance(100).await;
            tick += 1;
        }
        // After the flood, the receiver drains what it holds.
        while tidewater && sim.stats("github")?.total > 0 {
            let got = sim.receive("github", 1_000).await?;
            for d in &got {
                let n: u64 = std::str::from_utf8(&d.record.id)?.parse()?;
                *handled.entry(n).or_default() += 1;
            }
            sim.ack("github", &got).await?;
            sim.advance(100).await;
        }
        let acked = acknowledged.iter().filter(|a| **a).count() as f64;
        let lost = (0..total)
            .filter(|d| acknowledged[*d as usize] && !handled.contains_key(d))
            .count() as f64;
        let twice = handled.values().filter(|n| **n > 1).count() as f64;
        *figure = [acked, lost, twice, refusals as f64, lost_in_restart as f64];
        sim.harness.restart(); // the store's threads end before the directory goes
    }
    Ok(Report {
        scenario: "webhook-flood",
        incident: "a provider sends 2,000 webhooks/s for 10 s to a receiver that handles 500/s and restarts 5 s in",
        policy: r#"a hook (preset github) into a queue of 5,000: 200 only once durable, 429 + Retry-After when full, replays deduplicated by X-GitHub-Delivery"#.into(),
        figures: vec![
            fig("webhooks answered 200", figures, 0),
            fig("answered 200 and never handled (lost)", figures, 1),
            fig("handled more than once", figures, 2),
            fig("refused with Retry-After (sent again later)", figures, 3),
            fig("waiting in memory at the restart", figures, 4),
        ],
    })
}

/// Brief incident 1: a service starts logging 1 MB a second into a stream of 4 partitions
/// on a 32 MiB disk whose watermark is 4 MiB. Without retention (before) the disk fills and
/// the broker stops taking produces (507 disk_full: the watermark is the only defence);
/// with retention by size (after: 2 MiB per partition) disk use levels off and every
/// produce is taken. Disk use is what the broker's files take (its partitions' segments and
/// the journal), checked at every produce against a simulated disk.
async fn log_flood(scale: usize) -> anyhow::Result<Report> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tidewater_core::stream::config::StreamPatch;
    use tidewater_core::stream::records::NewStreamRecord;

    const DISK: u64 = 32 << 20;
    const RECORD: usize = 1_000;
    const PER_SECOND: usize = 1_000;
    let seconds = 120 / scale as u64;
    let mut figures = [[0.0; 6]; 2];
    for (run, retention_bytes) in [-1i64, 2 << 20].into_iter().enumerate() {
        let harness = Harness::temporary(HarnessOptions {
            start_ms: 1_767_225_600_000,
            store: tidewater_storage::StoreOptions {
                fsync: false,
                segment_roll_bytes: 512 << 10,
                checkpoint_interval: std::time::Duration::from_secs(3_600),
                ..tidewater_storage::StoreOptions::default()
            },
            limits: tidewater_core::Limits {
                min_free_disk_bytes: 4 << 20,
                ..tidewater_core::Limits::default()
            },
            ..HarnessOptions::default()
        })
        .context("opening the scenario's broker")?;
        let broker = harness.broker().clone();
        let used = Arc::new(AtomicU64::new(0));
        let probe = used.clone();
        broker.set_disk_probe(Box::new(move || {
            Ok(DISK.saturating_sub(probe.load(Ordering::Relaxed)))
        }));
        broker
            .put_stream(
                "logs",
                &StreamPatch {
                    partitions: Some(4),
                    retention_bytes: Some(retention_bytes),
                    ..StreamPatch::default()
                },
            )
            .await?;
        // (what the broker's files take, the largest partition's segments)
        let measure = |broker: &tidewater_core::Broker| -> anyhow::Result<(u64, u64)> {
            let info = broker.get_stream("logs")?;
            let segments: u64 = info.partitions.iter().map(|p| p.bytes).sum();
            let largest = info.partitions.iter().map(|p| p.bytes).max().unwrap_or(0);
            Ok((segments + broker.store().journal_bytes(), largest))
        };
        let line = "x".repeat(RECORD);
        let (mut peak, mut peak_partition, mut refused, mut taken) = (0u64, 0u64, 0u64, 0u64);
        for _ in 0..seconds {
            // Ten produces of 100 lines a second.
            for _ in 0..10 {
                let records: Vec<NewStreamRecord> = (0..PER_SECOND / 10)
                    .map(|i| NewStreamRecord {
                        key: Some(format!("host-{}", i % 16).into_bytes()),
                        value: Some(line.clone().into_bytes()),
                        ..NewStreamRecord::default()
                    })
                    .collect();
                match broker.produce("logs", &records, AckLevel::Written).await {
                    Ok(_) => taken += records.len() as u64,
                    Err(_) => refused += 1,
                }
                let (now, partition) = measure(&broker)?;
                used.store(now, Ordering::Relaxed);
                peak = peak.max(now);
                peak_partition = peak_partition.max(partition);
            }
            harness.advance(1_000).await;
            // What a real second gives the writer: time to finish the checkpoint retention
            // asked for.
            broker.store().wait_idle();
            used.store(measure(&broker)?.0, Ordering::Relaxed);
        }
        let info = broker.get_stream("logs")?;
        let kept: u64 = info
            .partitions
            .iter()
            .map(|p| p.end_offset - p.start_offset)
            .sum();
        let deleted: u64 = broker
            .stream_counters()
            .iter()
            .map(|(_, c)| c.deleted_records)
            .sum();
        figures[run] = [
            peak as f64 / f64::from(1 << 20),
            peak_partition as f64 / f64::from(1 << 20),
            refused as f64,
            taken as f64,
            deleted as f64,
            kept as f64,
        ];
    }
    let fig = |what: &'static str, i: usize| Figure {
        what,
        before: (figures[0][i] * 10.0).round() / 10.0,
        after: (figures[1][i] * 10.0).round() / 10.0,
    };
    Ok(Report {
        scenario: "log-flood",
        incident: "a service logs 1 MB/s into a stream on a 32 MiB disk (watermark 4 MiB); the disk fills and the broker stops taking writes",
        policy: "retention_bytes 2 MiB per partition (whole sealed segments deleted, oldest first)"
            .into(),
        figures: vec![
            fig("largest disk use, segments and journal (MiB)", 0),
            fig("largest partition's segments (MiB)", 1),
            fig("produces refused (disk_full)", 2),
            fig("records taken", 3),
            fig("records deleted by retention", 4),
            fig("records kept at the end", 5),
        ],
    })
}

/// A group member in the IoT scenario: what it holds and where it is in each partition.
struct Reader {
    id: String,
    owned: std::collections::BTreeSet<(String, u32)>,
    next: HashMap<u32, u64>,
}

/// Brief incident 5: sensors produce 200 readings a second into a stream of 8 partitions;
/// one consumer handles 100 a second and falls behind by half of every minute. At the
/// incident (30 minutes in, 15 minutes behind) a group of 8 takes over (after) or the lone
/// consumer carries on (before). The lag figures are the broker's own (describe_group).
async fn iot_lag(scale: usize) -> anyhow::Result<Report> {
    use tidewater_core::stream::config::StreamPatch;
    use tidewater_core::stream::records::NewStreamRecord;

    const TICK_S: u64 = 10;
    const PRODUCE_PER_S: u64 = 200;
    const CONSUME_PER_S: u64 = 100;
    let incident_s = 1_800 / scale as u64;
    let after_s = 600 / scale as u64;
    let mut figures = [[0.0; 5]; 2];
    for (run, members) in [1usize, 8].into_iter().enumerate() {
        let sim = Sim::new()?;
        let broker = sim.harness.broker().clone();
        broker
            .put_stream(
                "readings",
                &StreamPatch {
                    partitions: Some(8),
                    ..StreamPatch::default()
                },
            )
            .await?;
        let streams = ["readings".to_string()];
        let mut readers = vec![Reader {
            id: broker.join_group("ingest", None, &streams, 30_000)?,
            owned: Default::default(),
            next: HashMap::new(),
        }];
        let lag = |broker: &tidewater_core::Broker| {
            let broker = broker.clone();
            async move {
                let group = broker.describe_group("ingest").await?;
                let records: u64 = group.offsets.iter().map(|o| o.lag).sum();
                let seconds = group.offsets.iter().map(|o| o.lag_ms).max().unwrap_or(0);
                anyhow::Ok((records as f64, seconds as f64 / 1000.0))
            }
        };
        let mut consumed_after = 0u64;
        let mut at_incident = (0.0, 0.0);
        let ticks = (incident_s + after_s) / TICK_S;
        for tick in 0..ticks {
            let now_s = tick * TICK_S;
            if now_s == incident_s {
                at_incident = lag(&broker).await?;
                for _ in 1..members {
                    readers.push(Reader {
                        id: broker.join_group("ingest", None, &streams, 30_000)?,
                        owned: Default::default(),
                        next: HashMap::new(),
                    });
                }
            }
            // The sensors: 1,000 of them, keyed by sensor, for this tick.
            let readings: Vec<NewStreamRecord> = (0..PRODUCE_PER_S * TICK_S)
                .map(|i| NewStreamRecord {
                    key: Some(format!("sensor-{}", (tick * 7 + i) % 1_000).into_bytes()),
                    value: Some(format!("{{\"t\":{now_s},\"v\":{}}}", i % 50).into_bytes()),
                    ..NewStreamRecord::default()
                })
                .collect();
            // Durable before the members read: fetches see durable records only, and a
            // written-only produce could still be syncing when they read (under load, the
            // last tick's records were left behind and the lag was not 0).
            broker
                .produce("readings", &readings, AckLevel::Durable)
                .await?;
            // Each member: heartbeat (give up what is revoked, committing it first), then
            // read what it can this tick from what it holds, then commit.
            for reader in &mut readers {
                let mut assignment = broker.heartbeat("ingest", &reader.id, &reader.owned)?;
                if !assignment.revoked.is_empty() {
                    commit_reader(&broker, reader).await?;
                    for tp in &assignment.revoked {
                        reader.owned.remove(tp);
                        reader.next.remove(&tp.1);
                    }
                    assignment = broker.heartbeat("ingest", &reader.id, &reader.owned)?;
                }
                for tp in assignment.assigned {
                    let start = broker
                        .committed("ingest", &tp.0, tp.1)
                        .await
                        .map_or(0, |c| c.offset);
                    reader.next.insert(tp.1, start);
                    reader.owned.insert(tp);
                }
                let mut budget = CONSUME_PER_S * TICK_S;
                let partitions: Vec<u32> = reader.owned.iter().map(|tp| tp.1).collect();
                // Round robin over what it holds, so every partition moves.
                let share = budget.div_ceil(partitions.len().max(1) as u64);
                for p in partitions {
                    let from = reader.next[&p];
                    let (records, _, _) = broker
                        .fetch_records("readings", p, from, 32 << 10, 0)
                        .await?;
                    let take = (records.len() as u64).min(share).min(budget);
                    if take > 0 {
                        reader.next.insert(p, records[take as usize - 1].offset + 1);
                        budget -= take;
                        if now_s >= incident_s {
                            consumed_after += take;
                        }
                    }
                }
                commit_reader(&broker, reader).await?;
            }
            sim.advance((TICK_S * 1_000) as i64).await;
        }
        let end = lag(&broker).await?;
        figures[run] = [
            at_incident.0,
            at_incident.1,
            end.0,
            end.1,
            consumed_after as f64 / after_s as f64,
        ];
    }
    Ok(Report {
        scenario: "iot-lag",
        incident: "sensors produce 200 readings/s; one consumer handles 100/s and falls 15 minutes behind",
        policy:
            "a consumer group of 8 on a stream of 8 partitions (the broker assigns, members commit)"
                .into(),
        figures: vec![
            fig("lag at the incident (records)", figures, 0),
            fig("lag at the incident (seconds)", figures, 1),
            fig("lag 10 minutes later (records)", figures, 2),
            fig("lag 10 minutes later (seconds)", figures, 3),
            fig("records consumed per second since", figures, 4),
        ],
    })
}

/// Commits where a member is in each partition it holds.
async fn commit_reader(broker: &tidewater_core::Broker, reader: &Reader) -> anyhow::Result<()> {
    let commits: Vec<(String, u32, u64, String)> = reader
        .owned
        .iter()
        .map(|(stream, p)| (stream.clone(), *p, reader.next[p], String::new()))
        .collect();
    broker
        .commit_as_member("ingest", Some(&reader.id), &commits)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scenario, small: the policy must change the figure it is for.
    #[test]
    fn scenarios_show_each_policy_at_work() {
        let r = replay(Name::TenantSkew, 10).unwrap();
        let jain = r.figure("Jain's fairness index (1 = even)");
        assert!(jain.before < 0.5 && jain.after >= 0.95, "{r:?}");

        let r = replay(Name::EmailRate, 10).unwrap();
        let busiest = r.figure("most sends in any one second");
        assert!(busiest.before > 110.0 && busiest.after <= 110.0, "{r:?}");

        let r = replay(Name::CacheStorm, 10).unwrap();
        let purges = r.figure("purges delivered");
        assert_eq!((purges.before, purges.after), (10_000.0, 1_000.0), "{r:?}");

        let r = replay(Name::CronBurst, 10).unwrap();
        let peak = r.figure("peak jobs started in one second");
        assert!(peak.after * 5.0 < peak.before, "{r:?}");
        let jobs = r.figure("jobs run");
        assert_eq!((jobs.before, jobs.after), (1_000.0, 1_000.0), "{r:?}");

        let r = replay(Name::CiSupersede, 10).unwrap();
        let spent = r.figure("agent-minutes spent");
        assert!(spent.after < spent.before, "{r:?}");

        let r = replay(Name::SlowConsumer, 10).unwrap();
        let backlog = r.figure("largest backlog (messages)");
        assert!(
            backlog.before > 2_000.0 && backlog.after <= 2_000.0,
            "{r:?}"
        );
        assert!(r.figure("publishes refused").after > 0.0, "{r:?}");

        let r = replay(Name::IotLag, 10).unwrap();
        let at = r.figure("lag at the incident (seconds)");
        // 3 minutes in (small), half of it behind: 90 s on average, more in the partition
        // its keys load most (the broker reports the oldest unconsumed record's age).
        assert!((80.0..=130.0).contains(&at.before), "{r:?}");
        let later = r.figure("lag 10 minutes later (records)");
        assert!(later.before > 20_000.0 && later.after == 0.0, "{r:?}");
        assert_eq!(
            r.figure("lag 10 minutes later (seconds)").after,
            0.0,
            "{r:?}"
        );

        let r = replay(Name::OrderSpike, 10).unwrap();
        for run in [
            r.figure("forecast error (%)").before,
            r.figure("forecast error (%)").after,
        ] {
            assert!(run.abs() <= 20.0, "{r:?}");
        }
        let workers = r.figure("workers");
        assert!(workers.after > workers.before, "{r:?}");
        let drain = r.figure("measured drain (s)");
        assert!(drain.after < drain.before, "{r:?}");

        let r = replay(Name::WebhookFlood, 10).unwrap();
        let lost = r.figure("answered 200 and never handled (lost)");
        assert!(lost.before > 0.0 && lost.after == 0.0, "{r:?}");
        let answered = r.figure("webhooks answered 200");
        assert_eq!(
            (answered.before, answered.after),
            (2_000.0, 2_000.0),
            "{r:?}"
        );
        assert_eq!(r.figure("handled more than once").after, 0.0, "{r:?}");
        assert!(
            r.figure("refused with Retry-After (sent again later)")
                .after
                > 0.0,
            "{r:?}"
        );
    }
}
