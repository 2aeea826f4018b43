//! Client commands for push endpoints: create, list, stats, config, delete (over HTTP,
//! `/v1/pushes`). Tables for people, `--json` for scripts.
// Output goes through `outln!`/`errln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use serde_json::{Value, json};

use crate::cli::{apply_sets, counts, print_json, print_listing, tagged, text};
use crate::client::{Client, bad_input, outln, path_segment};

#[derive(Debug, clap::Args)]
pub struct PushFlags {
    /// Where requests go (http or https).
    #[arg(long)]
    url: Option<String>,
    /// raw (one message per request, its body as the body) or json ({"messages": [...]}).
    #[arg(long, value_parser = ["raw", "json"])]
    format: Option<String>,
    /// Messages per request (json format).
    #[arg(long)]
    batch: Option<u32>,
    /// Requests in flight at once.
    #[arg(long)]
    concurrency: Option<u32>,
    /// A request's whole time, reply included, in ms.
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// retry (with the queue's backoff, then the DLQ) or dead_letter (at once): what a 4xx
    /// other than 408 and 429 does.
    #[arg(long, value_parser = ["retry", "dead_letter"])]
    on_client_error: Option<String>,
    /// Any other field, as FIELD=VALUE (JSON or a string), e.g. --set breaker.open_ms=10000.
    #[arg(long, value_name = "FIELD=VALUE")]
    set: Vec<String>,
}

impl PushFlags {
    fn patch(&self, patch: &mut Value) -> anyhow::Result<()> {
        if let Some(url) = &self.url {
            patch["url"] = json!(url);
        }
        if let Some(format) = &self.format {
            patch["format"] = json!(format);
        }
        if let Some(batch) = self.batch {
            patch["batch"] = json!(batch);
        }
        if let Some(concurrency) = self.concurrency {
            patch["concurrency"] = json!(concurrency);
        }
        if let Some(ms) = self.timeout_ms {
            patch["timeout_ms"] = json!(ms);
        }
        if let Some(on) = &self.on_client_error {
            patch["on_client_error"] = json!(on);
        }
        apply_sets(patch, &self.set, "breaker.open_ms=10000")?;
        Ok(())
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum PushCommand {
    /// Create a push endpoint: the broker POSTs a queue's (or a subscription's) messages
    /// to a URL, signed (Standard Webhooks), and settles each by the reply; the signing
    /// secret is shown once.
    #[command(
        after_help = "Examples:\n  tidewater push create mailer --queue emails --url https://mail.example.com/send --concurrency 8\n  tidewater push create billing --subscription orders/billing --url https://billing.internal/events --format json --batch 50"
    )]
    Create {
        name: String,
        /// Push this queue's messages.
        #[arg(
            long,
            conflicts_with = "subscription",
            required_unless_present = "subscription"
        )]
        queue: Option<String>,
        /// Push this work-queue subscription's records (STREAM/SUBSCRIPTION).
        #[arg(long)]
        subscription: Option<String>,
        #[command(flatten)]
        flags: PushFlags,
    },
    /// List push endpoints: source, URL, breaker, counters.
    List,
    /// Show an endpoint's breaker and counters: delivered, requests, replies by class.
    Stats { name: String },
    /// Show an endpoint's configuration, or change it.
    Config {
        name: String,
        #[command(flatten)]
        flags: PushFlags,
    },
    /// Delete a push endpoint (its worker stops; messages it held go back to the source).
    Delete { name: String },
}

fn push_path(name: &str) -> String {
    format!("/v1/pushes/{}", path_segment(name))
}

pub fn push(client: &Client, command: PushCommand, as_json: bool) -> anyhow::Result<()> {
    match command {
        PushCommand::Create {
            name,
            queue,
            subscription,
            flags,
        } => {
            let path = push_path(&name);
            if client.get(&path).is_ok() {
                anyhow::bail!(
                    "push endpoint '{name}' exists; `tidewater push config {name} ...` changes it"
                );
            }
            if flags.url.is_none() {
                return Err(bad_input("--url is required"));
            }
            let mut patch = match (queue, subscription) {
                (Some(queue), _) => json!({ "source": { "queue": queue } }),
                (None, Some(sub)) => json!({ "source": { "subscription": sub } }),
                (None, None) => unreachable!("clap requires one"),
            };
            flags.patch(&mut patch)?;
            let (_, info) = client.call("PUT", &path, Some(&serde_json::to_vec(&patch)?))?;
            if as_json {
                print_json(&info);
            } else {
                outln!(
                    "created push endpoint '{name}': {} -> {}",
                    tagged(&info["config"]["source"]),
                    text(&info["config"]["url"])
                );
                outln!(
                    "signing secret (shown once; receivers verify webhook-signature with it): {}",
                    text(&info["secret"])
                );
            }
            Ok(())
        }
        PushCommand::Config { name, flags } => {
            let path = push_path(&name);
            let mut patch = json!({});
            flags.patch(&mut patch)?;
            let info = if patch.as_object().is_some_and(|p| p.is_empty()) {
                client.get(&path)?
            } else {
                client
                    .call("PUT", &path, Some(&serde_json::to_vec(&patch)?))?
                    .1
            };
            if as_json {
                print_json(&info);
                return Ok(());
            }
            let mut config = info["config"].clone();
            if let Some(map) = config.as_object_mut() {
                map.insert("source".into(), json!(tagged(&info["config"]["source"])));
            }
            crate::cli::print_config(&config);
            Ok(())
        }
        PushCommand::List => {
            let reply = client.get("/v1/pushes")?;
            print_listing(
                &reply,
                "pushes",
                as_json,
                "no push endpoints yet: create one with `tidewater push create NAME --queue QUEUE --url URL`",
                &[
                    "PUSH",
                    "SOURCE",
                    "URL",
                    "BREAKER",
                    "DELIVERED",
                    "IN FLIGHT",
                    "REPLIES",
                ],
                |p| {
                    let st = &p["stats"];
                    vec![
                        text(&p["name"]),
                        tagged(&p["config"]["source"]),
                        text(&p["config"]["url"]),
                        text(&p["breaker"]),
                        text(&st["delivered"]),
                        text(&st["in_flight"]),
                        counts(&st["replies"], "-"),
                    ]
                },
            );
            Ok(())
        }
        PushCommand::Stats { name } => {
            let info = client.get(&push_path(&name))?;
            if as_json {
                print_json(&info);
                return Ok(());
            }
            let st = &info["stats"];
            outln!(
                "push endpoint '{name}' ({} -> {}): breaker {} (opened {} times); {} delivered in {} requests, {} in flight, {} held; replies: {} (since the server started)",
                tagged(&info["config"]["source"]),
                text(&info["config"]["url"]),
                text(&info["breaker"]),
                text(&info["breaker_opens"]),
                text(&st["delivered"]),
                text(&st["requests"]),
                text(&st["in_flight"]),
                text(&st["held"]),
                counts(&st["replies"], "-"),
            );
            Ok(())
        }
        PushCommand::Delete { name } => {
            client.call("DELETE", &push_path(&name), None)?;
            if as_json {
                print_json(&json!({ "deleted": name }));
            } else {
                outln!("deleted push endpoint '{name}'");
            }
            Ok(())
        }
    }
}
