//! The 16550A UART the guest uses as its console (COM1).
//!
//! [`SerialDevice`] puts vm-superio's [`Serial`] state machine on a bus. What the guest transmits
//! goes to a writer the VMM picks ([`SerialOut`]: standard output or a file); what the VMM reads
//! from its own input (standard input) goes into the UART's receive FIFO.
//!
//! # Output that never blocks a vCPU
//!
//! The device writes each byte the guest transmits from the vCPU thread, holding the device's
//! lock. A writer that can block (a terminal nobody reads, a full pipe, a stalled network file
//! system) would stall that vCPU and whatever waits for it. A VMM facing a guest it does not
//! trust puts a [`BoundedWriter`](crate::BoundedWriter) in front of the [`SerialOut`]: the vCPU
//! only appends to a bounded buffer, and a thread of the writer's own does the blocking writes;
//! what does not fit is dropped and counted.
//!
//! # Input and back-pressure
//!
//! The receive FIFO holds [`FIFO_SIZE`] bytes and nothing else buffers input: a guest that stops
//! reading its console cannot make the VMM hold more than that (CVE-2020-27173 was an unbounded
//! serial input buffer). The VMM's event loop pumps its input with [`SerialDevice::feed_from`],
//! which reads no more than the FIFO has room for. When it reports [`FeedOutcome::full`], the loop
//! stops watching its input and watches [`SerialDevice::input_ready_evt`] instead; the device
//! signals that eventfd once the guest has drained the FIFO, and the loop resumes:
//!
//! ```text
//! input readable     -> outcome = serial.feed_from(&mut input)?
//!                       outcome.full: stop watching input; outcome.eof: stop for good
//! input_ready_evt    -> read the eventfd; watch input again
//! ```
//!
//! # Snapshots
//!
//! [`SerialDevice::save_state`] returns the UART's registers, the bytes waiting in its receive
//! FIFO and the device's counters as a [`SerialState`]; [`SerialDevice::restore_state`] puts
//! them back into a device created with its own trigger and output, and re-raises an interrupt
//! that was pending and enabled. A state read from a file is checked before anything changes:
//! one the UART could never be in is refused.

use std::cell::Cell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ember_bus::BusDeviceMut;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::throttle::{Counter, worth_logging};
use crate::trigger::EventFdTrigger;

/// Capacity of the receive FIFO in bytes, the most input the device holds for the guest.
pub const FIFO_SIZE: usize = 64;

/// Number of consecutive I/O ports a UART occupies.
pub const SERIAL_PORT_LEN: u64 = 8;

/// I/O port of the first UART, COM1.
pub const COM1_PORT: u64 = 0x3f8;

/// Receive buffer (read) / transmit holding register (write).
const DATA_OFFSET: u8 = 0;
/// Modem control register.
const MCR_OFFSET: u8 = 4;
/// MCR bit: loopback mode, in which the UART receives what it transmits and nothing else.
const MCR_LOOP_BIT: u8 = 0x10;

/// The interrupt enable register's bits a 16550A has.
const IER_VALID_BITS: u8 = 0x0f;
/// Interrupt identification: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// Interrupt identification: the pending interrupts the UART reports (THR empty, received data).
const IIR_PENDING_BITS: u8 = 0x06;
/// Line status: data ready in the receive FIFO.
const LSR_DATA_READY: u8 = 0x01;
/// Line status: transmitter holding register empty and transmitter idle, always set here.
const LSR_TX_IDLE: u8 = 0x60;

/// What a read of an unhandled port or with an unsupported access length returns: all ones, as an
/// I/O port nothing answers reads on a PC.
const UNHANDLED_READ: u8 = 0xff;

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The eventfd that tells the VMM the FIFO has room again could not be created.
    #[error("Cannot create the serial console's input-ready eventfd")]
    InputReadyEventFd(#[source] io::Error),
    /// The file the guest's output goes to could not be opened.
    #[error("Cannot open the serial output file {}", path.display())]
    OpenOutput {
        /// The file that could not be opened.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// Reading the VMM's input for the guest failed.
    #[error("Cannot read the serial console's input")]
    ReadInput(#[source] io::Error),
    /// A saved state holds more input than the receive FIFO does.
    #[error(
        "The saved serial state holds {len} bytes of input, more than the {FIFO_SIZE}-byte \
         receive FIFO"
    )]
    StateFifoTooLong {
        /// Number of input bytes in the state.
        len: usize,
    },
    /// A register of a saved state holds a value the UART is never in.
    #[error(
        "The saved serial state's {register} register holds {value:#04x}, which the UART never holds"
    )]
    StateRegister {
        /// The register's name.
        register: &'static str,
        /// The value refused.
        value: u8,
    },
}

/// Result type of the serial console.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the guest's console output goes.
#[derive(Debug)]
pub enum SerialOut {
    /// The VMM's standard output.
    Stdout(io::Stdout),
    /// A file, written at its end.
    File(File),
    /// Nowhere: the output is discarded.
    Sink(io::Sink),
}

impl SerialOut {
    /// Output to the VMM's standard output.
    pub fn stdout() -> Self {
        SerialOut::Stdout(io::stdout())
    }

    /// Output appended to the file at `path`, created if it does not exist. Appending keeps what an
    /// earlier run wrote and works for named pipes as well as regular files.
    ///
    /// # Errors
    ///
    /// [`Error::OpenOutput`] when the file cannot be opened or created.
    pub fn file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(SerialOut::File)
            .map_err(|source| Error::OpenOutput {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Output discarded.
    pub fn sink() -> Self {
        SerialOut::Sink(io::sink())
    }

    /// The size of the file written to, when it is a regular file (not a pipe or a device), for
    /// a size cap to count what it already holds.
    pub fn regular_file_len(&self) -> Option<u64> {
        match self {
            SerialOut::File(file) => file
                .metadata()
                .ok()
                .filter(|meta| meta.is_file())
                .map(|meta| meta.len()),
            SerialOut::Stdout(_) | SerialOut::Sink(_) => None,
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Stdout(out) => out.write(buf),
            SerialOut::File(out) => out.write(buf),
            SerialOut::Sink(out) => out.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOut::Stdout(out) => out.flush(),
            SerialOut::File(out) => out.flush(),
            SerialOut::Sink(out) => out.flush(),
        }
    }
}

/// What one [`SerialDevice::feed_from`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedOutcome {
    /// Bytes read from the input and queued for the guest.
    pub read: usize,
    /// The input reached its end: there will be no more to feed.
    pub eof: bool,
    /// The device takes no more input now: stop reading the input until
    /// [`SerialDevice::input_ready_evt`] is signalled.
    pub full: bool,
}

/// Counters of the serial console's activity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SerialStats {
    /// Bytes the guest transmitted that reached the output.
    pub bytes_out: u64,
    /// Bytes the guest transmitted that the output failed to take.
    pub bytes_lost: u64,
    /// Input bytes queued for the guest.
    pub bytes_in: u64,
    /// Interrupts that could not be signalled.
    pub interrupt_errors: u64,
    /// Guest accesses with a length other than one byte, or outside the UART's eight ports.
    pub invalid_accesses: u64,
}

/// The saved state of a [`SerialDevice`]: the UART's registers as the guest left them, the input
/// waiting in its receive FIFO, and the device's counters.
///
/// The interrupt identification and line status registers hold what the UART derives from its
/// other state; [`SerialDevice::restore_state`] refuses values it never derives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte (DLL).
    pub divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub divisor_high: u8,
    /// Interrupt enable register (IER); only its low four bits exist.
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR) without its FIFO bits: `0x01` for none pending,
    /// else the pending interrupts (`0x02` transmitter empty, `0x04` received data).
    pub interrupt_identification: u8,
    /// Line control register (LCR), the divisor latch access bit included.
    pub line_control: u8,
    /// Line status register (LSR): `0x60` (transmitter empty and idle), with `0x01` (data ready)
    /// exactly when `rx_fifo` holds bytes.
    pub line_status: u8,
    /// Modem control register (MCR), loopback mode included.
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// The input the guest has not read yet, oldest first; at most [`FIFO_SIZE`] bytes.
    pub rx_fifo: Vec<u8>,
    /// The device's counters.
    pub stats: SerialStats,
}

/// vm-superio's interrupt line inside a [`SerialDevice`]: it records that the UART raised its
/// interrupt, and the device signals its own trigger once the access is over. The UART is then a
/// state machine that owns nothing of the VMM's, and can be rebuilt from a saved state.
#[derive(Debug, Default)]
struct Latch(Cell<bool>);

impl Trigger for Latch {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.set(true);
        Ok(())
    }
}

/// vm-superio's transmitter inside a [`SerialDevice`]: it holds the byte the guest transmitted
/// (one per register write) until the device writes it to its output.
#[derive(Debug, Default)]
struct Transmitter(Option<u8>);

impl Write for Transmitter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(&byte) = buf.last() {
            self.0 = Some(byte);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART state machine as the device holds it.
type Uart = Serial<Latch, NoEvents, Transmitter>;

/// A 16550A UART on a bus, with its interrupt line on a vm-superio [`Trigger`]: an
/// [`EventFdTrigger`] by default, or whatever delivers interrupts in the VMM that hosts it.
///
/// Register it at [`COM1_PORT`] with length [`SERIAL_PORT_LEN`] on the port I/O bus, and, with
/// an [`EventFdTrigger`], the trigger's eventfd as the irqfd of interrupt line 4
/// (`ember_memory::layout::SERIAL_IRQ` in ember).
///
/// Only one-byte accesses reach the UART's registers, as on the hardware's 8-bit ports: a read of
/// another length, or at an offset past the eighth port, returns all ones (`0xff` in each byte)
/// and a write of that kind is ignored. Neither has any other effect; both are counted in
/// [`SerialStats::invalid_accesses`].
pub struct SerialDevice<W: Write + Send, T: Trigger<E = io::Error> = EventFdTrigger> {
    serial: Uart,
    interrupt: T,
    out: W,
    /// Signalled when the FIFO has room again after input was refused.
    input_ready: EventFd,
    /// Input was refused (FIFO full or loopback mode) and the VMM waits for `input_ready`.
    input_blocked: bool,
    bytes_out: Counter,
    bytes_lost: Counter,
    bytes_in: Counter,
    interrupt_errors: Counter,
    invalid_accesses: Counter,
}

impl<W: Write + Send, T: Trigger<E = io::Error>> SerialDevice<W, T> {
    /// Creates a UART that signals its interrupt line through `interrupt` and writes what the
    /// guest transmits to `out`, flushing after every byte.
    ///
    /// # Errors
    ///
    /// [`Error::InputReadyEventFd`] when the input-ready eventfd cannot be created.
    pub fn new(interrupt: T, out: W) -> Result<Self> {
        Ok(SerialDevice {
            serial: Serial::with_events(Latch::default(), NoEvents, Transmitter::default()),
            interrupt,
            out,
            input_ready: EventFd::new(EFD_NONBLOCK).map_err(Error::InputReadyEventFd)?,
            input_blocked: false,
            bytes_out: Counter::default(),
            bytes_lost: Counter::default(),
            bytes_in: Counter::default(),
            interrupt_errors: Counter::default(),
            invalid_accesses: Counter::default(),
        })
    }

    /// The interrupt line's trigger (for an [`EventFdTrigger`], the VMM registers its eventfd
    /// as an irqfd).
    pub fn interrupt(&self) -> &T {
        &self.interrupt
    }

    /// The device's state, for a snapshot: the registers, the unread input and the counters.
    pub fn save_state(&self) -> SerialState {
        let uart = self.serial.state();
        SerialState {
            divisor_low: uart.baud_divisor_low,
            divisor_high: uart.baud_divisor_high,
            interrupt_enable: uart.interrupt_enable,
            interrupt_identification: uart.interrupt_identification,
            line_control: uart.line_control,
            line_status: uart.line_status,
            modem_control: uart.modem_control,
            modem_status: uart.modem_status,
            scratch: uart.scratch,
            rx_fifo: uart.in_buffer,
            stats: self.stats(),
        }
    }

    /// Puts the device in `state`, keeping its trigger and output, and raises the interrupt if
    /// the state has one pending and enabled (its signal was lost with the VMM that saved it).
    ///
    /// The VMM's input is taken again: a VMM that waited for
    /// [`input_ready_evt`](SerialDevice::input_ready_evt) resumes feeding input.
    ///
    /// # Errors
    ///
    /// [`Error::StateFifoTooLong`] when the state holds more than [`FIFO_SIZE`] input bytes,
    /// [`Error::StateRegister`] when a register holds a value the UART is never in (interrupt
    /// enable bits a 16550A lacks, an interrupt identification other than none or a set of
    /// pending interrupts, a line status that disagrees with the FIFO). The device is unchanged
    /// then.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<()> {
        validate_state(state)?;
        let uart = UartState {
            baud_divisor_low: state.divisor_low,
            baud_divisor_high: state.divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.rx_fifo.clone(),
        };
        // The latch and the transmitter cannot fail, and the FIFO's length was checked.
        let serial = Serial::from_state(&uart, Latch::default(), NoEvents, Transmitter::default())
            .map_err(|_| Error::StateFifoTooLong {
                len: state.rx_fifo.len(),
            })?;
        self.serial = serial;
        self.input_blocked = false;
        let stats = state.stats;
        for (counter, value) in [
            (&mut self.bytes_out, stats.bytes_out),
            (&mut self.bytes_lost, stats.bytes_lost),
            (&mut self.bytes_in, stats.bytes_in),
            (&mut self.interrupt_errors, stats.interrupt_errors),
            (&mut self.invalid_accesses, stats.invalid_accesses),
        ] {
            *counter = Counter::default();
            counter.add(value);
        }
        self.complete_access();
        Ok(())
    }

    /// The eventfd signalled when the device takes input again after a [`feed_from`] or
    /// [`enqueue_input`] that left it full (or found it in loopback mode). It is non-blocking; read
    /// it to clear it.
    ///
    /// [`feed_from`]: SerialDevice::feed_from
    /// [`enqueue_input`]: SerialDevice::enqueue_input
    pub fn input_ready_evt(&self) -> &EventFd {
        &self.input_ready
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The writer the guest's output goes to.
    pub fn writer(&self) -> &W {
        &self.out
    }

    /// The writer the guest's output goes to, mutably.
    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// The device's counters.
    pub fn stats(&self) -> SerialStats {
        SerialStats {
            bytes_out: self.bytes_out.get(),
            bytes_lost: self.bytes_lost.get(),
            bytes_in: self.bytes_in.get(),
            interrupt_errors: self.interrupt_errors.get(),
            invalid_accesses: self.invalid_accesses.get(),
        }
    }

    /// Queues as much of `bytes` for the guest as the receive FIFO has room for, raising the
    /// received-data interrupt if the guest enabled it, and returns how many bytes were taken.
    ///
    /// Nothing is taken while the guest keeps the UART in loopback mode, where a UART receives only
    /// what it transmits. When not all of `bytes` was taken, or the FIFO is now full,
    /// [`input_ready_evt`](SerialDevice::input_ready_evt) is signalled once it takes input again.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.input_room();
        let taken = self.push_input(&bytes[..room.min(bytes.len())]);
        if taken < bytes.len() || self.input_room() == 0 {
            self.input_blocked = true;
        }
        taken
    }

    /// Reads from `input` at most as many bytes as the receive FIFO has room for, and queues them
    /// for the guest. Nothing is read while the device takes no input, so bytes stay in `input`
    /// rather than in an ever-growing buffer.
    ///
    /// A read that is interrupted by a signal is retried; one that would block reads nothing.
    ///
    /// # Errors
    ///
    /// [`Error::ReadInput`] when reading `input` fails.
    pub fn feed_from<R: Read + ?Sized>(&mut self, input: &mut R) -> Result<FeedOutcome> {
        let room = self.input_room().min(FIFO_SIZE);
        if room == 0 {
            self.input_blocked = true;
            return Ok(FeedOutcome {
                read: 0,
                eof: false,
                full: true,
            });
        }
        let mut buf = [0u8; FIFO_SIZE];
        let read = loop {
            match input.read(&mut buf[..room]) {
                Ok(0) => {
                    return Ok(FeedOutcome {
                        read: 0,
                        eof: true,
                        full: false,
                    });
                }
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(FeedOutcome {
                        read: 0,
                        eof: false,
                        full: false,
                    });
                }
                Err(err) => return Err(Error::ReadInput(err)),
            }
        };
        // `read <= room`: the FIFO takes all of it.
        let taken = self.push_input(&buf[..read]);
        debug_assert_eq!(taken, read);
        let full = self.input_room() == 0;
        if full {
            self.input_blocked = true;
        }
        Ok(FeedOutcome {
            read: taken,
            eof: false,
            full,
        })
    }

    /// How many input bytes the device takes now: the FIFO's free space, or none in loopback mode.
    fn input_room(&mut self) -> usize {
        // Reading the modem control register has no side effect.
        if self.serial.read(MCR_OFFSET) & MCR_LOOP_BIT != 0 {
            0
        } else {
            self.serial.fifo_capacity()
        }
    }

    /// Queues `bytes`, which must fit, and returns how many the FIFO took.
    fn push_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let before = self.serial.fifo_capacity();
        // Only a full FIFO fails, which the caller rules out; what was taken is measured.
        let _ = self.serial.enqueue_raw_bytes(bytes);
        let taken = before.saturating_sub(self.serial.fifo_capacity());
        self.complete_access();
        self.bytes_in.add(u64::try_from(taken).unwrap_or(u64::MAX));
        taken
    }

    /// Signals [`input_ready_evt`](SerialDevice::input_ready_evt) if input was refused and the
    /// guest has since emptied the FIFO outside loopback mode. Waiting for an empty FIFO, not just
    /// some room, wakes the VMM once per FIFO-full of input rather than once per byte; signalling
    /// only after a refusal keeps a guest that polls an empty receive buffer from waking it at all.
    fn unblock_input_if_drained(&mut self) {
        if !self.input_blocked || self.input_room() < FIFO_SIZE {
            return;
        }
        self.input_blocked = false;
        if let Err(err) = self.input_ready.write(1) {
            // At most once per refusal of input, so not at the guest's pace.
            log::error!("Cannot signal that the serial console takes input again: {err}");
        }
    }

    /// Finishes what an access to the UART started: writes out the byte the guest transmitted,
    /// if any, then signals the interrupt if the UART raised it.
    fn complete_access(&mut self) {
        if let Some(byte) = self.serial.writer_mut().0.take() {
            match self.out.write_all(&[byte]).and_then(|()| self.out.flush()) {
                Ok(()) => {
                    self.bytes_out.inc();
                }
                Err(err) => {
                    let lost = self.bytes_lost.inc();
                    if worth_logging(lost) {
                        log::warn!("The serial console's output lost {lost} bytes so far: {err}");
                    }
                }
            }
        }
        if self.serial.interrupt_evt().0.take() {
            if let Err(err) = self.interrupt.trigger() {
                let count = self.interrupt_errors.inc();
                if worth_logging(count) {
                    log::error!(
                        "Cannot signal the serial console's interrupt ({count} failures): {err}"
                    );
                }
            }
        }
    }

    /// The register a one-byte access at `offset` reaches, if any.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= SERIAL_PORT_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

/// Checks that `state` is one the UART can be in.
fn validate_state(state: &SerialState) -> Result<()> {
    let len = state.rx_fifo.len();
    if len > FIFO_SIZE {
        return Err(Error::StateFifoTooLong { len });
    }
    let refuse = |register, value| Err(Error::StateRegister { register, value });
    if state.interrupt_enable & !IER_VALID_BITS != 0 {
        return refuse("interrupt enable", state.interrupt_enable);
    }
    let iir = state.interrupt_identification;
    if iir != IIR_NONE && (iir == 0 || iir & !IIR_PENDING_BITS != 0) {
        return refuse("interrupt identification", iir);
    }
    let data_ready = if len == 0 { 0 } else { LSR_DATA_READY };
    if state.line_status != LSR_TX_IDLE | data_ready {
        return refuse("line status", state.line_status);
    }
    Ok(())
}

impl<W: Write + Send, T: Trigger<E = io::Error> + Send> BusDeviceMut for SerialDevice<W, T> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (Self::register(offset, data.len()), data.first_mut()) {
            (Some(register), Some(byte)) => {
                *byte = self.serial.read(register);
                self.complete_access();
                if register == DATA_OFFSET {
                    self.unblock_input_if_drained();
                }
            }
            _ => {
                self.invalid_accesses.inc();
                data.fill(UNHANDLED_READ);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Some(register), Some(&value)) = (Self::register(offset, data.len()), data.first())
        else {
            self.invalid_accesses.inc();
            return;
        };
        // Neither the latch nor the transmitter fails, and a write does not fill the FIFO.
        let _ = self.serial.write(register, value);
        self.complete_access();
        if register == MCR_OFFSET {
            // Leaving loopback mode lets input in again.
            self.unblock_input_if_drained();
        }
    }
}

impl<W: Write + Send, T: Trigger<E = io::Error>> fmt::Debug for SerialDevice<W, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("fifo_capacity", &self.serial.fifo_capacity())
            .field("input_blocked", &self.input_blocked)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};

    use ember_bus::{BusRange, PioBus};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const MSR: u64 = 6;
    const SCR: u64 = 7;

    const LCR_DLAB: u8 = 0x80;
    const LCR_8N1: u8 = 0x03;

    const IER_RDA: u8 = 0x01;
    const IER_THR_EMPTY: u8 = 0x02;
    const IIR_THR_EMPTY: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;
    const LSR_THR_EMPTY_AND_IDLE: u8 = 0x60;
    const MCR_OUT2: u8 = 0x08;

    fn device() -> (SerialDevice<Vec<u8>>, EventFdTrigger) {
        let interrupt = EventFdTrigger::new().unwrap();
        let serial = SerialDevice::new(interrupt.try_clone().unwrap(), Vec::new()).unwrap();
        (serial, interrupt)
    }

    fn read_reg<W: Write + Send>(serial: &mut SerialDevice<W>, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(COM1_PORT, offset, &mut data);
        data[0]
    }

    fn write_reg<W: Write + Send>(serial: &mut SerialDevice<W>, offset: u64, value: u8) {
        serial.write(COM1_PORT, offset, &[value]);
    }

    fn fired(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(count) => count > 0,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => false,
            Err(err) => panic!("eventfd read failed: {err}"),
        }
    }

    /// A reader that fails every read with the given error kind.
    struct Failing(io::ErrorKind);

    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
    }

    /// A writer that refuses every byte.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fifo_size_is_vm_superio_fifo_capacity() {
        let (serial, _) = device();
        assert_eq!(serial.fifo_capacity(), FIFO_SIZE);
    }

    #[test]
    fn guest_writes_to_thr_come_out_on_the_writer() {
        let (mut serial, _) = device();
        for &byte in b"hello\n" {
            write_reg(&mut serial, 0, byte);
        }
        assert_eq!(serial.writer().as_slice(), b"hello\n");
        assert_eq!(serial.stats().bytes_out, 6);
        assert_eq!(serial.stats().bytes_lost, 0);
    }

    #[test]
    fn guest_output_reaches_the_writer_through_a_bus() {
        let (serial, _) = device();
        let serial = Arc::new(Mutex::new(serial));
        let mut bus = PioBus::new();
        bus.insert(
            BusRange::new(COM1_PORT, SERIAL_PORT_LEN).unwrap(),
            serial.clone(),
        )
        .unwrap();
        bus.write(COM1_PORT, b"x").unwrap();
        assert_eq!(serial.lock().unwrap().writer().as_slice(), b"x");
    }

    #[test]
    fn enabling_thr_empty_interrupt_fires_the_interrupt_eventfd() {
        let (mut serial, interrupt) = device();
        assert!(!fired(interrupt.eventfd()));
        write_reg(&mut serial, IER, IER_THR_EMPTY);
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
        assert_eq!(read_reg(&mut serial, IIR) & 0x0f, IIR_THR_EMPTY);
        // Once identified, each transmitted byte raises it again.
        write_reg(&mut serial, 0, b'a');
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn queued_input_raises_the_received_data_interrupt_when_enabled() {
        let (mut serial, interrupt) = device();
        assert_eq!(serial.enqueue_input(b"a"), 1);
        assert!(!fired(interrupt.eventfd()));
        assert_eq!(read_reg(&mut serial, 0), b'a');

        write_reg(&mut serial, IER, IER_RDA);
        assert!(!fired(interrupt.eventfd()));
        assert_eq!(serial.enqueue_input(b"b"), 1);
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
        assert_eq!(read_reg(&mut serial, IIR) & 0x0f, IIR_RDA);
        assert_eq!(read_reg(&mut serial, 0), b'b');
    }

    #[test]
    fn enqueue_input_takes_at_most_the_fifo_capacity() {
        let (mut serial, _) = device();
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(serial.enqueue_input(&input[..10]), 10);
        assert_eq!(serial.fifo_capacity(), FIFO_SIZE - 10);
        assert_eq!(serial.enqueue_input(&input[10..]), FIFO_SIZE - 10);
        assert_eq!(serial.fifo_capacity(), 0);
        assert_eq!(serial.enqueue_input(b"more"), 0);
        assert_eq!(serial.enqueue_input(&[]), 0);
        assert_eq!(serial.stats().bytes_in, 64);
        for expected in 0..64 {
            assert_eq!(read_reg(&mut serial, 0), expected);
        }
    }

    #[test]
    fn feed_from_applies_back_pressure_until_the_guest_drains_the_fifo() {
        let (mut serial, _) = device();
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut reader = Cursor::new(input.clone());

        let first = serial.feed_from(&mut reader).unwrap();
        assert_eq!(
            first,
            FeedOutcome {
                read: FIFO_SIZE,
                eof: false,
                full: true
            }
        );
        // A full FIFO reads nothing more: the rest stays in the reader.
        let again = serial.feed_from(&mut reader).unwrap();
        assert_eq!((again.read, again.full), (0, true));
        assert_eq!(reader.position(), 64);
        assert!(!fired(serial.input_ready_evt()));

        let mut received = Vec::new();
        let mut eof = false;
        while !eof {
            // The guest drains the FIFO; the VMM is told only once it is empty.
            while read_reg(&mut serial, LSR) & LSR_DATA_READY != 0 {
                assert!(!fired(serial.input_ready_evt()));
                received.push(read_reg(&mut serial, 0));
            }
            if received.len() % FIFO_SIZE == 0 && received.len() < input.len() {
                assert_eq!(serial.input_ready_evt().read().unwrap(), 1);
            }
            let outcome = serial.feed_from(&mut reader).unwrap();
            assert!(outcome.read <= FIFO_SIZE);
            eof = outcome.eof;
        }
        assert_eq!(received, input);
        assert_eq!(serial.stats().bytes_in, 1000);
    }

    #[test]
    fn polling_an_empty_receive_buffer_does_not_signal_input_ready() {
        let (mut serial, _) = device();
        serial.enqueue_input(b"ab");
        for _ in 0..3 {
            read_reg(&mut serial, 0);
        }
        assert!(!fired(serial.input_ready_evt()));
    }

    #[test]
    fn line_status_shows_data_ready_while_input_is_queued() {
        let (mut serial, _) = device();
        assert_eq!(read_reg(&mut serial, LSR), LSR_THR_EMPTY_AND_IDLE);
        serial.enqueue_input(b"hi");
        assert_eq!(
            read_reg(&mut serial, LSR),
            LSR_THR_EMPTY_AND_IDLE | LSR_DATA_READY
        );
        assert_eq!(read_reg(&mut serial, 0), b'h');
        assert_ne!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut serial, 0), b'i');
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        // Reading an empty receive buffer returns 0.
        assert_eq!(read_reg(&mut serial, 0), 0);
    }

    #[test]
    fn loopback_mode_holds_input_back_until_the_guest_leaves_it() {
        let (mut serial, _) = device();
        write_reg(&mut serial, MCR, MCR_OUT2 | MCR_LOOP_BIT);
        let mut reader = Cursor::new(b"typed".to_vec());
        let outcome = serial.feed_from(&mut reader).unwrap();
        assert_eq!((outcome.read, outcome.full), (0, true));
        assert_eq!(reader.position(), 0);
        assert_eq!(serial.enqueue_input(b"typed"), 0);

        // What the guest transmits in loopback mode comes back to it, not to the writer.
        write_reg(&mut serial, 0, b'L');
        assert_eq!(read_reg(&mut serial, 0), b'L');
        assert!(serial.writer().is_empty());
        assert!(!fired(serial.input_ready_evt()));

        write_reg(&mut serial, MCR, MCR_OUT2);
        assert_eq!(serial.input_ready_evt().read().unwrap(), 1);
        let outcome = serial.feed_from(&mut reader).unwrap();
        assert_eq!((outcome.read, outcome.full), (5, false));
    }

    #[test]
    fn feed_from_reports_end_of_input_and_would_block() {
        let (mut serial, _) = device();
        let outcome = serial.feed_from(&mut io::empty()).unwrap();
        assert_eq!(
            outcome,
            FeedOutcome {
                read: 0,
                eof: true,
                full: false
            }
        );
        let outcome = serial
            .feed_from(&mut Failing(io::ErrorKind::WouldBlock))
            .unwrap();
        assert_eq!(
            outcome,
            FeedOutcome {
                read: 0,
                eof: false,
                full: false
            }
        );
        let err = serial
            .feed_from(&mut Failing(io::ErrorKind::PermissionDenied))
            .unwrap_err();
        assert!(
            matches!(err, Error::ReadInput(ref e) if e.kind() == io::ErrorKind::PermissionDenied)
        );
    }

    #[test]
    fn feed_from_retries_interrupted_reads() {
        /// Interrupted on the first read, then returns "ok".
        struct InterruptedOnce(bool);
        impl Read for InterruptedOnce {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if !std::mem::replace(&mut self.0, true) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                buf[..2].copy_from_slice(b"ok");
                Ok(2)
            }
        }
        let (mut serial, _) = device();
        let outcome = serial.feed_from(&mut InterruptedOnce(false)).unwrap();
        assert_eq!(outcome.read, 2);
        assert_eq!(read_reg(&mut serial, 0), b'o');
        assert_eq!(read_reg(&mut serial, 0), b'k');
    }

    #[test]
    fn wrong_access_lengths_and_offsets_have_no_effect() {
        let (mut serial, interrupt) = device();
        serial.enqueue_input(b"z");
        for len in [2usize, 4, 8] {
            let mut data = vec![0u8; len];
            serial.read(COM1_PORT, 0, &mut data);
            assert_eq!(data, vec![0xff; len]);
            serial.write(COM1_PORT, 0, &vec![b'a'; len]);
            serial.write(COM1_PORT, IER, &vec![IER_THR_EMPTY; len]);
        }
        let mut empty: [u8; 0] = [];
        serial.read(COM1_PORT, 0, &mut empty);
        serial.write(COM1_PORT, 0, &empty);
        for offset in [SERIAL_PORT_LEN, 0x100, u64::MAX] {
            assert_eq!(read_reg(&mut serial, offset), 0xff);
            write_reg(&mut serial, offset, b'a');
        }
        assert!(serial.writer().is_empty());
        assert!(!fired(interrupt.eventfd()));
        assert_eq!(serial.stats().invalid_accesses, 3 * 3 + 2 + 3 * 2);
        // The queued byte is still there.
        assert_eq!(read_reg(&mut serial, 0), b'z');
    }

    #[test]
    fn output_errors_count_lost_bytes_and_still_raise_thr_empty() {
        let interrupt = EventFdTrigger::new().unwrap();
        let mut serial = SerialDevice::new(interrupt.try_clone().unwrap(), Broken).unwrap();
        write_reg(&mut serial, IER, IER_THR_EMPTY);
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
        read_reg(&mut serial, IIR);
        for _ in 0..100 {
            write_reg(&mut serial, 0, b'a');
        }
        let stats = serial.stats();
        assert_eq!((stats.bytes_out, stats.bytes_lost), (0, 100));
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn file_output_appends_to_the_file() {
        let file = TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"before\n").unwrap();
        let out = SerialOut::file(file.as_path()).unwrap();
        let mut serial = SerialDevice::new(EventFdTrigger::new().unwrap(), out).unwrap();
        for &byte in b"guest\n" {
            write_reg(&mut serial, 0, byte);
        }
        assert_eq!(std::fs::read(file.as_path()).unwrap(), b"before\nguest\n");
    }

    #[test]
    fn only_a_regular_file_has_a_length_to_cap() {
        let file = TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"12345").unwrap();
        assert_eq!(
            SerialOut::file(file.as_path()).unwrap().regular_file_len(),
            Some(5)
        );
        assert_eq!(
            SerialOut::file("/dev/null").unwrap().regular_file_len(),
            None
        );
        assert_eq!(SerialOut::stdout().regular_file_len(), None);
        assert_eq!(SerialOut::sink().regular_file_len(), None);
    }

    #[test]
    fn unopenable_output_file_is_a_clear_error() {
        let dir = TempFile::new().unwrap();
        let path = dir.as_path().join("not-a-directory").join("out");
        let err = SerialOut::file(&path).unwrap_err();
        assert!(matches!(err, Error::OpenOutput { path: ref p, .. } if *p == path));
        assert_eq!(
            err.to_string(),
            format!("Cannot open the serial output file {}", path.display())
        );
    }

    #[test]
    fn sink_output_discards_bytes_as_written() {
        let mut serial =
            SerialDevice::new(EventFdTrigger::new().unwrap(), SerialOut::sink()).unwrap();
        write_reg(&mut serial, 0, b'a');
        assert_eq!(serial.stats().bytes_out, 1);
    }

    /// The state through postcard, as a snapshot file carries it.
    fn round_trip(state: &SerialState) -> SerialState {
        postcard::from_bytes(&postcard::to_allocvec(state).unwrap()).unwrap()
    }

    /// A UART the guest set up: divisor 1 (115200 baud), 8N1, received-data and THR-empty
    /// interrupts enabled, OUT2 and DTR, a scratch byte, and input waiting with its interrupt
    /// pending.
    fn busy_device() -> (SerialDevice<Vec<u8>>, EventFdTrigger) {
        let (mut serial, interrupt) = device();
        write_reg(&mut serial, LCR, LCR_DLAB | LCR_8N1);
        write_reg(&mut serial, 0, 0x01);
        write_reg(&mut serial, 1, 0x00);
        write_reg(&mut serial, LCR, LCR_8N1);
        write_reg(&mut serial, MCR, MCR_OUT2 | 0x01);
        write_reg(&mut serial, SCR, 0x5a);
        write_reg(&mut serial, IER, IER_RDA | IER_THR_EMPTY);
        // The THR-empty interrupt is identified; the guest transmits.
        read_reg(&mut serial, IIR);
        write_reg(&mut serial, 0, b'o');
        read_reg(&mut serial, IIR);
        assert_eq!(serial.enqueue_input(b"typed"), 5);
        // Leave the divisor latch open, as a guest reprogramming the baud rate does.
        write_reg(&mut serial, LCR, LCR_DLAB | LCR_8N1);
        interrupt.eventfd().read().unwrap();
        (serial, interrupt)
    }

    #[test]
    fn restored_state_reads_back_register_by_register_and_interrupts_continue() {
        let (mut old, _) = busy_device();
        let state = old.save_state();
        assert_eq!(state.rx_fifo, b"typed");
        assert_eq!(state.interrupt_identification, IIR_RDA);
        assert_eq!(state.line_control, LCR_DLAB | LCR_8N1);

        let (mut new, interrupt) = device();
        new.restore_state(&round_trip(&state)).unwrap();
        assert_eq!(new.save_state(), state);
        assert_eq!(new.stats(), old.stats());
        // The pending received-data interrupt is raised again on the new trigger.
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);

        // Divisor latch open: offsets 0 and 1 are the divisor; then every register.
        for offset in [0, 1, LCR, MCR, LSR, MSR, SCR] {
            assert_eq!(
                read_reg(&mut new, offset),
                read_reg(&mut old, offset),
                "offset {offset}"
            );
        }
        write_reg(&mut new, LCR, LCR_8N1);
        write_reg(&mut old, LCR, LCR_8N1);
        for offset in [IER, IIR, LSR] {
            assert_eq!(
                read_reg(&mut new, offset),
                read_reg(&mut old, offset),
                "offset {offset}"
            );
        }
        let received: Vec<u8> = (0..5).map(|_| read_reg(&mut new, 0)).collect();
        assert_eq!(received, b"typed");
        assert_eq!(read_reg(&mut new, LSR) & LSR_DATA_READY, 0);

        // Input and output go on: new input raises the interrupt, output reaches the writer.
        assert_eq!(new.enqueue_input(b"x"), 1);
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
        assert_eq!(read_reg(&mut new, IIR) & 0x0f, IIR_RDA);
        assert_eq!(read_reg(&mut new, 0), b'x');
        write_reg(&mut new, 0, b'!');
        assert_eq!(new.writer().as_slice(), b"!");
        assert_eq!(interrupt.eventfd().read().unwrap(), 1);
        assert_eq!(new.stats().bytes_out, 2);
        assert_eq!(new.stats().bytes_in, 6);
    }

    #[test]
    fn restoring_a_full_fifo_applies_back_pressure_until_drained() {
        let (mut old, _) = device();
        let input: Vec<u8> = (0..FIFO_SIZE as u8).collect();
        assert_eq!(old.enqueue_input(&input), FIFO_SIZE);
        let (mut new, _) = device();
        new.restore_state(&round_trip(&old.save_state())).unwrap();
        let outcome = new.feed_from(&mut Cursor::new(b"more".to_vec())).unwrap();
        assert_eq!((outcome.read, outcome.full), (0, true));
        for expected in input {
            assert_eq!(read_reg(&mut new, 0), expected);
        }
        assert_eq!(new.input_ready_evt().read().unwrap(), 1);
    }

    #[test]
    fn a_state_without_pending_interrupts_raises_none() {
        let (old, _) = device();
        let (mut new, interrupt) = device();
        new.restore_state(&round_trip(&old.save_state())).unwrap();
        assert!(!fired(interrupt.eventfd()));
        assert_eq!(new.save_state(), old.save_state());
    }

    /// Makes a state one the UART is never in.
    type Spoil = fn(&mut SerialState);

    #[test]
    fn impossible_states_are_refused_and_leave_the_device_unchanged() {
        let (busy, _) = busy_device();
        let good = busy.save_state();
        let (mut dev, interrupt) = device();
        let before = dev.save_state();

        let mut long = good.clone();
        long.rx_fifo = vec![b'a'; FIFO_SIZE + 1];
        long.line_status = LSR_TX_IDLE | LSR_DATA_READY;
        let err = dev.restore_state(&long).unwrap_err();
        assert!(matches!(err, Error::StateFifoTooLong { len: 65 }));
        assert_eq!(
            err.to_string(),
            "The saved serial state holds 65 bytes of input, more than the 64-byte receive FIFO"
        );

        let bad_registers: [(&str, Spoil); 6] = [
            ("interrupt enable", |s| s.interrupt_enable = 0x10),
            ("interrupt identification", |s| {
                s.interrupt_identification = 0
            }),
            ("interrupt identification", |s| {
                s.interrupt_identification = IIR_NONE | IIR_RDA
            }),
            ("interrupt identification", |s| {
                s.interrupt_identification = 0x08
            }),
            ("line status", |s| s.line_status = LSR_TX_IDLE),
            ("line status", |s| {
                s.rx_fifo.clear();
                s.line_status = LSR_TX_IDLE | LSR_DATA_READY;
            }),
        ];
        for (name, spoil) in bad_registers {
            let mut state = good.clone();
            spoil(&mut state);
            let err = dev.restore_state(&state).unwrap_err();
            assert!(
                matches!(err, Error::StateRegister { register, .. } if register == name),
                "{err:?}"
            );
        }
        assert_eq!(dev.save_state(), before);
        assert!(!fired(interrupt.eventfd()));
        // A truncated encoding does not decode at all.
        let bytes = postcard::to_allocvec(&good).unwrap();
        assert!(postcard::from_bytes::<SerialState>(&bytes[..bytes.len() - 1]).is_err());
    }
}
