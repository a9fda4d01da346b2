//! CPU time a process has used, read from `/proc/<pid>/stat`: what a run cost the
//! server under test and the load generator, per acknowledged record.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`USER_HZ`, 100 on every
/// Linux architecture keel builds for).
const USER_HZ: u64 = 100;

/// User plus system CPU time of every thread of process `pid`, or `None` where
/// `/proc` cannot tell (not Linux, or no such process).
pub(crate) fn used(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Fields 14 and 15 (utime, stime) of a `stat` line. The command name (field 2) is
/// in parentheses and may hold spaces, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 1000 / USER_HZ))
}

/// CPU time of a process between two readings.
pub(crate) struct Meter {
    pid: u32,
    start: Option<Duration>,
}

impl Meter {
    pub(crate) fn start(pid: u32) -> Self {
        Self {
            pid,
            start: used(pid),
        }
    }

    /// Microseconds of CPU per record since [`Meter::start`].
    pub(crate) fn per_record_us(&self, records: u64) -> Option<f64> {
        let spent = used(self.pid)?.checked_sub(self.start?)?;
        (records > 0).then(|| spent.as_secs_f64() * 1e6 / records as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_read_after_the_command_name() {
        let line = "4242 (keel (log) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat(line), Some(Duration::from_millis(3250)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let meter = Meter::start(std::process::id());
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(meter.per_record_us(1).is_some());
        assert!(used(std::process::id()).is_some());
    }
}
