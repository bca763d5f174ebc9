//! A throwaway RabbitMQ node that tests may kill and restart: its own node
//! name (`courier-<random>@localhost`), its own AMQP, distribution and
//! management ports (the management plugin applies courier's policies),
//! its own Erlang cookie, config, mnesia and log directories, all in one temp
//! directory that goes away with the node. The machine's shared node
//! (`rabbit@localhost`) is never addressed: every `rabbitmqctl` call names
//! this node with `-n`.
//!
//! Notes from building it (Debian 12, RabbitMQ 3.10, Erlang 25, run as root):
//! - `/usr/sbin/rabbitmq-server` is a wrapper that, as root, `su`s to the
//!   `rabbitmq` user and writes `/var/log/rabbitmq/startup_log` (the shared
//!   node's file). We run `/usr/lib/rabbitmq/bin/rabbitmq-server` directly.
//! - `/etc/rabbitmq/rabbitmq-env.conf` is read by the scripts unless
//!   `RABBITMQ_CONF_ENV_FILE` points elsewhere; it sets `NODENAME=rabbit@localhost`.
//!   We point it at our own (empty) file and pass everything as env vars.
//! - root has no `~/.erlang.cookie` (the shared node's is in
//!   `/var/lib/rabbitmq`), and Erlang would create one in `/root`. We set
//!   `HOME` to `<dir>/home` with a fresh cookie (mode 0400) for the server and
//!   for `rabbitmqctl`, so nothing outside the temp dir is written.
//! - `rabbitmq-server` is a shell script that starts `erl` (which `exec`s into
//!   `beam.smp`) as its child and waits; `kill()` SIGKILLs that `beam.smp`
//!   (its helpers `erl_child_setup`/`inet_gethost` exit with it). epmd is the
//!   machine's shared one and is left alone.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use lapin::{Connection, ConnectionProperties};
use nix::sys::signal::Signal;

use super::sys::{self, TempDir};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
const START_TIMEOUT: Duration = Duration::from_secs(120);
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection as `rabbitmqctl list_connections name pid` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConnection {
    /// `127.0.0.1:<client port> -> 127.0.0.1:<amqp port>`
    pub name: String,
    /// The Erlang pid of the connection process.
    pub pid: String,
}

pub struct BrokerNode {
    node_name: String,
    amqp_port: u16,
    dist_port: u16,
    /// The management API (courier applies its queue policies through it).
    management_port: u16,
    /// The `rabbitmq-server` script; `beam.smp` is its child.
    server: Option<Child>,
    started_in: Duration,
    /// Declared last: removed after the node is dead.
    dir: TempDir,
}

impl BrokerNode {
    /// Starts a fresh node without plugins and waits until it serves AMQP
    /// (guest/guest, vhost `/`); takes seconds.
    pub async fn start() -> BrokerNode {
        Self::start_with_config("").await
    }

    /// Like [`start`](Self::start), with extra `rabbitmq.conf` lines.
    pub async fn start_with_config(extra_config: &str) -> BrokerNode {
        super::sweep_orphans();
        let name = sys::unique_name("courier");
        let dir = TempDir::new(&format!("{name}{DIR_SUFFIX}"));
        let amqp_port = sys::free_port();
        let other_port = |taken: &[u16]| loop {
            let port = sys::free_port();
            if !taken.contains(&port) {
                break port;
            }
        };
        let dist_port = other_port(&[amqp_port]);
        let management_port = other_port(&[amqp_port, dist_port]);
        let mut node = BrokerNode {
            node_name: format!("{name}@localhost"),
            amqp_port,
            dist_port,
            management_port,
            server: None,
            started_in: Duration::ZERO,
            dir,
        };
        if let Err(e) = node.write_files(extra_config) {
            panic!("cannot prepare {}: {e:#}", node.dir.path().display());
        }
        node.launch().await;
        node
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    pub fn amqp_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.amqp_port))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `http://127.0.0.1:<port>`: the node's management API (guest/guest).
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }

    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// How long the last start or restart took until AMQP was served.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Whether the node's processes run (its app may still be stopped).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// The OS pid of the node's `beam.smp`, while it runs.
    pub fn beam_pid(&self) -> Option<u32> {
        let server = self.server.as_ref()?.id();
        sys::children(server)
            .into_iter()
            .find(|&pid| sys::command_name(pid).as_deref() == Some("beam.smp"))
    }

    /// Runs `rabbitmqctl -n <this node> <args>`; its stdout on success.
    /// RabbitMQ 3.10 can leave a single-node quorum queue's Raft server a
    /// follower forever after an unclean stop (rabbitmq-server#10070): the
    /// queue takes publishes into its log but never confirms them, and never
    /// delivers. On a cluster the peers would elect a leader; alone, it needs
    /// `ra:trigger_election`, the broker operator's documented remedy. Returns
    /// the queues (of vhost `/`) that needed it.
    pub async fn elect_leaderless_quorum_queues(&self, queues: &[String]) -> Vec<String> {
        let names = queues
            .iter()
            .map(|q| format!("<<\"{q}\">>"))
            .collect::<Vec<_>>()
            .join(",");
        let expression = format!(
            "[begin S = {{binary_to_atom(<<\"%2F_\", N/binary>>), node()}}, \
             case ra:members(S, 2000) of {{timeout, _}} -> ra:trigger_election(S), N; _ -> ok end end \
             || N <- [{names}]]."
        );
        let answer = self
            .rabbitmqctl(&["eval", &expression])
            .await
            .unwrap_or_default();
        queues
            .iter()
            .filter(|q| answer.contains(&format!("<<\"{q}\">>")))
            .cloned()
            .collect()
    }

    pub async fn rabbitmqctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = tokio::process::Command::new(CTL);
        command
            .arg("-n")
            .arg(&self.node_name)
            .args(args)
            .env_clear()
            .envs(self.env())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(CTL_TIMEOUT, command.output())
            .await
            .with_context(|| format!("rabbitmqctl {args:?} took over {CTL_TIMEOUT:?}"))?
            .with_context(|| format!("cannot run {CTL}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        anyhow::ensure!(
            output.status.success(),
            "rabbitmqctl -n {} {args:?} failed ({}): {stdout}{}",
            self.node_name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(stdout)
    }

    /// Stops the RabbitMQ application (the Erlang node stays up): every
    /// client connection is closed and the AMQP port refuses connections.
    pub async fn stop_app(&self) {
        if let Err(e) = self.rabbitmqctl(&["stop_app"]).await {
            panic!("stop_app on {}: {e:#}", self.node_name);
        }
    }

    /// Starts the application again after [`stop_app`](Self::stop_app) and
    /// waits until AMQP is served.
    pub async fn start_app(&mut self) {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        // The listener port may still be held for a moment by closing sockets.
        loop {
            match self.rabbitmqctl(&["start_app"]).await {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    panic!("start_app on {}: {e:#}", self.node_name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        self.wait_until_serving(started).await;
    }

    /// SIGKILLs the node's `beam.smp`: no goodbye to clients, no clean
    /// shutdown of queues. Returns once the process is gone.
    pub async fn kill(&mut self) {
        let Some(mut server) = self.server.take() else {
            panic!("kill: the node {} is not running", self.node_name)
        };
        let beam = sys::children(server.id())
            .into_iter()
            .find(|&pid| sys::command_name(pid).as_deref() == Some("beam.smp"));
        match beam {
            Some(beam) => {
                sys::signal(beam, Signal::SIGKILL);
                assert!(
                    sys::wait_gone_async(&[beam], Duration::from_secs(10)).await,
                    "beam.smp {beam} of {} survived SIGKILL",
                    self.node_name
                );
            }
            None => sys::signal(server.id(), Signal::SIGKILL),
        }
        // The script notices its child died and exits; reap it.
        sys::reap_async(&mut server, Duration::from_secs(10)).await;
    }

    /// Starts the node again on the same ports, name and data (durable
    /// queues and persistent messages survive); kills it first if it runs.
    pub async fn restart(&mut self) {
        if self.server.is_some() {
            self.kill().await;
        }
        self.launch().await;
    }

    /// `rabbitmqctl list_connections name pid`.
    pub async fn list_connections(&self) -> Vec<BrokerConnection> {
        let out = self
            .rabbitmqctl(&[
                "list_connections",
                "name",
                "pid",
                "--quiet",
                "--no-table-headers",
            ])
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        out.lines()
            .filter_map(|line| {
                let (name, pid) = line.split_once('\t')?;
                Some(BrokerConnection {
                    name: name.to_owned(),
                    pid: pid.to_owned(),
                })
            })
            .collect()
    }

    /// Closes every client connection on the node (all vhosts) with the
    /// reason "test"; returns how many it closed, as rabbitmqctl reports it
    /// (a connection still in its handshake has no vhost and is not counted).
    pub async fn close_all_connections(&self) -> usize {
        let out = self
            .rabbitmqctl(&["close_all_connections", "--global", "test"])
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        // "Closed 3 connections"
        out.lines()
            .find_map(|line| {
                line.strip_prefix("Closed ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("close_all_connections answered {out:?}"))
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let path = |part: &str| self.dir.join(part).display().to_string();
        vec![
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
            // The Erlang cookie is read from $HOME (server and CLI alike).
            ("HOME", path("home")),
            ("LANG", "C.UTF-8".to_owned()),
            ("LC_ALL", "C.UTF-8".to_owned()),
            ("RABBITMQ_NODENAME", self.node_name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
            ("RABBITMQ_NODE_PORT", self.amqp_port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config")),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("RABBITMQ_PID_FILE", path("rabbitmq.pid")),
            // As the shared node's env file does: epmd and distribution on loopback.
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
            (
                "ERL_FLAGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".to_owned(),
            ),
        ]
    }

    fn write_files(&self, extra_config: &str) -> anyhow::Result<()> {
        for sub in ["home", "mnesia", "log"] {
            fs::create_dir(self.dir.join(sub))?;
        }
        let cookie = format!("{:032X}", rand::random::<u128>());
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(self.dir.join("home/.erlang.cookie"))?
            .write_all(cookie.as_bytes())?;
        // The management API: courier's queue policies are applied through it.
        fs::write(self.dir.join("enabled_plugins"), "[rabbitmq_management].\n")?;
        fs::write(
            self.dir.join("rabbitmq-env.conf"),
            "# throwaway node: everything is set through the environment\n",
        )?;
        fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "loopback_users = none\n\
                 heartbeat = 5\n\
                 log.console = false\n\
                 log.file.level = info\n\
                 management.tcp.ip = 127.0.0.1\n\
                 management.tcp.port = {}\n\
                 {extra_config}\n",
                self.management_port
            ),
        )?;
        Ok(())
    }

    async fn launch(&mut self) {
        let started = Instant::now();
        let log = self.dir.join("server.log");
        let (stdout, stderr) = (sys::append_log(&log), sys::append_log(&log));
        let server = Command::new(SERVER)
            .env_clear()
            .envs(self.env())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SERVER}: {e}"));
        self.server = Some(server);
        self.wait_until_serving(started).await;
    }

    /// Waits until a client can open an AMQP connection as guest.
    async fn wait_until_serving(&mut self, started: Instant) {
        let deadline = started + START_TIMEOUT;
        loop {
            if let Some(status) = sys::exited(&mut self.server) {
                panic!(
                    "RabbitMQ node {} exited during start ({status}):\n{}\n{}",
                    self.node_name,
                    sys::tail(&self.dir.join("server.log"), 30),
                    sys::tail(
                        &self.dir.path().join(format!("log/{}.log", self.node_name)),
                        30
                    ),
                );
            }
            if sys::accepts(self.amqp_port).await
                && let Ok(Ok(connection)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(&self.amqp_uri(), ConnectionProperties::default()),
                )
                .await
            {
                let _ = connection.close(200, "ready".into()).await;
                if self.management_answers().await {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not serve AMQP on {} within {START_TIMEOUT:?}:\n{}",
                self.node_name,
                self.amqp_port,
                sys::tail(
                    &self.dir.path().join(format!("log/{}.log", self.node_name)),
                    30
                ),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.started_in = started.elapsed();
        eprintln!(
            "throwaway RabbitMQ {} serves AMQP on 127.0.0.1:{} (started in {:.1?})",
            self.node_name, self.amqp_port, self.started_in
        );
    }
}

impl BrokerNode {
    async fn management_answers(&self) -> bool {
        let overview = reqwest::Client::new()
            .get(format!("{}/api/overview", self.management_url()))
            .basic_auth("guest", Some("guest"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        overview.is_ok_and(|r| r.status().is_success())
    }
}

const DIR_SUFFIX: &str = "-rabbitmq";

pub(super) fn is_broker_dir(name: &str) -> bool {
    name.starts_with("courier-") && name.ends_with(DIR_SUFFIX)
}

/// Kills the node of a directory whose test process died: the pid from its
/// pid file, only if that process runs with this directory's mnesia base.
pub(super) fn stop_orphan(dir: &std::path::Path) {
    let mnesia = dir.join("mnesia").display().to_string();
    if let Some(pid) = sys::read_pid(&dir.join("rabbitmq.pid"))
        && sys::has_env(pid, "RABBITMQ_MNESIA_BASE", &mnesia)
    {
        sys::signal(pid, Signal::SIGKILL);
        sys::wait_gone(&[pid], Duration::from_secs(10));
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let beam = sys::children(server.id())
                .into_iter()
                .find(|&pid| sys::command_name(pid).as_deref() == Some("beam.smp"));
            if let Some(beam) = beam {
                sys::signal(beam, Signal::SIGKILL);
                sys::wait_gone(&[beam], Duration::from_secs(10));
            }
            sys::signal(server.id(), Signal::SIGKILL);
            sys::reap(&mut server, Duration::from_secs(5));
        }
        // `dir` is dropped (removed) after this.
    }
}

#[cfg(test)]
mod tests {
    use courier::amqp::ConfirmedPublisher;
    use lapin::{
        BasicProperties,
        options::{BasicGetOptions, QueueDeclareOptions},
        types::{AMQPValue, FieldTable, LongString},
    };

    use super::*;
    use crate::support::TcpProxy;

    const QUEUE: &str = "survivor";

    async fn connect(uri: &str) -> Connection {
        Connection::connect(uri, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {uri}: {e}"))
    }

    async fn declare_queue(connection: &Connection) -> lapin::Channel {
        let channel = connection
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        channel
            .queue_declare(
                QUEUE.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("cannot declare {QUEUE}: {e}"));
        channel
    }

    /// The node serves AMQP before its quorum queues have elected a leader
    /// again (WAL replay after SIGKILL); until then a get fails with a
    /// timeout that closes the connection. So retry on a new connection, up
    /// to a deadline, and only an empty queue is a lost message. A queue
    /// whose Raft server stays a follower (rabbitmq-server#10070; a CI run
    /// timed out on exactly that) gets the election an operator would
    /// trigger, as the soak does.
    async fn get_once_recovered(node: &BrokerNode) -> Vec<u8> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        let mut elected = false;
        loop {
            if !elected && started.elapsed() > Duration::from_secs(5) {
                elected = !node
                    .elect_leaderless_quorum_queues(&[QUEUE.to_owned()])
                    .await
                    .is_empty();
                if elected {
                    println!("{QUEUE} had no leader after the restart; an election was triggered");
                }
            }
            let attempt = async {
                let connection =
                    Connection::connect(&node.amqp_uri(), ConnectionProperties::default()).await?;
                let channel = connection.create_channel().await?;
                channel
                    .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
                    .await
            };
            match attempt.await {
                Ok(Some(message)) => return message.delivery.data,
                Ok(None) => panic!("the persistent message did not survive kill + restart"),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the queue never recovered after restart: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The node's connections once there are `n` of them. A connection the
    /// client already saw closed (the start's readiness probe, or one closed
    /// by `close_all_connections`) can stay listed until the broker's own
    /// process for it ends, which a loaded machine can delay.
    async fn connections_settled_at(node: &BrokerNode, n: usize) -> Vec<BrokerConnection> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let listed = node.list_connections().await;
            if listed.len() == n {
                return listed;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} connections, the broker lists {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One node for all of it: a start costs seconds.
    #[tokio::test]
    async fn a_throwaway_broker_survives_a_restart_with_its_durable_queue() {
        let mut node = BrokerNode::start().await;
        assert!(node.node_name().starts_with("courier-"));
        assert_ne!(node.amqp_port(), 5672);

        // A persistent message, confirmed into a durable quorum queue.
        let connection = connect(&node.amqp_uri()).await;
        declare_queue(&connection).await;
        let publisher = ConfirmedPublisher::open(&connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        publisher
            .publish(
                "",
                QUEUE,
                b"still here",
                BasicProperties::default().with_delivery_mode(2),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|e| panic!("the publish was not confirmed: {e}"));

        // rabbitmqctl sees the connection and closes it.
        let listed = connections_settled_at(&node, 1).await;
        assert!(listed[0].name.ends_with(&format!(":{}", node.amqp_port())));
        assert_eq!(node.close_all_connections().await, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while connection.status().connected() {
            assert!(
                Instant::now() < deadline,
                "close_all_connections left it open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Through a proxy: the broker sees the proxy's connection; a reset kills it.
        let proxy = TcpProxy::start(node.amqp_addr()).await;
        let proxied = connect(&format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            proxy.port()
        ))
        .await;
        connections_settled_at(&node, 1).await;
        assert_eq!(proxy.reset().await, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxied.status().connected() {
            assert!(
                Instant::now() < deadline,
                "a reset AMQP connection stayed up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // SIGKILL, restart on the same ports and data: the message survived.
        let beam = node.beam_pid().unwrap_or_else(|| panic!("no beam.smp"));
        node.kill().await;
        assert!(!sys::is_running(beam), "beam.smp {beam} survived kill()");
        assert!(!sys::accepts(node.amqp_port()).await);
        node.restart().await;
        assert_ne!(node.beam_pid(), Some(beam));
        let message = get_once_recovered(&node).await;
        assert_eq!(message, b"still here");

        // stop_app closes the port and the connections; start_app serves again.
        node.stop_app().await;
        assert!(!sys::accepts(node.amqp_port()).await, "AMQP still served");
        node.start_app().await;
        connect(&node.amqp_uri()).await;

        // Drop kills the node and removes its directory.
        let beam = node.beam_pid().unwrap_or_else(|| panic!("no beam.smp"));
        let dir = node.dir();
        drop(node);
        assert!(!sys::is_running(beam), "beam.smp {beam} survived drop");
        assert!(!dir.exists(), "{} survived drop", dir.display());
    }
}
