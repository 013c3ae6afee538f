//! This host's part of the fleet, as the lanes see it: [`Ownership`], the one place that keeps
//! the name bindings true to the store (a name is bound to this host's queue exactly while the
//! store holds it: a registered container, or a deleted one's data), and [`Room`], the one place
//! that says whether this host may take another `start` (`--max-containers`).
//!
//! The rules, each in one place: names are bound by placement (`intake::place`) and, at every
//! (re)connect, all at once (`intake::consume`); they are unbound here, under the name's lock,
//! when a request leaves the store without the name (a stray request's 404, a failed start
//! that left nothing, `deletecontdata` of the last data) before its reply is sent; a `start`
//! about to run here for a name this host unbound since is bound again first, unless another
//! host owns it by then (it is refused 409).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use schemas::{ContainerName, ErrorCode};
use tokio::sync::Notify;

use crate::broker::{Broker, Routed};
use crate::rules::Refusal;
use crate::store::{Change, Store};

/// Keeps this host's name bindings true to its store.
pub struct Ownership {
    broker: Broker,
    session: Mutex<Option<(Arc<Connection>, Channel)>>,
    /// Names this process unbound: a start that runs here for one of them binds it again.
    released: Mutex<HashSet<String>>,
}

impl Ownership {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            session: Mutex::default(),
            released: Mutex::default(),
        }
    }

    /// The consuming connection and a confirm-mode channel on it, after every (re)connect.
    pub fn connected(&self, connection: Arc<Connection>, channel: Channel) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some((connection, channel));
    }

    /// Placement bound `name` to this host.
    pub fn bound(&self, name: &str) {
        self.released_names().remove(name);
    }

    fn released_names(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.released.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn session(&self) -> Option<(Arc<Connection>, Channel)> {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Before a `start` of `name` runs here: nothing to do unless this host unbound the name
    /// since it was routed here; then, under the name's lock, bind it again, or refuse (409)
    /// when another host owns it by now.
    pub async fn claim(&self, name: &ContainerName) -> Result<(), Refusal> {
        if !self.released_names().contains(name.as_str()) {
            return Ok(());
        }
        let Some((connection, channel)) = self.session() else {
            return Ok(());
        };
        let claimed = async {
            let lock = self.broker.lock_name(&connection, name).await?;
            let probe = BasicProperties::default().with_type(schemas::PROBE_TYPE.into());
            let routed = self.broker.probe(&lock, name, b"{}", probe).await;
            let outcome = match routed {
                Ok(Routed::Returned) => self
                    .broker
                    .bind_name(&channel, name.as_str())
                    .await
                    .map(|()| true),
                Ok(Routed::Yes) => Ok(false),
                Err(e) => Err(e),
            };
            lock.release().await;
            outcome
        };
        match claimed.await {
            Ok(true) => {
                self.released_names().remove(name.as_str());
                Ok(())
            }
            Ok(false) => Err(Refusal::new(
                ErrorCode::Conflict,
                format!("container {name} was taken by another host of the fleet meanwhile; send requests for it to the exchange, not to this host"),
            )),
            Err(e) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("could not bind container {name} to this host ({e}); send the start again"),
            )),
        }
    }

    /// After a request for `name` ran here: when the store no longer holds the name (`change`
    /// is what the request is about to commit), unbind it under its lock. Failures are logged:
    /// a binding left behind only routes the next request here, which is answered 404 and
    /// unbinds it then.
    pub async fn settle(&self, store: &Store, name: &ContainerName, change: &Change) {
        let held = match change {
            Change::Put(_) | Change::Unregister(_) => true,
            Change::ForgetLeftover(_) => false,
            Change::Nothing => store.holds(name.as_str()).await.unwrap_or(true),
        };
        if held || self.released_names().contains(name.as_str()) {
            return;
        }
        let Some((connection, channel)) = self.session() else {
            return;
        };
        let released = async {
            let lock = self.broker.lock_name(&connection, name).await?;
            let unbound = self.broker.unbind_name(&channel, name.as_str()).await;
            lock.release().await;
            unbound
        };
        match released.await {
            Ok(()) => {
                tracing::info!(container = %name, "this host no longer holds the name; unbound it");
                self.released_names().insert(name.to_string());
            }
            Err(e) => {
                tracing::warn!(container = %name, error = %e, "could not unbind a name this host no longer holds")
            }
        }
    }
}

/// How often room is looked at again even when nothing here announced a change (the
/// reconciler may record an instance as stopped).
const ROOM_RECHECK: Duration = Duration::from_secs(1);

/// Whether this host may take another `start` (`--max-containers`): running containers plus
/// starts placed here and not yet finished, against the limit.
pub struct Room {
    max: Option<u32>,
    /// Names whose start was placed here and has not finished yet.
    placing: Mutex<HashSet<String>>,
    changed: Notify,
}

impl Room {
    pub fn new(max: Option<u32>) -> Self {
        Self {
            max,
            placing: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn placing(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.placing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether one more start fits. A store that cannot be read counts as full.
    pub async fn has_room(&self, store: &Store) -> bool {
        let Some(max) = self.max else {
            return true;
        };
        let placing = self.placing().len() as u64;
        match store.running_count().await {
            Ok(running) => running + placing < u64::from(max),
            Err(e) => {
                tracing::warn!(error = %e, "could not count the running containers; taking no start");
                false
            }
        }
    }

    /// A start of `name` was placed here.
    pub fn placed(&self, name: &str) {
        self.placing().insert(name.to_owned());
    }

    /// A request of `name` finished (a start, or anything that may stop or delete a
    /// container): the room may have changed.
    pub fn finished(&self, name: &str, was_start: bool) {
        if was_start {
            self.placing().remove(name);
        }
        self.changed.notify_waiters();
    }

    /// Waits until there is room, looking again at every change and every [`ROOM_RECHECK`].
    pub async fn wait_for_room(&self, store: &Store) {
        loop {
            let changed = self.changed.notified();
            if self.has_room(store).await {
                return;
            }
            let _ = tokio::time::timeout(ROOM_RECHECK, changed).await;
        }
    }
}
