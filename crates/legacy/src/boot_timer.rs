//! A register the guest writes to when it has booted, to measure the VMM's boot time.
//!
//! The guest's init writes [`BOOT_COMPLETE_MAGIC`] (123) as one byte at offset 0 of the device,
//! which the VMM maps at the start of the 32-bit MMIO gap (a busybox init runs
//! `devmem 0xd0000000 8 123`). The device then logs, once, the wall-clock time since the VMM
//! process started and the CPU time the process has used:
//!
//! ```text
//! Guest-boot-time = 112345 us 112 ms, 98765 CPU us 98 CPU ms
//! ```

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use ember_bus::BusDeviceMut;

/// Length of the device's MMIO range: one page.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

/// The byte the guest writes at offset 0 when it has booted.
pub const BOOT_COMPLETE_MAGIC: u8 = 123;

/// How long the guest took to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTime {
    /// Wall-clock time from the start the [`BootTimer`] was given to the guest's signal.
    pub wall: Duration,
    /// CPU time the VMM process had used when the guest signalled, all threads together.
    pub cpu: Duration,
}

impl fmt::Display for BootTime {
    /// The log line's text: `Guest-boot-time = {us} us {ms} ms, {cpu_us} CPU us {cpu_ms} CPU ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Guest-boot-time = {} us {} ms, {} CPU us {} CPU ms",
            self.wall.as_micros(),
            self.wall.as_millis(),
            self.cpu.as_micros(),
            self.cpu.as_millis()
        )
    }
}

/// CPU time the calling process has used so far, all its threads together
/// (`CLOCK_PROCESS_CPUTIME_ID`).
///
/// # Errors
///
/// The `clock_gettime(2)` error, which Linux does not return for this clock.
pub fn process_cpu_time() -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` that outlives the call, and the clock id is a
    // constant the kernel knows.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let nanos =
        u32::try_from(ts.tv_nsec).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // `Duration::new` carries nanoseconds past a second into the seconds, and the kernel keeps
    // `tv_nsec` below 10^9, so this cannot overflow.
    Ok(Duration::new(secs, nanos))
}

/// The boot-complete register, on the MMIO bus with length [`BOOT_TIMER_LEN`].
///
/// Only the first one-byte write of [`BOOT_COMPLETE_MAGIC`] at offset 0 counts: the boot time is
/// recorded and logged at info level then, and later writes, of any value, are ignored, so the
/// guest cannot make the VMM log more than once. Reads return zeros.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    boot_time: Option<BootTime>,
}

impl BootTimer {
    /// Creates the device, measuring wall-clock time from `start`, normally the moment the VMM
    /// process started.
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            boot_time: None,
        }
    }

    /// The boot time, once the guest has signalled it.
    pub fn boot_time(&self) -> Option<BootTime> {
        self.boot_time
    }

    fn record(&mut self) -> BootTime {
        let wall = self.start.elapsed();
        let cpu = process_cpu_time().unwrap_or_else(|err| {
            // Recorded once per VM, so this warning cannot repeat at the guest's pace.
            log::warn!("Cannot read the process CPU time for the boot time: {err}");
            Duration::ZERO
        });
        let boot_time = BootTime { wall, cpu };
        self.boot_time = Some(boot_time);
        boot_time
    }
}

impl BusDeviceMut for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_COMPLETE_MAGIC] && self.boot_time.is_none() {
            let boot_time = self.record();
            log::info!("{boot_time}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_magic_write_records_the_boot_time_once() {
        let mut timer = BootTimer::new(Instant::now());
        let mut data = [0xffu8; 4];
        timer.read(0, 0, &mut data);
        assert_eq!(data, [0; 4]);
        // Another value, another offset or a wider write do not count.
        timer.write(0, 0, &[BOOT_COMPLETE_MAGIC - 1]);
        timer.write(0, 1, &[BOOT_COMPLETE_MAGIC]);
        timer.write(0, 0, &[BOOT_COMPLETE_MAGIC, 0]);
        assert_eq!(timer.boot_time(), None);
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, 0, &[BOOT_COMPLETE_MAGIC]);
        let first = timer.boot_time().expect("recorded");
        assert!(first.wall >= Duration::from_millis(2));
        timer.write(0, 0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(timer.boot_time(), Some(first), "later writes are ignored");
    }

    #[test]
    fn boot_time_reads_as_the_log_line() {
        let time = BootTime {
            wall: Duration::from_micros(112_345),
            cpu: Duration::from_micros(98_765),
        };
        assert_eq!(
            time.to_string(),
            "Guest-boot-time = 112345 us 112 ms, 98765 CPU us 98 CPU ms"
        );
    }

    #[test]
    fn the_process_has_used_cpu_time() {
        let before = process_cpu_time().unwrap();
        // Some work, so the clock moves on.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(process_cpu_time().unwrap() > before);
    }
}
