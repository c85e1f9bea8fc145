//! The jailer: starts a VMM in a jail, with Firecracker's jailer's command line and behaviour.
//!
//! `ember-jailer` is a thin binary over this module: [`args`] parses and validates the command
//! line into a [`JailConfig`], and [`run`] builds the jail and execs the VMM in it. The jail is
//! `<chroot base>/<exec file name>/<id>/root`; in Firecracker's order, [`run`]:
//!
//! 1. closes every inherited descriptor but 0, 1, 2 and the `--keep-fd`s (which lose their
//!    close-on-exec flag), and clears the environment;
//! 2. makes the jail's root directory, and takes the jail's lock (below);
//! 3. copies the exec file into the jail and sets the resource limits (`fsize`, `no-file`, 2048
//!    descriptors by default);
//! 4. makes the cgroup and moves itself in ([`cgroup`]);
//! 5. joins `--netns`; opens `/dev/null` for `--daemonize`; notes the host's `/dev/userfaultfd`;
//! 6. enters a new mount namespace, makes `/` a slave mount, bind-mounts the jail's root on
//!    itself and `pivot_root`s into it, detaching the old root (no bare `chroot`);
//! 7. makes `/dev`, `/dev/net` and `/run` (mode 0700) and `/dev/kvm`, `/dev/net/tun`,
//!    `/dev/urandom` (and `/dev/userfaultfd` where the host has one), character devices of mode
//!    0600, all owned by the jail's uid and gid, as is `/`;
//! 8. `--daemonize`: `setsid()` (after a fork when the jailer leads its process group, where
//!    `setsid()` would fail) and stdio on `/dev/null`;
//! 9. `--new-pid-ns`: clones itself into a new PID namespace; the parent writes the child's pid
//!    to `/<exec name>.pid` in the jail and exits 0;
//! 10. drops to the uid and gid (no supplementary groups; real, effective and saved ids all
//!     changed, and checked);
//! 11. execs `/<exec name> --id <id> --start-time-us <µs> --start-time-cpu-us <µs>
//!     --parent-cpu-time-us <µs> <arguments after -->` with an empty environment.
//!
//! # The jail's lock
//!
//! A jail's ID is in use while a VMM runs in it. The jailer opens the exec file's copy in the jail
//! read-only (creating it when missing), without close-on-exec, and takes an exclusive `flock`
//! on it; the copy goes through a second descriptor, closed before exec. The locked descriptor
//! stays open through exec, so the VMM holds the lock for its whole life and a second jailer for
//! the same ID is refused with [`Error::JailInUse`]. A jailed VMM therefore has one read-only
//! descriptor on its own executable besides stdio. Every other step is idempotent (existing
//! directories and an existing empty cgroup are reused, the exec file is copied over, device
//! nodes are removed and made again), so a jail left by a crashed or failed run does not block a
//! new start with the same ID.
//!
//! # seccomp
//!
//! The jailer runs without a seccomp filter: the VMM it execs installs its own filters.

pub mod args;
pub mod cgroup;
pub mod layout;

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use args::JailConfig;
pub use layout::{JailLayout, StartTimes};

/// Why the jail could not be made or the VMM not started in it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command line value is bad.
    #[error(transparent)]
    Args(#[from] args::Error),
    /// The cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// The inherited descriptors could not be closed.
    #[error("Failed to close the inherited file descriptors")]
    CloseFds(#[source] io::Error),
    /// A `--keep-fd` could not be kept open across exec.
    #[error("Failed to unset the O_CLOEXEC flag on the kept fd {0}")]
    UnsetCloexec(RawFd, #[source] io::Error),
    /// A directory could not be made.
    #[error("Failed to create directory {}", .0.display())]
    CreateDir(PathBuf, #[source] io::Error),
    /// A file could not be opened.
    #[error("Failed to open file {}", .0.display())]
    FileOpen(PathBuf, #[source] io::Error),
    /// Another jailer, or the VMM it started, holds the jail.
    #[error(
        "another ember-jailer or VMM holds the jail {}; stop it, or choose another --id",
        .0.display()
    )]
    JailInUse(PathBuf),
    /// The jail's lock could not be taken.
    #[error("Failed to lock {}", .0.display())]
    Lock(PathBuf, #[source] io::Error),
    /// Something other than the jailer's copy is in the exec file's place in the jail.
    #[error(
        "{} is not a regular file with a single link; remove it and start the jailer again",
        .0.display()
    )]
    NotPlainFile(PathBuf),
    /// The exec file could not be copied into the jail.
    #[error("Failed to copy {} to {}", .0.display(), .1.display())]
    Copy(PathBuf, PathBuf, #[source] io::Error),
    /// A resource limit could not be set.
    #[error("Failed to set limit for resource: {0}")]
    Setrlimit(&'static str, #[source] io::Error),
    /// The network namespace could not be joined.
    #[error("Failed to join network namespace: netns")]
    SetNetNs(#[source] io::Error),
    /// `/dev/null` could not be opened.
    #[error("Failed to open /dev/null")]
    OpenDevNull(#[source] io::Error),
    /// The host's `/dev/userfaultfd` could not be examined.
    #[error("Failed to read the device numbers of /dev/userfaultfd")]
    Userfaultfd(#[source] io::Error),
    /// No new mount namespace.
    #[error("Failed to unshare into new mount namespace")]
    UnshareNewNs(#[source] io::Error),
    /// `/` could not be made a slave mount.
    #[error("Failed to change the propagation type to slave")]
    MountPropagationSlave(#[source] io::Error),
    /// The jail's root could not be bind-mounted.
    #[error("Failed to bind mount the jail root directory")]
    MountBind(#[source] io::Error),
    /// No chdir into the jail's root.
    #[error("Failed to chdir into chroot directory")]
    ChdirNewRoot(#[source] io::Error),
    /// The old root's mount point could not be made.
    #[error("Failed to create the jail root directory before pivoting root")]
    MkdirOldRoot(#[source] io::Error),
    /// `pivot_root` failed.
    #[error("Failed to pivot root")]
    PivotRoot(#[source] io::Error),
    /// The old root could not be detached.
    #[error("Failed to unmount the old jail root")]
    UmountOldRoot(#[source] io::Error),
    /// The old root's mount point could not be removed.
    #[error("Failed to remove old jail root directory")]
    RmOldRootDir(#[source] io::Error),
    /// `chroot(".")` after the pivot failed.
    #[error("Failed to chroot into the new root")]
    Chroot(#[source] io::Error),
    /// No chdir to the new `/`.
    #[error("Failed to change current directory")]
    SetCurrentDir(#[source] io::Error),
    /// A file's mode could not be changed.
    #[error("Failed to change permissions on {}", .0.display())]
    Chmod(PathBuf, #[source] io::Error),
    /// A file's owner could not be changed.
    #[error("Failed to change owner for {}", .0.display())]
    ChangeFileOwner(PathBuf, #[source] io::Error),
    /// An existing device node could not be removed.
    #[error("Failed to remove the stale {0} inside the jail")]
    RemoveDev(&'static str, #[source] io::Error),
    /// A device node could not be made.
    #[error("Failed to create {0} via mknod inside the jail")]
    MknodDev(&'static str, #[source] io::Error),
    /// `setsid` failed.
    #[error("Failed to daemonize: setsid")]
    SetSid(#[source] io::Error),
    /// The fork (and its pipe) that lets a process group leader call `setsid` failed.
    #[error("Failed to daemonize: fork")]
    Fork(#[source] io::Error),
    /// `dup2` onto a standard stream failed.
    #[error("Failed to duplicate fd")]
    Dup2(#[source] io::Error),
    /// `clone(CLONE_NEWPID)` failed.
    #[error("Failed cloning into a new child process")]
    Clone(#[source] io::Error),
    /// The pid file could not be written.
    #[error("Failed to write to {}", .0.display())]
    Write(PathBuf, #[source] io::Error),
    /// A step of dropping privileges failed.
    #[error("Failed to drop privileges: {0}")]
    DropPrivileges(&'static str, #[source] io::Error),
    /// The ids read back are not the ones set.
    #[error("Failed to drop privileges: the process still holds other uids, gids or groups")]
    PrivilegesKept,
    /// An argument or path has a NUL byte.
    #[error("Encountered interior \\0 while parsing a string")]
    CStringParsing(#[source] std::ffi::NulError),
    /// `execve` failed.
    #[error("Failed to exec into the VMM")]
    Exec(#[source] io::Error),
}

/// The result of a jailer step.
pub type Result<T> = std::result::Result<T, Error>;

/// A clock reading in microseconds; 0 when it cannot be read (Linux does not fail these).
fn micros(time: io::Result<std::time::Duration>) -> u64 {
    time.map_or(0, |t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX))
}

/// `CLOCK_MONOTONIC`, in microseconds: Firecracker's `--start-time-us`.
pub fn monotonic_us() -> u64 {
    micros(ember_legacy::boot_timer::monotonic_time())
}

/// The process's CPU time, in microseconds.
pub fn process_cpu_us() -> u64 {
    micros(ember_legacy::boot_timer::process_cpu_time())
}

impl StartTimes {
    /// The times of now, as the jailer's start.
    pub fn now() -> StartTimes {
        StartTimes {
            start_time_us: monotonic_us(),
            start_time_cpu_us: process_cpu_us(),
            parent_cpu_time_us: 0,
        }
    }
}

/// Turns a `-1` return into the error in `errno`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstring(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(Error::CStringParsing)
}

fn path_cstring(path: &Path) -> Result<CString> {
    cstring(path.as_os_str().as_bytes())
}

/// Closes every descriptor above 2 but `keep` (sorted), and clears close-on-exec on those kept.
fn close_inherited_fds(keep: &[RawFd]) -> Result<()> {
    let mut first: u32 = 3;
    let bounds = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .map(Some)
        .chain(std::iter::once(None));
    for bound in bounds {
        let last = match bound {
            Some(fd) => fd.checked_sub(1),
            None => Some(u32::MAX),
        };
        if let Some(last) = last.filter(|&last| last >= first) {
            close_range(first, last)?;
        }
        if let Some(fd) = bound {
            first = fd.saturating_add(1);
        }
    }
    for &fd in keep {
        // SAFETY: F_SETFD on a descriptor changes only its flags.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })
            .map_err(|err| Error::UnsetCloexec(fd, err))?;
    }
    Ok(())
}

/// Closes the descriptors `first..=last`, with `close_range` or, on kernels without it, one by
/// one from `/proc/self/fd`.
fn close_range(first: u32, last: u32) -> Result<()> {
    // SAFETY: close_range only closes descriptors; the jailer holds none of its own yet, so no
    // object of this process refers to the ones it closes.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(Error::CloseFds(err));
    }
    let fds: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .map_err(Error::CloseFds)?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| (first..=last).contains(fd)) {
        if let Ok(fd) = RawFd::try_from(fd) {
            // SAFETY: as above; the directory's own descriptor is closed already, which makes
            // this an EBADF that is ignored.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Opens the exec file's place in the jail read-only and without close-on-exec (creating it),
/// and takes an exclusive lock on it without waiting.
fn lock_jail(layout: &JailLayout) -> Result<OwnedFd> {
    let path = &layout.exec_in_root;
    let c_path = path_cstring(path)?;
    // SAFETY: `c_path` is a NUL-terminated path; the descriptor returned is owned below.
    let fd = check(unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW,
            layout::EXEC_MODE,
        )
    })
    .map_err(|err| match err.raw_os_error() {
        Some(libc::ELOOP) => Error::NotPlainFile(path.clone()),
        _ => Error::FileOpen(path.clone(), err),
    })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: flock on an open descriptor touches no memory.
    if let Err(err) = check(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Error::JailInUse(layout.jail_dir.clone())
        } else {
            Error::Lock(path.clone(), err)
        });
    }
    Ok(fd)
}

/// Whether `file` is a regular file with one link, and (when given) the same inode as `other`.
fn plain_file(file: &File, other: Option<&File>) -> io::Result<bool> {
    let meta = file.metadata()?;
    let same = match other {
        Some(other) => {
            let other = other.metadata()?;
            (meta.dev(), meta.ino()) == (other.dev(), other.ino())
        }
        None => true,
    };
    Ok(meta.is_file() && meta.nlink() == 1 && same)
}

/// Copies the exec file over its place in the jail, through a descriptor closed on return.
///
/// The jail's directory belongs to the jail's uid, so a VMM that ran there before could have
/// left a symbolic or hard link in the exec file's place: the locked descriptor was opened
/// without following links, the copy's descriptor is checked to be the same one-link inode
/// before it is truncated, and anything else is refused with the path to remove.
fn copy_exec_file(config: &JailConfig, layout: &JailLayout, lock: &OwnedFd) -> Result<()> {
    let to = &layout.exec_in_root;
    let copy_err = |err| Error::Copy(config.exec_file.clone(), to.clone(), err);
    let locked = File::from(lock.try_clone().map_err(copy_err)?);
    let mut source = File::open(&config.exec_file).map_err(copy_err)?;
    let target = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(copy_err)?;
    if !plain_file(&target, Some(&locked)).map_err(copy_err)? {
        return Err(Error::NotPlainFile(to.clone()));
    }
    target.set_len(0).map_err(copy_err)?;
    io::copy(&mut source, &mut &target).map_err(copy_err)?;
    target
        .set_permissions(std::fs::Permissions::from_mode(layout::EXEC_MODE))
        .map_err(|err| Error::Chmod(to.clone(), err))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, name: &'static str, value: u64) -> Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit the call reads.
    check(unsafe { libc::setrlimit(resource, &limit) })
        .map(drop)
        .map_err(|err| Error::Setrlimit(name, err))
}

fn set_rlimits(limits: &args::ResourceLimits) -> Result<()> {
    if let Some(fsize) = limits.fsize {
        set_rlimit(libc::RLIMIT_FSIZE, "fsize", fsize)?;
    }
    set_rlimit(libc::RLIMIT_NOFILE, "no-file", limits.no_file)
}

fn join_netns(path: &Path) -> Result<()> {
    let netns = File::open(path).map_err(Error::SetNetNs)?;
    // SAFETY: setns on an open namespace descriptor touches no memory.
    check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) })
        .map(drop)
        .map_err(Error::SetNetNs)
}

/// The host's `/dev/userfaultfd` (major, minor), when it has one.
fn host_userfaultfd() -> Result<Option<(u32, u32)>> {
    match std::fs::metadata(layout::DEV_USERFAULTFD_PATH) {
        Ok(metadata) => {
            let rdev = metadata.rdev();
            Ok(Some((libc::major(rdev), libc::minor(rdev))))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(Error::Userfaultfd(err)),
    }
}

/// Enters a new mount namespace and makes the jail's root the process's `/` with `pivot_root`.
fn pivot_into(root: &Path) -> Result<()> {
    let c_root = path_cstring(root)?;
    let slash = c"/";
    let old_root = c"old_root";
    // SAFETY: unshare takes only flags.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(Error::UnshareNewNs)?;
    // SAFETY: the strings are NUL-terminated; a propagation change takes no source or data.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(Error::MountPropagationSlave)?;
    // SAFETY: as above; a bind mount of the jail's root on itself.
    check(unsafe {
        libc::mount(
            c_root.as_ptr(),
            c_root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
    .map_err(Error::MountBind)?;
    std::env::set_current_dir(root).map_err(Error::ChdirNewRoot)?;
    // A crashed run may have left the (empty) directory behind: reuse it. Anything else there
    // (the jail belongs to its uid) is removed first.
    if std::fs::symlink_metadata("old_root").is_ok_and(|meta| !meta.is_dir()) {
        std::fs::remove_file("old_root").map_err(Error::MkdirOldRoot)?;
    }
    match std::fs::create_dir("old_root") {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
            return Err(Error::MkdirOldRoot(err));
        }
        _ => {}
    }
    let dot = c".";
    // SAFETY: both paths are NUL-terminated strings.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old_root.as_ptr()) } as i32)
        .map_err(Error::PivotRoot)?;
    // SAFETY: as above.
    check(unsafe { libc::umount2(old_root.as_ptr(), libc::MNT_DETACH) })
        .map_err(Error::UmountOldRoot)?;
    std::fs::remove_dir("old_root").map_err(Error::RmOldRootDir)?;
    // SAFETY: as above.
    check(unsafe { libc::chroot(dot.as_ptr()) }).map_err(Error::Chroot)?;
    std::env::set_current_dir("/").map_err(Error::SetCurrentDir)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|err| Error::ChangeFileOwner(path.to_path_buf(), err))
}

/// Makes the directories and device nodes inside the jail (run after the pivot).
fn populate(layout: &JailLayout) -> Result<()> {
    for dir in &layout.dirs {
        let path = Path::new(dir.path);
        std::fs::create_dir_all(path).map_err(|err| Error::CreateDir(path.to_path_buf(), err))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(layout::DIR_MODE))
            .map_err(|err| Error::Chmod(path.to_path_buf(), err))?;
        chown(path, layout.uid, layout.gid)?;
    }
    for dev in &layout.devices {
        let path = Path::new(dev.path);
        match std::fs::remove_file(path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                return Err(Error::RemoveDev(dev.path, err));
            }
            _ => {}
        }
        let c_path = path_cstring(path)?;
        let rdev = libc::makedev(dev.major, dev.minor);
        // SAFETY: `c_path` is a NUL-terminated path.
        check(unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | layout::DEVICE_MODE, rdev) })
            .map_err(|err| Error::MknodDev(dev.path, err))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(layout::DEVICE_MODE))
            .map_err(|err| Error::Chmod(path.to_path_buf(), err))?;
        chown(path, layout.uid, layout.gid)?;
    }
    Ok(())
}

/// Detaches into a session of its own with stdio on `/dev/null`.
///
/// A process group leader (as a shell with job control starts every command) cannot call
/// `setsid`, which fails Firecracker's jailer there. This one then forks and the child goes on,
/// while the parent waits on a pipe whose write end the child holds with close-on-exec: the
/// parent exits 0 once the VMM has been exec'd (and, with `--new-pid-ns`, the pid file written),
/// and 1 when the child writes a byte to it on failure. The child gets that write end back.
fn daemonize(dev_null: &File) -> Result<Option<File>> {
    let mut parent_pipe = None;
    // SAFETY: getpid and getpgrp take no arguments and cannot fail.
    if unsafe { libc::getpgrp() == libc::getpid() } {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).map_err(Error::Fork)?;
        // SAFETY: pipe2 just opened this descriptor, owned here alone.
        let read_end = unsafe { File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let write_end = unsafe { File::from_raw_fd(fds[1]) };
        // SAFETY: the jailer has a single thread, so no lock can be held by a thread the child
        // lacks; the parent only reads the pipe and exits.
        if check(unsafe { libc::fork() }).map_err(Error::Fork)? != 0 {
            drop(write_end);
            let mut byte = [0u8; 1];
            let failed = matches!(io::Read::read(&mut &read_end, &mut byte), Ok(1));
            // SAFETY: _exit ends the process at once, leaving the jail to the child.
            unsafe { libc::_exit(i32::from(failed)) };
        }
        drop(read_end);
        parent_pipe = Some(write_end);
    }
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() }).map_err(Error::SetSid)?;
    for fd in 0..=2 {
        // SAFETY: dup2 of an open descriptor onto a standard stream.
        check(unsafe { libc::dup2(dev_null.as_raw_fd(), fd) }).map_err(Error::Dup2)?;
    }
    Ok(parent_pipe)
}

/// Clones the process into a new PID namespace, fork-like; returns the child's pid in the parent
/// and 0 in the child.
fn clone_new_pid_ns() -> Result<libc::pid_t> {
    let flags = u64::try_from(libc::CLONE_NEWPID | libc::SIGCHLD).unwrap_or(0);
    // SAFETY: with no stack given the child runs on a copy of the parent's, as after fork; the
    // jailer has a single thread, so no lock can be held by a thread the child lacks.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0u64,
        )
    };
    if ret < 0 {
        return Err(Error::Clone(io::Error::last_os_error()));
    }
    libc::pid_t::try_from(ret).map_err(|_| Error::Clone(io::Error::from_raw_os_error(libc::EINVAL)))
}

fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: an empty group list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
        .map_err(|err| Error::DropPrivileges("setgroups", err))?;
    // SAFETY: setresgid takes only ids.
    check(unsafe { libc::setresgid(gid, gid, gid) })
        .map_err(|err| Error::DropPrivileges("setresgid", err))?;
    // SAFETY: setresuid takes only ids.
    check(unsafe { libc::setresuid(uid, uid, uid) })
        .map_err(|err| Error::DropPrivileges("setresuid", err))?;
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are valid u32s the call writes.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) })
        .map_err(|err| Error::DropPrivileges("getresuid", err))?;
    let uids = [r, e, s];
    // SAFETY: as above.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) })
        .map_err(|err| Error::DropPrivileges("getresgid", err))?;
    let gids = [r, e, s];
    // SAFETY: a size of 0 only counts the groups.
    let groups = check(unsafe { libc::getgroups(0, std::ptr::null_mut()) })
        .map_err(|err| Error::DropPrivileges("getgroups", err))?;
    if uids != [uid; 3] || gids != [gid; 3] || groups != 0 {
        return Err(Error::PrivilegesKept);
    }
    Ok(())
}

fn exec(args: &[OsString]) -> Error {
    let args = match args
        .iter()
        .map(|arg| cstring(arg.as_bytes()))
        .collect::<Result<Vec<_>>>()
    {
        Ok(args) => args,
        Err(err) => return err,
    };
    let Some(path) = args.first() else {
        return Error::Exec(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|arg| arg.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `path` and each argument are NUL-terminated strings that outlive the call, and
    // `argv` and `envp` are NULL-terminated arrays of them.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Error::Exec(io::Error::last_os_error())
}

/// Builds the jail `config` describes and execs the VMM in it.
///
/// `start` holds the jailer's start times, passed on to the VMM. The jailer must be
/// single-threaded, as a `main` that has started no thread is.
///
/// # Errors
///
/// The first step that fails; what it leaves behind (the jail's directories and files, an empty
/// cgroup) is reused by the next start with the same ID. It only returns `Ok` in the parent of
/// `--new-pid-ns`, once the child's pid is written; otherwise it execs the VMM or fails.
pub fn run(config: &JailConfig, start: StartTimes) -> Result<()> {
    close_inherited_fds(&config.keep_fds)?;
    // SAFETY: the jailer is single-threaded, so nothing reads the environment concurrently.
    unsafe { libc::clearenv() };

    let userfaultfd = host_userfaultfd()?;
    let layout = JailLayout::plan(config, userfaultfd);
    std::fs::create_dir_all(&layout.root_dir)
        .map_err(|err| Error::CreateDir(layout.root_dir.clone(), err))?;
    // Held through exec: the VMM keeps the jail's ID in use for its whole life.
    let lock = lock_jail(&layout)?;
    copy_exec_file(config, &layout, &lock)?;
    set_rlimits(&config.resource_limits)?;

    let mounts = if config.cgroups.is_empty() {
        Vec::new()
    } else {
        cgroup::read_mounts()?
    };
    let plans = cgroup::plan(
        config.cgroup_version,
        &mounts,
        &config.parent_cgroup,
        &config.id,
        &config.cgroups,
    )?;
    cgroup::apply(config.cgroup_version, &plans, std::process::id())?;

    if let Some(netns) = &config.netns {
        join_netns(netns)?;
    }
    let dev_null = if config.daemonize {
        Some(File::open("/dev/null").map_err(Error::OpenDevNull)?)
    } else {
        None
    };

    pivot_into(&layout.root_dir)?;
    populate(&layout)?;

    let mut times = start;
    times.parent_cpu_time_us = process_cpu_us().saturating_sub(start.start_time_cpu_us);
    let waiting_parent = match dev_null {
        Some(dev_null) => daemonize(&dev_null)?,
        None => None,
    };
    let result = (|| {
        if config.new_pid_ns {
            let child = clone_new_pid_ns()?;
            if child > 0 {
                let pid_file = &layout.pid_file_in_jail;
                return std::fs::write(pid_file, child.to_string())
                    .map_err(|err| Error::Write(pid_file.clone(), err));
            }
        }
        drop_privileges(config.uid, config.gid)?;
        Err(exec(&layout::exec_args(&layout, config, &times)))
    })();
    if let (Err(_), Some(pipe)) = (&result, waiting_parent) {
        // The parent that daemonize left waiting exits 1; its stderr is still the caller's.
        let _ = io::Write::write_all(&mut &pipe, b"1");
    }
    drop(lock);
    result
}
