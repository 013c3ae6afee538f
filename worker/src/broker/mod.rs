//! The broker layer: connections and topology, declared in one place.
//!
//! The worker keeps two connections, one for consuming and one for publishing, so a slow or
//! blocked publisher (a broker in flow control) never stalls deliveries or their acks. When the
//! multi-host routing lands (DESIGN.md, "Scale"), its exchanges and bindings belong in
//! [`Broker::declare_topology`], and nowhere else.

mod publisher;

pub use publisher::{reconnect_backoff, Delivered, PublishError, Publisher, ReplyTarget};

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::settings::{redact_url, Settings};

/// Broker settings and the calls that open connections on it.
#[derive(Debug, Clone)]
pub struct Broker {
    url: String,
    pub request_queue: String,
    pub reply_queue: String,
    pub dead_letter_queue: String,
    prefetch: u16,
    node: String,
    /// How many times a reply the broker refuses is published before it is set aside.
    pub reply_attempts: u32,
}

/// A failure to talk to the broker, with the URL's password redacted.
#[derive(Debug, thiserror::Error)]
#[error("the broker at {url} {doing}: {source}")]
pub struct BrokerError {
    url: String,
    doing: &'static str,
    #[source]
    source: lapin::Error,
}

impl Broker {
    pub fn new(settings: &Settings, node: &str) -> Self {
        Self {
            url: settings.amqp_url.clone(),
            request_queue: settings.queue.clone(),
            reply_queue: settings.reply_queue.clone(),
            dead_letter_queue: settings.dead_letter_queue(),
            prefetch: settings.prefetch,
            node: node.to_owned(),
            reply_attempts: settings.reply_attempts,
        }
    }

    fn error(&self, doing: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError + '_ {
        move |source| BrokerError {
            url: redact_url(&self.url),
            doing,
            source,
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

    /// The queues every worker needs: the request queue, the default reply queue and the
    /// dead-letter queue, all durable.
    pub async fn declare_topology(&self, channel: &Channel) -> Result<(), BrokerError> {
        for queue in [
            &self.request_queue,
            &self.reply_queue,
            &self.dead_letter_queue,
        ] {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(self.error("refused a queue declaration"))?;
        }
        Ok(())
    }

    /// Connects, declares the topology and disconnects: what `--check` asks of the broker.
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

    /// A consuming connection: topology declared, prefetch set, consumer registered with
    /// manual acknowledgements.
    pub async fn consume(&self) -> Result<(Connection, Channel, Consumer), BrokerError> {
        let connection = self.connect("consumer").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(self.error("refused a channel"))?;
        self.declare_topology(&channel).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(self.error("refused the prefetch setting"))?;
        let consumer = channel
            .basic_consume(
                self.request_queue.as_str().into(),
                format!("orchestrator-worker-{}-{}", self.node, uuid::Uuid::new_v4()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(self.error("refused the consumer"))?;
        Ok((connection, channel, consumer))
    }

    /// A publishing connection with publisher confirms enabled.
    pub async fn publishing_channel(&self) -> Result<(Connection, Channel), BrokerError> {
        let connection = self.connect("publisher").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(self.error("refused a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(self.error("refused publisher confirms"))?;
        Ok((connection, channel))
    }
}
