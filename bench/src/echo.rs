//! The baselines: echo responders written directly on lapin, run beside the worker. Both consume
//! the same request bodies from their own durable queue with the worker's prefetch and manual
//! acks, decode each request and publish a reply of the worker's shape and size on a second
//! connection; they keep no state. They differ in what they promise about the reply (see
//! [`EchoKind`]); their queue is classic or quorum, as the worker's host queue can be.

use std::collections::BTreeMap;

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use orchestrator_worker::settings::QueueType;
use schemas::{BindsResult, ContainerRecord, Op, Reply, ReplyResult, Request};
use tokio::task::JoinHandle;

/// Which baseline: the floor of any RPC consumer, or a responder as careful as the worker's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    /// Publishes each reply transient (delivery mode 1), not `mandatory`, on a channel without
    /// publisher confirms, and acknowledges the delivery at once: the least any consumer of
    /// these requests must do (issue 14's baseline for reads).
    Bare,
    /// Publishes each reply persistent, `mandatory` and confirmed, and acknowledges the delivery
    /// once the broker has confirmed the reply (issue 6's baseline, issue 14's for writes).
    Reliable,
}

impl EchoKind {
    pub fn label(self) -> &'static str {
        match self {
            EchoKind::Bare => "bare",
            EchoKind::Reliable => "reliable",
        }
    }
}

pub struct Echo {
    pub exchange: String,
    /// The queue it consumes, `<exchange>.place`.
    pub queue: String,
    consumer: Connection,
    publisher: Connection,
    task: JoinHandle<()>,
}

impl Echo {
    /// Declares the exchange `exchange` (a fanout, so every request reaches it) and the durable
    /// queue `<exchange>.place` of type `queue_type` bound to it, where the client library
    /// counts consumers, and starts answering that queue.
    pub async fn start(
        amqp_url: &str,
        exchange: &str,
        prefetch: u16,
        kind: EchoKind,
        queue_type: QueueType,
    ) -> anyhow::Result<Self> {
        let topology = schemas::Topology::new(exchange).map_err(anyhow::Error::msg)?;
        let queue = topology.place();
        let queue = queue.as_str();
        let consumer = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .context("the echo responder could not reach the broker")?;
        let publisher = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let channel = consumer.create_channel().await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.as_str().into()),
        );
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                queue.into(),
                format!("orchestrator-bench-{}-echo", kind.label()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let replies = publisher.create_channel().await?;
        if kind == EchoKind::Reliable {
            replies
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        let task = tokio::spawn(async move {
            // Prefetch bounds the deliveries, and so the tasks, in flight.
            while let Some(Ok(delivery)) = deliveries.next().await {
                let replies = replies.clone();
                tokio::spawn(async move {
                    let reply_to = delivery
                        .properties
                        .reply_to()
                        .as_ref()
                        .map(|q| q.as_str().to_owned())
                        .unwrap_or_default();
                    let correlation_id = delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.as_str().to_owned());
                    let body = reply_body(&delivery.data, correlation_id.clone());
                    let sent = match kind {
                        EchoKind::Bare => {
                            publish_bare(&replies, &reply_to, correlation_id, &body).await
                        }
                        EchoKind::Reliable => {
                            publish_reliable(&replies, &reply_to, correlation_id, &body).await
                        }
                    };
                    if sent.is_ok() {
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        Ok(Self {
            exchange: exchange.to_owned(),
            queue: queue.to_owned(),
            consumer,
            publisher,
            task,
        })
    }

    pub async fn stop(self) {
        self.task.abort();
        let _ = self.consumer.close(200, "bench done".into()).await;
        let _ = self.publisher.close(200, "bench done".into()).await;
    }
}

async fn publish_reliable(
    channel: &Channel,
    reply_to: &str,
    correlation_id: Option<String>,
    body: &[u8],
) -> Result<(), lapin::Error> {
    let properties = reply_properties(2, correlation_id);
    orchestrator_producer::publish_confirmed(channel, reply_to, body, properties)
        .await
        .map(drop)
}

/// Hands the reply to the connection (transient, not `mandatory`, no confirm on this channel)
/// and returns without waiting for the broker.
async fn publish_bare(
    channel: &Channel,
    reply_to: &str,
    correlation_id: Option<String>,
    body: &[u8],
) -> Result<(), lapin::Error> {
    let properties = reply_properties(1, correlation_id);
    channel
        .basic_publish(
            "".into(),
            reply_to.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .map(drop)
}

/// A JSON reply's properties: `delivery_mode` 1 is transient, 2 persistent.
fn reply_properties(delivery_mode: u8, correlation_id: Option<String>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(delivery_mode);
    match correlation_id {
        Some(correlation) => properties.with_correlation_id(correlation.into()),
        None => properties,
    }
}

/// A reply of the shape and size the worker sends for the same request.
fn reply_body(request: &[u8], correlation_id: Option<String>) -> Vec<u8> {
    let request: Option<Request> = serde_json::from_slice(request).ok();
    let op = request.as_ref().map(Request::op);
    let name = request
        .as_ref()
        .and_then(|r| r.container_name())
        .map(|n| n.to_string())
        .unwrap_or_default();
    let result = match &request {
        Some(Request::Createvolume(v)) | Some(Request::Deletevolume(v)) => {
            let mut binds = BTreeMap::new();
            if matches!(op, Some(Op::Createvolume)) {
                binds.insert(v.host_location.clone(), v.container_location.clone());
            }
            Some(ReplyResult::Binds(BindsResult {
                container_name: name.clone(),
                binds,
            }))
        }
        Some(_) => Some(ReplyResult::Container(ContainerRecord {
            container_name: name.clone(),
            container_active: false,
            container_ip: String::new(),
            container_image: "jupyter/base-notebook".into(),
            image_distributor: "docker".into(),
            image_os: "jupyter/base-notebook".into(),
            image_version: "latest".into(),
            binds: BTreeMap::new(),
            volume_name: None,
            node: None,
        })),
        None => None,
    };
    let reply = Reply {
        v: 1,
        correlation_id,
        op,
        container_name: Some(name),
        status: 200,
        ok: true,
        is_final: true,
        stage: None,
        position: None,
        result,
        error: None,
        warnings: Vec::new(),
        node: "echo".into(),
        duration_ms: 0,
    };
    serde_json::to_vec(&reply).expect("a reply always serialises")
}
