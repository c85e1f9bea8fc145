//! Compiles the seccomp filters of `seccomp/x86_64.json` (seccompiler's JSON format) to BPF and
//! writes them to `$OUT_DIR/seccomp_filters.bin`, in the format `--seccomp-filter` reads
//! (Firecracker's: bincode with fixed-width integers of a map from thread kind to BPF program),
//! so that the binary carries its filters and parses them with the one parser it has.

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
}

fn put_len(blob: &mut Vec<u8>, len: usize) {
    let len = u64::try_from(len).expect("usize fits in u64");
    blob.extend_from_slice(&len.to_le_bytes());
}
