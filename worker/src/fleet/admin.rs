//! The fleet's admin plane on one host: what it does with the admin messages the intake hands
//! it (hellos, gathers, `fleet hosts`, `fleet forget`), the fleet-wide `getallcont`, and the
//! periodic hello. Admin messages are not requests: nothing of them goes to the inbox, and
//! each is handled on a task of its own, so a gather that waits for other hosts never holds
//! up the intake (which must go on taking this host's own answer to it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use schemas::fleet::{
    FleetHosts, Forget, GatherAnswer, GatherAsk, HostStatus, ANNOUNCEMENT_TTL_MS, FORGET, GATHER,
    HELLO, HELLO_EVERY_SECS, HOSTS,
};
use schemas::{ErrorCode, Op, PageRequest, Reply, ReplyResult, Topology};
use tokio::sync::Mutex;

use super::gather::{gather, Gathered};
use super::roster::Roster;
use crate::reply::{stamp_node, ReplyHeader};
use crate::store::{Store, StoreResult};

/// How often a host looks whether its counts changed since its last hello.
const COUNTS_CHECKED_EVERY: Duration = Duration::from_secs(2);

/// An admin message as the intake hands it over.
#[derive(Debug, Clone)]
pub struct AdminMessage {
    /// Its AMQP `type` (`orchestrator.…`).
    pub kind: String,
    pub body: Vec<u8>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// What the admin plane needs to be built.
pub struct AdminConfig {
    pub node: String,
    pub topology: Topology,
    pub amqp_url: String,
    /// `--max-containers`; `None` is unlimited.
    pub capacity: Option<u32>,
    /// `--gather-timeout`.
    pub gather_timeout: Duration,
}

pub struct Admin {
    topology: Topology,
    roster: Roster,
    link: Link,
    store: Store,
    gather_timeout: Duration,
    /// The counts (held, running) this host last said in a hello, and when.
    said: std::sync::Mutex<Option<((u64, u64), tokio::time::Instant)>>,
}

impl Admin {
    pub async fn new(config: AdminConfig, store: Store) -> StoreResult<Self> {
        let roster = Roster::load(&config.node, config.capacity, store.clone()).await?;
        Ok(Self {
            link: Link::new(&config.amqp_url, &config.node),
            topology: config.topology,
            roster,
            store,
            said: std::sync::Mutex::default(),
            gather_timeout: config.gather_timeout,
        })
    }

    pub fn node(&self) -> &str {
        self.roster.node()
    }

    /// Handles one admin message. Types it does not know (another part of the fleet's, such as
    /// `orchestrator.probe`, or a newer worker's) are ignored.
    pub async fn on_admin(&self, message: AdminMessage) {
        let result = match message.kind.as_str() {
            HELLO => match serde_json::from_slice::<HostStatus>(&message.body) {
                Ok(status) => {
                    // A host new to this one (it just joined) has not heard of this one
                    // either: hello back, once, so that it knows whom to wait for at once.
                    if self.roster.heard(status).await {
                        self.say_hello().await;
                    }
                    Ok(())
                }
                Err(e) => Err(format!("an unreadable hello: {e}")),
            },
            FORGET => match serde_json::from_slice::<Forget>(&message.body) {
                Ok(forget) => {
                    self.roster.forget(&forget.node).await;
                    Ok(())
                }
                Err(e) => Err(format!("an unreadable forget: {e}")),
            },
            GATHER => self.answer_gather(&message).await,
            HOSTS => self.answer_hosts(&message).await,
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(kind = %message.kind, error = %e, "an admin message was not handled");
        }
    }

    /// Answers a gather with this host's status, the hosts it knows, and the first records of
    /// its list.
    async fn answer_gather(&self, message: &AdminMessage) -> Result<(), String> {
        let ask: GatherAsk = serde_json::from_slice(&message.body)
            .map_err(|e| format!("an unreadable gather: {e}"))?;
        let answer = self
            .own_answer(ask.limit)
            .await
            .map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&answer).expect("an answer serialises");
        self.answer(message, GATHER, &body).await?;
        crate::metrics::gather_answered(self.node());
        Ok(())
    }

    async fn own_answer(&self, limit: u32) -> StoreResult<GatherAnswer> {
        let host = self.roster.own_status().await?;
        let mut page = ReplyResult::Page(crate::ops::first_records(&self.store, limit).await?);
        stamp_node(&mut page, self.node());
        let ReplyResult::Page(page) = page else {
            unreachable!("stamping keeps the page a page")
        };
        Ok(GatherAnswer {
            host,
            known: self.roster.others().into_values().collect(),
            page,
        })
    }

    /// Answers `orchestrator fleet hosts`: gathers the fleet's counts, then the leases and
    /// queue depths of every host known.
    async fn answer_hosts(&self, message: &AdminMessage) -> Result<(), String> {
        let connection = self.link.connection().await.map_err(|e| e.to_string())?;
        let gathered = gather(
            &connection,
            &self.topology,
            &self.roster,
            0,
            self.gather_timeout,
        )
        .await
        .map_err(|e| format!("could not gather: {e}"))?;
        let table: FleetHosts =
            super::hosts::table(&connection, &self.topology, self.node(), &gathered).await;
        let body = serde_json::to_vec(&table).expect("a table serialises");
        self.answer(message, HOSTS, &body).await
    }

    /// Publishes the answer to an admin message to its `reply_to`, confirmed.
    async fn answer(&self, message: &AdminMessage, kind: &str, body: &[u8]) -> Result<(), String> {
        let Some(reply_to) = &message.reply_to else {
            return Err("it has no reply_to to answer to".into());
        };
        let mut properties = admin_properties(kind);
        if let Some(correlation_id) = &message.correlation_id {
            properties = properties.with_correlation_id(correlation_id.as_str().into());
        }
        // Not mandatory: RabbitMQ 3.10 returns a mandatory publish to a direct reply-to name
        // even when it delivers it. An answer nobody waits for any more is lost, harmlessly.
        self.publish("", reply_to, body, properties)
            .await
            .map_err(|e| format!("could not answer it: {e}"))
    }

    /// A fleet-wide `getallcont`: every live host's containers, paged by name, with the hosts
    /// that are missing named in `warnings`.
    pub async fn getallcont(
        &self,
        request: &PageRequest,
        correlation_id: Option<&str>,
        received: Instant,
    ) -> Reply {
        let header = |received: Instant| ReplyHeader {
            node: self.node().to_owned(),
            op: Some(Op::Getallcont),
            container_name: None,
            duration_ms: received.elapsed().as_millis() as u64,
        };
        let (page, page_size) = match crate::ops::page_of(request) {
            Ok(asked) => asked,
            Err(refusal) => {
                return header(received).error(correlation_id, refusal.code, &refusal.message)
            }
        };
        let limit = u32::try_from(u64::from(page) * u64::from(page_size)).unwrap_or(u32::MAX);
        let gathered = match self.gather(limit).await {
            Ok(gathered) => gathered,
            Err(e) => {
                return header(received).error(
                    correlation_id,
                    ErrorCode::Internal,
                    &format!("could not ask the other hosts for their containers ({e}); ask again"),
                )
            }
        };
        header(received).success(
            correlation_id,
            Op::Getallcont.success_status(),
            Some(ReplyResult::Page(gathered.page(page, page_size))),
            gathered.warnings(&self.topology),
        )
    }

    async fn gather(&self, limit: u32) -> Result<Gathered, lapin::Error> {
        let connection = self.link.connection().await?;
        let gathered = gather(
            &connection,
            &self.topology,
            &self.roster,
            limit,
            self.gather_timeout,
        )
        .await;
        if gathered.is_err() {
            self.link.reset().await;
        }
        gathered
    }

    /// Tells every host about this one (`orchestrator.hello` on `<exchange>.all`, with a TTL of
    /// the hello period). Called at every (re)connect and by [`Admin::say_hello_periodically`].
    pub async fn say_hello(&self) {
        match self.roster.own_status().await {
            Ok(status) => self.say(&status).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not count this host's containers for its hello")
            }
        }
    }

    async fn say(&self, status: &HostStatus) {
        let said = async {
            let body = serde_json::to_vec(status).expect("a status serialises");
            self.publish_to_all(
                HELLO,
                &body,
                Some(Duration::from_millis(ANNOUNCEMENT_TTL_MS)),
            )
            .await
            .map_err(|e| e.to_string())
        };
        match said.await {
            Ok(()) => {
                *self.said.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(((status.held, status.running), tokio::time::Instant::now()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not say hello to the fleet; trying again at the next hello")
            }
        }
    }

    /// Says hello every [`HELLO_EVERY_SECS`] seconds (the first at every (re)connect, from the
    /// consume loop), and sooner, within [`COUNTS_CHECKED_EVERY`], when this host's counts
    /// changed, so that what the others remember of a host that dies is recent. Runs until the
    /// task is aborted.
    pub async fn say_hello_periodically(self: Arc<Self>) {
        let period = Duration::from_secs(HELLO_EVERY_SECS);
        // The first hello is the consume loop's, at connect.
        let first = tokio::time::Instant::now() + COUNTS_CHECKED_EVERY;
        let mut every = tokio::time::interval_at(first, COUNTS_CHECKED_EVERY);
        loop {
            every.tick().await;
            let Ok(status) = self.roster.own_status().await else {
                continue;
            };
            let said = *self.said.lock().unwrap_or_else(|p| p.into_inner());
            let due = said.is_none_or(|(counts, at)| {
                at.elapsed() >= period || counts != (status.held, status.running)
            });
            if due {
                self.say(&status).await;
            }
        }
    }

    /// Sets this host's fleet gauges (containers held and running, capacity), for `/metrics`.
    pub async fn record_metrics(&self) {
        match self.roster.own_status().await {
            Ok(status) => crate::metrics::fleet_host(
                &status.node,
                status.capacity,
                status.held,
                status.running,
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not count this host's containers for /metrics")
            }
        }
    }

    /// Publishes an admin message to every host.
    async fn publish_to_all(
        &self,
        kind: &str,
        body: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), lapin::Error> {
        let mut properties = admin_properties(kind);
        if let Some(ttl) = ttl {
            properties = properties.with_expiration(ttl.as_millis().to_string().into());
        }
        self.publish(&self.topology.all(), "", body, properties)
            .await
    }

    /// Publishes on the admin plane's connection (not confirmed: admin messages are said
    /// again or asked again when lost).
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), lapin::Error> {
        let connection = self.link.connection().await?;
        let published = async {
            let channel = connection.create_channel().await?;
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?;
            channel.close(200, "published".into()).await
        }
        .await;
        if published.is_err() {
            self.link.reset().await;
        }
        published
    }
}

fn admin_properties(kind: &str) -> BasicProperties {
    BasicProperties::default()
        .with_type(kind.into())
        .with_content_type("application/json".into())
}

/// The admin plane's own connection (gathers, leases, hellos), opened when first needed and
/// again after a failure; separate from the consumer's, so a gather never waits behind
/// deliveries, and from the publisher's, whose channel is in confirm mode.
struct Link {
    url: String,
    name: String,
    current: Mutex<Option<Arc<Connection>>>,
}

impl Link {
    fn new(url: &str, node: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: format!("orchestrator-worker {node} fleet"),
            current: Mutex::new(None),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, lapin::Error> {
        let mut current = self.current.lock().await;
        if let Some(connection) = current.as_ref() {
            if connection.status().connected() {
                return Ok(Arc::clone(connection));
            }
        }
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.as_str().into());
        let connection = Arc::new(Connection::connect(&self.url, properties).await?);
        *current = Some(Arc::clone(&connection));
        Ok(connection)
    }

    async fn reset(&self) {
        if let Some(connection) = self.current.lock().await.take() {
            let _ = connection.close(200, "reconnecting".into()).await;
        }
    }
}
