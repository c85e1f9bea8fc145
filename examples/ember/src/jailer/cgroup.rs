//! The jail's cgroup, v1 or v2: finding the hierarchies in `/proc/mounts`, planning the
//! directories and files to write, and writing them.
//!
//! The planning ([`parse_mounts`], [`plan`]) is pure and unit-tested; [`apply`] is the part that
//! touches the system. As Firecracker's jailer does, the cgroup is `<mount>/<parent>/<id>` in each
//! hierarchy a `--cgroup` setting needs, and no cgroup is made when no setting is given.
//!
//! - v2: the unified hierarchy (the `cgroup2` mount); each controller the settings name is
//!   enabled in `cgroup.subtree_control` of every cgroup from the mount down to the parent, the
//!   values are written, and the jailer's pid goes into `cgroup.procs`.
//! - v1: per controller (the part of the file name before the first `.`), the `cgroup` mount
//!   whose options list it; the directories are made from the mount down (for `cpuset`, an empty
//!   `cpuset.cpus` or `cpuset.mems` is copied from the parent, without which no task can join),
//!   the values are written and the jailer's pid goes into `tasks`.
//!
//! An existing cgroup of the same path (left by an earlier run) is reused.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Why the cgroup could not be planned or made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--cgroup` argument is not `<controller>.<file>=<value>`.
    #[error("Invalid format for cgroups: {0}")]
    Format(String),
    /// `/proc/mounts` could not be read.
    #[error("Failed to read file {} into a string", .0.display())]
    ReadToString(PathBuf, #[source] io::Error),
    /// No hierarchy of the cgroup version carries the controller.
    #[error("Hierarchy not found: {0}")]
    HierarchyMissing(String),
    /// The v2 hierarchy does not offer the controller.
    #[error("Controller {0} is unavailable")]
    ControllerUnavailable(String),
    /// A cgroup directory could not be made.
    #[error("Failed to create directory {}", .0.display())]
    CreateDir(PathBuf, #[source] io::Error),
    /// A cgroup file could not be written.
    #[error("Failed to write to {}", .0.display())]
    Write(PathBuf, #[source] io::Error),
    /// A cpuset file had no value in any ancestor to copy.
    #[error("Failed to inherit cgroups configurations from file {file} in path {}", .path.display())]
    InheritFromParent {
        /// The directory whose file is empty.
        path: PathBuf,
        /// The file.
        file: String,
    },
}

/// The result of a cgroup step.
pub type Result<T> = std::result::Result<T, Error>;

/// The cgroup version, `--cgroup-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

/// One `--cgroup FILE=VALUE` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller: the file name up to its first `.`.
    pub controller: String,
    /// The file name, e.g. `memory.max`.
    pub file: String,
    /// The value written to it.
    pub value: String,
}

impl CgroupSetting {
    /// Parses `<controller>.<name>=<value>`. The controller is lower-case letters, digits and
    /// `_` and not `cgroup` (whose files move processes and are not limits); the rest of the
    /// file name is letters, digits, `_` and `.` (never a `/`, so it stays in the cgroup's
    /// directory); the value is not empty and has no newline.
    ///
    /// # Errors
    ///
    /// [`Error::Format`] otherwise.
    pub fn parse(arg: &str) -> Result<CgroupSetting> {
        let bad = || Error::Format(arg.to_string());
        let (file, value) = arg.split_once('=').ok_or_else(bad)?;
        let (controller, name) = file.split_once('.').ok_or_else(bad)?;
        let controller_ok = !controller.is_empty()
            && controller
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let name_ok = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains("..")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if !controller_ok
            || controller == "cgroup"
            || !name_ok
            || value.is_empty()
            || value.contains('\n')
        {
            return Err(bad());
        }
        Ok(CgroupSetting {
            controller: controller.to_string(),
            file: file.to_string(),
            value: value.to_string(),
        })
    }
}

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The file system type (`cgroup`, `cgroup2`, ...).
    pub fstype: String,
    /// Where it is mounted, with the kernel's octal escapes decoded.
    pub mount_point: PathBuf,
    /// The mount options, split at commas.
    pub options: Vec<String>,
}

/// Decodes the kernel's `\ooo` escapes of a `/proc/mounts` field (space, tab, newline,
/// backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of `/proc/mounts`; lines with fewer than four fields are skipped.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let _source = fields.next()?;
            let mount_point = fields.next()?;
            let fstype = fields.next()?;
            let options = fields.next()?;
            Some(Mount {
                fstype: fstype.to_string(),
                mount_point: PathBuf::from(unescape(mount_point)),
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The mount point of the cgroup v2 hierarchy: the first `cgroup2` mount.
pub fn v2_mount(mounts: &[Mount]) -> Option<&Path> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point.as_path())
}

/// The mount point of the cgroup v1 hierarchy that carries `controller`: the first `cgroup`
/// mount whose options list it.
pub fn v1_mount<'a>(mounts: &'a [Mount], controller: &str) -> Option<&'a Path> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))
        .map(|m| m.mount_point.as_path())
}

/// What the jailer does in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HierarchyPlan {
    /// The hierarchy's mount point.
    pub mount: PathBuf,
    /// The controllers the settings need here, in order of first use.
    pub controllers: Vec<String>,
    /// The cgroups from the mount down to the jail's cgroup, both included.
    pub dirs: Vec<PathBuf>,
    /// The files to write, with their values, in the command line's order.
    pub writes: Vec<(PathBuf, String)>,
    /// The file the jailer's pid is written to (`tasks` or `cgroup.procs`).
    pub procs_file: PathBuf,
}

impl HierarchyPlan {
    fn new(mount: &Path, parent: &Path, id: &str, procs: &str) -> HierarchyPlan {
        let mut dirs = vec![mount.to_path_buf()];
        let mut dir = mount.to_path_buf();
        for component in parent.components().chain(Path::new(id).components()) {
            dir.push(component);
            dirs.push(dir.clone());
        }
        HierarchyPlan {
            mount: mount.to_path_buf(),
            controllers: Vec::new(),
            procs_file: dir.join(procs),
            dirs,
            writes: Vec::new(),
        }
    }

    /// The jail's own cgroup.
    pub fn leaf(&self) -> &Path {
        // `dirs` holds the mount and at least the ID below it.
        self.dirs
            .last()
            .map_or(self.mount.as_path(), |d| d.as_path())
    }

    fn add(&mut self, setting: &CgroupSetting) {
        if !self.controllers.contains(&setting.controller) {
            self.controllers.push(setting.controller.clone());
        }
        let file = self.leaf().join(&setting.file);
        self.writes.push((file, setting.value.clone()));
    }
}

/// Plans the jail's cgroup: one [`HierarchyPlan`] per hierarchy the settings need (none
/// without settings).
///
/// # Errors
///
/// [`Error::HierarchyMissing`] when no mount carries a controller (v1) or there is no `cgroup2`
/// mount (v2).
pub fn plan(
    version: CgroupVersion,
    mounts: &[Mount],
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<Vec<HierarchyPlan>> {
    if settings.is_empty() {
        return Ok(Vec::new());
    }
    match version {
        CgroupVersion::V2 => {
            let mount =
                v2_mount(mounts).ok_or_else(|| Error::HierarchyMissing("cgroup2".to_string()))?;
            let mut hierarchy = HierarchyPlan::new(mount, parent, id, "cgroup.procs");
            settings.iter().for_each(|s| hierarchy.add(s));
            Ok(vec![hierarchy])
        }
        CgroupVersion::V1 => {
            // Keyed by mount point, so that co-mounted controllers (cpu,cpuacct) share one.
            let mut by_mount: BTreeMap<PathBuf, HierarchyPlan> = BTreeMap::new();
            for setting in settings {
                let mount = v1_mount(mounts, &setting.controller)
                    .ok_or_else(|| Error::HierarchyMissing(setting.controller.clone()))?;
                by_mount
                    .entry(mount.to_path_buf())
                    .or_insert_with(|| HierarchyPlan::new(mount, parent, id, "tasks"))
                    .add(setting);
            }
            Ok(by_mount.into_values().collect())
        }
    }
}

/// Makes a directory, an existing one being fine.
fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
            Err(Error::CreateDir(dir.to_path_buf(), err))
        }
        _ => Ok(()),
    }
}

/// Writes a value and a newline to a cgroup file.
fn write(file: &Path, value: &str) -> Result<()> {
    std::fs::write(file, format!("{value}\n")).map_err(|err| Error::Write(file.to_path_buf(), err))
}

/// Reads a cgroup file, trimmed.
fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file)
        .map(|s| s.trim().to_string())
        .map_err(|err| Error::ReadToString(file.to_path_buf(), err))
}

/// Reads and parses `/proc/mounts`.
///
/// # Errors
///
/// [`Error::ReadToString`] when it cannot be read.
pub fn read_mounts() -> Result<Vec<Mount>> {
    let path = Path::new("/proc/mounts");
    let text = std::fs::read_to_string(path)
        .map_err(|err| Error::ReadToString(path.to_path_buf(), err))?;
    Ok(parse_mounts(&text))
}

/// Makes the planned cgroups, writes their values and moves process `pid` into them.
///
/// # Errors
///
/// The first step that fails; the cgroups made so far stay (an empty cgroup is reused by the
/// next run, or removed with `rmdir`).
pub fn apply(version: CgroupVersion, plans: &[HierarchyPlan], pid: u32) -> Result<()> {
    for hierarchy in plans {
        match version {
            CgroupVersion::V2 => apply_v2(hierarchy)?,
            CgroupVersion::V1 => apply_v1(hierarchy)?,
        }
        for (file, value) in &hierarchy.writes {
            write(file, value)?;
        }
        write(&hierarchy.procs_file, &pid.to_string())?;
    }
    Ok(())
}

fn apply_v2(hierarchy: &HierarchyPlan) -> Result<()> {
    let available = read(&hierarchy.mount.join("cgroup.controllers"))?;
    if let Some(missing) = hierarchy
        .controllers
        .iter()
        .find(|c| !available.split_ascii_whitespace().any(|a| a == c.as_str()))
    {
        return Err(Error::ControllerUnavailable(missing.clone()));
    }
    let enable = hierarchy
        .controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    // Every ancestor of the jail's cgroup enables the controllers for its children.
    let ancestors = hierarchy
        .dirs
        .split_last()
        .map_or(&[][..], |(_, ancestors)| ancestors);
    for dir in ancestors {
        mkdir(dir)?;
        write(&dir.join("cgroup.subtree_control"), &enable)?;
    }
    mkdir(hierarchy.leaf())
}

fn apply_v1(hierarchy: &HierarchyPlan) -> Result<()> {
    let cpuset = hierarchy.controllers.iter().any(|c| c == "cpuset");
    for pair in hierarchy.dirs.windows(2) {
        let [parent, dir] = pair else { continue };
        mkdir(dir)?;
        if cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if read(&dir.join(file))?.is_empty() {
                    let value = read(&parent.join(file))?;
                    if value.is_empty() {
                        return Err(Error::InheritFromParent {
                            path: parent.clone(),
                            file: file.to_string(),
                        });
                    }
                    write(&dir.join(file), &value)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mounts of a host with both versions, as this project's test hosts have them.
    const HYBRID: &str = "\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,xattr,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    fn setting(arg: &str) -> CgroupSetting {
        CgroupSetting::parse(arg).unwrap()
    }

    #[test]
    fn a_setting_splits_into_controller_file_and_value() {
        assert_eq!(
            setting("cpu.max=50000 100000"),
            CgroupSetting {
                controller: "cpu".into(),
                file: "cpu.max".into(),
                value: "50000 100000".into(),
            }
        );
        assert_eq!(setting("hugetlb.2MB.max=0").controller, "hugetlb");
        assert_eq!(setting("cpuset.cpus=0-1,3").value, "0-1,3");
        assert_eq!(setting("a.b=c=d").value, "c=d");
    }

    #[test]
    fn mounts_parse_with_their_escapes() {
        let mounts = parse_mounts("a /mnt/with\\040space cgroup rw,memory 0 0\nshort line\n");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, Path::new("/mnt/with space"));
        assert_eq!(mounts[0].options, ["rw", "memory"]);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\01"), "trailing\\01");
    }

    #[test]
    fn the_v2_hierarchy_is_the_cgroup2_mount() {
        let mounts = parse_mounts(HYBRID);
        assert_eq!(v2_mount(&mounts), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(v2_mount(&parse_mounts("x / ext4 rw 0 0")), None);
    }

    #[test]
    fn a_v1_hierarchy_is_the_cgroup_mount_listing_the_controller() {
        let mounts = parse_mounts(HYBRID);
        let cpu = Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(v1_mount(&mounts, "cpu"), cpu);
        assert_eq!(v1_mount(&mounts, "cpuacct"), cpu);
        assert_eq!(
            v1_mount(&mounts, "memory"),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(v1_mount(&mounts, "pids"), None);
        assert_eq!(v1_mount(&mounts, "systemd"), None);
    }

    #[test]
    fn no_setting_plans_no_cgroup() {
        let plans = plan(CgroupVersion::V1, &[], Path::new("p"), "id", &[]).unwrap();
        assert!(plans.is_empty());
    }

    #[test]
    fn a_v2_plan_enables_controllers_from_the_mount_down() {
        let mounts = parse_mounts(HYBRID);
        let settings = [
            setting("memory.max=1000"),
            setting("pids.max=10"),
            setting("memory.high=900"),
        ];
        let plans = plan(
            CgroupVersion::V2,
            &mounts,
            Path::new("ember/vms"),
            "vm-1",
            &settings,
        )
        .unwrap();
        assert_eq!(plans.len(), 1);
        let plan = &plans[0];
        let root = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(plan.controllers, ["memory", "pids"]);
        assert_eq!(
            plan.dirs,
            [
                root.to_path_buf(),
                root.join("ember"),
                root.join("ember/vms"),
                root.join("ember/vms/vm-1"),
            ]
        );
        assert_eq!(plan.leaf(), root.join("ember/vms/vm-1"));
        assert_eq!(plan.procs_file, root.join("ember/vms/vm-1/cgroup.procs"));
        assert_eq!(
            plan.writes,
            [
                (root.join("ember/vms/vm-1/memory.max"), "1000".to_string()),
                (root.join("ember/vms/vm-1/pids.max"), "10".to_string()),
                (root.join("ember/vms/vm-1/memory.high"), "900".to_string()),
            ]
        );
    }

    #[test]
    fn a_v1_plan_has_one_cgroup_per_hierarchy() {
        let mounts = parse_mounts(HYBRID);
        let settings = [
            setting("cpu.shares=10"),
            setting("memory.limit_in_bytes=1000"),
            setting("cpuacct.usage=0"),
        ];
        let plans = plan(
            CgroupVersion::V1,
            &mounts,
            Path::new("ember"),
            "vm-1",
            &settings,
        )
        .unwrap();
        assert_eq!(plans.len(), 2);
        let cpu = Path::new("/sys/fs/cgroup/cpu,cpuacct");
        assert_eq!(plans[0].mount, cpu);
        assert_eq!(plans[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(plans[0].procs_file, cpu.join("ember/vm-1/tasks"));
        assert_eq!(plans[0].writes.len(), 2);
        let memory = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(
            plans[1].dirs,
            [
                memory.into(),
                memory.join("ember"),
                memory.join("ember/vm-1")
            ]
        );
        assert_eq!(
            plans[1].writes,
            [(
                memory.join("ember/vm-1/memory.limit_in_bytes"),
                "1000".to_string()
            )]
        );
    }

    #[test]
    fn a_controller_without_a_hierarchy_is_an_error() {
        let mounts = parse_mounts(HYBRID);
        let err = plan(
            CgroupVersion::V1,
            &mounts,
            Path::new("p"),
            "id",
            &[setting("pids.max=1")],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Hierarchy not found: pids");
        let v1_only = parse_mounts("cgroup /c/memory cgroup rw,memory 0 0");
        let err = plan(
            CgroupVersion::V2,
            &v1_only,
            Path::new("p"),
            "id",
            &[setting("memory.max=1")],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Hierarchy not found: cgroup2");
    }
}
