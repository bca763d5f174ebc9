//! What the processes of a run cost, read from Linux's `/proc`: CPU time
//! (`/proc/<pid>/stat`), resident memory now and at its peak
//! (`/proc/<pid>/status`: `VmRSS`, `VmHWM`), and a [`Monitor`] that samples
//! named groups of processes while a phase runs.

use std::{collections::HashMap, time::Duration};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::store;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which is
/// 100 on every Linux architecture we run on.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) a process has used so far, in ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), so offsets 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A `VmXxx:` line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: i32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory now, KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory since the process started, KiB.
pub fn peak_rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// `pid` and every process below it.
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut parents: HashMap<i32, i32> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok())
                && let Some(parent) = parent_of(child)
            {
                parents.insert(child, parent);
            }
        }
    }
    let mut tree = vec![pid];
    let mut grew = true;
    while grew {
        grew = false;
        for (child, parent) in &parents {
            if tree.contains(parent) && !tree.contains(child) {
                tree.push(*child);
                grew = true;
            }
        }
    }
    tree
}

/// Processes measured together under one label.
#[derive(Debug, Clone)]
pub enum Group {
    /// One process, or with `tree` also everything it started.
    Process { label: String, pid: i32, tree: bool },
    /// The PostgreSQL backends serving one database (found through
    /// `pg_stat_activity`, read from the `postgres` database so the reading
    /// itself does not show in the measured database's counters).
    Postgres { label: String, database: String },
}

impl Group {
    pub fn label(&self) -> &str {
        match self {
            Self::Process { label, .. } | Self::Postgres { label, .. } => label,
        }
    }
}

/// What one group cost during a monitored phase.
#[derive(Debug, Clone, Default)]
pub struct GroupCost {
    pub label: String,
    pub cpu_seconds: f64,
    /// Peak resident memory: `VmHWM` of a single process (since it started),
    /// or the largest sampled sum of `VmRSS` of a tree.
    pub peak_rss_kib: u64,
    /// `(seconds since the start, resident KiB)`, one per sample.
    pub rss_samples: Vec<(f64, u64)>,
}

#[derive(Default)]
struct Tracked {
    /// CPU ticks at first sight; processes born during the phase start at 0.
    first: HashMap<i32, u64>,
    last: HashMap<i32, u64>,
    peak_kib: u64,
    rss: Vec<(f64, u64)>,
}

/// Samples groups every `interval` until [`Monitor::finish`].
pub struct Monitor {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<GroupCost>>,
}

impl Monitor {
    /// Starts sampling now. `admin_url` is a connection URL of the
    /// `postgres` database (for `Group::Postgres`).
    pub async fn start(groups: Vec<Group>, admin_url: String, interval: Duration) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let started = Instant::now();
        let mut admin = store::connect(&admin_url).await.ok();
        let mut tracked: Vec<Tracked> = groups.iter().map(|_| Tracked::default()).collect();
        // The first sample is taken before `start` returns, so the baseline
        // precedes the work it measures.
        sample(&groups, &mut tracked, &mut admin, started, true).await;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                sample(&groups, &mut tracked, &mut admin, started, false).await;
            }
            sample(&groups, &mut tracked, &mut admin, started, false).await;
            groups
                .iter()
                .zip(tracked)
                .map(|(group, t)| GroupCost {
                    label: group.label().to_owned(),
                    cpu_seconds: t
                        .last
                        .iter()
                        .map(|(pid, last)| last.saturating_sub(*t.first.get(pid).unwrap_or(&0)))
                        .sum::<u64>() as f64
                        / TICKS_PER_SECOND,
                    peak_rss_kib: t.peak_kib,
                    rss_samples: t.rss,
                })
                .collect()
        });
        Self { stop, task }
    }

    /// Takes a last sample and returns each group's cost, in the order given.
    pub async fn finish(self) -> Vec<GroupCost> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

async fn sample(
    groups: &[Group],
    tracked: &mut [Tracked],
    admin: &mut Option<diesel_async::AsyncPgConnection>,
    started: Instant,
    baseline: bool,
) {
    let at = started.elapsed().as_secs_f64();
    for (group, t) in groups.iter().zip(tracked.iter_mut()) {
        let (pids, single) = match group {
            Group::Process { pid, tree, .. } => {
                if *tree {
                    (process_tree(*pid), false)
                } else {
                    (vec![*pid], true)
                }
            }
            Group::Postgres { database, .. } => match admin.as_mut() {
                Some(conn) => (
                    store::metrics::backend_pids(conn, database)
                        .await
                        .unwrap_or_default(),
                    false,
                ),
                None => (Vec::new(), false),
            },
        };
        let mut rss_sum = 0;
        for pid in &pids {
            let Some(ticks) = cpu_ticks(*pid) else {
                continue;
            };
            if baseline {
                t.first.insert(*pid, ticks);
            }
            t.last.insert(*pid, ticks);
            rss_sum += rss_kib(*pid).unwrap_or(0);
        }
        t.rss.push((at, rss_sum));
        let peak = if single {
            pids.first().and_then(|pid| peak_rss_kib(*pid)).unwrap_or(0)
        } else {
            rss_sum
        };
        t.peak_kib = t.peak_kib.max(peak);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_memory_and_is_its_own_tree() {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).unwrap_or(0) > 0);
        // The current size first: the peak read after it can only be as
        // large (other test threads grow this process in between).
        let now = rss_kib(me).unwrap_or(0);
        assert!(peak_rss_kib(me).unwrap_or(0) >= now);
        assert_eq!(process_tree(me)[0], me);
    }
}
