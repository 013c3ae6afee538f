//! The `orchestrator` command line: parse a command, send its request through [`Client`], show
//! progress, print the reply for a person (or as JSON), and exit with a code a script can
//! branch on. `main.rs` only calls [`main`].

mod args;
mod fleet;
mod output;
mod progress;
mod replies;

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use schemas::{Op, Topology};

pub use args::{default_timeout, parse_duration, Cli, Command, Common};

use crate::{Client, ClientError, Envelope, Publish};

/// The longest a connection attempt may take, whatever the reply timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How the command ended; the process exit code is its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// The orchestrator answered with an error.
    ErrorReply = 1,
    /// The command line or the request was invalid; nothing was sent.
    Invalid = 2,
    /// The broker was unreachable, the exchange missing or without a worker, or no reply came
    /// in time.
    Unavailable = 3,
}

/// A failure before any reply: what to print, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Invalid,
            message: message.into(),
        }
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            exit: Exit::Unavailable,
            message: message.into(),
        }
    }
}

/// Parses the process's arguments and runs the command. Clap itself exits with 2 on a usage
/// error and with 0 after `--help` or `--version`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(Exit::Unavailable as u8);
        }
    };
    let exit = match runtime.block_on(run(cli)) {
        Ok(exit) => exit,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            failure.exit
        }
    };
    ExitCode::from(exit as u8)
}

/// Runs one parsed command to its end.
pub async fn run(cli: Cli) -> Result<Exit, Failure> {
    let Cli { common, command } = cli;
    let common = common.resolve().map_err(Failure::invalid)?;
    let (body, op) = match &command {
        Command::Completions { shell } => {
            let mut grammar = Cli::command();
            clap_complete::generate(*shell, &mut grammar, "orchestrator", &mut std::io::stdout());
            return Ok(Exit::Success);
        }
        Command::Replies(args) => return replies::print(&common, args).await,
        Command::Fleet(command) => {
            let topology = schemas::Topology::new(common.exchange())
                .expect("resolve() accepted the exchange's name");
            return fleet::run(&common, &topology, command).await;
        }
        Command::Send { file } => raw_request(file)?,
        command => {
            let request = command
                .request()
                .expect("every other command sends a request");
            let body = serde_json::to_vec(&request).expect("a request always serialises");
            (body, Some(request.op()))
        }
    };
    let timeout = common.timeout.unwrap_or_else(|| default_timeout(op));
    let client = connect(&common, timeout).await?;

    if common.no_wait {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let options = Publish {
            correlation_id: Some(correlation_id.clone()),
            // Without --reply-to the reply goes to the worker's default reply queue: this
            // client's private queue vanishes when it exits.
            reply_to: Some(common.reply_to.clone().unwrap_or_default()),
            ..Publish::default()
        };
        client
            .publish(&body, options)
            .await
            .map_err(|e| unavailable(&common, e))?;
        println!("{correlation_id}");
        return Ok(Exit::Success);
    }

    // Waiting for a reply no worker will send helps nobody: say so before sending anything.
    match client.workers_consuming().await {
        Ok(0) => {
            return Err(Failure::unavailable(format!(
                "{}; nothing was sent (with --no-wait the request waits for a worker)",
                no_worker(common.exchange())
            )))
        }
        Err(e) => return Err(unavailable(&common, e)),
        Ok(_) => {}
    }
    let wants_progress =
        matches!(op, Some(Op::Start | Op::Restart)) && !common.no_progress && !common.json;
    let options = Publish {
        progress: wants_progress,
        ..Publish::default()
    };
    let pending = client
        .send(&body, options)
        .await
        .map_err(|e| unavailable(&common, e))?;
    let mut display = progress::Display::new(wants_progress && std::io::stderr().is_terminal());
    let waited = pending
        .wait_with_progress(timeout, |event| display.show(event))
        .await;
    display.finish();
    match waited {
        Ok(envelope) => Ok(print_reply(&common, &envelope)),
        Err(ClientError::Timeout(_)) => Err(no_reply(&common, &client, timeout).await),
        Err(e) => Err(unavailable(&common, e)),
    }
}

/// Prints the final reply and returns the exit code it means.
fn print_reply(common: &Common, envelope: &Envelope) -> Exit {
    let reply = &envelope.reply;
    if common.json {
        println!("{}", String::from_utf8_lossy(&envelope.body));
    } else if let Some(error) = &reply.error {
        let code = serde_json::to_value(error.code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        eprintln!("error: {} ({} {code})", error.message, reply.status);
    } else {
        for warning in &reply.warnings {
            eprintln!("warning: {warning}");
        }
        print!("{}", output::render(reply));
    }
    if reply.ok {
        Exit::Success
    } else {
        Exit::ErrorReply
    }
}

/// Reads the body of `orchestrator send`: it must be a JSON object; the worker judges the rest.
fn raw_request(file: &std::path::Path) -> Result<(Vec<u8>, Option<Op>), Failure> {
    let mut body = Vec::new();
    let stdin = file.as_os_str() == "-";
    let source = if stdin {
        "standard input".to_owned()
    } else {
        file.display().to_string()
    };
    let read = if stdin {
        std::io::stdin().read_to_end(&mut body).map(drop)
    } else {
        std::fs::read(file).map(|bytes| body = bytes)
    };
    read.map_err(|e| Failure::invalid(format!("could not read {source}: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Failure::invalid(format!("{source} is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Failure::invalid(format!(
            "{source} must hold one JSON object, the request"
        )));
    }
    let op = value
        .get("op")
        .cloned()
        .and_then(|op| serde_json::from_value(op).ok());
    Ok((body, op))
}

async fn connect(common: &Common, timeout: Duration) -> Result<Client, Failure> {
    let connecting = Client::connect_with(
        common.amqp_url(),
        common.exchange(),
        common.reply_to.as_deref().filter(|_| !common.no_wait),
    );
    match tokio::time::timeout(timeout.min(CONNECT_TIMEOUT), connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(unavailable(common, e)),
        Err(_) => Err(Failure::unavailable(format!(
            "the broker at {} did not answer in time; is RabbitMQ running, and is --amqp-url right?",
            schemas::redact_url(common.amqp_url())
        ))),
    }
}

/// Every client failure is exit code 3; the message names the likely cause.
pub(crate) fn unavailable(common: &Common, error: ClientError) -> Failure {
    let message = match error {
        ClientError::Broker(e) => format!(
            "could not reach the broker at {} ({e}); is RabbitMQ running, and are --amqp-url and its credentials right?",
            schemas::redact_url(common.amqp_url())
        ),
        ClientError::NoExchange(ref exchange) => format!(
            "{error}: start a worker with --exchange {exchange}, or give this command the \
             workers' --exchange (ORCHESTRATOR_EXCHANGE)"
        ),
        other => other.to_string(),
    };
    Failure::unavailable(message)
}

/// What to say when the exchange exists but no worker takes its requests.
fn no_worker(exchange: &str) -> String {
    format!(
        "no worker of the fleet {exchange} consumes {}: the workers are probably not running; \
         start one with --exchange {exchange}",
        Topology::new(exchange).map_or_else(|_| exchange.to_owned(), |t| t.place())
    )
}

/// No reply in time: say whether any worker still runs on the exchange.
async fn no_reply(common: &Common, client: &Client, timeout: Duration) -> Failure {
    let seconds = timeout.as_secs_f64();
    let cause = match client.workers_consuming().await {
        Ok(0) => format!(
            "{} (the request waits until one does)",
            no_worker(common.exchange())
        ),
        _ => "the worker is busy or slow, or the container's host is down (`orchestrator fleet hosts` shows the hosts); the request may still run: check with `orchestrator getcont`, or raise --timeout".to_owned(),
    };
    Failure::unavailable(format!("no reply within {seconds}s: {cause}"))
}
