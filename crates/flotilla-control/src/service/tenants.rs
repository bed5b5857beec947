//! Tokens and tenants.

use super::*;

impl ControlPlane {
    /// The caller behind a bearer secret.
    pub async fn authenticate(&self, secret: &str) -> ControlResult<Caller> {
        let token = self.store().token_by_hash(&hash_secret(secret)).await?;
        let token = token.ok_or_else(|| {
            ControlError::new(ErrorCode::Unauthenticated, "unknown API token")
                .with_hint("ask an admin for a token: flotilla token create --tenant NAME")
        })?;
        Ok(Caller {
            token_id: token.id,
            tenant_id: token.tenant_id,
            admin: token.admin,
            host: token.host,
        })
    }

    /// Makes sure an admin token with `secret` exists (for a bootstrap
    /// token given by the operator).
    pub async fn ensure_admin_token(&self, secret: &str) -> ControlResult<()> {
        if self
            .store()
            .token_by_hash(&hash_secret(secret))
            .await?
            .is_none()
        {
            // Another replica starting with the same token may win the race.
            let created = self
                .store()
                .create_token(
                    &new_id("tok"),
                    &hash_secret(secret),
                    None,
                    true,
                    Some("bootstrap"),
                )
                .await;
            match created {
                Ok(()) | Err(StoreError::Duplicate(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub async fn has_admin_token(&self) -> ControlResult<bool> {
        Ok(self.store().has_admin_token().await?)
    }

    pub async fn create_tenant(&self, caller: &Caller, name: &str) -> ControlResult<TenantRow> {
        require_admin(caller)?;
        check_name("tenant", name)?;
        Ok(self.store().create_tenant(&new_id("t"), name).await?)
    }

    pub async fn list_tenants(&self, caller: &Caller) -> ControlResult<Vec<TenantRow>> {
        require_admin(caller)?;
        Ok(self.store().list_tenants().await?)
    }

    /// Issues a token: a tenant's, an admin's, or a host's (it may only
    /// heartbeat as that host). Returns `(id, tenant id, secret)`.
    pub async fn create_token(
        &self,
        caller: &Caller,
        req: &CreateTokenRequest,
    ) -> ControlResult<(String, Option<String>, String)> {
        require_admin(caller)?;
        let kinds = usize::from(req.tenant.is_some())
            + usize::from(req.admin)
            + usize::from(req.host.is_some());
        if kinds != 1 {
            return Err(ControlError::invalid(
                "a token is one of: a tenant's (\"tenant\"), an admin token (\"admin\": true), or a host's (\"host\")",
            ));
        }
        let tenant_id = match &req.tenant {
            Some(name) => Some(
                self.store()
                    .tenant_by_name(name)
                    .await?
                    .ok_or_else(|| ControlError::not_found(format!("no tenant {name:?}")))?
                    .id,
            ),
            None => None,
        };
        if let Some(host) = &req.host {
            check_name("host", host)?;
        }
        let secret = new_secret();
        let id = new_id("tok");
        self.store()
            .create_scoped_token(
                &id,
                &hash_secret(&secret),
                tenant_id.as_deref(),
                req.admin,
                req.host.as_deref(),
                req.description.as_deref(),
            )
            .await?;
        Ok((id, tenant_id, secret))
    }
}
