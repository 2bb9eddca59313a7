//! Userspace link emulator on loopback: a TCP relay from `127.0.0.1:<port>` to an upstream that
//! adds one-way delay (with optional jitter and loss) to the data in each direction and limits
//! throughput with one token bucket per direction shared by all connections, the way a slow edge
//! link would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::RigError;

/// The link to emulate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// Throughput limit per direction in bytes per second; `None` for unlimited.
    pub rate_bytes_per_sec: Option<u64>,
    /// Delay added to data in each direction (round-trip time is twice this).
    pub one_way_delay: Duration,
    /// Up to this much more delay, drawn at random for each piece of data (never reordering a
    /// connection's bytes: a piece waits for the one before it, as TCP delivers).
    pub jitter: Duration,
    /// Share of the pieces of data lost (0 to 1). TCP resends what is lost, so a lost piece
    /// arrives one retransmission timeout late ([`retransmit_delay`]), holding back the bytes
    /// behind it on its connection; the sender's slowdown after a loss is not emulated.
    pub loss: f64,
}

impl LinkProfile {
    /// A link of `mbit` Mbit/s with round-trip time `rtt`.
    pub fn new(mbit: f64, rtt: Duration) -> Self {
        Self {
            rate_bytes_per_sec: Some((mbit * 1_000_000.0 / 8.0) as u64),
            one_way_delay: rtt / 2,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }

    /// No limit and no delay: a plain relay.
    pub fn unlimited() -> Self {
        Self {
            rate_bytes_per_sec: None,
            one_way_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }

    /// How late a lost piece of data arrives: TCP's retransmission timeout, at least 200 ms
    /// (Linux's minimum) and at least a round trip.
    pub fn retransmit_delay(&self) -> Duration {
        (self.one_way_delay * 2).max(Duration::from_millis(200))
    }

    /// When a piece read at `now` is due at the far end, given the one before it is due at
    /// `previous`: after the delay, a random share of the jitter and, if lost, the
    /// retransmission delay, and never before `previous`.
    fn due(&self, now: Instant, previous: Instant) -> Instant {
        let mut delay = self.one_way_delay;
        if !self.jitter.is_zero() {
            delay += self.jitter.mul_f64(rand::random::<f64>());
        }
        if self.loss > 0.0 && rand::random::<f64>() < self.loss {
            delay += self.retransmit_delay();
        }
        (now + delay).max(previous)
    }
}

/// A running emulator; stops accepting and closes its connections on drop.
pub struct LinkEmulator {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LinkEmulator {
    /// Relays `127.0.0.1:<free port>` to `upstream` through `profile`.
    pub fn start(upstream: SocketAddr, profile: LinkProfile) -> Result<Self, RigError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(RigError::io("building the link emulator runtime"))?;
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .map_err(RigError::io("binding the link emulator"))?;
        let addr = listener
            .local_addr()
            .map_err(RigError::io("reading the link emulator address"))?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("link-emulator".into())
            .spawn(move || runtime.block_on(accept_loop(listener, upstream, profile, stopped)))
            .map_err(RigError::io("spawning the link emulator thread"))?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address clients connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    profile: LinkProfile,
    mut stopped: oneshot::Receiver<()>,
) {
    let down = Arc::new(TokenBucket::new(profile.rate_bytes_per_sec));
    let up = Arc::new(TokenBucket::new(profile.rate_bytes_per_sec));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let (up, down) = (up.clone(), down.clone());
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let delay = profile.one_way_delay;
                    // A client that goes away stops using the link one delay later (the time its
                    // FIN takes to cross it): both directions and the upstream are dropped then,
                    // so a finished run's response does not hold the link for the next one.
                    let client_gone = CancellationToken::new();
                    let relays = async {
                        tokio::join!(
                            relay(client_read, server_write, profile, up, Some(client_gone.clone())),
                            relay(server_read, client_write, profile, down, None),
                        )
                    };
                    tokio::select! {
                        _ = relays => {}
                        _ = async {
                            client_gone.cancelled().await;
                            tokio::time::sleep(delay).await;
                        } => {}
                    }
                });
            }
        }
    }
    connections.abort_all();
}

/// Copies one direction: data read at time t is written no earlier than t + delay (see
/// [`LinkProfile::due`]) and only as fast as the shared bucket allows. Reading goes on while
/// earlier data waits, as on a real link. `on_eof` is cancelled when the source closes.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    profile: LinkProfile,
    bucket: Arc<TokenBucket>,
    on_eof: Option<CancellationToken>,
) {
    let slots = queue_slots(&bucket, profile.one_way_delay);
    let (queue, mut pending) = mpsc::channel::<(Instant, Vec<u8>)>(slots);
    let reader = async move {
        let mut buf = vec![0u8; SLOT_BYTES as usize];
        let mut previous = Instant::now();
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    if let Some(eof) = on_eof {
                        eof.cancel();
                    }
                    break;
                }
                Ok(n) => {
                    previous = profile.due(Instant::now(), previous);
                    if queue.send((previous, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, data)) = pending.recv().await {
            tokio::time::sleep_until(due.into()).await;
            bucket.take(data.len() as u64).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Read size of the relay; the queue holds slots of at most this many bytes.
const SLOT_BYTES: u64 = 16 * 1024;

/// How many reads may wait in one direction: about twice the link's bandwidth-delay product
/// (what a real path holds in flight), at least 16, so a slow link pushes back on the sender
/// instead of swallowing megabytes the link could not yet have carried.
fn queue_slots(bucket: &TokenBucket, delay: Duration) -> usize {
    let in_flight = match bucket.rate {
        Some(rate) => (rate as f64 * delay.as_secs_f64() * 2.0) as u64 / SLOT_BYTES,
        None => 64,
    };
    usize::try_from(in_flight).unwrap_or(usize::MAX).max(16)
}

/// Byte-rate limiter shared by every connection in one direction.
struct TokenBucket {
    rate: Option<u64>,
    state: Mutex<BucketState>,
}

struct BucketState {
    /// When the bytes granted so far will have drained at `rate`.
    busy_until: Instant,
}

impl TokenBucket {
    fn new(rate: Option<u64>) -> Self {
        Self {
            rate,
            state: Mutex::new(BucketState {
                busy_until: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may be sent: transmissions are serialized at the link rate.
    async fn take(&self, bytes: u64) {
        let Some(rate) = self.rate.filter(|rate| *rate > 0) else {
            return;
        };
        let send_time = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let wait_until = {
            let mut state = crate::sync::lock(&self.state);
            let start = state.busy_until.max(Instant::now());
            state.busy_until = start + send_time;
            state.busy_until
        };
        tokio::time::sleep_until(wait_until.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn echo_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn relays_bytes_unchanged_through_a_limited_link() {
        assert_echoes_unchanged(LinkProfile::new(80.0, Duration::from_millis(4)), 200_000);
    }

    /// `len` bytes sent through an emulator of `profile` to an echo server come back unchanged.
    fn assert_echoes_unchanged(profile: LinkProfile, len: u32) {
        let link = LinkEmulator::start(echo_server(), profile).unwrap();
        let mut conn = std::net::TcpStream::connect(link.addr()).unwrap();
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut conn = conn.try_clone().unwrap();
            let payload = payload.clone();
            std::thread::spawn(move || conn.write_all(&payload).unwrap())
        };
        let mut echoed = vec![0u8; payload.len()];
        conn.read_exact(&mut echoed).unwrap();
        writer.join().unwrap();
        assert_eq!(echoed, payload);
    }

    #[test]
    fn jitter_and_loss_delay_data_without_reordering_or_changing_it() {
        let profile = LinkProfile {
            jitter: Duration::from_millis(30),
            loss: 0.5,
            ..LinkProfile::new(100.0, Duration::from_millis(20))
        };
        // Due times never go back, and stay within delay + jitter + one retransmission.
        let start = Instant::now();
        let mut previous = start;
        let mut late = 0;
        for _ in 0..200 {
            let due = profile.due(start, previous);
            assert!(due >= previous);
            let waited = due - start;
            assert!(waited >= profile.one_way_delay, "{waited:?}");
            assert!(
                waited <= profile.one_way_delay + profile.jitter + profile.retransmit_delay(),
                "{waited:?}"
            );
            if waited >= profile.retransmit_delay() {
                late += 1;
            }
            previous = due;
        }
        assert!(
            late > 0,
            "half the pieces are lost, some arrive a timeout late"
        );
        assert_eq!(profile.retransmit_delay(), Duration::from_millis(200));

        assert_echoes_unchanged(profile, 300_000);
    }

    #[test]
    fn a_client_that_disconnects_stops_using_the_link_and_its_upstream_is_closed() {
        // An upstream that streams until its peer goes away, reporting when it noticed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = listener.local_addr().unwrap();
        let (noticed_tx, noticed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let chunk = vec![7u8; 16 * 1024];
            while stream.write_all(&chunk).is_ok() {}
            let _ = noticed_tx.send(Instant::now());
        });
        let delay = Duration::from_millis(100);
        let link = LinkEmulator::start(upstream, LinkProfile::new(1.0, delay * 2)).unwrap();
        let mut conn = std::net::TcpStream::connect(link.addr()).unwrap();
        let mut some = [0u8; 1000];
        conn.read_exact(&mut some).unwrap();
        drop(conn);
        let closed = Instant::now();
        // At 1 Mbit/s the upstream's buffered megabytes would take a minute to drain.
        let noticed = noticed
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream was not closed after the client left");
        assert!(noticed >= closed);
    }
}
