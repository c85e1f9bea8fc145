//! A balloon saved from one VMM and restored in another, as a snapshot does it, through
//! nothing but the crate's public API: the test is both VMMs. The first inflates pages and
//! holds the guest's statistics buffer; its workers are paused, its queues and state saved
//! (the state through postcard, as a snapshot file holds it) and the device dropped. A new
//! device, in the same guest memory, takes the state and is activated with the saved queues
//! and eventfds of its own: it reads the same to the driver, takes the statistics buffer again
//! and hands it back at its next poll, and inflates from where the first one stopped.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use ember_virtio::balloon::{Balloon, BalloonConfig, BalloonState, Error, PAGE_SIZE};
use ember_virtio::mock::{CountingTrigger, MockBuffer, MockDriver, guest_memory};
use ember_virtio::{ActivateError, ActivateParams, Queue, StateError, VirtioDevice, WorkerGate};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

type Mem = Arc<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x40_0000;
/// Where the inflate chains' page numbers live, one slot of 0x100 bytes per chain.
const ARRAY: u64 = 0x3_0000;
/// Where the statistics buffer lives.
const STATS_BUF: u64 = 0x3_8000;
/// The first page the test inflates.
const FIRST_PAGE: u32 = 0x100;
const TIMEOUT: Duration = Duration::from_secs(10);

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// The guest: its memory and the driver's side of the three queues.
struct Guest {
    mem: Mem,
    drivers: Vec<MockDriver>,
    next_array: u64,
}

impl Guest {
    fn new() -> Self {
        Guest {
            mem: Arc::new(guest_memory(MEM_SIZE).unwrap()),
            drivers: (0..3u64)
                .map(|i| MockDriver::new(256, GuestAddress(i * 0x8000)))
                .collect(),
            next_array: ARRAY,
        }
    }

    /// Fills `page` with `byte`, then puts it in the balloon; returns the chain's head.
    fn inflate(&mut self, page: u32, byte: u8) -> u16 {
        let data = vec![byte; PAGE_SIZE as usize];
        self.mem
            .write_slice(&data, GuestAddress(u64::from(page) * PAGE_SIZE))
            .unwrap();
        let addr = self.next_array;
        self.next_array += 0x100;
        self.mem
            .write_slice(&page.to_le_bytes(), GuestAddress(addr))
            .unwrap();
        self.drivers[0]
            .add_chain(&*self.mem, &[MockBuffer::readable(addr, 4)])
            .unwrap()
    }

    /// Writes the statistics (tag, value) into the buffer and puts it in the statistics
    /// queue; returns its head.
    fn report(&mut self, stats: &[(u16, u64)]) -> u16 {
        let bytes: Vec<u8> = stats
            .iter()
            .flat_map(|(tag, value)| {
                let mut stat = tag.to_le_bytes().to_vec();
                stat.extend_from_slice(&value.to_le_bytes());
                stat
            })
            .collect();
        self.mem
            .write_slice(&bytes, GuestAddress(STATS_BUF))
            .unwrap();
        let len = u32::try_from(bytes.len()).unwrap();
        self.drivers[2]
            .add_chain(&*self.mem, &[MockBuffer::readable(STATS_BUF, len)])
            .unwrap()
    }

    fn used_idx(&self, queue: usize) -> u16 {
        self.drivers[queue].used_idx(&*self.mem).unwrap()
    }

    fn used_head(&self, queue: usize, idx: u16) -> u32 {
        self.drivers[queue].used_elem(&*self.mem, idx).unwrap().0
    }

    fn page_is_zero(&self, page: u32) -> bool {
        let mut data = vec![0xffu8; PAGE_SIZE as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(u64::from(page) * PAGE_SIZE))
            .unwrap();
        data.iter().all(|&b| b == 0)
    }
}

/// One VMM process's side of the device: its notification eventfds and its worker gate.
struct Host {
    kicks: Vec<EventFd>,
    gate: WorkerGate,
}

impl Host {
    fn new(queues: usize) -> Self {
        Host {
            kicks: (0..queues)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            gate: WorkerGate::new(),
        }
    }

    fn activate(&self, balloon: &mut Balloon, mem: &Mem, queues: Vec<Queue>) {
        VirtioDevice::<Mem>::activate(balloon, self.params(mem, queues)).unwrap();
    }

    fn params(&self, mem: &Mem, queues: Vec<Queue>) -> ActivateParams<Mem> {
        ActivateParams::new(
            mem.clone(),
            VirtioDevice::<Mem>::features(&Balloon::new(BalloonConfig::default()).unwrap()),
            queues,
            self.kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            Arc::new(CountingTrigger::default()),
            self.gate.clone(),
        )
    }
}

fn config_space(balloon: &Balloon) -> [u8; 8] {
    let mut config = [0u8; 8];
    VirtioDevice::<Mem>::read_config(balloon, 0, &mut config);
    config
}

#[test]
fn a_restored_balloon_takes_the_held_statistics_buffer_again_and_inflates_on() {
    let mut guest = Guest::new();
    let first = Host::new(3);
    // A minute between polls: the statistics buffer stays held until the snapshot.
    let mut balloon = Balloon::new(BalloonConfig::new(8, true, 60)).unwrap();
    let queues = guest.drivers.iter().map(MockDriver::queue).collect();
    first.activate(&mut balloon, &guest.mem, queues);

    // Two chains inflated, a statistics report held, a new target and the driver's answer.
    for page in [FIRST_PAGE, FIRST_PAGE + 1] {
        guest.inflate(page, 0xab);
    }
    first.kicks[0].write(1).unwrap();
    wait_for("the inflation", || guest.used_idx(0) == 2);
    let stats_head = guest.report(&[(4, 1 << 20), (5, 1 << 28)]);
    first.kicks[2].write(1).unwrap();
    wait_for("the statistics", || {
        balloon.stats().guest.free_memory == Some(1 << 20)
    });
    balloon.set_target_mib(3).unwrap();
    VirtioDevice::<Mem>::write_config(&mut balloon, 4, &512u32.to_le_bytes());

    // The VM is paused. The driver made one more inflate chain available (its notification
    // is lost with the old process), then the snapshot is taken.
    first.gate.pause().unwrap();
    let late = guest.inflate(FIRST_PAGE + 2, 0xcd);
    first.kicks[0].write(1).unwrap();
    let saved = VirtioDevice::<Mem>::save_queues(&balloon).unwrap();
    assert_eq!(saved.len(), 3);
    assert_eq!(saved[0].next_avail(), 2, "the late chain was not taken");
    assert_eq!(
        saved[2].next_avail(),
        0,
        "the held statistics buffer is given back"
    );
    assert_eq!(saved[2].next_used(), 0);
    // Saving changes nothing: a second snapshot reads the same.
    assert_eq!(VirtioDevice::<Mem>::save_queues(&balloon).unwrap(), saved);
    let state = balloon.save_state();
    let bytes = postcard::to_stdvec(&state).unwrap();
    let config = config_space(&balloon);
    let stats = balloon.stats();
    VirtioDevice::<Mem>::reset(&mut balloon);
    drop(balloon);
    assert_eq!(guest.used_idx(0), 2, "the paused device served nothing");

    // A new process: made as configured, given the saved state, activated with the saved
    // queues. The saved interval is shortened so that the test need not wait a minute.
    let mut state: BalloonState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(state.target_pages, 768);
    assert_eq!(state.actual_pages, 512);
    state.stats_polling_interval_s = 1;
    let second = Host::new(3);
    let mut restored = Balloon::new(BalloonConfig::new(8, true, 60)).unwrap();
    restored.restore_state(&state).unwrap();
    assert_eq!(config_space(&restored), config);
    assert_eq!(restored.stats(), stats);
    assert_eq!(restored.config().amount_mib, 3);
    assert_eq!(restored.config().stats_polling_interval_s, 1);
    second.activate(&mut restored, &guest.mem, saved);

    // The late chain is served at once, and only it: the inflate queue goes on at index 2.
    wait_for("the late chain", || guest.used_idx(0) == 3);
    assert_eq!(guest.used_head(0, 2), u32::from(late));
    assert!(guest.page_is_zero(FIRST_PAGE + 2));
    let metrics = restored.metrics().clone();
    assert_eq!(metrics.inflate_count.load(Ordering::Relaxed), 1);
    // The statistics buffer was taken again, and the next poll hands it back.
    wait_for("the poll", || guest.used_idx(2) == 1);
    assert_eq!(guest.used_head(2, 0), u32::from(stats_head));
    assert_eq!(metrics.stats_updates_count.load(Ordering::Relaxed), 1);
    // The driver fills it in again: the restored device reads the new numbers.
    guest.report(&[(4, 3 << 20)]);
    second.kicks[2].write(1).unwrap();
    wait_for("the new statistics", || {
        restored.stats().guest.free_memory == Some(3 << 20)
    });
    assert_eq!(restored.stats().guest.total_memory, Some(1 << 28));
    // Inflating goes on through the new eventfds.
    let next = guest.inflate(FIRST_PAGE + 3, 0xef);
    second.kicks[0].write(1).unwrap();
    wait_for("the next chain", || guest.used_idx(0) == 4);
    assert_eq!(guest.used_head(0, 3), u32::from(next));
    assert!(guest.page_is_zero(FIRST_PAGE + 3));
    assert_eq!(metrics.inflate_count.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.event_fails.load(Ordering::Relaxed), 0);
    VirtioDevice::<Mem>::reset(&mut restored);
}

#[test]
fn a_balloon_without_statistics_saves_two_queues_and_restores_from_its_state_alone() {
    let mut guest = Guest::new();
    let first = Host::new(2);
    let mut balloon = Balloon::new(BalloonConfig::new(2, false, 0)).unwrap();
    let queues = guest.drivers[..2].iter().map(MockDriver::queue).collect();
    first.activate(&mut balloon, &guest.mem, queues);
    guest.inflate(FIRST_PAGE, 1);
    first.kicks[0].write(1).unwrap();
    wait_for("the inflation", || guest.used_idx(0) == 1);
    first.gate.pause().unwrap();
    let saved = VirtioDevice::<Mem>::save_queues(&balloon).unwrap();
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[0].next_avail(), 1);
    let state = balloon.save_state();
    VirtioDevice::<Mem>::reset(&mut balloon);

    let mut restored = Balloon::from_state(&state).unwrap();
    assert!(!restored.stats_enabled());
    assert!(!restored.config().deflate_on_oom);
    assert_eq!(restored.save_state(), state);
    let second = Host::new(2);
    second.activate(&mut restored, &guest.mem, saved);
    guest.inflate(FIRST_PAGE + 1, 2);
    second.kicks[0].write(1).unwrap();
    wait_for("the next chain", || guest.used_idx(0) == 2);
    assert_eq!(
        restored.metrics().inflate_count.load(Ordering::Relaxed),
        1,
        "the chain served before the snapshot is not served again"
    );
    VirtioDevice::<Mem>::reset(&mut restored);
}

#[test]
fn states_that_do_not_fit_the_balloon_are_refused_and_change_nothing() {
    let with_stats = Balloon::new(BalloonConfig::new(4, true, 5)).unwrap();
    let state = with_stats.save_state();
    let invalid = |result: Result<(), StateError>| match result {
        Err(StateError::Invalid(why)) => why,
        other => panic!("{other:?}"),
    };

    // Statistics on one side only: the queues would not match.
    let mut without = Balloon::new(BalloonConfig::new(4, true, 0)).unwrap();
    let why = invalid(without.restore_state(&state));
    assert!(why.contains("statistics queue"), "{why}");
    let mut with = Balloon::new(BalloonConfig::new(4, true, 5)).unwrap();
    let why = invalid(with.restore_state(&without.save_state()));
    assert!(why.contains("statistics queue"), "{why}");
    // Another DEFLATE_ON_OOM: the features would not match.
    let mut no_oom = Balloon::new(BalloonConfig::new(4, false, 5)).unwrap();
    let why = invalid(no_oom.restore_state(&state));
    assert!(why.contains("deflate_on_oom"), "{why}");
    // A target that no API call sets.
    let odd = BalloonState {
        target_pages: 257,
        ..state
    };
    let why = invalid(with.restore_state(&odd));
    assert!(why.contains("257"), "{why}");
    assert!(matches!(
        Balloon::from_state(&odd),
        Err(Error::State(StateError::Invalid(_)))
    ));
    assert_eq!(with.save_state(), state, "nothing changed");
    assert_eq!(no_oom.stats().target_pages, 1024);

    // A truncated or garbled file is an error of the decoder, never a panic.
    let bytes = postcard::to_stdvec(&state).unwrap();
    for len in 0..bytes.len() {
        assert!(postcard::from_bytes::<BalloonState>(&bytes[..len]).is_err());
    }
    let _ = postcard::from_bytes::<BalloonState>(&[0xff; 64]);
}

#[test]
fn an_active_balloon_refuses_a_state_and_an_inactive_one_has_no_queues_to_save() {
    let guest = Guest::new();
    let host = Host::new(3);
    let mut balloon = Balloon::new(BalloonConfig::new(1, false, 1)).unwrap();
    assert!(matches!(
        VirtioDevice::<Mem>::save_queues(&balloon),
        Err(StateError::NotActive)
    ));
    let state = balloon.save_state();
    // Saved queues of the wrong count are refused by the activation.
    let two = guest.drivers[..2].iter().map(MockDriver::queue).collect();
    assert!(matches!(
        VirtioDevice::<Mem>::activate(&mut balloon, host.params(&guest.mem, two)),
        Err(ActivateError::QueueCount {
            expected: 3,
            given: 2
        })
    ));
    let queues = guest.drivers.iter().map(MockDriver::queue).collect();
    host.activate(&mut balloon, &guest.mem, queues);
    assert!(matches!(
        balloon.restore_state(&state),
        Err(StateError::Invalid(_))
    ));
    VirtioDevice::<Mem>::reset(&mut balloon);
    assert!(matches!(
        VirtioDevice::<Mem>::save_queues(&balloon),
        Err(StateError::NotActive)
    ));
}
