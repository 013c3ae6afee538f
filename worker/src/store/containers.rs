//! The containers table (and the leftovers of deleted containers): the records the operations
//! read and, through a [`Change`] committed with the request's reply, write.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, Store, StoreResult};

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

impl Store {
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

    /// The names this host holds: every registered container, and every deleted one whose
    /// data is still on disk (a name stays reserved while its data exists). These are the
    /// names bound to this host's queue.
    pub async fn held_names(&self) -> StoreResult<Vec<String>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name FROM containers UNION SELECT name FROM leftover_data",
            )?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Whether this host holds `name`: a registered container, or a deleted one's data.
    pub async fn holds(&self, name: &str) -> StoreResult<bool> {
        self.lookup(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT 1 FROM containers WHERE name = ?1
                     UNION ALL SELECT 1 FROM leftover_data WHERE name = ?1",
                )?
                .query_row([name], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }

    /// How many containers are recorded as running.
    pub async fn running_count(&self) -> StoreResult<u64> {
        self.lookup(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM containers WHERE active = 1")?
                .query_row([], |r| r.get(0))?;
            Ok(n as u64)
        })
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

pub(super) fn apply_change(tx: &Connection, change: &Change) -> StoreResult<()> {
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
