//! The `tidewater` binary: the server (`serve`) and the client commands.

mod api;
mod bench;
mod binary;
mod cli;
mod client;
mod http;
mod metrics;
mod openapi;
mod scenario;
mod serve;

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError, errln, exit};

#[derive(Parser)]
#[command(
    name = "tidewater",
    version,
    about = "A durable message broker for the moment producers outrun consumers."
)]
#[command(
    after_help = "Start a server with `tidewater serve`, then use the client commands against it.\n\
Client exit codes: 0 ok, 1 failed, 2 bad input, 3 not found, 4 refused by backpressure (retry later), 5 server unreachable."
)]
struct Cli {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "TIDEWATER_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// Binary protocol address for publish and consume.
    #[arg(
        long,
        global = true,
        env = "TIDEWATER_PROTOCOL_SERVER",
        default_value = "127.0.0.1:7071"
    )]
    protocol_server: String,
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
    /// Benchmark publish and receive+ack over HTTP (starts its own server unless --target URL).
    Bench(bench::BenchArgs),
    /// Replay an incident without and with the policy that answers it (simulated time).
    Scenario(scenario::ScenarioArgs),
}

fn main() {
    let cli = Cli::parse();
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
        Commands::Bench(args) => report(bench::run(args)),
        Commands::Scenario(args) => report(scenario::run(args, cli.json)),
        command => {
            // `tidewater queue list | head` ends quietly: every command writes standard
            // output through client::write_stdout, which ends the process by SIGPIPE when
            // the reader went away. SIGPIPE itself stays ignored (see write_stdout).
            let client = Client::new(&cli.server);
            report(match command {
                Commands::Queue(c) => cli::queue(&client, c, cli.json),
                Commands::Publish(a) => cli::publish(&cli.protocol_server, a, cli.json),
                Commands::Consume(a) => cli::consume(&cli.protocol_server, a, cli.json),
                Commands::Dlq(c) => cli::dlq(&client, c, cli.json),
                Commands::Serve(_) | Commands::Bench(_) | Commands::Scenario(_) => {
                    unreachable!()
                }
            })
        }
    };
    std::process::exit(code);
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => exit::OK,
        Err(err) => {
            errln!("error: {err:#}");
            err.downcast_ref::<ClientError>()
                .map_or(exit::FAILED, ClientError::exit_code)
        }
    }
}
