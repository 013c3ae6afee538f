//! The command line's grammar (clap derive): one subcommand per operation, flags named after the
//! protocol's fields, and the conversion of a parsed command into a request body.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use schemas::{
    ContainerName, ContainerRequest, Op, PageRequest, Request, StartRequest, Topology,
    VolumeRequest, DEFAULT_EXCHANGE, DEFAULT_REPLY_QUEUE,
};

pub use crate::DEFAULT_AMQP_URL;
pub use schemas::parse_duration;

/// How long `start` and `restart` wait by default: an image build can take many minutes.
pub const DEFAULT_LONG_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long every other operation waits by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the orchestrator answered with an error (its message and status are printed on stderr)
  2  the command line or the request was invalid; nothing was sent
  3  the broker could not be reached, the exchange does not exist or no worker runs on it (start
     one with the same --exchange), or no reply came within --timeout";

/// Command line client of apptainer-orchestrator: sends one request to the worker through
/// RabbitMQ and prints its reply.
#[derive(Debug, Parser)]
#[command(name = "orchestrator", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes.
///
/// `--amqp-url` and `--exchange` fall back to the environment by hand ([`Common::resolve`]), not
/// through clap's `env`: clap lists an argument taken from the environment in its usage lines
/// as if the command line had to give it.
#[derive(Debug, Args)]
#[command(next_help_heading = "Common options")]
pub struct Common {
    /// The broker's URL [env: AMQP_URL] [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, global = true, value_name = "URL")]
    pub amqp_url: Option<String>,
    /// The exchange the workers take requests from, the same as their --exchange; requests are
    /// published to it with the container's name as routing key, which reaches the host that
    /// holds the container [env: ORCHESTRATOR_EXCHANGE] [default: apptainer].
    #[arg(long, global = true, value_name = "EXCHANGE")]
    pub exchange: Option<String>,
    /// Gone with the fleet (requests go to an exchange, not a queue); refused with a message
    /// that says to use --exchange.
    #[arg(long, global = true, hide = true, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// How long to wait for the reply: 90, 90s, 5m, 1h, 500ms [default: 1h for start and
    /// restart, 60s for the others].
    #[arg(long, global = true, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Print the final reply envelope exactly as it arrived, and nothing else.
    #[arg(long, global = true)]
    pub json: bool,
    /// Publish the request, print its correlation id and exit without waiting; the reply goes
    /// to --reply-to, or to the worker's default reply queue (read it with `orchestrator
    /// replies`).
    #[arg(long, global = true)]
    pub no_wait: bool,
    /// Have the reply sent to this existing queue (e.g. a durable one) instead of a private one.
    #[arg(long, global = true, value_name = "QUEUE")]
    pub reply_to: Option<String>,
    /// Do not ask for progress events (start and restart ask for them by default).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the image and start a container (201).
    Start(StartArgs),
    /// Stop a running container.
    Stop(NameArgs),
    /// Start a stopped container again, with its stored binds.
    Restart(NameArgs),
    /// Show one container.
    #[command(visible_alias = "get")]
    Getcont(NameArgs),
    /// List containers (a table), and the data deleted containers left.
    #[command(visible_alias = "list")]
    Getallcont(PageArgs),
    /// Unregister a stopped container; its image stays on disk until deletecontdata.
    #[command(visible_alias = "delete")]
    Deletecont(NameArgs),
    /// Delete the image and files a deleted container left.
    #[command(visible_alias = "delete-data")]
    Deletecontdata(NameArgs),
    /// Bind a host directory into a container (from its next start if it is running).
    #[command(visible_alias = "bind")]
    Createvolume(VolumeArgs),
    /// Remove a bind from a stopped container.
    #[command(visible_aliases = ["unbind", "removevolume"])]
    Deletevolume(VolumeArgs),
    /// Send a raw JSON request from FILE, or from standard input with `-`.
    Send {
        /// A file holding one JSON request, or `-`.
        file: PathBuf,
    },
    /// Print the replies waiting in the worker's default reply queue, one JSON envelope a line
    /// (where `--no-wait` without `--reply-to` sends them); each is removed once printed.
    Replies(RepliesArgs),
    /// The fleet's hosts: `fleet hosts` lists them, `fleet forget NODE` forgets one that is
    /// gone for good.
    #[command(subcommand)]
    Fleet(super::fleet::FleetCommand),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
pub struct RepliesArgs {
    /// The queue to read: the worker's --reply-queue.
    #[arg(long, value_name = "QUEUE", default_value = DEFAULT_REPLY_QUEUE)]
    pub reply_queue: String,
    /// Print at most this many replies.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The container's name.
    #[arg(value_parser = parse_name)]
    pub name: ContainerName,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The container's name: 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit.
    #[arg(value_parser = parse_name)]
    pub name: ContainerName,
    /// container_image: a label for the image, recorded and reported back; it does not choose
    /// what is pulled (--os does, when given).
    #[arg(long)]
    pub image: String,
    /// image_distributor: where the image is pulled from: docker (Docker Hub or a registry),
    /// library (a Sylabs library), oras (an OCI registry), shub (Singularity Hub).
    #[arg(long, default_value = "docker")]
    pub distributor: String,
    /// image_os: the image that is pulled, as DISTRIBUTOR://OS:VERSION [default: the --image
    /// value]. For example `--image jupyter/base-notebook` pulls
    /// docker://jupyter/base-notebook:latest; `--distributor library --os alpine --version 3.19`
    /// pulls library://alpine:3.19; `--distributor oras --os ghcr.io/org/img --version 1.0`
    /// pulls oras://ghcr.io/org/img:1.0. --image is then only recorded.
    #[arg(long)]
    pub os: Option<String>,
    /// image_version: the tag of the image that is pulled.
    #[arg(long, default_value = "latest")]
    pub version: String,
    /// container_command: a line of the start script; repeat for more lines.
    #[arg(long = "command", value_name = "LINE")]
    pub command: Vec<String>,
    /// volume_name: a host directory bound to the container's home.
    #[arg(long, value_name = "DIR")]
    pub volume: Option<String>,
    /// environment: a variable of the container; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// binds: a host directory bound into the container; repeatable.
    #[arg(long = "bind", value_name = "HOST:CONTAINER", value_parser = parse_bind)]
    pub bind: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct PageArgs {
    /// The page, from 1.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub page: Option<u32>,
    /// Containers per page, 1 to 1000.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: Option<u32>,
}

#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[arg(value_parser = parse_name)]
    pub name: ContainerName,
    /// host_location: the directory on the host.
    #[arg(long = "host", value_name = "DIR")]
    pub host: String,
    /// container_location: the directory inside the container.
    #[arg(long = "container", value_name = "DIR")]
    pub container: String,
}

impl Command {
    /// The request this command sends, or `None` for commands that send none.
    pub fn request(&self) -> Option<Request> {
        let named = |args: &NameArgs| ContainerRequest {
            v: None,
            container_name: args.name.clone(),
        };
        let volume = |args: &VolumeArgs| VolumeRequest {
            v: None,
            container_name: args.name.clone(),
            host_location: args.host.clone(),
            container_location: args.container.clone(),
        };
        Some(match self {
            Command::Start(args) => Request::Start(args.request()),
            Command::Stop(args) => Request::Stop(named(args)),
            Command::Restart(args) => Request::Restart(named(args)),
            Command::Getcont(args) => Request::Getcont(named(args)),
            Command::Getallcont(args) => Request::Getallcont(PageRequest {
                v: None,
                page: args.page,
                page_size: args.page_size,
            }),
            Command::Deletecont(args) => Request::Deletecont(named(args)),
            Command::Deletecontdata(args) => Request::Deletecontdata(named(args)),
            Command::Createvolume(args) => Request::Createvolume(volume(args)),
            Command::Deletevolume(args) => Request::Deletevolume(volume(args)),
            Command::Send { .. }
            | Command::Replies(_)
            | Command::Fleet(_)
            | Command::Completions { .. } => return None,
        })
    }
}

impl StartArgs {
    fn request(&self) -> StartRequest {
        StartRequest {
            v: None,
            container_name: self.name.clone(),
            container_image: self.image.clone(),
            image_distributor: self.distributor.clone(),
            image_os: self.os.clone().unwrap_or_else(|| self.image.clone()),
            image_version: self.version.clone(),
            container_command: self.command.clone(),
            volume_name: self.volume.clone(),
            environment: self.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            binds: self.bind.iter().cloned().collect::<BTreeMap<_, _>>(),
        }
    }
}

impl Common {
    /// Fills `--amqp-url` and `--exchange` from `AMQP_URL` and `ORCHESTRATOR_EXCHANGE` when the
    /// command line did not give them, then from the defaults; refuses an exchange name the
    /// workers could not have (empty, too long, `amq.*`) and the old `--queue`.
    pub fn resolve(self) -> Result<Self, String> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// [`Common::resolve`] with the environment given, for tests.
    fn resolve_with(mut self, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        if let Some(queue) = &self.queue {
            return Err(format!(
                "--queue is gone: requests are published to the workers' exchange, with the \
                 container's name as routing key, not to a queue; give --exchange (the workers' \
                 --exchange, default {DEFAULT_EXCHANGE}) instead of --queue {queue}"
            ));
        }
        let amqp_url = self
            .amqp_url
            .take()
            .or_else(|| env("AMQP_URL"))
            .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
        let exchange = match self.exchange.take() {
            Some(exchange) => exchange,
            None => match env("ORCHESTRATOR_EXCHANGE") {
                Some(exchange) => exchange,
                None => {
                    if let Some(queue) = env("ORCHESTRATOR_QUEUE") {
                        eprintln!(
                            "warning: ORCHESTRATOR_QUEUE={queue} is no longer read; requests go \
                             to the exchange {DEFAULT_EXCHANGE} (set ORCHESTRATOR_EXCHANGE to \
                             the workers' --exchange)"
                        );
                    }
                    DEFAULT_EXCHANGE.to_owned()
                }
            },
        };
        Topology::new(&exchange)?;
        self.amqp_url = Some(amqp_url);
        self.exchange = Some(exchange);
        Ok(self)
    }

    /// The broker's URL, after [`Common::resolve`].
    pub fn amqp_url(&self) -> &str {
        self.amqp_url.as_deref().unwrap_or(DEFAULT_AMQP_URL)
    }

    /// The workers' exchange, after [`Common::resolve`].
    pub fn exchange(&self) -> &str {
        self.exchange.as_deref().unwrap_or(DEFAULT_EXCHANGE)
    }
}

/// The default wait for an operation: long where an image may be built.
pub fn default_timeout(op: Option<Op>) -> Duration {
    match op {
        Some(Op::Start | Op::Restart) => DEFAULT_LONG_TIMEOUT,
        _ => DEFAULT_TIMEOUT,
    }
}

fn parse_name(text: &str) -> Result<ContainerName, String> {
    ContainerName::parse(text).map_err(|e| e.to_string())
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn parse_bind(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((host, container)) if host.starts_with('/') && container.starts_with('/') => {
            Ok((host.to_owned(), container.to_owned()))
        }
        _ => Err(format!(
            "{text:?} is not HOST:CONTAINER with two absolute paths"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_flags_become_the_protocol_fields() {
        let cli = Cli::try_parse_from([
            "orchestrator",
            "start",
            "nb1",
            "--image",
            "jupyter/base-notebook",
            "--command",
            "jupyter lab",
            "--env",
            "TZ=UTC",
            "--bind",
            "/srv/a:/mnt/a",
        ])
        .unwrap();
        let Some(Request::Start(start)) = cli.command.request() else {
            panic!("a start request")
        };
        assert_eq!(start.image_distributor, "docker");
        assert_eq!(start.image_os, "jupyter/base-notebook");
        assert_eq!(start.image_version, "latest");
        assert_eq!(start.container_command, ["jupyter lab"]);
        assert_eq!(start.environment["TZ"], "UTC");
        assert_eq!(start.binds["/srv/a"], "/mnt/a");
    }

    fn common(args: &[&str]) -> Common {
        let mut argv = vec!["orchestrator"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["getcont", "nb1"]);
        Cli::try_parse_from(argv).unwrap().common
    }

    #[test]
    fn the_exchange_comes_from_the_flag_then_the_environment_then_the_default() {
        let env = |name: &str| (name == "ORCHESTRATOR_EXCHANGE").then(|| "from-env".to_owned());
        let flag = common(&["--exchange", "fleet-b"])
            .resolve_with(env)
            .unwrap();
        assert_eq!(flag.exchange(), "fleet-b");
        let from_env = common(&[]).resolve_with(env).unwrap();
        assert_eq!(from_env.exchange(), "from-env");
        let default = common(&[]).resolve_with(|_| None).unwrap();
        assert_eq!(default.exchange(), DEFAULT_EXCHANGE);
    }

    #[test]
    fn an_exchange_the_workers_cannot_have_is_refused_saying_what_to_give() {
        let empty = common(&["--exchange", ""]).resolve_with(|_| None);
        assert!(empty.unwrap_err().contains("--exchange"));
        let reserved = common(&["--exchange", "amq.direct"]).resolve_with(|_| None);
        assert!(reserved.unwrap_err().contains("amq."));
    }

    #[test]
    fn the_old_queue_flag_is_refused_saying_to_use_the_exchange() {
        let error = common(&["--queue", "apptainer.requests"])
            .resolve_with(|_| None)
            .unwrap_err();
        assert!(error.contains("--queue is gone"), "{error}");
        assert!(error.contains("--exchange"), "{error}");
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
