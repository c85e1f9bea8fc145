//! The metrics of a microVM: counters of its vCPUs and devices, its boot time and its API,
//! written as JSON lines to the metrics path (Firecracker's format) and served as Prometheus
//! text on `GET /metrics`.
//!
//! A [`Snapshot`] is what the counters read at one moment, in groups: `vcpu`, `vmm`,
//! `api_server`, and one group per device, `block_{drive_id}` and `net_{iface_id}`, with the
//! sums of each kind of device in `block` and `net`. Counters only grow; gauges (boot times)
//! are what they are.
//!
//! - **JSON lines** ([`MetricsWriter`]): as in Firecracker, each line holds
//!   `utc_timestamp_ms` and every group, and a counter's value is how much it grew since the
//!   previous line, so lines add up; gauges are written as they are. A line is written on
//!   `FlushMetrics`, every [`FLUSH_INTERVAL`] while the VM runs, and when the VMM exits.
//! - **Prometheus** ([`prometheus`]): counters as they are (`ember_block_read_bytes{drive=
//!   "rootfs"} 4096`), for a scraper that computes rates itself.
//!
//! The metrics file is opened like the log's ([`logger::open_sink`]): non-blocking, and a named
//! pipe must have a reader. A line is written with one `write`; when the pipe's reader does not
//! keep up, the line is dropped and counted (`logger.missed_metrics_count`, Firecracker's name),
//! the counters' growth it held goes into the next line, and the VMM thread never waits.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::logger;

/// How often the metrics are written while the VM runs, as in Firecracker.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Whether a value only grows or is a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows: written to JSON as the growth since the previous line.
    Counter,
    /// A reading, written as it is.
    Gauge,
}

/// One group of values: the VM's vCPUs, or one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// `vcpu`, `vmm`, `api_server`, `block` or `net`.
    pub kind: &'static str,
    /// The device's ID, for a device.
    pub device: Option<String>,
    /// The values, by name.
    pub values: Vec<(&'static str, Kind, u64)>,
}

impl Group {
    /// A group of counters.
    pub fn counters(
        kind: &'static str,
        device: Option<String>,
        values: impl IntoIterator<Item = (&'static str, u64)>,
    ) -> Self {
        Group {
            kind,
            device,
            values: values
                .into_iter()
                .map(|(name, value)| (name, Kind::Counter, value))
                .collect(),
        }
    }

    /// The key of the group in a JSON line: `kind` or `kind_device`.
    fn key(&self) -> String {
        match &self.device {
            Some(device) => format!("{}_{device}", self.kind),
            None => self.kind.to_string(),
        }
    }
}

/// The values of every group at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The groups, in the order they are written.
    pub groups: Vec<Group>,
}

impl Snapshot {
    /// Adds a group.
    pub fn push(&mut self, group: Group) {
        self.groups.push(group);
    }

    /// The groups with, after the devices of each kind, a group of that kind without a device
    /// holding their sums (`block`, `net`): Firecracker's aggregate groups.
    fn with_aggregates(&self) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::with_capacity(self.groups.len().saturating_add(2));
        for group in &self.groups {
            if group.device.is_some() {
                match groups
                    .iter_mut()
                    .find(|g| g.kind == group.kind && g.device.is_none())
                {
                    Some(total) => {
                        for (slot, (_, _, value)) in total.values.iter_mut().zip(&group.values) {
                            slot.2 = slot.2.saturating_add(*value);
                        }
                    }
                    None => groups.push(Group {
                        kind: group.kind,
                        device: None,
                        values: group.values.clone(),
                    }),
                }
            }
            groups.push(group.clone());
        }
        groups
    }
}

/// Writes JSON lines of metrics to a file or named pipe, each counter as its growth since the
/// line before.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    /// What each counter read at the previous line, by group key and name.
    last: HashMap<(String, &'static str), u64>,
    /// The sink took only part of the last line: the next one starts with a newline.
    cut: bool,
    stats: MetricsWriterStats,
}

/// Counters of a [`MetricsWriter`], with Firecracker's names (its `logger` group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsWriterStats {
    /// Lines dropped, whole or in part, because the sink did not take them at once (a pipe
    /// whose reader does not keep up).
    pub missed_metrics_count: u64,
    /// Lines the sink failed to take for another reason.
    pub metrics_fails: u64,
}

impl MetricsWriter {
    /// Opens `path` for appending, non-blocking ([`logger::open_sink`]).
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or created, or is a named pipe nobody reads.
    pub fn open(path: &Path) -> logger::Result<Self> {
        Ok(MetricsWriter {
            file: logger::open_sink("metrics file", path)?,
            last: HashMap::new(),
            cut: false,
            stats: MetricsWriterStats::default(),
        })
    }

    /// The writer's counters.
    pub fn stats(&self) -> MetricsWriterStats {
        self.stats
    }

    /// Writes one line for `snapshot`, with one `write`. A line the sink does not take whole
    /// is dropped (what the sink took of it ends with the next line's newline), and the growth
    /// it held goes into the next line.
    ///
    /// # Errors
    ///
    /// When the line is dropped: the sink would block or took part of it
    /// ([`MetricsWriterStats::missed_metrics_count`]), or failed
    /// ([`MetricsWriterStats::metrics_fails`]).
    pub fn write(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        let last = self.last.clone();
        let mut line = self.line(snapshot, utc_timestamp_ms());
        if self.cut {
            line.insert(0, '\n');
        }
        let result = match self.file.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {
                self.cut = false;
                return Ok(());
            }
            Ok(n) => {
                self.cut = self.cut || n > 0;
                self.stats.missed_metrics_count = self.stats.missed_metrics_count.saturating_add(1);
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the metrics sink took part of the line; the rest was dropped",
                ))
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                self.stats.missed_metrics_count = self.stats.missed_metrics_count.saturating_add(1);
                Err(io::Error::new(
                    err.kind(),
                    "the reader of the metrics pipe does not keep up; the line was dropped",
                ))
            }
            Err(err) => {
                self.stats.metrics_fails = self.stats.metrics_fails.saturating_add(1);
                Err(err)
            }
        };
        // The growth of the dropped line is counted in the next one.
        self.last = last;
        result
    }

    /// The line for `snapshot` at `timestamp_ms`, remembering the counters for the next one.
    fn line(&mut self, snapshot: &Snapshot, timestamp_ms: u64) -> String {
        let mut root = serde_json::Map::new();
        root.insert("utc_timestamp_ms".into(), timestamp_ms.into());
        for group in snapshot.with_aggregates() {
            let key = group.key();
            let mut values = serde_json::Map::new();
            for (name, kind, value) in &group.values {
                let written = match kind {
                    Kind::Gauge => *value,
                    Kind::Counter => {
                        let last = self.last.insert((key.clone(), name), *value).unwrap_or(0);
                        value.saturating_sub(last)
                    }
                };
                values.insert((*name).into(), written.into());
            }
            root.insert(key, values.into());
        }
        let mut line = serde_json::Value::Object(root).to_string();
        line.push('\n');
        line
    }
}

fn utc_timestamp_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `snapshot` in Prometheus' text format (version 0.0.4): one family per value name of each
/// kind of group, `ember_{kind}_{name}`, with a `drive` or `iface` label for devices.
pub fn prometheus(snapshot: &Snapshot) -> String {
    // Families in the order first seen, each with its samples.
    let mut families: Vec<(String, Kind, Vec<String>)> = Vec::new();
    for group in &snapshot.groups {
        let label = match (&group.device, group.kind) {
            (Some(device), "net") => format!("{{iface=\"{}\"}}", escape_label(device)),
            (Some(device), _) => format!("{{drive=\"{}\"}}", escape_label(device)),
            (None, _) => String::new(),
        };
        for (name, kind, value) in &group.values {
            let family = format!("ember_{}_{name}", group.kind);
            let sample = format!("{family}{label} {value}");
            match families.iter_mut().find(|(f, _, _)| *f == family) {
                Some((_, _, samples)) => samples.push(sample),
                None => families.push((family, *kind, vec![sample])),
            }
        }
    }
    let mut text = String::new();
    for (family, kind, samples) in families {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(text, "# TYPE {family} {kind}");
        for sample in samples {
            let _ = writeln!(text, "{sample}");
        }
    }
    text
}

/// A label value with `\`, `"` and newlines escaped, as the text format asks.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(read_bytes: [u64; 2], boot_us: u64) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.push(Group::counters("vcpu", None, [("exit_io_out", 7)]));
        snapshot.push(Group {
            kind: "vmm",
            device: None,
            values: vec![("boot_time_us", Kind::Gauge, boot_us)],
        });
        for (id, bytes) in ["rootfs", "data"].into_iter().zip(read_bytes) {
            snapshot.push(Group::counters(
                "block",
                Some(id.into()),
                [("read_bytes", bytes), ("read_count", 1)],
            ));
        }
        snapshot
    }

    #[test]
    fn json_lines_hold_growth_aggregates_and_gauges() {
        let path = std::env::temp_dir().join(format!("ember-metrics-{}", std::process::id()));
        let mut writer = MetricsWriter::open(&path).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(&writer.line(&snapshot([100, 20], 5000), 1)).unwrap();
        assert_eq!(first["utc_timestamp_ms"], 1);
        assert_eq!(first["vcpu"]["exit_io_out"], 7);
        assert_eq!(first["vmm"]["boot_time_us"], 5000);
        assert_eq!(first["block_rootfs"]["read_bytes"], 100);
        assert_eq!(first["block_data"]["read_bytes"], 20);
        assert_eq!(first["block"]["read_bytes"], 120);
        assert_eq!(first["block"]["read_count"], 2);

        let second: serde_json::Value =
            serde_json::from_str(&writer.line(&snapshot([150, 20], 5000), 2)).unwrap();
        assert_eq!(second["vcpu"]["exit_io_out"], 0);
        assert_eq!(second["block_rootfs"]["read_bytes"], 50);
        assert_eq!(second["block_data"]["read_bytes"], 0);
        assert_eq!(second["block"]["read_bytes"], 50);
        // A gauge is not a difference.
        assert_eq!(second["vmm"]["boot_time_us"], 5000);

        writer.write(&snapshot([150, 20], 5000)).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.lines().count(), 1);
        assert!(written.ends_with('\n'));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_metrics_pipe_nobody_reads_drops_lines_and_their_growth_goes_to_the_next() {
        use std::io::Read;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;

        let path = std::env::temp_dir().join(format!("ember-metrics-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let exits = |n| {
            let mut snapshot = Snapshot::default();
            snapshot.push(Group::counters("vcpu", None, [("exit_io_out", n)]));
            snapshot
        };
        let mut writer = MetricsWriter::open(&path).unwrap();
        writer.write(&exits(5)).unwrap();

        // Another writer fills the pipe.
        let mut filler = logger::open_sink("metrics file", &path).unwrap();
        while filler.write(&[b'\n'; 4096]).is_ok() {}
        let err = writer.write(&exits(8)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(
            writer.stats(),
            MetricsWriterStats {
                missed_metrics_count: 1,
                metrics_fails: 0
            }
        );

        let mut drained = Vec::new();
        let _ = reader.read_to_end(&mut drained);
        writer.write(&exits(10)).unwrap();
        let mut read = Vec::new();
        let _ = reader.read_to_end(&mut read);
        let line: serde_json::Value = serde_json::from_slice(&read).unwrap();
        // The growth since the last line written, the dropped one's included.
        assert_eq!(line["vcpu"]["exit_io_out"], 5);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn prometheus_text_has_one_family_per_value_with_device_labels() {
        let text = prometheus(&snapshot([100, 20], 5000));
        let expected = "\
# TYPE ember_vcpu_exit_io_out counter
ember_vcpu_exit_io_out 7
# TYPE ember_vmm_boot_time_us gauge
ember_vmm_boot_time_us 5000
# TYPE ember_block_read_bytes counter
ember_block_read_bytes{drive=\"rootfs\"} 100
ember_block_read_bytes{drive=\"data\"} 20
# TYPE ember_block_read_count counter
ember_block_read_count{drive=\"rootfs\"} 1
ember_block_read_count{drive=\"data\"} 1
";
        assert_eq!(text, expected);
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
