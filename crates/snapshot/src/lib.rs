#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"EMBERSNP";

/// The length of the header: magic, version, flags and state length.
pub const HEADER_LEN: usize = 24;

/// The length of the checksum that ends the file.
pub const CHECKSUM_LEN: usize = 4;

/// Why a snapshot file cannot be written or read.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read or written.
    #[error("Cannot read or write the snapshot file")]
    Io(#[source] io::Error),
    /// The file ends before its header or its state does.
    #[error("The snapshot file is truncated")]
    Truncated,
    /// The file does not start with [`MAGIC`].
    #[error("The file is not a snapshot (no snapshot magic)")]
    BadMagic,
    /// The file holds another version of the state than the reader knows.
    #[error("The snapshot's format version is {found}, but this VMM reads version {supported}")]
    Version {
        /// The version the file says it holds.
        found: u32,
        /// The version the reader knows.
        supported: u32,
    },
    /// The header has flags this reader does not know.
    #[error("The snapshot has unknown flags {0:#x}")]
    Flags(u32),
    /// The state is larger than the reader accepts.
    #[error("The snapshot's state is {len} bytes, more than the {max} bytes accepted")]
    TooLarge {
        /// The state's length the header gives.
        len: u64,
        /// The most the reader accepts.
        max: u64,
    },
    /// The checksum does not match the contents: the file is corrupted.
    #[error("The snapshot file is corrupted (checksum {found:#010x}, expected {expected:#010x})")]
    Checksum {
        /// The checksum the file ends with.
        found: u32,
        /// The checksum of what the file holds.
        expected: u32,
    },
    /// More bytes follow the checksum.
    #[error("The snapshot file has bytes past its end")]
    TrailingBytes,
    /// The state cannot be encoded.
    #[error("Cannot encode the snapshot's state")]
    Encode(#[source] postcard::Error),
    /// The state does not decode as the reader's state type, although the checksum matched.
    #[error("Cannot decode the snapshot's state")]
    Decode(#[source] postcard::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What the header of a snapshot file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header {
    /// The format version of the state.
    pub version: u32,
    /// The length of the state in bytes.
    pub state_len: u64,
}

/// What a reader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The largest state, in bytes, that is read into memory: a header that claims more is
    /// refused before anything is allocated.
    pub max_state_len: u64,
}

impl Default for Limits {
    /// 64 MiB: far above what a VM's devices and vCPUs hold (a few KiB per vCPU).
    fn default() -> Self {
        Limits {
            max_state_len: 64 << 20,
        }
    }
}

/// Writes `state` as a snapshot file of format `version` to `out`; returns the bytes written.
///
/// # Errors
///
/// [`Error::Encode`] when `state` cannot be encoded, [`Error::Io`] when `out` fails.
pub fn save<W: Write, T: Serialize>(out: &mut W, version: u32, state: &T) -> Result<u64> {
    let body = postcard::to_stdvec(state).map_err(Error::Encode)?;
    let len = u64::try_from(body.len()).map_err(|_| Error::TooLarge {
        len: u64::MAX,
        max: u64::MAX,
    })?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&version.to_le_bytes());
    header[16..24].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&body);
    let checksum = crc.finalize().to_le_bytes();
    for part in [&header[..], &body, &checksum] {
        out.write_all(part).map_err(Error::Io)?;
    }
    out.flush().map_err(Error::Io)?;
    Ok(len.saturating_add((HEADER_LEN + CHECKSUM_LEN) as u64))
}

/// Reads the header of a snapshot file: what `--describe-snapshot` shows. Nothing past the
/// header is read or checked.
///
/// # Errors
///
/// [`Error::Truncated`] when the file is shorter than a header, [`Error::BadMagic`] when it is
/// not a snapshot, [`Error::Io`] when it cannot be read.
pub fn read_header<R: Read>(input: &mut R) -> Result<Header> {
    let mut header = [0u8; HEADER_LEN];
    read_exact(input, &mut header)?;
    parse_header(&header)
}

/// Reads a snapshot file of format `version` from `input` and decodes its state, after
/// checking everything else: magic, version, flags, length against `limits`, that the file
/// ends right after its checksum, and the checksum.
///
/// # Errors
///
/// The variant of [`Error`] that names what is wrong with the file.
pub fn load<T: DeserializeOwned>(input: &mut impl Read, version: u32, limits: Limits) -> Result<T> {
    let mut header = [0u8; HEADER_LEN];
    read_exact(input, &mut header)?;
    let parsed = parse_header(&header)?;
    if parsed.version != version {
        return Err(Error::Version {
            found: parsed.version,
            supported: version,
        });
    }
    let flags = u32::from_le_bytes(field(&header, 12));
    if flags != 0 {
        return Err(Error::Flags(flags));
    }
    if parsed.state_len > limits.max_state_len {
        return Err(Error::TooLarge {
            len: parsed.state_len,
            max: limits.max_state_len,
        });
    }
    let len = usize::try_from(parsed.state_len).map_err(|_| Error::TooLarge {
        len: parsed.state_len,
        max: limits.max_state_len,
    })?;
    // Read through `take`, so that a header that lies about the length costs at most what the
    // file holds, not what it claims.
    let mut body = Vec::new();
    input
        .take(parsed.state_len)
        .read_to_end(&mut body)
        .map_err(Error::Io)?;
    if body.len() != len {
        return Err(Error::Truncated);
    }
    let mut checksum = [0u8; CHECKSUM_LEN];
    read_exact(input, &mut checksum)?;
    let mut rest = [0u8; 1];
    if read_some(input, &mut rest)? != 0 {
        return Err(Error::TrailingBytes);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&body);
    let expected = crc.finalize();
    let found = u32::from_le_bytes(checksum);
    if found != expected {
        return Err(Error::Checksum { found, expected });
    }
    let (state, rest) = postcard::take_from_bytes(&body).map_err(Error::Decode)?;
    if !rest.is_empty() {
        return Err(Error::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(state)
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Result<Header> {
    if header[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    Ok(Header {
        version: u32::from_le_bytes(field(header, 8)),
        state_len: u64::from_le_bytes(field(header, 16)),
    })
}

/// The `N` bytes of `header` at `offset`, which the callers keep inside the header.
fn field<const N: usize>(header: &[u8; HEADER_LEN], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&header[offset..offset + N]);
    out
}

/// `read_exact`, with a short file reported as [`Error::Truncated`].
fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    input.read_exact(buf).map_err(|err| match err.kind() {
        io::ErrorKind::UnexpectedEof => Error::Truncated,
        _ => Error::Io(err),
    })
}

/// One `read`, retried when interrupted.
fn read_some(input: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        match input.read(buf) {
            Ok(n) => return Ok(n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Error::Io(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        regs: Vec<u64>,
        flag: bool,
    }

    fn state() -> State {
        State {
            name: "vcpu0".into(),
            regs: (0..40).collect(),
            flag: true,
        }
    }

    fn file() -> Vec<u8> {
        let mut out = Vec::new();
        let written = save(&mut out, 7, &state()).unwrap();
        assert_eq!(written, out.len() as u64);
        out
    }

    fn load_from(bytes: &[u8]) -> Result<State> {
        load(&mut &bytes[..], 7, Limits::default())
    }

    #[test]
    fn a_saved_state_loads_back_equal() {
        assert_eq!(load_from(&file()).unwrap(), state());
    }

    #[test]
    fn the_header_gives_magic_version_and_length() {
        let bytes = file();
        assert_eq!(&bytes[..8], b"EMBERSNP");
        let header = read_header(&mut &bytes[..]).unwrap();
        assert_eq!(header.version, 7);
        assert_eq!(
            header.state_len,
            (bytes.len() - HEADER_LEN - CHECKSUM_LEN) as u64
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = file();
        for len in 0..bytes.len() {
            assert!(
                matches!(load_from(&bytes[..len]), Err(Error::Truncated)),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = file();
        for index in 0..bytes.len() {
            for bit in 0..8 {
                let mut corrupted = bytes.clone();
                corrupted[index] ^= 1 << bit;
                assert!(load_from(&corrupted).is_err(), "byte {index} bit {bit}");
            }
        }
    }

    #[test]
    fn a_flipped_state_byte_is_a_checksum_error() {
        let mut bytes = file();
        bytes[HEADER_LEN + 3] ^= 0x40;
        assert!(matches!(load_from(&bytes), Err(Error::Checksum { .. })));
    }

    #[test]
    fn another_version_is_refused_with_both_numbers() {
        let mut out = Vec::new();
        save(&mut out, 8, &state()).unwrap();
        let err = load_from(&out).unwrap_err();
        assert!(matches!(
            err,
            Error::Version {
                found: 8,
                supported: 7
            }
        ));
        assert_eq!(
            err.to_string(),
            "The snapshot's format version is 8, but this VMM reads version 7"
        );
    }

    #[test]
    fn a_file_that_is_not_a_snapshot_is_refused() {
        let mut bytes = file();
        bytes[0] = b'X';
        assert!(matches!(load_from(&bytes), Err(Error::BadMagic)));
        assert!(matches!(
            read_header(&mut &b"{\"json\": true}.........."[..]),
            Err(Error::BadMagic)
        ));
    }

    #[test]
    fn bytes_past_the_checksum_are_refused() {
        let mut bytes = file();
        bytes.push(0);
        assert!(matches!(load_from(&bytes), Err(Error::TrailingBytes)));
    }

    #[test]
    fn unknown_flags_are_refused() {
        let mut bytes = file();
        bytes[12] = 1;
        assert!(matches!(load_from(&bytes), Err(Error::Flags(1))));
    }

    #[test]
    fn a_length_above_the_limit_is_refused_before_reading() {
        let mut bytes = file();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            load_from(&bytes),
            Err(Error::TooLarge { len: u64::MAX, .. })
        ));
        let limits = Limits { max_state_len: 10 };
        assert!(matches!(
            load::<State>(&mut &file()[..], 7, limits),
            Err(Error::TooLarge { max: 10, .. })
        ));
    }

    #[test]
    fn a_state_of_another_shape_is_a_decode_error() {
        #[derive(Serialize)]
        struct Other {
            a: u8,
        }
        let mut out = Vec::new();
        save(&mut out, 7, &Other { a: 200 }).unwrap();
        assert!(matches!(load_from(&out), Err(Error::Decode(_))));
        // A state that decodes but leaves bytes over is refused too.
        #[derive(Serialize)]
        struct Longer {
            name: String,
            regs: Vec<u64>,
            flag: bool,
            extra: u32,
        }
        let longer = Longer {
            name: "x".into(),
            regs: vec![],
            flag: false,
            extra: 5,
        };
        let mut out = Vec::new();
        save(&mut out, 7, &longer).unwrap();
        assert!(matches!(load_from(&out), Err(Error::Decode(_))));
    }
}
