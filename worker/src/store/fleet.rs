//! The fleet table: the other hosts this host has heard of, with what each last said about
//! itself, kept so that a restarted host still knows whom to expect (RELIABILITY.md, "Fleet
//! membership"); and the counts a host says about itself.

use rusqlite::params;
use schemas::fleet::HostStatus;

use super::{Store, StoreResult};

impl Store {
    /// Every host heard of, by node id, as it last described itself.
    pub async fn known_hosts(&self) -> StoreResult<Vec<HostStatus>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT status FROM fleet_hosts ORDER BY node")?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            let mut hosts = Vec::new();
            for status in rows {
                hosts.push(serde_json::from_str(&status?)?);
            }
            Ok(hosts)
        })
        .await
    }

    /// Remembers what a host said about itself (replacing what it said before).
    pub async fn remember_host(&self, status: HostStatus) -> StoreResult<()> {
        let text = serde_json::to_string(&status)?;
        self.writer
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO fleet_hosts (node, status, heard_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (node) DO UPDATE SET status = ?2, heard_ms = ?3",
                    params![status.node, text, status.at_ms],
                )?;
                Ok(())
            })
            .await
    }

    /// Forgets a host (`orchestrator fleet forget`); `true` when it was known.
    pub async fn forget_host(&self, node: &str) -> StoreResult<bool> {
        let node = node.to_owned();
        self.writer
            .call(move |conn| {
                Ok(conn.execute("DELETE FROM fleet_hosts WHERE node = ?1", [node])? > 0)
            })
            .await
    }

    /// How many containers this host holds, and how many of them run.
    pub async fn held_and_running(&self) -> StoreResult<(u64, u64)> {
        self.with(|conn| {
            let held: i64 =
                conn.query_row("SELECT n FROM container_count WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
            let running: i64 = conn.query_row(
                "SELECT COUNT(*) FROM containers WHERE active = 1",
                [],
                |r| r.get(0),
            )?;
            Ok((held.max(0) as u64, running.max(0) as u64))
        })
        .await
    }
}
