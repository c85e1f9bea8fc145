//! Hands out guest MMIO ranges and interrupt lines to devices.
//!
//! [`ResourceAllocator`] is a bump allocator: MMIO ranges are handed out in increasing address
//! order and interrupt lines in increasing number order, each exactly once. Nothing is ever freed,
//! which fits a VMM that attaches its devices once at boot. The first MMIO range of
//! [`ResourceAllocator::new`] starts at [`layout::MMIO32_START`] and the first line is
//! [`layout::IRQ_BASE`].

use std::ops::{Range, RangeInclusive};

use vm_memory::GuestAddress;

use crate::layout;
use crate::ram::PAGE_SIZE;

/// Errors of MMIO range and interrupt line allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An MMIO range of zero bytes was requested.
    #[error("An MMIO range cannot be empty")]
    EmptyMmioRange,
    /// The requested alignment is not a power of two of at least a page.
    #[error("The MMIO alignment {0:#x} is not a power of two of at least 4 KiB")]
    InvalidAlignment(u64),
    /// No free MMIO space is left for a range of the requested size and alignment.
    #[error("No free MMIO range of {size:#x} bytes aligned to {align:#x} is left")]
    MmioExhausted {
        /// Requested size in bytes.
        size: u64,
        /// Requested alignment in bytes.
        align: u64,
    },
    /// Every interrupt line has been handed out.
    #[error("No free interrupt line is left")]
    IrqExhausted,
}

/// Result type of MMIO range and interrupt line allocation.
pub type Result<T> = std::result::Result<T, Error>;

/// Allocates non-overlapping MMIO ranges and distinct interrupt lines.
///
/// Every MMIO range starts on a 4 KiB page boundary and is rounded up to whole pages, so no two
/// devices share a page and a guest can map each device on its own. Devices that need a larger
/// alignment (a naturally aligned BAR, say) ask for it with
/// [`allocate_mmio_aligned`](Self::allocate_mmio_aligned); the space skipped to reach the
/// alignment stays unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceAllocator {
    /// First address that may be handed out next (not necessarily aligned).
    next_mmio: u64,
    /// End (exclusive) of the MMIO space.
    mmio_end: u64,
    /// Next line to hand out, `None` once all are out.
    next_irq: Option<u32>,
    /// Last line (inclusive) that may be handed out.
    last_irq: u32,
}

impl Default for ResourceAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceAllocator {
    /// Creates an allocator over the x86_64 device MMIO window
    /// `[layout::MMIO32_START, layout::MMIO_DEVICES_END)` and the lines
    /// `layout::IRQ_BASE..=layout::IRQ_MAX`.
    pub fn new() -> Self {
        Self::with_ranges(
            layout::MMIO32_START..layout::MMIO_DEVICES_END,
            layout::IRQ_BASE..=layout::IRQ_MAX,
        )
    }

    /// Creates an allocator over the MMIO addresses `mmio` and the interrupt lines `irqs`.
    ///
    /// Empty ranges are allowed: every allocation from them fails.
    pub fn with_ranges(mmio: Range<u64>, irqs: RangeInclusive<u32>) -> Self {
        let (first_irq, last_irq) = irqs.clone().into_inner();
        ResourceAllocator {
            next_mmio: mmio.start,
            // An inverted range is empty: clamp its end so that nothing fits.
            mmio_end: mmio.end.max(mmio.start),
            next_irq: (!irqs.is_empty()).then_some(first_irq),
            last_irq,
        }
    }

    /// Allocates `size` bytes of MMIO space, page-aligned and rounded up to whole pages.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyMmioRange`] when `size` is 0, [`Error::MmioExhausted`] when the rest of the
    /// MMIO space is too small; the allocator is unchanged then.
    pub fn allocate_mmio(&mut self, size: u64) -> Result<GuestAddress> {
        self.allocate_mmio_aligned(size, PAGE_SIZE)
    }

    /// Allocates `size` bytes of MMIO space starting on a multiple of `align`, rounded up to
    /// whole pages.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyMmioRange`] when `size` is 0, [`Error::InvalidAlignment`] when `align` is not
    /// a power of two of at least 4 KiB, [`Error::MmioExhausted`] when the rest of the MMIO space
    /// is too small; the allocator is unchanged then.
    pub fn allocate_mmio_aligned(&mut self, size: u64, align: u64) -> Result<GuestAddress> {
        if size == 0 {
            return Err(Error::EmptyMmioRange);
        }
        if !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(Error::InvalidAlignment(align));
        }
        let exhausted = Error::MmioExhausted { size, align };
        let base = align_up(self.next_mmio, align).ok_or(exhausted.clone())?;
        let end = align_up(size, PAGE_SIZE)
            .and_then(|len| base.checked_add(len))
            .filter(|&end| end <= self.mmio_end)
            .ok_or(exhausted)?;
        self.next_mmio = end;
        Ok(GuestAddress(base))
    }

    /// Allocates an interrupt line.
    ///
    /// # Errors
    ///
    /// [`Error::IrqExhausted`] when every line has been handed out.
    pub fn allocate_irq(&mut self) -> Result<u32> {
        let irq = self.next_irq.ok_or(Error::IrqExhausted)?;
        // `None` past the last line, or when the last line is `u32::MAX`.
        self.next_irq = irq.checked_add(1).filter(|&next| next <= self.last_irq);
        Ok(irq)
    }
}

/// Rounds `value` up to a multiple of the power of two `align`, `None` on overflow.
fn align_up(value: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    value.checked_add(mask).map(|v| v & !mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `[a, a + a_len)` and `[b, b + b_len)` share an address.
    fn overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
        a < b + b_len && b < a + a_len
    }

    #[test]
    fn first_mmio_range_is_the_start_of_the_gap() {
        let mut alloc = ResourceAllocator::new();
        assert_eq!(
            alloc.allocate_mmio(0x1000).unwrap(),
            GuestAddress(layout::MMIO32_START)
        );
        assert_eq!(
            alloc.allocate_mmio(0x200).unwrap(),
            GuestAddress(layout::MMIO32_START + 0x1000)
        );
    }

    #[test]
    fn mmio_ranges_are_page_aligned_and_rounded_to_whole_pages() {
        let mut alloc = ResourceAllocator::with_ranges(0x1_0000..0x10_0000, 0..=0);
        let a = alloc.allocate_mmio(1).unwrap();
        let b = alloc.allocate_mmio(0x1001).unwrap();
        let c = alloc.allocate_mmio(0x10).unwrap();
        assert_eq!(a, GuestAddress(0x1_0000));
        assert_eq!(b, GuestAddress(0x1_1000));
        assert_eq!(c, GuestAddress(0x1_3000));
    }

    #[test]
    fn unaligned_window_start_is_rounded_up() {
        let mut alloc = ResourceAllocator::with_ranges(0x1234..0x10_0000, 0..=0);
        assert_eq!(alloc.allocate_mmio(0x1000).unwrap(), GuestAddress(0x2000));
    }

    #[test]
    fn aligned_allocation_skips_to_the_alignment() {
        let mut alloc = ResourceAllocator::with_ranges(0x10_0000..0x100_0000, 0..=0);
        assert_eq!(
            alloc.allocate_mmio(0x1000).unwrap(),
            GuestAddress(0x10_0000)
        );
        assert_eq!(
            alloc.allocate_mmio_aligned(0x4_0000, 0x4_0000).unwrap(),
            GuestAddress(0x14_0000)
        );
        assert_eq!(
            alloc.allocate_mmio(0x1000).unwrap(),
            GuestAddress(0x18_0000)
        );
    }

    #[test]
    fn alignment_must_be_a_power_of_two_of_at_least_a_page() {
        let mut alloc = ResourceAllocator::new();
        for align in [0, 1, 0x800, 0x3000, 0x1001, u64::MAX] {
            assert_eq!(
                alloc.allocate_mmio_aligned(0x1000, align),
                Err(Error::InvalidAlignment(align))
            );
        }
        // Nothing was consumed by the failures.
        assert_eq!(
            alloc.allocate_mmio(0x1000).unwrap(),
            GuestAddress(layout::MMIO32_START)
        );
    }

    #[test]
    fn empty_mmio_range_is_rejected() {
        let mut alloc = ResourceAllocator::new();
        assert_eq!(alloc.allocate_mmio(0), Err(Error::EmptyMmioRange));
    }

    #[test]
    fn mmio_ranges_never_overlap() {
        let mut alloc = ResourceAllocator::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for size in [0x1000, 0x200, 0x3000, 0x1, 0x1_0000, 0xfff, 0x2001] {
            let base = alloc.allocate_mmio(size).unwrap().0;
            assert_eq!(base % PAGE_SIZE, 0);
            assert!(base >= layout::MMIO32_START);
            assert!(base + size <= layout::MMIO_DEVICES_END);
            for &(other, other_size) in &ranges {
                assert!(!overlap(base, size, other, other_size), "{base:#x}");
            }
            ranges.push((base, size));
        }
    }

    #[test]
    fn mmio_space_runs_out_with_an_error() {
        let mut alloc = ResourceAllocator::with_ranges(0x1000..0x4000, 0..=0);
        assert_eq!(
            alloc.allocate_mmio(0x4000),
            Err(Error::MmioExhausted {
                size: 0x4000,
                align: PAGE_SIZE
            })
        );
        assert_eq!(alloc.allocate_mmio(0x2000).unwrap(), GuestAddress(0x1000));
        assert_eq!(alloc.allocate_mmio(0x1000).unwrap(), GuestAddress(0x3000));
        assert!(matches!(
            alloc.allocate_mmio(1),
            Err(Error::MmioExhausted { size: 1, .. })
        ));
    }

    #[test]
    fn whole_default_window_can_be_handed_out_exactly_once() {
        let mut alloc = ResourceAllocator::new();
        let window = layout::MMIO_DEVICES_END - layout::MMIO32_START;
        assert_eq!(
            alloc.allocate_mmio(window).unwrap(),
            GuestAddress(layout::MMIO32_START)
        );
        assert!(matches!(
            alloc.allocate_mmio(0x1000),
            Err(Error::MmioExhausted { .. })
        ));
    }

    #[test]
    fn sizes_and_windows_near_the_top_of_the_address_space_do_not_overflow() {
        // [2^64 - 8 KiB, 2^64 - 1): the window's second page would end at 2^64, past its end.
        let mut alloc = ResourceAllocator::with_ranges(u64::MAX - 0x1fff..u64::MAX, 0..=0);
        for (size, align) in [
            (u64::MAX, PAGE_SIZE),
            (u64::MAX - 0xfff, PAGE_SIZE),
            (0x2000, PAGE_SIZE),
            (0x1000, 1 << 63),
        ] {
            assert_eq!(
                alloc.allocate_mmio_aligned(size, align),
                Err(Error::MmioExhausted { size, align })
            );
        }
        assert_eq!(
            alloc.allocate_mmio(0x1000).unwrap(),
            GuestAddress(u64::MAX - 0x1fff)
        );
        assert!(matches!(
            alloc.allocate_mmio(1),
            Err(Error::MmioExhausted { .. })
        ));
    }

    #[test]
    // Inverted ranges are what this test feeds the allocator.
    #[allow(clippy::reversed_empty_ranges)]
    fn empty_or_inverted_windows_allocate_nothing() {
        let mut alloc = ResourceAllocator::with_ranges(0x2000..0x2000, 5..=4);
        assert!(matches!(
            alloc.allocate_mmio(0x1000),
            Err(Error::MmioExhausted { .. })
        ));
        assert_eq!(alloc.allocate_irq(), Err(Error::IrqExhausted));
        let mut alloc = ResourceAllocator::with_ranges(0x4000..0x2000, 0..=0);
        assert!(matches!(
            alloc.allocate_mmio(0x1000),
            Err(Error::MmioExhausted { .. })
        ));
    }

    #[test]
    fn irqs_are_handed_out_in_order_until_exhausted() {
        let mut alloc = ResourceAllocator::new();
        let irqs: Vec<u32> = std::iter::from_fn(|| alloc.allocate_irq().ok()).collect();
        assert_eq!(
            irqs,
            (layout::IRQ_BASE..=layout::IRQ_MAX).collect::<Vec<_>>()
        );
        assert!(!irqs.contains(&layout::SERIAL_IRQ));
        assert!(!irqs.contains(&layout::I8042_IRQ));
        assert_eq!(alloc.allocate_irq(), Err(Error::IrqExhausted));
        assert_eq!(alloc.allocate_irq(), Err(Error::IrqExhausted));
    }

    #[test]
    fn last_irq_at_u32_max_does_not_overflow() {
        let mut alloc = ResourceAllocator::with_ranges(0..0, u32::MAX - 1..=u32::MAX);
        assert_eq!(alloc.allocate_irq(), Ok(u32::MAX - 1));
        assert_eq!(alloc.allocate_irq(), Ok(u32::MAX));
        assert_eq!(alloc.allocate_irq(), Err(Error::IrqExhausted));
    }

    #[test]
    fn mmio_and_irq_allocation_are_independent() {
        let mut alloc = ResourceAllocator::new();
        assert_eq!(alloc.allocate_irq(), Ok(layout::IRQ_BASE));
        let mmio = alloc.allocate_mmio(0x1000).unwrap();
        assert_eq!(mmio, GuestAddress(layout::MMIO32_START));
        assert_eq!(alloc.allocate_irq(), Ok(layout::IRQ_BASE + 1));
    }
}
