//! Host capacity accounting: the vCPUs and memory held by VMs that run.

use flotilla_api::Resources;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "not enough capacity on this host: the VM needs {needed_vcpus} vCPUs and {needed_mib} MiB, \
     {free_vcpus} vCPUs and {free_mib} MiB are free (capacity {capacity_vcpus} vCPUs, {capacity_mib} MiB)"
)]
pub struct CapacityError {
    pub needed_vcpus: u32,
    pub needed_mib: u64,
    pub free_vcpus: u32,
    pub free_mib: u64,
    pub capacity_vcpus: u32,
    pub capacity_mib: u64,
}

/// Sums what `held` VMs hold.
pub fn allocated<I: IntoIterator<Item = Resources>>(held: I) -> Resources {
    held.into_iter()
        .fold(Resources::default(), |acc, r| Resources {
            vcpus: acc.vcpus + r.vcpus,
            memory_mib: acc.memory_mib + r.memory_mib,
        })
}

/// Whether `needed` fits next to `allocated` within `capacity`.
pub fn check_fits(
    capacity: Resources,
    allocated: Resources,
    needed: Resources,
) -> Result<(), CapacityError> {
    let free_vcpus = capacity.vcpus.saturating_sub(allocated.vcpus);
    let free_mib = capacity.memory_mib.saturating_sub(allocated.memory_mib);
    if needed.vcpus <= free_vcpus && needed.memory_mib <= free_mib {
        Ok(())
    } else {
        Err(CapacityError {
            needed_vcpus: needed.vcpus,
            needed_mib: needed.memory_mib,
            free_vcpus,
            free_mib,
            capacity_vcpus: capacity.vcpus,
            capacity_mib: capacity.memory_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(vcpus: u32, memory_mib: u64) -> Resources {
        Resources { vcpus, memory_mib }
    }

    #[test]
    fn fits_exactly_and_refuses_one_more() {
        let cap = r(4, 1024);
        let held = allocated([r(1, 512), r(1, 256)]);
        assert!(check_fits(cap, held, r(2, 256)).is_ok());
        let e = check_fits(cap, held, r(1, 257)).unwrap_err();
        assert_eq!(e.free_mib, 256);
        assert!(e.to_string().contains("256 MiB are free"));
    }
}
