//! The boot path: guest memory creation, kernel loading and boot-time system configuration.
//!
//! `boot/load_kernel` uses ember-boot's tiny test images, so it measures the header checks,
//! format detection and linux-loader's copy of a few bytes. `boot/load_guest_kernel` loads the
//! project's guest kernel, the ELF `vmlinux` and the `bzImage` that `guest.sh` builds, from the
//! directory `EMBER_GUEST` names (`EMBER_GUEST=$(examples/ember/scripts/guest.sh | tail -n 1)
//! cargo bench -p ember-benches --bench boot`); without it that group is skipped, and says so.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ember_boot::test_utils::{tiny_bzimage, tiny_elf, tiny_pvh_elf};
use ember_boot::{
    AcpiPm, BootConfig, Cmdline, LoadedKernel, Platform, build_cmdline, configure_system,
    load_kernel,
};
use ember_memory::layout::{
    ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_SCI_IRQ, FIRST_ADDR_PAST_32BITS, IOAPIC_PINS,
    IOAPIC_START, LAPIC_START, MMIO32_START,
};
use ember_memory::{GuestMemoryMmap, MemoryOptions, create_guest_memory, mem_size_from_mib};

/// Guest memory size of every benchmark, the example VMM's default.
const MEM_MIB: u64 = 128;
/// `nop; nop; hlt; jmp hlt`.
const CODE: &[u8] = &[0x90, 0x90, 0xf4, 0xeb, 0xfd];
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const VCPUS: u8 = 2;

fn guest_memory() -> GuestMemoryMmap {
    let size = mem_size_from_mib(MEM_MIB).expect("128 MiB fits in a u64");
    create_guest_memory(size, MemoryOptions::default()).expect("cannot create guest memory")
}

fn load(mem: &GuestMemoryMmap, image: &[u8]) -> LoadedKernel {
    load_kernel(mem, &mut Cursor::new(image)).expect("a tiny image loads")
}

fn cmdline() -> Cmdline {
    build_cmdline(CMDLINE, &[]).expect("the command line is valid")
}

/// The example VMM's boot configuration: the default layout on ember-memory's platform.
fn boot_config() -> BootConfig {
    let platform = Platform::new(
        IOAPIC_START,
        LAPIC_START,
        IOAPIC_PINS,
        MMIO32_START..FIRST_ADDR_PAST_32BITS,
        AcpiPm::new(ACPI_PM1_EVT_PORT, ACPI_PM1_CNT_PORT, ACPI_SCI_IRQ),
    );
    BootConfig::new(platform, VCPUS)
}

fn bench_create_guest_memory(c: &mut Criterion) {
    let size = mem_size_from_mib(MEM_MIB).expect("128 MiB fits in a u64");
    // Creation only: the mappings are unmapped outside the measurement, a batch at a time.
    c.bench_function("memory/create_guest_memory_128m", |b| {
        b.iter_batched(
            || (),
            |()| create_guest_memory(black_box(size), MemoryOptions::default()).unwrap(),
            BatchSize::NumIterations(64),
        )
    });
}

fn bench_load_kernel(c: &mut Criterion) {
    let mem = guest_memory();
    let mut group = c.benchmark_group("boot/load_kernel");
    for (name, image) in [
        ("elf", tiny_elf(CODE)),
        ("pvh_elf", tiny_pvh_elf(CODE)),
        ("bzimage", tiny_bzimage(CODE)),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| load_kernel(&mem, &mut Cursor::new(black_box(image.as_slice()))).unwrap())
        });
    }
    group.finish();
}

fn bench_load_guest_kernel(c: &mut Criterion) {
    let Some(dir) = std::env::var_os("EMBER_GUEST").map(std::path::PathBuf::from) else {
        println!(
            "boot/load_guest_kernel: skipped (set EMBER_GUEST to the directory guest.sh prints)"
        );
        return;
    };
    let mem = guest_memory();
    let mut group = c.benchmark_group("boot/load_guest_kernel");
    group.sample_size(20);
    for name in ["vmlinux", "bzImage"] {
        let path = dir.join(name);
        let image = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read the guest kernel {}: {e}", path.display()));
        group.throughput(criterion::Throughput::Bytes(image.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| load_kernel(&mem, &mut Cursor::new(black_box(image.as_slice()))).unwrap())
        });
    }
    group.finish();
}

fn bench_configure_system(c: &mut Criterion) {
    let mem = guest_memory();
    let cmdline = cmdline();
    let config = boot_config();
    let mut group = c.benchmark_group("boot/configure_system");
    // Linux 64-bit boot (zero page, GDT, page tables) and PVH boot (start info, GDT).
    for (name, image) in [("linux", tiny_elf(CODE)), ("pvh", tiny_pvh_elf(CODE))] {
        let kernel = load(&mem, &image);
        group.bench_function(name, |b| {
            b.iter(|| configure_system(&mem, black_box(&kernel), &cmdline, None, &config).unwrap())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_create_guest_memory,
    bench_load_kernel,
    bench_load_guest_kernel,
    bench_configure_system
);
criterion_main!(benches);
