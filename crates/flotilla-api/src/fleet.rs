//! Operations on many VMs at once, selected by name or by tag.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ErrorDetail, VmState};

pub const DEFAULT_FLEET_PARALLELISM: u32 = 4;
pub const MAX_FLEET_PARALLELISM: u32 = 64;

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetRequest {
    /// VMs by name.
    #[serde(default)]
    pub names: Vec<String>,
    /// VMs by tag, `KEY=VALUE`; combined with `names` as a union.
    #[serde(default)]
    pub tag: Option<String>,
    /// How many VMs are worked on at once (default 4).
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// Suspends only: keep a QEMU waiting for each VM's resume (a warm
    /// suspend). Sent only when set, so older agents still take the rest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
}

/// What happened to one VM of a fleet operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetItem {
    pub name: String,
    /// The VM's state afterwards (absent for a VM that does not exist).
    pub state: Option<VmState>,
    /// Why this VM failed; the others are not affected.
    pub error: Option<ErrorDetail>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FleetResult {
    pub succeeded: usize,
    pub failed: usize,
    pub duration_ms: u64,
    pub items: Vec<FleetItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cold_fleet_request_does_not_name_warm() {
        let cold = FleetRequest {
            names: vec!["a".into()],
            ..FleetRequest::default()
        };
        let json = serde_json::to_value(&cold).expect("json");
        assert!(json.get("warm").is_none(), "{json}");
        let warm = FleetRequest { warm: true, ..cold };
        assert_eq!(serde_json::to_value(&warm).expect("json")["warm"], true);
    }
}
