//! Prometheus metrics. Labels are the queue name (bounded by `max_queues`), for
//! refusals a fixed set of reasons, and for quota refusals at most 20 tenants per queue
//! plus "other"; for streams, groups and subscriptions their names (bounded by
//! `max_streams`, `max_groups` and `max_subscriptions`): never a message id or key, and
//! partitions only in the series capped by `max_partition_metrics`.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tidewater_core::{Broker, Observer};

use crate::listener::Stats as ListenerStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    queue: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    queue: String,
    priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    queue: String,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookRefusedLabel {
    hook: String,
    reason: String,
}

type HistogramFamily = Family<QueueLabel, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabel {
    push: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushReplyLabel {
    push: String,
    class: String,
}

pub struct Metrics {
    registry: Registry,
    publish_latency: HistogramFamily,
    publish_to_ack: HistogramFamily,
    hook_latency: Family<HookLabel, Histogram, fn() -> Histogram>,
    push_latency: Family<PushLabel, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~52 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

fn age_histogram() -> Histogram {
    // 1 ms .. ~9 h
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

impl Metrics {
    pub fn new(
        broker: Arc<OnceLock<Broker>>,
        listeners: Listeners,
        kafka_requests: Arc<tidewater_kafka::KafkaStats>,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("tidewater");
        let commit = env!("TIDEWATER_COMMIT");
        registry.register(
            "build",
            "The running build: its version and the commit it was built from (value 1)",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                (
                    "commit",
                    commit
                        .split_whitespace()
                        .next()
                        .unwrap_or(commit)
                        .to_string(),
                ),
            ]),
        );
        let publish_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let publish_to_ack: HistogramFamily = Family::new_with_constructor(age_histogram);
        registry.register(
            "publish_latency_seconds",
            "Time to accept a publish request, at its ack level",
            publish_latency.clone(),
        );
        registry.register(
            "publish_to_ack_seconds",
            "Time from a message's publish to its ack",
            publish_to_ack.clone(),
        );
        let hook_latency: Family<HookLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "hook_durable_seconds",
            "Time from a webhook's arrival to its event being durable (accepted events)",
            hook_latency.clone(),
        );
        registry.register_collector(Box::new(HookCollector {
            broker: broker.clone(),
        }));
        let push_latency: Family<PushLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "push_request_seconds",
            "Time of a push endpoint's requests, from send to reply (or timeout)",
            push_latency.clone(),
        );
        registry.register_collector(Box::new(PushCollector {
            broker: broker.clone(),
        }));
        registry.register_collector(Box::new(ForecastCollector {
            broker: broker.clone(),
        }));
        registry.register_collector(Box::new(QueueCollector { broker }));
        registry.register_collector(Box::new(ListenerCollector {
            listeners,
            kafka: kafka_requests.clone(),
        }));
        registry.register_collector(Box::new(KafkaCollector {
            stats: kafka_requests,
        }));
        Metrics {
            registry,
            publish_latency,
            publish_to_ack,
            hook_latency,
            push_latency,
        }
    }

    /// A push endpoint is gone: forget its series.
    pub fn push_deleted(&self, push: &str) {
        self.push_latency.remove(&PushLabel {
            push: push.to_string(),
        });
    }

    /// A push endpoint's request ended after `seconds`.
    pub fn push_latency(&self, push: &str, seconds: f64) {
        self.push_latency
            .get_or_create(&PushLabel {
                push: push.to_string(),
            })
            .observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

impl Observer for Metrics {
    fn queue_deleted(&self, queue: &str) {
        let label = QueueLabel {
            queue: queue.to_string(),
        };
        self.publish_latency.remove(&label);
        self.publish_to_ack.remove(&label);
    }

    fn hook_latency(&self, hook: &str, seconds: f64) {
        self.hook_latency
            .get_or_create(&HookLabel {
                hook: hook.to_string(),
            })
            .observe(seconds);
    }

    fn hook_deleted(&self, hook: &str) {
        self.hook_latency.remove(&HookLabel {
            hook: hook.to_string(),
        });
    }

    fn publish_latency(&self, queue: &str, seconds: f64) {
        self.publish_latency
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .observe(seconds);
    }

    fn publish_to_ack(&self, queue: &str, seconds: &[f64]) {
        let histogram = self.publish_to_ack.get_or_create(&QueueLabel {
            queue: queue.to_string(),
        });
        for &s in seconds {
            histogram.observe(s);
        }
    }
}

/// (metric name, help, how to read it from a queue, or another resource `R`).
type Stat<T, R = tidewater_core::QueueInfo> = (&'static str, &'static str, fn(&R) -> T);

/// Each listener's figures by its `listener` label: binary, http, kafka, hooks, keda,
/// console.
pub type Listeners = [(&'static str, Arc<ListenerStats>); 6];

/// A count as a metric's i64 (saturating: no count reaches it).
fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A family per stat (counters, or gauges), a series per item labelled by `label`.
fn encode_families<R, L, T>(
    encoder: &mut DescriptorEncoder<'_>,
    kind: prometheus_client::metrics::MetricType,
    stats: &[Stat<T, R>],
    items: &[R],
    label: impl Fn(&R) -> L,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet + Clone + std::fmt::Debug + std::hash::Hash + Eq,
    T: Into<i64>,
{
    for (name, help, value) in stats {
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for item in items {
            let v: i64 = value(item).into();
            let labels = label(item);
            let series = family.encode_family(&labels)?;
            if matches!(kind, prometheus_client::metrics::MetricType::Counter) {
                ConstCounter::new(v.max(0) as u64).encode(series)?;
            } else {
                ConstGauge::new(v).encode(series)?;
            }
        }
    }
    Ok(())
}

/// Reads every hook's counters at scrape time (labels: hook names, bounded by
/// `max_hooks`, and error codes).
struct HookCollector {
    broker: Arc<OnceLock<Broker>>,
}

impl std::fmt::Debug for HookCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookCollector")
    }
}

impl Collector for HookCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let hooks = broker.hooks();
        let counters: [Stat<i64, tidewater_core::HookInfo>; 3] = [
            (
                "hook_accepted",
                "Webhooks stored durably in the hook's target",
                |h| saturate(h.stats.accepted),
            ),
            (
                "hook_duplicates",
                "Webhooks whose delivery id was already stored (answered 2xx, not stored again)",
                |h| saturate(h.stats.duplicates),
            ),
            (
                "hook_signature_failures",
                "Webhooks refused for a missing, malformed, wrong or stale signature",
                |h| saturate(h.stats.signature_failures),
            ),
        ];
        encode_families(
            &mut encoder,
            prometheus_client::metrics::MetricType::Counter,
            &counters,
            &hooks,
            |h| HookLabel {
                hook: h.name.clone(),
            },
        )?;
        let mut family = encoder.encode_descriptor(
            "hook_refused",
            "Webhooks refused (nothing stored), by reason: the error code answered",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for h in &hooks {
            for (reason, n) in &h.stats.refused {
                ConstCounter::new(*n).encode(family.encode_family(&HookRefusedLabel {
                    hook: h.name.clone(),
                    reason: reason.to_string(),
                })?)?;
            }
        }
        Ok(())
    }
}

/// Reads every push endpoint's counters and breaker at scrape time (labels: endpoint names,
/// bounded by `max_pushes`, and reply classes).
struct PushCollector {
    broker: Arc<OnceLock<Broker>>,
}

impl std::fmt::Debug for PushCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushCollector")
    }
}

impl Collector for PushCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let pushes = broker.pushes();
        let label = |p: &tidewater_core::PushInfo| PushLabel {
            push: p.name.clone(),
        };
        let counters: [Stat<i64, tidewater_core::PushInfo>; 3] = [
            (
                "push_delivered",
                "Messages a push endpoint's receiver acknowledged (2xx)",
                |p| saturate(p.stats.delivered),
            ),
            ("push_requests", "Requests a push endpoint sent", |p| {
                saturate(p.stats.requests)
            }),
            (
                "push_breaker_opens",
                "Times a push endpoint's circuit breaker opened",
                |p| saturate(p.breaker_opens),
            ),
        ];
        let counter = prometheus_client::metrics::MetricType::Counter;
        encode_families(&mut encoder, counter, &counters, &pushes, label)?;
        let gauges: [Stat<i64, tidewater_core::PushInfo>; 2] = [
            (
                "push_in_flight",
                "Messages a push endpoint has sent and not yet settled",
                |p| saturate(p.stats.in_flight),
            ),
            (
                "push_breaker_state",
                "A push endpoint's circuit breaker: 0 closed, 1 half-open, 2 open",
                |p| p.breaker.as_gauge(),
            ),
        ];
        let gauge = prometheus_client::metrics::MetricType::Gauge;
        encode_families(&mut encoder, gauge, &gauges, &pushes, label)?;
        let mut family = encoder.encode_descriptor(
            "push_replies",
            "A push endpoint's replies by class: 2xx, 3xx, 4xx, 429, 5xx, timeout, connect_error",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for p in &pushes {
            for (class, n) in &p.stats.replies {
                ConstCounter::new(*n).encode(family.encode_family(&PushReplyLabel {
                    push: p.name.clone(),
                    class: class.to_string(),
                })?)?;
            }
        }
        Ok(())
    }
}

/// Reads every queue's stats at scrape time.
struct QueueCollector {
    broker: Arc<OnceLock<Broker>>,
}

impl std::fmt::Debug for QueueCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueCollector")
    }
}

impl Collector for QueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let queues = broker.list_queues();
        // Per-queue gauges; None: not shown for that queue (a policy it does not use).
        let gauges: [Stat<Option<u64>>; 12] = [
            ("queue_depth", "Messages ready for delivery", |q| {
                Some(q.stats.depth)
            }),
            ("queue_in_flight", "Messages leased to consumers", |q| {
                Some(q.stats.in_flight)
            }),
            (
                "queue_delayed",
                "Messages waiting for their delivery time",
                |q| Some(q.stats.delayed),
            ),
            (
                "queue_messages",
                "Unsettled messages (ready, in flight and delayed)",
                |q| Some(q.stats.total),
            ),
            ("queue_bytes", "Bytes of unsettled messages", |q| {
                Some(q.stats.bytes)
            }),
            (
                "queue_disk_bytes",
                "Bytes of the queue's segment files",
                |q| Some(q.disk_bytes),
            ),
            (
                "queue_oldest_age_ms",
                "Age of the oldest unsettled message in milliseconds",
                |q| Some(q.stats.oldest_age_ms),
            ),
            (
                "queue_dedup_ids",
                "Client-chosen message ids remembered for deduplication",
                |q| Some(q.stats.dedup_ids),
            ),
            (
                "queue_coalesce_windows",
                "Coalescing windows open (queues with coalesce)",
                |q| q.stats.coalesce_windows,
            ),
            (
                "queue_fair_flows",
                "Fairness values (tenants, keys, ...) with messages waiting (queues with fairness)",
                |q| q.stats.fair_flows,
            ),
            (
                "queue_keys_in_flight",
                "Keys with a message leased or awaiting a retry (queues with key_concurrency)",
                |q| q.stats.keys_in_flight,
            ),
            (
                "queue_keys_blocked",
                "Keys with messages waiting for their key's slots (queues with key_concurrency)",
                |q| q.stats.keys_blocked,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for q in &queues {
                if let Some(v) = value(q) {
                    ConstGauge::new(v.min(i64::MAX as u64) as i64).encode(
                        family.encode_family(&QueueLabel {
                            queue: q.name.clone(),
                        })?,
                    )?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "queue_oldest_age_seconds",
            "Age of the oldest unsettled message in seconds",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for q in &queues {
            ConstGauge::new(q.stats.oldest_age_ms as f64 / 1000.0).encode(
                family.encode_family(&QueueLabel {
                    queue: q.name.clone(),
                })?,
            )?;
        }
        // Dead-letter depth: the depth of each queue's dead-letter queue, under the source's name.
        let mut family = encoder.encode_descriptor(
            "queue_dead_letter_depth",
            "Unsettled messages in the queue's dead-letter queue",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for q in &queues {
            if let Some(dlq) = &q.config.dead_letter_queue {
                let depth = queues
                    .iter()
                    .find(|d| &d.name == dlq)
                    .map_or(0, |d| d.stats.total);
                ConstGauge::new(depth as i64).encode(family.encode_family(&QueueLabel {
                    queue: q.name.clone(),
                })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "queue_dispatch_rate_per_second",
            "Dispatch rate limit in force (adaptive throttling moves it); absent when unlimited",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for q in &queues {
            if let Some(rate) = q.stats.dispatch_rate_per_s {
                ConstGauge::new(rate).encode(family.encode_family(&QueueLabel {
                    queue: q.name.clone(),
                })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "queue_waiting_by_priority",
            "Messages sorted and waiting per priority level (queues with priority_levels > 1)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for q in &queues {
            if let Some(levels) = &q.stats.waiting_by_priority {
                for (i, n) in levels.iter().enumerate() {
                    let priority = (levels.len() - 1 - i).to_string();
                    ConstGauge::new(*n as i64).encode(family.encode_family(&PriorityLabel {
                        queue: q.name.clone(),
                        priority,
                    })?)?;
                }
            }
        }
        let counters: [Stat<u64>; 16] = [
            (
                "coalesced_in",
                "Messages that entered a coalescing window",
                |q| q.stats.coalesced_in,
            ),
            (
                "coalesced_out",
                "Deliveries coalescing windows produced",
                |q| q.stats.coalesced_out,
            ),
            ("published", "Messages accepted", |q| q.stats.published),
            ("delivered", "Deliveries (first and repeated)", |q| {
                q.stats.delivered
            }),
            ("acked", "Messages acknowledged", |q| q.stats.acked),
            ("nacked", "Messages negatively acknowledged", |q| {
                q.stats.nacked
            }),
            ("lease_expired", "Leases that ran out", |q| q.stats.expired),
            (
                "dead_lettered",
                "Messages moved to the dead-letter queue",
                |q| q.stats.dead_lettered,
            ),
            (
                "redriven",
                "Messages moved out of this queue by redrive",
                |q| q.stats.redriven,
            ),
            ("purged", "Messages removed by purge", |q| q.stats.purged),
            (
                "queue_read_bytes",
                "Bytes read back from the queue's segment files (compare with published bytes: read amplification)",
                |q| q.read_bytes,
            ),
            (
                "superseded",
                "Pending messages cancelled by a newer one with the same key",
                |q| q.stats.superseded,
            ),
            (
                "deduplicated",
                "Publishes acknowledged but not enqueued: their id was seen within the dedup window",
                |q| q.stats.deduplicated,
            ),
            (
                "ttl_expired",
                "Messages older than their ttl_ms, dropped or dead-lettered",
                |q| q.stats.ttl_expired,
            ),
            (
                "throttle_cuts",
                "Dispatch rate halvings by adaptive throttling",
                |q| q.stats.throttle_cuts,
            ),
            (
                "throttle_raises",
                "Dispatch rate raises by adaptive throttling",
                |q| q.stats.throttle_raises,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for q in &queues {
                ConstCounter::new(value(q)).encode(family.encode_family(&QueueLabel {
                    queue: q.name.clone(),
                })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "refused",
            "Publishes refused, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for q in &queues {
            for (reason, n) in &q.refused {
                ConstCounter::new(*n).encode(family.encode_family(&RefusedLabel {
                    queue: q.name.clone(),
                    reason: reason.to_string(),
                })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "quota_refused",
            "Publishes refused by quota, per tenant (the first 20 tenants refused, then \"other\")",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for q in &queues {
            for (tenant, n) in &q.quota_refused {
                ConstCounter::new(*n).encode(family.encode_family(&TenantLabel {
                    queue: q.name.clone(),
                    tenant: tenant.clone(),
                })?)?;
            }
        }
        let family = encoder.encode_descriptor(
            "disk_free_bytes",
            "Free bytes on the data directory's file system",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(broker.disk_free_bytes().min(i64::MAX as u64) as i64).encode(family)?;
        let family = encoder.encode_descriptor(
            "journal_bytes",
            "Bytes in the current journal file",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(broker.store().journal_bytes() as i64).encode(family)?;
        let family = encoder.encode_descriptor(
            "checkpoint_failures",
            "Checkpoints that failed short of an fsync (e.g. no file descriptor left); retried",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(broker.store().checkpoint_failures()).encode(family)?;
        let fsyncs = broker.store().fsync_latency();
        let mut family = encoder.encode_descriptor(
            "storage_fsync_seconds",
            "Time of the journal's fsyncs (fdatasync), each making a round of writes durable",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        family.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            fsyncs.sum_seconds,
            fsyncs.count,
            &fsyncs.buckets,
            None,
        )?;
        let files = broker.store().segment_files();
        let family = encoder.encode_descriptor(
            "segment_files_open",
            "Segment files held open by the store (at most [storage] max_open_segment_files)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(files.open as i64).encode(family)?;
        let family = encoder.encode_descriptor(
            "segment_files_opened",
            "Segment files opened (created, or reopened after the cache closed them)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(files.opened).encode(family)?;
        let (index_bytes, thinnings) = broker.store().index_bytes();
        let family = encoder.encode_descriptor(
            "index_bytes",
            "Bytes of the in-memory segment indexes at the last checkpoint (bounded by [storage] max_index_bytes plus the active segments')",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(index_bytes.min(i64::MAX as u64) as i64).encode(family)?;
        let family = encoder.encode_descriptor(
            "index_thinnings",
            "Times a sealed segment's index was halved to stay within max_index_bytes",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(thinnings).encode(family)?;
        encode_streams(broker, &mut encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    stream: String,
    partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupStreamLabel {
    group: String,
    stream: String,
}

/// Streams and consumer groups: labels are stream and group names (bounded by
/// `max_streams` and `max_groups`); partitions only in `stream_partition_end_offset` and
/// `_start_offset`, at most `max_partition_metrics` series of each.
fn encode_streams(
    broker: &Broker,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let streams = broker.list_streams();
    type StreamStat = (
        &'static str,
        &'static str,
        fn(&tidewater_core::StreamInfo) -> u64,
    );
    let stats: [StreamStat; 4] = [
        ("stream_partitions", "Partitions of the stream", |s| {
            s.partitions.len() as u64
        }),
        (
            "stream_end_offset",
            "Records produced to the stream (the sum of its partitions' end offsets)",
            |s| s.partitions.iter().map(|p| p.end_offset).sum(),
        ),
        ("stream_bytes", "Bytes of the stream's segment files", |s| {
            s.partitions.iter().map(|p| p.bytes).sum()
        }),
        (
            "stream_segments",
            "Segment files of the stream's partitions (each partition's active one included)",
            |s| s.partitions.iter().map(|p| p.segments).sum(),
        ),
    ];
    for (name, help, value) in stats {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for stream in &streams {
            let v = value(stream).min(i64::MAX as u64) as i64;
            ConstGauge::new(v).encode(family.encode_family(&StreamLabel {
                stream: stream.name.clone(),
            })?)?;
        }
    }
    type CounterStat = (
        &'static str,
        &'static str,
        fn(&tidewater_core::broker::StreamCounters) -> u64,
    );
    let counters: [CounterStat; 13] = [
        (
            "stream_produce_requests",
            "Produce requests that appended to the stream (HTTP produces and binary StreamProduce frames)",
            |c| c.produce_requests,
        ),
        (
            "stream_produced_records",
            "Records produced to the stream since the server started",
            |c| c.produced_records,
        ),
        (
            "stream_fetch_requests",
            "Fetches of the stream's partitions (a fetch of several partitions counts each)",
            |c| c.fetch_requests,
        ),
        (
            "stream_fetched_bytes",
            "Bytes of stored batches fetched from the stream",
            |c| c.fetched_bytes,
        ),
        (
            "stream_retention_deleted_records",
            "Offsets retention deleted from the stream (whole segments)",
            |c| c.deleted_records,
        ),
        (
            "stream_retention_deleted_bytes",
            "Segment bytes retention deleted from the stream (the files go at the next checkpoint)",
            |c| c.deleted_bytes,
        ),
        (
            "stream_compaction_passes",
            "Compaction passes that rewrote segments of the stream",
            |c| c.compaction.passes,
        ),
        (
            "stream_compaction_reclaimed_bytes",
            "Segment bytes compaction gave back (bytes rewritten minus what they came to)",
            |c| {
                c.compaction
                    .bytes_before
                    .saturating_sub(c.compaction.bytes_after)
            },
        ),
        (
            "stream_compaction_superseded_records",
            "Records compaction removed because a later record has their key",
            |c| c.compaction.superseded,
        ),
        (
            "stream_compaction_tombstones_removed",
            "Tombstones compaction removed once their delete horizon passed",
            |c| c.compaction.tombstones,
        ),
        (
            "stream_compaction_keyless_removed",
            "Records without a key compaction removed (written before the stream was compacted)",
            |c| c.compaction.keyless,
        ),
        (
            "stream_compaction_compressed_batches_kept",
            "Compressed batches compaction kept whole (it does not decompress them yet)",
            |c| c.compaction.compressed_batches,
        ),
        (
            "stream_compaction_milliseconds",
            "Time spent in compaction passes over the stream",
            |c| c.compaction.pass_ms,
        ),
    ];
    let stream_counters = broker.stream_counters();
    for (name, help, value) in counters {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (stream, c) in &stream_counters {
            ConstCounter::new(value(c)).encode(family.encode_family(&StreamLabel {
                stream: stream.clone(),
            })?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "stream_compaction_dirty_ratio",
        "Share of a compacted stream's rewritable bytes written since its partitions were last compacted (a pass runs past the stream's min_dirty_ratio)",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (stream, ratio) in broker.compaction_dirty_ratios() {
        ConstGauge::new(ratio).encode(family.encode_family(&StreamLabel { stream })?)?;
    }
    let cap = broker.limits().max_partition_metrics;
    if cap > 0 {
        let mut sorted: Vec<&tidewater_core::StreamInfo> = streams.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        type PartitionStat = (
            &'static str,
            &'static str,
            fn(&tidewater_core::PartitionInfo) -> u64,
        );
        let stats: [PartitionStat; 2] = [
            (
                "stream_partition_end_offset",
                "A partition's end offset (the offset its next record gets); at most [limits] max_partition_metrics series, by stream name then partition",
                |p| p.end_offset,
            ),
            (
                "stream_partition_start_offset",
                "A partition's start offset (retention deletes below it); at most [limits] max_partition_metrics series, by stream name then partition",
                |p| p.start_offset,
            ),
        ];
        for (name, help, value) in stats {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            let partitions = sorted
                .iter()
                .flat_map(|s| s.partitions.iter().map(move |p| (s, p)))
                .take(cap);
            for (stream, p) in partitions {
                ConstGauge::new(value(p).min(i64::MAX as u64) as i64).encode(
                    family.encode_family(&PartitionLabel {
                        stream: stream.name.clone(),
                        partition: p.partition,
                    })?,
                )?;
            }
        }
    }
    let lags = broker.group_lags();
    let mut family = encoder.encode_descriptor(
        "group_members",
        "Members of the consumer group",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    let mut seen = std::collections::BTreeSet::new();
    for lag in &lags {
        if seen.insert(lag.group.clone()) {
            ConstGauge::new(lag.members as i64).encode(family.encode_family(&GroupLabel {
                group: lag.group.clone(),
            })?)?;
        }
    }
    type LagStat = (
        &'static str,
        &'static str,
        fn(&tidewater_core::broker::GroupLag) -> u64,
    );
    let lag_stats: [LagStat; 2] = [
        (
            "group_lag",
            "Records of the stream the group has not consumed (end offsets minus committed, over its committed partitions)",
            |l| l.lag,
        ),
        (
            "group_lag_seconds",
            "Age of the oldest record of the stream the group has not consumed",
            |l| l.lag_ms / 1000,
        ),
    ];
    for (name, help, value) in lag_stats {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for lag in &lags {
            ConstGauge::new(value(lag).min(i64::MAX as u64) as i64).encode(
                family.encode_family(&GroupStreamLabel {
                    group: lag.group.clone(),
                    stream: lag.stream.clone(),
                })?,
            )?;
        }
    }
    encode_subscriptions(broker, encoder)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionLabel {
    stream: String,
    subscription: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionPartitionLabel {
    stream: String,
    subscription: String,
    partition: u32,
}

/// Work-queue subscriptions: the queue figures under `tidewater_subscription_*`, labelled
/// by stream and subscription (bounded by `max_subscriptions`); per partition only
/// `subscription_pending`, at most `max_partition_metrics` series.
fn encode_subscriptions(
    broker: &Broker,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let Ok(subs) = broker.list_subscriptions(None) else {
        return Ok(());
    };
    type SubStat = (
        &'static str,
        &'static str,
        fn(&tidewater_core::broker::SubscriptionInfo) -> u64,
    );
    let label = |s: &tidewater_core::broker::SubscriptionInfo| SubscriptionLabel {
        stream: s.stream.clone(),
        subscription: s.name.clone(),
    };
    let gauges: [SubStat; 5] = [
        (
            "subscription_depth",
            "Messages of the subscription ready for delivery",
            |s| s.stats.depth,
        ),
        (
            "subscription_in_flight",
            "Messages of the subscription leased to consumers",
            |s| s.stats.in_flight,
        ),
        (
            "subscription_delayed",
            "Messages of the subscription waiting for a retry",
            |s| s.stats.delayed,
        ),
        (
            "subscription_messages",
            "Records of the stream the subscription has not settled (ready, in flight and delayed)",
            |s| s.stats.total,
        ),
        (
            "subscription_oldest_age_ms",
            "Age of the subscription's oldest unsettled record in milliseconds (by its timestamp)",
            |s| s.stats.oldest_age_ms,
        ),
    ];
    for (name, help, value) in gauges {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for sub in &subs {
            ConstGauge::new(value(sub).min(i64::MAX as u64) as i64)
                .encode(family.encode_family(&label(sub))?)?;
        }
    }
    let counters: [SubStat; 7] = [
        (
            "subscription_delivered",
            "Deliveries of the subscription (first and repeated)",
            |s| s.stats.delivered,
        ),
        (
            "subscription_acked",
            "Messages of the subscription acknowledged",
            |s| s.stats.acked,
        ),
        (
            "subscription_nacked",
            "Messages of the subscription negatively acknowledged",
            |s| s.stats.nacked,
        ),
        (
            "subscription_expired",
            "Leases of the subscription that ran out",
            |s| s.stats.expired,
        ),
        (
            "subscription_dead_lettered",
            "Messages of the subscription moved to its dead-letter queue",
            |s| s.stats.dead_lettered,
        ),
        (
            "subscription_ttl_expired",
            "Messages of the subscription older than its ttl_ms",
            |s| s.stats.ttl_expired,
        ),
        (
            "subscription_retention_expired",
            "Records the subscription had not settled when retention deleted them",
            |s| s.retention_expired,
        ),
    ];
    for (name, help, value) in counters {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for sub in &subs {
            ConstCounter::new(value(sub)).encode(family.encode_family(&label(sub))?)?;
        }
    }
    let cap = broker.limits().max_partition_metrics;
    if cap > 0 {
        let mut family = encoder.encode_descriptor(
            "subscription_pending",
            "Offsets of a partition the subscription has not settled; at most [limits] max_partition_metrics series, by stream, subscription, partition",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let series = subs
            .iter()
            .flat_map(|s| s.partitions.iter().map(move |p| (s, p)))
            .take(cap);
        for (sub, p) in series {
            ConstGauge::new(p.pending.min(i64::MAX as u64) as i64).encode(
                family.encode_family(&SubscriptionPartitionLabel {
                    stream: sub.stream.clone(),
                    subscription: sub.name.clone(),
                    partition: p.partition,
                })?,
            )?;
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// Connections of the listeners (a fixed label set: `binary`, `http`, `kafka`; the Kafka
/// listener's are 0 while it is off).
#[derive(Debug)]
struct ListenerCollector {
    listeners: Listeners,
    /// The Kafka listener counts its idle closes itself (its connections are its crate's).
    kafka: Arc<tidewater_kafka::KafkaStats>,
}

impl Collector for ListenerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        type Read = fn(&ListenerStats) -> u64;
        let gauges: [(&str, &str, Read); 1] =
            [("connections", "Open connections, per listener", |s| {
                s.open.load(Relaxed)
            })];
        let counters: [(&str, &str, Read); 4] = [
            ("connections_accepted", "Connections accepted", |s| {
                s.accepted.load(Relaxed)
            }),
            (
                "connections_refused",
                "Connections refused at the listener's max_connections",
                |s| s.refused.load(Relaxed),
            ),
            (
                "connections_idle_closed",
                "Connections closed for sending nothing within idle_timeout_ms",
                |s| s.closed_idle.load(Relaxed),
            ),
            (
                "connection_accept_errors",
                "Failed accepts (out of file descriptors, ...); the listener backs off",
                |s| s.accept_errors.load(Relaxed),
            ),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (listener, stats) in &self.listeners {
                ConstGauge::new(read(stats).min(i64::MAX as u64) as i64)
                    .encode(family.encode_family(&ListenerLabel { listener })?)?;
            }
        }
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (listener, stats) in &self.listeners {
                let mut value = read(stats);
                if *listener == "kafka" && name == "connections_idle_closed" {
                    value = self.kafka.closed_idle.load(Relaxed);
                }
                ConstCounter::new(value)
                    .encode(family.encode_family(&ListenerLabel { listener })?)?;
            }
        }
        Ok(())
    }
}

/// The Kafka listener's request counters (0 while it is off).
#[derive(Debug)]
struct KafkaCollector {
    stats: Arc<tidewater_kafka::KafkaStats>,
}

impl Collector for KafkaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        let counters: [(&str, &str, u64); 5] = [
            (
                "kafka_requests",
                "Kafka protocol requests read",
                s.requests.load(Relaxed),
            ),
            (
                "kafka_produce_partition_errors",
                "Produced partitions answered with an error code",
                s.request_errors.load(Relaxed),
            ),
            (
                "kafka_connections_closed_malformed",
                "Kafka connections closed for a request that could not be read (unknown API or version, malformed, oversized)",
                s.closed_malformed.load(Relaxed),
            ),
            (
                "kafka_duplicate_batches",
                "Idempotent producers' batches sent again, answered with the first append's offset and not written",
                s.duplicates.load(Relaxed),
            ),
            (
                "kafka_out_of_order_batches",
                "Idempotent producers' batches refused for a sequence gap",
                s.out_of_order.load(Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}

/// Backlog forecasts at scrape time, with the server's default objectives (`[forecast]`):
/// `queue_*{queue}`, `subscription_*{stream, subscription}` and `group_*{group}`, bounded
/// by the limits on queues, subscriptions and groups. A figure with no value yet (no rates
/// measured) has no series.
struct ForecastCollector {
    broker: Arc<OnceLock<Broker>>,
}

impl std::fmt::Debug for ForecastCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForecastCollector")
    }
}

type ForecastStat = (
    &'static str,
    &'static str,
    fn(&tidewater_core::forecast::Forecast) -> Option<f64>,
);

/// The forecast's figures as metrics (suffixes of `queue_`, `subscription_` and `group_`).
const FORECAST_STATS: [ForecastStat; 8] = [
    (
        "arrival_rate",
        "Messages arriving per second, over the forecast's rate window",
        |f| f.arrival_per_s,
    ),
    (
        "service_rate",
        "Messages leaving the backlog per second (acked, dead-lettered, expired; a group's commits), over the rate window",
        |f| f.service_per_s,
    ),
    (
        "consumers",
        "Consumers seen within forecast.consumer_idle_ms (a group's members)",
        |f| Some(f.consumers as f64),
    ),
    (
        "drain_seconds",
        "Seconds to drain the backlog at the current rates (no series while it grows or nothing serves it: see growing)",
        |f| f.drain_ms.map(|ms| ms as f64 / 1000.0),
    ),
    (
        "growing",
        "1 while the backlog does not drain at the current rates (arrivals outpace service, or nothing is served), else 0",
        |f| match f.trend {
            tidewater_core::forecast::Trend::Growing | tidewater_core::forecast::Trend::Stalled => {
                Some(1.0)
            }
            tidewater_core::forecast::Trend::Unknown => None,
            _ => Some(0.0),
        },
    ),
    (
        "age_objective_breach_seconds",
        "Seconds until the oldest message is older than forecast.age_objective_ms (0: it is; no series: not heading there)",
        |f| f.age_objective_breach_ms.map(|ms| ms as f64 / 1000.0),
    ),
    (
        "consumers_needed",
        "Consumers that would drain the backlog within forecast.drain_target_ms while keeping up with arrivals",
        |f| Some(f64::from(f.consumers_needed)),
    ),
    (
        "service_limited",
        "1 while a limit of the queue's own holds its service (its dispatch rate, every lease max_in_flight allows held, or every ready message behind its key's slots): more consumers would be handed nothing more; else 0",
        |f| Some(f64::from(u8::from(f.limited_by.is_some()))),
    ),
];

impl Collector for ForecastCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use tidewater_core::Subject;
        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let forecasts = broker.forecasts();
        let queues: Vec<_> = forecasts
            .iter()
            .filter_map(|(s, f)| match s {
                Subject::Queue(name) if !name.contains('/') => Some((
                    QueueLabel {
                        queue: name.clone(),
                    },
                    f,
                )),
                _ => None,
            })
            .collect();
        let subscriptions: Vec<_> = forecasts
            .iter()
            .filter_map(|(s, f)| match s {
                Subject::Queue(name) => {
                    let (stream, sub) = name.split_once('/')?;
                    Some((
                        SubscriptionLabel {
                            stream: stream.to_string(),
                            subscription: sub.to_string(),
                        },
                        f,
                    ))
                }
                Subject::Group(_) => None,
            })
            .collect();
        let groups: Vec<_> = forecasts
            .iter()
            .filter_map(|(s, f)| match s {
                Subject::Group(name) => Some((
                    GroupLabel {
                        group: name.clone(),
                    },
                    f,
                )),
                Subject::Queue(_) => None,
            })
            .collect();
        encode_forecasts(&mut encoder, "queue", &queues)?;
        encode_forecasts(&mut encoder, "subscription", &subscriptions)?;
        encode_forecasts(&mut encoder, "group", &groups)
    }
}

fn encode_forecasts<L>(
    encoder: &mut DescriptorEncoder<'_>,
    prefix: &str,
    items: &[(L, &tidewater_core::forecast::Forecast)],
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet + Clone + std::fmt::Debug + std::hash::Hash + Eq,
{
    for (suffix, help, value) in FORECAST_STATS {
        let name = format!("{prefix}_{suffix}");
        let mut family = encoder.encode_descriptor(
            &name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (label, forecast) in items {
            if let Some(v) = value(forecast) {
                ConstGauge::new(v).encode(family.encode_family(label)?)?;
            }
        }
    }
    Ok(())
}
