//! Counters of what the vCPUs of a VM did: their exits to the VMM, by reason.
//!
//! A [`Vm`](crate::Vm) holds one [`VcpuMetrics`], which every vCPU created from it shares and
//! counts into from [`Vcpu::run_once`](crate::Vcpu::run_once); a VMM reads it at any time, from
//! any thread, without stopping the vCPUs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Exits of the vCPUs of one VM, by reason. Each counter only grows.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Port reads (`KVM_EXIT_IO`, in).
    pub exit_io_in: Counter,
    /// Port writes (`KVM_EXIT_IO`, out).
    pub exit_io_out: Counter,
    /// MMIO reads (`KVM_EXIT_MMIO`).
    pub exit_mmio_read: Counter,
    /// MMIO writes (`KVM_EXIT_MMIO`).
    pub exit_mmio_write: Counter,
    /// `KVM_RUN` left because of a signal or a kick.
    pub exit_interrupted: Counter,
    /// Shutdowns (`KVM_EXIT_SHUTDOWN`) and system events (reset, power-off, crash).
    pub exit_system: Counter,
    /// Exits a vCPU could not go on from: KVM errors, internal errors, failed entries and
    /// exits of a kind the vCPU does not handle.
    pub failures: Counter,
}

impl VcpuMetrics {
    /// Every counter with its name, in a fixed order.
    pub fn values(&self) -> [(&'static str, u64); 7] {
        [
            ("exit_io_in", self.exit_io_in.get()),
            ("exit_io_out", self.exit_io_out.get()),
            ("exit_mmio_read", self.exit_mmio_read.get()),
            ("exit_mmio_write", self.exit_mmio_write.get()),
            ("exit_interrupted", self.exit_interrupted.get()),
            ("exit_system", self.exit_system.get()),
            ("failures", self.failures.get()),
        ]
    }
}

/// A counter that several threads add to.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_every_counter_once_in_order() {
        let metrics = VcpuMetrics::default();
        metrics.exit_io_out.inc();
        metrics.exit_io_out.inc();
        metrics.failures.inc();
        let values = metrics.values();
        assert_eq!(values[1], ("exit_io_out", 2));
        assert_eq!(values[6], ("failures", 1));
        assert_eq!(values.iter().map(|(_, v)| v).sum::<u64>(), 3);
        let mut names: Vec<_> = values.iter().map(|(n, _)| *n).collect();
        names.dedup();
        assert_eq!(names.len(), 7);
    }
}
