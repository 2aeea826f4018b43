//! Client commands for streams and consumer groups: stream, produce, fetch, group. Tables
//! for people, `--json` for scripts, everything over the HTTP API.
// Output goes through `outln!`/`errln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::cli::{age, apply_sets, num, print_config, print_json, progress_bar, table, text};
use crate::client::{Client, ClientError, bad_input, errln, outln, path_segment};

fn stream_path(name: &str) -> String {
    format!("/v1/streams/{}", path_segment(name))
}

fn group_path(name: &str) -> String {
    format!("/v1/groups/{}", path_segment(name))
}

/// A not-found error for something the server did not name itself.
fn not_found(code: &str, message: String) -> anyhow::Error {
    anyhow::Error::new(ClientError::Api {
        status: 404,
        code: code.to_string(),
        message,
        retry_after_ms: None,
    })
}

// ---- stream ----

#[derive(Debug, clap::Args)]
pub struct StreamConfigFlags {
    /// Partitions: set at create (default 1), can grow, never shrink.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub partitions: Option<u32>,
    /// What happens to old records: delete (retention by age and size), compact (the
    /// latest record per key stays; every record needs a key) or compact+delete.
    #[arg(long, value_parser = ["delete", "compact", "compact+delete", "compact,delete"])]
    pub cleanup: Option<String>,
    /// Set any field; the value is JSON or else a string, e.g.
    /// --set timestamp_type=log_append_time, --set retention_ms=86400000.
    #[arg(long, value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

impl StreamConfigFlags {
    fn patch(&self) -> anyhow::Result<Value> {
        let mut patch = json!({});
        apply_sets(&mut patch, &self.set, "timestamp_type=log_append_time")?;
        if let Some(n) = self.partitions {
            patch["partitions"] = json!(n);
        }
        if let Some(cleanup) = &self.cleanup {
            patch["cleanup"] = json!(cleanup);
        }
        Ok(patch)
    }

    fn is_empty(&self) -> bool {
        self.partitions.is_none() && self.cleanup.is_none() && self.set.is_empty()
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum StreamCommand {
    /// Create a stream (an existing one is left as it is: `stream config` changes it).
    #[command(
        after_help = "Examples:\n  tidewater stream create readings --partitions 8\n  tidewater stream create prices --cleanup compact --set delete_retention_ms=3600000"
    )]
    Create {
        name: String,
        #[command(flatten)]
        config: StreamConfigFlags,
    },
    /// List streams with their partitions, records and bytes.
    List,
    /// Show each partition of a stream: its first and next offset, and its size.
    Stats { name: String },
    /// Show an existing stream's configuration, or change it with flags (partitions can only
    /// grow; on a compacted stream, growing moves keys to other partitions, where their
    /// older values stay as the latest of their old partition).
    Config {
        name: String,
        #[command(flatten)]
        config: StreamConfigFlags,
    },
    /// Delete a stream, its records, and the groups' committed offsets for it.
    Delete { name: String },
}

pub fn stream(client: &Client, command: StreamCommand, as_json: bool) -> anyhow::Result<()> {
    let creating = matches!(command, StreamCommand::Create { .. });
    match command {
        StreamCommand::Config { name, config } if config.is_empty() => {
            let info = client.get(&stream_path(&name))?;
            if as_json {
                print_json(&info["config"]);
            } else {
                print_config(&info["config"]);
            }
            Ok(())
        }
        StreamCommand::Create { name, config } | StreamCommand::Config { name, config } => {
            if !creating {
                // Changing a stream that does not exist is a mistake (a typo), not a create.
                client.get(&stream_path(&name))?;
            }
            if creating {
                // As kafka-topics --create: an existing stream is not changed by a create.
                if let Ok(info) = client.get(&stream_path(&name)) {
                    anyhow::bail!(
                        "stream '{name}' exists ({} partitions); `tidewater stream config {name} --partitions N` changes it",
                        info["config"]["partitions"]
                    );
                }
            }
            let patch = config.patch()?;
            let (status, info) = client.call(
                "PUT",
                &stream_path(&name),
                Some(&serde_json::to_vec(&patch)?),
            )?;
            if as_json {
                print_json(&info);
            } else {
                outln!(
                    "{} stream '{}'",
                    if status == 201 { "created" } else { "updated" },
                    name
                );
                print_config(&info["config"]);
            }
            Ok(())
        }
        StreamCommand::List => {
            let reply = client.get("/v1/streams")?;
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let empty = vec![];
            let streams = reply["streams"].as_array().unwrap_or(&empty);
            if streams.is_empty() {
                outln!(
                    "no streams yet: create one with `tidewater stream create NAME --partitions N`"
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = streams
                .iter()
                .map(|s| {
                    let parts = s["partitions"].as_array().unwrap_or(&empty);
                    let sum = |field: &str| -> u64 {
                        parts.iter().filter_map(|p| p[field].as_u64()).sum()
                    };
                    vec![
                        text(&s["name"]),
                        parts.len().to_string(),
                        sum("end_offset").to_string(),
                        sum("bytes").to_string(),
                    ]
                })
                .collect();
            table(&["STREAM", "PARTITIONS", "RECORDS", "BYTES"], &rows);
            Ok(())
        }
        StreamCommand::Stats { name } => {
            let info = client.get(&stream_path(&name))?;
            if as_json {
                print_json(&info);
                return Ok(());
            }
            let empty = vec![];
            let parts = info["partitions"].as_array().unwrap_or(&empty);
            outln!(
                "stream '{name}': {} partitions, timestamp_type {}, cleanup {}",
                parts.len(),
                text(&info["config"]["timestamp_type"]),
                text(&info["config"]["cleanup"])
            );
            let rows: Vec<Vec<String>> = parts
                .iter()
                .map(|p| {
                    vec![
                        num(&p["partition"]),
                        num(&p["start_offset"]),
                        num(&p["end_offset"]),
                        num(&p["bytes"]),
                        num(&p["segments"]),
                    ]
                })
                .collect();
            table(&["PARTITION", "START", "END", "BYTES", "SEGMENTS"], &rows);
            Ok(())
        }
        StreamCommand::Delete { name } => {
            client.call("DELETE", &stream_path(&name), None)?;
            if as_json {
                print_json(&json!({"deleted": name}));
            } else {
                outln!("deleted stream '{name}'");
            }
            Ok(())
        }
    }
}

// ---- produce ----

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
tidewater produce readings '{\"t\": 21.5}' --key sensor-17 --header unit=C\n  \
tail -f events.log | tidewater produce events\n  \
tidewater produce events --file events.txt --partition 0")]
pub struct ProduceArgs {
    pub stream: String,
    /// The record's value; without it, one record per line of --file or standard input.
    pub value: Option<String>,
    /// Read one record per line from this file.
    #[arg(long, conflicts_with = "value")]
    pub file: Option<std::path::PathBuf>,
    /// The key of every record (records with one key go to one partition, as Kafka's
    /// partitioner puts them).
    #[arg(long)]
    pub key: Option<String>,
    /// A header, name=value (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Put every record in this partition (default: by key; records without a key go to
    /// one partition per request).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Records per request (each request is stored whole or not at all).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// durable (after fsync) or written (after write(2)).
    #[arg(long, default_value = "durable", value_parser = ["durable", "written"])]
    pub ack: String,
    /// Give up on backpressure (429/507) after this many seconds of retrying one request.
    #[arg(long, default_value_t = 300)]
    pub retry_for_s: u64,
    /// Send one tombstone (a record with no value: on a compacted stream it deletes the
    /// key), e.g. `tidewater produce prices --key SKU-2 --tombstone`.
    #[arg(long, requires = "key", conflicts_with_all = ["value", "file"])]
    pub tombstone: bool,
}

/// Bytes of JSON records one produce request carries at most (well under the server's
/// default max_request_bytes, 16 MiB).
const PRODUCE_REQUEST_BYTES: usize = 4 << 20;

/// Sends one produce request, waiting out backpressure (429, 507, 503 overloaded) as the
/// server's Retry-After says, for up to `retry_for`. Nothing of a refused request was
/// stored, so sending it again cannot duplicate.
fn produce_request(
    client: &Client,
    path: &str,
    body: &[u8],
    retry_for: Duration,
    bar: &indicatif::ProgressBar,
) -> Result<Value, ClientError> {
    let deadline = Instant::now() + retry_for;
    loop {
        match client.call("POST", path, Some(body)) {
            Ok((_, reply)) => return Ok(reply),
            Err(ClientError::Api {
                status,
                code,
                message,
                retry_after_ms,
            }) if matches!(status, 429 | 507) || code == "overloaded" => {
                let wait = Duration::from_millis(retry_after_ms.unwrap_or(1_000).max(1));
                if Instant::now() + wait > deadline {
                    return Err(ClientError::Api {
                        status,
                        code,
                        message,
                        retry_after_ms,
                    });
                }
                bar.set_message(format!("refused ({code}), retrying in {wait:?}"));
                std::thread::sleep(wait);
            }
            Err(err) => return Err(err),
        }
    }
}

pub fn produce(client: &Client, args: ProduceArgs, as_json: bool) -> anyhow::Result<()> {
    let mut headers = serde_json::Map::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once('=') else {
            return Err(bad_input(format!(
                "--header '{h}' must look like name=value"
            )));
        };
        if name.is_empty() {
            return Err(bad_input(format!("--header '{h}' has no name")));
        }
        if headers.insert(name.to_string(), json!(value)).is_some() {
            return Err(bad_input(format!(
                "--header {name} is given twice: a record holds one value per header name here"
            )));
        }
    }
    let mut template = json!({});
    if let Some(key) = &args.key {
        template["key"] = json!(key);
    }
    if !headers.is_empty() {
        template["headers"] = Value::Object(headers);
    }
    if let Some(p) = args.partition {
        template["partition"] = json!(p);
    }
    let record = |line: Vec<u8>| -> Value {
        let mut r = template.clone();
        match String::from_utf8(line) {
            Ok(text) => r["value"] = json!(text),
            Err(e) => {
                use base64::Engine;
                r["value_base64"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()));
            }
        }
        r
    };
    type Lines = Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send>;
    /// Lines as bytes (a value need not be UTF-8), without their \n or \r\n.
    fn byte_lines(read: impl BufRead + Send + 'static) -> Lines {
        Box::new(read.split(b'\n').map(|line| {
            line.map(|mut l| {
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                l
            })
        }))
    }
    let one = args.value.is_some() || args.tombstone;
    let record = |line: Vec<u8>| -> Value {
        if args.tombstone {
            template.clone() // no value: a tombstone
        } else {
            record(line)
        }
    };
    let (lines, len): (Lines, Option<u64>) = if args.tombstone {
        (Box::new(std::iter::once(Ok(Vec::new()))), Some(1))
    } else if let Some(value) = &args.value {
        (
            Box::new(std::iter::once(Ok(value.clone().into_bytes()))),
            Some(1),
        )
    } else if let Some(path) = &args.file {
        let open = || {
            std::fs::File::open(path)
                .with_context(|| format!("opening {}", path.display()))
                .map_err(|e| bad_input(format!("{e:#}")))
        };
        let count = std::io::BufReader::new(open()?).split(b'\n').count();
        (
            byte_lines(std::io::BufReader::new(open()?)),
            Some(count as u64),
        )
    } else {
        if std::io::stdin().is_terminal() {
            errln!("reading one record per line from standard input (Ctrl-D to end)");
        }
        (byte_lines(std::io::BufReader::new(std::io::stdin())), None)
    };
    let bar = if one {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar(len, &format!("producing to {}", args.stream))
    };
    let path = format!("{}/records", stream_path(&args.stream));
    let retry_for = Duration::from_secs(args.retry_for_s);
    let mut offsets: Vec<(u64, u64)> = Vec::new();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut pending_bytes = 0;
    let mut send = |pending: &mut Vec<Vec<u8>>, pending_bytes: &mut usize| -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut body = Vec::with_capacity(*pending_bytes + 64);
        body.extend_from_slice(b"{\"records\":[");
        for (i, r) in pending.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(r);
        }
        body.extend_from_slice(format!("],\"ack\":\"{}\"}}", args.ack).as_bytes());
        let reply = produce_request(client, &path, &body, retry_for, &bar)?;
        bar.set_message(format!("producing to {}", args.stream));
        let got = reply["offsets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for o in got {
            offsets.push((
                o["partition"].as_u64().unwrap_or(0),
                o["offset"].as_u64().unwrap_or(0),
            ));
        }
        bar.inc(pending.len() as u64);
        pending.clear();
        *pending_bytes = 0;
        Ok(())
    };
    // Lines are read on a thread of their own, so a line from a pipe that stays open (`tail
    // -f`) goes out within PRODUCE_LINGER instead of waiting for a full batch, and a
    // signal sends what was read before stopping.
    let (tx, rx) = std::sync::mpsc::sync_channel(args.batch.clamp(1, 10_000) as usize);
    std::thread::spawn(move || {
        for line in lines {
            let failed = line.is_err();
            if tx.send(line).is_err() || failed {
                return;
            }
        }
    });
    stop_on_signals();
    let mut oldest: Option<std::time::Instant> = None;
    loop {
        let wait = match oldest {
            Some(at) => PRODUCE_LINGER.saturating_sub(at.elapsed()),
            None => STOP_POLL,
        };
        match rx.recv_timeout(wait.min(STOP_POLL)) {
            Ok(line) => {
                let encoded = serde_json::to_vec(&record(line.context("reading input")?))?;
                if !pending.is_empty() && pending_bytes + encoded.len() > PRODUCE_REQUEST_BYTES {
                    send(&mut pending, &mut pending_bytes)?;
                    oldest = None;
                }
                pending_bytes += encoded.len() + 1;
                pending.push(encoded);
                oldest.get_or_insert_with(std::time::Instant::now);
                if pending.len() as u64 >= args.batch {
                    send(&mut pending, &mut pending_bytes)?;
                    oldest = None;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if oldest.is_some_and(|at| at.elapsed() >= PRODUCE_LINGER) {
            send(&mut pending, &mut pending_bytes)?;
            oldest = None;
        }
        if STOP.load(Ordering::SeqCst) {
            break;
        }
    }
    send(&mut pending, &mut pending_bytes)?;
    bar.finish_and_clear();
    let n = offsets.len();
    if as_json {
        let list: Vec<Value> = offsets
            .iter()
            .map(|(p, o)| json!({"partition": p, "offset": o}))
            .collect();
        print_json(&json!({"produced": n, "offsets": list}));
    } else if let ([(p, o)], true) = (offsets.as_slice(), one) {
        outln!(
            "produced 1 record to '{}': partition {p}, offset {o}",
            args.stream
        );
    } else {
        let partitions: std::collections::BTreeSet<u64> = offsets.iter().map(|(p, _)| *p).collect();
        let list: Vec<String> = partitions.iter().map(u64::to_string).collect();
        outln!(
            "produced {n} record{} to '{}' (partition{}: {}){}",
            if n == 1 { "" } else { "s" },
            args.stream,
            if partitions.len() == 1 { "" } else { "s" },
            match list.len() {
                0 => "none".to_string(),
                1..=8 => list.join(", "),
                many => format!("{many} of them"),
            },
            if STOP.load(Ordering::SeqCst) {
                "; stopped by a signal"
            } else {
                ""
            }
        );
    }
    Ok(())
}

// ---- fetch ----

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
tidewater fetch readings --from earliest --max 10\n  \
tidewater fetch readings --from 2026-11-30T10:00:00Z --partition 3\n  \
tidewater --json fetch readings --group billing --follow\n\n\
Without --group, every partition (or --partition P) is read from --from, and nothing is \
committed. With --group G, the command is a member of consumer group G: the broker assigns \
it partitions, it starts where the group committed (--from applies only to partitions with \
no committed offset), commits after printing each batch, and leaves the group on exit \
(Ctrl-C included).")]
pub struct FetchArgs {
    pub stream: String,
    /// Print each record's key before its value, a tab between (a compacted stream is a
    /// table of keys); `--json` shows keys anyway.
    #[arg(long)]
    pub keys: bool,
    /// Where to start: earliest, latest, an offset, or a time (RFC 3339, e.g.
    /// 2026-11-30T10:00:00Z: the first record at or after it, in each partition).
    #[arg(
        long,
        default_value = "earliest",
        value_name = "earliest|latest|OFFSET|TIME"
    )]
    pub from: String,
    /// Read only this partition.
    #[arg(long, conflicts_with = "group")]
    pub partition: Option<u32>,
    /// Read as a member of this consumer group, committing what was printed.
    #[arg(long)]
    pub group: Option<String>,
    /// Stop after this many records (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub max: u64,
    /// Stop when no record came for this long, in milliseconds (caught up).
    #[arg(long, default_value_t = 1000)]
    pub wait_ms: u64,
    /// Keep waiting for records instead of stopping when caught up.
    #[arg(long)]
    pub follow: bool,
}

/// Where `--from` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartFrom {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

fn parse_from(text: &str) -> anyhow::Result<StartFrom> {
    match text {
        "earliest" => Ok(StartFrom::Earliest),
        "latest" => Ok(StartFrom::Latest),
        t if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t
            .parse()
            .map(StartFrom::Offset)
            .map_err(|_| bad_input(format!("--from {t}: the offset is too large"))),
        t => crate::time::parse_rfc3339(t)
            .map(StartFrom::Time)
            .map_err(|e| {
                bad_input(format!(
                    "--from is earliest, latest, an offset (digits) or an RFC 3339 time; {e}"
                ))
            }),
    }
}

/// A record as one output line: the value as text (line breaks escaped), base64:... when
/// it is not text, null for none (a tombstone; `--json` tells it from the text "null").
fn value_line(record: &Value) -> String {
    if let Some(text) = record["value"].as_str() {
        text.replace('\r', "\\r").replace('\n', "\\n")
    } else if let Some(b64) = record["value_base64"].as_str() {
        format!("base64:{b64}")
    } else {
        "null".into()
    }
}

/// A record's key as text, base64:... when it is not text, nothing for none.
fn key_text(record: &Value) -> String {
    if let Some(text) = record["key"].as_str() {
        text.replace('\r', "\\r")
            .replace('\n', "\\n")
            .replace('\t', "\\t")
    } else if let Some(b64) = record["key_base64"].as_str() {
        format!("base64:{b64}")
    } else {
        String::new()
    }
}

fn record_line(record: &Value, as_json: bool, keys: bool) -> String {
    if as_json {
        serde_json::to_string(record).expect("json")
    } else if keys {
        format!("{}\t{}", key_text(record), value_line(record))
    } else {
        value_line(record)
    }
}

pub fn fetch(client: &Client, args: FetchArgs, as_json: bool) -> anyhow::Result<()> {
    let from = parse_from(&args.from)?;
    match args.group.clone() {
        Some(group) => fetch_as_member(client, &args, &group, from, as_json),
        None => fetch_partitions(client, &args, from, as_json),
    }
}

/// The longest long poll the CLI asks for (the server's default max_wait_ms is 60 s).
const MAX_POLL_MS: u64 = 30_000;

/// Reads partitions by offset: no group, nothing committed.
fn fetch_partitions(
    client: &Client,
    args: &FetchArgs,
    from: StartFrom,
    as_json: bool,
) -> anyhow::Result<()> {
    let info = client.get(&stream_path(&args.stream))?;
    let empty = vec![];
    let all = info["partitions"].as_array().unwrap_or(&empty);
    let chosen: Vec<&Value> = match args.partition {
        None => all.iter().collect(),
        Some(p) => {
            let part = all.iter().find(|x| x["partition"] == p).ok_or_else(|| {
                not_found(
                    "partition_not_found",
                    format!(
                        "stream '{}' has no partition {p} (its partitions are 0..={})",
                        args.stream,
                        all.len().saturating_sub(1)
                    ),
                )
            })?;
            vec![part]
        }
    };
    // (partition, next offset to fetch)
    let mut positions: Vec<(u64, u64)> = Vec::new();
    for part in chosen {
        let p = part["partition"].as_u64().unwrap_or(0);
        let start = part["start_offset"].as_u64().unwrap_or(0);
        let end = part["end_offset"].as_u64().unwrap_or(0).max(start);
        let at = match from {
            StartFrom::Earliest => start,
            StartFrom::Latest => end,
            // One partition asked: past its end is an error the server explains; over
            // every partition, each is read from there or its end.
            StartFrom::Offset(n) if args.partition.is_some() => n.max(start),
            StartFrom::Offset(n) => n.clamp(start, end),
            StartFrom::Time(ms) => {
                // Before 1970 is before every record (and -1, -2 mean the end, the start).
                let reply = client.get(&format!(
                    "{}/partitions/{p}/offsets?time={}",
                    stream_path(&args.stream),
                    ms.max(0)
                ))?;
                reply["offset"].as_u64().unwrap_or(end).clamp(start, end)
            }
        };
        positions.push((p, at));
    }
    if positions.is_empty() {
        return Ok(());
    }
    let mut printed = 0u64;
    let wants_more = |printed: u64| args.max == 0 || printed < args.max;
    let mut idle_since: Option<Instant> = None;
    let mut turn = 0usize;
    let n = positions.len();
    while wants_more(printed) {
        // A round: every partition once, without waiting.
        let mut got = 0;
        for position in positions.iter_mut() {
            if !wants_more(printed) {
                break;
            }
            got += fetch_one(client, args, position, 0, &mut printed, as_json)?;
        }
        if got > 0 {
            idle_since = None;
            continue;
        }
        // Nothing anywhere: wait on one partition at a time (all of the wait when there
        // is only one), until --wait-ms passed with nothing (unless --follow).
        let idle = *idle_since.get_or_insert_with(Instant::now);
        let left = if args.follow {
            MAX_POLL_MS
        } else {
            let spent = u64::try_from(idle.elapsed().as_millis()).unwrap_or(u64::MAX);
            if spent >= args.wait_ms {
                break;
            }
            args.wait_ms - spent
        };
        let wait = if n == 1 { left } else { left.min(200) }.min(MAX_POLL_MS);
        turn = (turn + 1) % n;
        if fetch_one(
            client,
            args,
            &mut positions[turn],
            wait,
            &mut printed,
            as_json,
        )? > 0
        {
            idle_since = None;
        }
    }
    Ok(())
}

/// Fetches one partition from its position (waiting up to `wait_ms`), prints its records
/// up to --max, moves the position; returns how many it printed.
fn fetch_one(
    client: &Client,
    args: &FetchArgs,
    (partition, position): &mut (u64, u64),
    wait_ms: u64,
    printed: &mut u64,
    as_json: bool,
) -> anyhow::Result<u64> {
    let reply = client.get(&format!(
        "{}/partitions/{partition}/records?offset={position}&wait_ms={wait_ms}",
        stream_path(&args.stream)
    ))?;
    let mut count = 0;
    for record in reply["records"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if args.max > 0 && *printed >= args.max {
            return Ok(count);
        }
        let mut record = record.clone();
        record["partition"] = json!(*partition);
        outln!("{}", record_line(&record, as_json, args.keys));
        *printed += 1;
        count += 1;
        *position = record["offset"].as_u64().map_or(*position, |o| o + 1);
    }
    if let Some(next) = reply["next_offset"].as_u64() {
        *position = next;
    }
    Ok(count)
}

/// Set by SIGINT or SIGTERM while `fetch --group` or `produce` runs: finish what is in hand
/// (print and commit the batch, leave the group; send the records read) and stop.
static STOP: AtomicBool = AtomicBool::new(false);
/// When the first stop signal came (CLOCK_MONOTONIC, ns).
static FIRST_SIGNAL_NS: AtomicU64 = AtomicU64::new(0);

fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime is async-signal-safe and writes only `ts`.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

extern "C" fn on_stop_signal(signal: libc::c_int) {
    let now = monotonic_ns();
    if !STOP.swap(true, Ordering::SeqCst) {
        FIRST_SIGNAL_NS.store(now, Ordering::SeqCst);
    } else if now.saturating_sub(FIRST_SIGNAL_NS.load(Ordering::SeqCst)) > 1_000_000_000 {
        // A second signal, a second or more after the first: the user insists. (One
        // Ctrl-C can arrive twice at once: `timeout` signals the process and its group.)
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// The first SIGINT or SIGTERM sets STOP; another one a second later ends the process at
/// once (128 + the signal); system calls a signal interrupts go on (SA_RESTART).
fn stop_on_signals() {
    // SAFETY: sigaction with a handler that only uses atomics, clock_gettime and _exit
    // (async-signal-safe).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// How long a line read waits for company before it is sent.
const PRODUCE_LINGER: Duration = Duration::from_millis(100);
/// How often a waiting produce looks for a stop signal.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Records per fetch as a group member.
const MEMBER_BATCH: u64 = 500;

/// Reads as a member of a consumer group, through a consumer instance: the broker assigns
/// partitions and keeps positions; each printed batch is committed.
fn fetch_as_member(
    client: &Client,
    args: &FetchArgs,
    group: &str,
    from: StartFrom,
    as_json: bool,
) -> anyhow::Result<()> {
    let start_at = match from {
        StartFrom::Earliest => json!("earliest"),
        StartFrom::Latest => json!("latest"),
        StartFrom::Offset(n) => json!({"offset": n}),
        StartFrom::Time(ms) => json!({"time": ms}),
    };
    let created = client.post(
        &format!("{}/consumers", group_path(group)),
        &json!({"streams": [args.stream], "start_at": start_at}),
    )?;
    let member = created["member"]
        .as_str()
        .ok_or_else(|| ClientError::Other(format!("the server made no member: {created}")))?
        .to_string();
    let base = format!("{}/consumers/{}", group_path(group), path_segment(&member));
    stop_on_signals();
    // Leaving commits the member's positions (what was printed); after a failed print,
    // `leave_uncommitted` does not.
    let leave_as = |client: &Client, commit: bool| {
        let path = if commit {
            base.clone()
        } else {
            format!("{base}?commit=false")
        };
        if let Err(err) = client.delete(&path) {
            errln!(
                "warning: could not leave group '{group}' ({err}); the broker removes the member when its session times out"
            );
        }
    };
    let mut printed = 0u64;
    let result: anyhow::Result<()> = (|| {
        while (args.max == 0 || printed < args.max) && !STOP.load(Ordering::SeqCst) {
            let want = if args.max > 0 {
                (args.max - printed).min(MEMBER_BATCH)
            } else {
                MEMBER_BATCH
            };
            // Following, a poll ends every second, so a signal is noticed soon.
            let wait = if args.follow {
                1_000
            } else {
                args.wait_ms.min(MAX_POLL_MS)
            };
            let reply = client.get(&format!("{base}/records?max_records={want}&wait_ms={wait}"))?;
            let records = reply["records"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if records.is_empty() {
                if args.follow {
                    continue;
                }
                break;
            }
            for record in records {
                let line = record_line(record, as_json, args.keys);
                if let Err(err) = crate::client::try_write_stdout(format_args!("{line}\n")) {
                    // Nobody reads any more: commit nothing more, leave the group (its
                    // partitions go to the others at once), and what this batch fetched is
                    // read again from the last commit.
                    leave_as(client, false);
                    crate::client::stdout_failed(err);
                }
                printed += 1;
            }
            // The positions are exactly what was printed (max_records): commit them.
            client.post(&format!("{base}/commit"), &json!({}))?;
        }
        Ok(())
    })();
    match &result {
        // The member is gone already.
        Err(err)
            if err.downcast_ref::<ClientError>().is_some_and(
                |e| matches!(e, ClientError::Api { code, .. } if code == "unknown_member"),
            ) => {}
        _ => leave_as(client, true),
    }
    result?;
    if !as_json {
        errln!(
            "fetched {printed} record{} as a member of group '{group}'{}",
            if printed == 1 { "" } else { "s" },
            if STOP.load(Ordering::SeqCst) {
                " (stopped by a signal)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

// ---- group ----

#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// List consumer groups: members, committed partitions and lag.
    List,
    /// Show a group's partitions: committed offset, end, lag (records and age) and member.
    Describe { group: String },
    /// Forecast the group's lag over its committed partitions (as `tidewater queue
    /// forecast`; its consumers are its members).
    #[command(after_help = "Example:\n  tidewater group forecast readers --drain-target-ms 120000")]
    Forecast {
        /// The group.
        group: String,
        #[command(flatten)]
        objectives: crate::cli_forecast::ObjectiveFlags,
    },
    /// Move a group's committed offsets (a dry run unless --execute). The group must have
    /// no members.
    #[command(after_help = "Examples:\n  \
tidewater group reset-offsets billing --stream readings --to-earliest\n  \
tidewater group reset-offsets billing --to-datetime 2026-11-30T10:00:00Z --execute\n  \
tidewater group reset-offsets billing --shift-by -100 --execute\n\n\
Every new offset is kept within its partition's range. Without --stream, every stream the \
group has committed offsets for is reset.")]
    ResetOffsets(ResetArgs),
    /// Delete a group and its committed offsets. The group must have no members.
    Delete { group: String },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_datetime", "shift_by", "to_offset"])))]
pub struct ResetArgs {
    pub group: String,
    /// Reset this stream's partitions (repeatable; default: every stream the group has
    /// committed offsets for).
    #[arg(long = "stream", value_name = "STREAM")]
    pub streams: Vec<String>,
    /// To each partition's first offset.
    #[arg(long)]
    pub to_earliest: bool,
    /// To each partition's end (skip everything there is now).
    #[arg(long)]
    pub to_latest: bool,
    /// To the first record at or after this time (RFC 3339, e.g. 2026-11-30T10:00:00Z,
    /// or milliseconds since the epoch).
    #[arg(long, value_name = "TIME")]
    pub to_datetime: Option<String>,
    /// Move each committed offset by N (negative: back).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub shift_by: Option<i64>,
    /// To this offset.
    #[arg(long, value_name = "OFFSET")]
    pub to_offset: Option<u64>,
    /// Apply the new offsets (without it, only show them).
    #[arg(long)]
    pub execute: bool,
    /// Only show the new offsets (the default).
    #[arg(long, conflicts_with = "execute")]
    pub dry_run: bool,
}

fn opt_num(v: Option<&Value>) -> String {
    match v {
        Some(v) if !v.is_null() => num(v),
        _ => "-".into(),
    }
}

pub fn group(client: &Client, command: GroupCommand, as_json: bool) -> anyhow::Result<()> {
    match command {
        GroupCommand::List => {
            let reply = client.get("/v1/groups")?;
            let names: Vec<String> = reply["groups"]
                .as_array()
                .map(|g| g.iter().map(text).collect())
                .unwrap_or_default();
            if names.is_empty() && !as_json {
                outln!(
                    "no groups yet: a group appears when a member joins it (`tidewater fetch STREAM --group G`)"
                );
                return Ok(());
            }
            let mut rows = Vec::new();
            let mut json_rows = Vec::new();
            for name in names {
                let info = match client.get(&group_path(&name)) {
                    Ok(info) => info,
                    // Gone since the list.
                    Err(ClientError::Api { status: 404, .. }) => continue,
                    Err(err) => return Err(err.into()),
                };
                let offsets = info["offsets"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let lag: u64 = offsets.iter().filter_map(|o| o["lag"].as_u64()).sum();
                let members = info["members"].as_array().map_or(0, Vec::len);
                json_rows.push(json!({
                    "group": name,
                    "members": members,
                    "partitions": offsets.len(),
                    "lag": lag,
                }));
                rows.push(vec![
                    name,
                    members.to_string(),
                    offsets.len().to_string(),
                    lag.to_string(),
                ]);
            }
            if as_json {
                // The table's columns, one object per group.
                print_json(&json!({ "groups": json_rows }));
            } else {
                table(&["GROUP", "MEMBERS", "PARTITIONS", "LAG"], &rows);
            }
            Ok(())
        }
        GroupCommand::Forecast { group, objectives } => crate::cli_forecast::show(
            client,
            &group_path(&group),
            &format!("group '{group}'"),
            &objectives,
            as_json,
        ),
        GroupCommand::Describe { group } => {
            let info = client.get(&group_path(&group))?;
            if as_json {
                print_json(&info);
                return Ok(());
            }
            describe_table(client, &group, &info)
        }
        GroupCommand::ResetOffsets(args) => reset_offsets(client, args, as_json),
        GroupCommand::Delete { group } => {
            client.call("DELETE", &group_path(&group), None)?;
            if as_json {
                print_json(&json!({"deleted": group}));
            } else {
                outln!("deleted group '{group}'");
            }
            Ok(())
        }
    }
}

/// One line per partition committed or assigned, in the shape of kafka-consumer-groups
/// --describe.
fn describe_table(client: &Client, group: &str, info: &Value) -> anyhow::Result<()> {
    #[derive(Default)]
    struct Row {
        current: Option<Value>,
        end: Option<Value>,
        lag: Option<Value>,
        lag_ms: u64,
        member: Option<String>,
    }
    let mut rows: BTreeMap<(String, u64), Row> = BTreeMap::new();
    for o in info["offsets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let row = rows
            .entry((text(&o["stream"]), o["partition"].as_u64().unwrap_or(0)))
            .or_default();
        row.current = Some(o["committed"].clone());
        row.end = Some(o["end_offset"].clone());
        row.lag = Some(o["lag"].clone());
        row.lag_ms = o["lag_ms"].as_u64().unwrap_or(0);
    }
    let members = info["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for m in members {
        for a in m["assigned"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            rows.entry((text(&a["stream"]), a["partition"].as_u64().unwrap_or(0)))
                .or_default()
                .member = Some(text(&m["member"]));
        }
    }
    // Partitions assigned but never committed: their end from the stream.
    let mut ends: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for ((stream, partition), row) in rows.iter_mut().filter(|(_, r)| r.end.is_none()) {
        if !ends.contains_key(stream) {
            let parts = client
                .get(&stream_path(stream))
                .map(|s| s["partitions"].as_array().cloned().unwrap_or_default())
                .unwrap_or_default();
            ends.insert(stream.clone(), parts);
        }
        row.end = ends[stream]
            .iter()
            .find(|p| p["partition"] == *partition)
            .map(|p| p["end_offset"].clone());
    }
    if members.is_empty() {
        outln!("group '{group}' has no active members");
    } else {
        outln!(
            "group '{group}': {} member{} (generation {})",
            members.len(),
            if members.len() == 1 { "" } else { "s" },
            num(&info["generation"])
        );
    }
    let table_rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|((stream, partition), r)| {
            vec![
                stream,
                partition.to_string(),
                opt_num(r.current.as_ref()),
                opt_num(r.end.as_ref()),
                opt_num(r.lag.as_ref()),
                if r.lag.is_some() {
                    age(r.lag_ms)
                } else {
                    "-".into()
                },
                r.member.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "STREAM",
            "PARTITION",
            "CURRENT-OFFSET",
            "END-OFFSET",
            "LAG",
            "LAG-TIME",
            "MEMBER",
        ],
        &table_rows,
    );
    Ok(())
}

fn reset_offsets(client: &Client, args: ResetArgs, as_json: bool) -> anyhow::Result<()> {
    let mut body = json!({"dry_run": !args.execute});
    if !args.streams.is_empty() {
        body["streams"] = json!(args.streams);
    }
    if args.to_earliest {
        body["to"] = json!("earliest");
    } else if args.to_latest {
        body["to"] = json!("latest");
    } else if let Some(time) = &args.to_datetime {
        let ms =
            crate::time::parse_time(time).map_err(|e| bad_input(format!("--to-datetime: {e}")))?;
        body["to_datetime"] = json!(ms);
    } else if let Some(by) = args.shift_by {
        body["shift_by"] = json!(by);
    } else if let Some(offset) = args.to_offset {
        body["to_offset"] = json!(offset);
    }
    let reply = client.post(&format!("{}/offsets/reset", group_path(&args.group)), &body)?;
    if as_json {
        print_json(&reply);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = reply["offsets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|o| {
            vec![
                text(&o["stream"]),
                num(&o["partition"]),
                opt_num(o.get("from")),
                num(&o["to"]),
            ]
        })
        .collect();
    table(
        &["STREAM", "PARTITION", "CURRENT-OFFSET", "NEW-OFFSET"],
        &rows,
    );
    if args.execute {
        errln!(
            "reset {} partition{} of group '{}'",
            rows.len(),
            if rows.len() == 1 { "" } else { "s" },
            args.group
        );
    } else {
        errln!("dry run: nothing changed; add --execute to commit these offsets");
    }
    Ok(())
}
