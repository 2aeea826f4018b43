//! `tidewater serve`: configuration, startup (listen first, recover, then serve), and a
//! clean shutdown on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use tidewater_core::{Broker, BrokerOptions, Limits};
use tidewater_storage::StoreOptions;

use crate::http::{AppState, router};
use crate::metrics::Metrics;

/// Exit status when the store fails an fsync (EX_IOERR).
pub const EXIT_STORAGE_FAILED: i32 = 74;
/// How long the process answers (refusing every write) before it exits after a fatal
/// storage error.
const FATAL_EXIT_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "TIDEWATER_DATA")]
    pub data: Option<PathBuf>,
    /// Address to listen on. Loopback by default; use 0.0.0.0:7070 to listen on all interfaces.
    #[arg(long, env = "TIDEWATER_LISTEN")]
    pub listen: Option<String>,
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, env = "TIDEWATER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the binary protocol (docs/protocol.md). Loopback by default.
    #[arg(long, env = "TIDEWATER_PROTOCOL_LISTEN")]
    pub protocol_listen: Option<String>,
    /// Address of the Kafka protocol listener (docs/kafka.md), for Kafka clients and tools:
    /// off unless given, e.g. 127.0.0.1:9092.
    #[arg(long, env = "TIDEWATER_KAFKA_LISTEN")]
    pub kafka_listen: Option<String>,
    /// The host:port Kafka clients are told to connect to (Metadata), when it differs
    /// from --kafka-listen (a container, NAT, a proxy, or listening on 0.0.0.0).
    #[arg(long, env = "TIDEWATER_KAFKA_ADVERTISED")]
    pub kafka_advertised: Option<String>,
    /// Address of a listener that takes only webhooks (POST {path_prefix}/HOOK, [hooks] in
    /// the configuration): off unless given. Senders on the internet can reach it while
    /// the API stays on loopback.
    #[arg(long, env = "TIDEWATER_HOOKS_LISTEN")]
    pub hooks_listen: Option<String>,
    /// Open even though data the checkpoints and journal know of is missing from the files:
    /// the missing messages are dropped (settled) and each dropped range is printed. Without
    /// it, the server refuses to start and names what is missing (docs/storage-format.md).
    #[arg(long)]
    pub repair_missing: bool,
    /// Log format: text (for people) or json (for log pipelines).
    #[arg(long, env = "TIDEWATER_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

/// The TOML file. Every field is optional; flags and environment variables win over it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub data: Option<PathBuf>,
    pub listen: Option<String>,
    pub protocol_listen: Option<String>,
    pub kafka_listen: Option<String>,
    pub log_format: Option<String>,
    /// Largest HTTP request body in bytes.
    pub max_request_bytes: Option<usize>,
    /// Bytes of HTTP request bodies being read or handled at once, across connections.
    pub max_request_bytes_in_flight: Option<usize>,
    /// Largest binary protocol frame in bytes.
    pub max_frame_bytes: Option<usize>,
    /// How long shutdown waits for connections to finish what they started.
    pub shutdown_timeout_ms: Option<u64>,
    pub limits: Limits,
    pub storage: StorageConfig,
    pub protocol: ProtocolConfig,
    pub http: HttpConfig,
    pub kafka: KafkaFileConfig,
    pub auth: crate::auth::AuthConfig,
    pub tls: crate::tls::TlsConfig,
    pub hooks: HooksFileConfig,
    pub push: crate::push::PushSettings,
    pub forecast: ForecastFileConfig,
    pub keda: crate::keda::KedaConfig,
    pub console: crate::console::ConsoleConfig,
}

/// Backlog forecasts (docs/autoscaling.md): how often every queue, subscription and group
/// is sampled, how much history is kept, and the default objectives.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForecastFileConfig {
    pub sample_interval_ms: u64,
    pub history_ms: u64,
    /// A queue's consumer is counted while it received within this.
    pub consumer_idle_ms: u64,
    /// Rates are measured over this much of the history.
    pub rate_window_ms: u64,
    /// The oldest message should be younger than this.
    pub age_objective_ms: u64,
    /// `consumers_needed` drains the backlog within this.
    pub drain_target_ms: u64,
}

impl Default for ForecastFileConfig {
    fn default() -> Self {
        let d = tidewater_core::ForecastOptions::default();
        ForecastFileConfig {
            sample_interval_ms: d.sample_interval_ms,
            history_ms: d.history_ms,
            consumer_idle_ms: d.consumer_idle_ms,
            rate_window_ms: d.objectives.rate_window_ms,
            age_objective_ms: d.objectives.age_objective_ms,
            drain_target_ms: d.objectives.drain_target_ms,
        }
    }
}

impl ForecastFileConfig {
    pub fn options(&self) -> anyhow::Result<tidewater_core::ForecastOptions> {
        let options = tidewater_core::ForecastOptions {
            sample_interval_ms: self.sample_interval_ms,
            history_ms: self.history_ms,
            consumer_idle_ms: self.consumer_idle_ms,
            objectives: tidewater_core::forecast::Objectives {
                rate_window_ms: self.rate_window_ms,
                age_objective_ms: self.age_objective_ms,
                drain_target_ms: self.drain_target_ms,
            },
        };
        options
            .validate()
            .map_err(|e| anyhow::anyhow!("[forecast] {e}"))?;
        Ok(options)
    }
}

/// The webhook ingress listener (docs/edges.md).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksFileConfig {
    /// Off unless set.
    pub listen: Option<String>,
    /// Webhooks arrive at POST {path_prefix}/{hook}.
    pub path_prefix: String,
}

impl Default for HooksFileConfig {
    fn default() -> Self {
        HooksFileConfig {
            listen: None,
            path_prefix: "/hooks".into(),
        }
    }
}

/// The web console's settings.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    pub enabled: bool,
    pub listen: Option<SocketAddr>,
}

/// Where the webhook ingress listener listens, and its path prefix.
#[derive(Debug, Clone)]
pub struct HooksListener {
    pub listen: SocketAddr,
    pub path_prefix: String,
}

fn hooks_listener(args: &ServeArgs, file: &FileConfig) -> anyhow::Result<Option<HooksListener>> {
    let Some(text) = args.hooks_listen.clone().or(file.hooks.listen.clone()) else {
        return Ok(None);
    };
    let listen: SocketAddr = text
        .parse()
        .with_context(|| format!("--hooks-listen '{text}' is not an address like 0.0.0.0:8080"))?;
    // `/` (webhooks at /{hook}) leaves an empty prefix.
    let prefix = file.hooks.path_prefix.trim_end_matches('/').to_string();
    let valid = file.hooks.path_prefix.starts_with('/')
        && prefix.len() <= 100
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
        && !prefix.contains("//");
    if !valid {
        anyhow::bail!(
            "[hooks] path_prefix '{}' must start with / and hold only A-Z a-z 0-9 / - _ . (e.g. /hooks)",
            file.hooks.path_prefix
        );
    }
    Ok(Some(HooksListener {
        listen,
        path_prefix: prefix,
    }))
}

/// The Kafka listener (docs/configuration.md, docs/kafka.md).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaFileConfig {
    /// host:port clients are told to connect to (default: the listen address).
    pub advertised: Option<String>,
    pub node_id: i32,
    pub max_connections: usize,
    pub max_request_bytes: usize,
    pub max_requests_in_flight: usize,
    pub max_request_bytes_in_flight: usize,
    pub idle_timeout_ms: u64,
    pub max_uncompressed_produce_bytes: usize,
    pub max_producer_states: usize,
    pub consumer_heartbeat_interval_ms: u64,
    pub consumer_session_timeout_ms: u64,
}

impl Default for KafkaFileConfig {
    fn default() -> Self {
        let d = tidewater_kafka::KafkaConfig::new(([127, 0, 0, 1], 9092).into());
        KafkaFileConfig {
            advertised: None,
            node_id: d.node_id,
            max_connections: d.max_connections,
            max_request_bytes: d.max_request_bytes,
            max_requests_in_flight: d.max_requests_in_flight,
            max_request_bytes_in_flight: d.max_request_bytes_in_flight,
            idle_timeout_ms: d.idle_timeout.as_millis() as u64,
            max_uncompressed_produce_bytes: d.max_uncompressed_produce_bytes,
            max_producer_states: d.max_producer_states,
            consumer_heartbeat_interval_ms: d.consumer_heartbeat_interval_ms,
            consumer_session_timeout_ms: d.consumer_session_timeout_ms,
        }
    }
}

/// Bounds of the binary protocol listener (docs/configuration.md).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    pub max_connections: usize,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub outbox_bytes: usize,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            max_connections: 4096,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            outbox_bytes: 4 << 20,
        }
    }
}

/// Bounds of the HTTP listener (docs/configuration.md).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub max_connections: usize,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_connections: 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Turning fsync off gives up durability on power loss. For throwaway test servers only.
    pub fsync: bool,
    pub journal_roll_bytes: u64,
    pub segment_roll_bytes: u64,
    /// A segment rolls once a batch comes this long after its oldest (0: never).
    pub segment_roll_ms: u64,
    pub checkpoint_interval_ms: u64,
    pub write_queue_capacity: usize,
    /// Segment files held open at once (least recently used closed first).
    pub max_open_segment_files: usize,
    /// Bytes of in-memory segment indexes (sealed segments' are halved past it).
    pub max_index_bytes: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let d = StoreOptions::default();
        StorageConfig {
            fsync: d.fsync,
            journal_roll_bytes: d.journal_roll_bytes,
            segment_roll_bytes: d.segment_roll_bytes,
            segment_roll_ms: d.segment_roll_ms,
            checkpoint_interval_ms: d.checkpoint_interval.as_millis() as u64,
            write_queue_capacity: d.write_queue_capacity,
            max_open_segment_files: d.max_open_segment_files,
            max_index_bytes: d.max_index_bytes,
        }
    }
}

#[derive(Debug)]
pub struct Settings {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub protocol_listen: SocketAddr,
    pub protocol: crate::binary::Limits,
    pub http: crate::http::Limits,
    /// The Kafka listener, when on.
    pub kafka: Option<tidewater_kafka::KafkaConfig>,
    /// The webhook ingress listener, when on.
    pub hooks: Option<HooksListener>,
    pub push: crate::push::PushSettings,
    pub forecast: tidewater_core::ForecastOptions,
    /// The KEDA external scaler's listener, when on.
    pub keda: Option<(SocketAddr, crate::keda::KedaConfig)>,
    /// The web console: on the HTTP listener, and a listener of its own when set.
    pub console: ConsoleSettings,
    pub log_format: String,
    pub auth: crate::auth::AuthConfig,
    /// Set when every listener speaks TLS.
    pub tls: Option<crate::tls::TlsConfig>,
    pub max_request_bytes: usize,
    pub max_request_bytes_in_flight: usize,
    pub limits: Limits,
    pub store: StoreOptions,
}

pub fn settings(args: &ServeArgs) -> anyhow::Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let kafka = kafka_settings(
        args,
        &file,
        Duration::from_millis(file.shutdown_timeout_ms.unwrap_or(10_000)),
    )?;
    let hooks = hooks_listener(args, &file)?;
    let listen_text = args
        .listen
        .clone()
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7070".to_string());
    let listen: SocketAddr = listen_text.parse().with_context(|| {
        format!("--listen '{listen_text}' is not an address like 127.0.0.1:7070")
    })?;
    let protocol_text = args
        .protocol_listen
        .clone()
        .or(file.protocol_listen.clone())
        .unwrap_or_else(|| "127.0.0.1:7071".to_string());
    let protocol_listen: SocketAddr = protocol_text.parse().with_context(|| {
        format!("--protocol-listen '{protocol_text}' is not an address like 127.0.0.1:7071")
    })?;
    let s = &file.storage;
    if s.journal_roll_bytes < 1 << 20
        || s.segment_roll_bytes < 64 << 10
        || s.write_queue_capacity == 0
        || s.max_open_segment_files < tidewater_storage::MIN_OPEN_SEGMENT_FILES
    {
        bail!(
            "storage: journal_roll_bytes must be >= 1 MiB, segment_roll_bytes >= 64 KiB, write_queue_capacity >= 1, max_open_segment_files >= {}",
            tidewater_storage::MIN_OPEN_SEGMENT_FILES
        );
    }
    let p = &file.protocol;
    if p.max_connections == 0
        || p.handshake_timeout_ms == 0
        || p.idle_timeout_ms < 1000
        || !(64 << 10..=1 << 30).contains(&p.outbox_bytes)
    {
        bail!(
            "protocol: max_connections must be >= 1, handshake_timeout_ms >= 1, idle_timeout_ms >= 1000, outbox_bytes 64 KiB..=1 GiB"
        );
    }
    let h = &file.http;
    if h.max_connections == 0 || h.header_timeout_ms == 0 || h.body_timeout_ms == 0 {
        bail!("http: max_connections, header_timeout_ms and body_timeout_ms must be >= 1");
    }
    let shutdown_timeout = Duration::from_millis(file.shutdown_timeout_ms.unwrap_or(10_000));
    let max_frame = file
        .max_frame_bytes
        .unwrap_or(crate::binary::MAX_FRAME_DEFAULT);
    if !(crate::binary::HANDSHAKE_MAX_FRAME..=u32::MAX as usize).contains(&max_frame) {
        bail!(
            "max_frame_bytes must be {}..={}",
            crate::binary::HANDSHAKE_MAX_FRAME,
            u32::MAX
        );
    }
    let max_request_bytes = file.max_request_bytes.unwrap_or(16 << 20);
    let max_request_bytes_in_flight = file.max_request_bytes_in_flight.unwrap_or(256 << 20);
    if max_request_bytes == 0 || max_request_bytes_in_flight < max_request_bytes.min(1 << 20) {
        bail!(
            "max_request_bytes must be >= 1 and max_request_bytes_in_flight at least max_request_bytes (or 1 MiB)"
        );
    }
    Ok(Settings {
        data: args
            .data
            .clone()
            .or(file.data)
            .unwrap_or_else(|| PathBuf::from("data")),
        listen,
        protocol_listen,
        protocol: crate::binary::Limits {
            max_frame,
            max_connections: p.max_connections,
            handshake_timeout: Duration::from_millis(p.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(p.idle_timeout_ms),
            outbox_bytes: p.outbox_bytes,
            shutdown_timeout,
        },
        http: crate::http::Limits {
            max_connections: h.max_connections,
            header_timeout: Duration::from_millis(h.header_timeout_ms),
            body_timeout: Duration::from_millis(h.body_timeout_ms),
            shutdown_timeout,
        },
        kafka,
        hooks,
        push: {
            file.push.check().context("[push]")?;
            file.push.clone()
        },
        forecast: file.forecast.options()?,
        console: ConsoleSettings {
            enabled: file.console.enabled,
            listen: match &file.console.listen {
                Some(_) if !file.console.enabled => {
                    bail!("[console] listen is set but enabled is false: remove one of them")
                }
                Some(text) => Some(text.parse().with_context(|| {
                    format!("[console] listen '{text}' is not an address like 127.0.0.1:7080")
                })?),
                None => None,
            },
        },
        keda: file
            .keda
            .listen(file.auth.enabled)?
            .map(|addr| (addr, file.keda.clone())),
        log_format: args
            .log_format
            .clone()
            .or(file.log_format)
            .unwrap_or_else(|| "text".to_string()),
        auth: file.auth.clone(),
        tls: file.tls.enabled()?.then(|| file.tls.clone()),
        max_request_bytes,
        max_request_bytes_in_flight,
        limits: file.limits,
        store: StoreOptions {
            fsync: s.fsync,
            journal_roll_bytes: s.journal_roll_bytes,
            segment_roll_bytes: s.segment_roll_bytes,
            segment_roll_ms: s.segment_roll_ms,
            checkpoint_interval: Duration::from_millis(s.checkpoint_interval_ms.max(100)),
            write_queue_capacity: s.write_queue_capacity,
            max_open_segment_files: s.max_open_segment_files,
            max_index_bytes: s.max_index_bytes,
            // Fault injection for the test suite only; not a configuration setting.
            repair_missing: args.repair_missing,
            fail_fsync_at: std::env::var("TIDEWATER_FAULT_FAIL_FSYNC_AT")
                .ok()
                .and_then(|v| v.parse().ok()),
            ..StoreOptions::default()
        },
    })
}

/// The Kafka listener's settings: on when --kafka-listen (or `kafka_listen`) names an
/// address.
fn kafka_settings(
    args: &ServeArgs,
    file: &FileConfig,
    shutdown_timeout: Duration,
) -> anyhow::Result<Option<tidewater_kafka::KafkaConfig>> {
    let Some(text) = args.kafka_listen.clone().or(file.kafka_listen.clone()) else {
        return Ok(None);
    };
    let listen: SocketAddr = text.parse().with_context(|| {
        format!("--kafka-listen '{text}' is not an address like 127.0.0.1:9092")
    })?;
    let k = &file.kafka;
    let mut config = tidewater_kafka::KafkaConfig::new(listen);
    if let Some(advertised) = args.kafka_advertised.clone().or(k.advertised.clone()) {
        let (host, port) = advertised
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .filter(|(h, p)| !h.is_empty() && *p != 0)
            .with_context(|| {
                format!("--kafka-advertised '{advertised}' is not host:port, like kafka.example.com:9092")
            })?;
        config.advertised_host = host.to_string();
        config.advertised_port = port;
    } else if listen.ip().is_unspecified() {
        bail!(
            "--kafka-listen {listen} listens on every interface: say with --kafka-advertised which host:port clients should connect to"
        );
    }
    if k.node_id < 0
        || k.max_connections == 0
        || k.max_requests_in_flight == 0
        || !(1 << 20..=1 << 30).contains(&k.max_request_bytes)
        || k.max_request_bytes_in_flight < k.max_request_bytes
        || k.idle_timeout_ms < 1000
        || k.max_uncompressed_produce_bytes < 1 << 20
        || k.max_producer_states == 0
        || k.consumer_heartbeat_interval_ms == 0
        || !(1_000..=file.limits.max_session_timeout_ms).contains(&k.consumer_session_timeout_ms)
        || k.consumer_heartbeat_interval_ms >= k.consumer_session_timeout_ms
    {
        bail!(
            "kafka: node_id must be >= 0, max_connections, max_requests_in_flight and max_producer_states >= 1, max_request_bytes 1 MiB..=1 GiB, max_request_bytes_in_flight >= max_request_bytes, idle_timeout_ms >= 1000, max_uncompressed_produce_bytes >= 1 MiB, consumer_session_timeout_ms 1000..=max_session_timeout_ms and above consumer_heartbeat_interval_ms >= 1"
        );
    }
    config.node_id = k.node_id;
    config.max_connections = k.max_connections;
    config.max_request_bytes = k.max_request_bytes;
    config.max_requests_in_flight = k.max_requests_in_flight;
    config.max_request_bytes_in_flight = k.max_request_bytes_in_flight;
    config.idle_timeout = Duration::from_millis(k.idle_timeout_ms);
    config.max_uncompressed_produce_bytes = k.max_uncompressed_produce_bytes;
    config.max_producer_states = k.max_producer_states;
    config.consumer_heartbeat_interval_ms = k.consumer_heartbeat_interval_ms;
    config.consumer_session_timeout_ms = k.consumer_session_timeout_ms;
    config.shutdown_timeout = shutdown_timeout;
    Ok(Some(config))
}

fn init_logging(format: &str, audit: Option<crate::audit::AuditFile>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEWATER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let stderr = if format == "json" {
        stderr.json().with_filter(filter).boxed()
    } else {
        stderr.with_filter(filter).boxed()
    };
    // The audit file takes the audit target's events whatever TIDEWATER_LOG says.
    let audit = audit.map(|file| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(file)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(crate::audit::TARGET, tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit)
        .init();
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let settings = settings(&args)?;
    let audit = match &settings.auth.audit_file {
        Some(path) => Some(
            crate::audit::AuditFile::open(path, settings.auth.audit_max_bytes)
                .with_context(|| format!("opening the audit file {}", path.display()))?,
        ),
        None => None,
    };
    init_logging(&settings.log_format, audit);
    let open_files = raise_open_files_limit();
    check_open_files(&settings, open_files)?;
    let cell: Arc<OnceLock<Broker>> = Arc::new(OnceLock::new());
    let protocol_stats = Arc::new(crate::listener::Stats::default());
    let http_stats = Arc::new(crate::listener::Stats::default());
    let kafka_stats = Arc::new(crate::listener::Stats::default());
    let hooks_stats = Arc::new(crate::listener::Stats::default());
    let keda_stats = Arc::new(crate::listener::Stats::default());
    let console_stats = Arc::new(crate::listener::Stats::default());
    let kafka_requests = Arc::new(tidewater_kafka::KafkaStats::default());
    let metrics = Arc::new(Metrics::new(
        cell.clone(),
        [
            ("binary", protocol_stats.clone()),
            ("http", http_stats.clone()),
            ("kafka", kafka_stats.clone()),
            ("hooks", hooks_stats.clone()),
            ("keda", keda_stats.clone()),
            ("console", console_stats.clone()),
        ],
        kafka_requests.clone(),
    ));
    let guard = Arc::new(crate::auth::Guard::new(&settings.auth)?);
    guard.spawn_jwks_reloader();
    let tls = match &settings.tls {
        Some(config) => {
            let tls = crate::tls::Tls::load(config).context("[tls]")?;
            tls.spawn_reloader();
            Some(tls)
        }
        None => None,
    };
    let state = AppState {
        broker: cell.clone(),
        metrics: metrics.clone(),
        max_request_bytes: settings.max_request_bytes,
        body_budget: Arc::new(tokio::sync::Semaphore::new(
            settings.max_request_bytes_in_flight.div_ceil(1024),
        )),
        max_request_bytes_in_flight: settings.max_request_bytes_in_flight,
        body_timeout: settings.http.body_timeout,
        limits: Arc::new(settings.limits.clone()),
        guard: guard.clone(),
        console: settings.console.enabled,
    };
    // Every listener bound now, so a port in use fails the start; the Kafka and KEDA ones
    // are served once recovery is done.
    let listener = bind(
        settings.listen,
        "the HTTP API",
        "try --listen 127.0.0.1:7071",
    )
    .await?;
    let protocol = bind(
        settings.protocol_listen,
        "the binary protocol",
        "try --protocol-listen",
    )
    .await?;
    let kafka_listener = match &settings.kafka {
        Some(kafka) => Some(bind(kafka.listen, "the Kafka protocol", "try --kafka-listen").await?),
        None => None,
    };
    let hooks_listener = match &settings.hooks {
        Some(hooks) => Some(bind(hooks.listen, "webhooks", "try --hooks-listen").await?),
        None => None,
    };
    let console_listener = match settings.console.listen {
        Some(addr) => Some(bind(addr, "the console", "see [console] listen").await?),
        None => None,
    };
    let keda_listener = match &settings.keda {
        Some((addr, _)) => Some(bind(*addr, "the KEDA scaler", "see [keda] listen").await?),
        None => None,
    };
    tracing::info!(listen = %settings.listen, protocol = %settings.protocol_listen, kafka = ?settings.kafka.as_ref().map(|k| k.listen), hooks = ?settings.hooks.as_ref().map(|h| h.listen), data = %settings.data.display(), "tidewater listening; recovering data");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let kafka_stop = stop_rx.clone();
    let push_stop = stop_rx.clone();
    let keda_stop = stop_rx.clone();
    let binary = tokio::spawn(crate::binary::serve(
        protocol,
        cell.clone(),
        settings.protocol.clone(),
        guard.clone(),
        tls.clone(),
        protocol_stats,
        stop_rx.clone(),
    ));
    let hooks_serving = match (hooks_listener, &settings.hooks) {
        (Some(listener), Some(hooks)) => Some(tokio::spawn(crate::http::serve(
            listener,
            crate::http::hooks_router(state.clone(), &hooks.path_prefix),
            settings.http.clone(),
            tls.clone(),
            hooks_stats,
            stop_rx.clone(),
        ))),
        _ => None,
    };
    // The console's own listener serves the API too: the page calls it on its own origin.
    let console_serving = console_listener.map(|listener| {
        tokio::spawn(crate::http::serve(
            listener,
            router(state.clone()),
            settings.http.clone(),
            tls.clone(),
            console_stats,
            stop_rx.clone(),
        ))
    });
    let serving = tokio::spawn(crate::http::serve(
        listener,
        router(state),
        settings.http.clone(),
        tls.clone(),
        http_stats,
        stop_rx,
    ));
    let signal = tokio::spawn(shutdown_signal(cell.clone(), stop_tx));

    // Recover in the background: /healthz answers now, the API says not_ready until done.
    let options = BrokerOptions {
        limits: settings.limits.clone(),
        store: settings.store.clone(),
        observer: metrics.clone(),
        forecast: settings.forecast,
        ..BrokerOptions::default()
    };
    let data = settings.data.clone();
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating data directory {}", data.display()))?;
    let opened = tokio::task::spawn_blocking(move || Broker::open(&data, options));
    let broker = opened
        .await?
        .with_context(|| format!("opening data directory {}", settings.data.display()))?;
    broker.store().set_fatal_listener(Arc::new(|what| {
        eprintln!(
            "tidewater: fatal storage error: {what}. Exiting; restart to recover from the journal."
        );
        // The store refuses every write from now on; a moment lets the requests in flight
        // get their answer (refused, or "may or may not be there") instead of a dropped
        // connection.
        std::thread::spawn(|| {
            std::thread::sleep(FATAL_EXIT_GRACE);
            std::process::exit(EXIT_STORAGE_FAILED);
        });
    }));
    for dropped in broker.store().repair_report() {
        tracing::warn!("--repair-missing dropped: {dropped}");
        eprintln!("tidewater: --repair-missing dropped: {dropped}");
    }
    if settings.auth.enabled {
        bootstrap_from_env(&broker).await?;
        tracing::info!(
            keys = broker.auth().keys().count(),
            grants = broker.auth().acls().count(),
            jwt = settings.auth.jwt.jwks_file.is_some(),
            "authentication on: everything not granted is refused"
        );
    } else {
        tracing::info!(
            "authentication off: every request is allowed (keep the listeners on loopback or a trusted network)"
        );
    }
    if settings.tls.is_some() {
        tracing::info!("TLS on every listener");
    }
    let queues = broker.list_queues().len();
    let _ = cell.set(broker.clone());
    let maintenance = broker.spawn_maintenance(Duration::from_millis(100));
    let kafka = match (kafka_listener, settings.kafka.clone()) {
        (Some(listener), Some(mut config)) => Some(tokio::spawn(serve_kafka(
            listener,
            broker.clone(),
            {
                config.auth = guard.enabled.then(|| guard.inner.clone());
                config
            },
            tls.clone(),
            (kafka_stats, kafka_requests),
            kafka_stop,
        ))),
        _ => None,
    };
    let keda = match (keda_listener, settings.keda.clone()) {
        (Some(listener), Some((addr, config))) => {
            tracing::info!(listen = %addr, "KEDA external scaler listening");
            Some(tokio::spawn(crate::keda::serve(
                listener,
                broker.clone(),
                crate::keda::KedaConfig {
                    principal: config.principal.filter(|_| settings.auth.enabled),
                    ..config
                },
                tls.clone(),
                keda_stats,
                keda_stop,
                settings.http.shutdown_timeout,
            )))
        }
        _ => None,
    };
    let pusher = crate::push::Pusher::new(broker.clone(), &settings.push, metrics.clone())
        .context("[push]")?;
    let pushing = tokio::spawn(pusher.run(push_stop));
    tracing::info!(queues, pushes = broker.push_handles().len(), "ready");

    // Both listeners end within the shutdown deadline, whatever their clients do.
    let _ = serving.await;
    let _ = binary.await;
    if let Some(hooks) = hooks_serving {
        let _ = hooks.await;
    }
    if let Some(console) = console_serving {
        let _ = console.await;
    }
    let _ = pushing.await;
    if let Some(kafka) = kafka {
        let _ = kafka.await;
    }
    if let Some(keda) = keda {
        let _ = keda.await;
    }
    signal.abort();
    maintenance.abort();
    tracing::info!("stopped accepting requests; syncing and checkpointing");
    tokio::task::spawn_blocking(move || broker.shutdown()).await?;
    tracing::info!("clean shutdown");
    Ok(())
}

/// With authentication on: the first admin key from `TIDEWATER_ADMIN_KEY` (a token
/// `<key id>.<secret>` the operator chose) when the server has no key yet; a loud warning
/// when it has none and no such variable (every request would be refused).
async fn bootstrap_from_env(broker: &Broker) -> anyhow::Result<()> {
    let has_keys = broker.auth().keys().next().is_some();
    let used = broker.auth_ever_used();
    let token = std::env::var(crate::auth::ADMIN_KEY_ENV).ok();
    match (has_keys || used, token) {
        // Only at the first start: a key revoked since must not come back at a restart.
        (true, Some(_)) => tracing::info!(
            "{} is set but this data directory has had keys: ignored (it only makes the first key; unset it)",
            crate::auth::ADMIN_KEY_ENV
        ),
        (true, None) if !has_keys => tracing::warn!(
            "authentication is on and every API key was revoked: only client certificates, JWTs or anonymous grants get in. Make an admin key with `tidewater auth bootstrap --data <dir>` (server stopped)"
        ),
        (true, None) => {}
        (false, Some(token)) => {
            let Some((id, secret)) = token.split_once('.') else {
                anyhow::bail!(
                    "{} must be <key id>.<secret> (the secret at least 32 characters)",
                    crate::auth::ADMIN_KEY_ENV
                );
            };
            let id = crate::auth::bootstrap(broker, Some((id.to_string(), secret.to_string())))
                .await
                .map_err(|e| anyhow::anyhow!("{}: {}", crate::auth::ADMIN_KEY_ENV, e.message))?
                .info
                .id;
            tracing::info!(key = %id, principal = crate::auth::BOOTSTRAP_PRINCIPAL, "made the first admin key from {}", crate::auth::ADMIN_KEY_ENV);
        }
        (false, None) => tracing::warn!(
            "authentication is on and no API key exists: every request is refused. Make the first admin key with `tidewater auth bootstrap --data <dir>` (server stopped) or start with {}=<key id>.<secret>",
            crate::auth::ADMIN_KEY_ENV
        ),
    }
    Ok(())
}

/// The Kafka listener: Kafka clients against the broker (docs/kafka.md).
async fn serve_kafka(
    listener: tokio::net::TcpListener,
    broker: Broker,
    config: tidewater_kafka::KafkaConfig,
    tls: Option<Arc<crate::tls::Tls>>,
    (stats, requests): (
        Arc<crate::listener::Stats>,
        Arc<tidewater_kafka::KafkaStats>,
    ),
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let bounds = crate::listener::Bounds {
        name: "Kafka",
        max_connections: config.max_connections,
        shutdown_timeout: config.shutdown_timeout,
    };
    let kafka = tidewater_kafka::Kafka::new(broker, config, requests);
    let stop = shutdown.clone();
    crate::listener::accept_loop(
        listener,
        bounds,
        stats,
        shutdown,
        // Kafka has no frame to say why: the client sees the connection close and tries
        // again later.
        |_, _| {},
        move |stream, peer| {
            let (kafka, stop, tls) = (kafka.clone(), stop.clone(), tls.clone());
            async move {
                match tls {
                    None => {
                        tidewater_kafka::serve_connection(kafka, stream, peer, None, stop).await
                    }
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => {
                            let certificate = crate::tls::peer_principal(&stream);
                            tidewater_kafka::serve_connection(
                                kafka,
                                stream,
                                peer,
                                certificate,
                                stop,
                            )
                            .await;
                        }
                        Err(err) => {
                            tracing::debug!(%peer, error = %err, "Kafka TLS handshake failed");
                        }
                    },
                }
            }
        },
    )
    .await;
}

/// Raises the soft limit of open files to the hard limit; returns the limit in force.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// File descriptors kept for the journal, checkpoints, directories being synced, segments
/// in use by readers after leaving the cache, and listeners.
const STORAGE_FILES_RESERVE: u64 = 256;

/// Refuses to start when the connection caps and the segment files held open cannot fit
/// in the open-files limit: they would fail at accept or at a write, under load, instead of
/// now. (The number of queues does not matter: segment files beyond
/// `max_open_segment_files` are closed, least recently used first, and reopened on use.)
/// Binds a listener, saying what it is for and what to try when the address is taken.
async fn bind(addr: SocketAddr, what: &str, hint: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what} (in use? {hint})"))
}

fn check_open_files(settings: &Settings, open_files: u64) -> anyhow::Result<()> {
    // Every listener that is on, by its connection cap.
    let mut caps = vec![
        (
            "[protocol] max_connections",
            settings.protocol.max_connections,
        ),
        ("[http] max_connections", settings.http.max_connections),
    ];
    if settings.hooks.is_some() {
        caps.push((
            "[http] max_connections (webhooks)",
            settings.http.max_connections,
        ));
    }
    if settings.console.listen.is_some() {
        caps.push((
            "[http] max_connections (console)",
            settings.http.max_connections,
        ));
    }
    if let Some(kafka) = &settings.kafka {
        caps.push(("[kafka] max_connections", kafka.max_connections));
    }
    if let Some((_, keda)) = &settings.keda {
        caps.push(("[keda] max_connections", keda.max_connections));
    }
    let connections: u64 = caps.iter().map(|(_, n)| *n as u64).sum();
    let segments = settings.store.max_open_segment_files as u64;
    if connections + segments + STORAGE_FILES_RESERVE > open_files {
        let listed: Vec<String> = caps.iter().map(|(k, n)| format!("{k} {n}")).collect();
        bail!(
            "the open-files limit ({open_files}, `ulimit -Hn`) cannot hold the configured connections and segment files: \
             {} + [storage] max_open_segment_files {segments} \
             + {STORAGE_FILES_RESERVE} for the journal, checkpoints and listeners = {}. \
             Lower them in the config file or raise the hard limit",
            listed.join(" + "),
            connections + segments + STORAGE_FILES_RESERVE
        );
    }
    Ok(())
}

async fn shutdown_signal(broker: Arc<OnceLock<Broker>>, stop: tokio::sync::watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    // SIGHUP (`systemctl reload`) reloads the TLS files and the JWKS (`tls.rs`, `auth.rs` listen
    // too); it must never stop the server, whose default action it would be.
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let hangups = async {
        while hup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP: the TLS certificate and the JWKS file are reloaded when configured"
            );
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = hangups => {}
    }
    if let Some(broker) = broker.get() {
        broker.close();
    }
    let _ = stop.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\ndata = \"/tmp/x\"\n[limits]\nmax_batch_messages = 5\n[storage]\nsegment_roll_bytes = 1048576\n").unwrap();
        let args = ServeArgs {
            data: Some("/tmp/y".into()),
            config: Some(path),
            ..ServeArgs::default()
        };
        let s = settings(&args).unwrap();
        assert_eq!(s.data, PathBuf::from("/tmp/y"));
        assert_eq!(s.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(s.limits.max_batch_messages, 5);
        assert_eq!(
            s.limits.max_receive_messages,
            Limits::default().max_receive_messages
        );
        assert_eq!(s.store.segment_roll_bytes, 1 << 20);
    }

    #[test]
    fn defaults_are_loopback_and_unknown_keys_are_errors() {
        let s = settings(&ServeArgs::default()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:7070");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "listn = \"x\"\n").unwrap();
        let err = settings(&ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("listn"), "{err:#}");
    }
}

#[cfg(test)]
mod docs {
    #[test]
    fn configuration_md_lists_every_setting() {
        let doc = include_str!("../../../docs/configuration.md");
        let limits = serde_json::to_value(tidewater_core::Limits::default()).unwrap();
        let mut keys: Vec<String> = limits.as_object().unwrap().keys().cloned().collect();
        keys.extend(
            [
                "fsync",
                "journal_roll_bytes",
                "segment_roll_bytes",
                "checkpoint_interval_ms",
                "write_queue_capacity",
                "max_open_segment_files",
                "max_request_bytes",
                "max_request_bytes_in_flight",
                "max_frame_bytes",
                "protocol_listen",
                "max_connections",
                "handshake_timeout_ms",
                "idle_timeout_ms",
                "outbox_bytes",
                "header_timeout_ms",
                "body_timeout_ms",
                "shutdown_timeout_ms",
                "kafka_listen",
                "advertised",
                "node_id",
                "max_requests_in_flight",
                "max_uncompressed_produce_bytes",
                "max_producer_states",
                "consumer_heartbeat_interval_ms",
                "consumer_session_timeout_ms",
                "path_prefix",
                "allow",
                "allow_private",
                "ca_file",
            ]
            .map(String::from),
        );
        for key in keys {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/configuration.md does not document `{key}`"
            );
        }
    }
}

/// deploy/tidewater.toml: every setting with its default, each commented out (uncomment
/// what you change). Checked against the real parser: the file parses as it is and with
/// every setting uncommented, uncommented it gives the defaults, and every key the parser
/// takes (asked of it through its unknown-field error) is in the file.
#[cfg(test)]
mod example {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/tidewater.toml");

    /// The file with `# key = value` lines uncommented (section headers are never commented);
    /// with `examples`, the `## key = value` ones too.
    fn uncommented(examples: bool) -> String {
        EXAMPLE
            .lines()
            .map(|line| {
                line.strip_prefix("#")
                    .filter(|_| examples && line.starts_with("## "))
                    .unwrap_or(line)
            })
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
                {
                    rest
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Section ("" for the top) -> its keys, and the order sections come in.
    fn sections(text: &str) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut section = String::new();
        out.entry(String::new()).or_default();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                // A table is a key of its parent.
                let (parent, key) = name.rsplit_once('.').unwrap_or(("", name));
                out.entry(parent.to_string())
                    .or_default()
                    .insert(key.to_string());
                section = name.to_string();
                out.entry(section.clone()).or_default();
            } else if let Some((key, _)) = line.split_once(" = ")
                && !key.starts_with('#')
            {
                out.get_mut(&section).unwrap().insert(key.to_string());
            }
        }
        out
    }

    fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str::<FileConfig>(text).map_err(|e| e.to_string())
    }

    /// What the parser takes in `section`: a probe key there, and its error's list.
    fn expected(text: &str, section: &str) -> BTreeSet<String> {
        let probed = if section.is_empty() {
            format!("zzz_probe = 1\n{text}")
        } else {
            text.replacen(
                &format!("[{section}]\n"),
                &format!("[{section}]\nzzz_probe = 1\n"),
                1,
            )
        };
        let err = parse(&probed).expect_err("the probe key is refused");
        let list = err
            .split("expected one of ")
            .nth(1)
            .or_else(|| err.split("expected ").nth(1))
            .unwrap_or_else(|| panic!("[{section}]: {err}"));
        list.split(',')
            .filter_map(|item| item.split('`').nth(1))
            .map(str::to_string)
            .collect()
    }

    fn args(config: Option<PathBuf>) -> ServeArgs {
        ServeArgs {
            config,
            ..ServeArgs::default()
        }
    }

    const UNIT: &str = include_str!("../../../deploy/tidewater.service");

    /// deploy/tidewater.service starts the server as the CLI's own parser takes it, with
    /// the configuration file the unit's comments install, and enough open files for every
    /// listener of the example configuration turned on.
    #[test]
    fn the_systemd_unit_starts_what_the_parser_takes() {
        use clap::Parser as _;
        let exec = UNIT
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart");
        let mut words: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(words[0], "/usr/local/bin/tidewater");
        words[0] = "tidewater";
        let cli = crate::Cli::try_parse_from(&words).expect("ExecStart parses");
        let crate::Commands::Serve(args) = cli.command else {
            panic!("ExecStart runs `tidewater serve`");
        };
        assert_eq!(
            args.config.as_deref(),
            Some(std::path::Path::new("/etc/tidewater/tidewater.toml"))
        );
        assert!(UNIT.contains("deploy/tidewater.toml /etc/tidewater/tidewater.toml"));
        let nofile: u64 = UNIT
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .expect("a LimitNOFILE")
            .parse()
            .unwrap();
        // Every listener on: the example's examples uncommented.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidewater.toml");
        let all: String = uncommented(true)
            .lines()
            .filter(|l| {
                // Files that do not exist here, and auth (which would need a principal).
                ![
                    "cert_file",
                    "key_file",
                    "client_ca_file",
                    "client_auth",
                    "jwks_file",
                    "ca_file",
                    "audit_file",
                ]
                .iter()
                .any(|k| l.starts_with(&format!("{k} =")))
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, all).unwrap();
        let settings = settings(&args_with(Some(path), Some("0.0.0.0:9092"))).unwrap();
        check_open_files(&settings, nofile).expect("LimitNOFILE holds every listener");
    }

    fn args_with(config: Option<PathBuf>, kafka: Option<&str>) -> ServeArgs {
        ServeArgs {
            kafka_listen: kafka.map(str::to_string),
            ..args(config)
        }
    }

    #[test]
    fn the_example_has_every_setting_at_its_default() {
        parse(EXAMPLE).expect("the example parses as it is");
        let text = uncommented(false);
        parse(&text).expect("the example parses with every default uncommented");
        let all = uncommented(true);
        parse(&all).expect("the example parses with the examples uncommented too");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidewater.toml");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            format!("{:?}", settings(&args(Some(path))).unwrap()),
            format!("{:?}", settings(&args(None)).unwrap()),
            "uncommented, deploy/tidewater.toml must give the defaults"
        );
        let present = sections(&all);
        for (section, keys) in &present {
            let wanted = expected(&all, section);
            let missing: Vec<_> = wanted.difference(keys).collect();
            assert!(missing.is_empty(), "[{section}] lacks {missing:?}");
        }
    }
}
