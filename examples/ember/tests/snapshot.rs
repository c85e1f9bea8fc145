//! Snapshots as a client makes them: a tiny guest counting in memory is paused, snapshotted,
//! restored in a new `ember` process, with the File and the Uffd memory backends, from full and
//! merged diff snapshots; and every refusal is a 400 with a fault message.
//!
//! The guest adds one to a counter at [`COUNTER`] between two reads of the i8042's status
//! port, so every round is one port read that `ember_vcpu_exit_io_in` counts: a restored guest
//! goes on from the saved count when the count in its next snapshot is the saved one plus the
//! port reads the restored process saw, give or take the one round a pause can split between an
//! `inc` and its read.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_boot::test_utils::tiny_elf;
use ember_vmm::vmm::snapshot::{FORMAT_VERSION, MicrovmState};
use serde_json::{Value, json};

mod common;
use common::{Scratch, request, wait_for_api};

/// Where the guest counts: 48 MiB, identity-mapped by ember's page tables.
const COUNTER: u64 = 0x300_0000;

/// `inc qword [0x3000000]; in al, 0x64; test al, 1; jz back`, then reset through the i8042.
const COUNT_UNTIL_KEY_THEN_RESET: [u8; 21] = [
    0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x00, 0x03, // inc qword [0x3000000]
    0xe4, 0x64, 0xa8, 0x01, 0x74, 0xf2, // in al, 0x64; test al, 1; jz back to the inc
    0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd, // reset through the i8042
];

/// A running `ember --api-sock`, killed when dropped.
struct Ember {
    child: Child,
    socket: PathBuf,
}

impl Ember {
    fn start(scratch: &Scratch, name: &str) -> Self {
        let socket = scratch.path(&format!("{name}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg("--api-sock")
            .arg(&socket)
            .arg("--serial")
            .arg("none")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ember starts");
        wait_for_api(&mut child, &socket);
        Ember { child, socket }
    }

    /// One request; the status and the body.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let response = request(&self.socket, method, path, body);
        (response.status, response.body)
    }

    fn put(&self, path: &str, body: Value) -> (u16, String) {
        self.request("PUT", path, Some(&body))
    }

    fn ok(&self, method: &str, path: &str, body: Value) {
        let (status, answer) = self.request(method, path, Some(&body));
        assert_eq!(status, 204, "{method} {path}: {answer}");
    }

    /// A refused request's fault message.
    fn refused(&self, path: &str, body: Value) -> String {
        let (status, answer) = self.put(path, body);
        assert_eq!(status, 400, "{path}: {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        answer["fault_message"].as_str().unwrap().to_string()
    }

    /// The guest's rounds this process saw.
    fn port_reads(&self) -> u64 {
        let (status, text) = self.request("GET", "/metrics", None);
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix("ember_vcpu_exit_io_in "))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn state(&self) -> String {
        let (_, body) = self.request("GET", "/", None);
        serde_json::from_str::<Value>(&body).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the counting guest in a new process, lets it count, pauses it.
fn boot_counting(scratch: &Scratch, name: &str, track_dirty_pages: bool) -> Ember {
    boot_counting_with(scratch, name, track_dirty_pages, &[])
}

/// Boots the counting guest as [`boot_counting`] does, with `devices` (paths and bodies of
/// PUT requests) added before it starts.
fn boot_counting_with(
    scratch: &Scratch,
    name: &str,
    track_dirty_pages: bool,
    devices: &[(&str, Value)],
) -> Ember {
    let kernel = scratch.path("kernel");
    fs::write(&kernel, tiny_elf(&COUNT_UNTIL_KEY_THEN_RESET)).unwrap();
    let ember = Ember::start(scratch, name);
    for (path, body) in devices {
        ember.ok("PUT", path, body.clone());
    }
    ember.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    );
    ember.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": track_dirty_pages}),
    );
    ember.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    run_a_while(&ember);
    ember
}

/// Resumes (if paused), lets the guest count, pauses.
fn run_a_while(ember: &Ember) {
    ember.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    let start = ember.port_reads();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ember.port_reads() < start + 1000 {
        assert!(Instant::now() < deadline, "the guest does not count");
        std::thread::sleep(Duration::from_millis(10));
    }
    ember.ok("PATCH", "/vm", json!({"state": "Paused"}));
}

fn create(ember: &Ember, scratch: &Scratch, name: &str, kind: &str) -> (PathBuf, PathBuf) {
    let (state, mem) = (
        scratch.path(&format!("{name}.state")),
        scratch.path(&format!("{name}.mem")),
    );
    ember.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}),
    );
    (state, mem)
}

/// A guest restored at `saved` and paused at `count` made one round per port read the restored
/// process saw, give or take one: a pause can take the guest out between an `inc` and its read,
/// so the snapshot it was restored from may hold an `inc` whose read the restored process makes,
/// and the one taken after may hold an `inc` whose read is still to come.
fn assert_goes_on(saved: u64, count: u64, port_reads: u64) {
    let rounds = count.checked_sub(saved).unwrap_or_else(|| {
        panic!("the restored guest counts from {count}, below its saved count {saved}")
    });
    assert!(
        rounds.abs_diff(port_reads) <= 1,
        "the restored guest goes on from its saved count {saved}: {rounds} rounds for \
         {port_reads} port reads"
    );
}

/// The guest's count in a memory file.
fn count_in(mem: &Path) -> u64 {
    let mut bytes = [0u8; 8];
    File::open(mem)
        .unwrap()
        .read_exact_at(&mut bytes, COUNTER)
        .unwrap();
    u64::from_le_bytes(bytes)
}

fn load_body(state: &Path, mem: &Path) -> Value {
    json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true
    })
}

/// Restores `state` in a new process, checks the guest goes on from `saved` (its count in
/// the snapshot), and returns that process, paused, with its new count.
fn restore_and_check(scratch: &Scratch, name: &str, body: Value, saved: u64) -> (Ember, u64) {
    let ember = Ember::start(scratch, name);
    ember.ok("PUT", "/snapshot/load", body);
    assert_eq!(ember.state(), "Running");
    run_a_while(&ember);
    let (_, mem) = create(&ember, scratch, &format!("{name}-after"), "Full");
    let count = count_in(&mem);
    assert_goes_on(saved, count, ember.port_reads());
    (ember, count)
}

#[test]
fn a_guest_restored_in_a_new_process_goes_on_counting_where_it_was_paused() {
    let scratch = Scratch::new("full");
    let source = boot_counting(&scratch, "source", false);
    // A running VM is refused, and nothing is written.
    source.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    let fault = source.refused(
        "/snapshot/create",
        json!({"snapshot_path": scratch.path("x.state"), "mem_file_path": scratch.path("x.mem")}),
    );
    assert!(fault.contains("must be paused"), "{fault}");
    assert!(!scratch.path("x.state").exists() && !scratch.path("x.mem").exists());
    source.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let (state, mem) = create(&source, &scratch, "snap", "Full");
    let saved = count_in(&mem);
    assert!(saved >= 1000, "{saved}");
    drop(source);

    let describe = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--describe-snapshot")
        .arg(&state)
        .output()
        .unwrap();
    assert!(describe.status.success());
    assert_eq!(String::from_utf8_lossy(&describe.stdout), "v1\n");

    let (restored, _) = restore_and_check(&scratch, "restored", load_body(&state, &mem), saved);
    // A second load, and any pre-boot request, are refused once restored.
    let fault = restored.refused("/snapshot/load", load_body(&state, &mem));
    assert!(fault.contains("after starting"), "{fault}");
    let (_, metrics) = restored.request("GET", "/metrics", None);
    for step in [
        "restore_us",
        "restore_load_us",
        "restore_memory_us",
        "restore_vcpus_us",
    ] {
        assert!(
            metrics.contains(&format!("ember_snapshot_{step} ")),
            "{step} in {metrics}"
        );
    }
    // Two restores of one snapshot run side by side.
    let (_, _) = restore_and_check(&scratch, "clone", load_body(&state, &mem), saved);
}

#[test]
fn two_diffs_rebased_onto_a_full_snapshot_restore_the_latest_state() {
    let scratch = Scratch::new("diff");
    let source = boot_counting(&scratch, "source", true);
    let (_, base) = create(&source, &scratch, "base", "Full");
    run_a_while(&source);
    // A diff whose memory file cannot be written is refused, and the pages it read from the
    // dirty log go into the next one: the guest is paused in between, so only they can bring
    // the counter's page into it.
    let nowhere = scratch.path("missing/d.mem");
    let fault = source.refused(
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": scratch.path("missing/d.state"),
               "mem_file_path": nowhere}),
    );
    assert!(fault.contains(nowhere.to_str().unwrap()), "{fault}");
    let (_, diff1) = create(&source, &scratch, "diff1", "Diff");
    assert!(
        count_in(&diff1) > count_in(&base),
        "the first diff lacks the counter"
    );
    run_a_while(&source);
    let (state2, diff2) = create(&source, &scratch, "diff2", "Diff");
    let saved = count_in(&diff2);
    drop(source);
    // A diff holds the pages written since the snapshot before: few, here.
    let blocks = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().blocks() * 512
    };
    assert!(
        blocks(&diff2) < blocks(&base),
        "{} {}",
        blocks(&diff2),
        blocks(&base)
    );
    for diff in [&diff1, &diff2] {
        let out = Command::new(env!("CARGO_BIN_EXE_ember-snapshot-editor"))
            .args(["edit-memory", "rebase", "--memory-path"])
            .arg(&base)
            .arg("--diff-path")
            .arg(diff)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(count_in(&base), saved);
    restore_and_check(&scratch, "restored", load_body(&state2, &base), saved);

    // A diff on a VM without dirty page tracking is refused.
    let plain = boot_counting(&scratch, "plain", false);
    let fault = plain.refused(
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": scratch.path("p.state"),
               "mem_file_path": scratch.path("p.mem")}),
    );
    assert!(fault.contains("track_dirty_pages"), "{fault}");
}

#[test]
fn memory_served_by_a_page_fault_handler_restores_the_guest() {
    let scratch = Scratch::new("uffd");
    let source = boot_counting(&scratch, "source", false);
    let (state, mem) = create(&source, &scratch, "snap", "Full");
    let saved = count_in(&mem);
    drop(source);

    let socket = scratch.path("uffd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let file = File::open(&mem).unwrap();
    let handler = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut handler = match ember_memory::uffd::FaultHandler::from_stream(&stream, &file) {
            Ok(handler) => handler,
            Err(err) => return Err(err.to_string()),
        };
        handler.run(&stream).map_err(|e| e.to_string())?;
        Ok(handler.stats().faults)
    });
    let body = json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
        "resume_vm": true
    });
    let ember = Ember::start(&scratch, "restored");
    let (status, answer) = ember.put("/snapshot/load", body);
    if status == 400 && answer.contains("userfaultfd") {
        eprintln!("skipped: this host does not allow userfaultfd: {answer}");
        return;
    }
    assert_eq!(status, 204, "{answer}");
    run_a_while(&ember);
    let (_, after) = create(&ember, &scratch, "after", "Full");
    assert_goes_on(saved, count_in(&after), ember.port_reads());
    drop(ember);
    let faults = handler.join().unwrap().unwrap();
    // Every page went through the handler: the guest's, then the rest when the second
    // snapshot read the whole memory.
    assert_eq!(faults, 64 << 8, "one fault per 4 KiB page of 64 MiB");
}

#[test]
fn bad_snapshots_and_loads_at_the_wrong_time_are_refused_with_a_fault_message() {
    let scratch = Scratch::new("refusals");
    let source = boot_counting(&scratch, "source", false);
    let (state, mem) = create(&source, &scratch, "snap", "Full");
    drop(source);
    let bytes = fs::read(&state).unwrap();

    let load = |name: &str, body: Value| -> String {
        Ember::start(&scratch, name).refused("/snapshot/load", body)
    };
    // Truncated, corrupted, not a snapshot.
    let cut = scratch.path("cut.state");
    fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    assert!(load("cut", load_body(&cut, &mem)).contains("truncated"));
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let corrupted = scratch.path("corrupted.state");
    fs::write(&corrupted, &flipped).unwrap();
    assert!(load("corrupted", load_body(&corrupted, &mem)).contains("corrupted"));
    assert!(load("notsnap", load_body(&mem, &mem)).contains("not a snapshot"));

    // Another format version, and a snapshot of another CPU model: each refused with the
    // exact difference.
    let decoded: MicrovmState = ember_snapshot::load(
        &mut bytes.as_slice(),
        FORMAT_VERSION,
        ember_snapshot::Limits::default(),
    )
    .unwrap();
    let other_version = scratch.path("v2.state");
    ember_snapshot::save(
        &mut File::create(&other_version).unwrap(),
        FORMAT_VERSION + 1,
        &decoded,
    )
    .unwrap();
    let fault = load("version", load_body(&other_version, &mem));
    assert!(
        fault.contains(&format!(
            "format version is {}, but this VMM reads version {FORMAT_VERSION}",
            FORMAT_VERSION + 1
        )),
        "{fault}"
    );
    let mut other_cpu = decoded.clone();
    other_cpu.host.cpu.model = other_cpu.host.cpu.model.wrapping_add(1);
    let moved = scratch.path("moved.state");
    ember_snapshot::save(
        &mut File::create(&moved).unwrap(),
        FORMAT_VERSION,
        &other_cpu,
    )
    .unwrap();
    let fault = load("cpu", load_body(&moved, &mem));
    assert!(fault.contains("cannot be restored on this host"), "{fault}");
    assert!(fault.contains("CPU"), "{fault}");

    // A memory file that is missing or shorter than the guest's memory.
    let fault = load("nomem", load_body(&state, &scratch.path("missing.mem")));
    assert!(fault.contains("missing.mem"), "{fault}");
    let short = scratch.path("short.mem");
    fs::write(&short, [0u8; 4096]).unwrap();
    let fault = load("short", load_body(&state, &short));
    assert!(fault.contains("short.mem"), "{fault}");

    // Both memory sources, or neither; a load after configuring; a create before starting.
    let fault = load(
        "two",
        json!({"snapshot_path": state, "mem_file_path": mem,
               "mem_backend": {"backend_type": "File", "backend_path": mem}}),
    );
    assert!(fault.contains("mutually exclusive"), "{fault}");
    assert!(load("none", json!({"snapshot_path": state})).contains("Missing mandatory field"));
    let configured = Ember::start(&scratch, "configured");
    configured.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    let fault = configured.refused("/snapshot/load", load_body(&state, &mem));
    assert!(fault.contains("after configuring"), "{fault}");
    let fault = configured.refused(
        "/snapshot/create",
        json!({"snapshot_path": scratch.path("y.state"), "mem_file_path": scratch.path("y.mem")}),
    );
    assert!(fault.contains("before starting"), "{fault}");
    // The process that refused a load still takes a good one.
    let fresh = Ember::start(&scratch, "fresh");
    let (status, _) = fresh.put("/snapshot/load", load_body(&cut, &mem));
    assert_eq!(status, 400);
    fresh.ok("PUT", "/snapshot/load", load_body(&state, &mem));
    assert_eq!(fresh.state(), "Running");
}

/// The counting guest with a drive, an entropy device, a balloon and a vsock device, none of
/// which it drives, snapshotted paused; with the `GET /vm/config` of its process.
fn snapshot_with_every_device(scratch: &Scratch) -> (PathBuf, PathBuf, Value) {
    let disk = scratch.path("disk");
    File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let devices = [
        (
            "/drives/data",
            json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false,
                   "is_read_only": false}),
        ),
        ("/entropy", json!({})),
        (
            "/balloon",
            json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 0}),
        ),
        (
            "/vsock",
            json!({"guest_cid": 3, "uds_path": scratch.path("source.vsock")}),
        ),
    ];
    let source = boot_counting_with(scratch, "source", false, &devices);
    let (_, config) = source.request("GET", "/vm/config", None);
    let (state, mem) = create(&source, scratch, "snap", "Full");
    (state, mem, serde_json::from_str(&config).unwrap())
}

#[test]
fn every_kind_of_device_is_restored_with_its_configuration() {
    let scratch = Scratch::new("devices");
    let (state, mem, mut config) = snapshot_with_every_device(&scratch);
    let saved = count_in(&mem);
    let mut body = load_body(&state, &mem);
    let uds = scratch.path("restored.vsock");
    body["vsock_override"] = json!({ "uds_path": uds });
    let (restored, _) = restore_and_check(&scratch, "restored", body, saved);
    assert!(uds.exists(), "the vsock device listens on its new path");
    let (status, after) = restored.request("GET", "/vm/config", None);
    assert_eq!(status, 200);
    config["vsock"]["uds_path"] = json!(uds);
    assert_eq!(serde_json::from_str::<Value>(&after).unwrap(), config);
}

/// Writes the seed `fuzz/corpus/snapshot_state/tiny-guest`, checked in: a state file of the
/// counting guest with every kind of virtio device but a network interface (a TAP needs
/// privileges). Run it only to regenerate the seed; `write_snapshot_seed_corpus` in
/// `fuzz/src/snapshot.rs` then regenerates the seeds made from it.
#[test]
#[ignore = "rewrites a checked-in fuzz seed"]
fn write_snapshot_fuzz_seed() {
    let scratch = Scratch::new("seed");
    let (state, _, _) = snapshot_with_every_device(&scratch);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/snapshot_state");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(state, dir.join("tiny-guest")).unwrap();
}
