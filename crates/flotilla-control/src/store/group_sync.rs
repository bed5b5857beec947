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
//! log before a checkpoint and the database after it. A log file that is
//! new (first use, or made again after its connection closed) has its
//! directory synced too, so its name survives a crash.
//!
//! Two differences from FULL remain. Another reader on the connection may
//! see a commit during the fsync that makes it durable (until a power loss
//! takes it back; a crash of the process alone loses nothing). And a
//! failed fsync may have dropped any write since the last good one, so it
//! fails every later write too, until the store is opened again (as
//! PostgreSQL stops on one).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// fsyncs of the log run so far.
    fsyncs: AtomicU64,
    /// A failed fsync: nothing written since the last good one is sure.
    failed: AtomicBool,
    /// The log file last synced, to notice a new one (its inode).
    synced_inode: AtomicU64,
}

impl GroupSync {
    /// For the database file `db` (its log is `db` + `-wal`), as SQLite
    /// names it (`PRAGMA database_list`).
    pub(crate) fn new(db: PathBuf) -> GroupSync {
        let mut wal = db.into_os_string();
        wal.push("-wal");
        GroupSync {
            wal: PathBuf::from(wal),
            issued: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            syncing: Mutex::new(()),
            fsyncs: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            synced_inode: AtomicU64::new(0),
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
            self.check_failed()?;
            if *self.durable.borrow() >= ticket {
                return Ok(());
            }
            let _turn = self.syncing.lock().await;
            self.check_failed()?;
            // The fsync that ran while this writer waited may have covered it.
            if *self.durable.borrow() >= ticket {
                return Ok(());
            }
            // Every ticket issued so far belongs to a write that had
            // committed before it took the ticket, so before this fsync.
            let covered = self.issued.load(Ordering::SeqCst);
            let wal = self.wal.clone();
            let known = self.synced_inode.load(Ordering::Relaxed);
            let synced = tokio::task::spawn_blocking(move || fsync(&wal, known))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            let inode = match synced {
                Ok(inode) => inode,
                Err(e) => {
                    self.failed.store(true, Ordering::SeqCst);
                    tracing::error!(log = %self.wal.display(), error = %e, "fsync of the store's log failed: writes fail until the store is opened again");
                    return Err(e);
                }
            };
            self.synced_inode.store(inode, Ordering::Relaxed);
            if inode != 0 {
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
            self.durable.send_if_modified(|d| {
                let moved = covered > *d;
                *d = (*d).max(covered);
                moved
            });
        }
    }

    fn check_failed(&self) -> std::io::Result<()> {
        match self.failed.load(Ordering::SeqCst) {
            true => Err(std::io::Error::other(format!(
                "an earlier fsync of {} failed; open the store again",
                self.wal.display()
            ))),
            false => Ok(()),
        }
    }
}

/// Syncs the log, and its directory when the log is not the file synced
/// last time (`known`, an inode); returns the log's inode (0: no log).
fn fsync(wal: &Path, known: u64) -> std::io::Result<u64> {
    let file = match std::fs::File::open(wal) {
        Ok(file) => file,
        // No log (the last connection closed and checkpointed it into the
        // database, which it synced).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    file.sync_data()?;
    let inode = file.metadata()?.ino();
    if inode != known {
        if let Some(dir) = wal.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(inode)
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
    async fn a_failed_fsync_fails_every_later_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("c.db");
        // The log's directory is a file: the log cannot be opened.
        std::fs::write(&db, b"").expect("db");
        let sync = GroupSync::new(db.join("inner.db"));
        let err = sync.sync().await.expect_err("not a directory");
        assert_eq!(err.kind(), std::io::ErrorKind::NotADirectory, "{err}");
        let later = sync.sync().await.expect_err("poisoned");
        assert!(later.to_string().contains("earlier fsync"), "{later}");
    }
}
