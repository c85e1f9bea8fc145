//! What a VMM does with its guest's port and MMIO accesses: the [`ExitHandler`] it gives each
//! [`Vcpu`](crate::Vcpu).
//!
//! [`Vcpu::run_once`](crate::Vcpu::run_once) hands every `KVM_EXIT_IO` and `KVM_EXIT_MMIO` to
//! the handler: the address, and the data buffer of KVM's `kvm_run` page, which the handler fills
//! for a read and reads for a write. What an access that hits nothing does (all-ones, zeros, a
//! log line, a counter) is the handler's decision; the buffer of a read arrives zeroed, so a
//! handler that leaves it alone answers zeros. Cloud Hypervisor's `VmOps` is the model.
//!
//! ember's buses are one implementation, behind the `bus` feature:
//! `bus::BusExitHandler`.

/// Handles the port and MMIO accesses a guest makes, on the vCPU thread that exited.
///
/// One handler is usually shared by all the vCPUs of a VM (`Arc<dyn ExitHandler>`), so its
/// methods take `&self` and may run on several vCPU threads at once. They run while the vCPU is
/// out of the guest: a method that blocks stalls that vCPU.
///
/// `data.len()` is the width of the guest's access as KVM reports it: 1, 2 or 4 bytes for a
/// port, 1 to 8 for MMIO. The guest chooses the addresses and the width; a handler checks them
/// before it trusts them.
pub trait ExitHandler: Send + Sync {
    /// The guest read `data.len()` bytes from I/O port `port` (`in`): fill `data`, which arrives
    /// zeroed.
    fn pio_read(&self, port: u16, data: &mut [u8]);

    /// The guest wrote `data` to I/O port `port` (`out`).
    fn pio_write(&self, port: u16, data: &[u8]);

    /// The guest read `data.len()` bytes at guest physical address `addr`, which is neither RAM
    /// nor handled inside KVM: fill `data`, which arrives zeroed.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);

    /// The guest wrote `data` at guest physical address `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}
