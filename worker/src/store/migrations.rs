//! The schema: migrations applied in order at open, counted by `PRAGMA user_version`.

use rusqlite::Connection;

use super::StoreResult;

/// Schema migrations, applied in order; `PRAGMA user_version` counts the ones applied. Never
/// edit one that has shipped: add the next.
pub(super) const MIGRATIONS: &[&str] = &[
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
    r#"
    -- Whether a run of the worker is under way in this data directory: set at start-up,
    -- cleared at a clean shutdown. Found set at start-up, the previous run died, and the
    -- node's lease may still be held by its connection until the broker drops it.
    CREATE TABLE run_marker (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        running INTEGER NOT NULL
    );
"#,
];

pub(super) fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}
