//! The SQLite store: containers, the inbox of accepted requests, and the outbox of replies.
//!
//! Every state change is one committed transaction: an operation's effect on the container
//! records, the request being marked done, its stored reply and the outbox rows that carry it to
//! every requester commit together or not at all. A crash therefore leaves either the old state
//! with the request still in the inbox (it is resumed at start-up) or the new state with its
//! reply waiting in the outbox. Calls run off the async threads: reads on the blocking pool,
//! writes on the writer thread, which commits the writes that arrive together at once
//! ([`writer`]). One file per table: [`containers`], [`inbox`], [`outbox`]; the schema in
//! [`migrations`]. Below the operations and the outbox; above the broker (only for its
//! backoff and the reply address).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

mod containers;
mod inbox;
mod migrations;
mod outbox;
mod retry;
mod writer;
pub use containers::{Change, ContainerRow, LeftoverRow};
pub use inbox::{request_digest, Accepted, Offer, UnfinishedRequest};
use migrations::migrate;
pub use outbox::{NextAttempt, OutboxRow};
pub use retry::until_written;
use writer::Writer;

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

pub use crate::broker::ReplyTarget;

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

    /// Records that a run is under way; returns whether the previous run did not end cleanly
    /// (its marker was still set).
    pub async fn mark_running(&self) -> StoreResult<bool> {
        self.writer
            .call(|conn| {
                let unclean = conn
                    .query_row("SELECT running FROM run_marker WHERE id = 1", [], |r| {
                        r.get::<_, i64>(0)
                    })
                    .optional()?
                    .is_some_and(|running| running != 0);
                conn.execute(
                    "INSERT INTO run_marker (id, running) VALUES (1, 1)
                     ON CONFLICT (id) DO UPDATE SET running = 1",
                    [],
                )?;
                Ok(unclean)
            })
            .await
    }

    /// Records that the run ended cleanly.
    pub async fn mark_stopped(&self) -> StoreResult<()> {
        self.writer
            .call(|conn| {
                conn.execute("UPDATE run_marker SET running = 0 WHERE id = 1", [])?;
                Ok(())
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
