//! The metadata service's place in a network interface: [`MmdsBackend`] puts ember-mmds's
//! guest-facing stack in front of the interface's TAP.
//!
//! Every frame the guest transmits goes to the stack first: what is for the MMDS address (ARP
//! about it, IPv4 to it) is the stack's and never reaches the TAP; the rest goes to the TAP
//! unchanged, straight from guest memory. Only frames whose first bytes say they may be the
//! stack's ([`MmdsNetworkStack::may_detour`]) are copied out of guest memory. The stack's
//! answers are handed to the guest before anything the TAP holds, and the device learns of
//! them through [`NetBackend::has_pending_frames`], since they do not make the TAP readable.
//!
//! A transmitted frame may leave its TCP checksum to the device (`VIRTIO_NET_HDR_F_NEEDS_CSUM`,
//! as the guest does once the checksum offload is negotiated): the backend completes it, as
//! the TAP would have, before the stack checks it.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use ember_mmds::RequestHandler;
use ember_mmds::ns::{DETOUR_HEAD_LEN, MmdsNetworkStack, StackMetrics, ipv4};
use ember_virtio::iov::GuestIoVecs;
use ember_virtio::net::{MAX_BUFFER_LEN, NetBackend, VNET_HDR_LEN};
use vm_memory::GuestMemory;

/// The MAC address the stack answers with on every interface: locally administered, and the
/// one Firecracker uses.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The `flags` bit of the virtio-net header that says the checksum is the device's to finish.
const NEEDS_CSUM: u8 = 1;
/// Offsets of `csum_start` and `csum_offset` in the virtio-net header.
const CSUM_START: usize = 6;
const CSUM_OFFSET: usize = 8;

/// A network interface's backend with, optionally, the metadata service's stack in front of
/// it.
#[derive(Debug)]
pub struct MmdsBackend<B> {
    inner: B,
    stack: Option<MmdsNetworkStack>,
    /// A transmitted frame copied out of guest memory, header included, for the stack to look
    /// at: allocated once, at the first frame that needs it.
    frame: Vec<u8>,
}

impl<B> MmdsBackend<B> {
    /// `inner` alone: every frame goes to it.
    pub fn new(inner: B) -> Self {
        MmdsBackend {
            inner,
            stack: None,
            frame: Vec::new(),
        }
    }

    /// `inner` with `stack` in front of it.
    pub fn with_stack(inner: B, stack: MmdsNetworkStack) -> Self {
        MmdsBackend {
            inner,
            stack: Some(stack),
            frame: Vec::new(),
        }
    }

    /// The stack in front of the backend, if there is one.
    pub fn stack(&self) -> Option<&MmdsNetworkStack> {
        self.stack.as_ref()
    }
}

/// The stack for an interface: it answers for `ipv4` with [`MMDS_MAC`], hands requests to
/// `handler`, and counts into `metrics`, which every interface's stack shares.
pub fn stack(
    ipv4: Ipv4Addr,
    handler: Box<dyn RequestHandler>,
    metrics: Arc<StackMetrics>,
) -> MmdsNetworkStack {
    MmdsNetworkStack::new(MMDS_MAC, ipv4, handler).with_metrics(metrics)
}

impl<B: AsRawFd> AsRawFd for MmdsBackend<B> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl<B: NetBackend> NetBackend for MmdsBackend<B> {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(stack) = self.stack.as_mut() {
            if let Some((header, rest)) = buf.split_at_mut_checked(VNET_HDR_LEN) {
                if let Some(len) = stack.write_next_frame(rest) {
                    // No offload: the stack's checksums are complete.
                    header.fill(0);
                    return Ok(VNET_HDR_LEN.saturating_add(len));
                }
            }
        }
        self.inner.read_frame(buf)
    }

    fn write_frame<M: GuestMemory + ?Sized>(
        &mut self,
        frame: &GuestIoVecs<'_, M>,
    ) -> io::Result<usize> {
        if let Some(stack) = self.stack.as_mut() {
            if detour(stack, &mut self.frame, frame)? {
                return Ok(frame.len());
            }
        }
        self.inner.write_frame(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.inner.set_offload(flags)
    }

    fn has_pending_frames(&self) -> bool {
        self.stack
            .as_ref()
            .is_some_and(MmdsNetworkStack::has_frames)
            || self.inner.has_pending_frames()
    }
}

/// Hands `frame` to `stack` if it may be the stack's, copying it into `copy`; returns whether
/// the stack took it.
fn detour<M: GuestMemory + ?Sized>(
    stack: &mut MmdsNetworkStack,
    copy: &mut Vec<u8>,
    frame: &GuestIoVecs<'_, M>,
) -> io::Result<bool> {
    let mut head = [0u8; VNET_HDR_LEN + DETOUR_HEAD_LEN];
    let len = frame.copy_to(&mut head).map_err(io::Error::other)?;
    if !stack.may_detour(head.get(VNET_HDR_LEN..len).unwrap_or_default()) {
        return Ok(false);
    }
    if copy.is_empty() {
        copy.resize(MAX_BUFFER_LEN, 0);
    }
    // The device hands over no frame longer than MAX_BUFFER_LEN.
    let len = frame.copy_to(copy).map_err(io::Error::other)?;
    let Some((header, eth)) = copy
        .get_mut(..len)
        .and_then(|bytes| bytes.split_at_mut_checked(VNET_HDR_LEN))
    else {
        return Ok(false);
    };
    complete_checksum(header, eth);
    Ok(stack.detour_frame(eth))
}

/// Finishes the checksum the guest left to the device, when its virtio-net `header` says so:
/// the Internet checksum of `frame` from `csum_start` on, stored at `csum_offset` past it,
/// where the guest put the pseudo header's sum. Offsets outside the frame leave it as it is
/// (the stack then finds the checksum wrong).
fn complete_checksum(header: &[u8], frame: &mut [u8]) {
    if header.first().is_none_or(|flags| flags & NEEDS_CSUM == 0) {
        return;
    }
    let le16 = |offset: usize| {
        header
            .get(offset..offset.saturating_add(2))
            .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let start = le16(CSUM_START);
    let Some(field) = start.checked_add(le16(CSUM_OFFSET)) else {
        return;
    };
    let Some(end) = field.checked_add(2) else {
        return;
    };
    if end > frame.len() {
        return;
    }
    let sum = ipv4::checksum(&[frame.get(start..).unwrap_or_default()]);
    if let Some(dst) = frame.get_mut(field..end) {
        dst.copy_from_slice(&sum.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use ember_mmds::Handled;
    use ember_virtio::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

    use super::*;
    use crate::api::model::DEFAULT_MMDS_ADDRESS;

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 9];
    const GUEST_IP: [u8; 4] = [10, 0, 0, 2];

    struct Fixed;

    impl RequestHandler for Fixed {
        fn handle(&mut self, received: &[u8]) -> Handled {
            Handled::Response {
                consumed: received.len(),
                bytes: b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
                close: false,
            }
        }
    }

    fn backend() -> (MmdsBackend<UnixDatagram>, UnixDatagram) {
        let (device, peer) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let stack = stack(DEFAULT_MMDS_ADDRESS, Box::new(Fixed), Arc::default());
        (MmdsBackend::with_stack(device, stack), peer)
    }

    /// Hands `bytes` (header included) to `backend` as the device does: from guest memory.
    fn transmit(backend: &mut MmdsBackend<UnixDatagram>, bytes: &[u8]) -> usize {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        mem.write_slice(bytes, GuestAddress(0x1000)).unwrap();
        let desc = Descriptor {
            addr: GuestAddress(0x1000),
            len: u32::try_from(bytes.len()).unwrap(),
            writable: false,
        };
        let frame = GuestIoVecs::new(&mem, [desc], Permissions::Read).unwrap();
        backend.write_frame(&frame).unwrap()
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend_from_slice(&[0xff; 6]);
        bytes.extend_from_slice(&GUEST_MAC);
        bytes.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        bytes.extend_from_slice(&GUEST_MAC);
        bytes.extend_from_slice(&GUEST_IP);
        bytes.extend_from_slice(&[0; 6]);
        bytes.extend_from_slice(&target);
        bytes
    }

    /// A SYN to the MMDS address's port 80, its TCP checksum left to the device as a guest
    /// with the checksum offload leaves it: the pseudo header's sum in the field.
    fn syn_needing_csum() -> Vec<u8> {
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes[0] = NEEDS_CSUM;
        bytes[CSUM_START..CSUM_START + 2].copy_from_slice(&34u16.to_le_bytes());
        bytes[CSUM_OFFSET..CSUM_OFFSET + 2].copy_from_slice(&16u16.to_le_bytes());
        bytes.extend_from_slice(&MMDS_MAC);
        bytes.extend_from_slice(&GUEST_MAC);
        bytes.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&GUEST_IP);
        ip.extend_from_slice(&DEFAULT_MMDS_ADDRESS.octets());
        let sum = ipv4::checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        bytes.extend_from_slice(&ip);
        let mut tcp = vec![
            0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff,
        ];
        // The pseudo header's sum, not complemented: source, destination, protocol, length.
        let pseudo = [
            &GUEST_IP[..],
            &DEFAULT_MMDS_ADDRESS.octets(),
            &[0, 6, 0, 20],
        ]
        .concat();
        let partial = !ipv4::checksum(&[&pseudo]);
        tcp.extend_from_slice(&partial.to_be_bytes());
        tcp.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&tcp);
        bytes
    }

    #[test]
    fn frames_for_the_mmds_address_never_reach_the_tap_and_are_answered() {
        let (mut backend, peer) = backend();
        let request = arp_request(DEFAULT_MMDS_ADDRESS.octets());
        assert_eq!(transmit(&mut backend, &request), request.len());
        let mut buf = [0u8; 64];
        assert!(peer.recv(&mut buf).is_err(), "nothing reached the TAP");
        assert!(backend.has_pending_frames());
        let mut frame = vec![0xaa; MAX_BUFFER_LEN];
        let len = backend.read_frame(&mut frame).unwrap();
        assert_eq!(len, VNET_HDR_LEN + 42);
        assert_eq!(frame[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(frame[VNET_HDR_LEN..VNET_HDR_LEN + 6], GUEST_MAC);
        assert_eq!(frame[VNET_HDR_LEN + 22..VNET_HDR_LEN + 28], MMDS_MAC);
        assert!(!backend.has_pending_frames());
        assert_eq!(
            backend.read_frame(&mut frame).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn other_frames_go_to_the_tap_unchanged_and_its_frames_come_back() {
        let (mut backend, peer) = backend();
        let request = arp_request([10, 0, 0, 1]);
        assert_eq!(transmit(&mut backend, &request), request.len());
        let mut buf = [0u8; 128];
        let len = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], &request[..]);
        assert!(!backend.has_pending_frames());
        peer.send(b"from the network").unwrap();
        let len = backend.read_frame(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"from the network");
        assert_eq!(
            backend
                .stack()
                .unwrap()
                .metrics()
                .rx_accepted
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn a_checksum_left_to_the_device_is_completed_before_the_stack_checks_it() {
        let (mut backend, _peer) = backend();
        let syn = syn_needing_csum();
        transmit(&mut backend, &syn);
        let metrics = backend.stack().unwrap().metrics().clone();
        assert_eq!(
            metrics
                .rx_accepted_err
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(backend.stack().unwrap().connection_count(), 1);
        let mut frame = vec![0u8; MAX_BUFFER_LEN];
        let len = backend.read_frame(&mut frame).unwrap();
        // SYN-ACK: Ethernet, IPv4, TCP with the MSS option.
        assert_eq!(len, VNET_HDR_LEN + 58);
        assert_eq!(frame[VNET_HDR_LEN + 47], 0x12);

        // Offsets past the frame leave it as is: the stack drops it as malformed.
        let mut bad = syn_needing_csum();
        bad[CSUM_OFFSET..CSUM_OFFSET + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        transmit(&mut backend, &bad);
        assert_eq!(
            metrics
                .rx_accepted_err
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn without_a_stack_every_frame_goes_to_the_tap() {
        let (device, peer) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        let mut backend = MmdsBackend::new(device);
        let request = arp_request(DEFAULT_MMDS_ADDRESS.octets());
        transmit(&mut backend, &request);
        let mut buf = [0u8; 128];
        assert_eq!(peer.recv(&mut buf).unwrap(), request.len());
        assert!(!backend.has_pending_frames());
        assert!(backend.stack().is_none());
    }
}
