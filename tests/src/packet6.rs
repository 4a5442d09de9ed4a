//! Ethernet/IPv6/TCP/UDP frames with correct checksums (the pseudo-header
//! of RFC 8200 §8.1), optional extension headers, and readers that check
//! them: `packet`'s counterpart for IPv6.
use std::net::{Ipv6Addr, SocketAddrV6};

use crate::packet::{TCP, UDP, l4_segment};

pub const HOP_BY_HOP: u8 = 0;
pub const DESTINATION_OPTIONS: u8 = 60;
pub const FRAGMENT: u8 = 44;
pub const ICMPV6: u8 = 58;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_PORT_UNREACH: u8 = 4;
pub const NEIGHBOR_SOLICITATION: u8 = 135;

#[derive(Clone, Debug)]
pub struct Spec6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Extension headers before the TCP or UDP header, in order: (type,
    /// body after the next-header byte). Hop-by-hop and destination
    /// options bodies are padded to a multiple of 8 bytes with the length
    /// byte; a fragment header's body is its 7 bytes.
    pub extensions: Vec<(u8, Vec<u8>)>,
}

impl Spec6 {
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Self { src, dst, protocol: TCP, tcp_flags: flags, payload: b"hello".to_vec(), extensions: vec![] }
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self { protocol: UDP, tcp_flags: 0, ..Self::tcp(src, dst, 0) }
    }

    /// With an empty destination options header (PadN) before the ports.
    pub fn with_destination_options(mut self) -> Self {
        self.extensions.push((DESTINATION_OPTIONS, vec![0, 1, 4, 0, 0, 0, 0]));
        self
    }

    /// With a hop-by-hop options header of `8 * (1 + len)` bytes (PadN).
    pub fn with_hop_by_hop(mut self, len: u8) -> Self {
        let pad = 8 * (usize::from(len) + 1) - 4;
        let mut body = vec![len, 1, pad as u8];
        body.extend(vec![0; pad]);
        self.extensions.push((HOP_BY_HOP, body));
        self
    }

    /// As a fragment at `offset` (in 8-byte units) of a larger datagram.
    pub fn fragment(mut self, offset: u16) -> Self {
        let field = (offset << 3) | 1; // more fragments
        let [a, b] = field.to_be_bytes();
        self.extensions.push((FRAGMENT, vec![0, a, b, 0, 0, 0, 7]));
        self
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

/// The checksum of an upper-layer `segment` (TCP, UDP, ICMPv6) over the
/// IPv6 pseudo-header.
pub fn checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((segment.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, next_header]);
    fold(sum_words(&pseudo) + sum_words(segment))
}

pub fn build6(spec: &Spec6) -> Vec<u8> {
    let ports = (spec.src.port(), spec.dst.port());
    let l4 = l4_segment(ports, spec.protocol, spec.tcp_flags, &spec.payload, false, |segment| {
        checksum6(spec.src.ip(), spec.dst.ip(), spec.protocol, segment)
    });
    // Extension headers, each naming the next.
    let mut extensions = Vec::new();
    let kinds: Vec<u8> = spec.extensions.iter().map(|(kind, _)| *kind).chain([spec.protocol]).collect();
    for (i, (_, body)) in spec.extensions.iter().enumerate() {
        extensions.push(kinds[i + 1]);
        extensions.extend(body);
    }
    let first = kinds[0];
    ipv6_frame(first, spec.src.ip(), spec.dst.ip(), &[extensions, l4].concat())
}

/// An Ethernet frame with an IPv6 header (next header `next`) and `payload`.
pub fn ipv6_frame(next: u8, src: &Ipv6Addr, dst: &Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    frame.extend([0x60, 0, 0, 0]);
    frame.extend((payload.len() as u16).to_be_bytes());
    frame.extend([next, 64]);
    frame.extend(src.octets());
    frame.extend(dst.octets());
    frame.extend(payload);
    frame
}

/// A neighbour solicitation for `target`, from `src` (NDP, which the
/// datapath must leave alone).
pub fn neighbor_solicitation(src: &Ipv6Addr, target: &Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend(target.octets());
    let c = checksum6(src, target, ICMPV6, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6_frame(ICMPV6, src, target, &icmp)
}

/// An ICMPv6 error (`kind`, `code`, and `mtu` for Packet Too Big) from
/// `from` to `to`, quoting `quoted` (an IPv6 packet, without Ethernet).
pub fn icmp6_error(from: &Ipv6Addr, to: &Ipv6Addr, kind: u8, code: u8, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend(mtu.to_be_bytes());
    icmp.extend(quoted);
    let c = checksum6(from, to, ICMPV6, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6_frame(ICMPV6, from, to, &icmp)
}

/// An IPv6 TCP or UDP frame as read back, its checksum verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen6 {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub l4_checksum_ok: bool,
    pub payload: Vec<u8>,
}

/// Reads a frame `build6` could have built (extension headers walked).
pub fn read6(frame: &[u8]) -> Seen6 {
    assert_eq!(&frame[12..14], &[0x86, 0xdd], "an IPv6 frame");
    let ip = &frame[14..];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let (mut next, mut at) = (ip[6], 40);
    while next != TCP && next != UDP {
        let len = if next == FRAGMENT { 8 } else { (usize::from(ip[at + 1]) + 1) * 8 };
        next = ip[at];
        at += len;
    }
    let l4 = &ip[at..];
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let payload = if next == TCP { l4[20..].to_vec() } else { l4[8..].to_vec() };
    Seen6 {
        src: SocketAddrV6::new(src, port(0), 0, 0),
        dst: SocketAddrV6::new(dst, port(2), 0, 0),
        l4_checksum_ok: checksum6(&src, &dst, next, l4) == 0,
        payload,
    }
}

/// An ICMPv6 error as read back.
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIcmp6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub kind: u8,
    pub code: u8,
    pub checksum_ok: bool,
    /// The quoted packet's addresses and ports.
    pub quoted: (SocketAddrV6, SocketAddrV6),
    /// The destination MAC, then the source.
    pub macs: ([u8; 6], [u8; 6]),
    /// The 4 bytes after the checksum (Packet Too Big's MTU).
    pub rest: u32,
}

pub fn read_icmp6(frame: &[u8]) -> SeenIcmp6 {
    assert_eq!(&frame[12..14], &[0x86, 0xdd], "an IPv6 frame");
    let ip = &frame[14..];
    assert_eq!(ip[6], ICMPV6, "an ICMPv6 message");
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
    let (src, dst) = (addr(8), addr(24));
    let length = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let icmp = &ip[40..40 + length];
    let quote = &icmp[8..];
    let quoted_port = |at: usize| u16::from_be_bytes([quote[40 + at], quote[41 + at]]);
    let quoted_addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&quote[at..at + 16]).unwrap());
    SeenIcmp6 {
        src,
        dst,
        kind: icmp[0],
        code: icmp[1],
        checksum_ok: checksum6(&src, &dst, ICMPV6, icmp) == 0,
        quoted: (
            SocketAddrV6::new(quoted_addr(8), quoted_port(0), 0, 0),
            SocketAddrV6::new(quoted_addr(24), quoted_port(2), 0, 0),
        ),
        macs: (frame[..6].try_into().unwrap(), frame[6..12].try_into().unwrap()),
        rest: u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
    }
}
