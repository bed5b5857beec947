//! API tokens: `flt_` + 48 hex characters, stored only as their SHA-256.
//! A token acts for one tenant, or is an admin token (hosts, tenants,
//! everything).

use sha2::{Digest, Sha256};

/// Who is calling, from their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub tenant_id: Option<String>,
    pub admin: bool,
    /// A host token's host: it may heartbeat as that host, nothing else.
    pub host: Option<String>,
}

impl Caller {
    /// Whether the caller may see or act on something of `tenant_id`.
    pub fn may_access(&self, tenant_id: &str) -> bool {
        self.admin || self.tenant_id.as_deref() == Some(tenant_id)
    }
}

pub fn new_secret() -> String {
    format!("flt_{}", hex::encode(rand::random::<[u8; 24]>()))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The secret from an `Authorization: Bearer <secret>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let secret = header.strip_prefix("Bearer ")?.trim();
    (!secret.is_empty()).then_some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_hashes_stable() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("flt_") && a.len() == 52);
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_eq!(bearer("Bearer flt_x"), Some("flt_x"));
        assert_eq!(bearer("Basic x"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
