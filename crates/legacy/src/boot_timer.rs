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
//!
//! Where a launcher (a jailer) started the process and then exec'd the VMM, the start it
//! measures from is the launcher's: a [`ProcessStart`] carries it.
//!
//! # Snapshots
//!
//! The device has no state worth saving: what it measures belongs to the process that runs the
//! VMM, not to the guest. A VMM restoring a snapshot creates a fresh [`BootTimer`] from its own
//! start; the guest has booted already and does not signal again, and should it (a clone whose
//! init signals once more), the time logged runs from the restoring process's start, the time
//! its restore took to reach that point.

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
/// (`CLOCK_PROCESS_CPUTIME_ID`; `execve` keeps it, so it counts from before the exec).
///
/// # Errors
///
/// The `clock_gettime(2)` error, which Linux does not return for this clock.
pub fn process_cpu_time() -> io::Result<Duration> {
    clock_time(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The system's monotonic clock (`CLOCK_MONOTONIC`, the clock of [`Instant`] on Linux): the
/// time since an unspecified start that every process of the host shares, as a launcher passes
/// it to the VMM it execs.
///
/// # Errors
///
/// The `clock_gettime(2)` error, which Linux does not return for this clock.
pub fn monotonic_time() -> io::Result<Duration> {
    clock_time(libc::CLOCK_MONOTONIC)
}

fn clock_time(clock: libc::clockid_t) -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` that outlives the call, and the clock id is a
    // constant the kernel knows.
    let ret = unsafe { libc::clock_gettime(clock, &mut ts) };
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

/// When the VMM's process started, in wall-clock and CPU time: what boot and start-up times
/// count from.
///
/// For a process started directly, `wall` is the first thing `main` reads and the CPU fields
/// are zero. A launcher that execs the VMM passes its own start (Firecracker's jailer:
/// `--start-time-us`, `--start-time-cpu-us`, `--parent-cpu-time-us`), so that the times count
/// the launcher's work too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStart {
    /// The moment the process started.
    pub wall: Instant,
    /// The process's CPU clock ([`process_cpu_time`]) at that moment.
    pub cpu: Duration,
    /// CPU time spent on the start by other processes (a launcher's parent that forked it),
    /// added to what this process has used since `cpu`.
    pub cpu_elsewhere: Duration,
}

impl ProcessStart {
    /// A process that started at `wall`, with its CPU clock at zero then.
    pub fn at(wall: Instant) -> Self {
        ProcessStart {
            wall,
            cpu: Duration::ZERO,
            cpu_elsewhere: Duration::ZERO,
        }
    }

    /// Wall-clock and CPU time from the start to now. A CPU clock that cannot be read counts
    /// as zero (Linux does not fail it), and one that reads less than `cpu` (a start from
    /// another process, passed wrong) as no time since.
    pub fn elapsed(&self) -> BootTime {
        let cpu = process_cpu_time().unwrap_or_else(|err| {
            // Read once per VM or once at start-up, so this warning cannot repeat at a
            // guest's or a client's pace.
            log::warn!("Cannot read the process CPU time: {err}");
            Duration::ZERO
        });
        BootTime {
            wall: self.wall.elapsed(),
            cpu: cpu
                .saturating_sub(self.cpu)
                .saturating_add(self.cpu_elsewhere),
        }
    }
}

/// The boot-complete register, on the MMIO bus with length [`BOOT_TIMER_LEN`].
///
/// Only the first one-byte write of [`BOOT_COMPLETE_MAGIC`] at offset 0 counts: the boot time is
/// recorded and logged at info level then, and later writes, of any value, are ignored, so the
/// guest cannot make the VMM log more than once. Reads return zeros.
#[derive(Debug)]
pub struct BootTimer {
    start: ProcessStart,
    boot_time: Option<BootTime>,
}

impl BootTimer {
    /// Creates the device, measuring wall-clock time from `start`, normally the moment the VMM
    /// process started, and the process's whole CPU time.
    pub fn new(start: Instant) -> Self {
        BootTimer::from_process_start(ProcessStart::at(start))
    }

    /// Creates the device, measuring wall-clock and CPU time from `start`.
    pub fn from_process_start(start: ProcessStart) -> Self {
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
        // Recorded once per VM, so a warning from it cannot repeat at the guest's pace.
        let boot_time = self.start.elapsed();
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
    fn a_start_passed_by_a_launcher_counts_its_time_too() {
        let wall = Instant::now()
            .checked_sub(Duration::from_secs(3))
            .expect("the host has been up for 3 s");
        let start = ProcessStart {
            wall,
            cpu: Duration::ZERO,
            cpu_elsewhere: Duration::from_secs(5),
        };
        let mut timer = BootTimer::from_process_start(start);
        timer.write(0, 0, &[BOOT_COMPLETE_MAGIC]);
        let time = timer.boot_time().expect("recorded");
        assert!(time.wall >= Duration::from_secs(3), "{time}");
        assert!(time.cpu >= Duration::from_secs(5), "{time}");
        // A CPU start past the clock (passed wrong) counts no time, not a wrapped one.
        let later = ProcessStart {
            cpu: Duration::from_secs(1 << 40),
            ..ProcessStart::at(Instant::now())
        };
        assert_eq!(later.elapsed().cpu, Duration::ZERO);
    }

    #[test]
    fn the_monotonic_clock_is_the_clock_of_instant() {
        let before = Instant::now();
        let clock = monotonic_time().unwrap();
        let after = Instant::now();
        // An `Instant` that many seconds back lands at the clock's zero, between the readings.
        let zero_before = before.checked_sub(clock);
        let zero_after = after.checked_sub(clock);
        if let (Some(a), Some(b)) = (zero_before, zero_after) {
            assert!(a <= b);
            assert!(b.duration_since(a) < Duration::from_secs(1));
        }
        assert!(monotonic_time().unwrap() >= clock);
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
