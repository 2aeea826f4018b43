//! Client commands for webhook hooks: create, list, stats, config, delete (over HTTP,
//! `/v1/hooks`). Tables for people, `--json` for scripts. Secrets are read from the command
//! line, files or the environment, and never printed (the server shows fingerprints).
// Output goes through `outln!`/`errln!`: `println!` panics on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::cli::{apply_sets, counts, print_json, print_listing, table, tagged, text};
use crate::client::{Client, bad_input, outln, path_segment};

#[derive(Debug, clap::Args)]
pub struct SecretFlags {
    /// A secret the sender signs with (repeat while rotating: a signature by any passes).
    /// On a shared machine prefer --secret-file or --secret-env: a command line is visible
    /// to other users.
    #[arg(long = "secret", value_name = "SECRET")]
    secrets: Vec<String>,
    /// A file holding a secret (surrounding whitespace ignored); repeatable.
    #[arg(long = "secret-file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// An environment variable holding a secret; repeatable.
    #[arg(long = "secret-env", value_name = "VAR")]
    envs: Vec<String>,
}

impl SecretFlags {
    fn read(&self) -> anyhow::Result<Vec<String>> {
        let mut secrets = self.secrets.clone();
        for file in &self.files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| bad_input(format!("--secret-file {}: {e}", file.display())))?;
            secrets.push(text.trim().to_string());
        }
        for var in &self.envs {
            let value = std::env::var(var)
                .map_err(|_| bad_input(format!("--secret-env {var}: the variable is not set")))?;
            secrets.push(value.trim().to_string());
        }
        Ok(secrets)
    }

    fn given(&self) -> bool {
        !(self.secrets.is_empty() && self.files.is_empty() && self.envs.is_empty())
    }
}

#[derive(Debug, clap::Args)]
pub struct SignatureFlags {
    /// How the sender signs: github, stripe, slack, standard_webhooks (Svix and others),
    /// hmac (a header of your choosing), or none (unsigned: needs an API key with produce
    /// on the hook once authentication is on).
    #[arg(long, value_name = "PRESET", value_parser = ["github", "stripe", "slack", "standard_webhooks", "hmac", "none"])]
    preset: Option<String>,
    #[command(flatten)]
    secrets: SecretFlags,
    /// How far a signed timestamp may be from now, in seconds (stripe, slack,
    /// standard_webhooks; default 300).
    #[arg(long, value_name = "SECONDS")]
    tolerance_s: Option<u64>,
    /// hmac: the header carrying the signature.
    #[arg(long, value_name = "NAME")]
    signature_header: Option<String>,
    /// hmac: sha256 or sha512.
    #[arg(long, value_parser = ["sha256", "sha512"])]
    algorithm: Option<String>,
    /// hmac: hex or base64.
    #[arg(long, value_parser = ["hex", "base64"])]
    encoding: Option<String>,
    /// hmac: text before the signature in the header, e.g. sha256=
    #[arg(long)]
    prefix: Option<String>,
}

impl SignatureFlags {
    fn given(&self) -> bool {
        self.preset.is_some()
            || self.secrets.given()
            || self.tolerance_s.is_some()
            || self.signature_header.is_some()
            || self.algorithm.is_some()
            || self.encoding.is_some()
            || self.prefix.is_some()
    }

    /// The signature object, starting from `current` (a hook's shown signature) for what
    /// the flags do not say; the secrets must be given (the server never shows them).
    fn signature(&self, current: Option<&Value>) -> anyhow::Result<Value> {
        let mut signature = json!({});
        let preset = match (&self.preset, current) {
            (Some(preset), _) => preset.clone(),
            (None, Some(current)) => current["preset"].as_str().unwrap_or("").to_string(),
            (None, None) => return Err(bad_input("--preset is required")),
        };
        signature["preset"] = json!(preset);
        let keep_current = self.preset.is_none() || current.is_some_and(|c| c["preset"] == preset);
        if let Some(current) = current.filter(|_| keep_current) {
            for field in ["tolerance_s", "header", "algorithm", "encoding", "prefix"] {
                if let Some(value) = current.get(field) {
                    signature[field] = value.clone();
                }
            }
        }
        let set = [
            ("tolerance_s", self.tolerance_s.map(|t| json!(t))),
            ("header", self.signature_header.as_ref().map(|h| json!(h))),
            ("algorithm", self.algorithm.as_ref().map(|a| json!(a))),
            ("encoding", self.encoding.as_ref().map(|e| json!(e))),
            ("prefix", self.prefix.as_ref().map(|p| json!(p))),
        ];
        for (field, value) in set {
            if let Some(value) = value {
                signature[field] = value;
            }
        }
        let secrets = self.secrets.read()?;
        if preset != "none" && secrets.is_empty() {
            return Err(bad_input(
                "give the hook's secrets (--secret, --secret-file or --secret-env): the server never shows them, so a signature change names them all",
            ));
        }
        signature["secrets"] = json!(secrets);
        Ok(signature)
    }
}

#[derive(Debug, clap::Args)]
pub struct HookFlags {
    /// Header whose value names each delivery, for deduplication of the sender's retries
    /// (default: the preset's, e.g. X-GitHub-Delivery, webhook-id).
    #[arg(long, value_name = "NAME")]
    id_header: Option<String>,
    /// Header whose value becomes the message key (per-key order and concurrency).
    #[arg(long, value_name = "NAME")]
    key_header: Option<String>,
    /// A request header to store with each event, besides content-type and the preset's
    /// (repeatable).
    #[arg(long = "header", value_name = "NAME")]
    headers: Vec<String>,
    /// Larger bodies are refused with 413 (default 1 MiB).
    #[arg(long, value_name = "BYTES")]
    max_body_bytes: Option<u64>,
    /// The tenant every event counts against (quotas, fairness).
    #[arg(long)]
    tenant: Option<String>,
    /// Any other field, as FIELD=VALUE (JSON or a string).
    #[arg(long, value_name = "FIELD=VALUE")]
    set: Vec<String>,
}

impl HookFlags {
    fn patch(&self, patch: &mut Value) -> anyhow::Result<()> {
        if let Some(h) = &self.id_header {
            patch["id_header"] = json!(h);
        }
        if let Some(h) = &self.key_header {
            patch["key_header"] = json!(h);
        }
        if !self.headers.is_empty() {
            patch["headers"] = json!(self.headers);
        }
        if let Some(max) = self.max_body_bytes {
            patch["max_body_bytes"] = json!(max);
        }
        if let Some(tenant) = &self.tenant {
            patch["tenant"] = json!(tenant);
        }
        apply_sets(patch, &self.set, "max_body_bytes=65536")?;
        Ok(())
    }
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TargetFlags {
    /// Store events in this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Store events as records of this stream.
    #[arg(long)]
    stream: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum HookCommand {
    /// Create a hook: senders POST webhooks to /v1/hooks/NAME; each is checked against its
    /// signature and answered 200 once durable in the queue or stream.
    #[command(
        after_help = "Examples:\n  tidewater hook create github --queue github-events --preset github --secret-env GITHUB_WEBHOOK_SECRET\n  tidewater hook create stripe --queue payments --preset stripe --secret-file stripe.secret\n  tidewater hook create svix --stream events --preset standard_webhooks --secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n  tidewater hook create acme --queue acme --preset hmac --signature-header X-Acme-Signature --encoding base64 --secret s3cret"
    )]
    Create {
        name: String,
        #[command(flatten)]
        target: TargetFlags,
        #[command(flatten)]
        signature: SignatureFlags,
        #[command(flatten)]
        flags: HookFlags,
    },
    /// List hooks with their targets and counters.
    List,
    /// Show a hook's counters: accepted, duplicates, signature failures, refusals by reason.
    Stats { name: String },
    /// Show a hook's configuration, or change it (a new signature names every secret in
    /// force, e.g. the new one and the old one while senders move over).
    #[command(
        after_help = "Examples:\n  tidewater hook config github --secret-env NEW_SECRET --secret-env OLD_SECRET\n  tidewater hook config github --header X-Request-Id --max-body-bytes 262144\n  tidewater hook config github --queue github-events-v2"
    )]
    Config {
        name: String,
        /// Store events in this queue from now on.
        #[arg(long, conflicts_with = "stream")]
        queue: Option<String>,
        /// Store events in this stream from now on.
        #[arg(long)]
        stream: Option<String>,
        #[command(flatten)]
        signature: SignatureFlags,
        #[command(flatten)]
        flags: HookFlags,
    },
    /// Delete a hook (events already stored stay; senders get 404 from now on).
    Delete { name: String },
}

fn hook_path(name: &str) -> String {
    format!("/v1/hooks/{}", path_segment(name))
}

fn print_hook(client: &Client, info: &Value) {
    let config = &info["config"];
    let signature = &config["signature"];
    let rows = vec![
        vec!["url".into(), client.url(&hook_path(&text(&info["name"])))],
        vec!["target".into(), tagged(&config["target"])],
        vec!["preset".into(), text(&signature["preset"])],
        vec![
            "secrets".into(),
            signature["secret_fingerprints"]
                .as_array()
                .map_or_else(String::new, |f| {
                    f.iter()
                        .map(|s| format!("sha256:{}..", text(s)))
                        .collect::<Vec<_>>()
                        .join(", ")
                }),
        ],
        vec!["tolerance_s".into(), text(&signature["tolerance_s"])],
        vec!["id_header".into(), text(&config["id_header"])],
        vec!["key_header".into(), text(&config["key_header"])],
        vec!["headers".into(), text(&config["headers"])],
        vec!["max_body_bytes".into(), text(&config["max_body_bytes"])],
        vec!["tenant".into(), text(&config["tenant"])],
    ];
    table(&["SETTING", "VALUE"], &rows);
}

pub fn hook(client: &Client, command: HookCommand, as_json: bool) -> anyhow::Result<()> {
    match command {
        HookCommand::Create {
            name,
            target,
            signature,
            flags,
        } => {
            let path = hook_path(&name);
            if client.get(&path).is_ok() {
                anyhow::bail!(
                    "hook '{name}' exists; `tidewater hook config {name} ...` changes it"
                );
            }
            let mut patch = json!({ "signature": signature.signature(None)? });
            patch["target"] = match (target.queue, target.stream) {
                (Some(queue), _) => json!({ "queue": queue }),
                (None, Some(stream)) => json!({ "stream": stream }),
                (None, None) => unreachable!("clap requires one"),
            };
            flags.patch(&mut patch)?;
            let (_, info) = client.call("PUT", &path, Some(&serde_json::to_vec(&patch)?))?;
            if as_json {
                print_json(&info);
            } else {
                outln!(
                    "created hook '{name}' -> {}; senders POST to {} (or to {{path_prefix}}/{name} on a [hooks] listener)",
                    tagged(&info["config"]["target"]),
                    client.url(&path)
                );
            }
            Ok(())
        }
        HookCommand::Config {
            name,
            queue,
            stream,
            signature,
            flags,
        } => {
            let path = hook_path(&name);
            let info = client.get(&path)?;
            let mut patch = json!({});
            if signature.given() {
                patch["signature"] = signature.signature(Some(&info["config"]["signature"]))?;
            }
            if let Some(queue) = queue {
                patch["target"] = json!({ "queue": queue });
            }
            if let Some(stream) = stream {
                patch["target"] = json!({ "stream": stream });
            }
            flags.patch(&mut patch)?;
            if patch.as_object().is_some_and(|p| p.is_empty()) {
                if as_json {
                    print_json(&info);
                } else {
                    print_hook(client, &info);
                }
                return Ok(());
            }
            let (_, info) = client.call("PUT", &path, Some(&serde_json::to_vec(&patch)?))?;
            if as_json {
                print_json(&info);
            } else {
                outln!("updated hook '{name}'");
                print_hook(client, &info);
            }
            Ok(())
        }
        HookCommand::List => {
            let reply = client.get("/v1/hooks")?;
            print_listing(
                &reply,
                "hooks",
                as_json,
                "no hooks yet: create one with `tidewater hook create NAME --queue QUEUE --preset github --secret-env VAR`",
                &[
                    "HOOK",
                    "TARGET",
                    "PRESET",
                    "ACCEPTED",
                    "DUPLICATES",
                    "BAD SIGNATURES",
                    "REFUSED",
                ],
                |h| {
                    let st = &h["stats"];
                    vec![
                        text(&h["name"]),
                        tagged(&h["config"]["target"]),
                        text(&h["config"]["signature"]["preset"]),
                        text(&st["accepted"]),
                        text(&st["duplicates"]),
                        text(&st["signature_failures"]),
                        counts(&st["refused"], "0"),
                    ]
                },
            );
            Ok(())
        }
        HookCommand::Stats { name } => {
            let info = client.get(&hook_path(&name))?;
            if as_json {
                print_json(&info);
                return Ok(());
            }
            let st = &info["stats"];
            outln!(
                "hook '{name}' -> {}: {} accepted, {} duplicates, {} bad signatures; refused: {} (since the server started)",
                tagged(&info["config"]["target"]),
                text(&st["accepted"]),
                text(&st["duplicates"]),
                text(&st["signature_failures"]),
                counts(&st["refused"], "0"),
            );
            Ok(())
        }
        HookCommand::Delete { name } => {
            client.call("DELETE", &hook_path(&name), None)?;
            if as_json {
                print_json(&json!({ "deleted": name }));
            } else {
                outln!("deleted hook '{name}'");
            }
            Ok(())
        }
    }
}
