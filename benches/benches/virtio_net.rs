//! virtio-net's transmit path into a TAP, beside plain `write(2)`s of the same bytes on the same
//! TAP.
//!
//! Each frame is one 1500-byte descriptor: the 12-byte virtio-net header (no offload) and a
//! 1488-byte Ethernet frame (a 14-byte header to a unicast address that is not the TAP's, of the
//! local experimental EtherType, and 1474 bytes of payload), so that the host stack drops it as
//! soon as it looks. The device path is what [`NetHandler::process_tx`] does per chain:
//! notifications off, pop and validate the chain, map it to iovecs, one `writev` on the TAP, the
//! used element, notifications back on, and the interrupt decision (the interrupt itself is a
//! no-op here, where a VMM writes an irqfd). The mock driver publishes the chains outside the
//! timed part; `device_1` gets one chain per notification, `device_burst64` 64.
//!
//! Each device case has its reference timed the same way, so that both pay the same clock
//! reads: `raw_write_1` times each `write` between two clock reads, as `device_1` times each
//! notification, and `raw_write_burst64` 64 writes at a time.
//!
//! The bench needs a TAP, so root and `/dev/net/tun`; it brings the TAP up with `ip link`,
//! since a TAP that is down refuses writes with EIO. Without one it says why and measures
//! nothing.
//!
//! The receive path (`virtio_net/rx_1500`) reads from one end of a UNIX datagram pair, the
//! backend ember's tests use, since frames for a TAP's reader come from the host's network
//! stack and cannot be produced as evenly: per frame, what [`NetHandler::process_rx`] does (the
//! rate limiter's check, one `recv` into the device's buffer, the copy into the guest's
//! writable chains, the used elements, the interrupt decision), beside a plain `recv` of the
//! same datagrams. The peer sends the frames, and the mock driver offers the chains, outside
//! the timed part; `device_burst64` takes 64 frames per notification. `raw_recv_1` and
//! `raw_recv_burst64` time the `recv`s one and 64 at a time. `virtio_net/rx_64k` does the same
//! with what host-to-guest TCP brings with segmentation offload: 64 KiB segments, over 17
//! merged receive buffers of a page each, one frame per notification.

use std::hint::black_box;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
use ember_virtio::net::{NetHandler, NetRateLimiters, QUEUE_SIZE, VNET_HDR_LEN};
use ember_virtio::tap::Tap;
use ember_virtio::{ActivateParams, IrqTrigger, MmioInterrupt, WorkerGate};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Bytes per chain: the virtio-net header and the Ethernet frame.
const CHAIN_LEN: usize = 1500;
/// Where the frame lies in guest memory, after both rings.
const FRAME_ADDR: u64 = 0x1_0000;

/// An interrupt line that goes nowhere.
struct NoIrq;

impl IrqTrigger for NoIrq {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The bytes of one chain.
fn chain_bytes() -> Vec<u8> {
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend([0x06, 0, 0, 0, 0, 0x02]);
    bytes.extend([0x06, 0, 0, 0, 0, 0x01]);
    bytes.extend([0x88, 0xb5]);
    bytes.resize(CHAIN_LEN, 0x5a);
    bytes
}

/// The transmit side of a device over `tap`, with the mock driver on its queues.
struct Transmitter {
    mem: Arc<GuestMemoryMmap<()>>,
    tx: MockDriver,
    handler: NetHandler<Arc<GuestMemoryMmap<()>>, Tap>,
}

impl Transmitter {
    fn new(tap: Tap) -> Self {
        let mem = Arc::new(guest_memory(0x2_0000).expect("cannot map guest memory"));
        let rx = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let tx = MockDriver::new(QUEUE_SIZE, GuestAddress(0x4000));
        mem.write_slice(&chain_bytes(), GuestAddress(FRAME_ADDR))
            .expect("the frame fits in guest memory");
        let eventfd = || EventFd::new(EFD_NONBLOCK).expect("cannot create an eventfd");
        let params = ActivateParams::new(
            mem.clone(),
            1 << VIRTIO_F_VERSION_1,
            vec![rx.queue(), tx.queue()],
            vec![eventfd(), eventfd()],
            Arc::new(MmioInterrupt::new(NoIrq)),
            WorkerGate::new(),
        );
        // No limit: what is measured is the transmit path, the limiter's check included.
        let handler = NetHandler::new(tap, NetRateLimiters::default(), params)
            .expect("two queues and two eventfds");
        Transmitter { mem, tx, handler }
    }

    /// Publishes `count` chains, each the whole frame.
    fn publish(&mut self, count: u64) {
        let chain = [MockBuffer::readable(FRAME_ADDR, CHAIN_LEN as u32)];
        for _ in 0..count {
            self.tx
                .add_chain(&*self.mem, &chain)
                .expect("the ring is in guest memory");
        }
    }

    /// Times `iters` chains through the device, `burst` per notification.
    fn run(&mut self, iters: u64, burst: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let count = left.min(burst);
            self.publish(count);
            let start = Instant::now();
            self.handler
                .process_tx()
                .expect("the mock driver keeps to the protocol");
            total += start.elapsed();
            left -= count;
        }
        total
    }
}

fn bench_tx(c: &mut Criterion) {
    let tap = match ember_virtio::mock::test_tap("embbench%d") {
        Ok(tap) => tap,
        Err(why) => {
            println!("virtio_net: skipped, cannot set up a TAP here: {why}");
            return;
        }
    };
    let bytes = chain_bytes();
    let mut group = c.benchmark_group("virtio_net/tx_1500");
    group.throughput(Throughput::Bytes(CHAIN_LEN as u64));

    let mut transmitter = Transmitter::new(tap);
    // What is measured sends every frame.
    transmitter.run(4, 1);
    assert_eq!(
        transmitter.handler.tx_dropped(),
        0,
        "the TAP takes the frames"
    );
    group.bench_function("device_1", |b| {
        b.iter_custom(|iters| transmitter.run(iters, 1))
    });
    group.bench_function("device_burst64", |b| {
        b.iter_custom(|iters| transmitter.run(iters, 64))
    });
    assert_eq!(
        transmitter.handler.tx_dropped(),
        0,
        "the TAP took every frame"
    );

    let tap = transmitter.handler.into_backend();
    for burst in [1, 64] {
        group.bench_function(format!("raw_write_{}", burst_name(burst)), |b| {
            b.iter_custom(|iters| {
                time_bursts(iters, burst, |count| {
                    for _ in 0..count {
                        let written = tap
                            .write(black_box(&bytes))
                            .expect("the TAP takes the frame");
                        assert_eq!(written, CHAIN_LEN);
                    }
                })
            })
        });
    }
    group.finish();
}

/// `1` or `burst64`, as the device cases are named.
fn burst_name(burst: u64) -> String {
    if burst == 1 {
        "1".to_owned()
    } else {
        format!("burst{burst}")
    }
}

/// Times `iters` operations, `burst` at a time between two clock reads, as the device cases
/// time each notification: `run(count)` does `count` of them.
fn time_bursts(iters: u64, burst: u64, mut run: impl FnMut(u64)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let count = left.min(burst);
        let start = Instant::now();
        run(count);
        total += start.elapsed();
        left -= count;
    }
    total
}

/// What the receive bench moves: frames of `frame_len` bytes, header included, each into
/// `chains` chains of `buffer_len` writable bytes, with the features the driver negotiated.
struct RxShape {
    features: u64,
    frame_len: usize,
    buffer_len: u32,
    chains: u64,
}

/// One 1500-byte frame into one chain of 1526 bytes, without merged buffers.
const RX_1500: RxShape = RxShape {
    features: 1 << VIRTIO_F_VERSION_1,
    frame_len: CHAIN_LEN,
    buffer_len: 1526,
    chains: 1,
};

/// A 64 KiB TCP segment (host-to-guest TCP with segmentation offload) over 17 merged buffers
/// of a page each, as Linux's driver offers them for such traffic.
const RX_64K: RxShape = RxShape {
    features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF),
    frame_len: VNET_HDR_LEN + 65536,
    buffer_len: 4096,
    chains: 17,
};

/// The receive side of a device over a datagram socket, with the mock driver on its queues
/// and the socket's peer sending the frames.
struct Receiver {
    mem: Arc<GuestMemoryMmap<()>>,
    rx: MockDriver,
    handler: NetHandler<Arc<GuestMemoryMmap<()>>, UnixDatagram>,
    peer: UnixDatagram,
    frame: Vec<u8>,
    shape: &'static RxShape,
}

impl Receiver {
    fn new(shape: &'static RxShape) -> Self {
        let mem = Arc::new(guest_memory(0x4_0000).expect("cannot map guest memory"));
        let rx = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let tx = MockDriver::new(QUEUE_SIZE, GuestAddress(0x4000));
        let (device, peer) = UnixDatagram::pair().expect("cannot create a socket pair");
        device
            .set_nonblocking(true)
            .expect("cannot make the socket non-blocking");
        let eventfd = || EventFd::new(EFD_NONBLOCK).expect("cannot create an eventfd");
        let (rx_queue, tx_queue) = (rx.queue(), tx.queue());
        rx_queue
            .validate(&*mem)
            .expect("the rings are in guest memory");
        tx_queue
            .validate(&*mem)
            .expect("the rings are in guest memory");
        let params = ActivateParams::new(
            mem.clone(),
            shape.features,
            vec![rx_queue, tx_queue],
            vec![eventfd(), eventfd()],
            Arc::new(MmioInterrupt::new(NoIrq)),
            WorkerGate::new(),
        );
        let handler = NetHandler::new(device, NetRateLimiters::default(), params)
            .expect("two queues and two eventfds");
        let mut frame = chain_bytes();
        frame.resize(shape.frame_len, 0x5a);
        Receiver {
            mem,
            rx,
            handler,
            peer,
            frame,
            shape,
        }
    }

    /// Offers the chains of `count` frames and sends the frames.
    fn prepare(&mut self, count: u64) {
        for _ in 0..count {
            for i in 0..self.shape.chains {
                let addr = FRAME_ADDR + i * u64::from(self.shape.buffer_len);
                self.rx
                    .add_chain(
                        &*self.mem,
                        &[MockBuffer::writable(addr, self.shape.buffer_len)],
                    )
                    .expect("the ring is in guest memory");
            }
            self.peer
                .send(&self.frame)
                .expect("the socket takes the frame");
        }
    }

    /// Times `iters` frames through the device, `burst` per notification.
    fn run(&mut self, iters: u64, burst: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let count = left.min(burst);
            self.prepare(count);
            let start = Instant::now();
            self.handler
                .process_rx()
                .expect("the mock driver keeps to the protocol");
            total += start.elapsed();
            left -= count;
        }
        total
    }
}

fn bench_rx(c: &mut Criterion) {
    // 64 frames of 64 KiB would not fit in the socket's buffer.
    for (name, shape, bursts) in [
        ("rx_1500", &RX_1500, &[1, 64][..]),
        ("rx_64k", &RX_64K, &[1]),
    ] {
        let mut group = c.benchmark_group(format!("virtio_net/{name}"));
        group.throughput(Throughput::Bytes(shape.frame_len as u64));
        let mut receiver = Receiver::new(shape);
        receiver.run(4, 1);
        assert_eq!(
            receiver.handler.rx_dropped(),
            0,
            "the chains take the frames"
        );
        for &burst in bursts {
            group.bench_function(format!("device_{}", burst_name(burst)), |b| {
                b.iter_custom(|iters| receiver.run(iters, burst))
            });
        }
        assert_eq!(receiver.handler.rx_dropped(), 0, "every frame was received");

        let (reader, writer) = UnixDatagram::pair().expect("cannot create a socket pair");
        let frame = receiver.frame.clone();
        // As much room as the device's chains give the frame.
        let mut buf = vec![0u8; shape.buffer_len as usize * shape.chains as usize];
        for &burst in bursts {
            group.bench_function(format!("raw_recv_{}", burst_name(burst)), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let count = left.min(burst);
                        for _ in 0..count {
                            writer.send(&frame).expect("the socket takes the frame");
                        }
                        total += time_bursts(count, count, |count| {
                            for _ in 0..count {
                                let read = reader.recv(black_box(&mut buf)).expect("a frame waits");
                                assert_eq!(read, frame.len());
                            }
                        });
                        left -= count;
                    }
                    total
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_tx, bench_rx);
criterion_main!(benches);
