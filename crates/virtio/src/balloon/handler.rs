//! The work of an active balloon, on the thread that serves it (its worker, or the VMM's event
//! manager): giving inflated pages back to the host, acknowledging deflated ones, and polling
//! the guest's statistics on a timer.
//!
//! The statistics protocol (virtio 1.2, 5.5.6.3): the driver puts one buffer of statistics in
//! the statistics queue and the device keeps it; every polling interval the device hands it
//! back (used), and the driver fills it in again and puts it back, which is when the device
//! reads the statistics.
//!
//! Between two events the handler holds no chain of the inflate or deflate queue (each is used
//! as soon as it is read), and at most the one statistics buffer, which
//! [`BalloonHandler::save_queues`] gives back to the available ring of the queues it saves.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    BalloonMetrics, CHAIN_BUDGET, DEFLATE_QUEUE, Error, GuestStats, INFLATE_QUEUE,
    MAX_PFNS_PER_CHAIN, MAX_STATS, PAGE_SIZE, Result, STATS_QUEUE, add, inc,
};
use crate::device::{ActivateParams, VirtioInterrupt, VirtioInterruptType};
use crate::error::ErrorChain;
use crate::queue::{self, DescriptorChain, Queue};
use crate::worker::{EventHandler, EventOps};

/// The worker's token for the inflate queue's notification eventfd.
pub const INFLATE_QUEUE_TOKEN: u64 = 0;
/// The worker's token for the deflate queue's notification eventfd.
pub const DEFLATE_QUEUE_TOKEN: u64 = 1;
/// The worker's token for the statistics queue's notification eventfd.
pub const STATS_QUEUE_TOKEN: u64 = 2;
/// The worker's token for the statistics polling timer.
pub const STATS_TIMER_TOKEN: u64 = 3;

/// The size of one statistic in the statistics buffer: a le16 tag and a le64 value.
const STAT_LEN: usize = 10;
/// How often the handler logs what a driver did wrong.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One queue and its notification eventfd.
struct QueuePart {
    queue: Queue,
    evt: EventFd,
    name: &'static str,
    interrupt: VirtioInterruptType,
}

/// The device's state while active.
pub struct BalloonHandler<M> {
    mem: M,
    inflate: QueuePart,
    deflate: QueuePart,
    stats: Option<QueuePart>,
    timer: Option<TimerFd>,
    /// The head of the statistics buffer the device holds, to hand back at the next poll.
    stats_head: Option<u16>,
    /// Where that buffer was in the available ring: the statistics queue's `next_avail`
    /// before it was taken, where a saved queue starts again.
    stats_avail: u16,
    /// Whether the handler serves its queues as it starts, without waiting for the driver to
    /// notify them: what the driver made available before a snapshot was restored.
    serve_on_start: bool,
    guest_stats: Arc<Mutex<GuestStats>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<BalloonMetrics>,
    broken: bool,
    last_log: Option<Instant>,
}

impl<M> std::fmt::Debug for BalloonHandler<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandler")
            .field("stats", &self.stats.is_some())
            .field("stats_head", &self.stats_head)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace> BalloonHandler<M> {
    /// The handler of a device activated with `params`: two queues, or three with statistics
    /// polled every `stats_interval_s` seconds into `guest_stats` on `timer` (one is created
    /// when none is given: [`stats_timer`] makes one ahead, on a thread whose seccomp filter
    /// allows `timerfd_create`). The timer is armed here.
    ///
    /// # Errors
    ///
    /// When the statistics timer cannot be created or armed.
    pub fn new(
        params: ActivateParams<M>,
        stats_interval_s: u16,
        timer: Option<TimerFd>,
        guest_stats: Arc<Mutex<GuestStats>>,
        metrics: Arc<BalloonMetrics>,
    ) -> io::Result<Self> {
        let ActivateParams {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = params;
        let mut parts = queues
            .into_iter()
            .zip(queue_evts)
            .zip([
                ("inflate", INFLATE_QUEUE),
                ("deflate", DEFLATE_QUEUE),
                ("statistics", STATS_QUEUE),
            ])
            .map(|((queue, evt), (name, index))| QueuePart {
                queue,
                evt,
                name,
                interrupt: VirtioInterruptType::Queue(u16::try_from(index).unwrap_or(0)),
            });
        let (Some(inflate), Some(deflate)) = (parts.next(), parts.next()) else {
            return Err(io::Error::other(
                "a balloon needs an inflate and a deflate queue",
            ));
        };
        let stats = parts.next();
        let timer = match (&stats, timer) {
            (Some(_), Some(mut timer)) if stats_interval_s > 0 => {
                arm(&mut timer, stats_interval_s)?;
                Some(timer)
            }
            (Some(_), None) if stats_interval_s > 0 => {
                let mut timer = stats_timer()?;
                arm(&mut timer, stats_interval_s)?;
                Some(timer)
            }
            (_, timer) => timer,
        };
        Ok(BalloonHandler {
            mem,
            inflate,
            deflate,
            stats,
            timer,
            stats_head: None,
            stats_avail: 0,
            serve_on_start: false,
            guest_stats,
            interrupt,
            metrics,
            broken: false,
            last_log: None,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// Whether the driver broke a queue's protocol: the handler serves nothing more until the
    /// device is reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Makes the handler serve every queue as it starts ([`EventHandler::init`] notifies their
    /// eventfds), as though the driver had just notified them: how a restored device takes
    /// the chains the driver made available before the snapshot, the statistics buffer the
    /// saved device held among them, since the notifications the driver sent then are gone.
    pub fn serve_available_on_start(&mut self) {
        self.serve_on_start = true;
    }

    /// The queues as the handler holds them now, for a snapshot: the statistics buffer the
    /// handler keeps until its next poll is given back (the saved statistics queue's
    /// `next_avail` is where that buffer is in the available ring), so that a device activated
    /// with them takes it again. The inflate and deflate queues hold nothing between events.
    /// The handler's own queues are not changed: it goes on holding the buffer if the VM runs
    /// on.
    pub fn save_queues(&self) -> Vec<Queue> {
        let mut queues = vec![self.inflate.queue.clone(), self.deflate.queue.clone()];
        if let Some(part) = &self.stats {
            let mut queue = part.queue.clone();
            if self.stats_head.is_some() {
                queue.set_next_avail(self.stats_avail);
            }
            queues.push(queue);
        }
        queues
    }

    /// The statistics timer, for the next activation.
    pub fn into_timer(self) -> Option<TimerFd> {
        self.timer
    }

    /// Polls the statistics every `seconds` from now on, the first time at once.
    ///
    /// # Errors
    ///
    /// When the timer cannot be armed; the old interval stays.
    pub fn set_stats_interval(&mut self, seconds: u16) -> io::Result<()> {
        if self.stats.is_none() {
            return Ok(());
        }
        let Some(timer) = &mut self.timer else {
            return Err(io::Error::other("the balloon has no statistics timer"));
        };
        arm(timer, seconds)?;
        if let Err(err) = self.hand_back_stats() {
            log::error!(
                "virtio-balloon cannot ask for statistics: {}",
                ErrorChain(&err)
            );
        }
        Ok(())
    }

    /// Gives the pages of at most [`CHAIN_BUDGET`] inflate chains back to the host. Past the
    /// budget it notifies its own eventfd, so that the worker comes back for the rest.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the inflate queue's protocol.
    pub fn process_inflate(&mut self) -> Result<()> {
        let mem = self.mem.memory();
        let mut pfns = [0u32; MAX_PFNS_PER_CHAIN];
        let mut buf = [0u8; MAX_PFNS_PER_CHAIN * 4];
        let mut used = false;
        for _ in 0..CHAIN_BUDGET {
            let Some(chain) = pop(&mut self.inflate, &*mem)? else {
                return self.finish(INFLATE_QUEUE, used);
            };
            inc(&self.metrics.inflate_count);
            let count = self.read_pfns(&*mem, &chain, &mut buf, &mut pfns);
            if let Some(pfns) = pfns.get_mut(..count) {
                self.give_back(&*mem, pfns);
            }
            add_used(&mut self.inflate, &*mem, &chain)?;
            used = true;
        }
        self.come_back(INFLATE_QUEUE);
        self.finish(INFLATE_QUEUE, used)
    }

    /// Acknowledges at most [`CHAIN_BUDGET`] deflate chains: the guest's next touch of those
    /// pages faults fresh ones in, so the host has nothing to do.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the deflate queue's protocol.
    pub fn process_deflate(&mut self) -> Result<()> {
        let mem = self.mem.memory();
        let mut used = false;
        for _ in 0..CHAIN_BUDGET {
            let Some(chain) = pop(&mut self.deflate, &*mem)? else {
                return self.finish(DEFLATE_QUEUE, used);
            };
            inc(&self.metrics.deflate_count);
            add_used(&mut self.deflate, &*mem, &chain)?;
            used = true;
        }
        self.come_back(DEFLATE_QUEUE);
        self.finish(DEFLATE_QUEUE, used)
    }

    /// Reads the statistics buffers the driver put back and keeps the last one to hand back
    /// at the next poll; any other one is handed back at once, empty.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the driver broke the statistics queue's protocol.
    pub fn process_stats(&mut self) -> Result<()> {
        let mem = self.mem.memory();
        let Some(part) = self.stats.as_mut() else {
            return Ok(());
        };
        let mut used = false;
        for _ in 0..CHAIN_BUDGET {
            let avail = part.queue.next_avail();
            let Some(chain) = pop(part, &*mem)? else {
                break;
            };
            self.stats_avail = avail;
            if let Some(old) = self.stats_head.replace(chain.head_index()) {
                part.queue
                    .add_used(&*mem, old, 0)
                    .map_err(|source| queue_error(part, source))?;
                used = true;
            }
            let mut buf = [0u8; MAX_STATS * STAT_LEN];
            match chain.read_to(&*mem, &mut buf) {
                Ok(len) => {
                    let mut stats = self.guest_stats.lock().unwrap_or_else(|e| e.into_inner());
                    for stat in buf.get(..len).unwrap_or_default().chunks_exact(STAT_LEN) {
                        let (tag, value) = stat.split_at(2);
                        if let (Ok(tag), Ok(value)) =
                            (<[u8; 2]>::try_from(tag), <[u8; 8]>::try_from(value))
                        {
                            stats.set(u16::from_le_bytes(tag), u64::from_le_bytes(value));
                        }
                    }
                    inc(&self.metrics.stats_updates_count);
                }
                Err(err) => {
                    inc(&self.metrics.stats_update_fails);
                    log::debug!("virtio-balloon cannot read a statistics buffer: {err}");
                }
            }
        }
        if used {
            self.signal(STATS_QUEUE);
        }
        Ok(())
    }

    /// The polling timer fired: hands the statistics buffer back, so that the driver fills it
    /// in again.
    ///
    /// # Errors
    ///
    /// [`Error::Queue`] when the used ring cannot be written.
    pub fn poll_stats(&mut self) -> Result<()> {
        if let Some(timer) = &mut self.timer {
            // Non-blocking: a spurious wake-up reads nothing.
            let _ = timer.wait();
        }
        self.hand_back_stats()
    }

    /// Hands the statistics buffer the device holds back to the driver, if it holds one.
    fn hand_back_stats(&mut self) -> Result<()> {
        let (Some(part), Some(head)) = (self.stats.as_mut(), self.stats_head.take()) else {
            return Ok(());
        };
        let mem = self.mem.memory();
        part.queue
            .add_used(&*mem, head, 0)
            .map_err(|source| queue_error(part, source))?;
        self.signal(STATS_QUEUE);
        Ok(())
    }

    /// Reads at most [`MAX_PFNS_PER_CHAIN`] page frame numbers from `chain` into `pfns`, and
    /// returns how many. What is past them, or cannot be read, is counted as invalid.
    fn read_pfns(
        &mut self,
        mem: &M::M,
        chain: &DescriptorChain,
        buf: &mut [u8; MAX_PFNS_PER_CHAIN * 4],
        pfns: &mut [u32; MAX_PFNS_PER_CHAIN],
    ) -> usize {
        let total = u64::from(chain.readable_len());
        let read = match chain.read_to(mem, buf) {
            Ok(read) => read,
            Err(err) => {
                add(&self.metrics.invalid_pfns, total / 4);
                self.warn(format_args!("an inflate buffer cannot be read: {err}"));
                return 0;
            }
        };
        let mut count = 0;
        for (pfn, bytes) in pfns
            .iter_mut()
            .zip(buf.get(..read).unwrap_or_default().chunks_exact(4))
        {
            if let Ok(bytes) = <[u8; 4]>::try_from(bytes) {
                *pfn = u32::from_le_bytes(bytes);
                count += 1;
            }
        }
        let whole = u64::try_from(count).unwrap_or(u64::MAX).saturating_mul(4);
        if whole < total {
            add(
                &self.metrics.invalid_pfns,
                (total.saturating_sub(whole)).div_ceil(4),
            );
            self.warn(format_args!(
                "an inflate buffer holds {total} bytes; only {count} page numbers of it were read"
            ));
        }
        count
    }

    /// Gives `pfns` back to the host: sorted, each page once, in contiguous ranges.
    fn give_back(&mut self, mem: &M::M, pfns: &mut [u32]) {
        pfns.sort_unstable();
        let mut rest: &[u32] = pfns;
        while let Some((&first, _)) = rest.split_first() {
            // The run of consecutive (or repeated) numbers from `first`.
            let mut last = first;
            let mut len = 0;
            for &pfn in rest {
                if pfn == last || Some(pfn) == last.checked_add(1) {
                    last = pfn;
                    len += 1;
                } else {
                    break;
                }
            }
            rest = rest.get(len..).unwrap_or_default();
            let pages = u64::from(last) - u64::from(first) + 1;
            self.discard(mem, u64::from(first) * PAGE_SIZE, pages);
        }
    }

    /// Gives `pages` pages from guest address `start` back to the host, one `madvise` per
    /// memory region they cross; pages outside guest memory are counted and skipped.
    fn discard(&mut self, mem: &M::M, start: u64, pages: u64) {
        let Some(physical) = mem.physical_memory() else {
            inc(&self.metrics.event_fails);
            self.warn(format_args!(
                "guest memory behind an IOMMU cannot give pages back to the host"
            ));
            return;
        };
        let end = start + pages * PAGE_SIZE;
        let mut addr = start;
        while addr < end {
            let Some(region) = physical.find_region(GuestAddress(addr)) else {
                inc(&self.metrics.invalid_pfns);
                self.warn(format_args!(
                    "page {:#x} is outside guest memory",
                    addr / PAGE_SIZE
                ));
                addr += PAGE_SIZE;
                continue;
            };
            let region_start = region.start_addr().raw_value();
            let region_end = region_start.saturating_add(region.len());
            let chunk_end = end.min(region_end);
            let offset = addr - region_start;
            let len = chunk_end - addr;
            match region.get_host_address(MemoryRegionAddress(offset)) {
                Ok(host) => {
                    let advice = if region.file_offset().is_some() {
                        libc::MADV_REMOVE
                    } else {
                        libc::MADV_DONTNEED
                    };
                    match madvise(host, len, advice) {
                        Ok(()) => add(&self.metrics.inflated_pages, len / PAGE_SIZE),
                        Err(err) => {
                            inc(&self.metrics.event_fails);
                            self.warn(format_args!(
                                "cannot give {len:#x} bytes at {addr:#x} back to the host: {err}"
                            ));
                        }
                    }
                }
                Err(err) => {
                    inc(&self.metrics.event_fails);
                    self.warn(format_args!("no host address for {addr:#x}: {err}"));
                }
            }
            // A page at least, so that the loop always moves on.
            addr = chunk_end.max(addr + PAGE_SIZE);
        }
    }

    /// Notifies `queue`'s own eventfd, so that the worker comes back for the chains left after
    /// the events waiting behind.
    fn come_back(&self, queue: usize) {
        let part = if queue == INFLATE_QUEUE {
            &self.inflate
        } else {
            &self.deflate
        };
        if let Err(err) = part.evt.write(1) {
            inc(&self.metrics.event_fails);
            log::error!(
                "virtio-balloon cannot requeue its {} queue: {err}",
                part.name
            );
        }
    }

    fn finish(&mut self, queue: usize, used: bool) -> Result<()> {
        if used {
            self.signal(queue);
        }
        Ok(())
    }

    /// Tells the driver that `queue` has used buffers, when its notification suppression
    /// says so.
    fn signal(&mut self, queue: usize) {
        let mem = self.mem.memory();
        let part = match queue {
            INFLATE_QUEUE => &mut self.inflate,
            DEFLATE_QUEUE => &mut self.deflate,
            _ => match self.stats.as_mut() {
                Some(part) => part,
                None => return,
            },
        };
        let notify = part.queue.needs_notification(&*mem).unwrap_or(true);
        if notify {
            if let Err(err) = self.interrupt.trigger(part.interrupt) {
                inc(&self.metrics.event_fails);
                log::error!("virtio-balloon cannot raise its interrupt: {err}");
            }
        }
    }

    /// Logs what the driver did wrong, at most once per [`LOG_INTERVAL`].
    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last_log
            .is_some_and(|last| now.saturating_duration_since(last) < LOG_INTERVAL)
        {
            return;
        }
        self.last_log = Some(now);
        log::warn!("virtio-balloon: {what} (further reports held back for a second)");
    }

    fn fail(&mut self, ops: &mut EventOps<'_>, err: &Error) {
        inc(&self.metrics.event_fails);
        log::error!(
            "virtio-balloon stops until the driver resets it: {}",
            ErrorChain(err)
        );
        self.broken = true;
        let _ = ops.remove(self.inflate.evt.as_raw_fd());
        let _ = ops.remove(self.deflate.evt.as_raw_fd());
        if let Some(part) = &self.stats {
            let _ = ops.remove(part.evt.as_raw_fd());
        }
        if let Some(timer) = &self.timer {
            let _ = ops.remove(timer.as_raw_fd());
        }
        if let Err(err) = self.interrupt.trigger(VirtioInterruptType::NeedsReset) {
            log::error!("virtio-balloon cannot ask for a reset: {err}");
        }
    }
}

impl<M> EventHandler for BalloonHandler<M>
where
    M: GuestAddressSpace + Send + 'static,
{
    fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
        ops.add(
            self.inflate.evt.as_raw_fd(),
            EventSet::IN,
            INFLATE_QUEUE_TOKEN,
        )?;
        ops.add(
            self.deflate.evt.as_raw_fd(),
            EventSet::IN,
            DEFLATE_QUEUE_TOKEN,
        )?;
        if let Some(part) = &self.stats {
            ops.add(part.evt.as_raw_fd(), EventSet::IN, STATS_QUEUE_TOKEN)?;
        }
        if let Some(timer) = &self.timer {
            ops.add(timer.as_raw_fd(), EventSet::IN, STATS_TIMER_TOKEN)?;
        }
        if std::mem::take(&mut self.serve_on_start) {
            let parts = [
                Some(&self.inflate),
                Some(&self.deflate),
                self.stats.as_ref(),
            ];
            for part in parts.into_iter().flatten() {
                if let Err(err) = part.evt.write(1) {
                    inc(&self.metrics.event_fails);
                    log::error!(
                        "virtio-balloon cannot serve its {} queue as it starts: {err}",
                        part.name
                    );
                }
            }
        }
        Ok(())
    }

    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, _events: EventSet) {
        if self.broken {
            return;
        }
        let result = match token {
            INFLATE_QUEUE_TOKEN => {
                self.clear(INFLATE_QUEUE);
                self.process_inflate()
            }
            DEFLATE_QUEUE_TOKEN => {
                self.clear(DEFLATE_QUEUE);
                self.process_deflate()
            }
            STATS_QUEUE_TOKEN => {
                self.clear(STATS_QUEUE);
                self.process_stats()
            }
            STATS_TIMER_TOKEN => self.poll_stats(),
            _ => Ok(()),
        };
        if let Err(err) = result {
            self.fail(ops, &err);
        }
    }
}

impl<M> BalloonHandler<M> {
    /// Reads a queue's notification eventfd, so that it stops being readable.
    fn clear(&self, queue: usize) {
        let evt = match queue {
            INFLATE_QUEUE => Some(&self.inflate.evt),
            DEFLATE_QUEUE => Some(&self.deflate.evt),
            _ => self.stats.as_ref().map(|part| &part.evt),
        };
        if let Some(evt) = evt {
            if let Err(err) = evt.read() {
                if err.kind() != io::ErrorKind::WouldBlock {
                    inc(&self.metrics.event_fails);
                }
            }
        }
    }
}

fn queue_error(part: &QueuePart, source: queue::Error) -> Error {
    Error::Queue {
        queue: part.name,
        source,
    }
}

fn pop<G: GuestMemory + ?Sized>(part: &mut QueuePart, mem: &G) -> Result<Option<DescriptorChain>> {
    part.queue
        .pop(mem)
        .map_err(|source| queue_error(part, source))
}

fn add_used<G: GuestMemory + ?Sized>(
    part: &mut QueuePart,
    mem: &G,
    chain: &DescriptorChain,
) -> Result<()> {
    part.queue
        .add_used(mem, chain.head_index(), 0)
        .map_err(|source| queue_error(part, source))
}

/// A non-blocking, disarmed monotonic timer for the statistics polls.
///
/// # Errors
///
/// When the process is out of descriptors.
pub fn stats_timer() -> io::Result<TimerFd> {
    // SAFETY: timerfd_create takes no pointer; its result is checked before use.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd this function just created and owns alone.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

fn arm(timer: &mut TimerFd, seconds: u16) -> io::Result<()> {
    let period = Duration::from_secs(u64::from(seconds));
    timer
        .reset(period, Some(period))
        .map_err(|err| io::Error::from_raw_os_error(err.errno()))
}

/// `madvise(host, len, advice)`.
fn madvise(host: *mut u8, len: u64, advice: libc::c_int) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `host..host + len` lies inside one region of guest memory, which this process
    // mapped and keeps mapped while the handler holds a snapshot of it (`discard` takes the
    // range from the region's own bounds). Dropping the pages changes only what the guest
    // reads there (zeros), never the mapping, so no Rust reference is invalidated: guest
    // memory is only ever reached through volatile accesses.
    let ret = unsafe { libc::madvise(host.cast(), len, advice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
