//! Ethernet/IPv4/TCP/UDP packets with correct checksums, and a reader that
//! checks them, for feeding the datapath through BPF_PROG_TEST_RUN.
use std::net::{Ipv4Addr, SocketAddrV4};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Spec {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Extra IPv4 option bytes (a multiple of 4).
    pub ip_options: Vec<u8>,
    /// Send a UDP checksum of 0 ("no checksum").
    pub udp_no_checksum: bool,
}

impl Spec {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src,
            dst,
            protocol: TCP,
            tcp_flags: flags,
            payload: b"hello".to_vec(),
            ip_options: vec![],
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self { protocol: UDP, tcp_flags: 0, ..Self::tcp(src, dst, 0) }
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, protocol]);
    pseudo.extend((segment.len() as u16).to_be_bytes());
    fold(sum_words(&pseudo) + sum_words(segment))
}

/// A TCP (with `tcp_flags`) or UDP header and `payload`, its checksum
/// from `checksum` (given the segment with a zero checksum field) unless
/// `no_udp_checksum`: for either family.
pub fn l4_segment(
    ports: (u16, u16),
    protocol: u8,
    tcp_flags: u8,
    payload: &[u8],
    no_udp_checksum: bool,
    checksum: impl Fn(&[u8]) -> u16,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(ports.0.to_be_bytes());
    l4.extend(ports.1.to_be_bytes());
    if protocol == TCP {
        l4.extend(1000u32.to_be_bytes()); // seq
        l4.extend(0u32.to_be_bytes()); // ack
        l4.extend([5 << 4, tcp_flags]);
        l4.extend(65535u16.to_be_bytes()); // window
        l4.extend([0, 0, 0, 0]); // checksum, urgent
        l4.extend(payload);
        let c = checksum(&l4);
        l4[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        l4.extend(((8 + payload.len()) as u16).to_be_bytes());
        l4.extend([0, 0]);
        l4.extend(payload);
        if !no_udp_checksum {
            let c = checksum(&l4);
            l4[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
        }
    }
    l4
}

pub fn build(spec: &Spec) -> Vec<u8> {
    let (src, dst) = (*spec.src.ip(), *spec.dst.ip());
    let ports = (spec.src.port(), spec.dst.port());
    let l4 = l4_segment(ports, spec.protocol, spec.tcp_flags, &spec.payload, spec.udp_no_checksum, |segment| {
        l4_checksum(src, dst, spec.protocol, segment)
    });
    ipv4_frame(0, 0x40, spec.protocol, *spec.src.ip(), *spec.dst.ip(), &spec.ip_options, &l4)
}

/// An Ethernet frame carrying an IPv4 header (with `tos`, the flags byte
/// `flags`, `options`) and `payload`, its checksum computed.
fn ipv4_frame(
    tos: u8,
    flags: u8,
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let mut ip = vec![0x40 | ihl as u8, tos];
    ip.extend(((ihl * 4 + payload.len()) as u16).to_be_bytes());
    ip.extend([0, 1, flags, 0, 64, protocol, 0, 0]); // id, flags, ttl, proto, checksum
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(options);
    let c = fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    frame.extend(ip);
    frame.extend(payload);
    frame
}

/// A packet as read back, with its checksums verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ip_checksum_ok: bool,
    /// None for a UDP packet without checksum.
    pub l4_checksum_ok: Option<bool>,
    pub payload: Vec<u8>,
}

pub fn read(frame: &[u8]) -> Seen {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let protocol = ip[9];
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let (l4_checksum_ok, payload) = if protocol == TCP {
        (Some(l4_checksum(src_ip, dst_ip, TCP, l4) == 0), l4[20..].to_vec())
    } else {
        let none = l4[6] == 0 && l4[7] == 0;
        ((!none).then(|| l4_checksum(src_ip, dst_ip, UDP, l4) == 0), l4[8..].to_vec())
    };
    Seen {
        src: SocketAddrV4::new(src_ip, port(0)),
        dst: SocketAddrV4::new(dst_ip, port(2)),
        ip_checksum_ok: fold(sum_words(&ip[..ihl])) == 0,
        l4_checksum_ok,
        payload,
    }
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_PORT_UNREACH: u8 = 3;

/// An ICMP error from `from` to `to` quoting `quoted` (a frame as `build`
/// makes it): its IP header and, as Linux does, the rest of it.
pub fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, code: u8, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ICMP_DEST_UNREACH, code, 0, 0, 0, 0];
    icmp.extend(mtu.to_be_bytes());
    icmp.extend(&quoted[14..]);
    let c = fold(sum_words(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    // Internetwork control, as Linux sends its ICMP errors.
    ipv4_frame(0xc0, 0, 1, from, to, &[], &icmp)
}

/// An ICMP error as read back: its addresses, the quoted packet's, and
/// whether the checksums that cover them hold.
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIcmpError {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub quoted_src: SocketAddrV4,
    pub quoted_dst: SocketAddrV4,
    /// The outer IP, ICMP and quoted IP header checksums.
    pub checksums_ok: bool,
}

pub fn read_icmp_error(frame: &[u8]) -> SeenIcmpError {
    let ip = &frame[14..];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let icmp = &ip[20..total];
    let quoted = &icmp[8..];
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |o: usize| u16::from_be_bytes([quoted[20 + o], quoted[21 + o]]);
    SeenIcmpError {
        from: addr(&ip[12..]),
        to: addr(&ip[16..]),
        quoted_src: SocketAddrV4::new(addr(&quoted[12..]), port(0)),
        quoted_dst: SocketAddrV4::new(addr(&quoted[16..]), port(2)),
        checksums_ok: [&ip[..20], icmp, &quoted[..20]].iter().all(|b| fold(sum_words(b)) == 0),
    }
}
