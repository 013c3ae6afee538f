//! The fleet's broker primitives, on the consuming connection: the node's lease, a name's lock,
//! probing who owns a name, binding and unbinding a name, and forwarding a request to a host.
//! The rules that use them (when to place, bind or unbind) live above: placement in
//! `intake::place`, ownership in `scheduler::ownership`; this module only talks to the broker.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use schemas::ContainerName;

use super::{amqp_code, redact_url, Broker, BrokerError};

/// The AMQP reply code of an exclusive queue held by another connection.
pub const RESOURCE_LOCKED: u16 = 405;

/// The longest a name's lock is waited for before placement gives up (and the delivery is
/// returned to the broker, to be placed again).
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// How many channels bind a host's names at a (re)connect.
const BIND_CHANNELS: usize = 8;

/// Whether a probe (or a forward) reached a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Some host's queue took it.
    Yes,
    /// Nobody owns the name: the broker returned it.
    Returned,
}

/// A name's lock: an exclusive queue on a channel of its own, in confirm mode, on which the
/// name is probed and a placed start forwarded: a channel with one publish in flight at a time,
/// so the broker's return of a probe can only be that probe's. Released by
/// [`NameLock::release`] (or by the connection's end).
pub struct NameLock {
    channel: Channel,
    queue: String,
}

impl NameLock {
    /// The lock's own channel, in confirm mode.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub async fn release(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.channel.close(200, "unlocked".into()).await;
    }
}

/// Why the lease could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("another worker holds the lease {queue} of node {node}")]
    Held { queue: String, node: String },
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Broker {
    /// Takes this node's lease on `connection`: the exclusive queue `<exchange>.alive.<node>`,
    /// held for as long as the connection lives.
    pub async fn claim_lease(&self, connection: &Connection) -> Result<(), LeaseError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(self.error("refused a channel"))?;
        let queue = self.topology.alive_queue(&self.node);
        match declare_exclusive(&channel, &queue).await {
            Ok(()) => Ok(()),
            Err(e) if amqp_code(&e) == Some(RESOURCE_LOCKED) => Err(LeaseError::Held {
                queue,
                node: self.node.to_string(),
            }),
            Err(e) => Err(self.error("refused the lease queue")(e).into()),
        }
    }

    /// Locks `name` for placement or unbinding: declares the exclusive queue
    /// `<exchange>.lock.<name>` on a fresh channel, retrying with a short backoff while another
    /// connection holds it.
    pub async fn lock_name(
        &self,
        connection: &Connection,
        name: &ContainerName,
    ) -> Result<NameLock, BrokerError> {
        let queue = self.topology.lock_queue(name);
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_millis(200))
            .with_jitter()
            .with_total_delay(Some(LOCK_WAIT))
            .without_max_times()
            .build();
        loop {
            let channel = connection
                .create_channel()
                .await
                .map_err(self.error("refused a channel"))?;
            match declare_exclusive(&channel, &queue).await {
                Ok(()) => {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .map_err(self.error("refused publisher confirms"))?;
                    return Ok(NameLock { channel, queue });
                }
                Err(e) if amqp_code(&e) == Some(RESOURCE_LOCKED) => match delays.next() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(self.error("kept the name's lock held too long")(e)),
                },
                Err(e) => return Err(self.error("refused a name's lock")(e)),
            }
        }
    }

    /// Publishes `body` to `<exchange>.owners` with the name as routing key, mandatory and
    /// confirmed: [`Routed::Yes`] when some host owns the name (the message is now in its
    /// queue), [`Routed::Returned`] when nobody does. Only under the name's lock, on its channel.
    pub async fn probe(
        &self,
        lock: &NameLock,
        name: &ContainerName,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, BrokerError> {
        let owners = self.topology.owners();
        self.publish_routed(lock.channel(), &owners, name.as_str(), body, properties)
            .await
    }

    /// Forwards a request to this host's own queue through `<exchange>.nodes`, persistent,
    /// mandatory and confirmed.
    pub async fn forward_to_self(
        &self,
        channel: &Channel,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, BrokerError> {
        let nodes = self.topology.nodes();
        self.publish_routed(channel, &nodes, self.node.as_str(), body, properties)
            .await
    }

    /// Publishes to an exchange, mandatory, and awaits the confirm.
    pub async fn publish_routed(
        &self,
        channel: &Channel,
        exchange: &str,
        key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, BrokerError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = channel
            .basic_publish(exchange.into(), key.into(), options, body, properties)
            .await
            .map_err(self.error("refused a publish"))?;
        let confirmation = confirm
            .await
            .map_err(self.error("did not confirm a publish"))?;
        if confirmation.is_nack() {
            return Err(BrokerError {
                url: redact_url(&self.url),
                doing: format!("refused (nacked) a publish to {exchange}"),
                source: None,
            });
        }
        Ok(match confirmation.take_message() {
            Some(_) => Routed::Returned,
            None => Routed::Yes,
        })
    }

    /// Binds `name` to this host's queue on the front exchange and on `<exchange>.owners`.
    pub async fn bind_name(&self, channel: &Channel, name: &str) -> Result<(), BrokerError> {
        self.bind_names(channel, [name]).await
    }

    /// Binds many names, pipelined (nowait), then one synchronous binding so that a refusal
    /// is reported here.
    pub async fn bind_names<'a>(
        &self,
        channel: &Channel,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), BrokerError> {
        let host = self.topology.host_queue(&self.node);
        let owners = self.topology.owners();
        let mut last = None;
        for name in names {
            if let Some(previous) = last.replace(name) {
                for exchange in [self.topology.exchange(), owners.as_str()] {
                    self.bind(channel, &host, exchange, previous, true).await?;
                }
            }
        }
        if let Some(name) = last {
            for exchange in [self.topology.exchange(), owners.as_str()] {
                self.bind(channel, &host, exchange, name, false).await?;
            }
        }
        Ok(())
    }

    /// [`Broker::bind_names`] over [`BIND_CHANNELS`] channels of `connection` at once, each
    /// with its share of the names: 100,000 names that are already bound (a reconnect) take
    /// seconds; names new to the broker are bound at the pace of its durable writes.
    pub async fn bind_all_names(
        &self,
        connection: &Connection,
        names: &[String],
    ) -> Result<(), BrokerError> {
        let share = names.len().div_ceil(BIND_CHANNELS).max(1);
        let mut binding = tokio::task::JoinSet::new();
        for part in names.chunks(share) {
            let channel = connection
                .create_channel()
                .await
                .map_err(self.error("refused a channel"))?;
            let (broker, part) = (self.clone(), part.to_vec());
            binding.spawn(async move {
                let bound = broker
                    .bind_names(&channel, part.iter().map(String::as_str))
                    .await;
                let _ = channel.close(200, "bound".into()).await;
                bound
            });
        }
        while let Some(joined) = binding.join_next().await {
            joined.expect("a binding task does not panic")?;
        }
        Ok(())
    }

    /// Removes `name`'s bindings to this host's queue.
    pub async fn unbind_name(&self, channel: &Channel, name: &str) -> Result<(), BrokerError> {
        let host = self.topology.host_queue(&self.node);
        for exchange in [self.topology.exchange(), &self.topology.owners()] {
            channel
                .queue_unbind(
                    host.as_str().into(),
                    exchange.into(),
                    name.into(),
                    FieldTable::default(),
                )
                .await
                .map_err(self.error("refused to remove a binding"))?;
        }
        Ok(())
    }
}

async fn declare_exclusive(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .map(drop)
}
