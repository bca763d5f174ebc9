//! The machine and the versions a run happened on, for the report's header.

use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
    pub rabbitmq: String,
    pub postgres: String,
    pub rustc: String,
    pub commit: String,
    pub load_before: String,
    pub load_after: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn command(program: &str, args: &[&str], dir: &Path) -> Option<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Machine {
    /// Everything but the broker's and the database's versions, which the
    /// caller asks the services for.
    pub fn here(repo: &Path) -> Self {
        let memory = read("/proc/meminfo")
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".to_owned());
        let commit = command("git", &["rev-parse", "--short", "HEAD"], repo)
            .map(|hash| {
                let dirty = command(
                    "git",
                    &["status", "--porcelain", "--untracked-files=no"],
                    repo,
                )
                .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{hash} (with uncommitted changes)")
                } else {
                    hash
                }
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory,
            kernel: read("/proc/sys/kernel/osrelease"),
            rustc: command("rustc", &["--version"], repo).unwrap_or_else(|| "unknown".to_owned()),
            commit,
            load_before: load_average(),
            ..Self::default()
        }
    }
}
