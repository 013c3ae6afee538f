//! Leases and depths, asked of the broker: whether a host's worker runs (it holds the exclusive
//! queue `<exchange>.alive.<node>` on its consuming connection while it lives), and how many
//! messages wait in a host's queue. Each question is a passive declaration
//! ([`crate::broker::passive_declare`]).
//!
//! What RabbitMQ 3.10 answers to a passive declaration (checked on the broker, see the test):
//! an exclusive queue held by another connection is `405 RESOURCE_LOCKED`, a missing queue
//! `404 NOT_FOUND`; anything else is not an answer about the lease.

use lapin::Connection;

use crate::broker::{amqp_code, passive_declare, NOT_FOUND, RESOURCE_LOCKED};

/// What the broker says about a host's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Another connection holds it: the host's worker runs.
    Held,
    /// It does not exist: the host's worker is gone (or never ran).
    Gone,
    /// The broker could not be asked; the reason.
    Unknown(String),
}

/// Asks the broker whether `alive_queue` (a host's lease) is held by some connection.
pub async fn lease(connection: &Connection, alive_queue: &str) -> Lease {
    match ask(connection, alive_queue).await {
        // This connection could see it: it holds it itself (a host asking about itself).
        Ok(_) => Lease::Held,
        Err(Refusal::Code(RESOURCE_LOCKED)) => Lease::Held,
        Err(Refusal::Code(NOT_FOUND)) => Lease::Gone,
        Err(Refusal::Code(code)) => Lease::Unknown(format!("the broker answered {code}")),
        Err(Refusal::Failed(reason)) => Lease::Unknown(reason),
    }
}

/// How many messages are ready in `queue`; `None` when it does not exist. `Err` when the broker
/// could not be asked.
pub async fn depth(connection: &Connection, queue: &str) -> Result<Option<u32>, String> {
    match ask(connection, queue).await {
        Ok(count) => Ok(Some(count)),
        Err(Refusal::Code(NOT_FOUND)) => Ok(None),
        Err(Refusal::Code(code)) => Err(format!("the broker answered {code} about {queue}")),
        Err(Refusal::Failed(reason)) => Err(reason),
    }
}

enum Refusal {
    /// The broker refused with this AMQP reply code.
    Code(u16),
    /// The question could not be asked.
    Failed(String),
}

/// `queue`'s message count when it exists, else the broker's refusal.
async fn ask(connection: &Connection, queue: &str) -> Result<u32, Refusal> {
    match passive_declare(connection, queue).await {
        Ok(declared) => Ok(declared.message_count()),
        Err(e) => Err(match amqp_code(&e) {
            Some(code) => Refusal::Code(code),
            None => Refusal::Failed(format!("the broker could not be asked about {queue}: {e}")),
        }),
    }
}
