//! Client commands: queue, publish, consume, dlq. Tables for people, `--json` for scripts.
// Output goes through `outln!`/`errln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::client::{Client, ClientError, bad_input, errln, outln, path_segment};

#[derive(Debug, clap::Args)]
pub struct ConfigFlags {
    /// Default lease (visibility timeout) in milliseconds.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Deliveries before dead-lettering (0 = unlimited).
    #[arg(long)]
    pub max_deliveries: Option<u32>,
    /// Dead-letter queue name (default <queue>-dlq).
    #[arg(long, conflicts_with = "no_dead_letter_queue")]
    pub dead_letter_queue: Option<String>,
    /// Never dead-letter: retry forever.
    #[arg(long)]
    pub no_dead_letter_queue: bool,
    /// Capacity in messages; publishes beyond are refused with 429.
    #[arg(long)]
    pub max_messages: Option<u64>,
    /// Capacity in bytes.
    #[arg(long)]
    pub max_bytes: Option<u64>,
    /// Backoff before the second delivery, in milliseconds.
    #[arg(long)]
    pub backoff_base_ms: Option<u64>,
    /// Longest backoff in milliseconds.
    #[arg(long)]
    pub backoff_max_ms: Option<u64>,
    /// Messages leased at once.
    #[arg(long)]
    pub max_in_flight: Option<u64>,
    /// Set any field, dotted for nested ones; the value is JSON or else a string, e.g.
    /// --set dispatch_rate.per_s=100 --set ttl_ms=60000 --set on_expire=dead_letter.
    /// Merged into the current value: the policy's other fields stay.
    #[arg(long, value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    /// Turn a policy off (set it to null), e.g. --unset dispatch_rate; a nested field is
    /// removed (back to its default), e.g. --unset quota.tenants.acme
    #[arg(long, value_name = "FIELD")]
    pub unset: Vec<String>,
    /// Any configuration as JSON, e.g. '{"backoff": {"multiplier": 3}}' (flags win), merged
    /// into the current value like --set.
    #[arg(long)]
    pub config: Option<String>,
}

/// Sets `path` (dotted) in a JSON object, creating objects on the way.
pub(crate) fn set_path(root: &mut Value, path: &str, value: Value) -> anyhow::Result<()> {
    let mut node = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            anyhow::bail!("'{path}' is not a field name (use e.g. dispatch_rate.per_s)");
        }
        if !node.is_object() {
            *node = json!({});
        }
        if i == parts.len() - 1 {
            node[*part] = value;
            return Ok(());
        }
        node = &mut node[*part];
    }
    Ok(())
}

impl ConfigFlags {
    fn patch(&self) -> anyhow::Result<Value> {
        let mut patch = match &self.config {
            Some(text) => serde_json::from_str(text).context("--config is not valid JSON")?,
            None => json!({}),
        };
        if !patch.is_object() {
            anyhow::bail!("--config must be a JSON object");
        }
        let set = |patch: &mut Value, key: &str, value: Value| patch[key] = value;
        if let Some(v) = self.lease_ms {
            set(&mut patch, "lease_ms", json!(v));
        }
        if let Some(v) = self.max_deliveries {
            set(&mut patch, "max_deliveries", json!(v));
        }
        if let Some(v) = &self.dead_letter_queue {
            set(&mut patch, "dead_letter_queue", json!(v));
        }
        if self.no_dead_letter_queue {
            set(&mut patch, "dead_letter_queue", Value::Null);
        }
        if let Some(v) = self.max_messages {
            set(&mut patch, "max_messages", json!(v));
        }
        if let Some(v) = self.max_bytes {
            set(&mut patch, "max_bytes", json!(v));
        }
        if let Some(v) = self.max_in_flight {
            set(&mut patch, "max_in_flight", json!(v));
        }
        for item in &self.set {
            let Some((path, text)) = item.split_once('=') else {
                anyhow::bail!(
                    "--set takes FIELD=VALUE, e.g. --set dispatch_rate.per_s=100; got '{item}'"
                );
            };
            let value = serde_json::from_str(text).unwrap_or_else(|_| json!(text));
            set_path(&mut patch, path, value)?;
        }
        for path in &self.unset {
            set_path(&mut patch, path, Value::Null)?;
        }
        if self.backoff_base_ms.is_some() || self.backoff_max_ms.is_some() {
            if !patch["backoff"].is_object() {
                patch["backoff"] = json!({});
            }
            if let Some(v) = self.backoff_base_ms {
                patch["backoff"]["base_ms"] = json!(v);
            }
            if let Some(v) = self.backoff_max_ms {
                patch["backoff"]["max_ms"] = json!(v);
            }
        }
        Ok(patch)
    }

    fn is_empty(&self) -> bool {
        self.patch()
            .map(|p| p.as_object().is_some_and(|o| o.is_empty()))
            .unwrap_or(false)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum QueueCommand {
    /// Create a queue (or update an existing one's configuration).
    Create {
        name: String,
        #[command(flatten)]
        config: ConfigFlags,
    },
    /// List queues with their depth and counters.
    List,
    /// Show one queue's stats.
    Stats { name: String },
    /// Show a queue's configuration, or change it with flags.
    Config {
        name: String,
        #[command(flatten)]
        config: ConfigFlags,
    },
    /// Delete a queue and all its messages.
    Delete { name: String },
    /// Remove every message of a queue (leased ones included).
    Purge { name: String },
    /// Forecast the queue's backlog: arrival and service rates, time to drain, when the
    /// oldest message crosses the age objective, and the consumers needed to drain it in
    /// time (docs/autoscaling.md says how each is computed).
    #[command(after_help = "Examples:
  tidewater queue forecast orders
  tidewater queue forecast orders --drain-target-ms 60000 --json")]
    Forecast {
        /// The queue.
        name: String,
        #[command(flatten)]
        objectives: crate::cli_forecast::ObjectiveFlags,
    },
    /// Where the queue's messages wait: the keys with the most messages waiting for a slot
    /// (with key_concurrency) and the fair-scheduling values with the most waiting (with
    /// fairness).
    #[command(after_help = "Examples:
  tidewater queue busiest orders
  tidewater queue busiest orders --limit 5 --json")]
    Busiest {
        /// The queue.
        name: String,
        /// At most this many keys, and this many values.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Show messages in a dead-letter queue (without leasing them).
    List {
        /// The dead-letter queue, e.g. orders-dlq.
        dlq: String,
        #[arg(long, default_value_t = 20)]
        max: usize,
    },
    /// List redrives (running and the last finished ones).
    Redrives,
    /// Cancel a running redrive; what it moved stays moved.
    Cancel {
        /// The redrive id, e.g. rd-3.
        id: String,
    },
    /// Move messages back to their source queue at a bounded rate.
    Redrive {
        dlq: String,
        /// Target queue (default: each message's source queue).
        #[arg(long)]
        to: Option<String>,
        /// Messages per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Stop after this many (0 = all).
        #[arg(long, default_value_t = 0)]
        max: u64,
        /// Only messages with this key.
        #[arg(long)]
        key: Option<String>,
        /// Only messages whose last error contains this text.
        #[arg(long)]
        error_contains: Option<String>,
        /// Start and print the redrive id without waiting.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    pub queue: String,
    /// Message bodies; without any, one message per line of --file or standard input.
    pub bodies: Vec<String>,
    /// Read one message per line from this file.
    #[arg(long, conflicts_with = "bodies")]
    pub file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub key: Option<String>,
    /// A header, name=value (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Deliver no earlier than this many milliseconds from now.
    #[arg(long, conflicts_with = "deliver_at")]
    pub delay_ms: Option<u64>,
    /// Deliver no earlier than this time, in milliseconds since the Unix epoch.
    #[arg(long, value_name = "EPOCH_MS")]
    pub deliver_at: Option<i64>,
    /// Add a random delay of up to this many milliseconds to each message (after any
    /// delay), to spread a burst.
    #[arg(long)]
    pub jitter_ms: Option<u64>,
    /// The producer the messages count against (quotas, fairness); 1 to 128 bytes.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Priority level, 0 = lowest (on queues with priority_levels > 1).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Time to live in milliseconds: dropped (or dead-lettered) if not delivered by then.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_ms: Option<u64>,
    /// The message's id, for deduplication (1 to 255 bytes); repeat it to give one per
    /// message, in order: as many ids as messages.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// Messages per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// durable (after fsync) or written (after write(2)).
    #[arg(long, default_value = "durable", value_parser = ["durable", "written"])]
    pub ack: String,
    /// Give up on backpressure (429/507) after this many seconds of retrying.
    #[arg(long, default_value_t = 300)]
    pub retry_for_s: u64,
}

#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    pub queue: String,
    /// Stop after this many messages (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub max: u64,
    /// Messages per receive.
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// How long to wait for the next message before stopping, in milliseconds (the first
    /// may take up to 500 ms more: connecting and subscribing).
    #[arg(long, default_value_t = 5000)]
    pub wait_ms: u64,
    /// Lease in milliseconds (default: the queue's).
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Nack instead of ack (the queue's backoff applies).
    #[arg(long)]
    pub nack: bool,
    /// Run this shell command per message (body on stdin; TIDEWATER_* variables set):
    /// ack when it exits 0, nack with its stderr otherwise.
    #[arg(long)]
    pub exec: Option<String>,
    /// Keep waiting for messages instead of stopping when the queue is empty.
    #[arg(long)]
    pub follow: bool,
}

fn queue_path(name: &str) -> String {
    format!("/v1/queues/{}", path_segment(name))
}

/// Prints rows as an aligned table.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub(crate) fn num(v: &Value) -> String {
    v.as_u64()
        .map(|n| n.to_string())
        .unwrap_or_else(|| v.to_string())
}

pub(crate) fn age(ms: u64) -> String {
    match ms {
        0 => "-".into(),
        ms if ms < 1_000 => format!("{ms}ms"),
        ms if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms if ms < 3_600_000 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
        ms => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

pub(crate) fn print_json(value: &Value) {
    outln!("{}", serde_json::to_string_pretty(value).expect("json"));
}

fn clip(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', "\\n");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}…", one_line.chars().take(max).collect::<String>())
    }
}

/// The top-level fields a patch touches, each merged into the queue's current value:
/// objects merge member by member (at any depth), anything else replaces. Below the top
/// level a null removes the member (JSON merge patch, RFC 7396: a tenant's quota, a
/// fairness weight, a field back to its default); at the top level null is sent as is,
/// which the API reads as "policy off".
fn merge_into_current(current: &Value, patch: Value) -> Value {
    fn merge(target: &mut Value, patch: Value) {
        match (target.as_object_mut(), patch) {
            (Some(target), Value::Object(patch)) => {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(&key);
                    } else {
                        merge(target.entry(key).or_insert(Value::Null), value);
                    }
                }
            }
            (None, Value::Object(patch)) => {
                *target = json!({});
                merge(target, Value::Object(patch));
            }
            (_, patch) => *target = patch,
        }
    }
    let Value::Object(patch) = patch else {
        return patch;
    };
    let mut out = serde_json::Map::new();
    for (key, value) in patch {
        let merged = if value.is_object() {
            let mut base = current.get(&key).cloned().unwrap_or(Value::Null);
            merge(&mut base, value);
            base
        } else {
            value
        };
        out.insert(key, merged);
    }
    Value::Object(out)
}

pub fn queue(client: &Client, command: QueueCommand, as_json: bool) -> anyhow::Result<()> {
    // `queue config` changes a queue that exists; only `queue create` creates.
    let creating = matches!(command, QueueCommand::Create { .. });
    match command {
        QueueCommand::Config { name, config } if config.is_empty() => {
            let info = client.get(&queue_path(&name))?;
            if as_json {
                print_json(&info["config"]);
            } else {
                print_config(&info["config"]);
            }
            Ok(())
        }
        QueueCommand::Create { name, config } | QueueCommand::Config { name, config } => {
            let patch = config.patch()?;
            // The server replaces a policy object whole: merge the change into the
            // queue's current value here, so --set quota.msgs_per_s=5 keeps the rest.
            let body = match client.get(&queue_path(&name)) {
                Ok(info) => merge_into_current(&info["config"], patch),
                Err(ClientError::Api { status: 404, .. }) if creating => patch,
                Err(err) => return Err(err.into()),
            };
            let (status, info) =
                client.call("PUT", &queue_path(&name), Some(&serde_json::to_vec(&body)?))?;
            if as_json {
                print_json(&info);
            } else {
                outln!(
                    "{} queue '{}'",
                    if status == 201 { "created" } else { "updated" },
                    name
                );
                print_config(&info["config"]);
            }
            Ok(())
        }
        QueueCommand::List => {
            let reply = client.get("/v1/queues")?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let empty = vec![];
            let queues = reply["queues"].as_array().unwrap_or(&empty);
            if queues.is_empty() {
                outln!("no queues yet: create one with `tidewater queue create NAME`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = queues
                .iter()
                .map(|q| {
                    let s = &q["stats"];
                    vec![
                        q["name"].as_str().unwrap_or("?").to_string(),
                        num(&s["depth"]),
                        num(&s["in_flight"]),
                        num(&s["delayed"]),
                        age(s["oldest_age_ms"].as_u64().unwrap_or(0)),
                        num(&s["published"]),
                        num(&s["acked"]),
                        num(&s["dead_lettered"]),
                    ]
                })
                .collect();
            table(
                &[
                    "QUEUE",
                    "DEPTH",
                    "IN FLIGHT",
                    "DELAYED",
                    "OLDEST",
                    "PUBLISHED",
                    "ACKED",
                    "DEAD-LETTERED",
                ],
                &rows,
            );
            Ok(())
        }
        QueueCommand::Stats { name } => {
            let info = client.get(&queue_path(&name))?;
            if as_json {
                print_json(&info);
                return Ok(());
            }
            let order = [
                "depth",
                "in_flight",
                "delayed",
                "total",
                "bytes",
                "oldest_age_ms",
                "published",
                "delivered",
                "acked",
                "nacked",
                "expired",
                "dead_lettered",
                "redriven",
                "purged",
            ];
            let stats = &info["stats"];
            // Known figures in a stable order, then whatever else the server reports.
            let extra: Vec<&str> = stats
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let extra: Vec<&str> = extra.into_iter().filter(|k| *k != "forecast").collect();
            let rows: Vec<Vec<String>> = order
                .iter()
                .copied()
                .chain(extra.into_iter().filter(|k| !order.contains(k)))
                .filter(|k| !stats[*k].is_null())
                .map(|k| {
                    vec![
                        k.to_string(),
                        if k == "oldest_age_ms" {
                            age(stats[k].as_u64().unwrap_or(0))
                        } else {
                            num(&stats[k])
                        },
                    ]
                })
                .collect();
            outln!("queue '{name}'");
            table(&["STAT", "VALUE"], &rows);
            if stats["forecast"].is_object() {
                outln!(
                    "forecast: {} (tidewater queue forecast {name})",
                    crate::cli_forecast::summary(&stats["forecast"])
                );
            }
            Ok(())
        }
        QueueCommand::Forecast { name, objectives } => crate::cli_forecast::show(
            client,
            &queue_path(&name),
            &format!("queue '{name}'"),
            &objectives,
            as_json,
        ),
        QueueCommand::Busiest { name, limit } => {
            let reply = client.get(&format!("{}/busiest?limit={limit}", queue_path(&name)))?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            if reply["keys"].is_null() && reply["flows"].is_null() {
                outln!(
                    "queue '{name}' has neither key_concurrency nor fairness: nothing waits by key or value"
                );
                return Ok(());
            }
            if let Some(keys) = reply["keys"].as_array() {
                outln!("keys (key_concurrency), most waiting first:");
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k["key"].as_str().map_or_else(
                                || format!("base64:{}", k["key_base64"].as_str().unwrap_or("")),
                                str::to_string,
                            ),
                            k["in_flight"].to_string(),
                            k["waiting"].to_string(),
                        ]
                    })
                    .collect();
                table(&["KEY", "IN FLIGHT", "WAITING"], &rows);
            }
            if let Some(flows) = reply["flows"].as_array() {
                outln!(
                    "fairness by {}, most waiting first:",
                    reply["fair_by"].as_str().unwrap_or("-")
                );
                let rows: Vec<Vec<String>> = flows
                    .iter()
                    .map(|f| {
                        vec![
                            f["flow"].as_str().unwrap_or("").to_string(),
                            f["waiting"].to_string(),
                            f["weight"].to_string(),
                        ]
                    })
                    .collect();
                table(&["VALUE", "WAITING", "WEIGHT"], &rows);
            }
            Ok(())
        }
        QueueCommand::Delete { name } => {
            client.call("DELETE", &queue_path(&name), None)?;
            if as_json {
                print_json(&json!({"deleted": name}));
            } else {
                outln!("deleted queue '{name}'");
            }
            Ok(())
        }
        QueueCommand::Purge { name } => {
            let reply = client.post(&format!("{}/purge", queue_path(&name)), &json!({}))?;
            if as_json {
                print_json(&reply);
            } else {
                outln!("purged {} messages from '{name}'", num(&reply["purged"]));
            }
            Ok(())
        }
    }
}

/// A JSON value as a person reads it: a string without its quotes, anything else as JSON.
pub(crate) fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// `--set FIELD=VALUE` items into `patch`: dotted fields for nested ones, the value JSON or
/// else a string; `example` shows the form in the error.
pub(crate) fn apply_sets(patch: &mut Value, items: &[String], example: &str) -> anyhow::Result<()> {
    for item in items {
        let Some((path, text)) = item.split_once('=') else {
            return Err(crate::client::bad_input(format!(
                "--set takes FIELD=VALUE, e.g. --set {example}; got '{item}'"
            )));
        };
        let value = serde_json::from_str(text).unwrap_or_else(|_| json!(text));
        set_path(patch, path, value).map_err(|e| crate::client::bad_input(e.to_string()))?;
    }
    Ok(())
}

/// A listing: with `--json` the reply as it came; else a table of `reply[key]`, a row an
/// item, or `empty` (a hint to make the first one) when there is none.
pub(crate) fn print_listing(
    reply: &Value,
    key: &str,
    as_json: bool,
    empty: &str,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) {
    if as_json {
        print_json(reply);
        return;
    }
    let items = reply[key].as_array().map_or(&[][..], Vec::as_slice);
    if items.is_empty() {
        crate::client::outln!("{empty}");
        return;
    }
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(headers, &rows);
}

/// `{"kind": "name"}` as `kind name` (a hook's target, a push endpoint's source).
pub(crate) fn tagged(v: &Value) -> String {
    match v.as_object().and_then(|o| o.iter().next()) {
        Some((kind, name)) => format!("{kind} {}", text(name)),
        None => "-".into(),
    }
}

/// Counts by name (`{"a": 1, "b": 2}`) as `a 1, b 2`, or `empty` when there are none.
pub(crate) fn counts(v: &Value, empty: &str) -> String {
    let Some(map) = v.as_object().filter(|m| !m.is_empty()) else {
        return empty.into();
    };
    map.iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn print_config(config: &Value) {
    let Some(map) = config.as_object() else {
        return;
    };
    let rows: Vec<Vec<String>> = map
        .iter()
        .map(|(k, v)| {
            vec![
                k.clone(),
                if v.is_string() {
                    v.as_str().unwrap().to_string()
                } else {
                    v.to_string()
                },
            ]
        })
        .collect();
    table(&["SETTING", "VALUE"], &rows);
}

pub(crate) fn progress_bar(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n).with_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})",
            )
            .expect("template")
            .progress_chars("=> "),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {pos} ({per_sec})")
                .expect("template"),
        ),
    };
    bar.set_message(what.to_string());
    bar
}

/// A binary-protocol client error as a CLI error with a meaningful exit code.
fn binary_error(err: tidewater_client::ClientError) -> anyhow::Error {
    use tidewater_client::ClientError as E;
    anyhow::Error::new(match err {
        E::Server { code, message } => ClientError::from_server_code(code, message),
        E::Unavailable(ref why) if why.contains("TLS") || why.contains("certificate") => {
            ClientError::Unreachable(format!(
                "{err}. The server speaks TLS: give its CA with --cacert FILE (or TIDEWATER_CACERT), and --server https://..."
            ))
        }
        E::Unavailable(_) | E::CircuitOpen => ClientError::Unreachable(format!(
            "{err}. Is `tidewater serve` running, with its binary protocol at this address? (--protocol-server or TIDEWATER_PROTOCOL_SERVER; a server with TLS on also needs --server https://... and --cacert)"
        )),
        other => ClientError::Other(other.to_string()),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn binary_client(addr: &str) -> anyhow::Result<tidewater_client::Client> {
    Ok(tidewater_client::Client::new(
        addr,
        tidewater_client::ClientOptions {
            request_timeout: Duration::from_secs(30),
            breaker_failures: 3,
            credentials: crate::client::token().map(tidewater_client::Credentials::token),
            tls: crate::client::binary_tls()?,
            ..Default::default()
        },
    ))
}

/// Publishes over the binary protocol; the client batches and waits out throttle replies
/// for up to --retry-for-s.
pub fn publish(protocol: &str, args: PublishArgs, as_json: bool) -> anyhow::Result<()> {
    use tidewater_client::{Message, ProducerOptions};
    if args.batch == 0 {
        return Err(bad_input("--batch must be at least 1"));
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once('=') else {
            return Err(bad_input(format!(
                "--header '{h}' must look like name=value"
            )));
        };
        headers.push((name.to_string(), value.to_string()));
    }
    if let Some(tenant) = &args.tenant
        && !(1..=128).contains(&tenant.len())
    {
        return Err(bad_input("--tenant is 1 to 128 bytes"));
    }
    if let Some(id) = args.ids.iter().find(|id| !(1..=255).contains(&id.len())) {
        return Err(bad_input(format!("--id '{id}': ids are 1 to 255 bytes")));
    }
    let deliver_at_ms = match (args.delay_ms, args.deliver_at) {
        (Some(ms), _) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64
                + ms as i64
        }
        (None, Some(at)) if at <= 0 => {
            return Err(bad_input(
                "--deliver-at is milliseconds since the Unix epoch, above 0",
            ));
        }
        (None, Some(at)) => at,
        (None, None) => 0,
    };
    let mut ids = args.ids.clone().into_iter();
    let mut make = |body: String| {
        let mut message = Message {
            id: ids.next(),
            body: body.into_bytes(),
            key: args.key.clone(),
            headers: headers.clone(),
            deliver_at_ms,
            ack: None,
        };
        if let Some(jitter) = args.jitter_ms.filter(|ms| *ms > 0) {
            message = message.with_jitter(Duration::from_millis(jitter));
        }
        if let Some(tenant) = &args.tenant {
            message = message.with_tenant(tenant);
        }
        if let Some(priority) = args.priority {
            message = message.with_priority(priority);
        }
        if let Some(ttl) = args.ttl_ms {
            message = message.with_ttl(Duration::from_millis(ttl));
        }
        message
    };
    let (lines, len): (
        Box<dyn Iterator<Item = std::io::Result<String>>>,
        Option<u64>,
    ) = if !args.bodies.is_empty() {
        let n = args.bodies.len() as u64;
        (Box::new(args.bodies.clone().into_iter().map(Ok)), Some(n))
    } else if let Some(path) = &args.file {
        let count = std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )
        .lines()
        .count();
        let file = std::fs::File::open(path)?;
        (
            Box::new(std::io::BufReader::new(file).lines()),
            Some(count as u64),
        )
    } else {
        if std::io::stdin().is_terminal() {
            errln!("reading one message per line from standard input (Ctrl-D to end)");
        }
        (
            Box::new(std::io::BufReader::new(std::io::stdin()).lines()),
            None,
        )
    };
    // With --id, one per message: read the messages first (as many as ids, and one more
    // to tell), so a mismatch publishes nothing.
    let (lines, len) = if args.ids.is_empty() {
        (lines, len)
    } else {
        let read: Vec<String> = lines
            .take(args.ids.len() + 1)
            .collect::<std::io::Result<_>>()
            .context("reading input")?;
        if read.len() != args.ids.len() {
            return Err(bad_input(format!(
                "--id was given {} times for {}{} messages: give one per message",
                args.ids.len(),
                read.len(),
                if read.len() > args.ids.len() {
                    " or more"
                } else {
                    ""
                }
            )));
        }
        let n = read.len() as u64;
        let lines: Box<dyn Iterator<Item = std::io::Result<String>>> =
            Box::new(read.into_iter().map(Ok));
        (lines, Some(n))
    };
    let show_ids = !args.bodies.is_empty();
    let bar = if show_ids {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar(len, &format!("publishing to {}", args.queue))
    };
    let ack = if args.ack == "written" {
        tidewater_proto::Ack::Written
    } else {
        tidewater_proto::Ack::Durable
    };
    let opts = ProducerOptions {
        max_batch_messages: args.batch,
        max_throttle_wait: Duration::from_secs(args.retry_for_s),
        ack,
        ..ProducerOptions::default()
    };
    let runtime = runtime()?;
    let ids: Vec<String> = runtime.block_on(async {
        let client = binary_client(protocol)?;
        let producer = client.producer(&args.queue, opts);
        let mut window = std::collections::VecDeque::new();
        let mut ids = Vec::new();
        for line in lines {
            window.push_back(producer.send(make(line.context("reading input")?)));
            if window.len() >= args.batch * 4 {
                let id = window.pop_front().unwrap().await.map_err(binary_error)?;
                bar.inc(1);
                if show_ids {
                    ids.push(id);
                }
            }
        }
        for send in window {
            let id = send.await.map_err(binary_error)?;
            bar.inc(1);
            if show_ids {
                ids.push(id);
            }
        }
        anyhow::Ok(ids)
    })?;
    let published = bar.position();
    bar.finish_and_clear();
    match (as_json, show_ids) {
        (true, true) => print_json(&json!({"published": ids.len(), "ids": ids})),
        (true, false) => print_json(&json!({"published": published})),
        (false, true) => ids.iter().for_each(|id| outln!("{id}")),
        (false, false) => outln!("published {published} messages to '{}'", args.queue),
    }
    Ok(())
}

/// Runs the --exec command for one message; Ok(()) to ack, Err(text) to nack.
fn run_handler(
    command: &str,
    queue: &str,
    delivery: &tidewater_client::Delivery,
) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        // The consumer's credentials are not the handler's business.
        .env_remove("TIDEWATER_TOKEN")
        .env_remove("TIDEWATER_CLIENT_KEY")
        .env("TIDEWATER_QUEUE", queue)
        .env("TIDEWATER_MESSAGE_ID", &delivery.id)
        .env(
            "TIDEWATER_MESSAGE_KEY",
            delivery.key.as_deref().unwrap_or(""),
        )
        .env(
            "TIDEWATER_DELIVERY_COUNT",
            delivery.delivery_count.to_string(),
        )
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run '{command}': {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&delivery.body);
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        let tail: String = stderr
            .trim()
            .chars()
            .rev()
            .take(500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!("{status}: {tail}"))
    }
}

fn delivery_json(d: &tidewater_client::Delivery) -> Value {
    use base64::Engine;
    let mut m = json!({
        "id": d.id,
        "receipt": d.receipt,
        "delivery_count": d.delivery_count,
        "published_at": d.published_at_ms,
        "offset": d.offset,
        "headers": Value::Object(d.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
    });
    // A subscription's delivery from a stream partition.
    if let Some(partition) = d.partition() {
        m["partition"] = json!(partition);
    }
    // The HTTP API's rule (api::BodyEncoding), so both protocols print a body alike.
    match crate::api::BodyEncoding::Auto.as_text(&d.body) {
        Some(text) => m["body"] = json!(text),
        None => m["body_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&d.body)),
    }
    if let Some(key) = &d.key {
        m["key"] = json!(key);
    }
    m
}

/// One line of `consume`'s table: columns padded for the usual widths (a generated id is
/// 32 characters), the body last and whole.
fn consume_row(id: &str, deliveries: &str, key: &str, body: &str) -> String {
    format!("{id:<32}  {deliveries:>8}  {key:<16}  {body}")
}

/// A delivery as a row for people: one line whatever the body (backslash, tab, CR and LF
/// escaped; a body that is not plain text as base64:...).
fn delivery_row(d: &tidewater_client::Delivery) -> String {
    let body = match crate::api::BodyEncoding::Auto.as_text(&d.body) {
        Some(text) => text
            .replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\r', "\\r")
            .replace('\n', "\\n"),
        None => {
            use base64::Engine;
            format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(&d.body)
            )
        }
    };
    consume_row(
        &d.id,
        &d.delivery_count.to_string(),
        d.key.as_deref().unwrap_or("-"),
        &body,
    )
}

/// Consumes over the binary protocol: a credit-based subscription, batched acks.
/// Time allowed on top of `--wait-ms` for the first message (connect, subscribe, first push).
const FIRST_MESSAGE_GRACE_MS: u64 = 500;

pub fn consume(protocol: &str, args: ConsumeArgs, as_json: bool) -> anyhow::Result<()> {
    use tidewater_client::ConsumerOptions;
    let runtime = runtime()?;
    let mut stopped_by_signal = false;
    let (done, acked, nacked) = runtime.block_on(async {
        let client = binary_client(protocol)?;
        // An unreachable server is an error (exit 5), not an empty queue: the consumer
        // itself would keep reconnecting quietly.
        client.ping().await.map_err(binary_error)?;
        let mut unreachable_warned = false;
        let prefetch = if args.max > 0 { (args.max as u32).min(args.batch as u32) } else { args.batch as u32 }.max(1);
        let max_messages = (args.max > 0).then_some(args.max);
        let mut consumer =
            client.consumer(&args.queue, ConsumerOptions { prefetch, lease_ms: args.lease_ms, max_messages, ..ConsumerOptions::default() });
        let (mut done, mut acked, mut nacked) = (0u64, 0u64, 0u64);
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        while args.max == 0 || done < args.max {
            // The first message also waits for the connection and subscription: with
            // `--wait-ms 0`, a queue with messages must not look empty.
            let connecting = if done == 0 { FIRST_MESSAGE_GRACE_MS } else { 0 };
            let wait = Duration::from_millis(args.wait_ms.max(1) + connecting);
            // Ctrl-C or SIGTERM stops taking messages; the one being handled finishes, and the
            // acks and releases below still go out (a signal used to drop them: every handled
            // message came back when its lease expired).
            let next = tokio::select! {
                next = tokio::time::timeout(wait, consumer.next()) => next,
                _ = interrupt.recv() => {
                    stopped_by_signal = true;
                    break;
                }
                _ = terminate.recv() => {
                    stopped_by_signal = true;
                    break;
                }
            };
            let delivery = match next {
                Ok(Some(delivery)) => delivery.map_err(binary_error)?,
                Ok(None) => break,
                Err(_) if args.follow => {
                    // Following: the consumer reconnects by itself; say so once.
                    match client.ping().await {
                        Err(err) if !unreachable_warned => {
                            errln!("warning: {}; still trying", binary_error(err));
                            unreachable_warned = true;
                        }
                        Err(_) => {}
                        Ok(()) => unreachable_warned = false,
                    }
                    continue;
                }
                // Nothing for --wait-ms: the queue is drained, unless the server went away.
                Err(_) => {
                    client.ping().await.map_err(binary_error)?;
                    break;
                }
            };
            let line = if as_json {
                serde_json::to_string(&delivery_json(&delivery))?
            } else if done == 0 {
                format!("{}\n{}", consume_row("ID", "DELIVERY", "KEY", "BODY"), delivery_row(&delivery))
            } else {
                delivery_row(&delivery)
            };
            if let Err(err) = crate::client::try_write_stdout(format_args!("{line}\n")) {
                // Nobody reads any more (`| head`): this message was not handled. Stop the
                // pushes, give it and the prefetched back at once, send the acks of those
                // that were handled. (Given back before the pushes stopped, it could come
                // back to this consumer and stay leased after its exit.)
                consumer.close_giving_back(&[&delivery]).await;
                crate::client::stdout_failed(err);
            }
            let verdict = match (&args.exec, args.nack) {
                (Some(command), _) => run_handler(command, &args.queue, &delivery),
                (None, true) => Err("nacked by tidewater consume --nack".to_string()),
                (None, false) => Ok(()),
            };
            match verdict {
                Ok(()) => {
                    consumer.ack(&delivery);
                    acked += 1;
                }
                Err(error) => {
                    if consumer.nack(&delivery, None, &error).await.map_err(binary_error)? {
                        nacked += 1;
                    } else {
                        errln!("warning: the lease expired before the handler finished; raise --lease-ms");
                    }
                }
            }
            done += 1;
        }
        // Release what was pushed but not handled, and send the last acks.
        consumer.close().await;
        let failures = client.stats().ack_failures.load(std::sync::atomic::Ordering::Relaxed);
        if failures > 0 {
            errln!("warning: {failures} acks were refused (leases expired); those messages will be delivered again");
        }
        anyhow::Ok((done, acked.saturating_sub(failures), nacked))
    })?;
    if !as_json {
        errln!(
            "consumed {done} messages from '{}': {acked} acked, {nacked} nacked{}",
            args.queue,
            if stopped_by_signal {
                " (stopped by a signal)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Whether some queue names `name` as its dead-letter queue.
fn is_named_dead_letter_queue(client: &Client, name: &str) -> Result<bool, ClientError> {
    let queues = client.get("/v1/queues")?;
    Ok(queues["queues"]
        .as_array()
        .is_some_and(|qs| qs.iter().any(|q| q["config"]["dead_letter_queue"] == name)))
}

pub fn dlq(client: &Client, command: DlqCommand, as_json: bool) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { dlq, max } => {
            let reply = match client.get(&format!("{}/messages?max={max}", queue_path(&dlq))) {
                Ok(reply) => reply,
                // A dead-letter queue is created when its first message arrives: if a queue
                // names it, it is simply empty so far.
                Err(ClientError::Api { status: 404, .. })
                    if is_named_dead_letter_queue(client, &dlq)? =>
                {
                    json!({"messages": []})
                }
                Err(err) => return Err(err.into()),
            };
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let messages = reply["messages"].as_array().cloned().unwrap_or_default();
            if messages.is_empty() {
                outln!(
                    "'{dlq}' is empty (a dead-letter queue is created when its first message arrives)"
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = messages
                .iter()
                .map(|m| {
                    let h = &m["headers"];
                    vec![
                        m["id"].as_str().unwrap_or("?").to_string(),
                        h["tidewater-source-queue"]
                            .as_str()
                            .unwrap_or("-")
                            .to_string(),
                        h["tidewater-delivery-count"]
                            .as_str()
                            .unwrap_or("-")
                            .to_string(),
                        clip(h["tidewater-last-error"].as_str().unwrap_or("-"), 40),
                        clip(m["body"].as_str().unwrap_or("(binary)"), 40),
                    ]
                })
                .collect();
            table(&["ID", "SOURCE", "DELIVERIES", "LAST ERROR", "BODY"], &rows);
            Ok(())
        }
        DlqCommand::Redrives => {
            let reply = client.get("/v1/redrives")?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = reply["redrives"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    vec![
                        r["id"].as_str().unwrap_or("").to_string(),
                        r["queue"].as_str().unwrap_or("").to_string(),
                        r["state"].as_str().unwrap_or("").to_string(),
                        num(&r["moved"]),
                        num(&r["remaining"]),
                        num(&r["skipped"]),
                    ]
                })
                .collect();
            table(
                &["ID", "FROM", "STATE", "MOVED", "REMAINING", "SKIPPED"],
                &rows,
            );
            Ok(())
        }
        DlqCommand::Cancel { id } => {
            let reply = client.delete(&format!("/v1/redrives/{}", path_segment(&id)))?;
            if as_json {
                print_json(&reply);
            } else {
                outln!(
                    "redrive {id} {}: moved {}",
                    reply["state"].as_str().unwrap_or("?"),
                    num(&reply["moved"])
                );
            }
            Ok(())
        }
        DlqCommand::Redrive {
            dlq,
            to,
            rate,
            max,
            key,
            error_contains,
            no_wait,
        } => {
            let mut body = json!({"rate_per_s": rate, "max": max, "filter": {}});
            if let Some(to) = to {
                body["to"] = json!(to);
            }
            if let Some(key) = key {
                body["filter"]["key"] = json!(key);
            }
            if let Some(text) = error_contains {
                body["filter"]["error_contains"] = json!(text);
            }
            let started = client.post(&format!("{}/redrive", queue_path(&dlq)), &body)?;
            let id = started["id"].as_str().unwrap_or_default().to_string();
            if no_wait {
                if as_json {
                    print_json(&started);
                } else {
                    outln!("redrive {id} started; follow it with GET /v1/redrives/{id}");
                }
                return Ok(());
            }
            let total = started["remaining"].as_u64().unwrap_or(0);
            let bar = progress_bar(Some(total), &format!("redriving {dlq}"));
            let last = loop {
                std::thread::sleep(Duration::from_millis(200));
                let progress = client.get(&format!("/v1/redrives/{id}"))?;
                bar.set_position(progress["moved"].as_u64().unwrap_or(0));
                if progress["state"] != "running" {
                    break progress;
                }
            };
            bar.finish_and_clear();
            if as_json {
                print_json(&last);
            } else {
                outln!(
                    "redrive {id} {}: moved {}, skipped {}",
                    last["state"].as_str().unwrap_or("?"),
                    num(&last["moved"]),
                    num(&last["skipped"])
                );
            }
            if last["state"] == "failed" {
                anyhow::bail!(
                    "redrive failed: {}",
                    last["error"].as_str().unwrap_or("unknown error")
                );
            }
            Ok(())
        }
    }
}
