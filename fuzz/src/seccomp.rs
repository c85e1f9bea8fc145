//! ember's compiled seccomp filter files (`--seccomp-filter`), as an operator gives them.

use ember_vmm::seccomp::{Error, Filters};

/// What the seccomp filter target made of an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterOutcome {
    /// A filter for every thread kind, each of a length the kernel takes.
    Valid,
    /// Refused, for the reason named (the [`Error`] variant).
    Refused(&'static str),
}

/// Parses `data` as a compiled filter file.
///
/// Filters that parse must write back in the file format to bytes that parse to the same
/// filters; anything else must be refused with an error, never a panic or an allocation larger
/// than the input.
///
/// # Panics
///
/// Only on a finding.
pub fn seccomp_filter(data: &[u8]) -> FilterOutcome {
    match Filters::parse(data) {
        Ok(filters) => {
            let bytes = filters.to_bytes();
            let again = Filters::parse(&bytes).expect("written filters parse");
            assert_eq!(again, filters, "the filters change through the file format");
            FilterOutcome::Valid
        }
        Err(err) => FilterOutcome::Refused(match err {
            Error::TooLarge => "TooLarge",
            Error::Truncated(_) => "Truncated",
            Error::CountTooLarge { .. } => "CountTooLarge",
            Error::NameNotUtf8 => "NameNotUtf8",
            Error::UnknownThread(_) => "UnknownThread",
            Error::DuplicateThread(_) => "DuplicateThread",
            Error::MissingThread(_) => "MissingThread",
            Error::BadLength { .. } => "BadLength",
            Error::TrailingBytes(_) => "TrailingBytes",
            // Parsing neither reads files nor installs anything.
            other => panic!("parsing gave an error it cannot give: {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, check_seeds, corpus_dir, replay};

    /// The seeds and what the target makes of them.
    const SEEDS: &[(&str, FilterOutcome)] = &[
        ("builtin", FilterOutcome::Valid),
        ("every-kind", FilterOutcome::Valid),
        (
            "firecracker-threads-only",
            FilterOutcome::Refused("MissingThread"),
        ),
        ("unknown-thread", FilterOutcome::Refused("UnknownThread")),
        ("huge-count", FilterOutcome::Refused("CountTooLarge")),
        ("cut-in-half", FilterOutcome::Refused("CountTooLarge")),
        ("truncated", FilterOutcome::Refused("Truncated")),
        ("empty-program", FilterOutcome::Refused("BadLength")),
        ("trailing-byte", FilterOutcome::Refused("TrailingBytes")),
        ("name-not-utf8", FilterOutcome::Refused("NameNotUtf8")),
    ];

    /// One filter entry: its name and program of `len` "allow" instructions.
    fn entry(name: &[u8], len: u64) -> Vec<u8> {
        let mut bytes = u64::try_from(name.len()).unwrap().to_le_bytes().to_vec();
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(&len.to_le_bytes());
        for _ in 0..len {
            bytes.extend_from_slice(&[0x06, 0, 0, 0, 0, 0, 0xff, 0x7f]);
        }
        bytes
    }

    fn file(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = u64::try_from(entries.len()).unwrap().to_le_bytes().to_vec();
        for e in entries {
            bytes.extend_from_slice(e);
        }
        bytes
    }

    /// The seeds, but for `builtin`, which is ember's filters as built when it was written:
    /// the filters change more often than the format, and any valid file is a good seed.
    fn seeds() -> Seeds {
        let every = file(
            &[
                "vmm", "api", "vcpu", "block", "net", "rng", "console", "balloon", "vsock",
            ]
            .map(|n| entry(n.as_bytes(), 3)),
        );
        let three: Vec<Vec<u8>> = ["vmm", "api", "vcpu"]
            .iter()
            .map(|n| entry(n.as_bytes(), 1))
            .collect();
        let mut trailing = every.clone();
        trailing.push(0);
        vec![
            ("every-kind", every.clone()),
            ("firecracker-threads-only", file(&three)),
            (
                "unknown-thread",
                file(&[entry(b"vmm", 1), entry(b"jailer", 1)]),
            ),
            ("huge-count", u64::MAX.to_le_bytes().to_vec()),
            ("truncated", every[..5].to_vec()),
            // The last filter's instruction count is more than the bytes left.
            ("cut-in-half", every[..every.len() / 2].to_vec()),
            ("empty-program", file(&[entry(b"vcpu", 0)])),
            ("trailing-byte", trailing),
            ("name-not-utf8", file(&[entry(&[0xff, 0xfe], 1)])),
        ]
    }

    #[test]
    fn seccomp_filter_corpus_replays() {
        replay("seccomp_filter", SEEDS, seccomp_filter);
    }

    #[test]
    fn seccomp_seeds_on_disk_are_the_generated_ones() {
        check_seeds(&[("seccomp_filter", seeds())]);
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_seccomp_seed_corpus() {
        let dir = corpus_dir("seccomp_filter");
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds() {
            fs::write(dir.join(name), data).unwrap();
        }
        fs::write(dir.join("builtin"), Filters::builtin().to_bytes()).unwrap();
    }
}
