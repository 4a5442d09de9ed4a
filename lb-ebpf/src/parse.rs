//! Header parsing by direct packet access, shared by every hook.
use core::mem::size_of;

use lb_common::{Ipv4, Ipv6, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use crate::family::Family;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;
/// An ICMP error the datapath sends: RFC 792's quote of the offending IP
/// header and the first 8 bytes of its payload, after its own headers.
pub const ICMP_REPLY_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + 8;
/// An ICMPv6 error the datapath sends: its headers, then the offending
/// IPv6 header and the first 8 bytes of its payload.
pub const ICMP6_REPLY_LEN: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + IPV6_HLEN + 8;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
pub const IPV6_HLEN: usize = 40;
/// Extension headers walked before giving up on a packet (which then
/// passes untranslated, as Cilium does after its 4).
const IPV6_MAX_EXTENSIONS: usize = 4;
/// How far into the frame an IPv6 packet's TCP or UDP header may end: the
/// rewrite reaches fields within 256 bytes of the frame's start
/// (`nat::MAX_HEADER_OFFSET`). A packet whose extension headers push its
/// ports further passes untranslated. Also what the tc hook pulls into
/// the linear part of an skb for an IPv6 packet.
pub const MAX_HEADERS_LEN6: usize = 256;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
pub const PROTO_ICMPV6: u8 = 58;
/// Ethernet, the longest IPv4 header and a TCP header without options: what
/// a hook must be able to read to translate a packet.
pub const MAX_HEADERS_LEN: usize = ETH_HLEN + 60 + 20;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: [u8; 2],
}

/// Declared 4-byte aligned, though behind a 14-byte Ethernet header it
/// is at best 2-aligned: the compiler then reads each address in one load
/// instead of four byte loads and the shifts that join them (about a
/// fifth of the instructions of a packet that is no service's). Every
/// architecture this runs on has efficient unaligned access, so the
/// verifier checks no alignment of packet reads (it would with
/// BPF_F_STRICT_ALIGNMENT, which the agent does not set).
#[repr(C, align(4))]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

/// The fixed IPv6 header (RFC 8200), read whole.
#[repr(C, align(4))]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    saddr: Ipv6,
    daddr: Ipv6,
}

/// The ports of a TCP or UDP header, one word (declared aligned as
/// `Ipv4Hdr` is, for the same reason).
#[repr(C, align(4))]
struct Ports {
    source: [u8; 2],
    destination: [u8; 2],
}

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;

/// A TCP or UDP packet of either family, reduced to what NAT needs.
pub struct Packet<A = Ipv4> {
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub protocol: u8,
    pub saddr: A,
    pub daddr: A,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub tcp_syn: bool,
    /// A TCP FIN or RST: the connection is ending.
    pub tcp_closing: bool,
}

impl Packet<Ipv4> {
    pub fn ip_check_offset(&self) -> usize {
        self.l3_offset + 10
    }
}

impl<A: Family> Packet<A> {
    pub fn saddr_offset(&self) -> usize {
        self.l3_offset + A::SADDR_OFFSET
    }

    pub fn daddr_offset(&self) -> usize {
        self.l3_offset + A::DADDR_OFFSET
    }

    pub fn sport_offset(&self) -> usize {
        self.l4_offset
    }

    pub fn dport_offset(&self) -> usize {
        self.l4_offset + 2
    }

    pub fn l4_check_offset(&self) -> usize {
        self.l4_offset + if self.protocol == PROTO_TCP { TCP_CHECK_OFFSET } else { UDP_CHECK_OFFSET }
    }
}

/// Why a packet was not parsed.
pub enum Unparsed {
    /// Not TCP/UDP, or a non-first fragment: nothing to translate.
    NotTranslatable,
    /// An IPv6 frame: for `parse6`.
    Ipv6,
    /// The headers run past the readable data.
    Short,
    /// ICMP: maybe an error about a translated flow (see `icmp::translate_error`).
    Icmp,
}

#[inline(always)]
fn at<T>(data: usize, data_end: usize, offset: usize) -> Result<*const T, Unparsed> {
    if data + offset + size_of::<T>() > data_end {
        return Err(Unparsed::Short);
    }
    Ok((data + offset) as *const T)
}

/// Parses Ethernet, IPv4 and the TCP or UDP header in `[data, data_end)`.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Packet, Unparsed> {
    let eth = at::<EthHdr>(data, data_end, 0)?;
    // SAFETY: `at` checked the bounds.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != ETH_P_IP {
        return Err(if ether_type == ETH_P_IPV6 { Unparsed::Ipv6 } else { Unparsed::NotTranslatable });
    }
    let l3_offset = ETH_HLEN;
    let ip = at::<Ipv4Hdr>(data, data_end, l3_offset)?;
    // SAFETY: `at` checked the bounds.
    let (version_ihl, frag_off, protocol, saddr, daddr) =
        unsafe { ((*ip).version_ihl, (*ip).frag_off, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Unparsed::NotTranslatable);
    }
    // A non-zero fragment offset means no L4 header in this packet.
    if (frag_off[0] & 0x1f) != 0 || frag_off[1] != 0 {
        return Err(Unparsed::NotTranslatable);
    }
    if protocol == PROTO_ICMP {
        return Err(Unparsed::Icmp);
    }
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Err(Unparsed::NotTranslatable);
    }
    let l4_offset = l3_offset + ihl * 4;
    let (sport, dport, tcp_syn, tcp_closing) = parse_l4(data, data_end, l4_offset, protocol)?;
    Ok(Packet { l3_offset, l4_offset, protocol, saddr, daddr, sport, dport, tcp_syn, tcp_closing })
}

/// The ports and TCP flags (SYN without ACK, FIN or RST) of the TCP or UDP
/// header at `l4_offset`.
#[inline(always)]
fn parse_l4(
    data: usize,
    data_end: usize,
    l4_offset: usize,
    protocol: u8,
) -> Result<([u8; 2], [u8; 2], bool, bool), Unparsed> {
    // Every L4 field is read through the one pointer whose bounds were
    // checked: the verifier loses track of a pointer rebuilt from an offset.
    let (ports, tcp_flags) = if protocol == PROTO_TCP {
        // The whole fixed TCP header must be there: its checksum gets rewritten.
        let tcp = at::<[u8; TCP_HLEN]>(data, data_end, l4_offset)?;
        // SAFETY: `at` checked the bounds, which cover the ports.
        unsafe { (core::ptr::read(tcp as *const Ports), (*tcp)[TCP_FLAGS_OFFSET]) }
    } else {
        let udp = at::<[u8; UDP_HLEN]>(data, data_end, l4_offset)?;
        // SAFETY: as above.
        unsafe { (core::ptr::read(udp as *const Ports), 0) }
    };
    let (sport, dport) = (ports.source, ports.destination);
    let tcp_syn = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let tcp_closing = tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
    Ok((sport, dport, tcp_syn, tcp_closing))
}

/// Parses Ethernet, IPv6, up to `IPV6_MAX_EXTENSIONS` extension headers
/// (hop-by-hop, routing, destination options, fragment, authentication)
/// and the TCP or UDP header. ICMPv6 (NDP among it) and anything past the
/// extensions walked are not translatable: they pass untouched.
#[inline(always)]
pub fn parse6(data: usize, data_end: usize) -> Result<Packet<Ipv6>, Unparsed> {
    let eth = at::<EthHdr>(data, data_end, 0)?;
    // SAFETY: `at` checked the bounds.
    if unsafe { (*eth).ether_type } != ETH_P_IPV6 {
        return Err(Unparsed::NotTranslatable);
    }
    let l3_offset = ETH_HLEN;
    let ip = at::<Ipv6Hdr>(data, data_end, l3_offset)?;
    // SAFETY: `at` checked the bounds.
    let (version, mut next, saddr, daddr) =
        unsafe { ((*ip).version_class_flow[0] >> 4, (*ip).next_header, (*ip).saddr, (*ip).daddr) };
    if version != 6 {
        return Err(Unparsed::NotTranslatable);
    }
    // ICMPv6 right after the header: maybe an error about a translated
    // flow (`icmp::translate_error6`); NDP and the rest pass untouched.
    if next == PROTO_ICMPV6 {
        return Err(Unparsed::Icmp);
    }
    let mut offset = l3_offset + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXTENSIONS {
        if next == PROTO_TCP || next == PROTO_UDP {
            break;
        }
        let ext = at::<[u8; 8]>(data, data_end, offset)?;
        // SAFETY: `at` checked the bounds.
        let ext = unsafe { *ext };
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => (ext[1] as usize + 1) * 8,
            NEXTHDR_AUTH => (ext[1] as usize + 2) * 4,
            NEXTHDR_FRAGMENT => {
                // A non-zero fragment offset means no L4 header here.
                if ext[2] != 0 || ext[3] & 0xf8 != 0 {
                    return Err(Unparsed::NotTranslatable);
                }
                8
            }
            // ICMPv6, ESP, no next header, or anything else.
            _ => return Err(Unparsed::NotTranslatable),
        };
        next = ext[0];
        offset += len;
    }
    if next != PROTO_TCP && next != PROTO_UDP || offset + 20 > MAX_HEADERS_LEN6 {
        return Err(Unparsed::NotTranslatable);
    }
    let (sport, dport, tcp_syn, tcp_closing) = parse_l4(data, data_end, offset, next)?;
    Ok(Packet { l3_offset, l4_offset: offset, protocol: next, saddr, daddr, sport, dport, tcp_syn, tcp_closing })
}

/// A family's parser and how much of an skb it reads (`skb::parse`).
pub trait Parse: Family {
    const MAX_HEADERS_LEN: usize;
    fn parse(data: usize, data_end: usize) -> Result<Packet<Self>, Unparsed>;
}

impl Parse for Ipv4 {
    const MAX_HEADERS_LEN: usize = MAX_HEADERS_LEN;

    #[inline(always)]
    fn parse(data: usize, data_end: usize) -> Result<Packet<Self>, Unparsed> {
        parse(data, data_end)
    }
}

impl Parse for Ipv6 {
    const MAX_HEADERS_LEN: usize = MAX_HEADERS_LEN6;

    #[inline(always)]
    fn parse(data: usize, data_end: usize) -> Result<Packet<Self>, Unparsed> {
        parse6(data, data_end)
    }
}
