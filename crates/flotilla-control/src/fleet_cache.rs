//! The hosts as placement sees them, kept in memory between placements so a
//! decision does not read the whole fleet from the store. The store stays
//! the truth: a placement commits only if the host's version is the one the
//! cache holds, and a host whose commit lost is reread before the retry.
//! The whole view is reread when older than [`MAX_AGE`] or marked stale
//! (a host registered, went down or came back, was cordoned).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::placement::{Demand, HostView};
use crate::store::{HostRow, Store, StoreResult};

/// Placements by other replicas and terminations show up within this.
pub const MAX_AGE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct FleetView {
    pub hosts: Vec<HostView>,
    pub versions: Vec<i64>,
    by_name: HashMap<String, usize>,
    loaded: Option<Instant>,
}

pub fn view_of(h: HostRow) -> HostView {
    HostView {
        name: h.name,
        labels: h.labels,
        traits: h.traits,
        down: h.down,
        cordoned: h.cordoned,
        vcpus: h.vcpus,
        memory_mib: h.memory_mib,
        used_vcpus: h.used_vcpus,
        used_memory_mib: h.used_memory_mib,
        disk_mib: h.disk_mib,
        used_disk_mib: h.used_disk_mib,
        disk_free_mib: h.disk_free_mib,
        group_count: 0,
    }
}

impl FleetView {
    /// Rereads everything if the view is stale.
    pub async fn refresh_if_stale(&mut self, store: &Store) -> StoreResult<()> {
        if self.loaded.is_some_and(|t| t.elapsed() < MAX_AGE) {
            return Ok(());
        }
        let rows = store.list_hosts().await?;
        self.versions = rows.iter().map(|h| h.version).collect();
        self.hosts = rows.into_iter().map(view_of).collect();
        self.by_name = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect();
        self.loaded = Some(Instant::now());
        Ok(())
    }

    pub fn index_of(&self, host: &str) -> Option<usize> {
        self.by_name.get(host).copied()
    }

    pub fn mark_stale(&mut self) {
        self.loaded = None;
    }

    /// Rereads one host (after a commit on it lost a race).
    pub async fn reload_host(&mut self, store: &Store, i: usize) -> StoreResult<()> {
        match store.host(&self.hosts[i].name).await? {
            Some(row) => {
                self.versions[i] = row.version;
                self.hosts[i] = view_of(row);
            }
            None => self.mark_stale(),
        }
        Ok(())
    }

    /// Counts a placement on host `i`: tentatively while a batch is
    /// decided, for good once it is committed.
    pub fn add_usage(&mut self, i: usize, demand: &Demand) {
        let h = &mut self.hosts[i];
        h.used_vcpus += u64::from(demand.vcpus);
        h.used_memory_mib += demand.memory_mib;
        h.used_disk_mib += demand.disk_mib;
        // Free space as measured, less what this batch will take of it.
        if let Some(free) = &mut h.disk_free_mib {
            *free = free.saturating_sub(demand.disk_mib);
        }
    }

    /// Takes back a tentative placement on host `i`.
    pub fn remove_usage(&mut self, i: usize, demand: &Demand) {
        let h = &mut self.hosts[i];
        h.used_vcpus = h.used_vcpus.saturating_sub(u64::from(demand.vcpus));
        h.used_memory_mib = h.used_memory_mib.saturating_sub(demand.memory_mib);
        h.used_disk_mib = h.used_disk_mib.saturating_sub(demand.disk_mib);
        if let Some(free) = &mut h.disk_free_mib {
            *free += demand.disk_mib;
        }
    }
}
