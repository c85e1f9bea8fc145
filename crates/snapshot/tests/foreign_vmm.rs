//! A VMM of another project keeps its own state types and file names, and uses the format to
//! write and check its snapshots on disk.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter};

use ember_snapshot::{Error, Limits, load, read_header, save};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum DeviceState {
    Serial { fifo: Vec<u8>, ier: u8 },
    Block { next_avail: u16, next_used: u16 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OtherVmState {
    vcpu_regs: Vec<[u64; 18]>,
    devices: Vec<(String, DeviceState)>,
}

const OTHER_VERSION: u32 = 42;

fn sample() -> OtherVmState {
    OtherVmState {
        vcpu_regs: vec![[7; 18]; 4],
        devices: vec![
            (
                "ttyS0".into(),
                DeviceState::Serial {
                    fifo: b"login: ".to_vec(),
                    ier: 0x0f,
                },
            ),
            (
                "vda".into(),
                DeviceState::Block {
                    next_avail: 65535,
                    next_used: 3,
                },
            ),
        ],
    }
}

#[test]
fn a_foreign_vmm_state_goes_to_a_file_and_back_and_a_cut_file_is_refused() {
    let dir = std::env::temp_dir().join(format!("ember-snapshot-foreign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.snap");
    {
        let mut out = BufWriter::new(File::create(&path).unwrap());
        save(&mut out, OTHER_VERSION, &sample()).unwrap();
    }
    let header = read_header(&mut File::open(&path).unwrap()).unwrap();
    assert_eq!(header.version, OTHER_VERSION);

    let mut input = BufReader::new(File::open(&path).unwrap());
    let state: OtherVmState = load(&mut input, OTHER_VERSION, Limits::default()).unwrap();
    assert_eq!(state, sample());

    // A copy cut short by a full disk is caught before anything is decoded.
    let len = std::fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let err = load::<OtherVmState>(
        &mut File::open(&path).unwrap(),
        OTHER_VERSION,
        Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Truncated), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
