//! Group commit for SQLite.
//!
//! With `synchronous = FULL` every commit waits for its own fsync of the
//! write-ahead log, one after another on the store's one connection: a
//! control plane taking many runs at once spends its time in fsyncs. The
//! store runs SQLite with `synchronous = NORMAL` (commits append to the log
//! without an fsync) and each write then waits here until the log is on
//! disk. Writes that committed while an fsync was running share the next
//! one, so concurrent writers pay one fsync per batch instead of one each.
//! A write is acknowledged only once durable, as with FULL.
//!
//! fsync flushes a file whatever descriptor it is called on, so the log is
//! opened apart from SQLite's connection. A log that SQLite checkpointed
//! and restarted meanwhile needs nothing: in NORMAL mode SQLite syncs the
//! log before a checkpoint and the database after it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{watch, Mutex};

/// Waits for the write-ahead log of one SQLite database to reach the disk.
#[derive(Debug)]
pub(crate) struct GroupSync {
    wal: PathBuf,
    /// Tickets handed out: one per write that asked to be made durable,
    /// taken after its commit.
    issued: AtomicU64,
    /// Every ticket up to this one is durable.
    durable: watch::Sender<u64>,
    /// One fsync at a time; the writers that wait for it are the batch.
    syncing: Mutex<()>,
    /// fsyncs run so far.
    fsyncs: AtomicU64,
}

impl GroupSync {
    /// For the database file `db` (its log is `db` + `-wal`).
    pub(crate) fn new(db: PathBuf) -> GroupSync {
        let mut wal = db.into_os_string();
        wal.push("-wal");
        GroupSync {
            wal: PathBuf::from(wal),
            issued: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            syncing: Mutex::new(()),
            fsyncs: AtomicU64::new(0),
        }
    }

    /// fsyncs run so far.
    pub(crate) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Returns once everything committed before the call is on disk.
    pub(crate) async fn sync(&self) -> std::io::Result<()> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        loop {
            if *self.durable.borrow() >= ticket {
                return Ok(());
            }
            let _turn = self.syncing.lock().await;
            // The fsync that ran while this writer waited may have covered it.
            if *self.durable.borrow() >= ticket {
                return Ok(());
            }
            // Every ticket issued so far belongs to a write that had
            // committed before it took the ticket, so before this fsync.
            let covered = self.issued.load(Ordering::SeqCst);
            let wal = self.wal.clone();
            tokio::task::spawn_blocking(move || fsync(&wal))
                .await
                .map_err(std::io::Error::other)??;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.durable.send_if_modified(|d| {
                let moved = covered > *d;
                *d = (*d).max(covered);
                moved
            });
        }
    }
}

fn fsync(wal: &std::path::Path) -> std::io::Result<()> {
    match std::fs::File::open(wal) {
        Ok(file) => file.sync_data(),
        // No log (nothing written yet, or the last connection closed and
        // checkpointed it into the database, which it synced).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn writers_waiting_together_share_fsyncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("c.db");
        std::fs::write(format!("{}-wal", db.display()), b"frames").expect("wal");
        let sync = Arc::new(GroupSync::new(db));
        let writers: Vec<_> = (0..64)
            .map(|_| {
                let sync = sync.clone();
                tokio::spawn(async move { sync.sync().await })
            })
            .collect();
        for w in writers {
            w.await.expect("join").expect("sync");
        }
        assert_eq!(*sync.durable.borrow(), 64);
        let shared = sync.fsyncs.load(Ordering::Relaxed);
        assert!(shared < 64, "{shared} fsyncs for 64 writers");
        // A later writer is not covered by earlier fsyncs.
        sync.sync().await.expect("sync");
        assert_eq!(*sync.durable.borrow(), 65);
        assert_eq!(sync.fsyncs.load(Ordering::Relaxed), shared + 1);
    }

    #[tokio::test]
    async fn a_missing_log_is_nothing_to_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sync = GroupSync::new(dir.path().join("absent.db"));
        sync.sync().await.expect("sync");
    }

    #[tokio::test]
    async fn an_unreadable_log_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("c.db");
        // The log's directory is a file.
        std::fs::write(&db, b"").expect("db");
        let sync = GroupSync::new(db.join("inner.db"));
        let err = sync.sync().await.expect_err("not a directory");
        assert_eq!(err.kind(), std::io::ErrorKind::NotADirectory, "{err}");
    }
}
