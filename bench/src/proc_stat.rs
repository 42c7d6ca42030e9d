//! CPU time from `/proc`. Preferred: the scheduler's run time in nanoseconds
//! (`/proc/PID/task/TID/schedstat`, first field), summed over a process's
//! threads; the classic `utime + stime` of `/proc/PID/stat` counts in clock
//! ticks (USER_HZ, 100 per second), too coarse for the few milliseconds a
//! receiver spends per 1,000 connections. `utime + stime` is the fallback
//! where `schedstat` is missing. (Summing threads misses threads that end
//! between two readings; the collector's and the sink's threads live as
//! long as they do.)

use std::time::Duration;

use anyhow::Context;

const USER_HZ: u64 = 100;

/// `utime + stime` from a `/proc/.../stat` file.
pub fn stat_cpu_time(stat_path: &str) -> anyhow::Result<Duration> {
    let stat =
        std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    parse_cpu_time(&stat).with_context(|| format!("unexpected {stat_path}: {stat}"))
}

/// The run time from a `/proc/.../schedstat` file.
fn schedstat_time(path: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(Duration::from_nanos(
        text.split_whitespace().next()?.parse().ok()?,
    ))
}

/// CPU time used so far by process `pid`, all its threads together.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    let summed = tasks.ok().map(|tasks| {
        tasks
            .filter_map(Result::ok)
            .filter_map(|task| schedstat_time(&format!("{}/schedstat", task.path().display())))
            .sum::<Duration>()
    });
    match summed {
        Some(time) if time > Duration::ZERO => Ok(time),
        _ => stat_cpu_time(&format!("/proc/{pid}/stat")),
    }
}

/// CPU time used so far by thread `tid` of this process.
pub fn thread_cpu(tid: u32) -> anyhow::Result<Duration> {
    match schedstat_time(&format!("/proc/self/task/{tid}/schedstat")) {
        Some(time) if time > Duration::ZERO => Ok(time),
        _ => stat_cpu_time(&format!("/proc/self/task/{tid}/stat")),
    }
}

fn parse_cpu_time(stat: &str) -> Option<Duration> {
    // The command name (field 2) may hold spaces; the fields after its `)` are
    // numbered from 3 (state), so utime (14) and stime (15) are the 12th and 13th.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

/// A memory figure in KiB from `/proc/PID/status`, by its name: `VmRSS`
/// (resident now), `VmHWM` (the peak resident size so far).
pub fn status_kib(pid: u32, name: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {name} in {path}"))
}

/// Resets `VmHWM` of process `pid` to its current `VmRSS` (`5` to
/// `/proc/PID/clear_refs`, Linux 4.0+), so that the next peak read is the
/// peak since now.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

/// The calling thread's id, from the `/proc/thread-self` link (`PID/task/TID`).
pub fn current_thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn reads_utime_and_stime() {
        let stat =
            "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 12 3 0 0 20 0 1 0 100 0 0";
        assert_eq!(
            super::parse_cpu_time(stat),
            Some(Duration::from_millis(150))
        );
    }

    #[test]
    fn reads_this_process_and_thread() {
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(super::process_cpu(std::process::id()).is_ok());
        let rss = super::status_kib(std::process::id(), "VmRSS");
        assert!(rss.is_ok_and(|kib| kib > 0));
        assert!(super::status_kib(std::process::id(), "NoSuchField").is_err());
        let tid = super::current_thread_id();
        assert!(tid.is_some_and(|tid| super::thread_cpu(tid).is_ok()));
    }
}
