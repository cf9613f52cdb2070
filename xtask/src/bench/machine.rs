//! What the machine is doing around a timed window (Linux `/proc`), as the peers' harness
//! accounts it: the quiet gate before a window (wait until the whole machine uses less than a
//! given number of cores), and the cores used during the window by the benchmark's own processes
//! (this process and the `faultline` processes it started), by PostgreSQL (its background
//! processes and the backends of the benchmark's database), and by everything else ("other":
//! builds, tests and the backends of other databases on the shared server), plus the load average.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc` CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Who a process's CPU time is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Bench,
    Postgres,
    Other,
}

/// CPU counters at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    at: Instant,
    /// user + nice + system ticks of the whole machine.
    busy: u64,
    /// Ticks of each process charged to the benchmark or to PostgreSQL.
    ticks: HashMap<u32, (Owner, u64)>,
}

/// Cores used during a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Cores {
    /// This process and the `faultline` processes it started.
    pub(crate) bench: f64,
    /// PostgreSQL's background processes and the backends of the benchmark's database.
    pub(crate) postgres: f64,
    /// Everything else.
    pub(crate) other: f64,
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The one-, five- and fifteen-minute load averages.
pub(crate) fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap_or(f64::NAN));
    [(); 3].map(|()| fields.next().unwrap_or(f64::NAN))
}

fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let first = text.lines().next().unwrap_or_default();
    // cpu user nice system idle ...: time charged to processes (irq time is charged to none).
    first
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum()
}

/// utime + stime of `pid`, from `/proc/<pid>/stat`.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Whether a PostgreSQL process title belongs to the benchmark: a background process (no client
/// address in its title) or a backend of `database`.
fn postgres_title_is_ours(title: &str, database: &str) -> bool {
    let is_backend = title.contains('(') || title.contains("[local]");
    !is_backend || title.split_whitespace().any(|word| word == database)
}

/// What the benchmark's processes are: this process, its children, and PostgreSQL's processes
/// that serve `database` (or the whole server).
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub(crate) database: String,
    pub(crate) children: Vec<u32>,
}

impl Scope {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut bench: HashSet<u32> = self.children.iter().copied().collect();
        bench.insert(std::process::id());
        let mut ticks = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let owner = if bench.contains(&pid) {
                    Owner::Bench
                } else {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.trim() != "postgres" {
                        continue;
                    }
                    let title = std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                        .unwrap_or_default();
                    if postgres_title_is_ours(&title, &self.database) {
                        Owner::Postgres
                    } else {
                        Owner::Other
                    }
                };
                if owner != Owner::Other
                    && let Some(t) = process_ticks(pid)
                {
                    ticks.insert(pid, (owner, t));
                }
            }
        }
        Snapshot {
            at: Instant::now(),
            busy: machine_busy_ticks(),
            ticks,
        }
    }
}

/// Cores used between two snapshots.
pub(crate) fn cores_between(a: &Snapshot, b: &Snapshot) -> Cores {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let cores = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / secs;
    let (mut bench, mut postgres) = (0, 0);
    for (pid, (owner, end)) in &b.ticks {
        let start = a.ticks.get(pid).map_or(0, |(_, t)| *t);
        let used = end.saturating_sub(start);
        match owner {
            Owner::Bench => bench += used,
            Owner::Postgres => postgres += used,
            Owner::Other => {}
        }
    }
    let busy = cores(b.busy.saturating_sub(a.busy));
    let (bench, postgres) = (cores(bench), cores(postgres));
    Cores {
        bench,
        postgres,
        other: (busy - bench - postgres).max(0.0),
    }
}

/// Waits (up to `max_wait`) until the machine uses less than `quiet_cores` over a one-second
/// sample. Returns how long it waited and whether the machine was quiet in the end.
pub(crate) async fn wait_quiet(what: &str, quiet_cores: f64, max_wait: Duration) -> (f64, bool) {
    let started = Instant::now();
    let mut told = Instant::now() - Duration::from_secs(60);
    loop {
        let a = (Instant::now(), machine_busy_ticks());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = (Instant::now(), machine_busy_ticks());
        let busy = b.1.saturating_sub(a.1) as f64
            / TICKS_PER_SECOND
            / b.0.duration_since(a.0).as_secs_f64();
        let waited = started.elapsed();
        if busy < quiet_cores {
            return (waited.as_secs_f64(), true);
        }
        if waited > max_wait {
            eprintln!(
                "bench: WARNING {what}: machine still busy ({busy:.2} cores) after {max_wait:?}; \
                 measuring anyway"
            );
            return (waited.as_secs_f64(), false);
        }
        if told.elapsed() > Duration::from_secs(30) {
            told = Instant::now();
            eprintln!(
                "bench:   {what}: waiting for a quiet machine (busy {busy:.2} cores, load {:?})",
                load_average()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_are_utime_plus_stime_after_the_command_name() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    150 25 0 0 20 0 3 0 12345 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(175));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn postgres_titles_are_ours_for_background_processes_and_our_database() {
        let ours = "fbench_w2_1";
        assert!(postgres_title_is_ours(
            "postgres: 15/main: walwriter ",
            ours
        ));
        assert!(postgres_title_is_ours(
            "postgres: 15/main: postgres fbench_w2_1 127.0.0.1(40000) idle",
            ours
        ));
        assert!(!postgres_title_is_ours(
            "postgres: 15/main: postgres faultline_test_1_2 127.0.0.1(40001) UPDATE",
            ours
        ));
        assert!(!postgres_title_is_ours(
            "postgres: postgres other [local] idle",
            ours
        ));
    }

    #[test]
    fn cores_split_into_bench_postgres_and_other() {
        let start = Instant::now();
        let a = Snapshot {
            at: start,
            busy: 1_000,
            ticks: HashMap::from([(1, (Owner::Bench, 10)), (2, (Owner::Postgres, 50))]),
        };
        let b = Snapshot {
            at: start + Duration::from_secs(2),
            busy: 1_300,
            // pid 3 appeared during the window: all its time counts.
            ticks: HashMap::from([
                (1, (Owner::Bench, 110)),
                (2, (Owner::Postgres, 150)),
                (3, (Owner::Postgres, 20)),
            ]),
        };
        let cores = cores_between(&a, &b);
        assert_eq!(cores.bench, 0.5);
        assert_eq!(cores.postgres, 0.6);
        assert!((cores.other - 0.4).abs() < 1e-9, "{cores:?}");
    }
}
