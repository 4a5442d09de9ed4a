//! A client for the tests, run as its own process so that it can sit in a
//! network namespace and a cgroup of the test's choosing (the socket hooks
//! act on processes, by cgroup). Either one exchange:
//!
//!     probe tcp|udp|udp-connected|tcp6|udp6|udp6-connected ADDR
//!
//! or, with no arguments, one command per line on stdin, each answered by
//! one line on stdout, so a test can drive a client that keeps sockets:
//!
//!     tcp ADDR | udp ADDR | ... (as above)    one exchange on a new socket
//!     keep tcp|tcp6|udp|udp-connected|udp6-connected ADDR
//!                                             open a socket (a TCP
//!                                             connection) and keep it
//!     kept                                    one exchange on that socket
//!
//! An exchange prints `answer=NAME peer=ADDR` (the answering pod and the
//! peer the socket API reports: getpeername, or recvfrom's source), or
//! `error=KIND ms=MS errno=N` (an io::ErrorKind, how long the call took,
//! and the errno). The
//! `6` modes use an AF_INET6 socket and the v4-mapped form of ADDR.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

/// The socket `keep` opened.
enum Kept {
    Udp { socket: UdpSocket, to: SocketAddr, connected: bool },
    Tcp { stream: TcpStream, lines: BufReader<TcpStream> },
}

impl Kept {
    fn open(mode: &str, addr: SocketAddr) -> std::io::Result<Self> {
        if mode.starts_with("tcp") {
            let stream = connect_tcp(mode, addr)?;
            Ok(Kept::Tcp { lines: BufReader::new(stream.try_clone()?), stream })
        } else {
            let (socket, to, connected) = open_udp(mode, addr)?;
            Ok(Kept::Udp { socket, to, connected })
        }
    }

    fn ask(&mut self) -> std::io::Result<String> {
        match self {
            Kept::Udp { socket, to, connected } => ask_udp(socket, *to, *connected),
            Kept::Tcp { stream, lines } => ask_tcp(stream, lines),
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => commands(),
        [mode, addr] => match exchange(mode, addr.parse().expect("ADDR is IP:PORT")) {
            Ok(answer) => println!("{answer}"),
            Err(e) => {
                eprintln!("probe {mode} {addr}: {e}");
                std::process::exit(1);
            }
        },
        _ => {
            eprintln!("usage: probe [tcp|udp|udp-connected|tcp6|udp6|udp6-connected ADDR]");
            std::process::exit(2);
        }
    }
}

fn commands() {
    let mut kept: Option<Kept> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let started = Instant::now();
        let result = match words.as_slice() {
            ["kept"] => match &mut kept {
                Some(socket) => socket.ask(),
                None => Err(std::io::Error::other("no kept socket")),
            },
            ["keep", mode, addr] => Kept::open(mode, addr.parse().expect("ADDR is IP:PORT")).map(|socket| {
                kept = Some(socket);
                format!("kept={mode}")
            }),
            [mode, addr] => exchange(mode, addr.parse().expect("ADDR is IP:PORT")),
            _ => Err(std::io::Error::other(format!("bad command {line:?}"))),
        };
        match result {
            Ok(answer) => println!("{answer}"),
            Err(e) => println!(
                "error={:?} ms={} errno={}",
                e.kind(),
                started.elapsed().as_millis(),
                e.raw_os_error().unwrap_or(0)
            ),
        }
        std::io::stdout().flush().expect("stdout");
    }
}

/// ADDR as the mode's socket family wants it.
fn target(mode: &str, addr: SocketAddr) -> SocketAddr {
    match (mode.contains('6'), addr) {
        (true, SocketAddr::V4(v4)) => SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
        _ => addr,
    }
}

/// An unbound UDP socket of the mode's family, and whether it is connected.
fn open_udp(mode: &str, addr: SocketAddr) -> std::io::Result<(UdpSocket, SocketAddr, bool)> {
    let to = target(mode, addr);
    let socket =
        if to.is_ipv6() { UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))? } else { UdpSocket::bind("0.0.0.0:0")? };
    socket.set_read_timeout(Some(TIMEOUT))?;
    let connected = mode.ends_with("connected");
    if connected {
        socket.connect(to)?;
    }
    Ok((socket, to, connected))
}

fn ask_udp(socket: &UdpSocket, to: SocketAddr, connected: bool) -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    let (n, peer) = if connected {
        socket.send(b"ping")?;
        let n = socket.recv(&mut buf)?;
        (n, socket.peer_addr()?)
    } else {
        socket.send_to(b"ping", to)?;
        socket.recv_from(&mut buf)?
    };
    Ok(format!("answer={} peer={peer}", String::from_utf8_lossy(&buf[..n])))
}

fn connect_tcp(mode: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target(mode, addr), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// One line out, one line back: the answering pod's name comes first.
fn ask_tcp(mut stream: &TcpStream, lines: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    writeln!(stream, "ping")?;
    let mut line = String::new();
    if lines.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let answer = line.split_whitespace().next().unwrap_or_default().to_owned();
    Ok(format!("answer={answer} peer={}", stream.peer_addr()?))
}

fn exchange(mode: &str, addr: SocketAddr) -> std::io::Result<String> {
    match mode {
        "tcp" | "tcp6" => {
            let stream = connect_tcp(mode, addr)?;
            ask_tcp(&stream, &mut BufReader::new(stream.try_clone()?))
        }
        "udp" | "udp-connected" | "udp6" | "udp6-connected" => {
            let (socket, to, connected) = open_udp(mode, addr)?;
            ask_udp(&socket, to, connected)
        }
        other => Err(std::io::Error::other(format!("unknown mode {other}"))),
    }
}
