//! Compiles the seccomp filters of `seccomp/x86_64.json` (seccompiler's JSON format) to BPF and
//! writes them to `$OUT_DIR/seccomp_filters.bin`, in the format `--seccomp-filter` reads
//! (Firecracker's: bincode with fixed-width integers of a map from thread kind to BPF program),
//! so that the binary carries its filters and parses them with the one parser it has; and
//! tells the linker how to lay out the `ember` binary so that a process keeps few of its pages
//! resident.

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let json = manifest.join("seccomp").join("x86_64.json");
    println!("cargo:rerun-if-changed={}", json.display());
    let file = File::open(&json).expect("seccomp/x86_64.json is in the repository");
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("Cannot compile {}: {e}", json.display()));

    // Sorted, so that a build is reproducible.
    let mut kinds: Vec<_> = filters.into_iter().collect();
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blob = Vec::new();
    put_len(&mut blob, kinds.len());
    for (name, program) in &kinds {
        put_len(&mut blob, name.len());
        blob.extend_from_slice(name.as_bytes());
        put_len(&mut blob, program.len());
        for insn in program {
            blob.extend_from_slice(&insn.code.to_le_bytes());
            blob.push(insn.jt);
            blob.push(insn.jf);
            blob.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    File::create(out.join("seccomp_filters.bin"))
        .and_then(|mut f| f.write_all(&blob))
        .expect("OUT_DIR is writable");

    for arg in layout(&manifest, &out) {
        println!("cargo:rustc-link-arg-bin=ember={arg}");
    }
}

fn put_len(blob: &mut Vec<u8>, len: usize) {
    let len = u64::try_from(len).expect("usize fits in u64");
    blob.extend_from_slice(&len.to_le_bytes());
}

/// The linker arguments that lay out the `ember` binary.
///
/// - **Relative relocations packed** (`DT_RELR`, glibc 2.36): the static PIE relocates itself
///   at every start, and its 3,300 pointers then take about 1.5 KiB of relocations to read,
///   not 78 KiB of `RELA` entries.
/// - **The functions an idle microVM runs, together**: Linux maps a process's file pages 64 KiB
///   around each page it touches, so start-up code scattered over the text would make most of
///   it resident in every process. `text-order.ld` names the Rust functions by section
///   patterns without their hashes, which change with the build's profile and dependencies;
///   `text-order.txt` names the C library's by symbol. `ember-text-order` (tools/text-order)
///   writes both from a build with `EMBER_TEXT_ORDER_TRACE` set, which instead gives every
///   function pages of its own. A function missing from them, or a name no longer there, only
///   costs resident pages.
fn layout(manifest: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    println!("cargo:rerun-if-env-changed=EMBER_TEXT_ORDER_TRACE");
    let relr = "-Wl,-z,pack-relative-relocs".to_string();
    if std::env::var_os("EMBER_TEXT_ORDER_TRACE").is_some() {
        let script = out.join("text-trace.ld");
        std::fs::write(
            &script,
            "SECTIONS { .text.trace : SUBALIGN(4096) { *(.text .text.*) } } INSERT BEFORE .init;\n",
        )
        .expect("OUT_DIR is writable");
        return vec![relr, format!("-Wl,-T,{}", script.display())];
    }
    let script = manifest.join("text-order.ld");
    let symbols = manifest.join("text-order.txt");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed={}", symbols.display());
    vec![
        relr,
        format!("-Wl,-T,{}", script.display()),
        format!(
            "-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
            symbols.display()
        ),
    ]
}
