//! The outbox table: replies committed but not yet confirmed by the broker, and the ones the
//! broker refused, each retried on its own schedule and finally set aside.

use rusqlite::params;

use super::{now_ms, ReplyTarget, Store, StoreResult};

/// One reply waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub target: ReplyTarget,
    pub body: String,
    /// How often the broker refused (nacked) it so far.
    pub refusals: u32,
}

/// What becomes of a reply the broker refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    /// Publish it again once this time (unix ms) has come.
    At(i64),
    /// Stop trying: keep it, marked as set aside, for the deduplication window.
    SetAside,
}

impl NextAttempt {
    /// `(next_attempt_ms, set_aside_ms)` as stored.
    fn columns(self) -> (i64, Option<i64>) {
        match self {
            NextAttempt::At(at) => (at, None),
            NextAttempt::SetAside => (i64::MAX, Some(now_ms())),
        }
    }
}

impl Store {
    /// Replies due to be published now, oldest first: not set aside, and not waiting for a
    /// later attempt after a refusal.
    pub async fn outbox_batch(&self, limit: u32) -> StoreResult<Vec<OutboxRow>> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, reply_to, correlation_id, body, refusals FROM outbox
                 WHERE set_aside_ms IS NULL AND next_attempt_ms <= ?2 ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit, now_ms()], |row| {
                Ok(OutboxRow {
                    id: row.get(0)?,
                    target: ReplyTarget {
                        reply_to: row.get(1)?,
                        correlation_id: row.get(2)?,
                    },
                    body: row.get(3)?,
                    refusals: row.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// When the earliest refused reply is due again (unix ms), if any waits.
    pub async fn outbox_next_attempt(&self) -> StoreResult<Option<i64>> {
        self.with(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT min(next_attempt_ms) FROM outbox
                     WHERE set_aside_ms IS NULL AND refusals > 0",
                )?
                .query_row([], |row| row.get(0))?)
        })
        .await
    }

    /// Settles one round of publishing in one transaction: removes the replies the broker took
    /// (or returned: their queue is gone), and records each refusal with what comes next.
    pub async fn outbox_settle(
        &self,
        delivered: Vec<i64>,
        refused: Vec<(i64, NextAttempt)>,
    ) -> StoreResult<()> {
        self.writer
            .call(move |conn| {
                let mut remove = conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
                for id in delivered {
                    remove.execute([id])?;
                }
                let mut refuse = conn.prepare_cached(
                    "UPDATE outbox SET refusals = refusals + 1, next_attempt_ms = ?2,
                     set_aside_ms = ?3 WHERE id = ?1",
                )?;
                for (id, next) in refused {
                    let (at, set_aside) = next.columns();
                    refuse.execute(params![id, at, set_aside])?;
                }
                Ok(())
            })
            .await
    }

    /// Keeps a reply that was published outside the outbox (a read's, a refusal's) and refused
    /// once by the broker, so that the outbox retries it like its own.
    pub async fn outbox_keep_refused(
        &self,
        target: ReplyTarget,
        body: String,
        next: NextAttempt,
    ) -> StoreResult<()> {
        self.writer
            .call(move |conn| {
                let (at, set_aside) = next.columns();
                conn.prepare_cached(
                    "INSERT INTO outbox
                     (reply_to, correlation_id, body, refusals, next_attempt_ms, set_aside_ms)
                     VALUES (?1, ?2, ?3, 1, ?4, ?5)",
                )?
                .execute(params![
                    target.reply_to,
                    target.correlation_id,
                    body,
                    at,
                    set_aside
                ])?;
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(queue: &str) -> ReplyTarget {
        ReplyTarget {
            reply_to: queue.into(),
            correlation_id: Some("c".into()),
        }
    }

    #[tokio::test]
    async fn a_refused_reply_waits_for_its_next_attempt_and_a_set_aside_one_is_never_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.sqlite")).unwrap();
        let later = now_ms() + 60_000;
        store
            .outbox_keep_refused(target("full"), "a".into(), NextAttempt::At(later))
            .await
            .unwrap();
        store
            .outbox_keep_refused(target("gone"), "b".into(), NextAttempt::SetAside)
            .await
            .unwrap();
        store
            .outbox_keep_refused(target("full"), "c".into(), NextAttempt::At(0))
            .await
            .unwrap();

        let due = store.outbox_batch(10).await.unwrap();
        assert_eq!(
            due.iter().map(|r| r.body.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(due[0].refusals, 1);
        assert_eq!(store.outbox_next_attempt().await.unwrap(), Some(0));
        store
            .outbox_settle(vec![due[0].id], Vec::new())
            .await
            .unwrap();
        assert_eq!(store.outbox_next_attempt().await.unwrap(), Some(later));
        assert_eq!(
            store.depths().await.unwrap().1,
            1,
            "set aside is not waiting"
        );
        store.prune_finished(-1).await.unwrap();
        let left: i64 = store
            .with(|c| Ok(c.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(left, 1, "the set-aside reply is forgotten after the window");
    }
}
