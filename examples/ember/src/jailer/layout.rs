//! The jail the jailer plans, as plain data computed without touching the system: its paths,
//! the directories and device nodes inside it with their owners and modes, and the VMM's
//! command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::args::JailConfig;

/// The mode of every directory the jailer makes inside the jail (Firecracker's).
pub const DIR_MODE: u32 = 0o700;

/// The permission bits of every device node in the jail.
pub const DEVICE_MODE: u32 = 0o600;

/// The mode the exec file is copied with.
pub const EXEC_MODE: u32 = 0o755;

/// A directory inside the jail, owned by the jail's uid and gid with [`DIR_MODE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailDir {
    /// Its path inside the jail.
    pub path: &'static str,
}

/// A character device node inside the jail, owned by the jail's uid and gid, `S_IFCHR` with
/// [`DEVICE_MODE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Its path inside the jail, which also names it in errors.
    pub path: &'static str,
    /// The device's major number.
    pub major: u32,
    /// The device's minor number.
    pub minor: u32,
}

/// `/dev/kvm`: the KVM device.
pub const DEV_KVM: DeviceNode = DeviceNode {
    path: "/dev/kvm",
    major: 10,
    minor: 232,
};

/// `/dev/net/tun`: TAP devices.
pub const DEV_NET_TUN: DeviceNode = DeviceNode {
    path: "/dev/net/tun",
    major: 10,
    minor: 200,
};

/// `/dev/urandom`: the kernel's random numbers.
pub const DEV_URANDOM: DeviceNode = DeviceNode {
    path: "/dev/urandom",
    major: 1,
    minor: 9,
};

/// The path of `/dev/userfaultfd`, whose numbers are the host's (it is a misc device with a
/// dynamic minor).
pub const DEV_USERFAULTFD_PATH: &str = "/dev/userfaultfd";

/// Everything the jail is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLayout {
    /// `<base>/<exec name>/<id>`.
    pub jail_dir: PathBuf,
    /// `<jail_dir>/root`: the VMM's `/`.
    pub root_dir: PathBuf,
    /// The exec file's copy, seen from outside: `<root_dir>/<exec name>`.
    pub exec_in_root: PathBuf,
    /// The exec file's copy, seen from inside: `/<exec name>`.
    pub exec_in_jail: PathBuf,
    /// The pid file of `--new-pid-ns`, seen from inside: `/<exec name>.pid`.
    pub pid_file_in_jail: PathBuf,
    /// The directories inside the jail, parents first (`/` included).
    pub dirs: Vec<JailDir>,
    /// The device nodes inside the jail.
    pub devices: Vec<DeviceNode>,
    /// The owner of the directories and nodes.
    pub uid: u32,
    /// Their group.
    pub gid: u32,
}

impl JailLayout {
    /// Plans the jail of `config`; `userfaultfd` is the host's `/dev/userfaultfd` (major,
    /// minor), when it has one.
    pub fn plan(config: &JailConfig, userfaultfd: Option<(u32, u32)>) -> JailLayout {
        let jail_dir = config
            .chroot_base_dir
            .join(&config.exec_name)
            .join(&config.id);
        let root_dir = jail_dir.join("root");
        let mut pid_file = OsString::from("/");
        pid_file.push(&config.exec_name);
        pid_file.push(".pid");
        let mut devices = vec![DEV_KVM, DEV_NET_TUN, DEV_URANDOM];
        if let Some((major, minor)) = userfaultfd {
            devices.push(DeviceNode {
                path: DEV_USERFAULTFD_PATH,
                major,
                minor,
            });
        }
        JailLayout {
            exec_in_root: root_dir.join(&config.exec_name),
            exec_in_jail: Path::new("/").join(&config.exec_name),
            pid_file_in_jail: PathBuf::from(pid_file),
            jail_dir,
            root_dir,
            dirs: ["/", "/dev", "/dev/net", "/run"]
                .into_iter()
                .map(|path| JailDir { path })
                .collect(),
            devices,
            uid: config.uid,
            gid: config.gid,
        }
    }
}

/// The times the jailer passes on to the VMM, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StartTimes {
    /// `CLOCK_MONOTONIC` when the jailer started.
    pub start_time_us: u64,
    /// The jailer's CPU time (`CLOCK_PROCESS_CPUTIME_ID`) when it started.
    pub start_time_cpu_us: u64,
    /// The CPU time the jailer spent before exec.
    pub parent_cpu_time_us: u64,
}

/// The VMM's argument vector: `/<exec name> --id <id> --start-time-us <µs>
/// --start-time-cpu-us <µs> --parent-cpu-time-us <µs> <args after -->`.
pub fn exec_args(layout: &JailLayout, config: &JailConfig, times: &StartTimes) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        layout.exec_in_jail.clone().into_os_string(),
        "--id".into(),
        config.id.clone().into(),
        "--start-time-us".into(),
        times.start_time_us.to_string().into(),
        "--start-time-cpu-us".into(),
        times.start_time_cpu_us.to_string().into(),
        "--parent-cpu-time-us".into(),
        times.parent_cpu_time_us.to_string().into(),
    ];
    args.extend(config.vmm_args.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jailer::args::ResourceLimits;
    use crate::jailer::cgroup::CgroupVersion;

    fn config() -> JailConfig {
        JailConfig {
            id: "vm-1".into(),
            exec_file: "/usr/bin/ember".into(),
            exec_name: "ember".into(),
            uid: 123,
            gid: 456,
            chroot_base_dir: "/srv/jailer".into(),
            netns: None,
            daemonize: false,
            new_pid_ns: false,
            cgroup_version: CgroupVersion::V1,
            cgroups: Vec::new(),
            parent_cgroup: "ember".into(),
            resource_limits: ResourceLimits::default(),
            keep_fds: Vec::new(),
            vmm_args: vec!["--api-sock".into(), "/run/api.sock".into()],
        }
    }

    #[test]
    fn the_jail_lives_under_base_exec_name_and_id() {
        let layout = JailLayout::plan(&config(), None);
        assert_eq!(layout.jail_dir, Path::new("/srv/jailer/ember/vm-1"));
        assert_eq!(layout.root_dir, Path::new("/srv/jailer/ember/vm-1/root"));
        assert_eq!(
            layout.exec_in_root,
            Path::new("/srv/jailer/ember/vm-1/root/ember")
        );
        assert_eq!(layout.exec_in_jail, Path::new("/ember"));
        assert_eq!(layout.pid_file_in_jail, Path::new("/ember.pid"));
    }

    #[test]
    fn the_jail_has_its_directories_owned_by_the_jail_user() {
        let layout = JailLayout::plan(&config(), None);
        let dirs: Vec<_> = layout.dirs.iter().map(|d| d.path).collect();
        assert_eq!(dirs, ["/", "/dev", "/dev/net", "/run"]);
        assert_eq!((layout.uid, layout.gid), (123, 456));
        assert_eq!(DIR_MODE, 0o700);
    }

    #[test]
    fn the_jail_has_kvm_tun_and_urandom_and_userfaultfd_when_the_host_does() {
        let layout = JailLayout::plan(&config(), None);
        assert_eq!(layout.devices, [DEV_KVM, DEV_NET_TUN, DEV_URANDOM]);
        assert_eq!((DEV_KVM.major, DEV_KVM.minor), (10, 232));
        assert_eq!((DEV_NET_TUN.major, DEV_NET_TUN.minor), (10, 200));
        assert_eq!((DEV_URANDOM.major, DEV_URANDOM.minor), (1, 9));
        assert_eq!(DEVICE_MODE, 0o600);
        let layout = JailLayout::plan(&config(), Some((10, 126)));
        assert_eq!(
            layout.devices.last(),
            Some(&DeviceNode {
                path: "/dev/userfaultfd",
                major: 10,
                minor: 126
            })
        );
    }

    #[test]
    fn the_vmm_gets_its_id_the_start_times_and_the_arguments_after_the_double_dash() {
        let config = config();
        let layout = JailLayout::plan(&config, None);
        let times = StartTimes {
            start_time_us: 1,
            start_time_cpu_us: 2,
            parent_cpu_time_us: 3,
        };
        let args = exec_args(&layout, &config, &times);
        assert_eq!(
            args,
            [
                "/ember",
                "--id",
                "vm-1",
                "--start-time-us",
                "1",
                "--start-time-cpu-us",
                "2",
                "--parent-cpu-time-us",
                "3",
                "--api-sock",
                "/run/api.sock"
            ]
        );
    }
}
