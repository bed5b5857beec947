//! Tenants and their API tokens (stored as SHA-256 hashes of the secret).

use sqlx::Row;

use super::{now_ms, Store, StoreError, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub tenant_id: Option<String>,
    pub admin: bool,
    /// For a host token: the host it heartbeats as.
    pub host: Option<String>,
}

fn tenant(row: &sqlx::any::AnyRow) -> StoreResult<TenantRow> {
    Ok(TenantRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    pub async fn create_tenant(&self, id: &str, name: &str) -> StoreResult<TenantRow> {
        let created_at = now_ms();
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(created_at)
            .execute(self.pool())
            .await
            .map_err(|e| StoreError::unique(e, format!("tenant {name:?}")))?;
        self.durable().await?;
        Ok(TenantRow {
            id: id.to_string(),
            name: name.to_string(),
            created_at,
        })
    }

    pub async fn tenant_by_name(&self, name: &str) -> StoreResult<Option<TenantRow>> {
        let row = sqlx::query("SELECT id, name, created_at FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(tenant).transpose()
    }

    pub async fn tenant_by_id(&self, id: &str) -> StoreResult<Option<TenantRow>> {
        let row = sqlx::query("SELECT id, name, created_at FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(tenant).transpose()
    }

    pub async fn list_tenants(&self) -> StoreResult<Vec<TenantRow>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY name")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(tenant).collect()
    }

    pub async fn create_token(
        &self,
        id: &str,
        secret_hash: &str,
        tenant_id: Option<&str>,
        admin: bool,
        description: Option<&str>,
    ) -> StoreResult<()> {
        self.create_scoped_token(id, secret_hash, tenant_id, admin, None, description)
            .await
    }

    /// A token of a tenant, an admin, or (with `host`) one host.
    pub async fn create_scoped_token(
        &self,
        id: &str,
        secret_hash: &str,
        tenant_id: Option<&str>,
        admin: bool,
        host: Option<&str>,
        description: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tokens (id, secret_hash, tenant_id, admin, description, created_at, host)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(tenant_id)
        .bind(i64::from(admin))
        .bind(description)
        .bind(now_ms())
        .bind(host)
        .execute(self.pool())
        .await
        .map_err(|e| StoreError::unique(e, "a token with this secret"))?;
        self.durable().await?;
        Ok(())
    }

    pub async fn token_by_hash(&self, secret_hash: &str) -> StoreResult<Option<TokenRow>> {
        let row =
            sqlx::query("SELECT id, tenant_id, admin, host FROM tokens WHERE secret_hash = $1")
                .bind(secret_hash)
                .fetch_optional(self.pool())
                .await?;
        row.map(|r| {
            Ok(TokenRow {
                id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                admin: r.try_get::<i64, _>("admin")? != 0,
                host: r.try_get("host")?,
            })
        })
        .transpose()
    }

    pub async fn has_admin_token(&self) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE admin = 1")
            .fetch_one(self.pool())
            .await?;
        Ok(n > 0)
    }
}
