//! The inbox table: accepted write requests, deduplicated by idempotency key, until the
//! transaction that finishes one commits its change, its reply and the outbox rows together.

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::containers::apply_change;
use super::Change;
use super::{now_ms, ReplyTarget, Store, StoreResult};

/// A write request offered to the inbox.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The idempotency key: a later offer with the same key and the same digest is a
    /// duplicate; one with another digest is a different request reusing the key.
    pub key: String,
    /// The lane it runs in.
    pub lane: String,
    /// The request, as canonical JSON (the typed request serialised).
    pub body: String,
    /// [`request_digest`] of `body`.
    pub digest: String,
    /// When it must have run by (unix ms).
    pub deadline_ms: Option<i64>,
    /// Where its reply goes.
    pub target: ReplyTarget,
    /// A start placed again after the host placing it died: if its key is already known
    /// (same request), it adds no reply; the first copy answers (or answered) it.
    pub replaced: bool,
}

/// The result of offering a write request to the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// New: run it. `seq` orders it among all accepted requests.
    New { seq: i64 },
    /// Seen before and still unfinished: this delivery waits for the same reply.
    AlreadyQueued { seq: i64 },
    /// Seen before and finished: its stored reply was queued again for this delivery.
    AlreadyAnswered { seq: i64 },
    /// The key belongs to a different request (`seq`): nothing was run or recorded for this
    /// offer; its refusal was queued in the outbox.
    KeyReused { seq: i64 },
}

/// The digest that tells two requests apart: SHA-256 of the canonical body, in lower-case hex.
pub fn request_digest(body: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(body.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A request accepted but not finished, found at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedRequest {
    pub seq: i64,
    pub lane: String,
    pub body: String,
    pub attempts: u32,
    pub intent: Option<String>,
    pub received_ms: i64,
    pub deadline_ms: Option<i64>,
}

impl Store {
    /// [`Store::accept_all`] with one offer: how the tests put a request into the inbox.
    #[cfg(test)]
    pub async fn accept(
        &self,
        key: String,
        lane: String,
        body: String,
        deadline_ms: Option<i64>,
        target: ReplyTarget,
    ) -> StoreResult<Accepted> {
        let offer = Offer {
            key,
            lane,
            digest: request_digest(&body),
            body,
            deadline_ms,
            target,
            replaced: false,
        };
        let refusal = |offer: &Offer| format!("refused {}", offer.key);
        let mut accepted = self.accept_all(Arc::new(vec![offer]), refusal).await?;
        Ok(accepted.remove(0))
    }

    /// Offers write requests to the inbox in one transaction (a group commit), in order,
    /// deduplicating by idempotency key: a later offer with the key and the digest of an
    /// earlier one is its duplicate; one with the key and another digest is refused, with the
    /// reply `refusal` renders queued in the outbox. Returns one outcome per offer once they are
    /// committed, all together or none: only then may their deliveries be acknowledged.
    pub async fn accept_all<F>(
        &self,
        offers: Arc<Vec<Offer>>,
        refusal: F,
    ) -> StoreResult<Vec<Accepted>>
    where
        F: Fn(&Offer) -> String + Send + 'static,
    {
        self.writer
            .call(move |tx| {
                offers
                    .iter()
                    .map(|offer| accept_one(tx, offer, &refusal))
                    .collect::<StoreResult<Vec<_>>>()
            })
            .await
    }

    /// Marks a request as running and records the intent of its next side effect. Called before
    /// every step that changes the host, so recovery knows the step may have happened.
    pub async fn record_intent(&self, seq: i64, intent: &'static str) -> StoreResult<()> {
        self.writer
            .call(move |conn| {
                conn.prepare_cached(
                    "UPDATE requests SET state = 'running', intent = ?2 WHERE seq = ?1",
                )?
                .execute(params![seq, intent])?;
                Ok(())
            })
            .await
    }

    /// Counts one more attempt at running a request, and returns the count (1 on the first run;
    /// more means an earlier run was interrupted and its side effects may be on the host).
    pub async fn begin_attempt(&self, seq: i64) -> StoreResult<u32> {
        self.writer
            .call(move |conn| {
                let attempts = conn
                .prepare_cached(
                    "UPDATE requests SET state = 'running', attempts = attempts + 1 WHERE seq = ?1
                     RETURNING attempts",
                )?
                .query_row([seq], |row| row.get(0))?;
                Ok(attempts)
            })
            .await
    }

    /// Finishes a request in one transaction: applies `change`, stores `reply` for later
    /// duplicates, and queues one copy of it per waiter (with the waiter's correlation id).
    /// `reply_for` renders the reply for one correlation id.
    pub async fn finish<R>(&self, seq: i64, change: Change, reply_for: R) -> StoreResult<()>
    where
        R: Fn(Option<&str>) -> String + Send + 'static,
    {
        #[cfg(test)]
        self.injected_finish_fault(seq)?;
        self.writer
            .call(move |tx| {
                apply_change(tx, &change)?;
                let waiters = {
                    let mut stmt = tx.prepare_cached(
                        "SELECT reply_to, correlation_id FROM request_waiters WHERE seq = ?1",
                    )?;
                    let rows = stmt.query_map([seq], |row| {
                        Ok(ReplyTarget {
                            reply_to: row.get(0)?,
                            correlation_id: row.get(1)?,
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                let first_correlation = waiters.first().and_then(|w| w.correlation_id.clone());
                for waiter in &waiters {
                    insert_outbox(tx, waiter, &reply_for(waiter.correlation_id.as_deref()))?;
                }
                tx.prepare_cached("DELETE FROM request_waiters WHERE seq = ?1")?
                    .execute([seq])?;
                tx.prepare_cached(
                "UPDATE requests SET state = 'done', intent = NULL, finished_ms = ?2, reply = ?3
                 WHERE seq = ?1",
            )?
            .execute(params![
                seq,
                now_ms(),
                reply_for(first_correlation.as_deref())
            ])?;
                Ok(())
            })
            .await
    }

    /// Test-only: makes the next `times` [`Store::finish`] calls of request `seq` fail as a
    /// failed commit would, changing nothing.
    #[cfg(test)]
    pub fn fail_finish(&self, seq: i64, times: u32) {
        let mut faults = self.finish_faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.insert(seq, times);
    }

    #[cfg(test)]
    fn injected_finish_fault(&self, seq: i64) -> StoreResult<()> {
        let mut faults = self.finish_faults.lock().unwrap_or_else(|p| p.into_inner());
        match faults.get_mut(&seq) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Err(super::StoreError::Group(
                    "injected: the commit failed".into(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Requests accepted but not finished, in arrival order.
    pub async fn unfinished(&self) -> StoreResult<Vec<UnfinishedRequest>> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, lane, body, attempts, intent, received_ms, deadline_ms FROM requests
                 WHERE state != 'done' ORDER BY seq",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(UnfinishedRequest {
                    seq: row.get(0)?,
                    lane: row.get(1)?,
                    body: row.get(2)?,
                    attempts: row.get(3)?,
                    intent: row.get(4)?,
                    received_ms: row.get(5)?,
                    deadline_ms: row.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// When a request was accepted (for the reply's duration).
    pub async fn received_ms(&self, seq: i64) -> StoreResult<i64> {
        self.lookup(|conn| {
            Ok(conn
                .prepare_cached("SELECT received_ms FROM requests WHERE seq = ?1")?
                .query_row([seq], |r| r.get(0))?)
        })
    }

    /// Forgets finished requests, redelivery counts and set-aside replies older than `age_ms`:
    /// duplicates arriving later run again.
    pub async fn prune_finished(&self, age_ms: i64) -> StoreResult<usize> {
        self.writer
            .call(move |conn| {
                let cutoff = now_ms() - age_ms;
                conn.execute("DELETE FROM redeliveries WHERE updated_ms < ?1", [cutoff])?;
                conn.execute("DELETE FROM outbox WHERE set_aside_ms < ?1", [cutoff])?;
                Ok(conn.execute(
                    "DELETE FROM requests WHERE state = 'done' AND finished_ms < ?1",
                    [cutoff],
                )?)
            })
            .await
    }

    /// Counts one more redelivery of the message identified by `key`; returns the count.
    pub async fn count_redelivery(&self, key: String) -> StoreResult<u32> {
        self.writer
            .call(move |conn| {
                Ok(conn.query_row(
                    "INSERT INTO redeliveries (key, count, updated_ms) VALUES (?1, 1, ?2)
                 ON CONFLICT (key) DO UPDATE SET count = count + 1, updated_ms = ?2
                 RETURNING count",
                    params![key, now_ms()],
                    |row| row.get(0),
                )?)
            })
            .await
    }
}

/// The stored reply of a finished request, addressed to a later duplicate: the same reply with
/// the duplicate's own correlation id, which clients match replies by.
fn with_correlation_id(reply: &str, correlation_id: Option<&str>) -> StoreResult<String> {
    let mut reply: serde_json::Value = serde_json::from_str(reply)?;
    if let Some(object) = reply.as_object_mut() {
        object.insert("correlation_id".into(), correlation_id.into());
    }
    Ok(reply.to_string())
}

/// What the inbox holds under an idempotency key.
struct Seen {
    seq: i64,
    state: String,
    reply: Option<String>,
    digest: String,
}

fn seen(tx: &Connection, key: &str) -> StoreResult<Option<Seen>> {
    Ok(tx
        .prepare_cached(
            "SELECT seq, state, reply, digest, body FROM requests WHERE idempotency_key = ?1",
        )?
        .query_row([key], |row| {
            let digest: Option<String> = row.get(3)?;
            Ok(Seen {
                seq: row.get(0)?,
                state: row.get(1)?,
                reply: row.get(2)?,
                // Accepted before digests were stored: the body is the same canonical form.
                digest: match digest {
                    Some(digest) => digest,
                    None => request_digest(&row.get::<_, String>(4)?),
                },
            })
        })
        .optional()?)
}

fn accept_one(
    tx: &Connection,
    offer: &Offer,
    refusal: &dyn Fn(&Offer) -> String,
) -> StoreResult<Accepted> {
    Ok(match seen(tx, &offer.key)? {
        Some(Seen { seq, digest, .. }) if digest != offer.digest => {
            insert_outbox(tx, &offer.target, &refusal(offer))?;
            Accepted::KeyReused { seq }
        }
        Some(Seen { seq, state, .. }) if offer.replaced => {
            if state == "done" {
                Accepted::AlreadyAnswered { seq }
            } else {
                Accepted::AlreadyQueued { seq }
            }
        }
        Some(Seen {
            seq,
            state,
            reply: Some(reply),
            ..
        }) if state == "done" => {
            let reply = with_correlation_id(&reply, offer.target.correlation_id.as_deref())?;
            insert_outbox(tx, &offer.target, &reply)?;
            Accepted::AlreadyAnswered { seq }
        }
        Some(Seen { seq, .. }) => {
            insert_waiter(tx, seq, &offer.target)?;
            Accepted::AlreadyQueued { seq }
        }
        None => {
            tx.prepare_cached(
                "INSERT INTO requests
                 (idempotency_key, lane, body, state, received_ms, deadline_ms, digest)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
            )?
            .execute(params![
                offer.key,
                offer.lane,
                offer.body,
                now_ms(),
                offer.deadline_ms,
                offer.digest
            ])?;
            let seq = tx.last_insert_rowid();
            insert_waiter(tx, seq, &offer.target)?;
            Accepted::New { seq }
        }
    })
}

fn insert_waiter(tx: &Connection, seq: i64, target: &ReplyTarget) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO request_waiters (seq, reply_to, correlation_id) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![seq, target.reply_to, target.correlation_id])?;
    Ok(())
}

fn insert_outbox(tx: &Connection, target: &ReplyTarget, body: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO outbox (reply_to, correlation_id, body) VALUES (?1, ?2, ?3)")?
        .execute(params![target.reply_to, target.correlation_id, body])?;
    Ok(())
}
