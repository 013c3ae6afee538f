//! The fleet's names on the broker (DESIGN.md, "Fleet"), derived from one exchange name so that a
//! worker, the CLI, the producer library and the tests can never disagree about them. Nothing
//! here talks to a broker: `worker::broker` declares these, clients publish to them.

use std::fmt;

use crate::{ContainerName, Request};

/// The exchange clients publish every request to, unless configured otherwise.
pub const DEFAULT_EXCHANGE: &str = "apptainer";

/// The AMQP `type` of every message between workers (admin messages): a delivery whose type
/// starts with this is not a request, and a worker that does not know it acknowledges and
/// drops it.
pub const ADMIN_TYPE_PREFIX: &str = "orchestrator.";

/// The AMQP `type` of an ownership probe (published mandatory to `<exchange>.owners`): the host
/// that owns the name acknowledges and drops it.
pub const PROBE_TYPE: &str = "orchestrator.probe";

/// The header a request forwarded by placement carries (`true`).
pub const PLACED_HEADER: &str = "x-orchestrator-placed";

/// The header a request carries (`true`) when its placement was itself a redelivery (the host
/// placing it before died between forwarding and acknowledging): a host that already knows its
/// idempotency key acknowledges it without a second reply.
pub const REPLACED_HEADER: &str = "x-orchestrator-replaced";

/// The longest exchange name accepted: the longest derived name (`<exchange>.lock.<name>`, with
/// a 64-character container name) must stay within AMQP's 255-byte limit on names.
pub const MAX_EXCHANGE_LEN: usize = 255 - ".lock.".len() - ContainerName::MAX_LEN;

/// A node id (one worker per node id in the fleet): 1 to 64 characters of `[A-Za-z0-9_.-]`,
/// starting with a letter or a digit, the same rule as a container name, because it is part of
/// queue names and routing keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(node: &str) -> Result<Self, String> {
        ContainerName::parse(node)
            .map(|n| Self(n.as_str().to_owned()))
            .map_err(|_| {
                format!(
                    "the node id {node:?} is not valid: use 1 to {} characters of letters, digits, \
                     '_', '.' and '-', starting with a letter or a digit",
                    ContainerName::MAX_LEN
                )
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every name of one fleet, derived from its exchange (`--exchange`, default `apptainer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    exchange: String,
}

impl Topology {
    /// The fleet whose requests go to `exchange`; an empty or overlong name is refused with a
    /// sentence saying what to do.
    pub fn new(exchange: &str) -> Result<Self, String> {
        if exchange.is_empty() {
            return Err(format!(
                "the exchange's name is empty; give --exchange a name, or unset \
                 ORCHESTRATOR_EXCHANGE (the default is {DEFAULT_EXCHANGE})"
            ));
        }
        if exchange.len() > MAX_EXCHANGE_LEN || exchange.starts_with("amq.") {
            return Err(format!(
                "the exchange's name {exchange:?} cannot be used: it must be at most \
                 {MAX_EXCHANGE_LEN} bytes and must not start with \"amq.\" (reserved by RabbitMQ)"
            ));
        }
        Ok(Self {
            exchange: exchange.to_owned(),
        })
    }

    fn derived(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.exchange)
    }

    /// The front door (direct, durable): every request, routing key = [`routing_key`].
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The front door's alternate exchange (fanout): what no host has bound goes here.
    pub fn unrouted(&self) -> String {
        self.derived("unrouted")
    }

    /// Names nobody owns, consumed by every host: 404s, gathers, and starts to hand on.
    pub fn place(&self) -> String {
        self.derived("place")
    }

    /// The second stage of placement: starts of names nobody owns, consumed only by hosts
    /// with room.
    pub fn place_start(&self) -> String {
        self.derived("place.start")
    }

    /// Probing ownership (direct, no alternate exchange): a mandatory publish comes back when
    /// nobody owns the name.
    pub fn owners(&self) -> String {
        self.derived("owners")
    }

    /// Addressing one host by node id (direct).
    pub fn nodes(&self) -> String {
        self.derived("nodes")
    }

    /// Every host (fanout): gathering, membership.
    pub fn all(&self) -> String {
        self.derived("all")
    }

    /// Where requests that expired in a host's queue are dead-lettered (fanout), to the queue
    /// of the same name that every host consumes and answers `504 deadline_exceeded` from.
    pub fn expired(&self) -> String {
        self.derived("expired")
    }

    /// Deliveries that keep coming back unprocessed (the worker dies on them).
    pub fn dead_letters(&self) -> String {
        self.derived("dead")
    }

    /// One host's durable queue.
    pub fn host_queue(&self, node: &NodeId) -> String {
        self.derived(&format!("host.{node}"))
    }

    /// One host's lease: an exclusive queue that refuses a second worker with the same id.
    pub fn alive_queue(&self, node: &NodeId) -> String {
        self.derived(&format!("alive.{node}"))
    }

    /// A short lock on a name during placement and unbinding (an exclusive queue).
    pub fn lock_queue(&self, name: &ContainerName) -> String {
        self.derived(&format!("lock.{}", name.as_str()))
    }
}

/// The routing key a request is published with: its container's name, or empty for a request
/// that names none (`getallcont`).
pub fn routing_key(request: &Request) -> &str {
    request.container_name().map_or("", ContainerName::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_derives_from_the_exchange() {
        let t = Topology::new("apptainer").unwrap();
        let node = NodeId::parse("host-a").unwrap();
        let name = ContainerName::parse("nb1").unwrap();
        assert_eq!(t.exchange(), "apptainer");
        assert_eq!(t.unrouted(), "apptainer.unrouted");
        assert_eq!(t.place(), "apptainer.place");
        assert_eq!(t.place_start(), "apptainer.place.start");
        assert_eq!(t.owners(), "apptainer.owners");
        assert_eq!(t.nodes(), "apptainer.nodes");
        assert_eq!(t.all(), "apptainer.all");
        assert_eq!(t.expired(), "apptainer.expired");
        assert_eq!(t.dead_letters(), "apptainer.dead");
        assert_eq!(t.host_queue(&node), "apptainer.host.host-a");
        assert_eq!(t.alive_queue(&node), "apptainer.alive.host-a");
        assert_eq!(t.lock_queue(&name), "apptainer.lock.nb1");
    }

    #[test]
    fn the_longest_names_fit_amqp_and_bad_ones_are_refused() {
        let t = Topology::new(&"x".repeat(MAX_EXCHANGE_LEN)).unwrap();
        let name = ContainerName::parse(&"n".repeat(ContainerName::MAX_LEN)).unwrap();
        assert_eq!(t.lock_queue(&name).len(), 255);
        assert!(Topology::new(&"x".repeat(MAX_EXCHANGE_LEN + 1)).is_err());
        assert!(Topology::new("").unwrap_err().contains("--exchange"));
        assert!(Topology::new("amq.direct").is_err());
        assert!(NodeId::parse("host a").unwrap_err().contains("node id"));
        assert!(NodeId::parse("host-a.example.org").is_ok());
    }
}
