//! The fleet's topology (DESIGN.md, "Fleet"), declared here and nowhere else: the exchanges,
//! the shared queues, this host's queue and its bindings to `<exchange>.nodes` and
//! `<exchange>.all`. Every name comes from [`schemas::Topology`]. Declaring is idempotent; a
//! queue that exists with other arguments (another `--queue-type`) is refused with what to do.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::{amqp_code, Broker, BrokerError};

/// The AMQP reply code of a declaration whose arguments differ from the existing queue's.
const PRECONDITION_FAILED: u16 = 406;

impl Broker {
    /// Declares every exchange and shared queue of the fleet, the default reply queue and the
    /// dead-letter queue: what every connection of the worker may publish to. This host's queue
    /// is not declared here but only by the consuming connection
    /// ([`Broker::declare_host_queue`]), after it has looked whether the queue still exists: a
    /// queue re-created by a publisher or by `--check` would hide that the host was forgotten.
    pub async fn declare_topology(&self, channel: &Channel) -> Result<(), BrokerError> {
        let t = &self.topology;
        let mut front = FieldTable::default();
        front.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(t.unrouted().into()),
        );
        self.declare_exchange(channel, t.exchange(), ExchangeKind::Direct, front)
            .await?;
        for (name, kind) in [
            (t.unrouted(), ExchangeKind::Fanout),
            (t.owners(), ExchangeKind::Direct),
            (t.nodes(), ExchangeKind::Direct),
            (t.all(), ExchangeKind::Fanout),
            (t.expired(), ExchangeKind::Fanout),
        ] {
            self.declare_exchange(channel, &name, kind, FieldTable::default())
                .await?;
        }
        for queue in [t.place(), t.place_start(), t.expired()] {
            self.declare_fleet_queue(channel, &queue).await?;
        }
        for (queue, exchange) in [(t.place(), t.unrouted()), (t.expired(), t.expired())] {
            self.bind(channel, &queue, &exchange, "", false).await?;
        }
        for queue in [&self.reply_queue, &self.dead_letter_queue] {
            self.declare_queue(channel, queue, FieldTable::default())
                .await?;
        }
        Ok(())
    }

    /// Declares this host's queue with its fixed bindings (to `<exchange>.nodes` with the node
    /// id, to `<exchange>.all`). The container names' bindings are not declared here: see
    /// `broker::fleet`.
    pub async fn declare_host_queue(&self, channel: &Channel) -> Result<(), BrokerError> {
        let t = &self.topology;
        let host = t.host_queue(&self.node);
        self.declare_fleet_queue(channel, &host).await?;
        for (exchange, key) in [(t.nodes(), self.node.as_str()), (t.all(), "")] {
            self.bind(channel, &host, &exchange, key, false).await?;
        }
        Ok(())
    }

    async fn declare_exchange(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(name.into(), kind, options, arguments)
            .await
            .map_err(|e| match amqp_code(&e) {
                Some(PRECONDITION_FAILED) => self.error_with(
                    format!(
                        "refused the exchange {name}, which exists with other settings (delete it, \
                         or choose another --exchange)"
                    ),
                    e,
                ),
                _ => self.error("refused an exchange declaration")(e),
            })
    }

    /// A durable queue of the fleet: `--queue-type`, and requests that expire in it are
    /// dead-lettered to `<exchange>.expired` (answered `504` by whichever host takes them).
    async fn declare_fleet_queue(&self, channel: &Channel, name: &str) -> Result<(), BrokerError> {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        if name != self.topology.expired() {
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.topology.expired().into()),
            );
        }
        self.declare_queue(channel, name, arguments).await
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(name.into(), options, arguments)
            .await
            .map(drop)
            .map_err(|e| match amqp_code(&e) {
                Some(PRECONDITION_FAILED) => self.error_with(
                    format!(
                        "refused the queue {name}, which exists with other arguments: it was \
                         probably declared with another --queue-type (this worker uses {}); \
                         give every worker of the fleet the same --queue-type, or delete the \
                         queue when it holds nothing",
                        self.queue_type.as_str()
                    ),
                    e,
                ),
                _ => self.error("refused a queue declaration")(e),
            })
    }

    /// Binds `queue` to `exchange` with `key`; with `nowait`, without waiting for the broker's
    /// answer (a refusal then closes the channel, which the next synchronous call reports).
    pub(super) async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
        nowait: bool,
    ) -> Result<(), BrokerError> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions { nowait },
                FieldTable::default(),
            )
            .await
            .map_err(self.error("refused a binding"))
    }
}
