//! `orchestrator fleet hosts` and `orchestrator fleet forget NODE`: the fleet's administration
//! (the library's [`crate::fleet`]), printed for a person or as JSON.

use std::time::Duration;

use clap::{Args, Subcommand};
use schemas::fleet::{FleetHosts, HostView};
use schemas::{NodeId, Topology, DEFAULT_REPLY_QUEUE};

use super::output::columns;
use super::{Common, Exit, Failure};
use crate::fleet::{forget, hosts, FleetError, Forgotten};

/// How long `fleet hosts` waits for the table by default: the hosts' --gather-timeout (5 s by
/// default) and some.
pub const DEFAULT_HOSTS_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Every host known to the fleet: node, alive (its worker holds its lease), capacity,
    /// containers running and held, and the messages waiting in its queue. A host that is not
    /// alive shows what it last said about itself. Asks one running host, which asks the others.
    Hosts,
    /// Forget a host that is gone for good: every request waiting in its queue is answered
    /// `503 unavailable` (send it again), its queue and the bindings of its names are deleted,
    /// so its names can be started on other hosts. Refused while the host's worker runs.
    /// Its containers' data stays on its disk.
    Forget(ForgetArgs),
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The host's node id (its worker's --node).
    #[arg(value_parser = parse_node)]
    pub node: NodeId,
    /// Where the 503 of a request without `reply_to` goes: the workers' --reply-queue.
    #[arg(long, value_name = "QUEUE", default_value = DEFAULT_REPLY_QUEUE)]
    pub reply_queue: String,
}

fn parse_node(text: &str) -> Result<NodeId, String> {
    NodeId::parse(text)
}

/// Runs a `fleet` command.
pub async fn run(
    common: &Common,
    topology: &Topology,
    command: &FleetCommand,
) -> Result<Exit, Failure> {
    match command {
        FleetCommand::Hosts => {
            let timeout = common.timeout.unwrap_or(DEFAULT_HOSTS_TIMEOUT);
            let table = hosts(common.amqp_url(), topology, timeout)
                .await
                .map_err(|e| failure(common, e))?;
            if common.json {
                println!(
                    "{}",
                    serde_json::to_string(&table).expect("a table serialises")
                );
            } else {
                for warning in &table.warnings {
                    eprintln!("warning: {warning}");
                }
                print!("{}", hosts_table(&table, schemas_now_ms()));
            }
            Ok(Exit::Success)
        }
        FleetCommand::Forget(args) => {
            let forgotten = forget(common.amqp_url(), topology, &args.node, &args.reply_queue)
                .await
                .map_err(|e| failure(common, e))?;
            println!("{}", forgotten_text(&args.node, topology, &forgotten));
            Ok(Exit::Success)
        }
    }
}

/// A host that is alive is refused (exit 1, the orchestrator said no); everything else that
/// stops a fleet command is the broker or the fleet being unreachable (exit 3).
fn failure(common: &Common, error: FleetError) -> Failure {
    match error {
        FleetError::Alive { .. } => Failure {
            exit: Exit::ErrorReply,
            message: error.to_string(),
        },
        FleetError::Broker(e) => Failure::unavailable(format!(
            "could not reach the broker at {} ({e}); is RabbitMQ running, and are --amqp-url and its credentials right?",
            schemas::redact_url(common.amqp_url())
        )),
        other => Failure::unavailable(other.to_string()),
    }
}

fn schemas_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The hosts as aligned columns; counts of a host that did not answer are marked with when it
/// last said them.
pub fn hosts_table(table: &FleetHosts, now_ms: i64) -> String {
    let mut rows = vec![[
        "NODE", "ALIVE", "CAPACITY", "RUNNING", "HELD", "QUEUE", "AS OF",
    ]
    .map(str::to_owned)
    .to_vec()];
    rows.extend(table.hosts.iter().map(|host| host_row(host, now_ms)));
    if table.hosts.is_empty() {
        return "no hosts known\n".to_owned();
    }
    columns(&rows)
}

fn host_row(host: &HostView, now_ms: i64) -> Vec<String> {
    let as_of = if host.answered {
        "now".to_owned()
    } else if host.at_ms == 0 {
        "never heard".to_owned()
    } else {
        format!("{}s ago", (now_ms - host.at_ms).max(0) / 1000)
    };
    vec![
        host.node.clone(),
        if host.alive { "yes" } else { "no" }.to_owned(),
        host.capacity
            .map_or_else(|| "unlimited".to_owned(), |c| c.to_string()),
        host.running.to_string(),
        host.held.to_string(),
        host.queue_depth
            .map_or_else(|| "gone".to_owned(), |d| d.to_string()),
        as_of,
    ]
}

/// What `fleet forget` says it did.
pub fn forgotten_text(node: &NodeId, topology: &Topology, forgotten: &Forgotten) -> String {
    let queue = topology.host_queue(node);
    if !forgotten.queue_deleted {
        return format!(
            "host {node} has no queue ({queue} does not exist): nothing waited for it; told the running hosts to forget it"
        );
    }
    let mut text = format!(
        "forgot host {node}: answered {} waiting request{} 503 unavailable",
        forgotten.answered,
        if forgotten.answered == 1 { "" } else { "s" }
    );
    if forgotten.undeliverable > 0 {
        text.push_str(&format!(
            " ({} of them to reply queues that no longer exist)",
            forgotten.undeliverable
        ));
    }
    if forgotten.dropped > 0 {
        text.push_str(&format!(
            "; {} request{} arrived while the queue was being deleted and went unanswered",
            forgotten.dropped,
            if forgotten.dropped == 1 { "" } else { "s" }
        ));
    }
    text.push_str(&format!(
        ", dropped {} admin message{}, deleted {queue} and the bindings of its names (they can now be started on other hosts); its containers' data stays on its disk",
        forgotten.admin_dropped,
        if forgotten.admin_dropped == 1 { "" } else { "s" }
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_table_shows_every_host_and_when_a_silent_one_last_spoke() {
        let host = |node: &str, alive: bool, answered: bool| HostView {
            node: node.into(),
            alive,
            capacity: if alive { Some(5) } else { None },
            running: 2,
            held: 3,
            queue_depth: if alive { Some(0) } else { Some(4) },
            at_ms: 1_000,
            answered,
        };
        let table = FleetHosts {
            hosts: vec![host("host-a", true, true), host("host-b", false, false)],
            warnings: vec![],
            node: "host-a".into(),
        };
        let text = hosts_table(&table, 31_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NODE    ALIVE  CAPACITY   RUNNING  HELD  QUEUE  AS OF"
        );
        assert_eq!(
            lines[1],
            "host-a  yes    5          2        3     0      now"
        );
        assert_eq!(
            lines[2],
            "host-b  no     unlimited  2        3     4      30s ago"
        );
    }

    #[test]
    fn forget_says_how_many_it_answered() {
        let topology = Topology::new("apptainer").unwrap();
        let node = NodeId::parse("host-b").unwrap();
        let done = Forgotten {
            answered: 3,
            undeliverable: 0,
            admin_dropped: 1,
            queue_deleted: true,
            dropped: 0,
        };
        let text = forgotten_text(&node, &topology, &done);
        assert!(text.starts_with("forgot host host-b: answered 3 waiting requests 503"));
        assert!(text.contains("deleted apptainer.host.host-b"));
    }
}
