//! Client commands for work-queue subscriptions on streams: create, list, stats, config,
//! delete, purge. A subscription is named `STREAM/SUBSCRIPTION` everywhere, as `tidewater
//! consume STREAM/SUBSCRIPTION` consumes it. Tables for people, `--json` for scripts.
// Output goes through `outln!`/`errln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use serde_json::{Value, json};

use crate::cli::{age, apply_sets, num, print_config, print_json, table, text};
use crate::client::{Client, bad_input, outln, path_segment};

/// `STREAM/SUBSCRIPTION` split, or a usage error that shows the form.
fn split(name: &str) -> anyhow::Result<(&str, &str)> {
    match name.split_once('/') {
        Some((stream, sub)) if !stream.is_empty() && !sub.is_empty() && !sub.contains('/') => {
            Ok((stream, sub))
        }
        _ => Err(bad_input(format!(
            "name a subscription STREAM/SUBSCRIPTION, e.g. orders/billing; got '{name}'"
        ))),
    }
}

fn sub_path(name: &str) -> anyhow::Result<String> {
    let (stream, sub) = split(name)?;
    Ok(format!(
        "/v1/streams/{}/subscriptions/{}",
        path_segment(stream),
        path_segment(sub)
    ))
}

#[derive(Debug, clap::Args)]
pub struct SubscriptionConfigFlags {
    /// Set any queue setting of the subscription; the value is JSON or else a string, e.g.
    /// --set key_concurrency=1, --set dispatch_rate.per_s=100, --set max_deliveries=5,
    /// --set dead_letter_queue=billing-dlq.
    #[arg(long, value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

impl SubscriptionConfigFlags {
    fn patch(&self) -> anyhow::Result<Value> {
        let mut patch = json!({});
        apply_sets(&mut patch, &self.set, "key_concurrency=1")?;
        Ok(patch)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum SubscriptionCommand {
    /// Create a work-queue subscription on a stream: it delivers every record of the
    /// stream (from --start on) to its consumers as a queue does (leases, acks, retries, a
    /// dead-letter queue, every flow-control setting), independently of the stream's other
    /// subscriptions and consumer groups.
    #[command(
        after_help = "Examples:\n  tidewater subscription create orders/billing --set key_concurrency=1\n  tidewater subscription create orders/email --start latest --set dispatch_rate.per_s=100\n  tidewater consume orders/billing"
    )]
    Create {
        /// STREAM/SUBSCRIPTION
        name: String,
        /// Where it starts on every partition: earliest (every record the stream holds),
        /// latest (only what is produced from now on), or a time (RFC 3339 or ms since the
        /// epoch: each partition's first record at or after it).
        #[arg(long, default_value = "earliest")]
        start: String,
        #[command(flatten)]
        config: SubscriptionConfigFlags,
    },
    /// List subscriptions (of one stream, or of all) with what they hold.
    List {
        /// Only this stream's.
        stream: Option<String>,
    },
    /// Show a subscription's stats and its place in each partition.
    Stats {
        /// STREAM/SUBSCRIPTION
        name: String,
    },
    /// Show a subscription's configuration, or change it with --set.
    Config {
        /// STREAM/SUBSCRIPTION
        name: String,
        #[command(flatten)]
        config: SubscriptionConfigFlags,
    },
    /// Settle everything the subscription has not (the stream keeps its records).
    Purge {
        /// STREAM/SUBSCRIPTION
        name: String,
    },
    /// Delete a subscription (the stream and its other readers are untouched).
    Delete {
        /// STREAM/SUBSCRIPTION
        name: String,
    },
    /// Forecast the subscription's backlog (as `tidewater queue forecast`).
    #[command(after_help = "Example:\n  tidewater subscription forecast orders/billing --json")]
    Forecast {
        /// STREAM/SUBSCRIPTION
        name: String,
        #[command(flatten)]
        objectives: crate::cli_forecast::ObjectiveFlags,
    },
}

fn start_json(start: &str) -> anyhow::Result<Value> {
    match start {
        "earliest" | "latest" => Ok(json!(start)),
        time => {
            let ms = crate::time::parse_time(time)
                .map_err(|e| bad_input(format!("--start takes earliest, latest or a time: {e}")))?;
            Ok(json!({ "time": ms }))
        }
    }
}

pub fn subscription(
    client: &Client,
    command: SubscriptionCommand,
    as_json: bool,
) -> anyhow::Result<()> {
    match command {
        SubscriptionCommand::Forecast { name, objectives } => crate::cli_forecast::show(
            client,
            &sub_path(&name)?,
            &format!("subscription '{name}'"),
            &objectives,
            as_json,
        ),
        SubscriptionCommand::Create {
            name,
            start,
            config,
        } => {
            let path = sub_path(&name)?;
            // As `stream create`: an existing subscription is not changed by a create.
            if client.get(&path).is_ok() {
                anyhow::bail!(
                    "subscription '{name}' exists; `tidewater subscription config {name} --set FIELD=VALUE` changes it"
                );
            }
            let mut patch = config.patch()?;
            patch["start"] = start_json(&start)?;
            let (_, info) = client.call("PUT", &path, Some(&serde_json::to_vec(&patch)?))?;
            if as_json {
                print_json(&info);
            } else {
                outln!(
                    "created subscription '{name}' at {start}: {} messages to deliver; consume it with `tidewater consume {name}`",
                    num(&info["stats"]["total"])
                );
            }
            Ok(())
        }
        SubscriptionCommand::Config { name, config } => {
            let path = sub_path(&name)?;
            let info = client.get(&path)?;
            if config.set.is_empty() {
                if as_json {
                    print_json(&info["config"]);
                } else {
                    print_config(&info["config"]);
                }
                return Ok(());
            }
            let patch = config.patch()?;
            let (_, info) = client.call("PUT", &path, Some(&serde_json::to_vec(&patch)?))?;
            if as_json {
                print_json(&info);
            } else {
                outln!("updated subscription '{name}'");
                print_config(&info["config"]);
            }
            Ok(())
        }
        SubscriptionCommand::List { stream } => {
            let reply = match &stream {
                Some(stream) => client.get(&format!(
                    "/v1/streams/{}/subscriptions",
                    path_segment(stream)
                ))?,
                None => client.get("/v1/subscriptions")?,
            };
            if as_json {
                print_json(&reply);
                return Ok(());
            }
            let empty = vec![];
            let subs = reply["subscriptions"].as_array().unwrap_or(&empty);
            if subs.is_empty() {
                outln!(
                    "no subscriptions yet: create one with `tidewater subscription create STREAM/NAME`"
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = subs
                .iter()
                .map(|s| {
                    let st = &s["stats"];
                    vec![
                        format!("{}/{}", text(&s["stream"]), text(&s["name"])),
                        num(&st["depth"]),
                        num(&st["in_flight"]),
                        num(&st["delayed"]),
                        age(st["oldest_age_ms"].as_u64().unwrap_or(0)),
                        num(&st["acked"]),
                        num(&st["dead_lettered"]),
                        num(&s["retention_expired"]),
                    ]
                })
                .collect();
            table(
                &[
                    "SUBSCRIPTION",
                    "DEPTH",
                    "IN FLIGHT",
                    "DELAYED",
                    "OLDEST",
                    "ACKED",
                    "DEAD-LETTERED",
                    "EXPIRED BY RETENTION",
                ],
                &rows,
            );
            Ok(())
        }
        SubscriptionCommand::Stats { name } => {
            let info = client.get(&sub_path(&name)?)?;
            if as_json {
                print_json(&info);
                return Ok(());
            }
            let st = &info["stats"];
            outln!(
                "subscription '{name}': {} to deliver, {} in flight, {} delayed, oldest {}; {} acked, {} dead-lettered, {} expired by retention",
                num(&st["depth"]),
                num(&st["in_flight"]),
                num(&st["delayed"]),
                age(st["oldest_age_ms"].as_u64().unwrap_or(0)),
                num(&st["acked"]),
                num(&st["dead_lettered"]),
                num(&info["retention_expired"]),
            );
            let empty = vec![];
            let rows: Vec<Vec<String>> = info["partitions"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|p| {
                    vec![
                        num(&p["partition"]),
                        num(&p["floor"]),
                        num(&p["end"]),
                        num(&p["pending"]),
                    ]
                })
                .collect();
            table(&["PARTITION", "FLOOR", "END", "PENDING"], &rows);
            // Redriven and merged messages wait in the subscription's own log.
            let in_partitions: u64 = info["partitions"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter_map(|p| p["pending"].as_u64())
                .sum();
            let own = st["total"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(in_partitions);
            if own > 0 {
                outln!("and {own} redriven or merged messages in its own log");
            }
            Ok(())
        }
        SubscriptionCommand::Purge { name } => {
            let (_, reply) = client.call("POST", &format!("{}/purge", sub_path(&name)?), None)?;
            if as_json {
                print_json(&reply);
            } else {
                outln!(
                    "purged {} messages from subscription '{name}'",
                    num(&reply["purged"])
                );
            }
            Ok(())
        }
        SubscriptionCommand::Delete { name } => {
            client.call("DELETE", &sub_path(&name)?, None)?;
            if as_json {
                print_json(&json!({ "deleted": name }));
            } else {
                outln!("deleted subscription '{name}'");
            }
            Ok(())
        }
    }
}
