//! Stored placement policies and the one a placement uses.

use super::*;

impl ControlPlane {
    /// The tenant a policy call acts on: a tenant token its own, an admin
    /// the one named, or `""` (global) when none is.
    pub(super) fn policy_scope(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
    ) -> ControlResult<String> {
        match (&caller.tenant_id, caller.admin) {
            (Some(own), _) => Ok(own.clone()),
            (None, true) => Ok(tenant.unwrap_or("").to_string()),
            (None, false) => Err(ControlError::new(
                ErrorCode::PermissionDenied,
                "this token acts for no tenant",
            )),
        }
    }

    pub async fn put_policy(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
        doc: &PolicyDocument,
    ) -> ControlResult<PolicyRow> {
        check_name("policy", name)?;
        placement::validate(&doc.placement, "placement")?;
        let tenant_id = self.policy_scope(caller, tenant)?;
        if !tenant_id.is_empty() && self.store().tenant_by_id(&tenant_id).await?.is_none() {
            return Err(ControlError::not_found(format!("no tenant {tenant_id:?}")));
        }
        let row = PolicyRow {
            tenant_id,
            name: name.to_string(),
            fleet: doc.fleet.clone(),
            placement: doc.placement.clone(),
            updated_at: now_ms(),
        };
        self.store().put_policy(&row).await?;
        Ok(row)
    }

    /// A tenant sees its own policies and the global ones; an admin every
    /// policy, or one tenant's with `tenant`.
    pub async fn list_policies(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
    ) -> ControlResult<Vec<PolicyRow>> {
        match (&caller.tenant_id, tenant) {
            (Some(own), _) => Ok(self.store().policies_for(own).await?),
            (None, Some(t)) if caller.admin => Ok(self.store().policies_for(t).await?),
            (None, _) if caller.admin => Ok(self.store().all_policies().await?),
            _ => Err(ControlError::new(
                ErrorCode::PermissionDenied,
                "this token acts for no tenant",
            )),
        }
    }

    pub async fn delete_policy(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        name: &str,
    ) -> ControlResult<()> {
        let tenant_id = self.policy_scope(caller, tenant)?;
        if !self.store().delete_policy(&tenant_id, name).await? {
            return Err(ControlError::not_found(format!("no policy {name:?}")));
        }
        Ok(())
    }

    /// Global, tenant-wide and matching fleet policies, then the request's,
    /// merged (see [`placement::merge`]) and checked as a whole.
    pub(super) async fn effective_policy(
        &self,
        tenant_id: &str,
        tags: &BTreeMap<String, String>,
        request: Option<&PlacementPolicy>,
    ) -> ControlResult<PlacementPolicy> {
        let stored = self.store().policies_for(tenant_id).await?;
        let applies = |p: &PolicyRow| p.fleet.iter().all(|(k, v)| tags.get(k) == Some(v));
        let mut ordered: Vec<&PolicyRow> = stored.iter().filter(|p| applies(p)).collect();
        // Least specific first: global, then the tenant's, whole-tenant before fleets.
        ordered.sort_by_key(|p| (!p.tenant_id.is_empty(), !p.fleet.is_empty(), p.name.clone()));
        let mut sourced: Vec<Sourced<'_>> = ordered
            .iter()
            .map(|p| Sourced {
                source: format!("policy {}", p.name),
                policy: &p.placement,
                global: p.tenant_id.is_empty(),
            })
            .collect();
        if let Some(r) = request {
            placement::validate(r, "placement")?;
            sourced.push(Sourced {
                source: "placement".into(),
                policy: r,
                global: false,
            });
        }
        let merged = placement::merge(&sourced)?;
        placement::validate(&merged, "the merged placement policy")?;
        Ok(merged)
    }
}
