//! The client side of apptainer-orchestrator: publish a request, await its reply.
//!
//! A [`Client`] holds one connection, a private reply queue (exclusive, auto-deleted, named by
//! the broker) and a task that routes each reply to the call awaiting its correlation id, so
//! many calls can be in flight at once. Requests are published to the fleet's exchange
//! (`apptainer` by default) with the container's name as routing key (`getallcont`: empty),
//! persistent, `mandatory` and confirmed: an exchange that does not exist (no worker has ever
//! started with it) is reported, not silently dropped.
//!
//! A call that asks for progress ([`Publish::progress`]) also receives the request's
//! `"final": false` envelopes, in order, before its final reply. The [`cli`] module is the
//! `orchestrator` command line, built on this client.

pub mod cli;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Queue};
use schemas::{routing_key, Reply, Request, Topology, PROGRESS_HEADER};
use tokio::sync::{mpsc, oneshot};

pub use schemas;

/// The broker URL when neither `--amqp-url` nor `AMQP_URL` is given (the worker's default):
/// the local broker as guest, also what the tests and the benchmark use.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not reach the broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the reply queue {0} does not exist; declare it first, or leave out --reply-to")]
    NoReplyQueue(String),
    #[error("the exchange {0} does not exist; no worker has started on this broker with this --exchange")]
    NoExchange(String),
    #[error("{0}")]
    BadExchange(String),
    #[error("the broker refused the request")]
    Nacked,
    #[error("no reply within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the connection to the broker closed before the reply came")]
    Closed,
}

/// How many progress envelopes of one call may wait to be read; more are dropped (progress is
/// best effort; the final reply has a slot of its own).
const PROGRESS_BUFFER: usize = 64;

/// A reply as it arrived: decoded, and the exact body (to print it unchanged).
#[derive(Debug, Clone)]
pub struct Envelope {
    pub reply: Reply,
    pub body: Vec<u8>,
}

/// A call waiting for its replies.
struct Waiter {
    progress: Option<mpsc::Sender<Reply>>,
    done: oneshot::Sender<Envelope>,
}

/// Waiting calls, by correlation id.
type Waiters = Arc<Mutex<HashMap<String, Waiter>>>;

/// Options of one published request.
#[derive(Debug, Clone, Default)]
pub struct Publish {
    /// Defaults to a fresh UUID.
    pub correlation_id: Option<String>,
    /// The idempotency key: one key, one request (a key reused for another request is refused
    /// 409). Without one, the worker deduplicates by the correlation id and the body together.
    pub message_id: Option<String>,
    /// Defaults to this client's reply queue; `Some("")` sends no `reply_to` (replies then go
    /// to the worker's default reply queue).
    pub reply_to: Option<String>,
    /// Asks for progress envelopes (AMQP header `x-progress: true`).
    pub progress: bool,
    /// The routing key; by default the body's container name ([`routing_key_of`]).
    pub routing_key: Option<String>,
}

pub struct Client {
    connection: Connection,
    channel: Channel,
    topology: Topology,
    reply_queue: String,
    waiters: Waiters,
}

impl Client {
    /// Connects to the fleet whose exchange is `exchange` and sets up a private reply queue
    /// (exclusive, auto-deleted).
    pub async fn connect(amqp_url: &str, exchange: &str) -> Result<Self, ClientError> {
        Self::connect_with(amqp_url, exchange, None).await
    }

    /// Connects; replies arrive on `reply_queue` when given (an existing queue, possibly shared
    /// with other clients: only the replies this client awaits are acknowledged, the others go
    /// back to the queue when the client disconnects), else on a private queue.
    pub async fn connect_with(
        amqp_url: &str,
        exchange: &str,
        reply_queue: Option<&str>,
    ) -> Result<Self, ClientError> {
        let topology = Topology::new(exchange).map_err(ClientError::BadExchange)?;
        let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let shared = reply_queue.is_some();
        let reply_queue = match reply_queue {
            Some(name) => {
                declared(&connection, name)
                    .await?
                    .ok_or_else(|| ClientError::NoReplyQueue(name.to_owned()))?;
                name.to_owned()
            }
            None => channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?
                .name()
                .as_str()
                .to_owned(),
        };
        let mut consumer = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: !shared,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let waiters: Waiters = Arc::default();
        let routes = Arc::clone(&waiters);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let routed = route(&routes, &delivery.data);
                if shared && routed {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            }
        });
        Ok(Self {
            connection,
            channel,
            topology,
            reply_queue,
            waiters,
        })
    }

    /// How many workers of the fleet consume now: the consumers of `<exchange>.place`, which
    /// every live host consumes ([`ClientError::NoExchange`] when no worker ever declared it).
    pub async fn workers_consuming(&self) -> Result<u32, ClientError> {
        let place = self.topology.place();
        let declared = declared(&self.connection, &place)
            .await?
            .ok_or_else(|| ClientError::NoExchange(self.topology.exchange().to_owned()))?;
        Ok(declared.consumer_count())
    }

    /// The fleet's names, derived from its exchange.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The queue this client's replies arrive on.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// Publishes `request` and awaits its final reply for at most `timeout`.
    pub async fn call(&self, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
        let body = serde_json::to_vec(request).expect("a request always serialises");
        self.call_raw(&body, Publish::default(), timeout).await
    }

    /// Publishes any body (valid or not) and awaits the final reply to its correlation id.
    /// `timeout` bounds the whole call, the broker's confirm of the publish included: a confirm
    /// that never comes ends the call with [`ClientError::Timeout`] instead of holding it.
    pub async fn call_raw(
        &self,
        body: &[u8],
        options: Publish,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let call = async { self.send(body, options).await?.wait(timeout).await };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// Publishes a body and returns once the broker has confirmed it, with a handle on its
    /// final reply. Publishing several with `send` and then waiting keeps their order.
    pub async fn send(&self, body: &[u8], options: Publish) -> Result<PendingReply, ClientError> {
        let correlation_id = options
            .correlation_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let (done, receiver) = oneshot::channel();
        let (progress, progress_rx) = if options.progress {
            let (tx, rx) = mpsc::channel(PROGRESS_BUFFER);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(correlation_id.clone(), Waiter { progress, done });
        let pending = PendingReply {
            correlation_id: correlation_id.clone(),
            receiver,
            progress: progress_rx,
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

    /// Publishes a request body to the fleet's exchange without waiting for its reply; returns
    /// once the broker has confirmed it.
    pub async fn publish(&self, body: &[u8], options: Publish) -> Result<(), ClientError> {
        let routing_key = options
            .routing_key
            .clone()
            .unwrap_or_else(|| routing_key_of(body));
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
        if options.progress {
            let mut headers = FieldTable::default();
            headers.insert(PROGRESS_HEADER.into(), AMQPValue::Boolean(true));
            properties = properties.with_headers(headers);
        }
        let exchange = self.topology.exchange();
        let confirmation = publish_routed(&self.channel, exchange, &routing_key, body, properties)
            .await
            .map_err(|e| match amqp_code(&e) {
                Some(NOT_FOUND) => ClientError::NoExchange(exchange.to_owned()),
                _ => ClientError::Broker(e),
            })?;
        if confirmation.is_nack() {
            return Err(ClientError::Nacked);
        }
        if confirmation.take_message().is_some() {
            // The exchange routes everything (its alternate exchange catches what no host
            // owns); a return means the fleet's queues were deleted under the workers.
            return Err(ClientError::NoExchange(exchange.to_owned()));
        }
        Ok(())
    }
}

/// The AMQP reply code of a publish to an exchange that does not exist.
const NOT_FOUND: u16 = 404;

fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// The routing key of a request body: [`schemas::routing_key`] when it is a valid request,
/// else its `container_name` field when that is a string, else empty (so that the worker that
/// takes it can refuse it).
pub fn routing_key_of(body: &[u8]) -> String {
    if let Ok(request) = serde_json::from_slice::<Request>(body) {
        return routing_key(&request).to_owned();
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("container_name")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Publishes `body` to `queue` through the default exchange as `mandatory` (the broker returns
/// it when the queue does not exist), and waits for the broker's confirm. `channel` must be in
/// confirm mode.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Confirmation, lapin::Error> {
    publish_routed(channel, "", queue, body, properties).await
}

/// Publishes `body` to `exchange` with `routing_key`, `mandatory`, and waits for the broker's
/// confirm. `channel` must be in confirm mode; an exchange that does not exist closes it.
pub async fn publish_routed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Confirmation, lapin::Error> {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?
        .await
}

/// How many consumers `queue` has now, `None` when it does not exist. A worker is ready once
/// its host queue has one.
pub async fn consumer_count(
    connection: &Connection,
    queue: &str,
) -> Result<Option<u32>, ClientError> {
    Ok(declared(connection, queue)
        .await?
        .map(|q| q.consumer_count()))
}

/// `queue` as the broker has it now (its message and consumer counts), or `None` when it does
/// not exist: a passive declaration, on a channel of its own because a failed one closes its
/// channel.
pub async fn declared(connection: &Connection, queue: &str) -> Result<Option<Queue>, ClientError> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(queue) => {
            let _ = channel.close(200, "probed".into()).await;
            Ok(Some(queue))
        }
        Err(_) => Ok(None),
    }
}

/// Hands an arriving envelope to the call awaiting its correlation id: a progress envelope to
/// its progress channel (dropped when the call did not ask for progress or is not keeping up),
/// the final reply to its one slot. Returns whether a waiting call took it.
fn route(waiters: &Waiters, body: &[u8]) -> bool {
    let Ok(reply) = serde_json::from_slice::<Reply>(body) else {
        return false;
    };
    let Some(id) = reply.correlation_id.clone() else {
        return false;
    };
    let mut waiters = waiters.lock().unwrap_or_else(|p| p.into_inner());
    if !reply.is_final {
        return match waiters.get(&id) {
            Some(waiter) => {
                if let Some(progress) = &waiter.progress {
                    let _ = progress.try_send(reply);
                }
                true
            }
            None => false,
        };
    }
    match waiters.remove(&id) {
        Some(waiter) => {
            let _ = waiter.done.send(Envelope {
                reply,
                body: body.to_vec(),
            });
            true
        }
        None => false,
    }
}

/// The replies of a published request, still to come.
pub struct PendingReply {
    correlation_id: String,
    receiver: oneshot::Receiver<Envelope>,
    progress: Option<mpsc::Receiver<Reply>>,
    waiters: Waiters,
}

impl PendingReply {
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// Waits at most `timeout` for the final reply.
    pub async fn wait(self, timeout: Duration) -> Result<Reply, ClientError> {
        self.wait_with_progress(timeout, |_| {})
            .await
            .map(|envelope| envelope.reply)
    }

    /// Waits at most `timeout` for the final reply, handing each progress envelope that comes
    /// before it to `on_progress`, in arrival order.
    pub async fn wait_with_progress(
        mut self,
        timeout: Duration,
        mut on_progress: impl FnMut(&Reply),
    ) -> Result<Envelope, ClientError> {
        let receive = async {
            if let Some(progress) = self.progress.as_mut() {
                loop {
                    tokio::select! {
                        // Progress first: envelopes routed before the final reply come first.
                        biased;
                        Some(event) = progress.recv() => on_progress(&event),
                        done = &mut self.receiver => return done.map_err(|_| ClientError::Closed),
                    }
                }
            }
            (&mut self.receiver).await.map_err(|_| ClientError::Closed)
        };
        match tokio::time::timeout(timeout, receive).await {
            Ok(result) => result,
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
