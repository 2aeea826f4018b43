//! The `tidewater` binary: the server (`serve`) and the client commands.

mod api;
mod audit;
mod auth;
mod bench;
mod binary;
mod cli;
mod cli_auth;
mod cli_forecast;
mod cli_hooks;
mod cli_pushes;
mod cli_streams;
mod cli_subscriptions;
mod client;
mod console;
mod edges;
mod errors;
mod http;
mod keda;
mod listener;
mod metrics;
mod observe;
mod openapi;
mod push;
mod reload;
mod scenario;
mod serve;
mod time;
mod tls;

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError, errln, exit};

/// `tidewater --version`: the crate's version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TIDEWATER_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "tidewater",
    version = VERSION,
    about = "A durable message broker for the moment producers outrun consumers."
)]
#[command(
    after_help = "Start a server with `tidewater serve`, then use the client commands against it.\n\
Client exit codes: 0 ok, 1 failed, 2 bad input, 3 not found, 4 refused by backpressure (retry later), 5 server unreachable, 6 denied (no or bad credentials, or no grant)."
)]
struct Cli {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TIDEWATER_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// Binary protocol address for publish and consume.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TIDEWATER_PROTOCOL_SERVER",
        default_value = "127.0.0.1:7071"
    )]
    protocol_server: String,
    /// An API key's token, `<key id>.<secret>`, for a server with authentication on (sent
    /// as `Authorization: Bearer` and in the binary protocol's Hello).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TIDEWATER_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (for https:// servers;
    /// default: the system's roots).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TIDEWATER_CACERT",
        value_name = "FILE"
    )]
    cacert: Option<std::path::PathBuf>,
    /// Do not check the server's certificate at all (anyone in the middle can read and
    /// change the traffic): only for tests and throwaway setups.
    #[arg(long, global = true, help_heading = "Connection")]
    insecure: bool,
    /// PEM client certificate (with --client-key, its PEM key), for a server that takes
    /// client certificates (mutual TLS).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TIDEWATER_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    client_cert: Option<std::path::PathBuf>,
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "TIDEWATER_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<std::path::PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the broker on its embedded storage.
    Serve(serve::ServeArgs),
    /// Create, list, inspect, configure, delete and purge queues.
    #[command(subcommand)]
    Queue(cli::QueueCommand),
    /// Publish messages: arguments, a file or standard input, one message per line.
    Publish(cli::PublishArgs),
    /// Receive messages and ack them (or nack, or run a command per message).
    Consume(cli::ConsumeArgs),
    /// Inspect and redrive dead-letter queues.
    #[command(subcommand)]
    Dlq(cli::DlqCommand),
    /// Create, list, inspect, configure and delete streams.
    #[command(subcommand)]
    Stream(cli_streams::StreamCommand),
    /// Produce records to a stream: an argument, a file or standard input, one record per line.
    Produce(cli_streams::ProduceArgs),
    /// Read a stream's records, one per line: from an offset or a time, or as a member of a
    /// consumer group.
    Fetch(cli_streams::FetchArgs),
    /// List, describe, reset the offsets of, and delete consumer groups.
    #[command(subcommand)]
    Group(cli_streams::GroupCommand),
    /// Create, list, inspect, configure and delete work-queue subscriptions on streams
    /// (consume one with `tidewater consume STREAM/SUBSCRIPTION`).
    #[command(subcommand)]
    Subscription(cli_subscriptions::SubscriptionCommand),
    /// Webhook hooks: signed webhooks in, stored durably before the sender hears 200
    /// (docs/edges.md).
    #[command(subcommand)]
    Hook(cli_hooks::HookCommand),
    /// Push endpoints: a queue's (or subscription's) messages POSTed to a URL, settled by
    /// the reply, behind a circuit breaker (docs/edges.md).
    #[command(subcommand)]
    Push(cli_pushes::PushCommand),
    /// API keys and grants (authentication and authorization, docs/security.md).
    #[command(subcommand)]
    Auth(cli_auth::AuthCommand),
    /// Benchmark publish and receive+ack over HTTP (starts its own server unless --target URL).
    Bench(bench::BenchArgs),
    /// Replay an incident without and with the policy that answers it (simulated time).
    Scenario(scenario::ScenarioArgs),
}

fn main() {
    // With --json, a command line clap refuses is a JSON error too (help and version
    // are not errors and print as usual).
    let json_requested = std::env::args_os().skip(1).any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            let shown = matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            );
            if json_requested && !shown {
                let error = ClientError::Usage(err.render().to_string().trim().to_string());
                errln!("{}", error_json(&anyhow::Error::new(error)));
                std::process::exit(exit::USAGE);
            }
            err.exit()
        }
    };
    let code = match cli.command {
        Commands::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(serve::run(args)) {
                Ok(()) => exit::OK,
                Err(err) => {
                    errln!("tidewater: {err:#}");
                    exit::FAILED
                }
            }
        }
        Commands::Bench(args) => report(bench::run(args), cli.json),
        Commands::Scenario(args) => report(scenario::run(args, cli.json), cli.json),
        command => {
            // `tidewater queue list | head` ends quietly: every command writes standard
            // output through client::write_stdout, which ends the process by SIGPIPE when
            // the reader went away. SIGPIPE itself stays ignored (see write_stdout).
            client::set_token(cli.token.clone());
            client::set_tls(client::TlsFlags {
                cacert: cli.cacert.clone(),
                insecure: cli.insecure,
                client_cert: cli.client_cert.clone(),
                client_key: cli.client_key.clone(),
                https: cli.server.starts_with("https://"),
            });
            let client = Client::new(&cli.server);
            report(
                match command {
                    Commands::Queue(c) => cli::queue(&client, c, cli.json),
                    Commands::Publish(a) => cli::publish(&cli.protocol_server, a, cli.json),
                    Commands::Consume(a) => cli::consume(&cli.protocol_server, a, cli.json),
                    Commands::Dlq(c) => cli::dlq(&client, c, cli.json),
                    Commands::Stream(c) => cli_streams::stream(&client, c, cli.json),
                    Commands::Produce(a) => cli_streams::produce(&client, a, cli.json),
                    Commands::Fetch(a) => cli_streams::fetch(&client, a, cli.json),
                    Commands::Group(c) => cli_streams::group(&client, c, cli.json),
                    Commands::Auth(c) => cli_auth::auth(&client, c, cli.json),
                    Commands::Hook(c) => cli_hooks::hook(&client, c, cli.json),
                    Commands::Push(c) => cli_pushes::push(&client, c, cli.json),
                    Commands::Subscription(c) => {
                        cli_subscriptions::subscription(&client, c, cli.json)
                    }
                    Commands::Serve(_) | Commands::Bench(_) | Commands::Scenario(_) => {
                        unreachable!()
                    }
                },
                cli.json,
            )
        }
    };
    std::process::exit(code);
}

/// Prints a command's error on standard error (plain, or one JSON object with --json)
/// and returns the exit code.
fn report(result: anyhow::Result<()>, json: bool) -> i32 {
    match result {
        Ok(()) => exit::OK,
        Err(err) if json => {
            errln!("{}", error_json(&err));
            exit_code(&err)
        }
        Err(err) => {
            errln!("error: {err:#}");
            exit_code(&err)
        }
    }
}

fn exit_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<ClientError>()
        .map_or(exit::FAILED, ClientError::exit_code)
}

/// `{"code", "message", "status"?, "exit_code"}`: the server's code and HTTP status when
/// the server answered, else `unreachable`, `usage` or `failed`.
fn error_json(err: &anyhow::Error) -> serde_json::Value {
    let exit_code = exit_code(err);
    let mut out = serde_json::json!({"message": format!("{err:#}"), "exit_code": exit_code});
    match err.downcast_ref::<ClientError>() {
        Some(ClientError::Api { status, code, .. }) => {
            out["code"] = serde_json::json!(code);
            out["status"] = serde_json::json!(status);
        }
        Some(ClientError::Unreachable(_)) => out["code"] = serde_json::json!("unreachable"),
        Some(ClientError::Usage(_)) => out["code"] = serde_json::json!("usage"),
        Some(ClientError::Other(_)) | None => out["code"] = serde_json::json!("failed"),
    }
    out
}
