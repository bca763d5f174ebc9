//! A TCP proxy placed between our code and a server (RabbitMQ, PostgreSQL),
//! with network faults switched on and off while connections are live:
//!
//! | control | live connections | new connections |
//! |---|---|---|
//! | [`pass`](TcpProxy::pass) | bytes flow (after the set latency) | accepted, forwarded |
//! | [`blackhole`](TcpProxy::blackhole) | stay open, nothing is forwarded either way | accepted, nothing forwarded |
//! | [`reset`](TcpProxy::reset) | closed with RST on both sides | accepted (in the current mode) |
//! | [`cut`](TcpProxy::cut) | closed with RST on both sides | refused (`ECONNREFUSED`) until `pass` |
//! | [`add_latency`](TcpProxy::add_latency) | every chunk is delayed, both ways | same |
//!
//! A blackhole does not drop bytes: they wait (in the proxy and the kernel's
//! buffers) and flow again on `pass`, as after a healed partition; a peer
//! notices the blackhole only through its own heartbeats and timeouts.
//! During a cut the port stays bound (so nothing else can take it) but does
//! not listen, so connecting fails the way it does against a stopped server.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// What the proxy does with bytes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    Cut,
}

#[derive(Debug, Clone, Copy)]
struct Faults {
    mode: Mode,
    latency: Duration,
}

/// Sent to a live connection to kill it; it answers once its sockets are gone.
type KillSwitch = oneshot::Sender<oneshot::Sender<()>>;

enum PortCommand {
    /// Stop listening (keep the port bound); answer when done.
    Close(oneshot::Sender<()>),
    /// Listen again on this socket.
    Open(TcpListener),
}

struct Shared {
    faults: watch::Sender<Faults>,
    accepted: AtomicU64,
    killed: AtomicU64,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, KillSwitch>>,
    /// The bound, not listening socket that holds the port during a cut.
    closed_port: Mutex<Option<TcpSocket>>,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, KillSwitch>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closed_port(&self) -> std::sync::MutexGuard<'_, Option<TcpSocket>> {
        self.closed_port
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The proxy; dropping it stops it and closes every connection it carries.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    port: mpsc::UnboundedSender<PortCommand>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on `127.0.0.1:<free port>` and forwards to `upstream`, in [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = listen_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .unwrap_or_else(|e| panic!("proxy: cannot listen on a free port: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy: no local address: {e}"));
        let (faults, _) = watch::channel(Faults {
            mode: Mode::Pass,
            latency: Duration::ZERO,
        });
        let shared = Arc::new(Shared {
            faults,
            accepted: AtomicU64::new(0),
            killed: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            closed_port: Mutex::new(None),
        });
        let (port, commands) = mpsc::unbounded_channel();
        let accept_task = tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            Arc::clone(&shared),
            commands,
        ));
        TcpProxy {
            addr,
            upstream,
            shared,
            port,
            accept_task,
        }
    }

    /// Where clients connect instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn mode(&self) -> Mode {
        self.shared.faults.borrow().mode
    }

    /// Back to normal: listen again (after a cut) and forward everything,
    /// including what a blackhole held back. Keeps the latency.
    pub fn pass(&self) {
        let held = self.shared.closed_port().take();
        // Listening here, synchronously: a connect right after `pass()`
        // returns lands in the backlog and is not refused.
        let reopened = match held {
            Some(socket) => Some(socket.listen(1024)),
            // The port could not be held during the cut: bind it anew.
            None if self.mode() == Mode::Cut => Some(listen_on(self.addr)),
            None => None,
        };
        if let Some(listener) = reopened {
            let listener = listener
                .unwrap_or_else(|e| panic!("proxy: cannot listen on {} again: {e}", self.addr));
            let _ = self.port.send(PortCommand::Open(listener));
        }
        self.set_mode(Mode::Pass);
    }

    /// Forward nothing, either way, on live and new connections; sockets stay open.
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    /// Kills every live connection with an RST (to the client and to the
    /// server) and keeps accepting new ones, in the current mode.
    /// Returns how many connections it killed.
    pub async fn reset(&self) -> u64 {
        self.kill_all().await
    }

    /// Kills every live connection with an RST and refuses new ones until
    /// [`pass`](Self::pass). Returns how many connections it killed.
    pub async fn cut(&self) -> u64 {
        self.set_mode(Mode::Cut);
        let (done, closed) = oneshot::channel();
        if self.port.send(PortCommand::Close(done)).is_ok() {
            let _ = closed.await;
        }
        self.kill_all().await
    }

    /// Delays every chunk by `latency` in each direction (so a round trip
    /// takes twice that longer); `Duration::ZERO` removes it.
    pub fn add_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Connections accepted since start.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections killed by [`reset`](Self::reset) and [`cut`](Self::cut).
    pub fn connections_killed(&self) -> u64 {
        self.shared.killed.load(Ordering::SeqCst)
    }

    /// Connections open right now.
    pub fn live_connections(&self) -> usize {
        self.shared.live().len()
    }

    fn set_mode(&self, mode: Mode) {
        self.shared.faults.send_modify(|f| f.mode = mode);
    }

    async fn kill_all(&self) -> u64 {
        let switches: Vec<KillSwitch> = self.shared.live().drain().map(|(_, k)| k).collect();
        let mut acks = Vec::with_capacity(switches.len());
        for switch in switches {
            let (ack, acked) = oneshot::channel();
            if switch.send(ack).is_ok() {
                acks.push(acked);
            }
        }
        let mut killed = 0;
        for acked in acks {
            // An error means the connection ended by itself meanwhile.
            if acked.await.is_ok() {
                killed += 1;
            }
        }
        killed
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks: aborting it
        // drops the set, which aborts them and closes their sockets.
        self.accept_task.abort();
        self.shared.live().clear();
    }
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<PortCommand>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = async {
                match &listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok((client, _)) = accepted else { continue };
                if shared.faults.borrow().mode == Mode::Cut {
                    // Accepted from the backlog just before the cut took effect.
                    reset_now(client);
                    continue;
                }
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                let (switch, kill) = oneshot::channel();
                shared.live().insert(id, switch);
                connections.spawn(connection(id, client, upstream, Arc::clone(&shared), kill));
            }
            command = commands.recv() => match command {
                Some(PortCommand::Close(done)) => {
                    drop(listener.take());
                    // Hold the port bound without listening: connects are
                    // refused and no other socket can take the port meanwhile.
                    match hold_port(addr) {
                        Ok(socket) => *shared.closed_port() = Some(socket),
                        Err(e) => eprintln!("proxy {addr}: cannot hold the port during a cut: {e}"),
                    }
                    let _ = done.send(());
                }
                Some(PortCommand::Open(l)) => listener = Some(l),
                None => return,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn hold_port(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn reset_now(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn connection(
    id: u64,
    mut client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut kill: oneshot::Receiver<oneshot::Sender<()>>,
) {
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        connected = TcpStream::connect(upstream) => connected,
        ack = &mut kill => {
            reset_now(client);
            shared.killed.fetch_add(1, Ordering::SeqCst);
            if let Ok(ack) = ack { let _ = ack.send(()); }
            return;
        }
    };
    let Ok(mut server) = connected else {
        // The server is not there: the client learns it the hard way too.
        shared.live().remove(&id);
        reset_now(client);
        return;
    };
    let _ = server.set_nodelay(true);

    let outcome = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let faults = shared.faults.subscribe();
        let both_ways = async {
            tokio::try_join!(
                forward(client_read, server_write, faults.clone()),
                forward(server_read, client_write, faults.clone()),
            )
        };
        tokio::select! {
            done = both_ways => Ok(done),
            ack = &mut kill => Err(ack),
        }
    };
    match outcome {
        // Both sides closed their halves: a normal end.
        Ok(Ok(_)) => {
            shared.live().remove(&id);
        }
        // One side failed (e.g. was reset): pass the failure on.
        Ok(Err(_)) => {
            shared.live().remove(&id);
            reset_now(client);
            reset_now(server);
        }
        Err(ack) => {
            reset_now(client);
            reset_now(server);
            shared.killed.fetch_add(1, Ordering::SeqCst);
            if let Ok(ack) = ack {
                let _ = ack.send(());
            }
        }
    }
}

/// One direction: a reader stamps each chunk with when it arrived, a writer
/// sends it on at `arrival + latency`, both holding still in a blackhole.
async fn forward<R, W>(mut from: R, mut to: W, faults: watch::Receiver<Faults>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (chunks, mut pending) = mpsc::channel::<(Instant, Vec<u8>)>(16);
    let mut reader_faults = faults.clone();
    let reader = async move {
        let mut buf = vec![0_u8; 16 * 1024];
        loop {
            flowing(&mut reader_faults).await;
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            if chunks
                .send((Instant::now(), buf[..n].to_vec()))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let mut writer_faults = faults;
    let writer = async move {
        while let Some((arrived, chunk)) = pending.recv().await {
            flowing(&mut writer_faults).await;
            let latency = writer_faults.borrow().latency;
            tokio::time::sleep_until(arrived + latency).await;
            // The blackhole may have begun while this chunk waited.
            flowing(&mut writer_faults).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Returns once bytes may flow (not in a blackhole).
async fn flowing(faults: &mut watch::Receiver<Faults>) {
    let _ = faults.wait_for(|f| f.mode != Mode::Blackhole).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that echoes every byte back; runs until the test ends.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("echo server: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("echo server: {e}"));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn connect(proxy: &TcpProxy) -> TcpStream {
        TcpStream::connect(proxy.addr())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the proxy: {e}"))
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
        stream
            .write_all(message)
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        read_exactly(stream, message.len(), Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("no echo of {message:?} within 5s"))
            .unwrap_or_else(|e| panic!("read: {e}"))
    }

    /// `None` if `len` bytes did not arrive within `within`.
    async fn read_exactly(
        stream: &mut TcpStream,
        len: usize,
        within: Duration,
    ) -> Option<io::Result<Vec<u8>>> {
        let mut buf = vec![0_u8; len];
        tokio::time::timeout(within, stream.read_exact(&mut buf))
            .await
            .ok()
            .map(|read| read.map(|_| buf))
    }

    #[tokio::test]
    async fn the_proxy_blackholes_resets_and_cuts() {
        let echo = echo_server().await;
        let proxy = TcpProxy::start(echo).await;

        // pass
        let mut first = connect(&proxy).await;
        assert_eq!(round_trip(&mut first, b"hello").await, b"hello");
        assert_eq!(proxy.connections_accepted(), 1);
        assert_eq!(proxy.live_connections(), 1);

        // blackhole: the socket stays open, nothing comes back, nothing is lost
        proxy.blackhole();
        first
            .write_all(b"ping")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            read_exactly(&mut first, 4, Duration::from_millis(300))
                .await
                .is_none(),
            "a blackholed connection answered"
        );
        // ... also for a connection opened during the blackhole
        let mut during = connect(&proxy).await;
        during
            .write_all(b"late")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            read_exactly(&mut during, 4, Duration::from_millis(300))
                .await
                .is_none(),
            "a connection opened in the blackhole answered"
        );
        proxy.pass();
        let held = read_exactly(&mut first, 4, Duration::from_secs(5)).await;
        assert!(
            matches!(&held, Some(Ok(bytes)) if bytes == b"ping"),
            "held bytes did not flow after pass: {held:?}"
        );
        let held = read_exactly(&mut during, 4, Duration::from_secs(5)).await;
        assert!(
            matches!(&held, Some(Ok(bytes)) if bytes == b"late"),
            "held bytes did not flow after pass: {held:?}"
        );
        assert_eq!(proxy.connections_killed(), 0);

        // reset: both live connections die with an RST, new ones work
        assert_eq!(proxy.reset().await, 2);
        assert_eq!(proxy.connections_killed(), 2);
        for stream in [&mut first, &mut during] {
            let mut buf = [0_u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("a reset connection stayed open"));
            assert!(
                matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "expected ECONNRESET after reset, got {read:?}"
            );
        }
        let mut after_reset = connect(&proxy).await;
        assert_eq!(round_trip(&mut after_reset, b"again").await, b"again");
        assert_eq!(proxy.connections_accepted(), 3);

        // cut: the live connection dies, new ones are refused until pass
        assert_eq!(proxy.cut().await, 1);
        assert_eq!(proxy.connections_killed(), 3);
        let mut buf = [0_u8; 1];
        let read = after_reset.read(&mut buf).await;
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "expected ECONNRESET after cut, got {read:?}"
        );
        let refused = TcpStream::connect(proxy.addr()).await;
        assert!(
            matches!(&refused, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "expected ECONNREFUSED during a cut, got {refused:?}"
        );
        assert_eq!(proxy.connections_accepted(), 3);
        proxy.pass();
        let mut healed = connect(&proxy).await;
        assert_eq!(round_trip(&mut healed, b"healed").await, b"healed");
        assert_eq!(proxy.connections_accepted(), 4);
        assert_eq!(proxy.live_connections(), 1);

        // a client closing its side ends the connection normally (not killed)
        drop(healed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.live_connections() > 0 {
            assert!(Instant::now() < deadline, "a closed connection stayed live");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(proxy.connections_killed(), 3);
    }

    #[tokio::test]
    async fn the_proxy_adds_latency_both_ways() {
        let echo = echo_server().await;
        let proxy = TcpProxy::start(echo).await;
        let mut stream = connect(&proxy).await;
        let started = Instant::now();
        round_trip(&mut stream, b"warm").await;
        let baseline = started.elapsed();

        proxy.add_latency(Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow").await, b"slow");
        let slow = started.elapsed();
        assert!(
            slow >= Duration::from_millis(300),
            "a round trip with 150 ms each way took {slow:?}"
        );

        proxy.add_latency(Duration::ZERO);
        let started = Instant::now();
        round_trip(&mut stream, b"fast").await;
        let fast = started.elapsed();
        assert!(
            fast < Duration::from_millis(150),
            "latency was not removed: {fast:?} (baseline {baseline:?})"
        );
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_port_and_connections() {
        let echo = echo_server().await;
        let proxy = TcpProxy::start(echo).await;
        let addr = proxy.addr();
        let mut stream = connect(&proxy).await;
        round_trip(&mut stream, b"x").await;
        drop(proxy);
        let mut buf = [0_u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("a connection outlived its proxy"));
        assert!(matches!(read, Ok(0) | Err(_)), "read after drop: {read:?}");
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "the proxy port still accepts after drop");
    }
}
