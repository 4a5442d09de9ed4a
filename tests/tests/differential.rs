//! Differential test of the packet hooks: random frames through
//! `tc_from_pod`, `tc_from_wire` and `xdp_from_wire` (BPF_PROG_TEST_RUN)
//! and through the reference model (`lb_userspace::reference`), over the
//! same maps. Any frame on which they disagree fails the test, printed in
//! hex with both answers.
//!
//! The frames: first packets of TCP and UDP flows to Services (random,
//! Maglev, affinity, hairpin, no endpoints, Local without local endpoints,
//! source ranges), to undefined ports and to addresses that are no
//! service; with IP options, later fragments, wrong checksums, zero UDP
//! checksums, other protocols, other EtherTypes, bad IP versions and
//! truncation at every offset past the IPv4 header (BPF_PROG_TEST_RUN
//! takes no shorter skb). `LB_DIFFERENTIAL_PACKETS` sets how many
//! per hook (100,000 by default; `cargo xtask fuzz --packets N`). The
//! external hooks run in a namespace of their own with an interface
//! `ext0` (10.200.0.1/24), as if frames arrived on it. Needs root.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_tests::{
    harness::{Harness, skb_ctx, test_run, xdp_ctx},
    netns::{Netns, unique_tag},
};
use lb_userspace::{
    datapath::MapSizes,
    explain::Hook,
    model::{Algorithm, Frontend, FrontendKind, Protocol, ServicePort},
    reference::{self, Expected, NextHop, Tracked},
};

/// A program's return codes, by what they mean.
#[derive(Clone, Copy)]
struct Codes {
    pass: u32,
    drop: u32,
    sent_back: u32,
    /// Forwarded out of the interface it came in on (TX, a redirect), or
    /// toward a neighbour still to resolve (tc's redirect_neigh; XDP
    /// passes those to the stack).
    out: u32,
    unresolved: u32,
}

const TC: Codes = Codes { pass: 0, drop: 2, sent_back: 7, out: 7, unresolved: 7 };
const XDP: Codes = Codes { pass: 2, drop: 1, sent_back: 3, out: 3, unresolved: 2 };

/// The node's routes in the external hooks' namespace (`external_interface`):
/// ext0 on 10.200.0.0/24 with neighbours 10.200.0.2 (the other node) and
/// 10.200.0.100, and 10.1.2.0/24 (the other node's pods) via 10.200.0.2.
struct NodeRoutes {
    ifindex: u32,
    mac: [u8; 6],
}

const OTHER_NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
const NEIGHBOUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x64];

impl reference::Routes for NodeRoutes {
    fn source_toward(&self, to: Ipv4Addr) -> Option<Ipv4Addr> {
        let o = to.octets();
        (o[..3] == [10, 200, 0] || o[..3] == [10, 1, 2]).then_some(Ipv4Addr::from(NODE))
    }

    fn next_hop(&self, to: Ipv4Addr) -> NextHop {
        match to.octets() {
            [10, 1, 2, _] | [10, 200, 0, 2] => {
                NextHop::Out { ifindex: self.ifindex, smac: self.mac, dmac: OTHER_NODE_MAC }
            }
            [10, 200, 0, 100] => NextHop::Out { ifindex: self.ifindex, smac: self.mac, dmac: NEIGHBOUR_MAC },
            // The node's own address is no next hop.
            [10, 200, 0, 1] => NextHop::Stack,
            [10, 200, 0, _] => NextHop::Unresolved { ifindex: self.ifindex },
            _ => NextHop::Stack,
        }
    }
}

/// The pod hook never routes: what it translates, the stack routes.
struct NoRoutes;

impl reference::Routes for NoRoutes {
    fn source_toward(&self, _: Ipv4Addr) -> Option<Ipv4Addr> {
        None
    }

    fn next_hop(&self, _: Ipv4Addr) -> NextHop {
        NextHop::Stack
    }
}
/// This node's address on its external interface.
const NODE: [u8; 4] = [10, 200, 0, 1];

/// A deterministic random source (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn port(addr: [u8; 4], port: u16, protocol: Protocol, backends: &[SocketAddrV4]) -> ServicePort {
    ServicePort {
        name: format!("{:?}:{port}", addr),
        frontend: Frontend { addr: Ipv4Addr::from(addr).into(), port, protocol },
        backends: backends.iter().map(|b| (*b).into()).collect(),
        ..Default::default()
    }
}

fn backend(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, last), 8080)
}

/// The Services every run uses.
fn services() -> Vec<ServicePort> {
    let mut maglev = port([10, 96, 0, 2], 53, Protocol::Udp, &[backend(3), backend(4)]);
    maglev.algorithm = Algorithm::Maglev;
    let mut sticky = port([10, 96, 0, 4], 80, Protocol::Tcp, &[backend(2), backend(5)]);
    sticky.affinity_timeout_s = 3600;
    let mut local = port([10, 96, 0, 6], 80, Protocol::Tcp, &[]);
    local.drop_when_empty = true;
    let mut ranged = port([198, 51, 100, 1], 443, Protocol::Tcp, &[backend(2), backend(3)]);
    ranged.kind = FrontendKind::LoadBalancer;
    ranged.source_ranges = vec!["10.244.0.0/24".parse().unwrap()];
    // A NodePort whose backends are all on this node, and one with some
    // on other nodes (source NAT, not modelled).
    let mut local_node_port = port(NODE, 30080, Protocol::Tcp, &[backend(2), backend(3)]);
    local_node_port.kind = FrontendKind::NodePort;
    local_node_port.local_backends = local_node_port.backends.clone();
    let mut mixed_node_port =
        port(NODE, 30053, Protocol::Udp, &[backend(4), SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 21), 53)]);
    mixed_node_port.kind = FrontendKind::NodePort;
    mixed_node_port.local_backends = [backend(4).into()].into();
    vec![
        local_node_port,
        mixed_node_port,
        port([10, 96, 0, 1], 80, Protocol::Tcp, &[backend(2), backend(3), backend(4)]),
        port([10, 96, 0, 1], 53, Protocol::Udp, &[backend(4)]),
        maglev,
        port([10, 96, 0, 3], 80, Protocol::Tcp, &[]),
        sticky,
        local,
        ranged,
    ]
}

/// A flow the model saw translated: later frames of it, and replies.
#[derive(Clone, Copy)]
struct Known {
    client: SocketAddrV4,
    service: SocketAddrV4,
    /// Where the requests went, and the source they went with.
    backend: SocketAddrV4,
    source: SocketAddrV4,
    protocol: u8,
}

/// A random frame: most often the first of a new flow (`flow` makes its
/// 5-tuple unique among the frames of a run), else a later request of a
/// flow in `known` or a reply to it, with random TCP flags (ACK, FIN,
/// RST, a SYN reusing the port).
fn random_frame(rng: &mut Rng, flow: u64, known: &[Known]) -> Vec<u8> {
    let destinations: [([u8; 4], u16); 13] = [
        (NODE, 30080),
        (NODE, 30053),
        (NODE, 22),
        ([10, 96, 0, 1], 80),
        ([10, 96, 0, 1], 53),
        ([10, 96, 0, 1], 8443),
        ([10, 96, 0, 2], 53),
        ([10, 96, 0, 3], 80),
        ([10, 96, 0, 4], 80),
        ([10, 96, 0, 6], 80),
        ([198, 51, 100, 1], 443),
        ([10, 96, 9, 9], 80),
        ([10, 244, 0, 3], 8080),
    ];
    if !known.is_empty() && rng.chance(8) {
        let k = known[rng.below(known.len() as u64) as usize];
        let frame = icmp_error_frame(rng, &k);
        return mutate(rng, frame);
    }
    let later = (!known.is_empty() && rng.chance(35)).then(|| known[rng.below(known.len() as u64) as usize]);
    let (client, sport, daddr, dport, protocol) = match later {
        // A reply, from the backend to the source the request had.
        Some(k) if rng.chance(50) => {
            (k.backend.ip().octets(), k.backend.port(), k.source.ip().octets(), k.source.port(), k.protocol)
        }
        Some(k) => (k.client.ip().octets(), k.client.port(), k.service.ip().octets(), k.service.port(), k.protocol),
        None => {
            let (daddr, dport) = destinations[rng.below(destinations.len() as u64) as usize];
            // Clients in and out of the source range (and, from outside,
            // of the cluster); backend 2 reaching itself.
            let client = match rng.below(6) {
                0 => [203, 0, 113, 2 + (flow % 8) as u8],
                1 => [10, 200, 0, 100 + (flow % 3) as u8],
                other => [10, 244, (other % 2) as u8, 2 + (flow % 8) as u8],
            };
            let protocol = match rng.below(20) {
                0 => 47,
                1 => 1,
                2..=9 => 17,
                _ => 6,
            };
            (client, 1024 + (flow / 8 % 60_000) as u16, daddr, dport, protocol)
        }
    };
    let options = if rng.chance(15) { 4 * rng.below(11) as usize } else { 0 };
    let payload: Vec<u8> = (0..rng.below(48)).map(|_| rng.next() as u8).collect();
    let l4_len = if protocol == 6 { 20 } else { 8 };
    let total = 20 + options + l4_len + payload.len();
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let ttl = if rng.chance(3) { rng.below(2) as u8 } else { 64 };
    let mut ip =
        vec![0x45 + (options / 4) as u8, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, ttl, protocol, 0, 0];
    ip.extend_from_slice(&client);
    ip.extend_from_slice(&daddr);
    ip.extend((0..options).map(|i| if i + 1 == options { 0 } else { 1 }));
    if rng.chance(5) {
        // A later fragment (or, 1 in 2, a first one with more to come).
        if rng.chance(50) {
            ip[7] = 1 + rng.below(200) as u8
        } else {
            ip[6] = 0x20
        };
    }
    let check = ones_complement_checksum(&ip, 0);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&ip);
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if protocol == 6 {
        l4.extend_from_slice(&(rng.next() as u32).to_be_bytes());
        l4.extend_from_slice(&0u32.to_be_bytes());
        let flags = match (later.is_some(), rng.below(10)) {
            (false, 0..=7) => 0x02,
            (true, 0..=6) => 0x10,
            (true, 7) => 0x11,
            (true, 8) => 0x04,
            _ => rng.next() as u8,
        };
        l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(&payload);
    if protocol == 6 || protocol == 17 {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&client);
        pseudo.extend_from_slice(&daddr);
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        let at = if protocol == 6 { 16 } else { 6 };
        let check = match ones_complement_checksum(&l4, ones_complement_sum(&pseudo)) {
            0 if protocol == 17 => 0xffff,
            check => check,
        };
        l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
        if protocol == 17 && rng.chance(20) {
            l4[6..8].copy_from_slice(&[0, 0]);
        } else if rng.chance(15) {
            l4[at] ^= 1 + rng.next() as u8 % 255;
        }
    }
    frame.extend_from_slice(&l4);
    mutate(rng, frame)
}

/// Now and then spoils a frame: another EtherType, IP version or header
/// length, a wrong IPv4 checksum, a cut.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    match rng.below(100) {
        0..=2 => frame[12] = 0x86,  // IPv6's EtherType
        3..=4 => frame[14] = 0x65,  // IP version 6 in an IPv4 frame
        5..=6 => frame[14] = 0x43,  // a header length below 20
        7..=8 => frame[24] ^= 0x5a, // a wrong IPv4 checksum
        // BPF_PROG_TEST_RUN takes no skb shorter than an Ethernet and an
        // IPv4 header (EINVAL).
        9..=18 => frame.truncate(34 + rng.below(frame.len() as u64 - 34) as usize),
        _ => {}
    }
    frame
}

/// An ICMP error (port or host unreachable, fragmentation needed, time
/// exceeded) about a packet of flow `k` as it left this node: a request
/// (from its source to its backend), reported by the backend or a router
/// on the way, or a reply (from the service to the client), reported by
/// the client.
fn icmp_error_frame(rng: &mut Rng, k: &Known) -> Vec<u8> {
    let about_a_request = rng.chance(60);
    let (quoted_from, quoted_to) = if about_a_request { (k.source, k.backend) } else { (k.service, k.client) };
    let reporter = match rng.below(3) {
        0 => Ipv4Addr::new(10, 244, 9, 9),
        _ => *quoted_to.ip(),
    };
    let mut quote = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 63, k.protocol, 0, 0];
    quote.extend_from_slice(&quoted_from.ip().octets());
    quote.extend_from_slice(&quoted_to.ip().octets());
    let check = ones_complement_checksum(&quote, 0);
    quote[10..12].copy_from_slice(&check.to_be_bytes());
    quote.extend_from_slice(&quoted_from.port().to_be_bytes());
    quote.extend_from_slice(&quoted_to.port().to_be_bytes());
    quote.extend((0..4 + rng.below(20)).map(|_| rng.next() as u8));
    let (icmp_type, code) = [(3, 3), (3, 1), (3, 4), (11, 0)][rng.below(4) as usize];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&quote);
    let check = ones_complement_checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let total = 20 + icmp.len();
    let mut ip = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&reporter.octets());
    ip.extend_from_slice(&quoted_from.ip().octets());
    let check = ones_complement_checksum(&ip, 0);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

fn ones_complement_sum(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    sum
}

fn ones_complement_checksum(bytes: &[u8], start: u32) -> u16 {
    let mut sum = start + ones_complement_sum(bytes);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the program's answer (`rc`, `out`) is what the model expects.
/// The return code of a translated frame with this next hop.
fn forwarded_code(codes: Codes, forward: Option<NextHop>) -> u32 {
    match forward {
        Some(NextHop::Out { .. }) => codes.out,
        Some(NextHop::Unresolved { .. }) => codes.unresolved,
        _ => codes.pass,
    }
}

fn agrees(codes: Codes, expected: &Expected, frame: &[u8], rc: u32, out: &[u8]) -> Result<(), String> {
    match expected {
        Expected::Unchanged if rc == codes.pass && out == frame => Ok(()),
        Expected::Dropped if rc == codes.drop => Ok(()),
        // An ICMP port unreachable (type 3, code 3) sent back.
        Expected::Rejected
            if rc == codes.sent_back && out.get(14 + 9) == Some(&1) && out.get(34..36) == Some(&[3, 3]) =>
        {
            Ok(())
        }
        Expected::Translated { source, destination, forward, .. }
            if rc == forwarded_code(codes, *forward) && out.len() == frame.len() =>
        {
            let before = reference::parse(frame).map_err(str::to_owned)?;
            let after = reference::parse(out).map_err(|e| format!("the output does not parse: {e}"))?;
            if (after.source, after.destination) != (*source, *destination) {
                return Err(format!("rewritten to {} -> {}", after.source, after.destination));
            }
            // Nothing else changed but the checksums, and those by exactly
            // the rewrite (a right one stays right, a wrong one as wrong).
            let ip_check = 24..26;
            let l4_check = if before.protocol == 6 { before.l4_offset + 16 } else { before.l4_offset + 6 };
            // Routed on: the neighbour's MACs, and the TTL down by one.
            let (macs, ttl_down) = match forward {
                Some(NextHop::Out { smac, dmac, .. }) => (Some([*dmac, *smac].concat()), true),
                Some(NextHop::Unresolved { .. }) => (None, codes.unresolved != codes.pass),
                _ => (None, false),
            };
            if let Some(macs) = &macs
                && out[..12] != macs[..]
            {
                return Err(format!("MACs {} for {}", hex(&out[..12]), hex(macs)));
            }
            let ttl = if ttl_down { frame[22].wrapping_sub(1) } else { frame[22] };
            if out[22] != ttl {
                return Err(format!("TTL {} for {ttl}", out[22]));
            }
            let masked = |bytes: &[u8]| -> Vec<u8> {
                let mut bytes = bytes.to_vec();
                if macs.is_some() {
                    bytes[..12].fill(0);
                }
                bytes[22] = 0;
                bytes[26..34].fill(0);
                bytes[ip_check.clone()].fill(0);
                bytes[before.l4_offset..before.l4_offset + 4].fill(0);
                bytes[l4_check..l4_check + 2].fill(0);
                bytes
            };
            if masked(frame) != masked(out) {
                return Err("bytes other than addresses, ports and checksums changed".into());
            }
            let zero_udp = before.protocol == 17 && frame[l4_check..l4_check + 2] == [0, 0];
            if zero_udp && out[l4_check..l4_check + 2] != [0, 0] {
                return Err("a zero UDP checksum did not stay zero".into());
            }
            let (ip_in, l4_in) = reference::checksum_residuals(frame, &before);
            let (ip_out, l4_out) = reference::checksum_residuals(out, &after);
            if ip_in != ip_out || (!zero_udp && l4_in != l4_out) {
                return Err(format!("checksum residuals {ip_in:#06x}/{l4_in:#06x} became {ip_out:#06x}/{l4_out:#06x}"));
            }
            Ok(())
        }
        Expected::IcmpTranslated { source, destination, quoted_source, quoted_destination }
            if rc == codes.pass && out.len() == frame.len() =>
        {
            const INNER: usize = 42;
            let addr = |f: &[u8], at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
            let port = |f: &[u8], at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
            let outer = (addr(out, 26), addr(out, 30));
            let quoted = (
                SocketAddrV4::new(addr(out, INNER + 12), port(out, INNER + 20)),
                SocketAddrV4::new(addr(out, INNER + 16), port(out, INNER + 22)),
            );
            if outer != (*source, *destination) || quoted != (*quoted_source, *quoted_destination) {
                return Err(format!("now {outer:?}, quoting {quoted:?}"));
            }
            let masked = |bytes: &[u8]| -> Vec<u8> {
                let mut bytes = bytes.to_vec();
                for range in [24..34, 36..38, INNER + 10..INNER + 24] {
                    bytes[range].fill(0);
                }
                bytes
            };
            if masked(frame) != masked(out) {
                return Err("bytes other than addresses, ports and checksums changed".into());
            }
            // Each checksum changed by exactly what it covers changed.
            let residual = |f: &[u8], range: std::ops::Range<usize>| match ones_complement_checksum(&f[range], 0) {
                0xffff => 0,
                r => r,
            };
            for (what, range) in [("outer IPv4", 14..34), ("ICMP", 34..frame.len()), ("quoted IPv4", INNER..INNER + 20)]
            {
                if residual(frame, range.clone()) != residual(out, range) {
                    return Err(format!("the {what} checksum does not follow the rewrite"));
                }
            }
            Ok(())
        }
        _ => Err(format!("the program answered {rc} with {}", hex(out))),
    }
}

/// Runs the frames through one hook and the model; panics on the first
/// disagreement. `run` runs a frame through the hook.
/// Where the frames arrive.
#[derive(Clone, Copy)]
enum Program {
    /// `tc_from_pod`.
    Pod,
    /// `tc_from_wire` or `xdp_from_wire`, on interface `ifindex` (of the
    /// namespace the test runs in), whose MAC is `mac`.
    WireTc {
        ifindex: u32,
        mac: [u8; 6],
    },
    WireXdp {
        ifindex: u32,
        mac: [u8; 6],
    },
}

impl Program {
    /// Runs one frame: the return code and the frame as it left.
    fn run(self, harness: &mut Harness, frame: &[u8]) -> (u32, Vec<u8>) {
        let (rc, out, _) = match self {
            Program::Pod => harness.run_tc(frame, 1),
            Program::WireTc { ifindex, .. } => {
                test_run(harness.datapath.tc_wire_program().unwrap(), frame, Some(&skb_ctx(ifindex)), 1)
            }
            Program::WireXdp { ifindex, .. } => {
                test_run(harness.datapath.xdp_program().unwrap(), frame, Some(&xdp_ctx(frame, ifindex)), 1)
            }
        };
        (rc, out)
    }

    fn hook(self) -> Hook {
        if matches!(self, Program::Pod) { Hook::Pod } else { Hook::Wire }
    }

    fn routes(self) -> Box<dyn reference::Routes> {
        match self {
            Program::Pod => Box::new(NoRoutes),
            Program::WireTc { ifindex, mac } | Program::WireXdp { ifindex, mac } => {
                Box::new(NodeRoutes { ifindex, mac })
            }
        }
    }

    fn codes(self) -> Codes {
        if matches!(self, Program::WireXdp { .. }) { XDP } else { TC }
    }
}

/// Runs the frames through one program and the model; panics on the
/// first disagreement. Runs on the calling thread, whose network namespace
/// the external programs' FIB lookups use.
fn differential(program: Program) {
    let (hook, codes, routes) = (program.hook(), program.codes(), program.routes());
    let packets: u64 = std::env::var("LB_DIFFERENTIAL_PACKETS").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("LB_DIFFERENTIAL_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(0x5eed_1234);
    let sizes = MapSizes { conntrack: 1 << 21, ..MapSizes::default() };
    let mut harness = Harness::with_sizes(&services(), sizes);
    let contents = harness.datapath.maps.read_contents().unwrap();
    let maglev_table_size = sizes.maglev.table_size;
    let mut rng = Rng(seed);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    // The flows translated lately, for later frames and replies.
    let mut known: Vec<Known> = Vec::new();
    for flow in 0..packets {
        let frame = random_frame(&mut rng, flow, &known);
        // Now and then a line holding one of the frame's endpoint filter
        // bits is cleared for this frame (as if the agent had swept it):
        // the program and the model must agree on what then gets through.
        let cleared = match reference::parse(&frame) {
            Ok(parsed) if rng.next().is_multiple_of(16) => {
                let key = lb_tests::harness::ct_key(parsed.source, parsed.destination, parsed.protocol);
                let maps = &harness.datapath.maps;
                let bits = lb_userspace::filter::packet_bits(
                    &key,
                    lb_userspace::explain::MapLookups::<lb_common::Ipv4>::endpoint_filter_bits_log2(maps),
                );
                let (line, _, _) = lb_common::filter_position(bits[(rng.next() % 2) as usize]);
                let old =
                    lb_userspace::explain::MapLookups::<lb_common::Ipv4>::endpoint_filter(&harness.datapath.maps, line)
                        .unwrap();
                harness.datapath.maps.overwrite_filter_line(line, [0; 8]).unwrap();
                Some((line, old))
            }
            _ => None,
        };
        let expected =
            reference::expected(hook, &frame, &contents, &harness.datapath.maps, routes.as_ref(), maglev_table_size);
        let (rc, out) = program.run(&mut harness, &frame);
        if let Some((line, old)) = cleared {
            harness.datapath.maps.overwrite_filter_line(line, old).unwrap();
        }
        let kind = match &expected {
            Expected::Translated { source, tracked: Tracked::New { backend }, .. } if source.ip().is_link_local() => {
                format!("new flow, hairpin to {backend}")
            }
            Expected::Translated { tracked: Tracked::New { backend }, forward: Some(hop), .. } => {
                let hop = format!("{hop:?}");
                format!("new flow to {backend}, source-NATed, {}", hop.split(' ').next().unwrap_or(""))
            }
            Expected::Translated { tracked: Tracked::New { backend }, .. } => format!("new flow to {backend}"),
            Expected::Translated { tracked: Tracked::Known { state, .. }, .. } => {
                format!("tracked flow, entry now in state {state}")
            }
            Expected::IcmpTranslated { .. } => "ICMP error about a tracked flow, translated".to_owned(),
            Expected::Unmodelled(why) => format!("unmodelled: {why}"),
            other => format!("{other:?}").to_lowercase(),
        };
        *outcomes.entry(kind).or_default() += 1;
        if matches!(expected, Expected::Unmodelled(_)) {
            continue;
        }
        if let Err(why) = agrees(codes, &expected, &frame, rc, &out) {
            panic!(
                "{hook:?} hook, frame {flow} (seed {seed:#x}): {}\nmodel: {expected:?}\nprogram: {rc}, {}\n{why}",
                hex(&frame),
                hex(&out)
            );
        }
        // Conntrack after the frame: a new flow's entry rewrites to its
        // backend; a known one's moved to the state the model says.
        let Expected::Translated { source, tracked, .. } = expected else { continue };
        let parsed = reference::parse(&frame).unwrap();
        let key = lb_tests::harness::ct_key(parsed.source, parsed.destination, parsed.protocol);
        let entry = harness.ct(&key);
        let context = || format!("{hook:?} hook, frame {flow}: conntrack entry of {}", hex(&frame));
        match tracked {
            Tracked::New { backend } => {
                let nat = SocketAddrV4::new(entry.nat_addr.into(), u16::from_be_bytes(entry.nat_port));
                assert_eq!(nat, backend, "{}", context());
                let flow = Known {
                    client: parsed.source,
                    service: parsed.destination,
                    backend,
                    source,
                    protocol: parsed.protocol,
                };
                if known.len() < 4096 {
                    known.push(flow);
                } else {
                    known[(rng.next() % 4096) as usize] = flow;
                }
            }
            Tracked::Known { state, peer_closing } => {
                assert_eq!(entry.state, state, "{}", context());
                if peer_closing {
                    let peer = harness.ct(&entry.peer_key(&key));
                    assert_eq!(peer.state, lb_common::CT_STATE_CLOSING, "{}: the other direction", context());
                }
            }
        }
    }
    eprintln!("{hook:?} hook: {packets} frames, seed {seed:#x}:");
    for (kind, count) in &outcomes {
        eprintln!("  {count:>8}  {kind}");
    }
    for kind in
        ["unchanged", "dropped", "rejected", "new flow to 10.244.0.2:8080", "tracked flow, entry now in state 2"]
    {
        assert!(outcomes.get(kind).is_some_and(|n| *n > 0) || packets < 10_000, "no {kind}: {outcomes:?}");
    }
}

/// A node namespace whose external interface `ext0` has this node's
/// address, with the routes `NodeRoutes` describes; and ext0's index and MAC.
fn external_interface() -> (Netns, u32, [u8; 6]) {
    let netns = Netns::new(format!("lbt{}-diff", unique_tag())).unwrap();
    netns.ip(&["link", "add", "ext0", "type", "veth", "peer", "name", "ext1"]).unwrap();
    netns.ip(&["addr", "add", "10.200.0.1/24", "dev", "ext0"]).unwrap();
    for dev in ["ext0", "ext1"] {
        netns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    for (ip, m) in [("10.200.0.2", OTHER_NODE_MAC), ("10.200.0.100", NEIGHBOUR_MAC)] {
        netns.ip(&["neigh", "add", ip, "lladdr", &mac(m), "dev", "ext0", "nud", "permanent"]).unwrap();
    }
    netns.ip(&["route", "add", "10.1.2.0/24", "via", "10.200.0.2"]).unwrap();
    netns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let interfaces = netns.enter(|| lb_userspace::interfaces::list().unwrap());
    let ifindex = interfaces.into_iter().find(|i| i.name == "ext0").unwrap().index;
    let link = netns.ip(&["-o", "link", "show", "ext0"]).unwrap();
    let text = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap().to_owned();
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    (netns, ifindex, bytes.try_into().unwrap())
}

#[test]
fn the_pod_hook_does_what_the_reference_model_says_on_random_frames() {
    differential(Program::Pod);
}

#[test]
fn the_external_tc_hook_does_what_the_reference_model_says_on_random_frames() {
    let (netns, ifindex, mac) = external_interface();
    netns.enter(|| differential(Program::WireTc { ifindex, mac }));
}

#[test]
fn the_xdp_hook_does_what_the_reference_model_says_on_random_frames() {
    let (netns, ifindex, mac) = external_interface();
    netns.enter(|| differential(Program::WireXdp { ifindex, mac }));
}
