//! Real servers in pod namespaces and the clients that talk to them.
//!
//! A pod server answers with its own name, so a client can tell which
//! backend it reached: over TCP, each line gets "NAME LINE" back, and an
//! HTTP GET (curl) gets "NAME" as the body; over UDP, each datagram gets
//! "NAME" back. The servers listen on both families at once (one socket
//! each on `[::]`), so the same pod answers IPv4 and IPv6 clients.
use std::{
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
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
                        let socket = UdpSocket::from(dual_stack_socket(libc::SOCK_DGRAM, UDP_PORT)?);
                        socket.set_read_timeout(Some(POLL))?;
                        set_int_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
                        Ok(Server::Udp(socket))
                    } else {
                        let listener = TcpListener::from(dual_stack_socket(libc::SOCK_STREAM, TCP_PORT)?);
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
                    if let Ok((peer, destination)) = recv_with_destination(socket, &mut buf) {
                        let _ = answer_from(socket, name.as_bytes(), peer, destination);
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

/// A socket of `kind` (listening, for a stream) bound to `[::]:port` that
/// takes IPv4 too: its IPv4 clients appear as v4-mapped addresses.
/// IPV6_V6ONLY is cleared explicitly rather than left to the namespace's
/// `net.ipv6.bindv6only`; std's bind offers no way to set it first, so the
/// socket is made here, with the options std's own binds set.
fn dual_stack_socket(kind: libc::c_int, port: u16) -> io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor of ours.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    if kind == libc::SOCK_STREAM {
        // As std's TcpListener::bind does, so a pod's port is free again at
        // once after a server stops (its connections in TIME_WAIT).
        set_int_option(&socket, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let (address, len) = sockaddr(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    // SAFETY: the address outlives the call, which reads `len` bytes.
    if unsafe { libc::bind(fd, (&raw const address).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a plain call on our descriptor. The backlog is std's.
    if kind == libc::SOCK_STREAM && unsafe { libc::listen(fd, 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn set_int_option(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the value outlives the call, which reads `len` bytes.
    if unsafe { libc::setsockopt(socket.as_raw_fd(), level, name, (&raw const value).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `addr` as the kernel takes it, with its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Room for one IPV6_PKTINFO control message, aligned as cmsghdr wants.
#[repr(C, align(8))]
struct PktinfoBuffer([u8; 64]);

/// Receives one datagram on the dual-stack server socket: its sender, and
/// the address it was sent to (from IPV6_PKTINFO; v4-mapped for IPv4).
fn recv_with_destination(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(SocketAddrV6, Option<Ipv6Addr>)> {
    // SAFETY: all zeroes is valid for these plain C structs.
    let mut peer: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut control = PktinfoBuffer([0; 64]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as above.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = (&raw mut peer).cast();
    message.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    message.msg_controllen = control.0.len();
    // SAFETY: every pointer in `message` is valid for its length for the call.
    if unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut message, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut destination = None;
    // SAFETY: the kernel filled `control` and set msg_controllen; the
    // CMSG macros walk only within it.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&raw const message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::IPPROTO_IPV6 && (*header).cmsg_type == libc::IPV6_PKTINFO {
                let info = libc::CMSG_DATA(header).cast::<libc::in6_pktinfo>().read_unaligned();
                destination = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
            }
            header = libc::CMSG_NXTHDR(&raw const message, header);
        }
    }
    let sender = SocketAddrV6::new(
        Ipv6Addr::from(peer.sin6_addr.s6_addr),
        u16::from_be(peer.sin6_port),
        peer.sin6_flowinfo,
        peer.sin6_scope_id,
    );
    Ok((sender, destination))
}

/// Answers `peer` from `destination`, the address its datagram was sent
/// to, as a UDP server bound to one address would: a pod or node with
/// several IPv6 addresses would otherwise answer from whichever the route
/// back prefers, and a client's connected socket would drop that. IPv4
/// senders (v4-mapped) are answered from the routing's choice, as the
/// IPv4-only server before did.
fn answer_from(socket: &UdpSocket, data: &[u8], peer: SocketAddrV6, destination: Option<Ipv6Addr>) -> io::Result<()> {
    let destination = match destination {
        Some(d) if peer.ip().to_ipv4_mapped().is_none() => d,
        _ => return socket.send_to(data, peer).map(drop),
    };
    let (mut to, to_len) = sockaddr(SocketAddr::V6(peer));
    let mut control = PktinfoBuffer([0; 64]);
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    // SAFETY: all zeroes is valid for msghdr.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = (&raw mut to).cast();
    message.msg_namelen = to_len;
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation; the header and its data fit
    // in `control` (64 bytes, CMSG_SPACE(20) is 40), which outlives the call.
    unsafe {
        message.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
        let header = libc::CMSG_FIRSTHDR(&raw const message);
        (*header).cmsg_level = libc::IPPROTO_IPV6;
        (*header).cmsg_type = libc::IPV6_PKTINFO;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
        // Interface 0: only the source is fixed, routing picks the way out.
        let info = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: destination.octets() }, ipi6_ifindex: 0 };
        libc::CMSG_DATA(header).cast::<libc::in6_pktinfo>().write_unaligned(info);
        if libc::sendmsg(socket.as_raw_fd(), &raw const message, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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
                // An IPv4 client reaches the dual-stack listener as a
                // v4-mapped address; it is reported as the IPv4 it is.
                let peer = writer.peer_addr().map(|p| p.ip().to_canonical().to_string()).unwrap_or_default();
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
    pub fn connect(addr: impl Into<SocketAddr>) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Connects from `local_port` of the calling thread's namespace, so the
    /// flow's 5-tuple (and the backend its hash draws) is known in advance.
    pub fn connect_from(addr: impl Into<SocketAddr>, local_port: u16) -> io::Result<Self> {
        let addr = addr.into();
        let family = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: a plain socket call; the descriptor is owned below.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor of ours; the stream closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let (local, len) = sockaddr(SocketAddr::new(unspecified_like(addr), local_port));
        // SAFETY: the address outlives the call, which reads `len` bytes.
        if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (remote, len) = sockaddr(addr);
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
pub fn tcp_whoami(addr: impl Into<SocketAddr>) -> io::Result<(String, String)> {
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
pub fn tcp_ask(addr: impl Into<SocketAddr>) -> io::Result<String> {
    Session::connect(addr)?.ask("ping")
}

/// One UDP datagram and its answer, from the calling thread's namespace.
pub fn udp_ask(addr: impl Into<SocketAddr>) -> io::Result<String> {
    let addr = addr.into();
    let socket = UdpSocket::bind((unspecified_like(addr), 0))?;
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(b"ping", addr)?;
    let mut buf = [0u8; 1500];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A plain HTTP GET from the calling thread's namespace: (status, body).
pub fn http_get(addr: impl Into<SocketAddr>, path: &str) -> io::Result<(u16, String)> {
    let addr = addr.into();
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    io::Read::read_to_string(&mut stream, &mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The unspecified address of `addr`'s family: where a client socket for
/// `addr` binds.
fn unspecified_like(addr: SocketAddr) -> std::net::IpAddr {
    if addr.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() }
}
