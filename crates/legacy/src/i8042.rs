//! The i8042 PS/2 controller, for its CPU reset line and a keyboard that can send Ctrl+Alt+Del.
//!
//! A Linux guest booted with `reboot=k` reboots by writing the reset command `0xFE` to the
//! controller's command port. vm-superio's [`I8042Device`](vm_superio::I8042Device) turns that
//! command into a [`Trigger`] on the reset eventfd, which the VMM's event loop waits on to stop the
//! VM cleanly. Around it, [`I8042Device`] emulates what the guest's i8042 and keyboard drivers need
//! to find a controller there, and an output buffer through which the VMM sends the guest the
//! Ctrl+Alt+Del key sequence (scan code set 2), announced on the keyboard interrupt line (IRQ 1).
//!
//! The guest sees:
//!
//! | port | read | write |
//! |------|------|-------|
//! | 0x60 (offset 0) | next output buffer byte (0 when empty) | parameter of the last command, or a keyboard command (acknowledged with `0xFA`) |
//! | 0x64 (offset 4) | status register | controller command: `0x20`/`0x60` read/write the control register, `0xD0`/`0xD1` the output port, `0xAA` self-test, `0xFE` CPU reset |
//!
//! Other offsets and accesses longer than a byte read as `0xff` and ignore writes. The keyboard
//! answers commands with an acknowledgement only, so Linux guests want `i8042.dumbkbd` (and
//! `i8042.noaux i8042.nomux i8042.nopnp` to skip probing what is not there).
//!
//! For a snapshot, [`I8042Device::save_state`] returns an [`I8042State`] (the control register,
//! the output port, a command waiting for its parameter and the bytes waiting in the output
//! buffer; the status register derives from them) and [`I8042Device::restore_state`] puts one
//! back.

use std::collections::VecDeque;
use std::io;

use ember_bus::BusDeviceMut;
use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::throttle::{Counter, worth_logging};
use crate::trigger::EventFdTrigger;

/// I/O port of the controller's data register; the range continues to the command port 0x64.
pub const I8042_PORT: u64 = 0x60;

/// Length of the port range from [`I8042_PORT`] through the command/status port 0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// Offset of the data port (0x60).
const DATA_OFFSET: u64 = 0;
/// Offset of the command (write) and status (read) port (0x64).
const COMMAND_OFFSET: u64 = 4;
/// [`COMMAND_OFFSET`] as vm-superio's device takes it.
const COMMAND_OFFSET_U8: u8 = 4;

/// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;

/// Status register: the output buffer holds a byte for the guest.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
/// Status register: the last write was a command; the controller expects its parameter.
const SB_CMD_DATA: u8 = 0x08;
/// Status register: the keyboard is not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

/// Control register: raise the keyboard interrupt when the output buffer fills.
const CB_KBD_INT: u8 = 0x01;
/// Control register: the system passed its power-on self-test.
const CB_POST_OK: u8 = 0x04;

/// Answer to a successful controller self-test.
const SELF_TEST_OK: u8 = 0x55;
/// The keyboard's acknowledgement of a command.
const KBD_ACK: u8 = 0xFA;

/// Ctrl, Alt and Delete pressed, in scan code set 2 (Delete is an extended, two-byte key).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xE0, 0x71];

/// Capacity of the output buffer in bytes.
pub const I8042_BUF_SIZE: usize = 16;
const BUF_SIZE: usize = I8042_BUF_SIZE;

/// What a read of an unhandled port or with an unsupported access length returns.
const UNHANDLED_READ: u8 = 0xff;

/// Errors of the i8042 controller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest has not read enough of the output buffer to make room for the key sequence.
    #[error("The i8042 output buffer has no room for the key sequence")]
    BufferFull,
    /// The keyboard interrupt could not be signalled.
    #[error("Cannot signal the keyboard interrupt")]
    KbdInterrupt(#[source] io::Error),
    /// A saved state holds more output than the output buffer does.
    #[error(
        "The saved i8042 state holds {len} output bytes, more than the {I8042_BUF_SIZE}-byte \
         output buffer"
    )]
    StateBufferTooLong {
        /// Number of output bytes in the state.
        len: usize,
    },
    /// A saved state waits for the parameter of a command that takes none.
    #[error("The saved i8042 state waits for a parameter of command {0:#04x}, which takes none")]
    StatePendingCommand(u8),
}

/// The saved state of an [`I8042Device`]. The status register is not part of it: it derives
/// from the output buffer and the pending command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The control register ("command byte"), read and written with commands `0x20` and `0x60`.
    pub control: u8,
    /// The output port, read and written with commands `0xD0` and `0xD1`.
    pub output_port: u8,
    /// A command written to the command port whose parameter the guest has not written yet:
    /// `0x60` or `0xD1`.
    pub pending_command: Option<u8>,
    /// The bytes the guest has not read from the data port yet, oldest first; at most
    /// [`I8042_BUF_SIZE`].
    pub output_buffer: Vec<u8>,
}

/// Result type of the i8042 controller.
pub type Result<T> = std::result::Result<T, Error>;

/// An i8042 controller on the port I/O bus at [`I8042_PORT`], length [`I8042_PORT_LEN`], with
/// its reset request and keyboard interrupt on vm-superio [`Trigger`]s: [`EventFdTrigger`]s by
/// default, or whatever delivers them in the VMM that hosts it.
#[derive(Debug)]
pub struct I8042Device<T: Trigger<E = io::Error> = EventFdTrigger> {
    /// vm-superio's controller, which owns the reset line.
    reset: vm_superio::I8042Device<T>,
    /// Keyboard interrupt line (IRQ 1).
    kbd_interrupt: T,
    /// Control register ("command byte").
    control: u8,
    /// Output port.
    outp: u8,
    /// A command written to the command port that waits for its parameter on the data port.
    pending_cmd: Option<u8>,
    /// Bytes for the guest to read from the data port, at most [`BUF_SIZE`].
    buf: VecDeque<u8>,
    reset_errors: Counter,
    interrupt_errors: Counter,
}

impl<T: Trigger<E = io::Error>> I8042Device<T> {
    /// Creates a controller that fires `reset_evt` when the guest requests a CPU reset and
    /// `kbd_interrupt` to raise the keyboard interrupt line.
    pub fn new(reset_evt: T, kbd_interrupt: T) -> Self {
        I8042Device {
            reset: vm_superio::I8042Device::new(reset_evt),
            kbd_interrupt,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            pending_cmd: None,
            buf: VecDeque::with_capacity(BUF_SIZE),
            reset_errors: Counter::default(),
            interrupt_errors: Counter::default(),
        }
    }

    /// The trigger fired when the guest requests a CPU reset; with an [`EventFdTrigger`], the
    /// VMM stops the VM when its eventfd becomes readable.
    pub fn reset_evt(&self) -> &T {
        self.reset.reset_evt()
    }

    /// The keyboard interrupt's trigger (for an [`EventFdTrigger`], the VMM registers its eventfd
    /// as the irqfd of line 1).
    pub fn kbd_interrupt(&self) -> &T {
        &self.kbd_interrupt
    }

    /// Queues the Ctrl+Alt+Del key presses for the guest and raises the keyboard interrupt (unless
    /// the guest disabled it, in which case the keys wait for the guest to poll). A Linux guest
    /// reboots on it, or runs what its init maps the keys to.
    ///
    /// # Errors
    ///
    /// [`Error::BufferFull`] when the output buffer cannot take the whole sequence (nothing is
    /// queued then); [`Error::KbdInterrupt`] when the interrupt cannot be signalled (the keys are
    /// queued).
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<()> {
        if BUF_SIZE - self.buf.len() < CTRL_ALT_DEL.len() {
            return Err(Error::BufferFull);
        }
        self.buf.extend(CTRL_ALT_DEL);
        self.raise_kbd_interrupt().map_err(Error::KbdInterrupt)
    }

    /// The controller's state, for a snapshot.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            control: self.control,
            output_port: self.outp,
            pending_command: self.pending_cmd,
            output_buffer: self.buf.iter().copied().collect(),
        }
    }

    /// Puts the controller in `state`, keeping its triggers. When the output buffer holds bytes
    /// and the guest enabled the keyboard interrupt, the interrupt is raised again (its signal
    /// was lost with the VMM that saved the state), so that the guest reads them.
    ///
    /// # Errors
    ///
    /// [`Error::StateBufferTooLong`] when the state holds more than [`I8042_BUF_SIZE`] output
    /// bytes, [`Error::StatePendingCommand`] when it waits for the parameter of a command other
    /// than `0x60` or `0xD1`; the device is unchanged then. [`Error::KbdInterrupt`] when the
    /// interrupt cannot be signalled (the state is restored).
    pub fn restore_state(&mut self, state: &I8042State) -> Result<()> {
        let len = state.output_buffer.len();
        if len > BUF_SIZE {
            return Err(Error::StateBufferTooLong { len });
        }
        match state.pending_command {
            None | Some(CMD_WRITE_CTR | CMD_WRITE_OUTP) => {}
            Some(cmd) => return Err(Error::StatePendingCommand(cmd)),
        }
        self.control = state.control;
        self.outp = state.output_port;
        self.pending_cmd = state.pending_command;
        self.buf.clear();
        self.buf.extend(state.output_buffer.iter().copied());
        if self.buf.is_empty() {
            return Ok(());
        }
        self.raise_kbd_interrupt().map_err(Error::KbdInterrupt)
    }

    /// The status register, derived from the controller's state.
    fn status(&self) -> u8 {
        let mut status = SB_KBD_ENABLED;
        if !self.buf.is_empty() {
            status |= SB_OUT_DATA_AVAIL;
        }
        if self.pending_cmd.is_some() {
            status |= SB_CMD_DATA;
        }
        status
    }

    /// Replaces the output buffer's content with the one-byte answer to a command.
    fn answer(&mut self, byte: u8) {
        self.buf.clear();
        self.buf.push_back(byte);
    }

    /// Raises the keyboard interrupt if the guest enabled it in the control register.
    fn raise_kbd_interrupt(&self) -> io::Result<()> {
        if self.control & CB_KBD_INT == 0 {
            return Ok(());
        }
        self.kbd_interrupt.trigger()
    }

    /// Raises the keyboard interrupt on behalf of a guest access, logging failures sparingly.
    fn raise_kbd_interrupt_for_guest(&self) {
        if let Err(err) = self.raise_kbd_interrupt() {
            let count = self.interrupt_errors.inc();
            if worth_logging(count) {
                log::error!("Cannot signal the keyboard interrupt ({count} failures): {err}");
            }
        }
    }

    fn write_command(&mut self, cmd: u8) {
        // vm-superio's controller acts on the reset command and ignores the others.
        if let Err(err) = self.reset.write(COMMAND_OFFSET_U8, cmd) {
            let count = self.reset_errors.inc();
            if worth_logging(count) {
                log::error!("Cannot signal the guest's reset request ({count} failures): {err}");
            }
        }
        match cmd {
            CMD_READ_CTR => self.answer(self.control),
            CMD_READ_OUTP => self.answer(self.outp),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => {
                self.buf.clear();
                self.pending_cmd = Some(cmd);
            }
            // The CPU reset, and commands this controller has nothing to do for (enabling or
            // disabling ports, for instance).
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            Some(_) => {}
            None => {
                // A command for the keyboard itself, which acknowledges everything.
                self.answer(KBD_ACK);
                self.raise_kbd_interrupt_for_guest();
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.buf.pop_front().unwrap_or(0);
        // One interrupt per byte: announce the next one if there is more to read.
        if !self.buf.is_empty() {
            self.raise_kbd_interrupt_for_guest();
        }
        byte
    }
}

impl<T: Trigger<E = io::Error> + Send> BusDeviceMut for I8042Device<T> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_data(),
            (COMMAND_OFFSET, 1) => self.status(),
            _ => UNHANDLED_READ,
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[value]) => self.write_data(value),
            (COMMAND_OFFSET, &[cmd]) => self.write_command(cmd),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller and the triggers it fires, to count.
    struct Rig {
        dev: I8042Device,
        reset: EventFdTrigger,
        kbd: EventFdTrigger,
    }

    fn rig() -> Rig {
        let reset = EventFdTrigger::new().unwrap();
        let kbd = EventFdTrigger::new().unwrap();
        let dev = I8042Device::new(reset.try_clone().unwrap(), kbd.try_clone().unwrap());
        Rig { dev, reset, kbd }
    }

    /// How often `trigger` fired since the last look.
    fn fired(trigger: &EventFdTrigger) -> u64 {
        trigger.eventfd().read().unwrap_or(0)
    }

    impl Rig {
        fn inb(&mut self, offset: u64) -> u8 {
            let mut data = [0u8];
            self.dev.read(I8042_PORT, offset, &mut data);
            data[0]
        }

        fn outb(&mut self, offset: u64, value: u8) {
            self.dev.write(I8042_PORT, offset, &[value]);
        }
    }

    #[test]
    fn the_reset_command_fires_the_reset_line_and_nothing_else_does() {
        let mut rig = rig();
        for cmd in [CMD_READ_CTR, CMD_SELF_TEST, 0xA7, 0xAD] {
            rig.outb(COMMAND_OFFSET, cmd);
        }
        assert_eq!(fired(&rig.reset), 0);
        rig.outb(COMMAND_OFFSET, 0xFE);
        assert_eq!(fired(&rig.reset), 1);
        // The triggers the device hands out are the ones it was given.
        rig.dev.reset_evt().trigger().unwrap();
        assert_eq!(fired(&rig.reset), 1);
        rig.dev.kbd_interrupt().trigger().unwrap();
        assert_eq!(fired(&rig.kbd), 1);
    }

    #[test]
    fn the_control_register_and_output_port_round_trip() {
        let mut rig = rig();
        // Power-on state: the keyboard interrupt on, the self-test passed.
        rig.outb(COMMAND_OFFSET, CMD_READ_CTR);
        assert_eq!(
            rig.inb(COMMAND_OFFSET) & SB_OUT_DATA_AVAIL,
            SB_OUT_DATA_AVAIL
        );
        assert_eq!(rig.inb(DATA_OFFSET), CB_POST_OK | CB_KBD_INT);
        assert_eq!(rig.inb(COMMAND_OFFSET) & SB_OUT_DATA_AVAIL, 0);

        rig.outb(COMMAND_OFFSET, CMD_WRITE_CTR);
        assert_ne!(
            rig.inb(COMMAND_OFFSET) & SB_CMD_DATA,
            0,
            "a parameter is expected"
        );
        rig.outb(DATA_OFFSET, 0x45);
        assert_eq!(rig.inb(COMMAND_OFFSET) & SB_CMD_DATA, 0);
        rig.outb(COMMAND_OFFSET, CMD_READ_CTR);
        assert_eq!(rig.inb(DATA_OFFSET), 0x45);

        rig.outb(COMMAND_OFFSET, CMD_WRITE_OUTP);
        rig.outb(DATA_OFFSET, 0x03);
        rig.outb(COMMAND_OFFSET, CMD_READ_OUTP);
        assert_eq!(rig.inb(DATA_OFFSET), 0x03);

        rig.outb(COMMAND_OFFSET, CMD_SELF_TEST);
        assert_eq!(rig.inb(DATA_OFFSET), SELF_TEST_OK);
        // An empty output buffer reads as 0.
        assert_eq!(rig.inb(DATA_OFFSET), 0);
        assert_ne!(rig.inb(COMMAND_OFFSET) & SB_KBD_ENABLED, 0);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_an_interrupt() {
        let mut rig = rig();
        rig.outb(DATA_OFFSET, 0xF2);
        assert_eq!(fired(&rig.kbd), 1);
        assert_eq!(rig.inb(DATA_OFFSET), KBD_ACK);
        // Without the interrupt enabled in the control register, none is raised.
        rig.outb(COMMAND_OFFSET, CMD_WRITE_CTR);
        rig.outb(DATA_OFFSET, CB_POST_OK);
        rig.outb(DATA_OFFSET, 0xED);
        assert_eq!(fired(&rig.kbd), 0);
        assert_eq!(rig.inb(DATA_OFFSET), KBD_ACK);
    }

    #[test]
    fn ctrl_alt_del_queues_the_keys_one_interrupt_per_byte() {
        let mut rig = rig();
        rig.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(fired(&rig.kbd), 1);
        let mut keys = Vec::new();
        while rig.inb(COMMAND_OFFSET) & SB_OUT_DATA_AVAIL != 0 {
            keys.push(rig.inb(DATA_OFFSET));
        }
        assert_eq!(keys, CTRL_ALT_DEL);
        // One interrupt announced each byte after the first.
        assert_eq!(fired(&rig.kbd), 3);
        // A guest that never reads fills the buffer; the next sequence is refused whole.
        for _ in 0..BUF_SIZE / CTRL_ALT_DEL.len() {
            rig.dev.trigger_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            rig.dev.trigger_ctrl_alt_del(),
            Err(Error::BufferFull)
        ));
        assert_eq!(rig.dev.buf.len(), BUF_SIZE);
    }

    #[test]
    fn other_offsets_and_widths_read_all_ones_and_ignore_writes() {
        let mut rig = rig();
        let mut wide = [0u8; 2];
        rig.dev.read(I8042_PORT, DATA_OFFSET, &mut wide);
        assert_eq!(wide, [UNHANDLED_READ; 2]);
        assert_eq!(rig.inb(2), UNHANDLED_READ);
        rig.dev.write(I8042_PORT, COMMAND_OFFSET, &[0xFE, 0xFE]);
        rig.outb(1, 0xFE);
        assert_eq!(fired(&rig.reset), 0);
        assert_eq!(fired(&rig.kbd), 0);
    }

    fn round_trip(state: &I8042State) -> I8042State {
        postcard::from_bytes(&postcard::to_allocvec(state).unwrap()).unwrap()
    }

    #[test]
    fn a_pending_key_survives_a_restore_and_raises_its_interrupt() {
        let mut old = rig();
        old.outb(COMMAND_OFFSET, CMD_WRITE_OUTP);
        old.outb(DATA_OFFSET, 0x03);
        // The guest is about to write the control register when the keys come; it reads one.
        old.outb(COMMAND_OFFSET, CMD_WRITE_CTR);
        old.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(old.inb(DATA_OFFSET), CTRL_ALT_DEL[0]);
        let state = old.dev.save_state();
        assert_eq!(state.output_buffer, &CTRL_ALT_DEL[1..]);
        assert_eq!(state.pending_command, Some(CMD_WRITE_CTR));

        let mut new = rig();
        new.dev.restore_state(&round_trip(&state)).unwrap();
        assert_eq!(new.dev.save_state(), state);
        assert_eq!(fired(&new.kbd), 1, "the pending key is announced again");
        assert_eq!(new.inb(COMMAND_OFFSET), old.inb(COMMAND_OFFSET));
        new.outb(DATA_OFFSET, CB_KBD_INT | CB_POST_OK);
        new.outb(COMMAND_OFFSET, CMD_READ_OUTP);
        assert_eq!(new.inb(DATA_OFFSET), 0x03);

        let mut fresh = rig();
        fresh.dev.restore_state(&round_trip(&state)).unwrap();
        fired(&fresh.kbd);
        let mut keys = Vec::new();
        while fresh.inb(COMMAND_OFFSET) & SB_OUT_DATA_AVAIL != 0 {
            keys.push(fresh.inb(DATA_OFFSET));
        }
        assert_eq!(keys, &CTRL_ALT_DEL[1..]);
        assert_eq!(fired(&fresh.kbd), 2, "one interrupt per further byte");
        // The reset line still works.
        fresh.outb(COMMAND_OFFSET, 0xFE);
        assert_eq!(fired(&fresh.reset), 1);
    }

    #[test]
    fn an_empty_buffer_or_a_disabled_interrupt_raises_nothing_on_restore() {
        let mut old = rig();
        old.outb(COMMAND_OFFSET, CMD_WRITE_CTR);
        old.outb(DATA_OFFSET, CB_POST_OK);
        let mut new = rig();
        new.dev.restore_state(&old.dev.save_state()).unwrap();
        assert_eq!(fired(&new.kbd), 0);
        old.dev.trigger_ctrl_alt_del().unwrap();
        new.dev.restore_state(&old.dev.save_state()).unwrap();
        assert_eq!(fired(&new.kbd), 0);
        assert_eq!(new.inb(DATA_OFFSET), CTRL_ALT_DEL[0]);
    }

    #[test]
    fn impossible_states_are_refused_and_leave_the_device_unchanged() {
        let mut rig = rig();
        let before = rig.dev.save_state();
        let long = I8042State {
            output_buffer: vec![0; BUF_SIZE + 1],
            ..before.clone()
        };
        let err = rig.dev.restore_state(&long).unwrap_err();
        assert!(matches!(err, Error::StateBufferTooLong { len: 17 }));
        assert_eq!(
            err.to_string(),
            "The saved i8042 state holds 17 output bytes, more than the 16-byte output buffer"
        );
        let pending = I8042State {
            pending_command: Some(CMD_SELF_TEST),
            ..before.clone()
        };
        assert!(matches!(
            rig.dev.restore_state(&pending),
            Err(Error::StatePendingCommand(CMD_SELF_TEST))
        ));
        assert_eq!(rig.dev.save_state(), before);
        assert_eq!(fired(&rig.kbd), 0);
    }
}
