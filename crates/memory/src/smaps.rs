//! What the tests read of `/proc/self/smaps`.

use std::fs;

/// The value of `field` (such as `"Rss:"` or `"VmFlags:"`) of the mapping that holds host
/// address `host`.
///
/// # Panics
///
/// When no mapping holds `host`, or it has no such field.
pub(crate) fn mapping_field(host: usize, field: &str) -> String {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let range = line
            .split_once(' ')
            .and_then(|(range, _)| range.split_once('-'))
            .and_then(|(start, end)| {
                Some((
                    usize::from_str_radix(start, 16).ok()?,
                    usize::from_str_radix(end, 16).ok()?,
                ))
            });
        if let Some((start, end)) = range {
            inside = (start..end).contains(&host);
        } else if let Some(value) = line.strip_prefix(field).filter(|_| inside) {
            return value.trim().to_string();
        }
    }
    panic!("no mapping with {field} holds host address {host:#x}");
}
