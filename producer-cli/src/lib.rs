//! The client side of apptainer-orchestrator: publish a request, await its reply.
//!
//! A [`Client`] holds one connection, a private reply queue (exclusive, auto-deleted, named by
//! the broker) and a task that routes each reply to the call awaiting its correlation id, so
//! many calls can be in flight at once. Requests are published persistent, `mandatory` and
//! confirmed: a request queue that does not exist is reported, not silently dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use schemas::{Reply, Request};
use tokio::sync::oneshot;

pub use schemas;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not reach the broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the request queue {0} does not exist; the worker is probably not running")]
    NoRequestQueue(String),
    #[error("the broker refused the request")]
    Nacked,
    #[error("no reply within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the connection to the broker closed before the reply came")]
    Closed,
}

/// Waiting calls, by correlation id. A call that needs every reply (progress events included)
/// would register a channel instead; today only final replies are awaited.
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;

/// Options of one published request.
#[derive(Debug, Clone, Default)]
pub struct Publish {
    /// Defaults to a fresh UUID.
    pub correlation_id: Option<String>,
    /// The idempotency key; the worker falls back to the correlation id.
    pub message_id: Option<String>,
    /// Defaults to this client's private reply queue; `Some("")` sends no `reply_to`.
    pub reply_to: Option<String>,
}

pub struct Client {
    _connection: Connection,
    channel: Channel,
    request_queue: String,
    reply_queue: String,
    waiters: Waiters,
}

impl Client {
    /// Connects and sets up a private reply queue.
    pub async fn connect(amqp_url: &str, request_queue: &str) -> Result<Self, ClientError> {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = queue.name().as_str().to_owned();
        let mut consumer = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiters: Waiters = Arc::default();
        let routes = Arc::clone(&waiters);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(reply) = serde_json::from_slice::<Reply>(&delivery.data) else {
                    continue;
                };
                if !reply.is_final {
                    continue;
                }
                let waiter = reply
                    .correlation_id
                    .as_ref()
                    .and_then(|id| routes.lock().unwrap_or_else(|p| p.into_inner()).remove(id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
            }
        });
        Ok(Self {
            _connection: connection,
            channel,
            request_queue: request_queue.to_owned(),
            reply_queue,
            waiters,
        })
    }

    /// The private queue this client's replies arrive on.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// Publishes `request` and awaits its final reply for at most `timeout`.
    pub async fn call(&self, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
        let body = serde_json::to_vec(request).expect("a request always serialises");
        self.call_raw(&body, Publish::default(), timeout).await
    }

    /// Publishes any body (valid or not) and awaits the final reply to its correlation id.
    pub async fn call_raw(
        &self,
        body: &[u8],
        options: Publish,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.send(body, options).await?.wait(timeout).await
    }

    /// Publishes a body and returns once the broker has confirmed it, with a handle on its
    /// final reply. Publishing several with `send` and then waiting keeps their order.
    pub async fn send(&self, body: &[u8], options: Publish) -> Result<PendingReply, ClientError> {
        let correlation_id = options
            .correlation_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(correlation_id.clone(), tx);
        let pending = PendingReply {
            correlation_id: correlation_id.clone(),
            receiver: rx,
            waiters: Arc::clone(&self.waiters),
        };
        self.publish(
            body,
            Publish {
                correlation_id: Some(correlation_id),
                ..options
            },
        )
        .await?;
        Ok(pending)
    }

    /// Publishes a request body without waiting for its reply; returns once the broker has
    /// confirmed it into the request queue.
    pub async fn publish(&self, body: &[u8], options: Publish) -> Result<(), ClientError> {
        let correlation_id = options
            .correlation_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_correlation_id(correlation_id.into());
        match options.reply_to.as_deref() {
            Some("") => {}
            Some(queue) => properties = properties.with_reply_to(queue.into()),
            None => properties = properties.with_reply_to(self.reply_queue.as_str().into()),
        }
        if let Some(message_id) = options.message_id {
            properties = properties.with_message_id(message_id.into());
        }
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                self.request_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if confirmation.is_nack() {
            return Err(ClientError::Nacked);
        }
        if confirmation.take_message().is_some() {
            return Err(ClientError::NoRequestQueue(self.request_queue.clone()));
        }
        Ok(())
    }
}

/// The final reply of a published request, still to come.
pub struct PendingReply {
    correlation_id: String,
    receiver: oneshot::Receiver<Reply>,
    waiters: Waiters,
}

impl PendingReply {
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// Waits at most `timeout` for the reply.
    pub async fn wait(mut self, timeout: Duration) -> Result<Reply, ClientError> {
        match tokio::time::timeout(timeout, &mut self.receiver).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.correlation_id);
    }
}
