//! The `ember-jailer` binary, run for real: argument errors (any user), and, as root, jails
//! checked from outside through `/proc` and the cgroup file systems.
//!
//! The VMM the jailer execs is this test binary itself (static, so it runs in an empty chroot):
//! started as `/<name> --id ID --start-time-us ... -- MODE`, it writes in its jail's `/` how long
//! the jailer took from its start to this exec (`setup_us`), then `ready`, and then sleeps
//! (`sleep`) or exits (`exit`). The binary has its own `main` (no libtest harness) for that.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ember_vmm::jailer::monotonic_us;

const JAILER: &str = env!("CARGO_BIN_EXE_ember-jailer");
const UID: u32 = 12345;
const GID: u32 = 12346;
/// The parent cgroup of every jail these tests make.
const PARENT_CGROUP: &str = "ember-jailer-test";

/// The set-up times the jailed stand-ins reported, in microseconds.
static SETUP_US: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// The jailed VMM's stand-in: `argv` is what the jailer execs.
fn stand_in(argv: &[String]) -> ExitCode {
    let start = argv
        .iter()
        .position(|a| a == "--start-time-us")
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok());
    let setup = start.map_or(0, |start| monotonic_us().saturating_sub(start));
    // In the jail, `/` is the jail's root, owned by the jail's uid.
    let _ = fs::write("/setup_us", setup.to_string());
    // What the unprivileged VMM can open of its devices.
    let devices: String = ["/dev/kvm", "/dev/net/tun", "/dev/urandom", "/etc/passwd"]
        .iter()
        .map(|dev| {
            let opened = fs::OpenOptions::new().read(true).write(true).open(dev);
            format!("{dev} {}\n", if opened.is_ok() { "ok" } else { "no" })
        })
        .collect();
    let _ = fs::write("/devices", devices);
    let _ = fs::write("/ready", "");
    if argv.last().map(String::as_str) == Some("sleep") {
        std::thread::sleep(Duration::from_secs(120));
    }
    ExitCode::SUCCESS
}

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary chroot base directory, removed on drop.
struct Base(PathBuf);

impl Base {
    fn new(name: &str) -> Base {
        let dir = std::env::temp_dir().join(format!("ember-jailer-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Base(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn exe_name() -> String {
    exe().file_name().unwrap().to_string_lossy().into_owned()
}

fn root_dir(base: &Base, id: &str) -> PathBuf {
    base.path().join(exe_name()).join(id).join("root")
}

/// The jailer's command line for jail `id` under `base`, then `extra`, then `-- mode`.
fn jailer(base: &Base, id: &str, extra: &[&str], mode: &str) -> Command {
    let mut cmd = Command::new(JAILER);
    cmd.args(["--id", id, "--exec-file"])
        .arg(exe())
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(base.path())
        .args(extra)
        .args(["--", mode])
        .stdin(Stdio::null());
    cmd
}

/// A running jailed stand-in.
struct Jailed {
    child: Child,
    pid: i32,
    root: PathBuf,
    stderr: PathBuf,
}

/// Starts the jailer with `cmd` and waits until the stand-in in jail `root` is ready.
fn start(mut cmd: Command, root: &Path, stderr: &Path) -> Result<Jailed, String> {
    let _ = fs::remove_file(root.join("ready"));
    cmd.stderr(fs::File::create(stderr).unwrap());
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if root.join("ready").exists() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            if !root.join("ready").exists() {
                let text = fs::read_to_string(stderr).unwrap_or_default();
                return Err(format!("the jailer exited with {status}: {text}"));
            }
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the stand-in never got ready".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let setup: u64 = fs::read_to_string(root.join("setup_us"))
        .map_err(|e| e.to_string())?
        .parse()
        .map_err(|_| "setup_us is not a number".to_string())?;
    SETUP_US.lock().unwrap().push(setup);
    let pid = i32::try_from(child.id()).unwrap();
    Ok(Jailed {
        child,
        pid,
        root: root.to_path_buf(),
        stderr: stderr.to_path_buf(),
    })
}

impl Jailed {
    fn proc(&self, file: &str) -> PathBuf {
        Path::new("/proc").join(self.pid.to_string()).join(file)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills `pid` (not a child of this process: reparented to it as a subreaper) and reaps it.
fn kill_and_reap(pid: i32) {
    // SAFETY: signals and waits on a pid; no memory is shared.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// The line of `/proc/PID/status` that starts with `key`.
fn status_line(pid: i32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

/// Whether `proc_root` (a `/proc/PID/root`) is the directory `root` with nothing of the host
/// above it. Read as a link it shows `/`, the process's root in its own mount namespace, so the
/// check compares inodes.
fn is_root_of(proc_root: &Path, root: &Path) -> bool {
    let (Ok(theirs), Ok(jail)) = (fs::metadata(proc_root), fs::metadata(root)) else {
        return false;
    };
    (theirs.dev(), theirs.ino()) == (jail.dev(), jail.ino())
        && link(proc_root) == Path::new("/")
        && !proc_root.join("etc").exists()
        && !proc_root.join("old_root").exists()
}

fn link(path: impl AsRef<Path>) -> PathBuf {
    fs::read_link(path).unwrap()
}

/// Removes the test's cgroups (`<mount>/ember-jailer-test/<id>`, then the parent), waiting for
/// a killed process to leave them.
fn remove_cgroups(mounts: &[&str], id: &str) {
    for mount in mounts {
        let parent = Path::new(mount).join(PARENT_CGROUP);
        for dir in [parent.join(id), parent.clone()] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() && fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Makes a descriptor without close-on-exec (so that a child inherits it) of `file`.
fn inheritable(file: &fs::File) -> RawFd {
    // SAFETY: F_DUPFD makes a new descriptor without FD_CLOEXEC; it is closed by the test.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 20) };
    assert!(fd > 2, "F_DUPFD failed");
    fd
}

fn close(fd: RawFd) {
    // SAFETY: closes a descriptor the test made and owns.
    unsafe { libc::close(fd) };
}

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

type TestResult = Result<(), String>;

/// A test: its name, its function, and whether it needs root.
type Test = (&'static str, fn() -> TestResult, bool);

fn bad_arguments_exit_1_with_firecrackers_messages() -> TestResult {
    let base = Base::new("args");
    let run = |args: &[&str]| {
        let out = Command::new(JAILER).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--id", "a"]);
    check!(code == Some(1), "missing arguments: {code:?}");
    check!(
        err.starts_with("Arguments parsing error:") && err.contains("--exec-file"),
        "missing arguments: {err}"
    );
    let (code, err) = run(&["--bogus"]);
    check!(
        code == Some(1) && err.starts_with("Arguments parsing error:"),
        "unknown flag: {code:?} {err}"
    );
    let exe = exe();
    let exe = exe.to_str().unwrap();
    let base = base.path().to_str().unwrap();
    let good = [
        "--exec-file",
        exe,
        "--uid",
        "1",
        "--gid",
        "1",
        "--chroot-base-dir",
        base,
    ];
    for (extra, message) in [
        (
            &["--id", "a.b"][..],
            "Jailer error: Invalid instance ID: Invalid char (.) at position 1",
        ),
        (
            &["--id", &"x".repeat(65)],
            "Jailer error: Invalid instance ID: Invalid len (65)",
        ),
        (
            &["--id=a", "--cgroup", "memory"],
            "Jailer error: Invalid format for cgroups: memory",
        ),
        (
            &["--id=a", "--resource-limit", "nproc=1"],
            "Jailer error: Invalid resource argument: nproc",
        ),
        (
            &["--id=a", "--cgroup-version=3"],
            "Jailer error: 3 is an invalid cgroup version",
        ),
        (
            &["--id=a", "--parent-cgroup=../x"],
            "Jailer error: Parent cgroup path is invalid",
        ),
        (
            &["--id=a", "--keep-fd=1"],
            "Jailer error: Invalid --keep-fd 1",
        ),
    ] {
        let args: Vec<&str> = extra.iter().chain(good.iter()).copied().collect();
        let (code, err) = run(&args);
        check!(code == Some(1), "{extra:?}: exit {code:?}");
        check!(err.starts_with(message), "{extra:?}: {err}");
    }
    let (code, err) = run(&["--id=a", "--uid=x", "--gid=1", "--exec-file", exe]);
    check!(
        code == Some(1) && err.trim() == "Jailer error: Invalid uid: x",
        "uid: {err}"
    );
    let (code, err) = run(&["--id=a", "--uid=1", "--gid=1", "--exec-file=/tmp"]);
    check!(
        code == Some(1) && err.trim() == "Jailer error: /tmp is not a file",
        "exec: {err}"
    );
    let (code, _) = run(&["--help"]);
    check!(code == Some(0), "--help exits {code:?}");
    Ok(())
}

fn a_jailed_vmm_is_chrooted_unprivileged_limited_and_in_its_namespaces() -> TestResult {
    let base = Base::new("full");
    let id = "full-1";
    let root = root_dir(&base, id);
    // A network namespace held by a sleeping process.
    let mut holder = Command::new("unshare")
        .args(["-n", "sleep", "60"])
        .spawn()
        .map_err(|e| format!("unshare: {e}"))?;
    let holder_ns = format!("/proc/{}/ns/net", holder.id());
    let our_net = link("/proc/self/ns/net");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_link(&holder_ns).map_or(true, |ns| ns == our_net) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // A disk image handed over as an open descriptor, and one the jailer must close.
    let disk_path = base.path().join("disk.img");
    fs::write(&disk_path, b"disk").unwrap();
    let kept = inheritable(&fs::File::open(&disk_path).unwrap());
    let leaked = inheritable(&fs::File::open("/etc/hostname").unwrap());
    let kept_arg = kept.to_string();
    let cmd = jailer(
        &base,
        id,
        &[
            "--netns",
            &holder_ns,
            "--parent-cgroup",
            PARENT_CGROUP,
            "--cgroup",
            "pids.max=13",
            "--cgroup",
            "cpu.shares=123",
            "--cgroup",
            "cpuset.cpus=0",
            "--resource-limit",
            "fsize=1048576",
            "--resource-limit=no-file=100",
            "--keep-fd",
            &kept_arg,
        ],
        "sleep",
    );
    let started = start(cmd, &root, &base.path().join("stderr"));
    close(kept);
    close(leaked);
    let jailed = match started {
        Ok(jailed) => jailed,
        Err(err) => {
            let _ = holder.kill();
            remove_cgroups(CGROUP_V1_MOUNTS, id);
            return Err(err);
        }
    };
    let result = check_full_jail(&jailed, &holder_ns, kept);
    jailed.stop();
    let _ = holder.kill();
    let _ = holder.wait();
    remove_cgroups(CGROUP_V1_MOUNTS, id);
    result
}

const CGROUP_V1_MOUNTS: &[&str] = &[
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/cpuset",
];

fn check_full_jail(jailed: &Jailed, holder_ns: &str, kept: RawFd) -> TestResult {
    let pid = jailed.pid;
    let root = &jailed.root;
    check!(
        is_root_of(&jailed.proc("root"), root),
        "/proc/{pid}/root is not the jail"
    );
    let uid = format!("Uid:\t{UID}\t{UID}\t{UID}\t{UID}");
    check!(
        status_line(pid, "Uid:") == uid,
        "{}",
        status_line(pid, "Uid:")
    );
    let gid = format!("Gid:\t{GID}\t{GID}\t{GID}\t{GID}");
    check!(
        status_line(pid, "Gid:") == gid,
        "{}",
        status_line(pid, "Gid:")
    );
    check!(
        status_line(pid, "Groups:").trim() == "Groups:",
        "{}",
        status_line(pid, "Groups:")
    );
    check!(
        status_line(pid, "CapEff:").ends_with("0000000000000000"),
        "capabilities kept"
    );
    // Namespaces.
    check!(
        link(jailed.proc("ns/mnt")) != link("/proc/self/ns/mnt"),
        "same mount ns"
    );
    check!(
        link(jailed.proc("ns/net")) == link(holder_ns),
        "not in the given netns"
    );
    check!(
        link(jailed.proc("ns/pid")) == link("/proc/self/ns/pid"),
        "pid ns changed"
    );
    // Cgroups and their values.
    let cgroups = fs::read_to_string(jailed.proc("cgroup")).unwrap();
    for controller in ["pids", "cpu", "cpuset"] {
        let line = format!(":{controller}:/{PARENT_CGROUP}/full-1");
        check!(cgroups.contains(&line), "{line} not in {cgroups}");
    }
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
    check!(
        read("/sys/fs/cgroup/pids/ember-jailer-test/full-1/pids.max") == "13",
        "pids.max"
    );
    check!(
        read("/sys/fs/cgroup/cpu/ember-jailer-test/full-1/cpu.shares") == "123",
        "cpu.shares"
    );
    check!(
        read("/sys/fs/cgroup/cpuset/ember-jailer-test/full-1/cpuset.cpus") == "0",
        "cpus"
    );
    check!(
        read("/sys/fs/cgroup/cpuset/ember-jailer-test/full-1/cpuset.mems")
            == read("/sys/fs/cgroup/cpuset/cpuset.mems"),
        "cpuset.mems not inherited"
    );
    // Resource limits.
    let limits = fs::read_to_string(jailed.proc("limits")).unwrap();
    let has = |name: &str, value: &str| {
        limits.lines().any(|l| {
            l.starts_with(name) && l.split_whitespace().filter(|w| *w == value).count() == 2
        })
    };
    check!(has("Max file size", "1048576"), "fsize: {limits}");
    check!(has("Max open files", "100"), "no-file: {limits}");
    // Descriptors: stdio, the jail's lock on the exec file, the kept one; nothing else.
    let mut fds: Vec<RawFd> = fs::read_dir(jailed.proc("fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    check!(fds.len() == 5, "fds {fds:?}");
    check!(fds[..3] == [0, 1, 2] && fds.contains(&kept), "fds {fds:?}");
    let targets: Vec<PathBuf> = fds[3..]
        .iter()
        .map(|fd| link(jailed.proc(&format!("fd/{fd}"))))
        .collect();
    check!(
        targets.iter().any(|t| t.ends_with("disk.img")),
        "kept fd: {targets:?}"
    );
    check!(
        targets
            .iter()
            .any(|t| t.file_name() == Some(OsStr::new(&exe_name()))),
        "lock fd: {targets:?}"
    );
    let lock_fd = fds[3..].iter().find(|fd| **fd != kept).unwrap();
    let fdinfo = fs::read_to_string(jailed.proc(&format!("fdinfo/{lock_fd}"))).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:\t"))
        .and_then(|f| i32::from_str_radix(f, 8).ok());
    check!(
        flags.is_some_and(|f| f & libc::O_ACCMODE == libc::O_RDONLY),
        "lock fd not read-only: {fdinfo}"
    );
    check!(
        fdinfo.contains("FLOCK"),
        "no flock on the lock fd: {fdinfo}"
    );
    // An empty environment and the VMM's command line.
    check!(
        fs::read(jailed.proc("environ")).unwrap().is_empty(),
        "environment"
    );
    let cmdline = fs::read_to_string(jailed.proc("cmdline")).unwrap();
    let argv: Vec<&str> = cmdline.trim_end_matches('\0').split('\0').collect();
    check!(
        argv[0] == format!("/{}", exe_name())
            && argv[1..3] == ["--id", "full-1"]
            && argv[3] == "--start-time-us"
            && argv[5] == "--start-time-cpu-us"
            && argv[7] == "--parent-cpu-time-us"
            && argv[9..] == ["sleep"],
        "argv {argv:?}"
    );
    // The jail's files.
    for (dir, mode) in [
        ("", 0o700),
        ("dev", 0o700),
        ("dev/net", 0o700),
        ("run", 0o700),
    ] {
        let meta = fs::metadata(root.join(dir)).unwrap();
        check!(
            meta.uid() == UID && meta.gid() == GID && meta.mode() & 0o7777 == mode,
            "/{dir}: {}:{} {:o}",
            meta.uid(),
            meta.gid(),
            meta.mode()
        );
    }
    let mut devices = vec![
        ("dev/kvm", 10, 232),
        ("dev/net/tun", 10, 200),
        ("dev/urandom", 1, 9),
    ];
    if let Ok(meta) = fs::metadata("/dev/userfaultfd") {
        devices.push((
            "dev/userfaultfd",
            libc::major(meta.rdev()),
            libc::minor(meta.rdev()),
        ));
    }
    for (dev, major, minor) in devices {
        let meta = fs::metadata(root.join(dev)).map_err(|e| format!("{dev}: {e}"))?;
        check!(
            meta.file_type().is_char_device()
                && (libc::major(meta.rdev()), libc::minor(meta.rdev())) == (major, minor)
                && meta.uid() == UID
                && meta.gid() == GID
                && meta.mode() & 0o7777 == 0o600,
            "{dev}: {:o} {}:{}",
            meta.mode(),
            meta.uid(),
            meta.gid()
        );
    }
    let exec = fs::metadata(root.join(exe_name())).unwrap();
    check!(
        exec.uid() == 0 && exec.mode() & 0o7777 == 0o755,
        "exec file {:o}",
        exec.mode()
    );
    let mut entries: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let opened = fs::read_to_string(root.join("devices")).unwrap_or_default();
    check!(
        opened == "/dev/kvm ok\n/dev/net/tun ok\n/dev/urandom ok\n/etc/passwd no\n",
        "the jailed VMM opened: {opened}"
    );
    let mut expected = vec![
        exe_name(),
        "devices".into(),
        "dev".into(),
        "ready".into(),
        "run".into(),
        "setup_us".into(),
    ];
    expected.sort();
    check!(entries == expected, "the jail holds {entries:?}");
    let _ = &jailed.stderr;
    Ok(())
}

fn the_same_id_is_refused_while_in_use_and_a_stale_jail_does_not_block() -> TestResult {
    let base = Base::new("lock");
    let stderr = base.path().join("stderr");
    let first = start(
        jailer(&base, "vm-a", &[], "sleep"),
        &root_dir(&base, "vm-a"),
        &stderr,
    )?;
    // Another ID runs beside it.
    let other = start(
        jailer(&base, "vm-b", &[], "sleep"),
        &root_dir(&base, "vm-b"),
        &base.path().join("stderr-b"),
    );
    let second = jailer(&base, "vm-a", &[], "sleep").output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    let first_alive = Path::new(&format!("/proc/{}", first.pid)).exists();
    first.stop();
    let other = other?;
    other.stop();
    check!(
        second.status.code() == Some(1),
        "second jailer: {:?}",
        second.status
    );
    let jail = base.path().join(exe_name()).join("vm-a");
    let expected = format!(
        "Jailer error: another ember-jailer or VMM holds the jail {}; stop it, or choose another --id",
        jail.display()
    );
    check!(err.trim() == expected, "second jailer said {err}");
    check!(first_alive, "the first VMM died");
    // The first one was killed: its jail is stale and does not block.
    let again = start(
        jailer(&base, "vm-a", &[], "sleep"),
        &root_dir(&base, "vm-a"),
        &stderr,
    )?;
    again.stop();
    // A run that fails half-way (no such cgroup hierarchy) does not block either.
    let failed = jailer(&base, "vm-a", &["--cgroup", "nosuch.max=1"], "exit")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    check!(
        failed.status.code() == Some(1)
            && err.trim() == "Jailer error: Hierarchy not found: nosuch",
        "{err}"
    );
    let mut after = jailer(&base, "vm-a", &[], "exit");
    let status = after.status().unwrap();
    check!(status.success(), "after a failed run: {status}");
    Ok(())
}

fn a_link_left_in_the_exec_files_place_is_not_followed() -> TestResult {
    let base = Base::new("links");
    let id = "links-1";
    let root = root_dir(&base, id);
    fs::create_dir_all(&root).unwrap();
    let host_file = base.path().join("host-secret");
    fs::write(&host_file, "secret").unwrap();
    let place = root.join(exe_name());
    let expected = format!(
        "Jailer error: {} is not a regular file with a single link; remove it and start the \
         jailer again",
        place.display()
    );
    std::os::unix::fs::symlink(&host_file, &place).unwrap();
    let symlinked = jailer(&base, id, &[], "exit").output().unwrap();
    fs::remove_file(&place).unwrap();
    fs::hard_link(&host_file, &place).unwrap();
    let hard_linked = jailer(&base, id, &[], "exit").output().unwrap();
    for (what, out) in [("symlink", symlinked), ("hard link", hard_linked)] {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        check!(
            out.status.code() == Some(1) && err.trim() == expected,
            "{what}: {err}"
        );
    }
    let content = fs::read_to_string(&host_file).unwrap();
    check!(
        content == "secret",
        "the host file was written: {} bytes",
        content.len()
    );
    // Once removed, as the message says, the jail starts.
    fs::remove_file(&place).unwrap();
    let status = jailer(&base, id, &[], "exit").status().unwrap();
    check!(status.success(), "after removing the link: {status}");
    Ok(())
}

fn new_pid_ns_writes_the_pid_file_and_daemonize_detaches() -> TestResult {
    // Started as a process group leader, as a shell with job control starts it, where setsid
    // alone would fail, and as the child of a process group.
    daemonize_in_a_new_pid_ns(true)?;
    daemonize_in_a_new_pid_ns(false)
}

fn daemonize_in_a_new_pid_ns(group_leader: bool) -> TestResult {
    use std::os::unix::process::CommandExt;

    let base = Base::new("pidns");
    let id = "pidns-1";
    let root = root_dir(&base, id);
    // A stale pid file is overwritten.
    fs::create_dir_all(&root).unwrap();
    let pid_file = root.join(format!("{}.pid", exe_name()));
    fs::write(&pid_file, "999999999").unwrap();
    let mut jailer = jailer(&base, id, &["--new-pid-ns", "--daemonize"], "sleep");
    if group_leader {
        jailer.process_group(0);
    }
    let status = jailer.status().unwrap();
    check!(status.success(), "the jailer's parent exited with {status}");
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .map_err(|_| "the pid file holds no pid".to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.join("ready").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let result = (|| {
        check!(root.join("ready").exists(), "the stand-in never got ready");
        let proc = |f: &str| format!("/proc/{pid}/{f}");
        check!(
            is_root_of(Path::new(&proc("root")), &root),
            "/proc/{pid}/root is not the jail"
        );
        check!(
            link(proc("ns/pid")) != link("/proc/self/ns/pid"),
            "same pid ns"
        );
        let nspid = status_line(pid, "NSpid:");
        check!(
            nspid.ends_with("\t1"),
            "not pid 1 in its namespace: {nspid}"
        );
        for fd in 0..3 {
            let target = link(proc(&format!("fd/{fd}")));
            check!(target == Path::new("/dev/null"), "fd {fd} is {target:?}");
        }
        let stat = fs::read_to_string(proc("stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let our_sid = fs::read_to_string("/proc/self/stat").unwrap();
        let our_sid = our_sid
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(3)
            .unwrap()
            .to_string();
        check!(fields[3] != our_sid, "same session as the test");
        check!(status_line(pid, "Uid:").contains(&UID.to_string()), "uid");
        let setup: u64 = fs::read_to_string(root.join("setup_us"))
            .unwrap()
            .parse()
            .unwrap_or(0);
        SETUP_US.lock().unwrap().push(setup);
        Ok(())
    })();
    kill_and_reap(pid);
    result
}

fn a_v2_cgroup_gets_its_controllers_values_and_the_process() -> TestResult {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let Ok(available) = fs::read_to_string(unified.join("cgroup.controllers")) else {
        println!(
            "    skipped: no cgroup v2 hierarchy at {}",
            unified.display()
        );
        return Ok(());
    };
    let mut settings = Vec::new();
    if available.split_whitespace().any(|c| c == "pids") {
        settings.push(("pids.max", "17"));
    }
    if available.split_whitespace().any(|c| c == "memory") {
        settings.push(("memory.max", "268435456"));
    }
    if available.split_whitespace().any(|c| c == "hugetlb")
        && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists()
    {
        settings.push(("hugetlb.2MB.max", "0"));
    }
    if settings.is_empty() {
        println!("    skipped: the v2 hierarchy offers none of pids, memory, hugetlb");
        return Ok(());
    }
    let before = fs::read_to_string(unified.join("cgroup.subtree_control")).unwrap();
    let base = Base::new("v2");
    let id = "v2-1";
    let mut extra = vec!["--cgroup-version", "2", "--parent-cgroup", PARENT_CGROUP];
    let args: Vec<String> = settings.iter().map(|(f, v)| format!("{f}={v}")).collect();
    for arg in &args {
        extra.extend(["--cgroup", arg.as_str()]);
    }
    let started = start(
        jailer(&base, id, &extra, "sleep"),
        &root_dir(&base, id),
        &base.path().join("stderr"),
    );
    let result = started.and_then(|jailed| {
        let leaf = unified.join(PARENT_CGROUP).join(id);
        let result = (|| {
            let cgroup = fs::read_to_string(jailed.proc("cgroup")).unwrap();
            let line = format!("0::/{PARENT_CGROUP}/{id}");
            check!(cgroup.lines().any(|l| l == line), "{line} not in {cgroup}");
            for (file, value) in &settings {
                let read = fs::read_to_string(leaf.join(file)).unwrap_or_default();
                check!(read.trim() == *value, "{file} is {read}");
                let controller = file.split('.').next().unwrap();
                for dir in [unified.to_path_buf(), unified.join(PARENT_CGROUP)] {
                    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
                    check!(
                        enabled.split_whitespace().any(|c| c == controller),
                        "{controller} not enabled in {}",
                        dir.display()
                    );
                }
            }
            Ok(())
        })();
        jailed.stop();
        result
    });
    remove_cgroups(&["/sys/fs/cgroup/unified"], id);
    // Leave the root's subtree_control as it was.
    for (file, _) in &settings {
        let controller = file.split('.').next().unwrap();
        if !before.split_whitespace().any(|c| c == controller) {
            let _ = fs::write(
                unified.join("cgroup.subtree_control"),
                format!("-{controller}"),
            );
        }
    }
    result
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--id") {
        return stand_in(&argv);
    }
    let filter: Vec<&String> = argv[1..].iter().filter(|a| !a.starts_with('-')).collect();
    // None of these tests is ignored: `--ignored` runs none, as libtest would.
    let ignored_only = argv.iter().any(|a| a == "--ignored");
    let tests: [Test; 6] = [
        (
            "bad_arguments_exit_1_with_firecrackers_messages",
            bad_arguments_exit_1_with_firecrackers_messages,
            false,
        ),
        (
            "a_jailed_vmm_is_chrooted_unprivileged_limited_and_in_its_namespaces",
            a_jailed_vmm_is_chrooted_unprivileged_limited_and_in_its_namespaces,
            true,
        ),
        (
            "the_same_id_is_refused_while_in_use_and_a_stale_jail_does_not_block",
            the_same_id_is_refused_while_in_use_and_a_stale_jail_does_not_block,
            true,
        ),
        (
            "a_link_left_in_the_exec_files_place_is_not_followed",
            a_link_left_in_the_exec_files_place_is_not_followed,
            true,
        ),
        (
            "new_pid_ns_writes_the_pid_file_and_daemonize_detaches",
            new_pid_ns_writes_the_pid_file_and_daemonize_detaches,
            true,
        ),
        (
            "a_v2_cgroup_gets_its_controllers_values_and_the_process",
            a_v2_cgroup_gets_its_controllers_values_and_the_process,
            true,
        ),
    ];
    // The VMM of --new-pid-ns is a grandchild: as a subreaper this process reaps it.
    // SAFETY: a process attribute; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let (mut passed, mut failed, mut skipped, mut filtered) = (0, 0, 0, 0);
    for (name, test, needs_root) in tests {
        if ignored_only || (!filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())))
        {
            filtered += 1;
            continue;
        }
        if needs_root && !is_root() {
            println!("test {name} ... skipped: the jailer needs root");
            skipped += 1;
            continue;
        }
        match test() {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(err) => {
                failed += 1;
                println!("test {name} ... FAILED: {err}");
            }
        }
        let _ = std::io::stdout().flush();
    }
    let mut setup = SETUP_US.lock().unwrap().clone();
    if !setup.is_empty() {
        setup.sort_unstable();
        let size = fs::metadata(exe()).map_or(0, |m| m.len());
        println!(
            "jail set-up, jailer start to VMM exec: median {} µs over {} runs {setup:?} \
             (an exec file of {size} bytes copied)",
            setup[setup.len() / 2],
            setup.len()
        );
    }
    let outcome = if failed > 0 { "FAILED" } else { "ok" };
    println!(
        "test result: {outcome}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; \
         {filtered} filtered out"
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
