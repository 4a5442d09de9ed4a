//! A reference model of the packet hooks (`tc_from_pod`, and
//! `tc_from_wire` and `xdp_from_wire` on external interfaces), written
//! from ARCHITECTURE.md's packet flow rather than from the programs: given
//! a frame and the maps as they are, what the hook must do with it. The
//! differential test (`tests/differential.rs`) runs random frames through
//! the real program with BPF_PROG_TEST_RUN and through this, over the same
//! maps, and reports any frame on which they disagree.
//!
//! Covered: which frames are parsed at all (Ethernet, IPv4 with options,
//! fragments, TCP/UDP headers, truncation); for the first packet of a
//! flow the decision (`explain`: frontend, view, source ranges, refusal,
//! affinity, Maglev, random) and the rewrite, hairpin included; for a
//! packet of a flow conntrack knows, the rewrite its entry says (requests
//! and replies, hairpin included) if the entry is live and the packet is
//! no SYN restarting it, and the state the entry moves to; ICMP errors
//! (destination unreachable, time exceeded) quoting a packet of a tracked
//! flow, rewritten to quote what the other end sent and readdressed to
//! it. At the external hooks, a client's flow to a backend on another
//! node is source-NATed and forwarded, as the node's routes (`Routes`)
//! say. `Unmodelled`: a source port already taken toward that backend (a
//! random one is drawn), and ICMP errors about source-NATed flows.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use lb_common::{
    AffinityKey, AffinityValue, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN, CT_DIRECTION_HAIRPIN_REPLY,
    CT_DIRECTION_REVERSE_SNAT, CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_NEW, CtKey, CtValue, HAIRPIN_ADDR, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};

use crate::{
    explain::{self, Flow, Hook, MapLookups, Verdict},
    model::Protocol,
    plan::MapContents,
};

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;

/// What the pod hook must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Handed to the stack as it came.
    Unchanged,
    /// Dropped (an undefined port of a cluster IP, a source range, a
    /// Local policy without local endpoints).
    Dropped,
    /// Refused: answered with ICMP port unreachable, sent back out.
    Rejected,
    /// Sent on with this source and destination (checksums updated);
    /// `forward`: routed on from the hook (a source-NATed flow), with this
    /// next hop, rather than handed to the stack.
    Translated { source: SocketAddrV4, destination: SocketAddrV4, tracked: Tracked, forward: Option<NextHop> },
    /// An ICMP error about a tracked flow, passed on: from `source` to
    /// `destination` (outer addresses), quoting a packet from `quoted_source`
    /// to `quoted_destination`; checksums updated.
    IcmpTranslated {
        source: Ipv4Addr,
        destination: Ipv4Addr,
        quoted_source: SocketAddrV4,
        quoted_destination: SocketAddrV4,
    },
    /// Outside what the model covers; not compared.
    Unmodelled(&'static str),
}

/// What the node's routes say, as the external hooks' FIB lookups see them.
pub trait Routes {
    /// The address the node sends from toward `to`; None without a route.
    fn source_toward(&self, to: Ipv4Addr) -> Option<Ipv4Addr>;
    /// Where a packet to `to` goes next.
    fn next_hop(&self, to: Ipv4Addr) -> NextHop;
}

/// The next hop of a forwarded frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// No route for the hook to use (or a TTL about to run out): the stack
    /// routes the translated frame, unchanged otherwise.
    Stack,
    /// Out of `ifindex` to the neighbour `dmac`, from `smac`; TTL down by one.
    Out { ifindex: u32, smac: [u8; 6], dmac: [u8; 6] },
    /// Out of `ifindex`, the neighbour's MAC still to be resolved (tc
    /// only; XDP leaves it to the stack); TTL down by one.
    Unresolved { ifindex: u32 },
}

/// What conntrack holds for a translated frame's flow afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracked {
    /// A new flow: its entry (at the frame's key) rewrites to this backend.
    New { backend: SocketAddrV4 },
    /// A known flow: its entry at the frame's key now has this state, and
    /// so does the other direction's entry when the packet ends the flow.
    Known { state: u8, peer_closing: bool },
}

/// The fields of a parsed frame the hook acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub l4_offset: usize,
    pub protocol: u8,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub ttl: u8,
    /// A TCP SYN without ACK: a new connection.
    pub tcp_syn: bool,
    /// A TCP FIN or RST: the connection ends.
    pub tcp_closing: bool,
}

/// Parses a frame as the hooks do: Ethernet, IPv4 (any header length from
/// 20 bytes, no check of total length or checksum), first fragments only,
/// and a whole TCP (20 bytes) or UDP (8 bytes) header. `Err` says why not,
/// with ICMP apart.
pub fn parse(frame: &[u8]) -> Result<Headers, &'static str> {
    if frame.len() < ETH_HLEN + IPV4_HLEN {
        return Err("short");
    }
    if frame[12..14] != [0x08, 0x00] {
        return Err("not IPv4");
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f);
    if ip[0] >> 4 != 4 || ihl < 5 {
        return Err("bad IPv4 header");
    }
    if ip[6] & 0x1f != 0 || ip[7] != 0 {
        return Err("a later fragment");
    }
    let protocol = ip[9];
    if protocol == PROTO_ICMP {
        return Err("ICMP");
    }
    let l4_offset = ETH_HLEN + ihl * 4;
    let l4_len = match protocol {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return Err("not TCP or UDP"),
    };
    if frame.len() < l4_offset + l4_len {
        return Err("short");
    }
    let l4 = &frame[l4_offset..];
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let flags = if protocol == PROTO_TCP { l4[13] } else { 0 };
    Ok(Headers {
        l4_offset,
        protocol,
        source: SocketAddrV4::new(addr(12), port(0)),
        destination: SocketAddrV4::new(addr(16), port(2)),
        ttl: ip[8],
        tcp_syn: flags & 0x12 == 0x02,
        tcp_closing: flags & 0x05 != 0,
    })
}

/// What `tc_from_pod` (`Hook::Pod`) or an external interface's program
/// (`Hook::Wire`, with the node's `routes`) must do with `frame`, given
/// the maps.
pub fn expected(
    hook: Hook,
    frame: &[u8],
    contents: &MapContents,
    lookups: &dyn MapLookups,
    routes: &dyn Routes,
    maglev_table_size: u32,
) -> Expected {
    let headers = match parse(frame) {
        Ok(headers) => headers,
        Err("ICMP") => return icmp_error(frame, lookups),
        Err(_) => return Expected::Unchanged,
    };
    let key = CtKey {
        saddr: headers.source.ip().octets(),
        daddr: headers.destination.ip().octets(),
        sport: headers.source.port().to_be_bytes(),
        dport: headers.destination.port().to_be_bytes(),
        protocol: headers.protocol,
        _pad: [0; 3],
    };
    // Neither to a frontend nor from a backend, by the endpoint filter.
    if !crate::filter::lets_through(&key, lookups) {
        return Expected::Unchanged;
    }
    if let Some(entry) = lookups.conntrack(&key) {
        let live = lookups.now_ns().wrapping_sub(entry.last_seen_ns) < entry.timeout_ns(headers.protocol);
        // A SYN starts a connection anew: a reused port picks afresh.
        if live && !(entry.is_forward() && headers.tcp_syn) {
            // An entry of no known direction counts as none.
            if let Some(expected) = known_flow(&headers, &entry, routes) {
                return expected;
            }
        }
    }
    let protocol = if headers.protocol == PROTO_TCP { Protocol::Tcp } else { Protocol::Udp };
    let flow = Flow {
        client: (*headers.source.ip()).into(),
        client_port: Some(headers.source.port()),
        service: headers.destination.into(),
        protocol,
    };
    // The decision for a new flow: whatever conntrack holds is stale here.
    let answer = explain::explain(contents, &Untracked(lookups), maglev_table_size, flow, hook);
    // The frame is IPv4, and so is every address the answer holds.
    let backend = match answer.backend {
        Some(SocketAddr::V4(backend)) => Some(backend),
        _ => None,
    };
    match answer.verdict {
        Verdict::NotService => Expected::Unchanged,
        Verdict::UnknownPort | Verdict::SourceRangeDenied | Verdict::Dropped => Expected::Dropped,
        // The refusal quotes a 20-byte IP header: with options the packet
        // is only dropped (ARCHITECTURE.md).
        Verdict::Refused if headers.l4_offset != ETH_HLEN + IPV4_HLEN => Expected::Dropped,
        Verdict::Refused => Expected::Rejected,
        Verdict::Established => Expected::Unmodelled("explained as tracked"),
        Verdict::New if answer.source_nat => {
            let Some(backend) = backend else {
                return Expected::Unmodelled("a new flow without a known backend");
            };
            // From the address the node has toward the backend; no route
            // there, no source NAT: dropped.
            let Some(node) = routes.source_toward(*backend.ip()) else { return Expected::Dropped };
            // The client's port, unless another flow already has it toward
            // that backend (then a random one: not modelled).
            let reply = CtKey {
                saddr: backend.ip().octets(),
                daddr: node.octets(),
                sport: backend.port().to_be_bytes(),
                dport: headers.source.port().to_be_bytes(),
                protocol: headers.protocol,
                _pad: [0; 3],
            };
            let client = (headers.source.ip().octets(), headers.source.port().to_be_bytes());
            if lookups.conntrack(&reply).is_some_and(|e| (e.snat_addr, e.snat_port) != client) {
                return Expected::Unmodelled("a source port taken toward the backend");
            }
            Expected::Translated {
                source: SocketAddrV4::new(node, headers.source.port()),
                destination: backend,
                tracked: Tracked::New { backend },
                forward: Some(next_hop(routes, *backend.ip(), headers.ttl)),
            }
        }
        Verdict::New => match backend {
            // A pod reaching itself through its Service: the source becomes
            // the hairpin address, so the reply comes back through here.
            Some(backend) => {
                let source = if *backend.ip() == flow.client {
                    SocketAddrV4::new(HAIRPIN_ADDR.into(), headers.source.port())
                } else {
                    headers.source
                };
                Expected::Translated { source, destination: backend, tracked: Tracked::New { backend }, forward: None }
            }
            None => Expected::Unmodelled("a new flow without a known backend"),
        },
    }
}

/// The lookups of `explain` with conntrack empty: a frame that reaches
/// the decision is a new flow whatever stale entry its key has.
struct Untracked<'a>(&'a dyn MapLookups);

impl MapLookups for Untracked<'_> {
    fn conntrack(&self, _: &CtKey) -> Option<CtValue> {
        None
    }
    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.0.affinity(key)
    }
    fn maglev(&self, index: u32) -> Option<u32> {
        self.0.maglev(index)
    }
    fn flow_seed(&self) -> u32 {
        self.0.flow_seed()
    }
    fn endpoint_filter(&self, line: u32) -> Option<lb_common::FilterLine> {
        self.0.endpoint_filter(line)
    }
    fn endpoint_filter_bits_log2(&self) -> u32 {
        self.0.endpoint_filter_bits_log2()
    }
    fn now_ns(&self) -> u64 {
        self.0.now_ns()
    }
}

/// Where a frame to `to` goes, as `next_hop` in the hooks: the FIB's
/// answer, or the stack when the TTL would run out.
fn next_hop(routes: &dyn Routes, to: Ipv4Addr, ttl: u8) -> NextHop {
    match routes.next_hop(to) {
        NextHop::Stack => NextHop::Stack,
        _ if ttl <= 1 => NextHop::Stack,
        hop => hop,
    }
}

/// Where an entry sends a packet of its flow from `source` to
/// `destination`: the new source and destination, and whether the hook
/// routes it on (source-NATed flows). `None` for a direction the hooks do
/// not know.
fn rewrite(
    entry: &CtValue,
    source: SocketAddrV4,
    destination: SocketAddrV4,
) -> Option<(SocketAddrV4, SocketAddrV4, bool)> {
    let nat = SocketAddrV4::new(entry.nat_addr.into(), u16::from_be_bytes(entry.nat_port));
    let snat = SocketAddrV4::new(entry.snat_addr.into(), u16::from_be_bytes(entry.snat_port));
    Some(match entry.direction {
        CT_DIRECTION_DNAT => (source, nat, false),
        CT_DIRECTION_HAIRPIN => (SocketAddrV4::new(HAIRPIN_ADDR.into(), source.port()), nat, false),
        CT_DIRECTION_REVERSE_SNAT => (nat, destination, false),
        // The pod's reply to itself: from the service, back to its own address.
        CT_DIRECTION_HAIRPIN_REPLY => (nat, SocketAddrV4::new(*source.ip(), destination.port()), false),
        // The client's request: from this node to the backend.
        CT_DIRECTION_SNAT => (snat, nat, true),
        // The backend's reply: from the service to the client.
        CT_DIRECTION_SNAT_REPLY => (nat, snat, true),
        _ => return None,
    })
}

/// What the hooks do with an ICMP frame: an error (destination
/// unreachable or time exceeded, outer and quoted headers without options)
/// quoting a TCP or UDP packet of a live tracked flow is translated; any
/// other ICMP passes as it came.
fn icmp_error(frame: &[u8], lookups: &dyn MapLookups) -> Expected {
    const ICMP: usize = ETH_HLEN + IPV4_HLEN;
    const INNER: usize = ICMP + 8;
    if frame.len() < INNER + IPV4_HLEN + 4 || frame[ETH_HLEN] != 0x45 || !matches!(frame[ICMP], 3 | 11) {
        return Expected::Unchanged;
    }
    let protocol = frame[INNER + 9];
    if frame[INNER] != 0x45 || (protocol != PROTO_TCP && protocol != PROTO_UDP) {
        return Expected::Unchanged;
    }
    let addr = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let ports = INNER + IPV4_HLEN;
    // The quoted packet went out translated: its flow's entry for packets
    // the other way is at the reverse of the quote.
    let (from, to) =
        (SocketAddrV4::new(addr(INNER + 16), port(ports + 2)), SocketAddrV4::new(addr(INNER + 12), port(ports)));
    let key = CtKey {
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port().to_be_bytes(),
        dport: to.port().to_be_bytes(),
        protocol,
        _pad: [0; 3],
    };
    let Some(entry) = lookups.conntrack(&key) else { return Expected::Unchanged };
    if lookups.now_ns().wrapping_sub(entry.last_seen_ns) >= entry.timeout_ns(protocol) {
        return Expected::Unchanged;
    }
    let (source, destination) = match rewrite(&entry, from, to) {
        Some((_, _, true)) => return Expected::Unmodelled("an ICMP error about a source-NATed flow"),
        Some((source, destination, false)) => (source, destination),
        None => return Expected::Unchanged,
    };
    // The error now quotes what the other end sent, and goes to it; when
    // the other end sent it, it comes from the address that end had.
    let (outer_source, outer_destination) = (addr(ETH_HLEN + 12), addr(ETH_HLEN + 16));
    Expected::IcmpTranslated {
        source: if outer_source == *from.ip() { *source.ip() } else { outer_source },
        destination: if outer_destination == *to.ip() { *destination.ip() } else { outer_destination },
        quoted_source: destination,
        quoted_destination: source,
    }
}

/// What a live entry does to a packet of its flow (`None`: a direction it
/// does not know, which the hooks treat as no entry).
fn known_flow(headers: &Headers, entry: &CtValue, routes: &dyn Routes) -> Option<Expected> {
    let (source, destination, forward) = rewrite(entry, headers.source, headers.destination)?;
    let forward = forward.then(|| next_hop(routes, *destination.ip(), headers.ttl));
    let state = match (headers.tcp_closing, entry.state) {
        (true, _) => CT_STATE_CLOSING,
        (false, CT_STATE_NEW) if !headers.tcp_syn => CT_STATE_ESTABLISHED,
        (false, state) => state,
    };
    Some(Expected::Translated {
        source,
        destination,
        tracked: Tracked::Known { state, peer_closing: headers.tcp_closing },
        forward,
    })
}

/// The ones' complement sum of `bytes` (big-endian words, a last odd
/// byte padded), folded to 16 bits.
fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    for pair in bytes.chunks(2) {
        acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// What the IPv4 header and the L4 checksums of a TCP/UDP frame sum to,
/// over the bytes present (pseudo-header included for L4): a rewrite with
/// correct incremental updates leaves both as they were (in ones'
/// complement, where 0 and 0xffff are one value), whether or not the
/// checksums were right to begin with.
pub fn checksum_residuals(frame: &[u8], headers: &Headers) -> (u16, u16) {
    let ip = &frame[ETH_HLEN..headers.l4_offset];
    let l4 = &frame[headers.l4_offset..];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&headers.source.ip().octets());
    pseudo.extend_from_slice(&headers.destination.ip().octets());
    pseudo.extend_from_slice(&[0, headers.protocol]);
    let fold = |s: u32| if s == 0xffff { 0 } else { s as u16 };
    (fold(sum(ip, 0)), fold(sum(l4, sum(&pseudo, 0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ihl: u8, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x40 | ihl, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0, 10, 0, 0, 1, 10, 96, 0, 1];
        ip.resize(usize::from(ihl) * 4, 1);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(l4);
        frame
    }

    #[test]
    fn parses_what_the_hooks_parse() {
        let tcp = [0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0, 0, 0, 0, 0, 0];
        let parsed = parse(&frame(5, PROTO_TCP, &tcp)).unwrap();
        assert_eq!(
            (parsed.source.to_string(), parsed.destination.to_string()),
            ("10.0.0.1:40000".into(), "10.96.0.1:80".into())
        );
        assert_eq!(parse(&frame(7, PROTO_TCP, &tcp)).unwrap().l4_offset, 14 + 28, "options shift the L4 header");
        assert_eq!(parse(&frame(5, PROTO_TCP, &tcp[..19])), Err("short"));
        assert_eq!(parse(&frame(4, PROTO_TCP, &tcp)), Err("bad IPv4 header"));
        assert_eq!(parse(&frame(5, 47, &tcp)), Err("not TCP or UDP"));
        let mut later = frame(5, PROTO_UDP, &tcp[..8]);
        later[14 + 7] = 1;
        assert_eq!(parse(&later), Err("a later fragment"));
    }
}
