//! The control plane's state: SQLite (one file, the embedded default) or
//! PostgreSQL (shared by several replicas), through one code path: sqlx's
//! `Any` driver and SQL both understand.

mod group_sync;
mod hosts;
mod idempotency;
mod instances;
mod operations;
mod policies;
mod schema;
mod snapshots;
mod tenants;
mod volumes;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{install_default_drivers, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};

pub use hosts::{GroupGuard, HostRow, InstanceAddress, Placement};
pub use instances::{InstanceFilter, InstanceRow, NewInstance, ObservedUpdate};
pub use operations::OperationRow;
pub use policies::PolicyRow;
pub use snapshots::SnapshotRow;
pub use tenants::{TenantRow, TokenRow};
pub use volumes::VolumeRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0} already exists")]
    Duplicate(String),
    /// A row that cannot be turned back into its type (written by a newer
    /// version, or edited by hand).
    #[error("stored {what} is unreadable: {reason}")]
    Corrupt { what: String, reason: String },
    /// An optimistic update lost to a concurrent one; the caller retries.
    #[error("a concurrent change got there first")]
    Contended,
    /// A change the rows as they are do not allow (a retry would not help).
    #[error("{0}")]
    Refused(String),
    #[error("unsupported database URL {0:?} (expected sqlite://PATH or postgres://...)")]
    UnsupportedUrl(String),
    /// A commit that could not be made durable (the log's fsync failed).
    #[error("making the write durable: {0}")]
    Durability(std::io::Error),
}

impl StoreError {
    /// A placement lost to a concurrent one: decided again. Besides a lost
    /// optimistic update, PostgreSQL may end one of two transactions that
    /// lock rows in different orders (deadlock) or cannot be serialized.
    /// (Elsewhere those stay database errors: a workflow step runs again.)
    pub fn is_contention(&self) -> bool {
        match self {
            StoreError::Contended => true,
            StoreError::Database(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|code| code == "40P01" || code == "40001"),
            _ => false,
        }
    }

    fn corrupt(what: &str, reason: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A unique-constraint violation becomes `Duplicate(what)`.
    fn unique(e: sqlx::Error, what: impl Into<String>) -> Self {
        match e.as_database_error() {
            Some(d) if d.is_unique_violation() => StoreError::Duplicate(what.into()),
            _ => StoreError::Database(e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// The state store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// SQLite's group commit (see [`group_sync`]); PostgreSQL makes a
    /// commit durable itself.
    group_sync: Option<Arc<group_sync::GroupSync>>,
}

impl Store {
    /// Connects and brings the schema up to date. `sqlite://PATH` creates the
    /// file if needed.
    pub async fn open(url: &str) -> StoreResult<Store> {
        install_default_drivers();
        let mut in_memory = false;
        let (dialect, url) = if let Some(path) = url.strip_prefix("sqlite://") {
            let url = match path.contains('?') {
                true => format!("sqlite://{path}"),
                false => format!("sqlite://{path}?mode=rwc"),
            };
            let file = path.split('?').next().unwrap_or(path);
            in_memory = file.is_empty() || file == ":memory:" || path.contains("mode=memory");
            (Dialect::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_string())
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let pool = match dialect {
            // One writer at a time is SQLite's model anyway; one connection
            // makes every transaction serial instead of failing as busy.
            // Commits are made durable by the group commit when there is a
            // file (NORMAL: no fsync of their own), by SQLite otherwise.
            Dialect::Sqlite => {
                let synchronous = match in_memory {
                    false => "PRAGMA synchronous = NORMAL",
                    true => "PRAGMA synchronous = FULL",
                };
                AnyPoolOptions::new()
                    .max_connections(1)
                    // Kept open: the log stays the same file (see group_sync).
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .after_connect(move |conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute(synchronous).await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            // Up to 128 MiB of pages (taken as read): the
                            // default 2 MiB re-read the instances from the
                            // OS for every fleet refresh and listing.
                            conn.execute("PRAGMA cache_size = -131072").await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Dialect::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .connect(&url)
                    .await?
            }
        };
        let group_sync = match (dialect, in_memory) {
            (Dialect::Sqlite, false) => Some(Arc::new(group_sync::GroupSync::new(
                sqlite_file(&pool).await?,
            ))),
            _ => None,
        };
        let store = Store {
            pool,
            dialect,
            group_sync,
        };
        store.migrate().await?;
        store.analyze().await?;
        Ok(store)
    }

    /// Refreshes the planner's statistics (both databases take `ANALYZE`):
    /// without them SQLite walks every instance by name for a tag filter
    /// instead of starting from the tag index.
    pub async fn analyze(&self) -> StoreResult<()> {
        self.pool.execute("ANALYZE").await?;
        Ok(())
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Returns once every write committed so far is on disk: each write
    /// method calls it after its commit, before it answers.
    pub(crate) async fn durable(&self) -> StoreResult<()> {
        if let Some(sync) = &self.group_sync {
            sync.sync().await.map_err(StoreError::Durability)?;
        }
        Ok(())
    }

    /// fsyncs of SQLite's log the group commit has run (`None` for a store
    /// that makes its commits durable itself): with concurrent writers,
    /// fewer than the writes.
    pub fn log_syncs(&self) -> Option<u64> {
        self.group_sync.as_ref().map(|s| s.fsyncs())
    }

    /// Commits `tx` and returns once it is durable.
    pub(crate) async fn commit(&self, tx: Transaction<'_, Any>) -> StoreResult<()> {
        tx.commit().await?;
        self.durable().await
    }

    /// Applies the migrations not applied yet, each in its own transaction.
    /// Replicas starting together serialise on the version's primary key.
    async fn migrate(&self) -> StoreResult<()> {
        let created = self
            .pool
            .execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await;
        // Two PostgreSQL replicas creating it at once: one of them fails on
        // the catalog's unique index, and the table is there.
        if let Err(e) = created {
            if !e
                .as_database_error()
                .is_some_and(|d| d.is_unique_violation())
            {
                return Err(e.into());
            }
        }
        for (version, statements) in schema::MIGRATIONS {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&self.pool)
                    .await?;
            if applied.is_some() {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            let claimed =
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(version)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await;
            if let Err(e) = claimed {
                // Another replica is applying it.
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation())
                {
                    continue;
                }
                return Err(e.into());
            }
            for statement in *statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            if *version == 3 {
                instances::backfill_tags(&mut tx).await?;
            }
            self.commit(tx).await?;
            tracing::info!(version, "applied schema migration");
        }
        Ok(())
    }
}

/// The file SQLite opened for the main database (the URL's path, decoded as
/// sqlx decodes it): the group commit syncs its log.
async fn sqlite_file(pool: &AnyPool) -> StoreResult<std::path::PathBuf> {
    let rows = sqlx::query("PRAGMA database_list").fetch_all(pool).await?;
    for row in rows {
        use sqlx::Row;
        if row.try_get::<String, _>("name")? == "main" {
            let file: String = row.try_get("file")?;
            if !file.is_empty() {
                return Ok(file.into());
            }
        }
    }
    Err(StoreError::Refused(
        "SQLite names no file for the main database: its writes cannot be made durable".into(),
    ))
}

/// Milliseconds since the Unix epoch: every timestamp in the store.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A fresh random id with a kind prefix, e.g. `i-3f9a…` (64 random bits).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::corrupt(what, e))
}
