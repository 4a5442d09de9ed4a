//! Destroying connected UDP sockets with sock_diag (NETLINK_SOCK_DIAG,
//! SOCK_DESTROY; the kernel needs CONFIG_INET_DIAG_DESTROY). The socket
//! hooks connect a UDP socket to a backend itself; when that backend leaves
//! its Service no NAT state can move the socket, so it is destroyed: its
//! next call fails with ECONNABORTED and the application makes a new one,
//! as under Cilium. Only sockets whose cookie the socket hooks recorded
//! (SOCK_REVNAT) are touched.
use std::{
    collections::BTreeSet,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then
/// expires, rqueue, wqueue, uid, inode.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// A connected UDP socket's state (TCP_ESTABLISHED).
const UDP_CONNECTED: u32 = 1 << 1;

/// One socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DiagSocket {
    family: u8,
    /// The raw `inet_diag_sockid`, echoed back to destroy it.
    id: [u8; SOCKID_LEN],
}

impl DiagSocket {
    fn cookie(&self) -> u64 {
        let words = [&self.id[40..44], &self.id[44..48]].map(|w| u64::from(u32::from_ne_bytes(w.try_into().unwrap())));
        words[0] | words[1] << 32
    }

    /// The peer: IPv4 for AF_INET sockets and AF_INET6 ones with a
    /// v4-mapped peer (the socket hooks sent those to IPv4 backends), IPv6
    /// for the other AF_INET6 ones.
    fn peer(&self) -> Option<SocketAddr> {
        let port = u16::from_be_bytes([self.id[2], self.id[3]]);
        let dst: [u8; 16] = self.id[20..36].try_into().unwrap();
        let ip = match self.family as i32 {
            libc::AF_INET => Ipv4Addr::from(<[u8; 4]>::try_from(&dst[..4]).unwrap()).into(),
            libc::AF_INET6 => {
                let ip = Ipv6Addr::from(dst);
                ip.to_ipv4_mapped().map_or(ip.into(), Into::into)
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
}

/// A netlink request: header, then `inet_diag_req_v2` for UDP of `family`
/// in `states`, with `id` (zero for a dump).
fn request(kind: u16, flags: u16, seq: u32, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut message = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    message.extend(((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    message.extend(kind.to_ne_bytes());
    message.extend(flags.to_ne_bytes());
    message.extend(seq.to_ne_bytes());
    message.extend(0u32.to_ne_bytes());
    message.extend([family, libc::IPPROTO_UDP as u8, 0, 0]);
    message.extend(states.to_ne_bytes());
    message.extend(id);
    message
}

/// The messages of a netlink reply buffer: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header = buf.get(offset..offset + NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(header[..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().unwrap());
        let payload = buf.get(offset + NLMSG_HDRLEN..offset + len.max(NLMSG_HDRLEN))?;
        offset += len.max(NLMSG_HDRLEN).next_multiple_of(4);
        Some((kind, payload))
    })
}

/// The error of an NLMSG_ERROR payload (0 is an ack).
fn error_of(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()))
}

struct DiagSocketFd(libc::c_int);

impl DiagSocketFd {
    fn open() -> io::Result<Self> {
        // SAFETY: a plain socket call; the descriptor is owned from here.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: the buffer outlives the call.
        let sent = unsafe { libc::send(self.0, message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv<'a>(&self, buf: &'a mut [u8]) -> io::Result<&'a [u8]> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into it.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(&buf[..n as usize]) }
    }

    /// The connected UDP sockets of `family` in this network namespace.
    fn dump(&self, family: u8) -> io::Result<Vec<DiagSocket>> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        self.send(&request(SOCK_DIAG_BY_FAMILY, flags, 1, family, UDP_CONNECTED, &[0; SOCKID_LEN]))?;
        let mut sockets = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let reply = self.recv(&mut buf)?;
            for (kind, payload) in messages(reply) {
                match kind {
                    NLMSG_DONE => return Ok(sockets),
                    NLMSG_ERROR => return Err(io::Error::from_raw_os_error(-error_of(payload))),
                    SOCK_DIAG_BY_FAMILY if payload.len() >= MSG_LEN => sockets
                        .push(DiagSocket { family: payload[0], id: payload[4..4 + SOCKID_LEN].try_into().unwrap() }),
                    _ => {}
                }
            }
        }
    }

    /// Destroys one socket; Ok(false) when it was gone already.
    fn destroy(&self, socket: &DiagSocket) -> io::Result<bool> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        self.send(&request(SOCK_DESTROY, flags, 2, socket.family, u32::MAX, &socket.id))?;
        let mut buf = [0u8; 512];
        let reply = self.recv(&mut buf)?;
        match messages(reply).find(|(kind, _)| *kind == NLMSG_ERROR).map(|(_, p)| -error_of(p)) {
            Some(0) | None => Ok(true),
            Some(libc::ENOENT) => Ok(false),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

impl Drop for DiagSocketFd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// In the calling thread's network namespace, destroys the connected UDP
/// sockets (AF_INET and AF_INET6) whose peer is one of `backends` and,
/// when `cookies` is given, whose cookie is one of them. Returns how many
/// were destroyed.
pub fn destroy_udp_sockets_to(backends: &BTreeSet<SocketAddr>, cookies: Option<&BTreeSet<u64>>) -> io::Result<usize> {
    let diag = DiagSocketFd::open().map_err(|e| io::Error::new(e.kind(), format!("opening sock_diag: {e}")))?;
    let mut destroyed = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let sockets = diag.dump(family).map_err(|e| io::Error::new(e.kind(), format!("listing UDP sockets: {e}")))?;
        for socket in sockets {
            let wanted = socket.peer().is_some_and(|peer| backends.contains(&peer))
                && cookies.is_none_or(|c| c.contains(&socket.cookie()));
            if wanted
                && diag.destroy(&socket).map_err(|e| {
                    io::Error::new(e.kind(), format!("SOCK_DESTROY (needs CONFIG_INET_DIAG_DESTROY): {e}"))
                })?
            {
                destroyed += 1;
            }
        }
    }
    Ok(destroyed)
}

/// The network namespaces of this machine's processes (as /proc shows them:
/// a containerised agent needs the host's PID namespace), one path each,
/// without the caller's own.
fn other_netns() -> Vec<PathBuf> {
    let own = fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino())).ok();
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        let Ok(meta) = fs::metadata(&path) else { continue };
        let id = (meta.dev(), meta.ino());
        if Some(id) != own && seen.insert(id) {
            paths.push(path);
        }
    }
    paths
}

/// `destroy_udp_sockets_to` with `cookies`, in this network namespace and
/// in every other one a process of the machine is in (`--socket-lb all`
/// translates pods' sockets too). A namespace that vanishes meanwhile is
/// skipped.
pub fn destroy_udp_sockets_in_every_netns(
    backends: &BTreeSet<SocketAddr>,
    cookies: &BTreeSet<u64>,
) -> io::Result<usize> {
    let mut destroyed = destroy_udp_sockets_to(backends, Some(cookies))?;
    for path in other_netns() {
        let Ok(netns) = fs::File::open(&path) else { continue };
        // A thread of its own: setns moves only the calling thread.
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a valid descriptor; only this thread moves.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    destroy_udp_sockets_to(backends, Some(cookies))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
        });
        match result {
            Ok(n) => destroyed += n,
            Err(e) => tracing::debug!(netns = %path.display(), "destroying UDP sockets: {e}"),
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockid(dport: u16, dst: [u8; 16], cookie: u64) -> [u8; SOCKID_LEN] {
        let mut id = [0u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&dport.to_be_bytes());
        id[20..36].copy_from_slice(&dst);
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        id
    }

    #[test]
    fn peers_and_cookies_are_read_from_the_sockid() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 1, 2, 3]);
        let socket = DiagSocket { family: libc::AF_INET as u8, id: sockid(53, v4, 0x1_0000_0002) };
        assert_eq!(socket.peer(), Some("10.1.2.3:53".parse().unwrap()));
        assert_eq!(socket.cookie(), 0x1_0000_0002);
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3];
        let socket = DiagSocket { family: libc::AF_INET6 as u8, id: sockid(53, mapped, 7) };
        assert_eq!(socket.peer(), Some("10.1.2.3:53".parse().unwrap()));
        let native = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let socket = DiagSocket { family: libc::AF_INET6 as u8, id: sockid(53, native, 7) };
        assert_eq!(socket.peer(), Some("[fd00::1]:53".parse().unwrap()));
    }

    #[test]
    fn requests_are_laid_out_as_the_kernel_reads_them() {
        let id = sockid(53, [1; 16], 9);
        let message = request(SOCK_DESTROY, 5, 2, libc::AF_INET as u8, u32::MAX, &id);
        assert_eq!(message.len(), NLMSG_HDRLEN + REQ_LEN);
        assert_eq!(u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize, message.len());
        assert_eq!(u16::from_ne_bytes(message[4..6].try_into().unwrap()), SOCK_DESTROY);
        assert_eq!(message[16..18], [libc::AF_INET as u8, libc::IPPROTO_UDP as u8]);
        assert_eq!(message[24..], id);
        let parsed: Vec<(u16, usize)> = messages(&message).map(|(k, p)| (k, p.len())).collect();
        assert_eq!(parsed, [(SOCK_DESTROY, REQ_LEN)]);
    }
}
