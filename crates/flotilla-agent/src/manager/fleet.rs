//! Suspend or resume many VMs at once with bounded parallelism; each VM
//! succeeds or fails on its own, and a failed suspend leaves that VM running.

use std::time::Instant;

use flotilla_api::fleet::{DEFAULT_FLEET_PARALLELISM, MAX_FLEET_PARALLELISM};
use flotilla_api::{FleetItem, FleetRequest, FleetResult};
use futures::stream::{self, StreamExt};

use super::VmManager;
use crate::error::{AgentError, AgentResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetOp {
    Suspend,
    Resume,
}

impl VmManager {
    /// The VMs a fleet request names: its names plus those with its tag.
    fn select(&self, req: &FleetRequest) -> AgentResult<Vec<String>> {
        let tag = match &req.tag {
            Some(t) => Some(t.split_once('=').ok_or_else(|| {
                AgentError::InvalidArgument(format!("tag {t:?} is not KEY=VALUE"))
            })?),
            None => None,
        };
        if req.names.is_empty() && tag.is_none() {
            return Err(AgentError::InvalidArgument(
                "name the VMs, or give a tag (KEY=VALUE) that selects them".into(),
            ));
        }
        let mut names: Vec<String> = Vec::new();
        for n in &req.names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        if let Some((k, v)) = tag {
            for vm in self.list() {
                if vm.tags.get(k).is_some_and(|x| x == v) && !names.contains(&vm.name) {
                    names.push(vm.name);
                }
            }
        }
        Ok(names)
    }

    pub async fn fleet(&self, op: FleetOp, req: FleetRequest) -> AgentResult<FleetResult> {
        let parallelism = req.parallelism.unwrap_or(DEFAULT_FLEET_PARALLELISM);
        if parallelism == 0 || parallelism > MAX_FLEET_PARALLELISM {
            return Err(AgentError::InvalidArgument(format!(
                "parallelism {parallelism} is out of range: use 1 to {MAX_FLEET_PARALLELISM}"
            )));
        }
        if req.warm {
            match op {
                FleetOp::Suspend => self.check_warm_possible()?,
                FleetOp::Resume => {
                    return Err(AgentError::InvalidArgument(
                        "warm is for suspends: a resume uses a VM's waiting QEMU by itself".into(),
                    ))
                }
            }
        }
        let names = self.select(&req)?;
        let started = Instant::now();
        let warm = req.warm;
        let items: Vec<FleetItem> = stream::iter(names)
            .map(|name| async move {
                let t = Instant::now();
                let result = match op {
                    FleetOp::Suspend => self.suspend(&name, warm).await,
                    FleetOp::Resume => self.resume(&name, true).await,
                };
                let state = self.entry(&name).ok().map(|e| e.lock().record.state);
                FleetItem {
                    name,
                    state,
                    error: result.err().map(|e| e.to_detail()),
                    duration_ms: t.elapsed().as_millis() as u64,
                }
            })
            .buffer_unordered(parallelism as usize)
            .collect()
            .await;
        let failed = items.iter().filter(|i| i.error.is_some()).count();
        let mut items = items;
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(FleetResult {
            succeeded: items.len() - failed,
            failed,
            duration_ms: started.elapsed().as_millis() as u64,
            items,
        })
    }
}
