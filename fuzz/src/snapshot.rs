//! A snapshot's state file (`PUT /snapshot/load`'s `snapshot_path`), and what a restore does
//! with the devices' states in it.

use std::sync::Arc;

use ember_legacy::{AcpiPmDevice, EventFdTrigger, I8042Device, SerialDevice};
use ember_snapshot::{CHECKSUM_LEN, Error, HEADER_LEN, Limits, MAGIC};
use ember_virtio::WorkerGate;
use ember_virtio::mmio::{MmioState, MmioTransport};
use ember_virtio::mock::{CountingTrigger, MockDevice};
use ember_vmm::vmm::snapshot::{FORMAT_VERSION, MicrovmState};

use crate::virtio::guest_memory;

/// The most queues a transport's state may have for the target to restore it: more than any
/// virtio device of ember has.
const MAX_QUEUES: usize = 8;

/// What the snapshot state target made of an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// The state decoded; of its virtio transports, `restored` took their state and `refused`
    /// were refused it with an error.
    Loaded {
        /// Transports restored.
        restored: usize,
        /// Transports that refused their state.
        refused: usize,
    },
    /// Refused, for the reason named (the [`Error`] variant).
    Refused(&'static str),
}

/// Reads `data` as a snapshot's state file, as a restore reads it.
///
/// Input that starts with the file's magic is the whole file, header and checksum included;
/// any other input is the state alone, put in a file with a right header and checksum, so that
/// the fuzzer reaches the decoder past the checksum.
///
/// A state that decodes must encode back to a file that loads as the same state. Its serial
/// console, i8042 and ACPI PM states are then restored on fresh devices, and each virtio
/// transport's state on a fresh transport over a device of its type and queue sizes; whatever
/// is restored must save back as it was given. Everything else must be refused with an error,
/// never a panic or an allocation larger than the input.
///
/// # Panics
///
/// Only on a finding.
pub fn snapshot_state(data: &[u8]) -> SnapshotOutcome {
    let file = if data.starts_with(&MAGIC) {
        data.to_vec()
    } else {
        frame(data)
    };
    let state: MicrovmState =
        match ember_snapshot::load(&mut &file[..], FORMAT_VERSION, Limits::default()) {
            Ok(state) => state,
            Err(err) => return SnapshotOutcome::Refused(refusal(&err)),
        };

    let mut again = Vec::new();
    ember_snapshot::save(&mut again, FORMAT_VERSION, &state).expect("a decoded state encodes");
    let reloaded: MicrovmState =
        ember_snapshot::load(&mut &again[..], FORMAT_VERSION, Limits::default())
            .expect("an encoded state loads");
    assert_eq!(reloaded, state, "the state changes through the file format");

    restore_legacy(&state);
    let transports = state
        .drives
        .iter()
        .map(|d| &d.transport)
        .chain(state.nets.iter().map(|d| &d.transport))
        .chain(state.entropy.iter().map(|d| &d.transport))
        .chain(state.balloon.iter().map(|d| &d.transport))
        .chain(state.vsock.iter().map(|d| &d.transport));
    let (mut restored, mut refused) = (0, 0);
    for transport in transports {
        if restore_transport(transport) {
            restored += 1;
        } else {
            refused += 1;
        }
    }
    SnapshotOutcome::Loaded { restored, refused }
}

/// `body` in a state file of ember's format version, with the header and checksum right.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let len = u64::try_from(body.len()).expect("a slice's length fits in a u64");
    let mut file = Vec::with_capacity(HEADER_LEN + body.len() + CHECKSUM_LEN);
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&len.to_le_bytes());
    file.extend_from_slice(body);
    let checksum = crc32fast::hash(&file);
    file.extend_from_slice(&checksum.to_le_bytes());
    file
}

fn refusal(err: &Error) -> &'static str {
    match err {
        Error::Truncated => "Truncated",
        Error::BadMagic => "BadMagic",
        Error::Version { .. } => "Version",
        Error::Flags(_) => "Flags",
        Error::TooLarge { .. } => "TooLarge",
        Error::Checksum { .. } => "Checksum",
        Error::TrailingBytes => "TrailingBytes",
        Error::Decode(_) => "Decode",
        // Reading a slice cannot fail, and nothing is encoded.
        other => panic!("loading gave an error it cannot give: {other}"),
    }
}

/// Restores the legacy devices' states on fresh devices.
fn restore_legacy(state: &MicrovmState) {
    let trigger = || EventFdTrigger::new().expect("eventfds are available");
    let mut serial = SerialDevice::new(trigger(), Vec::new()).expect("eventfds are available");
    restore_on(
        "serial",
        &mut serial,
        &state.serial,
        SerialDevice::save_state,
        SerialDevice::restore_state,
    );
    let mut i8042 = I8042Device::new(trigger(), trigger());
    restore_on(
        "i8042",
        &mut i8042,
        &state.i8042,
        I8042Device::save_state,
        I8042Device::restore_state,
    );
    let mut acpi_pm = AcpiPmDevice::new(trigger(), 5);
    restore_on(
        "ACPI PM",
        &mut acpi_pm,
        &state.acpi_pm,
        AcpiPmDevice::save_state,
        AcpiPmDevice::restore_state,
    );
}

/// Restores `state` on `device`: a state restored must save back unchanged, one refused must
/// leave the device as it was.
fn restore_on<D, S: PartialEq + std::fmt::Debug, E>(
    name: &str,
    device: &mut D,
    state: &S,
    save: fn(&D) -> S,
    restore: fn(&mut D, &S) -> Result<(), E>,
) {
    let fresh = save(device);
    match restore(device, state) {
        Ok(()) => assert_eq!(&save(device), state, "{name} state"),
        Err(_) => assert_eq!(save(device), fresh, "a refused {name} state changed it"),
    }
}

/// Restores `state` on a fresh transport over a device of its type and queue sizes that offers
/// every feature; returns whether it was taken. One taken must save back as it was given, and
/// activate the device exactly when the state says it was active; one refused must leave the
/// transport in reset.
fn restore_transport(state: &MmioState) -> bool {
    if state.queues.len() > MAX_QUEUES {
        return false;
    }
    let sizes: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
    let (device, log) = MockDevice::new(state.device_type, &sizes, u64::MAX, &[0; 8]);
    let mut transport = MmioTransport::new(
        Arc::new(guest_memory()),
        Box::new(device),
        CountingTrigger::default(),
        WorkerGate::new(),
    )
    .expect("eventfds are available");
    let fresh = transport.save_state().expect("an inactive transport saves");
    let taken = transport.restore_state(state).is_ok();
    let active = log.lock().expect("not poisoned").active;
    if taken {
        assert_eq!(active, state.active, "activated against its state");
        let saved = transport.save_state().expect("a restored transport saves");
        assert_eq!(
            &saved, state,
            "a transport's state changed through a restore"
        );
    } else {
        assert!(!active, "a refused state left the device active");
        let saved = transport.save_state().expect("a transport in reset saves");
        assert_eq!(saved, fresh, "a refused state changed the transport");
    }
    taken
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, check_seeds, corpus_dir, replay};

    /// The seeds and what the target makes of them.
    const SEEDS: &[(&str, SnapshotOutcome)] = &[
        (
            "tiny-guest",
            SnapshotOutcome::Loaded {
                restored: 4,
                refused: 0,
            },
        ),
        ("empty", SnapshotOutcome::Refused("Decode")),
        ("garbage-state", SnapshotOutcome::Refused("Decode")),
        ("bad-magic", SnapshotOutcome::Refused("Decode")),
        ("truncated-header", SnapshotOutcome::Refused("Truncated")),
        ("other-version", SnapshotOutcome::Refused("Version")),
        ("flags", SnapshotOutcome::Refused("Flags")),
        ("claims-a-huge-state", SnapshotOutcome::Refused("TooLarge")),
        (
            "claims-more-than-it-has",
            SnapshotOutcome::Refused("Truncated"),
        ),
        ("bad-checksum", SnapshotOutcome::Refused("Checksum")),
        ("trailing-byte", SnapshotOutcome::Refused("TrailingBytes")),
        ("state-cut-short", SnapshotOutcome::Refused("Decode")),
    ];

    /// The seeds generated from `tiny-guest`, a state file that ember wrote of a small guest
    /// with every kind of virtio device (see `write_snapshot_seed_corpus`).
    fn seeds() -> Seeds {
        let real = fs::read(corpus_dir("snapshot_state").join("tiny-guest")).unwrap();
        let body = &real[HEADER_LEN..real.len() - CHECKSUM_LEN];
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut file = real.clone();
            edit(&mut file);
            file
        };
        // A header edit that keeps the checksum right, so that the edit is what is refused.
        let rechecked = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut file = real.clone();
            file.truncate(real.len() - CHECKSUM_LEN);
            edit(&mut file);
            let checksum = crc32fast::hash(&file);
            file.extend_from_slice(&checksum.to_le_bytes());
            file
        };
        vec![
            ("empty", Vec::new()),
            (
                "garbage-state",
                b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
            ),
            // Taken as a state, framed, which does not decode.
            ("bad-magic", with(&|f| f[0] = b'X')),
            ("truncated-header", real[..HEADER_LEN - 1].to_vec()),
            ("other-version", rechecked(&|f| f[8] = 2)),
            ("flags", rechecked(&|f| f[12] = 1)),
            (
                "claims-a-huge-state",
                rechecked(&|f| f[16..24].copy_from_slice(&u64::MAX.to_le_bytes())),
            ),
            (
                "claims-more-than-it-has",
                rechecked(&|f| {
                    let len = u64::try_from(body.len()).unwrap() + 1;
                    f[16..24].copy_from_slice(&len.to_le_bytes());
                }),
            ),
            ("bad-checksum", with(&|f| *f.last_mut().unwrap() ^= 1)),
            ("trailing-byte", with(&|f| f.push(0))),
            ("state-cut-short", body[..body.len() / 2].to_vec()),
        ]
    }

    #[test]
    fn snapshot_state_corpus_replays() {
        replay("snapshot_state", SEEDS, snapshot_state);
    }

    #[test]
    fn snapshot_seeds_on_disk_are_the_generated_ones() {
        check_seeds(&[("snapshot_state", seeds())]);
    }

    /// Writes the seed files generated from `tiny-guest`. They are checked in; run this only
    /// to regenerate them. `tiny-guest` itself is written by the ignored test
    /// `write_snapshot_fuzz_seed` of `examples/ember/tests/snapshot.rs`.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_snapshot_seed_corpus() {
        let dir = corpus_dir("snapshot_state");
        for (name, data) in seeds() {
            fs::write(dir.join(name), data).unwrap();
        }
    }
}
