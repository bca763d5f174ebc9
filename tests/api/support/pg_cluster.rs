//! A throwaway PostgreSQL 15 cluster that tests may stop, kill and restart:
//! its own data directory (in a temp dir owned by `postgres`), its own port
//! on 127.0.0.1, its unix socket inside the temp dir, and the role
//! `courier`/`courier-local-only` (LOGIN CREATEDB) with a database.
//!
//! Notes from building it (Debian 12, run as root):
//! - `initdb` and `postgres` refuse to run as root. They run as the `postgres`
//!   OS user through `setpriv` (which `exec`s, so the postmaster is our own
//!   child and we reap it at once; `runuser` forks and would stay in between).
//! - Commands run with the temp dir as working directory: the `postgres` user
//!   cannot read a root-owned working directory, and initdb fails on that.
//! - A killed postmaster leaves a stale `postmaster.pid`; PostgreSQL checks
//!   whether that PID still exists, so a zombie that is not reaped (pid 1 in
//!   this machine reaps orphans only after seconds) blocks the next start.
//!   Hence the postmaster is our child and `kill()` reaps it.
//! - Its children call `setsid`, so a process-group kill misses them: `kill()`
//!   finds them through `/proc` and SIGKILLs them too.
//! - A SIGKILLed cluster leaves its small SysV shared memory segment behind;
//!   the next start removes it, and `Drop` does (`ipcrm`) if there is none.
//! - Local (socket) connections are `trust` (the superuser `postgres` uses
//!   them for setup); TCP connections need the password (`scram-sha-256`).
//!   `fsync=off` and `full_page_writes=off` for speed are safe for our faults:
//!   a kill is a process crash, not a power cut, so the OS page cache keeps
//!   what was committed. `synchronous_commit` stays `on`: off, a kill loses
//!   commits the client already saw succeed (the test caught exactly that).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use nix::sys::signal::Signal;

use super::sys::{self, TempDir};

const BIN: &str = "/usr/lib/postgresql/15/bin";
pub const USER: &str = "courier";
pub const PASSWORD: &str = "courier-local-only";
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct PgCluster {
    port: u16,
    postmaster: Option<Child>,
    started_in: Duration,
    /// Declared last: removed after the cluster is dead.
    dir: TempDir,
}

impl PgCluster {
    /// A fresh cluster with the role `courier` and a database `courier`.
    pub async fn start() -> PgCluster {
        Self::start_with_database("courier").await
    }

    /// A fresh cluster with the role `courier` and a database `database`
    /// owned by it.
    pub async fn start_with_database(database: &str) -> PgCluster {
        let started = Instant::now();
        super::sweep_orphans();
        let dir = TempDir::new(&sys::unique_name(DIR_PREFIX));
        let mut cluster = PgCluster {
            port: sys::free_port(),
            postmaster: None,
            started_in: Duration::ZERO,
            dir,
        };
        if let Err(e) = cluster.init().await {
            panic!("initdb in {}: {e:#}", cluster.dir.path().display());
        }
        cluster.start_again().await;
        cluster
            .psql(&format!(
                "CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'"
            ))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        cluster.create_database(database).await;
        cluster.started_in = started.elapsed();
        eprintln!(
            "throwaway PostgreSQL on 127.0.0.1:{} ready in {:.1?} (initdb, start, role, database)",
            cluster.port, cluster.started_in
        );
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `postgres://courier:courier-local-only@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// How long `start_with_database` took in all.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The postmaster's pid while it runs.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.postmaster.is_some()
    }

    /// Creates a database owned by `courier`.
    pub async fn create_database(&self, name: &str) {
        self.psql(&format!(
            "CREATE DATABASE {} OWNER {USER}",
            quote_ident(name)
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Starts the postmaster again after [`stop`](Self::stop) or
    /// [`kill`](Self::kill) (same port, same data) and waits until it accepts
    /// connections; after a kill that includes crash recovery.
    pub async fn start_again(&mut self) {
        assert!(
            self.postmaster.is_none(),
            "PostgreSQL on port {} is already running",
            self.port
        );
        let log = self.dir.join("postgres.log");
        let data = self.dir.join("data");
        let sockets = self.dir.join("sockets");
        let postmaster = as_postgres(&format!("{BIN}/postgres"))
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", sockets.display()))
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=100"])
            .stdin(Stdio::null())
            .stdout(sys::append_log(&log))
            .stderr(sys::append_log(&log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}/postgres: {e}"));
        self.postmaster = Some(postmaster);
        self.wait_until_ready().await;
    }

    /// Fast shutdown (SIGINT: sessions are ended, then a checkpoint) and waits
    /// until the postmaster is gone.
    pub async fn stop(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            panic!("PostgreSQL on port {} is not running", self.port)
        };
        sys::signal(postmaster.id(), Signal::SIGINT);
        sys::reap_async(&mut postmaster, Duration::from_secs(30)).await;
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again): same port, same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// SIGKILLs the postmaster and every process it started (a crash of the
    /// whole server: nobody says goodbye, clients see their sockets close),
    /// and returns once all of them are gone. [`start_again`](Self::start_again) recovers.
    pub async fn kill(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            panic!("PostgreSQL on port {} is not running", self.port)
        };
        let pids = kill_tree(postmaster.id());
        sys::reap_async(&mut postmaster, Duration::from_secs(10)).await;
        assert!(
            sys::wait_gone_async(&pids, Duration::from_secs(10)).await,
            "PostgreSQL processes {pids:?} survived SIGKILL"
        );
    }

    /// Terminates every session connected to `db` (not the one asking) and
    /// waits until they are gone; returns how many it terminated.
    pub async fn terminate_backends(&self, db: &str) -> u64 {
        let out = self
            .psql(&format!(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) \
                 FROM pg_stat_activity \
                 WHERE datname = {} AND pid <> pg_backend_pid()",
                quote_literal(db)
            ))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("terminate_backends answered {out:?}: {e}"))
    }

    /// Runs SQL as the superuser `postgres` (over the unix socket) in the
    /// database `postgres`; the unaligned, tuples-only output on success.
    pub async fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_in("postgres", sql).await
    }

    /// Like [`psql`](Self::psql), in database `db`.
    pub async fn psql_in(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let mut command: tokio::process::Command = as_postgres(&format!("{BIN}/psql")).into();
        command
            .current_dir(self.dir.path())
            .arg("-h")
            .arg(self.dir.join("sockets"))
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .context("psql took over 60s")?
            .context("cannot run psql")?;
        anyhow::ensure!(
            output.status.success(),
            "psql {sql:?} on port {} failed ({}): {}",
            self.port,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    async fn init(&self) -> anyhow::Result<()> {
        fs::create_dir(self.dir.join("sockets"))?;
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(self.dir.path())
            .status()
            .context("cannot run chown")?;
        anyhow::ensure!(
            status.success(),
            "chown postgres {}",
            self.dir.path().display()
        );
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o700))?;
        let mut initdb: tokio::process::Command = as_postgres(&format!("{BIN}/initdb")).into();
        let output = initdb
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(self.dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run initdb")?;
        anyhow::ensure!(
            output.status.success(),
            "initdb failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// Waits until `postmaster.pid` says `ready` and a TCP connect succeeds.
    async fn wait_until_ready(&mut self) {
        let started = Instant::now();
        let pid_file = self.dir.join("data/postmaster.pid");
        loop {
            if let Some(status) = sys::exited(&mut self.postmaster) {
                panic!(
                    "PostgreSQL on port {} exited during start ({status}):\n{}",
                    self.port,
                    sys::tail(&self.dir.join("postgres.log"), 30)
                );
            }
            let ready = fs::read_to_string(&pid_file)
                .is_ok_and(|text| text.lines().nth(7).is_some_and(|s| s.trim() == "ready"));
            if ready && sys::accepts(self.port).await {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "PostgreSQL on port {} not ready within {START_TIMEOUT:?}:\n{}",
                self.port,
                sys::tail(&self.dir.join("postgres.log"), 30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut postmaster) = self.postmaster.take() {
            // Immediate shutdown: no checkpoint, but it cleans up after itself.
            sys::signal(postmaster.id(), Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(postmaster.try_wait(), Ok(Some(_)) | Err(_)) {
                if Instant::now() >= deadline {
                    let pids = kill_tree(postmaster.id());
                    sys::reap(&mut postmaster, Duration::from_secs(5));
                    sys::wait_gone(&pids, Duration::from_secs(5));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        remove_leftover_shared_memory(self.dir.path());
        // `dir` is dropped (removed) after this.
    }
}

/// The SysV segment of a cluster that did not shut down (its
/// `postmaster.pid` is still there): removed if no process uses it.
fn remove_leftover_shared_memory(dir: &Path) {
    let Ok(text) = fs::read_to_string(dir.join("data/postmaster.pid")) else {
        return;
    };
    // Line 7: "<key> <shmid>".
    let Some((key, shmid)) = text.lines().nth(6).and_then(|line| {
        let mut parts = line.split_whitespace();
        Some((parts.next()?.parse::<u64>().ok()?, parts.next()?.to_owned()))
    }) else {
        return;
    };
    // Only our segment: same id, same key, owned by postgres, unattached.
    let Ok(listing) = Command::new("ipcs").args(["-m"]).output() else {
        return;
    };
    let ours = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() >= 6
                && cols[0] == format!("{key:#010x}")
                && cols[1] == shmid
                && cols[2] == "postgres"
                && cols[5] == "0"
        });
    if ours {
        let _ = Command::new("ipcrm").args(["-m", &shmid]).status();
    }
}

const DIR_PREFIX: &str = "courier-pg";

pub(super) fn is_cluster_dir(name: &str) -> bool {
    name.starts_with("courier-pg-")
}

/// Kills the cluster of a directory whose test process died: the postmaster
/// from its pid file, only if it runs on this directory's data (`-D`).
pub(super) fn stop_orphan(dir: &Path) {
    let data = dir.join("data");
    if let Some(pid) = sys::read_pid(&data.join("postmaster.pid"))
        && sys::has_arg(pid, &data.display().to_string())
    {
        let pids = kill_tree(pid);
        sys::wait_gone(&pids, Duration::from_secs(10));
    }
    remove_leftover_shared_memory(dir);
}

/// A command run as the `postgres` OS user, `exec`ed in place (no parent in between).
fn as_postgres(program: &str) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--reset-env",
            "--",
        ])
        .arg(program);
    command
}

/// SIGKILLs `postmaster` and its children; returns their pids.
fn kill_tree(postmaster: u32) -> Vec<u32> {
    // Children first seen, then the postmaster (so it cannot start new ones
    // unseen), then the children again for any it started meanwhile.
    let mut pids = sys::children(postmaster);
    for &pid in &pids {
        sys::signal(pid, Signal::SIGKILL);
    }
    sys::signal(postmaster, Signal::SIGKILL);
    for pid in sys::children(postmaster) {
        sys::signal(pid, Signal::SIGKILL);
        pids.push(pid);
    }
    pids.push(postmaster);
    pids
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use diesel::{QueryableByName, sql_types::BigInt};
    use diesel_async::{AsyncPgConnection, RunQueryDsl};

    use super::*;

    const DB: &str = "courier_faults";

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    async fn connect(cluster: &PgCluster) -> AsyncPgConnection {
        courier::store::connect(&cluster.url(DB))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", cluster.url(DB)))
    }

    async fn rows(conn: &mut AsyncPgConnection) -> i64 {
        diesel::sql_query("SELECT count(*)::bigint AS n FROM survivors")
            .get_result::<Count>(conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .n
    }

    async fn add_row(conn: &mut AsyncPgConnection) {
        diesel::sql_query("INSERT INTO survivors DEFAULT VALUES")
            .execute(conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn a_throwaway_database_restarts_with_its_data() {
        let mut cluster = PgCluster::start_with_database(DB).await;
        assert_ne!(cluster.port(), 5432);

        // Our migrations run on it, as the courier role, with its password.
        let migrated = courier::store::run_migrations(&cluster.url(DB)).await;
        assert!(migrated.is_ok(), "migrations: {migrated:?}");
        let wrong = cluster.url(DB).replace(PASSWORD, "wrong");
        assert!(
            courier::store::connect(&wrong).await.is_err(),
            "a wrong password was accepted"
        );
        let mut conn = connect(&cluster).await;
        diesel::sql_query("CREATE TABLE survivors (id bigserial PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        add_row(&mut conn).await;

        // terminate_backends kills our session, and says so.
        assert_eq!(cluster.terminate_backends(DB).await, 1);
        let broken = diesel::sql_query("SELECT 1").execute(&mut conn).await;
        assert!(broken.is_err(), "a terminated session still answered");

        // A fast restart keeps the data.
        cluster.restart().await;
        let mut conn = connect(&cluster).await;
        assert_eq!(rows(&mut conn).await, 1);
        add_row(&mut conn).await;

        // A SIGKILL of the whole server, then crash recovery keeps committed data.
        let postmaster = cluster
            .postmaster_pid()
            .unwrap_or_else(|| panic!("not running"));
        cluster.kill().await;
        assert!(!sys::is_running(postmaster), "postmaster survived kill()");
        assert!(!sys::accepts(cluster.port()).await);
        let broken = diesel::sql_query("SELECT 1").execute(&mut conn).await;
        assert!(broken.is_err(), "a session survived the kill");
        cluster.start_again().await;
        let mut conn = connect(&cluster).await;
        assert_eq!(rows(&mut conn).await, 2);

        // Drop after a kill, too, leaves no process, no directory, no segment.
        let postmaster = cluster
            .postmaster_pid()
            .unwrap_or_else(|| panic!("not running"));
        cluster.kill().await;
        let dir = cluster.dir();
        drop(cluster);
        assert!(!sys::is_running(postmaster));
        assert!(!dir.exists(), "{} survived drop", dir.display());
    }
}
