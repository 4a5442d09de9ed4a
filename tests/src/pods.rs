//! Real servers in pod namespaces and the clients that talk to them.
//!
//! A pod server answers with its own name, so a client can tell which
//! backend it reached: over TCP, each line gets "NAME LINE" back, and an
//! HTTP GET (curl) gets "NAME" as the body; over UDP, each datagram gets
//! "NAME" back.
use std::{
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::{Netns, setns};

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
const POLL: Duration = Duration::from_millis(50);
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP and UDP servers running in a pod's namespace until dropped.
pub struct PodServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServer {
    pub fn start(netns: &Netns, name: &str) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (stop, name, path, ready) = (stop.clone(), name.to_owned(), netns.path(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                let bound = setns(&path).and_then(|()| {
                    if udp {
                        let socket = UdpSocket::bind(("0.0.0.0", UDP_PORT))?;
                        socket.set_read_timeout(Some(POLL))?;
                        Ok(Server::Udp(socket))
                    } else {
                        let listener = TcpListener::bind(("0.0.0.0", TCP_PORT))?;
                        listener.set_nonblocking(true)?;
                        Ok(Server::Tcp(listener))
                    }
                });
                match bound {
                    Ok(server) => {
                        let _ = ready.send(Ok(()));
                        server.serve(&name, &stop);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            }));
        }
        let server = Self { stop, threads };
        for _ in 0..2 {
            ready_rx.recv().expect("server thread reports")?;
        }
        Ok(server)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

enum Server {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Server {
    fn serve(self, name: &str, stop: &Arc<AtomicBool>) {
        let mut connections = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match &self {
                Server::Udp(socket) => {
                    let mut buf = [0u8; 1500];
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(name.as_bytes(), peer);
                    }
                }
                Server::Tcp(listener) => match listener.accept() {
                    Ok((stream, _)) => {
                        let (name, stop) = (name.to_owned(), stop.clone());
                        connections.push(std::thread::spawn(move || serve_tcp(stream, &name, &stop)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                },
            }
            connections.retain(|c: &JoinHandle<()>| !c.is_finished());
        }
        for c in connections {
            let _ = c.join();
        }
    }
}

fn serve_tcp(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.starts_with("GET ") => {
                // Read the request headers, answer, close: enough HTTP for curl.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 0) && header.trim() != "" {
                    header.clear();
                }
                let body = format!("{name}\n");
                let _ = write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                return;
            }
            Ok(_) if line.trim_end() == WHOAMI => {
                let peer = writer.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                if writeln!(writer, "{name} {WHOAMI} {peer}").is_err() {
                    return;
                }
                line.clear();
            }
            Ok(_) => {
                if writeln!(writer, "{name} {}", line.trim_end()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A client's open TCP connection (made in the client's namespace).
pub struct Session {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Session {
    /// Connects from the calling thread's namespace.
    pub fn connect(addr: SocketAddrV4) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Connects from `local_port` of the calling thread's namespace, so the
    /// flow's 5-tuple (and the backend its hash draws) is known in advance.
    pub fn connect_from(addr: SocketAddrV4, local_port: u16) -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: a plain socket call; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor of ours; the stream closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, local_port));
        // SAFETY: the address outlives the call, which reads `len` bytes.
        if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(addr);
        // SAFETY: as above.
        if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Sends one line; returns the name of the pod that answered.
    pub fn ask(&mut self, message: &str) -> io::Result<String> {
        writeln!(self.writer, "{message}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let (pod, echoed) =
            line.trim_end().split_once(' ').ok_or_else(|| io::Error::other(format!("bad answer {line:?}")))?;
        if echoed != message {
            return Err(io::Error::other(format!("echo mismatch: {line:?}")));
        }
        Ok(pod.to_owned())
    }
}

/// The line a pod server answers with the client address it sees.
const WHOAMI: &str = "whoami";

/// One TCP connection from the calling thread's namespace; returns the
/// pod that answered and the client address it saw.
pub fn tcp_whoami(addr: SocketAddrV4) -> io::Result<(String, String)> {
    let mut session = Session::connect(addr)?;
    writeln!(session.writer, "{WHOAMI}")?;
    let mut line = String::new();
    session.reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(pod), Some(WHOAMI), Some(peer)) => Ok((pod.to_owned(), peer.to_owned())),
        _ => Err(io::Error::other(format!("bad answer {line:?}"))),
    }
}

/// One TCP connection, one line, from the calling thread's namespace.
pub fn tcp_ask(addr: SocketAddrV4) -> io::Result<String> {
    Session::connect(addr)?.ask("ping")
}

/// One UDP datagram and its answer, from the calling thread's namespace.
pub fn udp_ask(addr: SocketAddrV4) -> io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(b"ping", addr)?;
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A plain HTTP GET from the calling thread's namespace: (status, body).
pub fn http_get(addr: SocketAddrV4, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    io::Read::read_to_string(&mut stream, &mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}
