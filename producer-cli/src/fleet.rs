//! The fleet's administration from outside (`orchestrator fleet`): [`hosts`] asks one live host
//! (through `<exchange>.place`) for the table of every host known; [`forget`] answers the
//! requests waiting in a gone host's queue `503 unavailable` and deletes the queue, which frees
//! its names. Neither runs anything on a host.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use schemas::fleet::{is_admin, FleetHosts, Forget, ANNOUNCEMENT_TTL_MS, FORGET, HOSTS};
use schemas::{ErrorCode, NodeId, Op, Reply, ReplyError, Request, Topology};

use crate::publish_confirmed;

/// RabbitMQ's direct reply-to pseudo-queue: the answer comes back on the asking channel.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("could not reach the broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Client(#[from] crate::ClientError),
    #[error(
        "no host of the fleet {0} is running ({1} has no consumer): start a worker, then ask again"
    )]
    NoLiveHost(String, String),
    #[error("the fleet {0} does not exist ({1} is missing): is --exchange right, and has a worker ever run?")]
    NoFleet(String, String),
    #[error("no host answered within {}s; try again, or raise --timeout", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the answer could not be read: {0}")]
    Unreadable(String),
    #[error("host {node} is running: its lease {lease} is held, so it was not forgotten and nothing changed; stop its worker (or wait for the broker to drop its connection), then run `orchestrator fleet forget {node}` again")]
    Alive { node: String, lease: String },
    #[error("the broker refused the reply to a request waiting for host {0}; nothing more was done: run `orchestrator fleet forget {0}` again")]
    ReplyRefused(String),
}

/// Asks one live host for the table of every host known.
pub async fn hosts(
    amqp_url: &str,
    topology: &Topology,
    timeout: Duration,
) -> Result<FleetHosts, FleetError> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let place = topology.place();
    match crate::declared(&connection, &place).await? {
        None => return Err(FleetError::NoFleet(topology.exchange().into(), place)),
        Some(queue) if queue.consumer_count() == 0 => {
            return Err(FleetError::NoLiveHost(topology.exchange().into(), place))
        }
        Some(_) => {}
    }
    let channel = connection.create_channel().await?;
    let mut answers = channel
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
        .with_type(HOSTS.into())
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_correlation_id(correlation_id.as_str().into())
        .with_expiration(timeout.as_millis().max(1).to_string().into());
    channel
        .basic_publish(
            "".into(),
            place.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            properties,
        )
        .await?;
    let answer = async {
        while let Some(delivery) = answers.next().await {
            let delivery = delivery?;
            if delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str())
                == Some(correlation_id.as_str())
            {
                return serde_json::from_slice::<FleetHosts>(&delivery.data)
                    .map_err(|e| FleetError::Unreadable(e.to_string()));
            }
        }
        Err(FleetError::Unreadable("the channel closed".into()))
    };
    let table = tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| FleetError::Timeout(timeout))?;
    let _ = connection.close(200, "asked".into()).await;
    table
}

/// What `forget` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Requests answered `503 unavailable`, their replies confirmed.
    pub answered: u32,
    /// Of those, replies whose reply queue no longer exists (the broker returned them).
    pub undeliverable: u32,
    /// Admin messages (hellos, gathers) that waited in the queue, dropped.
    pub admin_dropped: u32,
    /// `false`: the host's queue did not exist (already forgotten, or never there).
    pub queue_deleted: bool,
    /// Requests that arrived between the drain and the deletion: deleted with the queue,
    /// unanswered (their requesters time out).
    pub dropped: u32,
}

/// Forgets host `node`: refused while its lease is held. Holds the lease itself meanwhile, so
/// that no worker with that node id starts during it; answers every request waiting in the
/// host's queue `503 unavailable` (to its `reply_to`, else to `default_reply_queue`) and drops
/// admin messages; deletes the queue once it is drained (which removes its bindings, so its
/// names can be started elsewhere), and tells every host to forget it.
pub async fn forget(
    amqp_url: &str,
    topology: &Topology,
    node: &NodeId,
    default_reply_queue: &str,
) -> Result<Forgotten, FleetError> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    take_lease(&connection, topology, node).await?;
    let queue = topology.host_queue(node);
    let mut forgotten = Forgotten::default();
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    if drain(&channel, &queue, node, default_reply_queue, &mut forgotten)
        .await?
        .is_some()
    {
        // Quorum queues refuse `if_empty` (and refuse it as a connection error), so the queue
        // is deleted as it is, right after the drain found it empty: what the deletion reports
        // is what arrived in between, dropped without a reply.
        let dropped = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        forgotten.dropped = dropped;
        forgotten.queue_deleted = true;
    }
    tell_every_host(&connection, topology, node).await?;
    let _ = connection.close(200, "forgotten".into()).await;
    Ok(forgotten)
}

/// Declares the host's lease (exclusive) on this connection: refused with 405 while the host's
/// worker holds it. Held until the connection closes.
async fn take_lease(
    connection: &Connection,
    topology: &Topology,
    node: &NodeId,
) -> Result<(), FleetError> {
    let lease = topology.alive_queue(node);
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            lease.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => Ok(()),
        Err(e) if refused_with(&e) == Some(405) => Err(FleetError::Alive {
            node: node.to_string(),
            lease,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Answers or drops every message in `queue` until it is empty; `None` when it does not exist.
async fn drain(
    channel: &Channel,
    queue: &str,
    node: &NodeId,
    default_reply_queue: &str,
    forgotten: &mut Forgotten,
) -> Result<Option<()>, FleetError> {
    loop {
        let message = match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
        {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(Some(())),
            Err(e) if refused_with(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let delivery = message.delivery;
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        if is_admin(kind) {
            delivery.ack(BasicAckOptions::default()).await?;
            forgotten.admin_dropped += 1;
            continue;
        }
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map_or(default_reply_queue, |q| q.as_str());
        let correlation_id = delivery.properties.correlation_id().as_ref();
        let reply = unavailable(node, &delivery.data, correlation_id.map(|c| c.as_str()));
        let body = serde_json::to_vec(&reply).expect("a reply serialises");
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let properties = match correlation_id {
            Some(id) => properties.with_correlation_id(id.clone()),
            None => properties,
        };
        let confirmation = publish_confirmed(channel, reply_to, &body, properties).await?;
        if confirmation.is_nack() {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            delivery.nack(requeue).await?;
            return Err(FleetError::ReplyRefused(node.to_string()));
        }
        if confirmation.take_message().is_some() {
            forgotten.undeliverable += 1;
        }
        delivery.ack(BasicAckOptions::default()).await?;
        forgotten.answered += 1;
    }
}

/// The `503 unavailable` of a request that waited for a forgotten host. `node` is the host it
/// waited for.
pub fn unavailable(node: &NodeId, body: &[u8], correlation_id: Option<&str>) -> Reply {
    let (op, name) = claimed(body);
    let about = name.as_deref().map_or_else(String::new, |name| {
        format!(", which holds container {name},")
    });
    let error = ReplyError {
        code: ErrorCode::Unavailable,
        message: format!(
            "host {node}{about} was forgotten (`orchestrator fleet forget`) before it ran this request, so it was not run; send the request again (a start of the name is then placed on another host)"
        ),
    };
    Reply::failure(node.as_str(), op, name, correlation_id, error, 0)
}

/// The operation and container a request body claims, as far as it can be read.
fn claimed(body: &[u8]) -> (Option<Op>, Option<String>) {
    if let Ok(request) = serde_json::from_slice::<Request>(body) {
        return (
            Some(request.op()),
            request.container_name().map(|n| n.to_string()),
        );
    }
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let op = value
        .get("op")
        .and_then(|op| serde_json::from_value(op.clone()).ok());
    let name = value
        .get("container_name")
        .and_then(|n| n.as_str())
        .map(str::to_owned);
    (op, name)
}

/// Tells every live host to drop `node` from what it knows (`orchestrator.forget`).
async fn tell_every_host(
    connection: &Connection,
    topology: &Topology,
    node: &NodeId,
) -> Result<(), FleetError> {
    let channel = connection.create_channel().await?;
    let body = serde_json::to_vec(&Forget {
        node: node.to_string(),
    })
    .expect("a forget serialises");
    let properties = BasicProperties::default()
        .with_type(FORGET.into())
        .with_content_type("application/json".into())
        .with_expiration(ANNOUNCEMENT_TTL_MS.to_string().into());
    channel
        .basic_publish(
            topology.all().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await?;
    Ok(())
}

/// The AMQP reply code a broker refusal carries.
fn refused_with(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_request_is_answered_503_naming_the_host_and_what_to_do() {
        let node = NodeId::parse("host-b").unwrap();
        let reply = unavailable(
            &node,
            br#"{"op":"stop","container_name":"nb1"}"#,
            Some("c-1"),
        );
        assert_eq!(reply.status, 503);
        assert_eq!(reply.op, Some(Op::Stop));
        assert_eq!(reply.container_name.as_deref(), Some("nb1"));
        assert_eq!(reply.correlation_id.as_deref(), Some("c-1"));
        let message = &reply.error.unwrap().message;
        assert!(message.contains("host-b, which holds container nb1, was forgotten"));
        assert!(message.contains("send the request again"));
        let garbled = unavailable(&node, b"not json", None);
        assert_eq!((garbled.op, garbled.container_name), (None, None));
    }
}
