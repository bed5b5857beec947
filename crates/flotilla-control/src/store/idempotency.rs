//! Idempotency keys: a create sent twice with the same key gets the first
//! answer again instead of a second set of instances.

use sqlx::Row;

use super::{now_ms, Store, StoreError, StoreResult};

/// A reservation older than this whose request never completed is free.
const STALE_RESERVATION_MS: i64 = 5 * 60 * 1000;

impl Store {
    /// The stored answer for `key`: `(request_hash, status, body)`.
    pub async fn idempotent_response(
        &self,
        tenant_id: &str,
        key: &str,
    ) -> StoreResult<Option<(String, u16, String)>> {
        let row = sqlx::query(
            "SELECT request_hash, status, response FROM idempotency_keys
             WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant_id)
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok((
                r.try_get("request_hash")?,
                r.try_get::<i64, _>("status")? as u16,
                r.try_get("response")?,
            ))
        })
        .transpose()
    }

    /// Reserves `key` for a request (status 0 until it completes). Returns
    /// false if the key is already taken: look at `idempotent_response`.
    pub async fn reserve_idempotency_key(
        &self,
        tenant_id: &str,
        key: &str,
        request_hash: &str,
    ) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, request_hash, status, response, created_at)
             VALUES ($1, $2, $3, 0, '', $4)",
        )
        .bind(tenant_id)
        .bind(key)
        .bind(request_hash)
        .bind(now_ms())
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => {
                self.durable().await?;
                Ok(true)
            }
            Err(e) => match StoreError::unique(e, key) {
                // Taken; but a reservation whose request never completed
                // (its process died) is taken over after a while.
                StoreError::Duplicate(_) => {
                    let stale = sqlx::query(
                        "UPDATE idempotency_keys SET request_hash = $1, created_at = $2
                         WHERE tenant_id = $3 AND key = $4 AND status = 0 AND created_at < $5",
                    )
                    .bind(request_hash)
                    .bind(now_ms())
                    .bind(tenant_id)
                    .bind(key)
                    .bind(now_ms() - STALE_RESERVATION_MS)
                    .execute(self.pool())
                    .await?;
                    self.durable().await?;
                    Ok(stale.rows_affected() > 0)
                }
                other => Err(other),
            },
        }
    }

    /// Stores the answer of a reserved key.
    pub async fn complete_idempotency_key(
        &self,
        tenant_id: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET status = $1, response = $2 WHERE tenant_id = $3 AND key = $4",
        )
        .bind(i64::from(status))
        .bind(body)
        .bind(tenant_id)
        .bind(key)
        .execute(self.pool())
        .await?;
        self.durable().await?;
        Ok(())
    }

    /// Frees a reserved key whose request failed before changing anything.
    pub async fn release_idempotency_key(&self, tenant_id: &str, key: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND status = 0",
        )
        .bind(tenant_id)
        .bind(key)
        .execute(self.pool())
        .await?;
        self.durable().await?;
        Ok(())
    }
}
