//! The fleet's admin messages (RELIABILITY.md, "Fleet membership"): what hosts tell each other on
//! `<exchange>.all`, and what `orchestrator fleet` asks of them. They travel beside requests and
//! are told apart by their AMQP `type` property, which starts with [`ADMIN_TYPE_PREFIX`]. They
//! are between the worker and its own command line, not part of the client protocol: no JSON
//! Schema is published for them, and readers ignore fields they do not know, as with replies.

use serde::{Deserialize, Serialize};

use crate::{ContainerPage, ADMIN_TYPE_PREFIX};

/// A host announces itself ([`HostStatus`]) on `<exchange>.all`: at every (re)connect and
/// every [`HELLO_EVERY_SECS`] seconds (sooner when its counts change), with a TTL of
/// [`ANNOUNCEMENT_TTL_MS`].
pub const HELLO: &str = "orchestrator.hello";

/// A host asks every host for its containers ([`GatherAsk`]); each answers a [`GatherAnswer`]
/// to the message's `reply_to`.
pub const GATHER: &str = "orchestrator.gather";

/// `orchestrator fleet hosts` asks one host (through `<exchange>.place`) for the fleet's hosts;
/// the answer is a [`FleetHosts`].
pub const HOSTS: &str = "orchestrator.hosts";

/// `orchestrator fleet forget` tells every host that a node is gone for good ([`Forget`]).
pub const FORGET: &str = "orchestrator.forget";

/// How often a host says hello at least, in seconds.
pub const HELLO_EVERY_SECS: u64 = 30;

/// The TTL of a message to every host that expects no answer (hello, forget), in
/// milliseconds: a live host takes it at once, and in the queue of a host that is gone it must
/// not wait long, because a request with a deadline behind it expires only once it reaches the
/// head of that queue.
pub const ANNOUNCEMENT_TTL_MS: u64 = 2_000;

/// Whether a message's AMQP `type` marks it as an admin message rather than a request.
pub fn is_admin(kind: Option<&str>) -> bool {
    kind.is_some_and(|kind| kind.starts_with(ADMIN_TYPE_PREFIX))
}

/// What a host says about itself: in its hello, and at the head of its gather answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub node: String,
    /// `--max-containers`: running instances it takes; `None` is unlimited.
    pub capacity: Option<u32>,
    /// Containers recorded as running.
    pub running: u64,
    /// Containers it holds (registered, running or not).
    pub held: u64,
    /// When this was true, in milliseconds since the Unix epoch (the sender's clock).
    pub at_ms: i64,
}

/// A gather's question: each host sends the first `limit` records of its `getallcont` list
/// (its containers by name, then its data by name), which is all that a page of the merged
/// list ending at record `limit` can take from it, with its totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatherAsk {
    pub limit: u32,
}

/// One host's answer to a gather.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatherAnswer {
    pub host: HostStatus,
    /// The other hosts it knows of, with what they last said: so that the asker learns of
    /// hosts it has not heard from itself.
    #[serde(default)]
    pub known: Vec<HostStatus>,
    /// Page 1 of its own list with `page_size` = the asked `limit`, each record with its
    /// `node`.
    pub page: ContainerPage,
}

/// One host as `orchestrator fleet hosts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub node: String,
    /// Its lease (`<exchange>.alive.<node>`) is held: its worker runs.
    pub alive: bool,
    /// `--max-containers`; `None` is unlimited (or never heard).
    pub capacity: Option<u32>,
    /// Containers running, as of `at_ms`.
    pub running: u64,
    /// Containers held, as of `at_ms`.
    pub held: u64,
    /// Messages waiting in its host queue; `None` when the queue does not exist (forgotten).
    pub queue_depth: Option<u32>,
    /// When the counts were true: now for a host that answered, its last hello otherwise.
    pub at_ms: i64,
    /// Whether the counts come from the host itself just now (`false`: its last hello).
    pub answered: bool,
}

/// The answer to `orchestrator fleet hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHosts {
    /// Every host known, by node id.
    pub hosts: Vec<HostView>,
    /// Hosts that hold their lease but did not answer in time, and the like.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The host that gathered the table.
    pub node: String,
}

/// The body of [`FORGET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forget {
    pub node: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_messages_are_told_apart_by_their_type() {
        assert!(is_admin(Some(GATHER)));
        assert!(is_admin(Some("orchestrator.probe")));
        assert!(!is_admin(Some("start")));
        assert!(!is_admin(None));
    }
}
