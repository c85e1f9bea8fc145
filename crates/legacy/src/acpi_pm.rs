//! The ACPI PM1a registers, through which a guest powers off.
//!
//! An ACPI guest enters a sleep state by writing the state's sleep type (SLP_TYP, bits 12:10)
//! with "sleep enable" (SLP_EN, bit 13) to the PM1a control register; the sleep type of each
//! state comes from the firmware tables (the DSDT's `\_S5_` object for soft-off). When the guest
//! asks for the soft-off state, [`AcpiPmDevice`] fires its power-off [`Trigger`], on which the
//! VMM stops the VM cleanly. Other sleep states are not supported and are ignored.
//!
//! The device covers the PM1a event block and the PM1a control block, one after the other, as
//! the FADT describes them:
//!
//! | offset | register | read | write |
//! |--------|----------|------|-------|
//! | 0 | PM1 status (2 bytes) | 0: no event pending | ignored (write 1 to clear) |
//! | 2 | PM1 enable (2 bytes) | the last value written | kept |
//! | 4 | PM1 control (2 bytes) | SCI_EN set, the last SLP_TYP | SLP_EN with the soft-off SLP_TYP powers off |
//!
//! Accesses of one or two bytes inside a register work; others read as zero and are ignored.
//!
//! For a snapshot, [`AcpiPmDevice::save_state`] returns an [`AcpiPmState`] (the enable and control
//! registers; the status register holds no event, so nothing) and [`AcpiPmDevice::restore_state`]
//! puts one back. The soft-off sleep type is the machine's configuration, given again to
//! [`AcpiPmDevice::new`].

use std::io;

use ember_bus::BusDeviceMut;
use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::trigger::EventFdTrigger;

/// Length of the device's port range: the 4-byte event block, then the 2-byte control block.
pub const ACPI_PM_LEN: u64 = 6;

/// Offset of the PM1 enable register.
const ENABLE_OFFSET: u64 = 2;
/// Offset of the PM1 control register.
const CONTROL_OFFSET: u64 = 4;

/// PM1 control: SCI enable; always set, the machine is always in ACPI mode.
const SCI_EN: u16 = 1;
/// PM1 control: the sleep type field's position and width.
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
/// PM1 control: sleep enable (write-only).
const SLP_EN: u16 = 1 << 13;

/// Errors of the ACPI PM registers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A saved PM1 control register holds bits the register never holds.
    #[error(
        "The saved ACPI PM1 control register holds {0:#06x}: only SCI_EN (set) and SLP_TYP exist"
    )]
    StateControl(u16),
}

/// Result type of the ACPI PM registers.
pub type Result<T> = std::result::Result<T, Error>;

/// The saved state of an [`AcpiPmDevice`]. The PM1 status register is not part of it: no event
/// is ever pending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// The PM1 enable register, as the guest wrote it.
    pub enable: u16,
    /// The PM1 control register: SCI_EN (bit 0, always set) and the last sleep type written
    /// (bits 12:10).
    pub control: u16,
}

/// The PM1a event and control registers of an ACPI machine whose only sleep state is soft-off,
/// with the power-off request on a vm-superio [`Trigger`] ([`EventFdTrigger`] by default).
#[derive(Debug)]
pub struct AcpiPmDevice<T: Trigger<E = io::Error> = EventFdTrigger> {
    power_off: T,
    soft_off_type: u16,
    enable: u16,
    control: u16,
}

impl<T: Trigger<E = io::Error>> AcpiPmDevice<T> {
    /// A device that fires `power_off` when the guest enters the sleep state of type
    /// `soft_off_type`: the value the machine's DSDT gives in its `\_S5_` package.
    pub fn new(power_off: T, soft_off_type: u16) -> Self {
        AcpiPmDevice {
            power_off,
            soft_off_type,
            enable: 0,
            control: SCI_EN,
        }
    }

    /// The registers' state, for a snapshot.
    pub fn save_state(&self) -> AcpiPmState {
        AcpiPmState {
            enable: self.enable,
            control: self.control,
        }
    }

    /// Puts the registers in `state`. Nothing is triggered: the guest enters a sleep state only
    /// by writing to the control register.
    ///
    /// # Errors
    ///
    /// [`Error::StateControl`] when the control register has SCI_EN clear or bits other than
    /// SCI_EN and SLP_TYP set; the device is unchanged then.
    pub fn restore_state(&mut self, state: &AcpiPmState) -> Result<()> {
        if state.control & SCI_EN == 0 || state.control & !(SCI_EN | SLP_TYP_MASK) != 0 {
            return Err(Error::StateControl(state.control));
        }
        self.enable = state.enable;
        self.control = state.control;
        Ok(())
    }

    /// The 16-bit register at `offset` and the byte within it, if the access fits inside it.
    fn register(offset: u64, len: usize) -> Option<(u64, usize)> {
        let register = offset & !1;
        let byte = usize::try_from(offset & 1).ok()?;
        if register > CONTROL_OFFSET || len == 0 || byte.checked_add(len)? > 2 {
            return None;
        }
        Some((register, byte))
    }

    fn write_control(&mut self, value: u16) {
        self.control = SCI_EN | (value & SLP_TYP_MASK);
        if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == self.soft_off_type {
            if let Err(e) = self.power_off.trigger() {
                log::error!("Cannot signal the guest's power-off: {e}");
            }
        }
    }
}

impl<T: Trigger<E = io::Error> + Send> BusDeviceMut for AcpiPmDevice<T> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((register, byte)) = Self::register(offset, data.len()) else {
            return;
        };
        let value = match register {
            ENABLE_OFFSET => self.enable,
            CONTROL_OFFSET => self.control,
            _ => 0,
        };
        for (out, value) in data.iter_mut().zip(value.to_le_bytes().iter().skip(byte)) {
            *out = *value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some((register, byte)) = Self::register(offset, data.len()) else {
            return;
        };
        let merge = |old: u16| {
            let mut bytes = old.to_le_bytes();
            for (slot, value) in bytes.iter_mut().skip(byte).zip(data) {
                *slot = *value;
            }
            u16::from_le_bytes(bytes)
        };
        match register {
            ENABLE_OFFSET => self.enable = merge(self.enable),
            CONTROL_OFFSET => self.write_control(merge(self.control)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S5: u16 = 5;

    fn device() -> (AcpiPmDevice, EventFdTrigger) {
        let trigger = EventFdTrigger::new().unwrap();
        (AcpiPmDevice::new(trigger.try_clone().unwrap(), S5), trigger)
    }

    fn fired(trigger: &EventFdTrigger) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: trigger.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that outlives the call; a zero timeout does not block.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready == 1
    }

    fn read16(dev: &mut AcpiPmDevice, offset: u64) -> u16 {
        let mut data = [0xaa; 2];
        dev.read(0x600, offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn linux_power_off_sequence_fires_the_trigger_once_enabled() {
        let (mut dev, trigger) = device();
        // acpi_hw_legacy_sleep: the sleep type first, then the same with SLP_EN.
        let typ = S5 << SLP_TYP_SHIFT;
        dev.write(0x600, CONTROL_OFFSET, &typ.to_le_bytes());
        assert!(!fired(&trigger), "no power-off before SLP_EN");
        dev.write(0x600, CONTROL_OFFSET, &(typ | SLP_EN).to_le_bytes());
        assert!(fired(&trigger));
    }

    #[test]
    fn other_sleep_types_do_not_power_off() {
        let (mut dev, trigger) = device();
        for typ in (0..8).filter(|t| *t != S5) {
            dev.write(
                0x600,
                CONTROL_OFFSET,
                &((typ << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
            );
        }
        assert!(!fired(&trigger));
    }

    #[test]
    fn control_reads_sci_enabled_and_the_sleep_type_but_never_slp_en() {
        let (mut dev, _trigger) = device();
        assert_eq!(read16(&mut dev, CONTROL_OFFSET), SCI_EN);
        dev.write(
            0x600,
            CONTROL_OFFSET,
            &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert_eq!(
            read16(&mut dev, CONTROL_OFFSET),
            SCI_EN | (3 << SLP_TYP_SHIFT)
        );
    }

    #[test]
    fn byte_writes_to_the_high_half_of_control_power_off() {
        let (mut dev, trigger) = device();
        let value = (S5 << SLP_TYP_SHIFT) | SLP_EN;
        dev.write(0x600, CONTROL_OFFSET + 1, &[value.to_le_bytes()[1]]);
        assert!(fired(&trigger));
    }

    #[test]
    fn status_reads_zero_and_enable_keeps_its_value() {
        let (mut dev, _trigger) = device();
        dev.write(0x600, 0, &[0xff, 0xff]);
        assert_eq!(read16(&mut dev, 0), 0);
        dev.write(0x600, ENABLE_OFFSET, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut dev, ENABLE_OFFSET), 0x0120);
        let mut high = [0];
        dev.read(0x600, ENABLE_OFFSET + 1, &mut high);
        assert_eq!(high, [0x01]);
    }

    #[test]
    fn accesses_outside_or_across_registers_read_zero_and_are_ignored() {
        let (mut dev, trigger) = device();
        let value = ((S5 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes();
        for (offset, len) in [
            (CONTROL_OFFSET, 4),
            (CONTROL_OFFSET + 1, 2),
            (6, 1),
            (u64::MAX, 1),
        ] {
            let data = [value[0], value[1], 0, 0];
            dev.write(0x600, offset, &data[..len]);
            let mut out = vec![0xaa; len];
            dev.read(0x600, offset, &mut out);
            assert!(out.iter().all(|b| *b == 0), "offset {offset} len {len}");
        }
        dev.write(0x600, CONTROL_OFFSET, &[]);
        assert!(!fired(&trigger));
    }

    #[test]
    fn enable_bits_and_sleep_type_survive_a_restore_and_power_off_still_works() {
        let (mut old, _) = device();
        dev_write16(&mut old, ENABLE_OFFSET, 0x0121);
        dev_write16(&mut old, CONTROL_OFFSET, 3 << SLP_TYP_SHIFT);
        let state = old.save_state();
        assert_eq!(
            state,
            AcpiPmState {
                enable: 0x0121,
                control: SCI_EN | (3 << SLP_TYP_SHIFT)
            }
        );
        let bytes = postcard::to_allocvec(&state).unwrap();
        let restored: AcpiPmState = postcard::from_bytes(&bytes).unwrap();

        let (mut new, trigger) = device();
        new.restore_state(&restored).unwrap();
        assert!(!fired(&trigger), "restoring does not power off");
        for offset in [0, ENABLE_OFFSET, CONTROL_OFFSET] {
            assert_eq!(read16(&mut new, offset), read16(&mut old, offset));
        }
        dev_write16(&mut new, CONTROL_OFFSET, (S5 << SLP_TYP_SHIFT) | SLP_EN);
        assert!(fired(&trigger));
    }

    #[test]
    fn a_control_register_with_bits_it_never_holds_is_refused() {
        let (mut dev, _) = device();
        dev_write16(&mut dev, ENABLE_OFFSET, 0x0020);
        let before = dev.save_state();
        for control in [0, 5 << SLP_TYP_SHIFT, SCI_EN | SLP_EN, SCI_EN | 0x8000] {
            let err = dev
                .restore_state(&AcpiPmState { enable: 0, control })
                .unwrap_err();
            assert!(matches!(err, Error::StateControl(c) if c == control));
        }
        assert_eq!(dev.save_state(), before);
    }

    fn dev_write16(dev: &mut AcpiPmDevice, offset: u64, value: u16) {
        dev.write(0x600, offset, &value.to_le_bytes());
    }
}
