//! Small OS helpers shared by the throwaway servers: free ports, a temporary
//! directory removed on drop, and process inspection through `/proc`.

use std::{
    fs, io,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

/// A port nobody listens on right now, for a server a test starts.
///
/// Taken below the kernel's ephemeral range, so no outgoing connection of
/// any process can be given it between this check and the server's bind
/// (the kernel's own choice, `bind(0)`, comes from that very range), and
/// from a counter, so two tests of this process never get the same one.
/// A port some other server holds is skipped.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let (low, high) = below_ephemeral_range();
    let span = u32::from(high - low);
    let next = NEXT.get_or_init(|| AtomicU32::new(rand::random::<u32>() % span));
    for _ in 0..span {
        let port = low
            + u16::try_from(next.fetch_add(1, Ordering::Relaxed) % span)
                .unwrap_or_else(|_| unreachable!("the offset is below a u16 span"));
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}")
}

/// Ports from 10000 up to where the kernel's ephemeral ports begin.
fn below_ephemeral_range() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&start| start > LOW + 1_000)
        .unwrap_or(32_768);
    (LOW, start)
}

/// `<prefix>-<12 hex>`: unique enough for node names and directories.
pub fn unique_name(prefix: &str) -> String {
    let id = rand::random::<u64>() & 0xffff_ffff_ffff;
    format!("{prefix}-{id:012x}")
}

/// A directory under the system temp dir, removed (with its content) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates it and records this process as its owner (see [`sweep_orphans`]).
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let dir = TempDir { path };
        let me = std::process::id();
        let owner = format!("{me} {}\n", start_time(me).unwrap_or_default());
        fs::write(dir.join(OWNER_FILE), owner)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", dir.join(OWNER_FILE).display()));
        dir
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, part: &str) -> PathBuf {
        self.path.join(part)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("cannot remove {}: {e}", self.path.display());
        }
    }
}

const OWNER_FILE: &str = "owner";

/// Cleans up after test processes that died without running destructors
/// (SIGKILL, Ctrl-C, a CI timeout): for every directory in the temp dir whose
/// name `is_ours` accepts and whose recorded owner process is gone, runs
/// `stop` (which must kill only processes proven to belong to that
/// directory), then removes the directory. Directories of live test
/// processes, and directories without an owner file, are left alone.
pub fn sweep_orphans(is_ours: fn(&str) -> bool, stop: fn(&Path)) {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_ours) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let mut fields = owner.split_whitespace();
        let (Some(pid), Some(started)) = (
            fields.next().and_then(|p| p.parse::<u32>().ok()),
            fields.next().and_then(|t| t.parse::<u64>().ok()),
        ) else {
            continue;
        };
        // Same pid and same start time: the owner still runs (pids get reused).
        if is_running(pid) && start_time(pid) == Some(started) {
            continue;
        }
        eprintln!("removing {} left by dead test process {pid}", dir.display());
        stop(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat` field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // The fields after comm start with field 3 (state); starttime is field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid`'s environment holds `KEY=value` exactly.
pub fn has_env(pid: u32, key: &str, value: &str) -> bool {
    let wanted = format!("{key}={value}");
    fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
        environ
            .split(|&b| b == 0)
            .any(|entry| entry == wanted.as_bytes())
    })
}

/// Whether `pid`'s command line has `arg` as one of its arguments.
pub fn has_arg(pid: u32, arg: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
}

/// The pid on the first line of a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let _ = signal::kill(Pid::from_raw(raw), signal);
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), `None` if gone.
fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().next()?.chars().next()
}

/// Running (or stopped), not gone and not a zombie waiting to be reaped.
pub fn is_running(pid: u32) -> bool {
    !matches!(state(pid), None | Some('Z' | 'X'))
}

/// The command name (`/proc/<pid>/comm`), e.g. `beam.smp`.
pub fn command_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

/// Direct children of `pid` that are still running.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| parent(candidate) == Some(pid) && is_running(candidate))
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// One look at `pids`: `Some(true)` once none runs, `Some(false)` once
/// `deadline` has passed, `None` to look again.
fn gone_by(pids: &[u32], deadline: Instant) -> Option<bool> {
    if pids.iter().all(|&pid| !is_running(pid)) {
        Some(true)
    } else if Instant::now() >= deadline {
        Some(false)
    } else {
        None
    }
}

/// Waits (blocking) until none of `pids` runs any more; `false` on timeout.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(gone) = gone_by(pids, deadline) {
            return gone;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Async twin of [`wait_gone`].
pub async fn wait_gone_async(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(gone) = gone_by(pids, deadline) {
            return gone;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `path` opened for appending (created if missing): a child's log file.
pub fn append_log(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// The exit status of the child in `slot` if it has exited, emptying the slot.
pub fn exited(slot: &mut Option<Child>) -> Option<ExitStatus> {
    let status = slot.as_mut()?.try_wait().ok()??;
    *slot = None;
    Some(status)
}

/// One look at a child being reaped: whether it is gone, SIGKILLing it once
/// `deadline` has passed.
fn reaped(child: &mut Child, deadline: Instant) -> bool {
    match child.try_wait() {
        Ok(Some(_)) | Err(_) => true,
        Ok(None) if Instant::now() >= deadline => {
            let _ = child.kill();
            let _ = child.wait();
            true
        }
        Ok(None) => false,
    }
}

/// Waits (blocking) for our child to exit and reaps it; SIGKILLs it after `grace`.
pub fn reap(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while !reaped(child, deadline) {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Async twin of [`reap`]: polls without blocking the runtime.
pub async fn reap_async(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while !reaped(child, deadline) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub async fn accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() {
        let (low, high) = below_ephemeral_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port came twice: {ports:?}");
        for port in ports {
            assert!((low..high).contains(&port), "{port} not in {low}..{high}");
            TcpListener::bind(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("port {port} was handed out but is taken: {e}"));
        }
    }
}
