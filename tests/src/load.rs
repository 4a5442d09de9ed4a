//! Load generators and their server, for the benchmarks (netperf and
//! pktgen are not available here): TCP connect-request-response-close
//! (TCP_CRR), request-response on kept-open connections (TCP_RR), and UDP
//! request-response. Each client runs `concurrency` workers for a fixed
//! time and reports the rate and latency percentiles of whole transactions.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Bytes in each request and each response.
pub const MESSAGE_LEN: usize = 64;
/// A transaction that takes longer than this counts as an error.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Mode {
    /// TCP_CRR: connect, one request and response, close.
    Crr,
    /// TCP_RR: requests and responses on one connection per worker.
    Rr,
    /// UDP request and response, one socket per worker.
    UdpRr,
}

/// What a client measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub mode: Mode,
    pub transactions: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Transactions per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

/// Serves TCP on `tcp` (a response per request, until the peer closes) and
/// UDP on `udp` (a response per datagram), on threads of their own, for as
/// long as the process lives.
pub fn serve(tcp: SocketAddr, udp: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(tcp)?;
    let socket = UdpSocket::bind(udp)?;
    thread::spawn(move || {
        let mut buf = [0u8; MESSAGE_LEN];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let mut buf = [0u8; MESSAGE_LEN];
            while stream.read_exact(&mut buf).is_ok() {
                if stream.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Runs `mode` against `target` for `duration` with `concurrency` workers.
pub fn run(mode: Mode, target: SocketAddr, duration: Duration, concurrency: usize) -> Report {
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> =
        (0..concurrency.max(1)).map(|_| thread::spawn(move || worker(mode, target, deadline))).collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut worker_latencies, worker_errors) = worker.join().expect("load worker panicked");
        latencies.append(&mut worker_latencies);
        errors += worker_errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        f64::from(latencies[((latencies.len() - 1) as f64 * p).round() as usize]) / 1e3
    };
    Report {
        mode,
        transactions: latencies.len() as u64,
        errors,
        seconds,
        rate: latencies.len() as f64 / seconds,
        p50_us: percentile(0.5),
        p90_us: percentile(0.9),
        p99_us: percentile(0.99),
    }
}

/// One worker's transaction latencies (ns) and error count.
fn worker(mode: Mode, target: SocketAddr, deadline: Instant) -> (Vec<u32>, u64) {
    let mut latencies = Vec::new();
    let mut errors = 0;
    let request = [0x5au8; MESSAGE_LEN];
    let mut response = [0u8; MESSAGE_LEN];
    let mut kept: Option<Kept> = None;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let outcome = match mode {
            Mode::Crr => crr(target, &request, &mut response),
            Mode::Rr | Mode::UdpRr => {
                let connection = match kept.take() {
                    Some(connection) => Ok(connection),
                    None => Kept::open(mode, target),
                };
                connection.and_then(|mut connection| {
                    connection.exchange(&request, &mut response)?;
                    kept = Some(connection);
                    Ok(())
                })
            }
        };
        match outcome {
            Ok(()) => latencies.push(t0.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32),
            Err(_) => errors += 1,
        }
    }
    (latencies, errors)
}

fn crr(target: SocketAddr, request: &[u8], response: &mut [u8]) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(request)?;
    stream.read_exact(response)
}

/// A worker's kept-open connection or socket.
enum Kept {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Kept {
    fn open(mode: Mode, target: SocketAddr) -> io::Result<Self> {
        if mode == Mode::UdpRr {
            let any = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let socket = UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.connect(target)?;
            return Ok(Self::Udp(socket));
        }
        let stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self::Tcp(stream))
    }

    fn exchange(&mut self, request: &[u8], response: &mut [u8]) -> io::Result<()> {
        match self {
            Self::Tcp(stream) => {
                stream.write_all(request)?;
                stream.read_exact(response)
            }
            Self::Udp(socket) => {
                socket.send(request)?;
                // A lost datagram times out and counts as an error; the
                // socket is kept.
                socket.recv(response).map(drop)
            }
        }
    }
}
