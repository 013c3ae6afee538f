//! The store's writer: one thread that owns the writing connection and commits the calls that
//! arrive together in one transaction (a group commit).
//!
//! Many lanes finish requests at the same moment; committing each on its own costs a WAL append
//! and a hand-off to a blocking thread per call. The writer takes every call waiting for it, runs
//! each inside its own savepoint (a failing call is rolled back alone and gets its own error), and
//! commits them once. Every caller learns its result only after that commit: an `Ok` always means
//! durable.

use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{StoreError, StoreResult};

/// The most calls one transaction takes.
const GROUP_MAX: usize = 256;

/// A call waiting for the writer.
trait Work: Send {
    /// Runs the call against the group's transaction; `true` when it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Tells the caller how it ended, once the group's fate is known: `commit` is the error of
    /// the group's transaction, if it failed.
    fn complete(self: Box<Self>, commit: Option<&StoreError>);
}

struct Call<T, F> {
    call: Option<F>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> Work for Call<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let call = self.call.take().expect("a call runs once");
        let result = call(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn complete(self: Box<Self>, commit: Option<&StoreError>) {
        let result = match (self.result, commit) {
            // Its own failure is the more precise answer.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(_)), Some(e)) | (None, Some(e)) => Err(StoreError::Group(e.to_string())),
            (Some(Ok(value)), None) => Ok(value),
            (None, None) => Err(StoreError::Group("the call was not run".into())),
        };
        // The caller may have given up waiting (shutdown); its result is committed anyway.
        let _ = self.reply.send(result);
    }
}

/// A handle on the writer thread; cheap to clone. The thread ends when the last handle is gone.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Box<dyn Work>>,
}

impl Writer {
    /// Starts the writer thread, which owns `conn` from now on.
    pub fn start(conn: Connection) -> std::io::Result<Self> {
        let (queue, calls) = mpsc::channel();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(conn, calls))?;
        Ok(Self { queue })
    }

    /// Runs `call` in the next group transaction and returns its result once that is committed.
    pub async fn call<T, F>(&self, call: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let work = Box::new(Call {
            call: Some(call),
            result: None,
            reply,
        });
        self.queue
            .send(work)
            .map_err(|_| StoreError::Group("the store's writer thread has stopped".into()))?;
        result
            .await
            .map_err(|_| StoreError::Group("the store's writer thread has stopped".into()))?
    }
}

fn write_loop(mut conn: Connection, calls: mpsc::Receiver<Box<dyn Work>>) {
    let mut group: Vec<Box<dyn Work>> = Vec::with_capacity(GROUP_MAX);
    while let Ok(first) = calls.recv() {
        group.push(first);
        while group.len() < GROUP_MAX {
            match calls.try_recv() {
                Ok(work) => group.push(work),
                Err(_) => break,
            }
        }
        let outcome = run_group(&mut conn, &mut group);
        for work in group.drain(..) {
            work.complete(outcome.as_ref().err());
        }
    }
}

/// Runs every call of the group, each in its own savepoint, and commits them together.
fn run_group(conn: &mut Connection, group: &mut [Box<dyn Work>]) -> StoreResult<()> {
    let mut tx = conn.transaction()?;
    for work in group.iter_mut() {
        let savepoint = tx.savepoint()?;
        if work.run(&savepoint) {
            savepoint.commit()?;
        }
        // A failed call's savepoint is rolled back when dropped.
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Writer;
    use crate::store::StoreError;

    #[tokio::test]
    async fn a_failing_call_is_rolled_back_alone_and_the_others_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sqlite");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .unwrap();
        let writer = Writer::start(conn).unwrap();

        // Sent together, so they share transactions; call 7 writes, then fails.
        let calls: Vec<_> = (0..20i64)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer
                        .call(move |conn| {
                            conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                            if n == 7 {
                                return Err(StoreError::Group("call 7 fails".into()));
                            }
                            Ok(n)
                        })
                        .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap());
        }

        for (n, result) in results.iter().enumerate() {
            match result {
                Ok(value) => assert_eq!(*value, n as i64),
                Err(e) => assert_eq!(n, 7, "call {n} failed: {e}"),
            }
        }
        assert!(results[7].is_err());
        // What an Ok promised is on disk: read back over a connection of its own.
        let check = rusqlite::Connection::open(&path).unwrap();
        let rows: Vec<i64> = check
            .prepare("SELECT n FROM t ORDER BY n")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<i64> = (0..20).filter(|n| *n != 7).collect();
        assert_eq!(rows, expected);
    }
}
