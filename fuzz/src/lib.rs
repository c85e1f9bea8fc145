//! What ember's fuzz targets do with their input, as plain functions.
//!
//! Each target in `fuzz_targets/` hands its bytes to one function here. Keeping the work in a
//! library lets ordinary `cargo test`, on stable, replay the checked-in corpus in `corpus/<target>/`
//! through exactly the code the fuzzer runs.
//!
//! The functions take untrusted bytes, so they must never panic on their own account: every
//! `assert!` in them states a property the boot crate promises for any input, and a failing one
//! is a finding, as is a panic inside the boot crate.
//!
//! - [`load_kernel`]: the bytes are a kernel image. A kernel that loads then gets an initrd placed
//!   above it and the full boot setup, so that header values the image controls (entry points,
//!   segment addresses, a bzImage's setup header) travel through all the address arithmetic
//!   they feed.
//! - [`cmdline`]: the bytes are a command line and extra arguments, one per line.
//! - [`virtio`]: descriptor chains, block requests, the MMIO transport's registers and
//!   virtio-net's frames, as a guest lays them out.
//! - [`vsock`]: the packets a guest transmits to virtio-vsock and what host processes do to its
//!   Unix-socket connections, at once.
//! - [`mmds`]: frames a guest sends the metadata service's network stack, and its answers.
//! - [`serial`]: the guest's accesses to the serial console's registers, and the VMM's input.
//! - [`api`]: the bytes a client sends on the API socket, and a configuration file.
//! - [`seccomp`]: a compiled seccomp filter file, as `--seccomp-filter` reads it.
//! - [`mmds_http`]: the bytes a guest sends to the metadata service on one connection.
//! - [`snapshot`]: a snapshot's state file, and the devices' states in it restored.
//!
//! # Example
//!
//! ```
//! use ember_boot::KernelFormat;
//! use ember_boot::test_utils::{tiny_bzimage, tiny_elf};
//!
//! // hlt
//! assert_eq!(ember_fuzz::load_kernel(&tiny_elf(&[0xf4])), Some(KernelFormat::Elf));
//! assert_eq!(ember_fuzz::load_kernel(&tiny_bzimage(&[0xf4])), Some(KernelFormat::BzImage));
//! assert_eq!(ember_fuzz::load_kernel(b"not a kernel"), None);
//!
//! // "console=ttyS0 reboot=k" and its NUL.
//! assert_eq!(ember_fuzz::cmdline(b"console=ttyS0\nreboot=k"), Some(23));
//! assert_eq!(ember_fuzz::cmdline(b"console=ttyS0\nbad\targ"), None);
//! ```
#![deny(missing_docs)]

pub mod api;
pub mod mmds;
pub mod mmds_http;
pub mod seccomp;
pub mod serial;
pub mod snapshot;
pub mod virtio;
pub mod vsock;

use std::io::Cursor;

use ember_boot::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PAGE_SIZE};
use ember_boot::{
    KernelFormat, build_cmdline, cmdline::Error as CmdlineError, configure_system, load_cmdline,
    load_initrd,
};
use ember_memory::{
    Bytes, GuestAddress, GuestMemoryMmap, MemoryOptions, create_guest_memory, mem_size_from_mib,
};
use linux_loader::cmdline::Error as LinuxCmdlineError;

/// Guest memory of the kernel target, in MiB: the boot structures below 1 MiB and room for a
/// kernel, its decompression buffer and an initrd above.
pub const KERNEL_MEM_MIB: u64 = 8;
/// Guest memory of the command line target, in MiB: enough to hold the line at
/// [`CMDLINE_START`].
pub const CMDLINE_MEM_MIB: u64 = 1;
/// Size of the initrd placed above a kernel that loads.
pub const INITRD_SIZE: usize = 4096;
/// Command line of the kernel target's boot setup.
const BOOT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Fresh guest memory of `mib` MiB, so that no input sees what an earlier one wrote.
fn guest_memory(mib: u64) -> GuestMemoryMmap {
    // Neither depends on the input: a failure is the host's, not a finding.
    let size = mem_size_from_mib(mib).expect("a few MiB fit in a u64");
    create_guest_memory(size, MemoryOptions::default()).expect("cannot map guest memory")
}

/// Loads `data` as a kernel image into fresh guest memory and, when it loads, places an initrd
/// above it and runs the whole boot setup for it.
///
/// Returns the format of the loaded kernel, or `None` when the image is rejected. Images are
/// untrusted: a rejected image must be an error, and a kernel that loads must lie in guest
/// memory, with its entry points inside it, and be bootable.
///
/// # Panics
///
/// Only on a finding: a panic in the boot crate, or a loaded kernel that breaks one of the
/// properties above.
pub fn load_kernel(data: &[u8]) -> Option<KernelFormat> {
    let mem = guest_memory(KERNEL_MEM_MIB);
    let mem_end = KERNEL_MEM_MIB << 20;
    let kernel = ember_boot::load_kernel(&mem, &mut Cursor::new(data)).ok()?;

    assert!(
        kernel.end.0 <= mem_end,
        "kernel ends past guest memory: {kernel:?}"
    );
    assert!(
        kernel.footprint_end() >= kernel.end,
        "kernel footprint ends before the kernel: {kernel:?}"
    );
    let in_kernel = |addr: GuestAddress| (HIMEM_START..kernel.end.0).contains(&addr.0);
    if kernel.format != KernelFormat::BzImage {
        // A bzImage's 64-bit entry is at a fixed offset; an ELF's must be inside a segment.
        assert!(
            in_kernel(kernel.entry),
            "entry outside the kernel: {kernel:?}"
        );
    }
    if let Some(pvh_entry) = kernel.pvh_entry {
        assert!(
            in_kernel(pvh_entry),
            "PVH entry outside the kernel: {kernel:?}"
        );
    }

    // A kernel may leave no room for an initrd (a decompression buffer up to the end of RAM, a
    // low `initrd_addr_max`): that is an error, not a finding.
    let initrd = vec![0xa5u8; INITRD_SIZE];
    let config = ember_vmm::vmm::boot_config(1);
    let initrd = load_initrd(&mem, &mut Cursor::new(initrd), &kernel, &config).ok();
    if let Some(initrd) = initrd {
        let end = initrd.addr.0 + INITRD_SIZE as u64;
        let limit = kernel
            .initrd_addr_max
            .saturating_add(1)
            .min(config.platform.mmio_gap.start)
            .min(mem_end);
        assert_eq!(initrd.addr.0 % PAGE_SIZE, 0, "unaligned initrd {initrd:?}");
        assert!(
            initrd.addr >= kernel.footprint_end() && end <= limit,
            "initrd {initrd:?} outside [{:#x}, {limit:#x}) for {kernel:?}",
            kernel.footprint_end().0
        );
    }

    let cmdline = build_cmdline(BOOT_CMDLINE, &[]).expect("the boot command line is valid");
    let cpu = configure_system(&mem, &kernel, &cmdline, initrd, &config)
        .unwrap_or_else(|err| panic!("a loaded kernel cannot be set up: {err:?}, {kernel:?}"));
    let entry = match kernel.format {
        KernelFormat::ElfPvh => kernel.pvh_entry.expect("a PVH kernel has a PVH entry"),
        _ => kernel.entry,
    };
    assert_eq!(
        cpu.regs.rip, entry.0,
        "the vCPU does not start at the entry"
    );
    Some(kernel.format)
}

/// Builds a command line from `data`, UTF-8 text whose first line is the base command line and
/// whose other lines are extra arguments, and writes it to fresh guest memory.
///
/// Returns the bytes written, NUL included, or `None` when the text is not UTF-8 or the line is
/// rejected. As `build_cmdline` documents, a line that is built holds only printable ASCII and
/// fits in [`CMDLINE_MAX_SIZE`] bytes with its NUL, and a line too long is rejected as
/// [`TooLong`](CmdlineError::TooLong) with its length; a line that is built is written to guest
/// memory as it renders.
///
/// # Panics
///
/// Only on a finding: a panic in the boot crate or linux-loader, or a line that breaks one of the
/// properties above.
pub fn cmdline(data: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(data).ok()?;
    let mut lines = text.split('\n');
    let base = lines.next().unwrap_or_default();
    let extra: Vec<&str> = lines.collect();
    let line = match build_cmdline(base, &extra) {
        Ok(line) => line,
        Err(CmdlineError::TooLong { len }) => {
            assert!(len > CMDLINE_MAX_SIZE, "{len} bytes rejected as too long");
            return None;
        }
        Err(CmdlineError::InvalidArgument {
            source: source @ (LinuxCmdlineError::TooLarge | LinuxCmdlineError::InvalidCapacity),
            ..
        }) => panic!("a line too long is not reported as TooLong: {source:?}"),
        Err(_) => return None,
    };
    let rendered = line
        .as_cstring()
        .unwrap_or_else(|err| panic!("a built line does not render: {err:?}"));
    let rendered = rendered.as_bytes_with_nul();
    let (nul, text) = rendered.split_last().expect("a C string ends with its NUL");
    assert_eq!(*nul, 0);
    assert!(
        text.iter().all(|c| (b' '..=b'~').contains(c)),
        "a built line holds more than printable ASCII: {text:?}"
    );
    assert!(
        rendered.len() <= CMDLINE_MAX_SIZE,
        "{} bytes",
        rendered.len()
    );

    let mem = guest_memory(CMDLINE_MEM_MIB);
    let written = load_cmdline(&mem, &line, GuestAddress(CMDLINE_START))
        .expect("a built line fits in guest memory");
    let mut in_memory = vec![0u8; written];
    mem.read_slice(&mut in_memory, GuestAddress(CMDLINE_START))
        .expect("the line was just written there");
    assert_eq!(
        in_memory, rendered,
        "the line in memory is not the rendered one"
    );
    Some(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_boot::test_utils::{tiny_bzimage, tiny_elf, tiny_pvh_elf};
    use std::fs;
    use std::path::PathBuf;

    /// `nop; nop; hlt; jmp hlt`.
    const CODE: &[u8] = &[0x90, 0x90, 0xf4, 0xeb, 0xfd];

    /// The kernel target's seed files and what [`load_kernel`] makes of them.
    const KERNEL_SEEDS: &[(&str, Option<KernelFormat>)] = &[
        ("tiny-elf", Some(KernelFormat::Elf)),
        ("tiny-pvh-elf", Some(KernelFormat::ElfPvh)),
        ("tiny-bzimage", Some(KernelFormat::BzImage)),
        ("truncated-elf", None),
        ("garbage", None),
    ];

    /// The command line target's seed files and whether [`cmdline`] accepts them.
    const CMDLINE_SEEDS: &[(&str, bool)] = &[
        ("console", true),
        ("init-args", true),
        ("quoted", true),
        ("longest", true),
        ("too-long", false),
        ("control-char", false),
        // Found by fuzzing: a NUL, a control character and a base line too long on its own.
        ("nul-in-base", false),
        ("control-in-base", false),
        ("base-too-long", false),
        // Found by fuzzing: init arguments and no boot argument, a line that does not render.
        ("init-args-only", false),
    ];

    pub(crate) fn corpus_dir(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target)
    }

    /// Every file in the target's corpus, by name, in name order.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = corpus_dir(target);
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|entry| {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                (name, fs::read(entry.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    /// A target's seed files, by name.
    pub(crate) type Seeds = Vec<(&'static str, Vec<u8>)>;

    /// Checks that the seed files of each target on disk are the ones generated.
    pub(crate) fn check_seeds(targets: &[(&str, Seeds)]) {
        for (target, seeds) in targets {
            for (name, data) in seeds {
                let path = corpus_dir(target).join(name);
                let on_disk = fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                assert_eq!(&on_disk, data, "{}", path.display());
            }
        }
    }

    /// Replays the corpus of `target` through `run`, and checks each seed's outcome.
    pub(crate) fn replay<T: PartialEq + std::fmt::Debug>(
        target: &str,
        seeds: &[(&str, T)],
        run: impl Fn(&[u8]) -> T,
    ) {
        let files = corpus(target);
        for (seed, _) in seeds {
            assert!(
                files.iter().any(|(name, _)| name == seed),
                "seed {seed} missing from corpus/{target}"
            );
        }
        for (name, data) in &files {
            let outcome = run(data);
            if let Some((_, expected)) = seeds.iter().find(|(seed, _)| seed == name) {
                assert_eq!(&outcome, expected, "corpus/{target}/{name}");
            }
        }
    }

    #[test]
    fn load_kernel_corpus_replays() {
        replay("load_kernel", KERNEL_SEEDS, load_kernel);
    }

    #[test]
    fn cmdline_corpus_replays() {
        replay("cmdline", CMDLINE_SEEDS, |data| cmdline(data).is_some());
    }

    #[test]
    fn cmdline_reports_the_bytes_written() {
        assert_eq!(cmdline(b"quiet -- --verbose\nreboot=k"), Some(28));
        assert_eq!(cmdline(&[0xff, 0xfe]), None, "not UTF-8");
        let longest = "a".repeat(CMDLINE_MAX_SIZE - 1);
        assert_eq!(cmdline(longest.as_bytes()), Some(CMDLINE_MAX_SIZE));
    }

    #[test]
    fn every_truncated_seed_kernel_is_rejected_or_boots() {
        // Each prefix of a valid image is the kind of input the fuzzer starts from.
        for image in [tiny_elf(CODE), tiny_pvh_elf(CODE), tiny_bzimage(CODE)] {
            for len in 0..=image.len() {
                load_kernel(&image[..len]);
            }
            assert!(load_kernel(&image).is_some());
        }
    }

    /// Deterministic bytes that are neither an ELF file nor a bzImage.
    fn garbage(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491u32;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    fn kernel_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let elf = tiny_elf(CODE);
        vec![
            ("tiny-elf", elf.clone()),
            ("tiny-pvh-elf", tiny_pvh_elf(CODE)),
            ("tiny-bzimage", tiny_bzimage(CODE)),
            // The ELF header is whole, the program header cut.
            ("truncated-elf", elf[..100].to_vec()),
            ("garbage", garbage(512)),
        ]
    }

    fn cmdline_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let text = |s: &str| s.as_bytes().to_vec();
        vec![
            ("console", text("console=ttyS0 reboot=k panic=1 pci=off")),
            (
                "init-args",
                text("quiet -- --verbose\nreboot=k\ni8042.noaux"),
            ),
            ("quoted", text("console=ttyS0\nfoo=\"a b c\"")),
            ("longest", text(&"a".repeat(CMDLINE_MAX_SIZE - 1))),
            (
                "too-long",
                text(&format!("{}\nbb", "a".repeat(CMDLINE_MAX_SIZE - 2))),
            ),
            ("control-char", text("console=ttyS0\nbad\targ")),
            ("nul-in-base", vec![0x00, 0x02]),
            ("control-in-base", vec![0x1a]),
            ("base-too-long", text(&"a".repeat(CMDLINE_MAX_SIZE))),
            ("init-args-only", text(" -- --verbose")),
        ]
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_seed_corpus() {
        for (target, seeds) in [
            ("load_kernel", kernel_seeds()),
            ("cmdline", cmdline_seeds()),
        ] {
            let dir = corpus_dir(target);
            fs::create_dir_all(&dir).unwrap();
            for (name, data) in seeds {
                fs::write(dir.join(name), data).unwrap();
            }
        }
    }
}
