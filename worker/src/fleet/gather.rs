//! Gathering: one host asks every host (`orchestrator.gather` on `<exchange>.all`) for what it
//! holds, and waits for the answers of the hosts whose lease is held, up to `--gather-timeout`.
//! A known host whose lease is gone is not waited for. Replies come back by RabbitMQ's direct
//! reply-to, so nothing is declared and a gather leaves nothing behind; the question carries a
//! TTL of the timeout, so it does not wait in the queue of a host that is gone.
//!
//! What the answers make: a fleet-wide `getallcont` page ([`Gathered::page`]) and the table of
//! `orchestrator fleet hosts` (`super::hosts`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use schemas::fleet::{GatherAnswer, GatherAsk, HostStatus, GATHER};
use schemas::{ContainerPage, NodeId, Topology};
use tokio::task::JoinSet;

use super::lease::{depth, lease, Lease};
use super::roster::Roster;

/// RabbitMQ's direct reply-to pseudo-queue: consumed (no-ack) on the channel that publishes.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What a gather found.
#[derive(Debug, Default)]
pub struct Gathered {
    /// The answers, by node id.
    pub answers: BTreeMap<String, GatherAnswer>,
    /// Every host known (this host's roster, and the hosts the answers name), with what it last
    /// said about itself.
    pub known: BTreeMap<String, HostStatus>,
    /// The lease of every known host.
    pub leases: BTreeMap<String, Lease>,
    /// How long the gather waited at most.
    pub timeout: Duration,
}

impl Gathered {
    /// Hosts that should have answered (lease held, or not known to be gone) and did not.
    pub fn silent(&self) -> Vec<&str> {
        self.leases
            .iter()
            .filter(|(node, lease)| **lease != Lease::Gone && !self.answers.contains_key(*node))
            .map(|(node, _)| node.as_str())
            .collect()
    }

    /// Known hosts whose lease is gone and that did not answer.
    pub fn gone(&self) -> Vec<&str> {
        self.leases
            .iter()
            .filter(|(node, lease)| **lease == Lease::Gone && !self.answers.contains_key(*node))
            .map(|(node, _)| node.as_str())
            .collect()
    }

    /// Warnings naming the hosts whose containers are missing, and why.
    pub fn warnings(&self, topology: &Topology) -> Vec<String> {
        let timeout = self.timeout.as_secs_f64();
        let silent = self.silent().into_iter().map(|node| {
            format!(
                "host {node} did not answer within {timeout}s (--gather-timeout): its containers are missing from this list; its worker holds its lease but is slow or stalled; ask again"
            )
        });
        let gone = self.gone().into_iter().map(|node| {
            let lease = NodeId::parse(node).map_or_else(|_| node.to_owned(), |id| topology.alive_queue(&id));
            format!(
                "host {node} is not running (its lease {lease} is gone): its containers are missing from this list; its requests wait for it, or run `orchestrator fleet forget {node}` to answer them and free its names"
            )
        });
        silent.chain(gone).collect()
    }

    /// Page `page` of the merged lists of every answer, sorted by name (then node).
    pub fn page(&self, page: u32, page_size: u32) -> ContainerPage {
        let mut containers = Vec::new();
        let mut data = Vec::new();
        let (mut total, mut data_total) = (0, 0);
        for answer in self.answers.values() {
            containers.extend(answer.page.containers.iter().cloned());
            data.extend(answer.page.data.iter().cloned());
            total += answer.page.total;
            data_total += answer.page.data_total;
        }
        containers.sort_by(|a, b| (&a.container_name, &a.node).cmp(&(&b.container_name, &b.node)));
        data.sort_by(|a, b| (&a.container_name, &a.node).cmp(&(&b.container_name, &b.node)));
        crate::ops::cut_page(containers, data, (total, data_total), page, page_size)
    }
}

/// Asks every host for the first `limit` records of its list and collects the answers.
pub async fn gather(
    connection: &Arc<Connection>,
    topology: &Topology,
    roster: &Roster,
    limit: u32,
    timeout: Duration,
) -> Result<Gathered, lapin::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = connection.create_channel().await?;
    let asked = ask(&channel, topology, limit, timeout).await?;
    let mut gathered = Gathered {
        known: roster.others(),
        timeout,
        ..Gathered::default()
    };
    gathered
        .leases
        .insert(roster.node().to_owned(), Lease::Held);
    let mut checks = JoinSet::new();
    for node in gathered.known.keys() {
        check_lease(&mut checks, connection, topology, node);
    }
    let link = (connection, topology);
    collect(&mut gathered, &mut checks, asked, link, deadline).await;
    // Leases still being checked at the deadline: the host was not heard, so it is named.
    checks.abort_all();
    let _ = channel.close(200, "gathered".into()).await;
    for status in gathered.known.values() {
        roster.heard(status.clone()).await;
    }
    forget_forgotten(connection, topology, roster, &mut gathered).await;
    Ok(gathered)
}

/// A gather question on its way: the answers' consumer, and the question's correlation id.
struct Asked {
    replies: Consumer,
    correlation_id: String,
}

/// Publishes the question to every host (`<exchange>.all`), its answers to come back on
/// `channel` by direct reply-to.
async fn ask(
    channel: &Channel,
    topology: &Topology,
    limit: u32,
    timeout: Duration,
) -> Result<Asked, lapin::Error> {
    let replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let properties = BasicProperties::default()
        .with_type(GATHER.into())
        .with_content_type("application/json".into())
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_correlation_id(correlation_id.as_str().into())
        .with_expiration(timeout.as_millis().max(1).to_string().into());
    let body = serde_json::to_vec(&GatherAsk { limit }).expect("a gather question serialises");
    channel
        .basic_publish(
            topology.all().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await?;
    Ok(Asked {
        replies,
        correlation_id,
    })
}

/// Takes in answers and lease checks until every host not known to be gone has answered, or
/// `deadline`.
async fn collect(
    gathered: &mut Gathered,
    checks: &mut JoinSet<(String, Lease)>,
    mut asked: Asked,
    (connection, topology): (&Arc<Connection>, &Topology),
    deadline: tokio::time::Instant,
) {
    loop {
        let waiting = gathered
            .known
            .keys()
            .chain(gathered.leases.keys())
            .any(|node| {
                !gathered.answers.contains_key(node)
                    && gathered.leases.get(node) != Some(&Lease::Gone)
            });
        if !waiting && checks.is_empty() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            Some(checked) = checks.join_next(), if !checks.is_empty() => {
                if let Ok((node, lease)) = checked {
                    gathered.leases.insert(node, lease);
                }
            }
            reply = asked.replies.next() => {
                let Some(Ok(delivery)) = reply else { return };
                let ours = delivery.properties.correlation_id().as_ref().map(|c| c.as_str())
                    == Some(asked.correlation_id.as_str());
                let Ok(answer) = serde_json::from_slice::<GatherAnswer>(&delivery.data) else {
                    tracing::warn!("a host answered a gather with something unreadable; ignored");
                    continue;
                };
                if ours {
                    learn(gathered, checks, connection, topology, answer);
                }
            }
        }
    }
}

/// Takes in an answer: the host, and the hosts it knows of (whose leases are then checked).
fn learn(
    gathered: &mut Gathered,
    checks: &mut JoinSet<(String, Lease)>,
    connection: &Arc<Connection>,
    topology: &Topology,
    answer: GatherAnswer,
) {
    for status in answer.known.iter().chain([&answer.host]) {
        if !gathered.known.contains_key(&status.node) && !gathered.leases.contains_key(&status.node)
        {
            check_lease(checks, connection, topology, &status.node);
        }
        let newer = gathered
            .known
            .get(&status.node)
            .is_none_or(|known| known.at_ms < status.at_ms);
        if newer {
            gathered.known.insert(status.node.clone(), status.clone());
        }
    }
    gathered
        .leases
        .insert(answer.host.node.clone(), Lease::Held);
    gathered.answers.insert(answer.host.node.clone(), answer);
}

fn check_lease(
    checks: &mut JoinSet<(String, Lease)>,
    connection: &Arc<Connection>,
    topology: &Topology,
    node: &str,
) {
    let Ok(id) = NodeId::parse(node) else {
        return;
    };
    let alive_queue = topology.alive_queue(&id);
    let connection = Arc::clone(connection);
    let node = node.to_owned();
    checks.spawn(async move { (node, lease(&connection, &alive_queue).await) });
}

/// A known host whose lease and queue are both gone was forgotten (`orchestrator fleet forget`
/// ran while this host did not hear it): it is dropped from the roster and not named.
async fn forget_forgotten(
    connection: &Connection,
    topology: &Topology,
    roster: &Roster,
    gathered: &mut Gathered,
) {
    let gone: BTreeSet<String> = gathered.gone().into_iter().map(str::to_owned).collect();
    for node in gone {
        let Ok(id) = NodeId::parse(&node) else {
            continue;
        };
        if let Ok(None) = depth(connection, &topology.host_queue(&id)).await {
            roster.forget(&node).await;
            gathered.leases.remove(&node);
            gathered.known.remove(&node);
        }
    }
}

#[cfg(test)]
mod tests {
    use schemas::{ContainerRecord, LeftoverData};

    use super::*;

    fn record(name: &str, node: &str) -> ContainerRecord {
        ContainerRecord {
            container_name: name.into(),
            container_active: true,
            container_ip: String::new(),
            container_image: "img".into(),
            image_distributor: "docker".into(),
            image_os: "img".into(),
            image_version: "latest".into(),
            binds: BTreeMap::new(),
            volume_name: None,
            node: Some(node.into()),
        }
    }

    fn answer(node: &str, names: &[&str], data: &[&str]) -> GatherAnswer {
        GatherAnswer {
            host: HostStatus {
                node: node.into(),
                capacity: None,
                running: names.len() as u64,
                held: names.len() as u64,
                at_ms: 1,
            },
            known: Vec::new(),
            page: ContainerPage {
                containers: names.iter().map(|n| record(n, node)).collect(),
                data: data
                    .iter()
                    .map(|n| LeftoverData {
                        container_name: (*n).into(),
                        container_image: "img".into(),
                        node: Some(node.into()),
                    })
                    .collect(),
                page: 1,
                page_size: 100,
                total: names.len() as u64,
                data_total: data.len() as u64,
            },
        }
    }

    #[test]
    fn pages_run_through_every_hosts_containers_by_name_then_their_data() {
        let mut gathered = Gathered::default();
        for a in [
            answer("a", &["nb1", "nb4"], &["old2"]),
            answer("b", &["nb2", "nb5"], &[]),
            answer("c", &["nb3"], &["old1"]),
        ] {
            gathered.answers.insert(a.host.node.clone(), a);
        }
        let names = |page: &ContainerPage| {
            let containers = page.containers.iter().map(|r| r.container_name.clone());
            let data = page.data.iter().map(|d| d.container_name.clone());
            containers.chain(data).collect::<Vec<_>>()
        };
        let first = gathered.page(1, 3);
        assert_eq!(names(&first), ["nb1", "nb2", "nb3"]);
        assert_eq!(first.containers[1].node.as_deref(), Some("b"));
        assert_eq!((first.total, first.data_total), (5, 2));
        assert_eq!(names(&gathered.page(2, 3)), ["nb4", "nb5", "old1"]);
        assert_eq!(names(&gathered.page(3, 3)), ["old2"]);
        assert!(names(&gathered.page(4, 3)).is_empty());
    }

    #[test]
    fn a_host_gone_is_named_without_waiting_and_a_silent_one_after_the_timeout() {
        let topology = Topology::new("t").unwrap();
        let mut gathered = Gathered {
            timeout: Duration::from_secs(5),
            ..Gathered::default()
        };
        gathered.leases.insert("a".into(), Lease::Held);
        gathered.leases.insert("b".into(), Lease::Held);
        gathered.leases.insert("c".into(), Lease::Gone);
        gathered.answers.insert("a".into(), answer("a", &[], &[]));
        assert_eq!(gathered.silent(), ["b"]);
        assert_eq!(gathered.gone(), ["c"]);
        let warnings = gathered.warnings(&topology);
        assert!(warnings[0].contains("host b did not answer within 5s"));
        assert!(warnings[1].contains("t.alive.c is gone"));
        assert!(warnings[1].contains("orchestrator fleet forget c"));
    }
}
