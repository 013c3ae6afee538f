//! The SQLite store: containers, the inbox of accepted requests, and the outbox of replies.
//!
//! Every state change is one committed transaction: an operation's effect on the container
//! records, the request being marked done, its stored reply and the outbox rows that carry it to
//! every requester commit together or not at all. A crash therefore leaves either the old state
//! with the request still in the inbox (it is resumed at start-up) or the new state with its
//! reply waiting in the outbox. Calls run off the async threads: reads on the blocking pool,
//! writes on the writer thread, which commits the writes that arrive together at once
//! ([`writer`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

mod outbox;
mod retry;
mod writer;
pub use outbox::{NextAttempt, OutboxRow};
pub use retry::until_written;
use writer::Writer;

/// Schema migrations, applied in order; `PRAGMA user_version` counts the ones applied. Never
/// edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE containers (
        name        TEXT PRIMARY KEY,
        image       TEXT NOT NULL,
        distributor TEXT NOT NULL,
        os          TEXT NOT NULL,
        version     TEXT NOT NULL,
        command     TEXT NOT NULL,          -- JSON array of the start script's lines
        environment TEXT NOT NULL,          -- JSON object
        volume_name TEXT,
        binds       TEXT NOT NULL,          -- JSON object, host directory -> container directory
        image_path  TEXT NOT NULL,
        active      INTEGER NOT NULL,
        ip          TEXT NOT NULL,
        updated_ms  INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Images left on disk by deleted containers, until deletecontdata.
    CREATE TABLE leftover_data (
        name       TEXT PRIMARY KEY,
        image      TEXT NOT NULL,
        image_path TEXT NOT NULL,
        deleted_ms INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- The inbox: one row per accepted write request, in arrival order (seq).
    CREATE TABLE requests (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL UNIQUE,
        lane            TEXT NOT NULL,
        body            TEXT NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        intent          TEXT,
        received_ms     INTEGER NOT NULL,
        finished_ms     INTEGER,
        reply           TEXT
    );
    CREATE INDEX requests_unfinished ON requests (state) WHERE state != 'done';
    CREATE INDEX requests_finished ON requests (finished_ms) WHERE state = 'done';

    -- Everyone waiting for a request's reply: the first delivery and any duplicates of it.
    CREATE TABLE request_waiters (
        seq            INTEGER NOT NULL REFERENCES requests (seq) ON DELETE CASCADE,
        reply_to       TEXT NOT NULL,
        correlation_id TEXT
    );
    CREATE INDEX request_waiters_seq ON request_waiters (seq);

    -- Replies committed but not yet confirmed by the broker.
    CREATE TABLE outbox (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        reply_to       TEXT NOT NULL,
        correlation_id TEXT,
        body           TEXT NOT NULL
    );
"#,
    r#"
    -- When a request must have run by (unix ms); past it, it is answered 504 and not run.
    ALTER TABLE requests ADD COLUMN deadline_ms INTEGER;

    -- How often a delivery came back redelivered, by message identity: a delivery that keeps
    -- coming back (the worker dies on it) is moved to the dead-letter queue.
    CREATE TABLE redeliveries (
        key        TEXT PRIMARY KEY,
        count      INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    ) WITHOUT ROWID;

    -- Written to check that the database accepts writes again after a failure.
    CREATE TABLE write_probe (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);
"#,
    r#"
    -- How many containers are registered, kept by triggers, so that a page of getallcont does
    -- not count the whole table. Containers are written with an upsert, never INSERT OR
    -- REPLACE, whose implicit delete would not fire the delete trigger.
    CREATE TABLE container_count (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        n  INTEGER NOT NULL
    );
    INSERT INTO container_count (id, n) SELECT 1, count(*) FROM containers;
    CREATE TRIGGER container_registered AFTER INSERT ON containers
    BEGIN
        UPDATE container_count SET n = n + 1 WHERE id = 1;
    END;
    CREATE TRIGGER container_unregistered AFTER DELETE ON containers
    BEGIN
        UPDATE container_count SET n = n - 1 WHERE id = 1;
    END;
"#,
    r#"
    -- Replies the broker refused (nacked, e.g. a full reply queue with x-overflow=reject-publish):
    -- each is retried on its own, at next_attempt_ms, and after the last attempt set aside
    -- (set_aside_ms), kept for the deduplication window, never published again.
    ALTER TABLE outbox ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN next_attempt_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN set_aside_ms INTEGER;
    CREATE INDEX outbox_set_aside ON outbox (set_aside_ms) WHERE set_aside_ms IS NOT NULL;
"#,
    r#"
    -- What the idempotency key was first used for: the SHA-256 of the request's canonical body
    -- (lower-case hex). A later offer with the key and another digest is a different request
    -- and is refused. Rows accepted before this column existed have none; their digest is
    -- computed from their stored body, which is the same canonical form.
    ALTER TABLE requests ADD COLUMN digest TEXT;
"#,
];

/// How many prepared statements a connection keeps (the store uses about twenty).
const STATEMENT_CACHE: usize = 64;

/// Errors of the store. All of them mean "the state could not be read or recorded"; callers
/// must not acknowledge work they could not record.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state database failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a stored value is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("the state database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The group transaction the call was committed in failed (or the writer is gone).
    #[error("the state database failed: {0}")]
    Group(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A registered container, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRow {
    pub name: String,
    pub image: String,
    pub distributor: String,
    pub os: String,
    pub version: String,
    pub command: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub volume_name: Option<String>,
    pub binds: BTreeMap<String, String>,
    pub image_path: String,
    pub active: bool,
    pub ip: String,
}

/// The image a deleted container left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftoverRow {
    pub name: String,
    pub image: String,
    pub image_path: String,
}

/// What an operation changes in the container records; applied in the transaction that
/// finishes its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// Insert or replace the container's record.
    Put(ContainerRow),
    /// Unregister the container and keep its image as leftover data.
    Unregister(LeftoverRow),
    /// Forget the leftover data of a name (its files are already gone).
    ForgetLeftover(String),
}

pub use crate::broker::ReplyTarget;

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

/// A handle on the database; cheap to clone. Reads run on the blocking pool over their own
/// connection; every write goes to the [`Writer`] thread, which commits the writes that arrive
/// together in one transaction.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// For point reads, run in place (see [`Store::lookup`]).
    lookups: Arc<Mutex<Connection>>,
    writer: Writer,
    /// Test-only faults: how many more times [`Store::finish`] fails, by request.
    #[cfg(test)]
    finish_faults: Arc<Mutex<std::collections::HashMap<i64, u32>>>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut writing = connect(path)?;
        migrate(&mut writing)?;
        let writer = Writer::start(writing).map_err(|e| {
            StoreError::Group(format!("could not start the store's writer thread: {e}"))
        })?;
        Ok(Self {
            conn: Arc::new(Mutex::new(connect(path)?)),
            lookups: Arc::new(Mutex::new(connect(path)?)),
            writer,
            #[cfg(test)]
            finish_faults: Arc::default(),
        })
    }

    /// Registers many containers in one transaction, blocking the calling thread: the bulk path
    /// that seeds a store before a worker opens it (`orchestrator-bench` seeds 100,000 containers
    /// this way). Rows are written exactly as a finished `start` writes them; an existing name is
    /// replaced. Returns how many rows were written.
    pub fn put_containers_blocking(
        &self,
        rows: impl IntoIterator<Item = ContainerRow>,
    ) -> StoreResult<usize> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        let mut written = 0;
        for row in rows {
            apply_change(&tx, &Change::Put(row))?;
            written += 1;
        }
        tx.commit()?;
        Ok(written)
    }

    /// Runs a point read (one row found by its key, microseconds from the page cache) in place,
    /// on a connection kept for them: handing it to another thread would cost more than the
    /// read. Anything that scans goes through [`Store::with`] instead.
    fn lookup<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let conn = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    /// Runs the read `f` with the reading connection on the blocking pool.
    async fn with<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn)
        })
        .await?
    }

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
                Err(StoreError::Group("injected: the commit failed".into()))
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

    /// How many requests are accepted but unfinished (the inbox), and how many replies wait to
    /// be published (the outbox).
    pub async fn depths(&self) -> StoreResult<(u64, u64)> {
        self.with(|conn| {
            let inbox: i64 = conn.query_row(
                "SELECT COUNT(*) FROM requests WHERE state != 'done'",
                [],
                |row| row.get(0),
            )?;
            let outbox: i64 = conn.query_row(
                "SELECT COUNT(*) FROM outbox WHERE set_aside_ms IS NULL",
                [],
                |row| row.get(0),
            )?;
            Ok((inbox as u64, outbox as u64))
        })
        .await
    }

    /// Writes and commits a row: succeeds only when the database accepts writes.
    pub async fn probe_writable(&self) -> StoreResult<()> {
        self.writer
            .call(|conn| {
                conn.execute(
                    "INSERT OR REPLACE INTO write_probe (id, at_ms) VALUES (1, ?1)",
                    [now_ms()],
                )?;
                Ok(())
            })
            .await
    }

    /// Records a container's state outside any request (the reconciler's findings).
    pub async fn put_container(&self, row: ContainerRow) -> StoreResult<()> {
        self.writer
            .call(move |conn| apply_change(conn, &Change::Put(row)))
            .await
    }

    /// Names of the containers recorded as running.
    pub async fn active_container_names(&self) -> StoreResult<Vec<String>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT name FROM containers WHERE active = 1")?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Whether a container of that name is registered.
    pub async fn is_registered(&self, name: &str) -> StoreResult<bool> {
        self.lookup(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM containers WHERE name = ?1")?
                .query_row([name], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    pub async fn container(&self, name: &str) -> StoreResult<Option<ContainerRow>> {
        self.lookup(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {CONTAINER_COLUMNS} FROM containers WHERE name = ?1"
            ))?
            .query_row([name], container_from_row)
            .optional()?
            .transpose()
        })
    }

    /// One page of containers by name (pages count from 1), and the total count.
    pub async fn containers_page(
        &self,
        page: u32,
        page_size: u32,
    ) -> StoreResult<(Vec<ContainerRow>, u64)> {
        self.with(move |conn| {
            let offset = i64::from(page.saturating_sub(1)) * i64::from(page_size);
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CONTAINER_COLUMNS} FROM containers ORDER BY name LIMIT ?1 OFFSET ?2"
            ))?;
            let rows = stmt
                .query_map(params![page_size, offset], container_from_row)?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?;
            let total: i64 = conn
                .prepare_cached("SELECT n FROM container_count WHERE id = 1")?
                .query_row([], |r| r.get(0))?;
            Ok((rows, total as u64))
        })
        .await
    }

    pub async fn leftover(&self, name: &str) -> StoreResult<Option<LeftoverRow>> {
        self.lookup(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT name, image, image_path FROM leftover_data WHERE name = ?1",
                )?
                .query_row([name], leftover_from_row)
                .optional()?)
        })
    }

    /// At most `limit` leftovers by name, from the `offset`-th on, and how many there are.
    pub async fn leftovers_page(
        &self,
        offset: u64,
        limit: u32,
    ) -> StoreResult<(Vec<LeftoverRow>, u64)> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, image, image_path FROM leftover_data ORDER BY name
                 LIMIT ?1 OFFSET ?2",
            )?;
            let offset = i64::try_from(offset).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map(params![limit, offset], leftover_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            let total: i64 = conn
                .prepare_cached("SELECT count(*) FROM leftover_data")?
                .query_row([], |r| r.get(0))?;
            Ok((rows, total as u64))
        })
        .await
    }
}

/// Opens a connection with the store's settings.
fn connect(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode: a commit survives a crash of the process; only a power loss can
    // lose the last transactions, never corrupt the database.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Room for every statement the store prepares, so none is compiled twice.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

const CONTAINER_COLUMNS: &str = "name, image, distributor, os, version, command, environment, \
     volume_name, binds, image_path, active, ip";

/// Reads a container row; JSON columns are decoded after the SQLite read, hence the nested result.
fn container_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoreResult<ContainerRow>> {
    let command: String = row.get(5)?;
    let environment: String = row.get(6)?;
    let binds: String = row.get(8)?;
    let (name, image, distributor, os, version) = (
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    );
    let (volume_name, image_path, active, ip) =
        (row.get(7)?, row.get(9)?, row.get(10)?, row.get(11)?);
    Ok((|| {
        Ok(ContainerRow {
            name,
            image,
            distributor,
            os,
            version,
            command: serde_json::from_str(&command)?,
            environment: serde_json::from_str(&environment)?,
            volume_name,
            binds: serde_json::from_str(&binds)?,
            image_path,
            active,
            ip,
        })
    })())
}

fn leftover_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LeftoverRow> {
    Ok(LeftoverRow {
        name: row.get(0)?,
        image: row.get(1)?,
        image_path: row.get(2)?,
    })
}

fn apply_change(tx: &Connection, change: &Change) -> StoreResult<()> {
    match change {
        Change::Nothing => {}
        Change::Put(c) => {
            tx.prepare_cached(
                "INSERT INTO containers
                 (name, image, distributor, os, version, command, environment, volume_name, binds,
                  image_path, active, ip, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (name) DO UPDATE SET
                  image = excluded.image, distributor = excluded.distributor, os = excluded.os,
                  version = excluded.version, command = excluded.command,
                  environment = excluded.environment, volume_name = excluded.volume_name,
                  binds = excluded.binds, image_path = excluded.image_path,
                  active = excluded.active, ip = excluded.ip, updated_ms = excluded.updated_ms",
            )?
            .execute(params![
                c.name,
                c.image,
                c.distributor,
                c.os,
                c.version,
                serde_json::to_string(&c.command)?,
                serde_json::to_string(&c.environment)?,
                c.volume_name,
                serde_json::to_string(&c.binds)?,
                c.image_path,
                c.active,
                c.ip,
                now_ms()
            ])?;
        }
        Change::Unregister(left) => {
            tx.execute("DELETE FROM containers WHERE name = ?1", [&left.name])?;
            tx.execute(
                "INSERT OR REPLACE INTO leftover_data (name, image, image_path, deleted_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![left.name, left.image, left.image_path, now_ms()],
            )?;
        }
        Change::ForgetLeftover(name) => {
            tx.execute("DELETE FROM leftover_data WHERE name = ?1", [name])?;
        }
    }
    Ok(())
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(correlation: &str) -> ReplyTarget {
        ReplyTarget {
            reply_to: "replies".into(),
            correlation_id: Some(correlation.into()),
        }
    }

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.sqlite")).unwrap();
        (dir, store)
    }

    /// Offers request `body` under `key` in lane nb1, replies to correlation id `correlation`.
    async fn offer(store: &Store, key: &str, body: &str, correlation: &str) -> Accepted {
        store
            .accept(
                key.into(),
                "nb1".into(),
                body.into(),
                None,
                target(correlation),
            )
            .await
            .unwrap()
    }

    async fn outbox_bodies(store: &Store) -> Vec<String> {
        let rows = store.outbox_batch(10).await.unwrap();
        rows.into_iter().map(|row| row.body).collect()
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_the_same_reply_and_a_late_one_gets_it_again() {
        let (_dir, store) = open().await;
        let first = offer(&store, "k", "{}", "c1").await;
        let Accepted::New { seq } = first else {
            panic!("first delivery must be new, got {first:?}")
        };
        let second = offer(&store, "k", "{}", "c2").await;
        assert_eq!(second, Accepted::AlreadyQueued { seq });

        store
            .finish(seq, Change::Nothing, |c| {
                serde_json::json!({ "correlation_id": c, "status": 201 }).to_string()
            })
            .await
            .unwrap();
        let third = offer(&store, "k", "{}", "c3").await;
        assert_eq!(third, Accepted::AlreadyAnswered { seq });

        let bodies = outbox_bodies(&store).await;
        let reply = |c: &str| serde_json::json!({ "correlation_id": c, "status": 201 }).to_string();
        assert_eq!(bodies, [reply("c1"), reply("c2"), reply("c3")]);
        assert!(store.unfinished().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_key_reused_for_another_request_is_refused_even_on_rows_without_a_digest() {
        let (_dir, store) = open().await;
        let Accepted::New { seq } = offer(&store, "k", "start", "c1").await else {
            panic!("first offer is new")
        };
        // A row accepted before digests were stored.
        store
            .writer
            .call(|conn| Ok(conn.execute("UPDATE requests SET digest = NULL", [])?))
            .await
            .unwrap();

        let reused = offer(&store, "k", "stop", "c2").await;
        let repeated = offer(&store, "k", "start", "c3").await;

        assert_eq!(reused, Accepted::KeyReused { seq });
        assert_eq!(repeated, Accepted::AlreadyQueued { seq });
        let unfinished = store.unfinished().await.unwrap();
        assert_eq!(unfinished.len(), 1, "the reused key added no request");
        let bodies = outbox_bodies(&store).await;
        assert_eq!(bodies, ["refused k"]);
    }

    fn stopped(name: &str) -> ContainerRow {
        ContainerRow {
            name: name.into(),
            image: "jupyter/base-notebook".into(),
            distributor: "docker".into(),
            os: "jupyter/base-notebook".into(),
            version: "latest".into(),
            command: vec!["jupyter lab".into()],
            environment: BTreeMap::new(),
            volume_name: None,
            binds: BTreeMap::new(),
            image_path: format!("/images/{name}"),
            active: false,
            ip: String::new(),
        }
    }

    #[tokio::test]
    async fn bulk_seeded_containers_read_back_like_started_ones() {
        let (_dir, store) = open().await;
        let rows: Vec<ContainerRow> = (0..1000).map(|i| stopped(&format!("nb{i}"))).collect();
        assert_eq!(store.put_containers_blocking(rows).unwrap(), 1000);

        assert_eq!(
            store.container("nb999").await.unwrap(),
            Some(stopped("nb999"))
        );
        let (page, total) = store.containers_page(1, 2).await.unwrap();
        assert_eq!(total, 1000);
        assert_eq!(page, [stopped("nb0"), stopped("nb1")]);
    }

    #[tokio::test]
    async fn the_total_of_a_page_follows_registrations_updates_and_deletions() {
        let (dir, store) = open().await;
        store
            .put_containers_blocking([stopped("a"), stopped("b")])
            .unwrap();
        let mut running = stopped("a");
        running.active = true;
        store.put_container(running.clone()).await.unwrap();
        store
            .finish(
                0,
                Change::Unregister(LeftoverRow {
                    name: "b".into(),
                    image: "jupyter/base-notebook".into(),
                    image_path: "/images/b".into(),
                }),
                |_| "r".into(),
            )
            .await
            .unwrap();

        let (page, total) = store.containers_page(1, 10).await.unwrap();
        assert_eq!((page, total), (vec![running], 1));
        // The count is stored, not cached: a store opened again agrees.
        drop(store);
        let again = Store::open(&dir.path().join("state.sqlite")).unwrap();
        assert_eq!(again.containers_page(1, 10).await.unwrap().1, 1);
    }

    #[tokio::test]
    async fn unfinished_requests_come_back_in_arrival_order_with_their_attempts() {
        let (_dir, store) = open().await;
        for key in ["a", "b", "c"] {
            store
                .accept(key.into(), "nb1".into(), key.into(), None, target(key))
                .await
                .unwrap();
        }
        assert_eq!(store.begin_attempt(2).await.unwrap(), 1);
        store.record_intent(2, "starting_instance").await.unwrap();
        store
            .finish(1, Change::Nothing, |_| "r".into())
            .await
            .unwrap();

        let unfinished = store.unfinished().await.unwrap();
        let summary: Vec<_> = unfinished
            .iter()
            .map(|r| (r.body.as_str(), r.attempts, r.intent.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [("b", 1, Some("starting_instance")), ("c", 0, None)]
        );
    }
}
