//! The jailer's command line, Firecracker's jailer's, and its validation into a [`JailConfig`].
//!
//! [`Args`] is what clap parses; [`JailConfig::from_args`] checks every value (the ID's
//! characters and length, the uid and gid, the exec file, the chroot base directory, the network
//! namespace, the cgroup settings, the resource limits, the kept descriptors) and resolves the
//! defaults, so that nothing the jailer does afterwards acts on an unchecked value.

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::path::{Component, Path, PathBuf};

use clap::Parser;

use super::cgroup::{self, CgroupSetting, CgroupVersion};

/// The longest jail ID, in characters (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;

/// The chroot base directory when `--chroot-base-dir` is not given.
pub const DEFAULT_CHROOT_BASE_DIR: &str = "/srv/jailer";

/// The `RLIMIT_NOFILE` of the jailed process when no `--resource-limit no-file=N` is given.
pub const DEFAULT_NO_FILE: u64 = 2048;

/// Why the command line does not describe a jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ID has a character other than `[A-Za-z0-9-]`.
    #[error("Invalid instance ID: Invalid char ({ch}) at position {position}")]
    IdChar {
        /// The character refused.
        ch: char,
        /// Its position, from 0.
        position: usize,
    },
    /// The ID is empty or longer than [`MAX_ID_LEN`].
    #[error("Invalid instance ID: Invalid len ({0}); the length must be between 1 and 64")]
    IdLen(usize),
    /// The uid is not a number.
    #[error("Invalid uid: {0}")]
    Uid(String),
    /// The gid is not a number.
    #[error("Invalid gid: {0}")]
    Gid(String),
    /// A path could not be resolved.
    #[error("Failed to canonicalize path {}", .0.display())]
    Canonicalize(PathBuf, #[source] io::Error),
    /// The exec file is not a regular file.
    #[error("{} is not a file", .0.display())]
    NotAFile(PathBuf),
    /// The exec file's name cannot be used as a file name in the jail.
    #[error("Failed to extract filename from path {}", .0.display())]
    ExtractFileName(PathBuf),
    /// The chroot base directory is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The network namespace file does not exist.
    #[error("Failed to open the network namespace {}", .0.display())]
    Netns(PathBuf, #[source] io::Error),
    /// `--cgroup-version` is neither 1 nor 2.
    #[error("{0} is an invalid cgroup version specifier")]
    CgroupVersion(String),
    /// `--parent-cgroup` is absolute, empty or has a `.` or `..` component.
    #[error("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")]
    ParentCgroup,
    /// A `--cgroup` argument is malformed.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// A `--resource-limit` argument has no `=`.
    #[error("Invalid format for resources limits: {0}")]
    ResLimitFormat(String),
    /// A `--resource-limit` names a resource other than `fsize` and `no-file`.
    #[error("Invalid resource argument: {0}")]
    ResLimitArgument(String),
    /// A `--resource-limit` value is not a number.
    #[error("Invalid limit value for resource: {0}")]
    ResLimitValue(String, #[source] std::num::ParseIntError),
    /// A `--keep-fd` is a standard stream or not an open descriptor.
    #[error("Invalid --keep-fd {0}: it must be an open file descriptor above 2")]
    KeepFd(RawFd),
}

/// The result of validating the command line.
pub type Result<T> = std::result::Result<T, Error>;

/// The jailer's command line, as Firecracker's jailer takes it, plus `--keep-fd`.
#[derive(Debug, Parser)]
#[command(
    name = "ember-jailer",
    version,
    about = "Starts a VMM in a jail: chrooted with pivot_root, in its own mount namespace (and \
             optionally network and PID namespaces), in a cgroup, with resource limits, as an \
             unprivileged uid and gid, with every inherited descriptor but stdio closed."
)]
pub struct Args {
    /// Jail ID: 1 to 64 characters of `[A-Za-z0-9-]`.
    #[arg(long)]
    pub id: String,
    /// File path to exec into (copied into the jail).
    #[arg(long)]
    pub exec_file: PathBuf,
    /// The user identifier the jailer switches to before exec.
    #[arg(long, allow_negative_numbers = true)]
    pub uid: String,
    /// The group identifier the jailer switches to before exec.
    #[arg(long, allow_negative_numbers = true)]
    pub gid: String,
    /// The base folder where chroot jails are located.
    #[arg(long, default_value = DEFAULT_CHROOT_BASE_DIR)]
    pub chroot_base_dir: PathBuf,
    /// Path to the network namespace this microVM should join.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Daemonize the jailer before exec, by invoking setsid(), and redirecting the standard I/O
    /// file descriptors to /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Exec into a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Select the cgroup version used by the jailer (1 or 2).
    #[arg(long, default_value = "1")]
    pub cgroup_version: String,
    /// Cgroup and value to be set by the jailer, as `<cgroup_file>=<value>` (e.g.
    /// `cpu.shares=10`); repeatable.
    #[arg(long)]
    pub cgroup: Vec<String>,
    /// Parent cgroup in which the cgroup of this microVM is placed (default: the exec file's
    /// name).
    #[arg(long)]
    pub parent_cgroup: Option<String>,
    /// Resource limit set by the jailer, as `<resource>=<value>`: `fsize` (the largest file
    /// the process may create, in bytes) or `no-file` (one more than the highest descriptor
    /// number it may open); repeatable.
    #[arg(long)]
    pub resource_limit: Vec<String>,
    /// An inherited file descriptor (above 2) left open for the VMM; repeatable.
    #[arg(long)]
    pub keep_fd: Vec<RawFd>,
    /// Arguments passed on to the VMM, after `--`.
    #[arg(last = true)]
    pub vmm_args: Vec<OsString>,
}

/// The resource limits the jailer sets on itself before exec, both soft and hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_FSIZE`, when given.
    pub fsize: Option<u64>,
    /// `RLIMIT_NOFILE` ([`DEFAULT_NO_FILE`] unless given).
    pub no_file: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            fsize: None,
            no_file: DEFAULT_NO_FILE,
        }
    }
}

impl ResourceLimits {
    /// Applies one `--resource-limit` argument (`fsize=N` or `no-file=N`); a later one for the
    /// same resource wins.
    ///
    /// # Errors
    ///
    /// When the argument has no `=`, names another resource, or its value is not a `u64`.
    pub fn apply_arg(&mut self, arg: &str) -> Result<()> {
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| Error::ResLimitFormat(arg.to_string()))?;
        let parse = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|err| Error::ResLimitValue(arg.to_string(), err))
        };
        match name {
            "fsize" => self.fsize = Some(parse(value)?),
            "no-file" => self.no_file = parse(value)?,
            _ => return Err(Error::ResLimitArgument(name.to_string())),
        }
        Ok(())
    }
}

/// A validated command line: everything the jailer needs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The jail's ID.
    pub id: String,
    /// The exec file, canonical.
    pub exec_file: PathBuf,
    /// The exec file's name: the jail's directory under the base and the file in the jail.
    pub exec_name: OsString,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
    /// The directory the jail is made under, canonical.
    pub chroot_base_dir: PathBuf,
    /// The network namespace to join.
    pub netns: Option<PathBuf>,
    /// Whether to detach (setsid, stdio on /dev/null).
    pub daemonize: bool,
    /// Whether to exec in a new PID namespace.
    pub new_pid_ns: bool,
    /// The cgroup version.
    pub cgroup_version: CgroupVersion,
    /// The cgroup files to write, in order.
    pub cgroups: Vec<CgroupSetting>,
    /// The parent of the jail's cgroup, relative to each hierarchy's root.
    pub parent_cgroup: PathBuf,
    /// The resource limits.
    pub resource_limits: ResourceLimits,
    /// The inherited descriptors left open for the VMM, sorted, without duplicates.
    pub keep_fds: Vec<RawFd>,
    /// The arguments after `--`, passed on to the VMM.
    pub vmm_args: Vec<OsString>,
}

/// Checks a jail ID: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9-]`.
///
/// # Errors
///
/// [`Error::IdLen`] or [`Error::IdChar`].
pub fn validate_id(id: &str) -> Result<()> {
    let len = id.chars().count();
    if len == 0 || len > MAX_ID_LEN {
        return Err(Error::IdLen(len));
    }
    match id
        .chars()
        .enumerate()
        .find(|(_, ch)| !(ch.is_ascii_alphanumeric() || *ch == '-'))
    {
        Some((position, ch)) => Err(Error::IdChar { ch, position }),
        None => Ok(()),
    }
}

/// Checks `--parent-cgroup`: a relative path of normal components only.
///
/// # Errors
///
/// [`Error::ParentCgroup`] when it is empty, absolute or has a `.` or `..` component.
pub fn validate_parent_cgroup(parent: &str) -> Result<PathBuf> {
    let path = Path::new(parent);
    // `Path::components` drops a `.` in the middle, so the text is checked as well.
    let dot = parent.split('/').any(|part| part == "." || part == "..");
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    if parent.is_empty() || dot || !normal || path.components().next().is_none() {
        return Err(Error::ParentCgroup);
    }
    Ok(path.to_path_buf())
}

/// Whether `fd` is an open descriptor of this process.
fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads the descriptor's flags and touches no memory; an fd that is not
    // open only makes it fail with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

impl JailConfig {
    /// Validates a parsed command line into a jail's configuration.
    ///
    /// Besides checking the values' syntax, it resolves the exec file and the chroot base
    /// directory (both canonicalized), checks that the network namespace file and each
    /// `--keep-fd` are open-able, and fills in the defaults (`--parent-cgroup` is the exec
    /// file's name, `no-file` is [`DEFAULT_NO_FILE`]).
    ///
    /// # Errors
    ///
    /// The first argument found bad, in the command line's order.
    pub fn from_args(args: Args) -> Result<JailConfig> {
        validate_id(&args.id)?;
        let exec_file = args
            .exec_file
            .canonicalize()
            .map_err(|err| Error::Canonicalize(args.exec_file.clone(), err))?;
        let metadata = std::fs::metadata(&exec_file)
            .map_err(|err| Error::Canonicalize(args.exec_file.clone(), err))?;
        if !metadata.is_file() {
            return Err(Error::NotAFile(exec_file));
        }
        let exec_name = exec_file
            .file_name()
            .map(OsString::from)
            .ok_or_else(|| Error::ExtractFileName(exec_file.clone()))?;
        let uid = args.uid.parse::<u32>().map_err(|_| Error::Uid(args.uid))?;
        let gid = args.gid.parse::<u32>().map_err(|_| Error::Gid(args.gid))?;
        let chroot_base_dir = args
            .chroot_base_dir
            .canonicalize()
            .map_err(|err| Error::Canonicalize(args.chroot_base_dir.clone(), err))?;
        if !chroot_base_dir.is_dir() {
            return Err(Error::NotADirectory(chroot_base_dir));
        }
        if let Some(netns) = &args.netns {
            std::fs::metadata(netns).map_err(|err| Error::Netns(netns.clone(), err))?;
        }
        let cgroup_version = match args.cgroup_version.as_str() {
            "1" => CgroupVersion::V1,
            "2" => CgroupVersion::V2,
            other => return Err(Error::CgroupVersion(other.to_string())),
        };
        let cgroups = args
            .cgroup
            .iter()
            .map(|arg| CgroupSetting::parse(arg))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let parent_cgroup = match &args.parent_cgroup {
            Some(parent) => validate_parent_cgroup(parent)?,
            None => PathBuf::from(&exec_name),
        };
        let mut resource_limits = ResourceLimits::default();
        for arg in &args.resource_limit {
            resource_limits.apply_arg(arg)?;
        }
        let mut keep_fds = args.keep_fd;
        keep_fds.sort_unstable();
        keep_fds.dedup();
        if let Some(&fd) = keep_fds.iter().find(|&&fd| fd <= 2 || !fd_is_open(fd)) {
            return Err(Error::KeepFd(fd));
        }
        Ok(JailConfig {
            id: args.id,
            exec_file,
            exec_name,
            uid,
            gid,
            chroot_base_dir,
            netns: args.netns,
            daemonize: args.daemonize,
            new_pid_ns: args.new_pid_ns,
            cgroup_version,
            cgroups,
            parent_cgroup,
            resource_limits,
            keep_fds,
            vmm_args: args.vmm_args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe() -> String {
        std::env::current_exe()
            .expect("the test binary has a path")
            .to_string_lossy()
            .into_owned()
    }

    fn base() -> String {
        std::env::temp_dir().to_string_lossy().into_owned()
    }

    /// Parses the command line, with `--id`, `--exec-file`, `--uid`, `--gid` and
    /// `--chroot-base-dir` good unless `extra` gives them (clap refuses a flag given twice).
    fn config(extra: &[&str]) -> Result<JailConfig> {
        let (exe, base) = (exe(), base());
        let defaults = [
            ("--id", "vm-1"),
            ("--exec-file", exe.as_str()),
            ("--uid", "123"),
            ("--gid", "456"),
            ("--chroot-base-dir", base.as_str()),
        ];
        let mut argv = vec!["ember-jailer"];
        for (flag, value) in defaults {
            let flags = extra.split(|a| *a == "--").next().unwrap_or_default();
            let given = flags
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
            if !given {
                argv.extend([flag, value]);
            }
        }
        argv.extend(extra);
        let args = Args::try_parse_from(argv).expect("clap parses the command line");
        JailConfig::from_args(args)
    }

    fn message(extra: &[&str]) -> String {
        config(extra)
            .expect_err("the command line is refused")
            .to_string()
    }

    #[test]
    fn a_good_command_line_gets_the_defaults() {
        let config = config(&[]).unwrap();
        assert_eq!(config.id, "vm-1");
        assert_eq!((config.uid, config.gid), (123, 456));
        assert_eq!(config.exec_file, Path::new(&exe()).canonicalize().unwrap());
        assert_eq!(config.parent_cgroup, PathBuf::from(&config.exec_name));
        assert_eq!(config.cgroup_version, CgroupVersion::V1);
        assert_eq!(config.resource_limits, ResourceLimits::default());
        assert_eq!(config.resource_limits.no_file, 2048);
        assert!(!config.daemonize && !config.new_pid_ns);
        assert!(config.cgroups.is_empty() && config.keep_fds.is_empty());
    }

    #[test]
    fn the_default_chroot_base_is_srv_jailer() {
        let args = Args::try_parse_from([
            "ember-jailer",
            "--id=a",
            "--exec-file=/x",
            "--uid=1",
            "--gid=1",
        ])
        .unwrap();
        assert_eq!(args.chroot_base_dir, Path::new("/srv/jailer"));
    }

    #[test]
    fn flags_take_their_value_after_a_space_or_an_equals_sign() {
        let config = config(&["--id=other", "--uid", "7", "--gid=8"]).unwrap();
        assert_eq!(config.id, "other");
        assert_eq!((config.uid, config.gid), (7, 8));
    }

    #[test]
    fn the_arguments_after_the_double_dash_go_to_the_vmm() {
        let config = config(&["--daemonize", "--", "--api-sock", "/run/api.sock", "--id"]).unwrap();
        assert!(config.daemonize);
        assert_eq!(config.vmm_args, ["--api-sock", "/run/api.sock", "--id"]);
    }

    #[test]
    fn every_option_is_taken() {
        let config = config(&[
            "--new-pid-ns",
            "--cgroup-version",
            "2",
            "--cgroup",
            "memory.max=1000000",
            "--cgroup=pids.max=10",
            "--parent-cgroup",
            "a/b",
            "--resource-limit",
            "fsize=100",
            "--resource-limit=no-file=64",
            "--netns",
            "/proc/self/ns/net",
        ])
        .unwrap();
        assert!(config.new_pid_ns);
        assert_eq!(config.cgroup_version, CgroupVersion::V2);
        assert_eq!(config.cgroups.len(), 2);
        assert_eq!(config.cgroups[1].file, "pids.max");
        assert_eq!(config.parent_cgroup, Path::new("a/b"));
        assert_eq!(
            config.resource_limits,
            ResourceLimits {
                fsize: Some(100),
                no_file: 64
            }
        );
        assert_eq!(
            config.netns.as_deref(),
            Some(Path::new("/proc/self/ns/net"))
        );
    }

    #[test]
    fn an_id_of_other_characters_or_length_is_refused() {
        assert_eq!(
            message(&["--id", "a_b"]),
            "Invalid instance ID: Invalid char (_) at position 1"
        );
        assert!(message(&["--id", "a/b"]).starts_with("Invalid instance ID: Invalid char (/)"));
        assert!(message(&["--id", ".."]).starts_with("Invalid instance ID"));
        assert_eq!(
            message(&["--id", ""]),
            "Invalid instance ID: Invalid len (0); the length must be between 1 and 64"
        );
        let long = "a".repeat(65);
        assert!(message(&["--id", &long]).contains("Invalid len (65)"));
        assert!(config(&["--id", &"Z9-".repeat(21)]).is_ok());
    }

    #[test]
    fn a_uid_or_gid_that_is_not_a_number_is_refused() {
        assert_eq!(message(&["--uid", "root"]), "Invalid uid: root");
        assert_eq!(message(&["--uid", "-1"]), "Invalid uid: -1");
        assert_eq!(message(&["--gid", "4294967296"]), "Invalid gid: 4294967296");
    }

    #[test]
    fn an_exec_file_that_is_missing_or_not_a_file_is_refused() {
        assert!(
            message(&["--exec-file", "/nonexistent/vmm"])
                .starts_with("Failed to canonicalize path /nonexistent/vmm")
        );
        assert_eq!(message(&["--exec-file", "/tmp"]), "/tmp is not a file");
    }

    #[test]
    fn a_chroot_base_that_is_missing_or_not_a_directory_is_refused() {
        assert!(
            message(&["--chroot-base-dir", "/nonexistent"]).starts_with("Failed to canonicalize")
        );
        let exe = exe();
        assert!(message(&["--chroot-base-dir", &exe]).ends_with("is not a directory"));
    }

    #[test]
    fn a_missing_netns_is_refused() {
        assert_eq!(
            message(&["--netns", "/nonexistent/ns"]),
            "Failed to open the network namespace /nonexistent/ns"
        );
    }

    #[test]
    fn a_cgroup_version_other_than_1_or_2_is_refused() {
        assert_eq!(
            message(&["--cgroup-version", "3"]),
            "3 is an invalid cgroup version specifier"
        );
    }

    #[test]
    fn a_malformed_cgroup_setting_is_refused() {
        for bad in [
            "memory",
            "memory.max",
            "max=1",
            ".max=1",
            "memory.=1",
            "memory.max=",
            "Memory.max=1",
            "memory.max/../../x=1",
            "memory..max=1",
            "cgroup.procs=1",
            "memory.max=1\n2",
        ] {
            assert_eq!(
                message(&["--cgroup", bad]),
                format!("Invalid format for cgroups: {bad}"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_parent_cgroup_that_is_absolute_or_has_dots_is_refused() {
        for bad in ["/abs", "a/../b", "a/./b", ".", "..", "", "a/.."] {
            assert!(
                message(&["--parent-cgroup", bad]).starts_with("Parent cgroup path is invalid"),
                "{bad:?}"
            );
        }
        assert!(config(&["--parent-cgroup", "a/b/c"]).is_ok());
    }

    #[test]
    fn a_bad_resource_limit_is_refused() {
        assert_eq!(
            message(&["--resource-limit", "fsize"]),
            "Invalid format for resources limits: fsize"
        );
        assert_eq!(
            message(&["--resource-limit", "cpu=1"]),
            "Invalid resource argument: cpu"
        );
        assert_eq!(
            message(&["--resource-limit", "no-file=-1"]),
            "Invalid limit value for resource: no-file=-1"
        );
    }

    #[test]
    fn a_later_resource_limit_wins() {
        let mut limits = ResourceLimits::default();
        limits.apply_arg("no-file=10").unwrap();
        limits.apply_arg("no-file=20").unwrap();
        limits.apply_arg("fsize=0").unwrap();
        assert_eq!(
            limits,
            ResourceLimits {
                fsize: Some(0),
                no_file: 20
            }
        );
    }

    #[test]
    fn a_kept_fd_must_be_open_and_above_stderr() {
        assert_eq!(
            message(&["--keep-fd", "2"]),
            "Invalid --keep-fd 2: it must be an open file descriptor above 2"
        );
        assert!(message(&["--keep-fd", "100000"]).starts_with("Invalid --keep-fd 100000"));
        let file = std::fs::File::open(exe()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file).to_string();
        let config = config(&["--keep-fd", &fd, "--keep-fd", &fd]).unwrap();
        assert_eq!(config.keep_fds, [file.as_raw_fd()]);
    }

    use std::os::fd::AsRawFd;
}
