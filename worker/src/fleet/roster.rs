//! The roster: the hosts of the fleet this host has heard of (their hellos, and the hosts other
//! hosts name in their gather answers), each with what it last said about itself. Kept in
//! memory and in the store, so that a restarted host still knows whom to expect in a gather and
//! whom to name when it is gone (RELIABILITY.md, "Fleet membership").

use std::collections::BTreeMap;
use std::sync::Mutex;

use schemas::fleet::HostStatus;

use crate::store::{now_ms, Store, StoreResult};

pub struct Roster {
    node: String,
    capacity: Option<u32>,
    others: Mutex<BTreeMap<String, HostStatus>>,
    store: Store,
}

impl Roster {
    /// The roster of host `node`, with the hosts its store remembers.
    pub async fn load(node: &str, capacity: Option<u32>, store: Store) -> StoreResult<Self> {
        let others = store
            .known_hosts()
            .await?
            .into_iter()
            .filter(|host| host.node != node)
            .map(|host| (host.node.clone(), host))
            .collect();
        Ok(Self {
            node: node.to_owned(),
            capacity,
            others: Mutex::new(others),
            store,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// What this host says about itself now.
    pub async fn own_status(&self) -> StoreResult<HostStatus> {
        let (held, running) = self.store.held_and_running().await?;
        Ok(HostStatus {
            node: self.node.clone(),
            capacity: self.capacity,
            running,
            held,
            at_ms: now_ms(),
        })
    }

    /// Takes in what a host said about itself (or what another host last heard from it): kept
    /// when it is newer than what this host knew. This host's own status is not kept. `true`
    /// when the host was not known before.
    pub async fn heard(&self, status: HostStatus) -> bool {
        if status.node == self.node {
            return false;
        }
        let (newer, new) = {
            let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
            match others.get(&status.node) {
                Some(known) if known.at_ms >= status.at_ms => (false, false),
                known => {
                    let new = known.is_none();
                    others.insert(status.node.clone(), status.clone());
                    (true, new)
                }
            }
        };
        if newer {
            let node = status.node.clone();
            if let Err(e) = self.store.remember_host(status).await {
                tracing::warn!(%node, error = %e, "could not record a host of the fleet; it is known until this worker stops");
            }
            if new {
                tracing::info!(%node, "heard of a new host of the fleet");
            }
        }
        new
    }

    /// Forgets a host (`orchestrator fleet forget`, or its queue found gone).
    pub async fn forget(&self, node: &str) {
        let known = self
            .others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node)
            .is_some();
        if let Err(e) = self.store.forget_host(node).await {
            tracing::warn!(%node, error = %e, "could not forget a host in the state database; it is forgotten until this worker stops");
        } else if known {
            tracing::info!(%node, "forgot a host of the fleet");
        }
    }

    /// The other hosts, by node id, as they last described themselves.
    pub fn others(&self) -> BTreeMap<String, HostStatus> {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: &str, held: u64, at_ms: i64) -> HostStatus {
        HostStatus {
            node: node.into(),
            capacity: Some(5),
            running: 0,
            held,
            at_ms,
        }
    }

    #[tokio::test]
    async fn a_restarted_host_still_knows_the_hosts_it_heard_of_and_keeps_the_newest_word() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let roster = Roster::load("a", None, store.clone()).await.unwrap();
        assert!(roster.heard(status("b", 3, 100)).await, "b is new");
        assert!(!roster.heard(status("b", 1, 50)).await); // older: ignored
        roster.heard(status("c", 0, 100)).await;
        roster.heard(status("a", 9, 100)).await; // itself: not kept
        roster.forget("c").await;

        let restarted = Roster::load("a", None, store).await.unwrap();
        let others = restarted.others();
        assert_eq!(others.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(others["b"].held, 3);
    }
}
