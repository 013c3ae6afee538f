//! The broker layer: connections and topology, declared in one place.
//!
//! The worker keeps two connections, one for consuming and one for publishing, so a slow or
//! blocked publisher (a broker in flow control) never stalls deliveries or their acks. The
//! fleet's exchanges and queues are declared in [`topology`] and nowhere else; the lease, name
//! locks, probes and name bindings are in [`fleet`], on the consuming connection.

mod fleet;
mod publisher;
mod topology;

pub use fleet::{LeaseError, NameLock, Routed, RESOURCE_LOCKED};
pub use publisher::{reconnect_backoff, Delivered, PublishError, Publisher, ReplyTarget};

use std::sync::Arc;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, Queue};
use schemas::{NodeId, Topology};

use crate::settings::{redact_url, QueueType, Settings};

/// Broker settings and the calls that open connections on it.
#[derive(Debug, Clone)]
pub struct Broker {
    url: String,
    /// Every name of the fleet.
    pub topology: Topology,
    /// This host's node id: its queue, its lease.
    pub node: NodeId,
    pub reply_queue: String,
    pub dead_letter_queue: String,
    queue_type: QueueType,
    prefetch: u16,
    /// How many times a reply the broker refuses is published before it is set aside.
    pub reply_attempts: u32,
}

/// A failure to talk to the broker, with the URL's password redacted.
#[derive(Debug, thiserror::Error)]
#[error("the broker at {url} {doing}{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct BrokerError {
    url: String,
    doing: String,
    #[source]
    source: Option<lapin::Error>,
}

impl BrokerError {
    /// The AMQP reply code the broker closed the channel or connection with, if any.
    pub fn amqp_code(&self) -> Option<u16> {
        self.source.as_ref().and_then(amqp_code)
    }
}

/// The AMQP reply code of a broker's refusal (405 RESOURCE_LOCKED, 406 PRECONDITION_FAILED,
/// ...), if `error` is one.
pub fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Declares `queue` passively on a channel of its own, because a refused declaration closes its
/// channel: the queue as the broker has it now (its message and consumer counts), or the
/// broker's refusal (`404` missing, `405` an exclusive queue another connection holds).
pub async fn passive_declare(connection: &Connection, queue: &str) -> Result<Queue, lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    let _ = channel.close(200, "looked".into()).await;
    Ok(declared)
}

/// The AMQP reply code of a passive declaration of a queue that does not exist.
pub const NOT_FOUND: u16 = 404;

/// What a consuming connection has, once subscribed to this host's queue.
pub struct Session {
    pub connection: Arc<Connection>,
    /// The host queue's channel, with the prefetch set.
    pub channel: Channel,
    pub consumer: Consumer,
}

impl Broker {
    pub fn new(settings: &Settings, node: &NodeId) -> Self {
        Self {
            url: settings.amqp_url.clone(),
            topology: settings.exchange.clone(),
            node: node.clone(),
            reply_queue: settings.reply_queue.clone(),
            dead_letter_queue: settings.dead_letter_queue(),
            queue_type: settings.queue_type,
            prefetch: settings.prefetch,
            reply_attempts: settings.reply_attempts,
        }
    }

    /// This host's queue.
    pub fn host_queue(&self) -> String {
        self.topology.host_queue(&self.node)
    }

    /// A queue that should exist does not (it was deleted under the worker).
    pub fn missing(&self, queue: &str) -> BrokerError {
        BrokerError {
            url: redact_url(&self.url),
            doing: format!("has no queue {queue} (deleted?); declaring it again"),
            source: None,
        }
    }

    fn error(&self, doing: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError + '_ {
        move |source| self.error_with(doing.to_owned(), source)
    }

    fn error_with(&self, doing: String, source: lapin::Error) -> BrokerError {
        BrokerError {
            url: redact_url(&self.url),
            doing,
            source: Some(source),
        }
    }

    async fn connect(&self, role: &str) -> Result<Connection, BrokerError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("orchestrator-worker {} {role}", self.node).into());
        Connection::connect(&self.url, properties)
            .await
            .map_err(self.error(
            "could not be reached (is RabbitMQ running, and are the URL and credentials right?)",
        ))
    }

    /// Connects, declares the shared topology and disconnects: what `--check` asks of the
    /// broker (this host's queue is left to the worker, see [`Broker::declare_host_queue`]).
    pub async fn check(&self) -> Result<(), BrokerError> {
        let connection = self.connect("check").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(self.error("refused a channel"))?;
        self.declare_topology(&channel).await?;
        let _ = connection.close(200, "check done".into()).await;
        Ok(())
    }

    /// Connects for consuming and declares the topology on a channel left in confirm mode
    /// (the connection's shared channel for bindings, unbindings and hand-ons; probes use their
    /// name lock's channel); the caller takes the lease and binds the
    /// names before [`Broker::subscribe`]. Also says whether this host's queue existed before
    /// (it does not after `fleet forget` or when the broker lost its state).
    pub async fn consuming_connection(&self) -> Result<(Connection, Channel, bool), BrokerError> {
        let connection = self.connect("consumer").await?;
        let existed = self.queue_exists(&connection, &self.host_queue()).await?;
        let channel = self.confirm_channel(&connection).await?;
        self.declare_topology(&channel).await?;
        self.declare_host_queue(&channel).await?;
        Ok((connection, channel, existed))
    }

    /// Whether `queue` exists ([`passive_declare`]).
    async fn queue_exists(
        &self,
        connection: &Connection,
        queue: &str,
    ) -> Result<bool, BrokerError> {
        match passive_declare(connection, queue).await {
            Ok(_) => Ok(true),
            Err(e) if amqp_code(&e) == Some(NOT_FOUND) => Ok(false),
            Err(e) => Err(self.error("refused a passive declaration")(e)),
        }
    }

    /// Subscribes to `queue` on a new channel of `connection` with manual acknowledgements
    /// and `prefetch` unacknowledged deliveries at most.
    pub async fn subscribe(
        &self,
        connection: &Connection,
        queue: &str,
        prefetch: u16,
    ) -> Result<(Channel, Consumer), BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(self.error("refused a channel"))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(self.error("refused the prefetch setting"))?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("orchestrator-worker-{}-{}", self.node, uuid::Uuid::new_v4()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(self.error("refused the consumer"))?;
        Ok((channel, consumer))
    }

    /// Subscribes to this host's queue with `--prefetch`.
    pub async fn subscribe_host(
        &self,
        connection: Arc<Connection>,
    ) -> Result<Session, BrokerError> {
        let (channel, consumer) = self
            .subscribe(&connection, &self.host_queue(), self.prefetch)
            .await?;
        Ok(Session {
            connection,
            channel,
            consumer,
        })
    }

    /// A channel in confirm mode on `connection`.
    async fn confirm_channel(&self, connection: &Connection) -> Result<Channel, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(self.error("refused a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(self.error("refused publisher confirms"))?;
        Ok(channel)
    }

    /// A publishing connection with publisher confirms enabled.
    pub async fn publishing_channel(&self) -> Result<(Connection, Channel), BrokerError> {
        let connection = self.connect("publisher").await?;
        let channel = self.confirm_channel(&connection).await?;
        Ok((connection, channel))
    }
}
