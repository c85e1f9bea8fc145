//! ember-virtio's vsock device hosted by a VMM that is not ember: the test is that VMM. It
//! brings its own interrupt delivery (a `VirtioInterrupt` that records what fired), serves the
//! device on its own rust-vmm `EventManager` loop with guest memory it can replace, and plays
//! the guest's driver with the crate's mock driver. A host process connects through the
//! device's Unix socket, and bytes go both ways, through nothing but the crate's public API.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
use ember_virtio::vsock::{self, PacketHeader, Vsock};
use ember_virtio::worker::manager::Subscriber;
use ember_virtio::{ActivateParams, Executor, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use event_manager::EventManager;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory as this VMM holds it: a map it can replace under running devices.
type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x40_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const GUEST_CID: u64 = 42;
const TIMEOUT: Duration = Duration::from_secs(10);

/// This VMM's interrupt delivery: it records which queues fired.
#[derive(Default)]
struct RecordingInterrupt(Mutex<Vec<VirtioInterruptType>>);

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}

/// This VMM's event loop, on a thread of its own until dropped.
struct EventLoop {
    executor: Executor,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EventLoop {
    fn start() -> Self {
        let mut manager = EventManager::<Subscriber>::new().unwrap();
        let executor = Executor::EventManager(manager.remote_endpoint());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::SeqCst) {
                    manager.run_with_timeout(10).unwrap();
                }
            }
        });
        EventLoop {
            executor,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// The guest driver's side of the device.
struct Guest {
    mem: Mem,
    rx: MockDriver,
    tx: MockDriver,
    kicks: Vec<EventFd>,
    rx_seen: u16,
    rx_given: u64,
}

impl Guest {
    fn activate(vsock: &mut Vsock, executor: Executor, irq: Arc<RecordingInterrupt>) -> Guest {
        let mem = GuestMemoryAtomic::new(guest_memory(MEM_SIZE).unwrap());
        let drivers: Vec<MockDriver> = [0u64, 0x1_0000, 0x2_0000]
            .into_iter()
            .map(|base| MockDriver::new(64, GuestAddress(base)))
            .collect();
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let device: &mut dyn VirtioDevice<Mem> = vsock;
        assert_eq!(device.device_type(), VIRTIO_ID_VSOCK);
        let mut cid = [0u8; 8];
        device.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
        device
            .activate(ActivateParams::new(
                mem.clone(),
                device.features(),
                drivers.iter().map(MockDriver::queue).collect(),
                kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
                irq,
                executor,
            ))
            .unwrap();
        Guest {
            mem,
            rx: drivers[0].clone(),
            tx: drivers[1].clone(),
            kicks,
            rx_seen: 0,
            rx_given: 0,
        }
    }

    fn give_rx(&mut self, count: u64) {
        let mem = self.mem.memory();
        for _ in 0..count {
            let addr = RX_BUFS + (self.rx_given % 64) * 0x2000;
            self.rx_given += 1;
            self.rx
                .add_chain(&*mem, &[MockBuffer::writable(addr, 4096 + 44)])
                .unwrap();
        }
        self.kicks[vsock::RX_QUEUE].write(1).unwrap();
    }

    /// Waits for the device's next packet.
    fn recv(&mut self) -> (PacketHeader, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        while self.rx.used_idx(&*self.mem.memory()).unwrap() == self.rx_seen {
            assert!(Instant::now() < deadline, "the device sent nothing");
            thread::sleep(Duration::from_millis(1));
        }
        let mem = self.mem.memory();
        let (head, len) = self.rx.used_elem(&*mem, self.rx_seen).unwrap();
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let addr = RX_BUFS + u64::from(head % 64) * 0x2000;
        let mut bytes = [0u8; vsock::HDR_SIZE];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        let header = PacketHeader::from_bytes(&bytes);
        let mut payload = vec![0u8; header.len as usize];
        mem.read_slice(&mut payload, GuestAddress(addr + 44))
            .unwrap();
        assert_eq!(len as usize, vsock::HDR_SIZE + payload.len());
        (header, payload)
    }

    fn send(&mut self, header: PacketHeader, payload: &[u8]) {
        let mem = self.mem.memory();
        let mut header = header;
        header.len = u32::try_from(payload.len()).unwrap();
        mem.write_slice(&header.to_bytes(), GuestAddress(TX_BUFS))
            .unwrap();
        mem.write_slice(payload, GuestAddress(TX_BUFS + 0x1000))
            .unwrap();
        self.tx
            .add_chain(
                &*mem,
                &[
                    MockBuffer::readable(TX_BUFS, 44),
                    MockBuffer::readable(TX_BUFS + 0x1000, header.len),
                ],
            )
            .unwrap();
        self.kicks[vsock::TX_QUEUE].write(1).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while self.tx.used_idx(&*mem).unwrap() != self.tx.avail_idx() {
            assert!(Instant::now() < deadline, "the device took nothing");
            thread::sleep(Duration::from_millis(1));
        }
    }
}

fn reply(request: &PacketHeader, op: u16) -> PacketHeader {
    PacketHeader {
        src_cid: request.dst_cid,
        dst_cid: request.src_cid,
        src_port: request.dst_port,
        dst_port: request.src_port,
        len: 0,
        type_: vsock::TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

#[test]
fn a_host_process_talks_to_the_guest_through_the_vmm_event_manager() {
    let dir = std::env::temp_dir().join(format!("foreign-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let _ = std::fs::remove_file(&path);
    let event_loop = EventLoop::start();
    let irq = Arc::new(RecordingInterrupt::default());
    let mut vsock = Vsock::new(GUEST_CID, &path).unwrap();
    let mut guest = Guest::activate(&mut vsock, event_loop.executor.clone(), irq.clone());
    guest.give_rx(16);

    // The host process asks for the guest's port 1024; the guest accepts.
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let (request, _) = guest.recv();
    assert_eq!(request.op, vsock::OP_REQUEST);
    assert_eq!((request.dst_cid, request.dst_port), (GUEST_CID, 1024));
    guest.send(reply(&request, vsock::OP_RESPONSE), &[]);
    let ok = format!("OK {}\n", request.src_port);
    let mut line = vec![0u8; ok.len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, ok.as_bytes());

    // A request and its answer.
    host.write_all(b"GET /").unwrap();
    let (data, payload) = guest.recv();
    assert_eq!((data.op, payload.as_slice()), (vsock::OP_RW, &b"GET /"[..]));
    guest.send(reply(&request, vsock::OP_RW), b"200 OK");
    let mut answer = [0u8; 6];
    host.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"200 OK");

    assert!(
        irq.0
            .lock()
            .unwrap()
            .contains(&VirtioInterruptType::Queue(vsock::RX_QUEUE as u16))
    );
    let metrics = vsock.metrics().clone();
    assert_eq!(metrics.get("conns_added"), Some(1));
    assert_eq!(metrics.get("rx_bytes_count"), Some(5));
    assert_eq!(metrics.get("tx_bytes_count"), Some(6));

    // A reset closes the host's stream.
    VirtioDevice::<Mem>::reset(&mut vsock);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(vsock);
    std::fs::remove_dir_all(&dir).unwrap();
}
