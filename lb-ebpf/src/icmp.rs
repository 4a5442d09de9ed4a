//! ICMP: refusing a packet the way kube-proxy's REJECT rule does (a port
//! unreachable back to the sender, from the address it tried to reach), and
//! translating ICMP errors about translated flows, so that the sender of
//! the offending packet gets them and recognises its own packet in them
//! (path-MTU discovery through a NodePort needs this).
use lb_common::{Address, CtKey, Ipv6, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use crate::{
    conntrack,
    maps::{ICMP_REPLY, ICMP6_REPLY},
    nat::{Frame, Rewrite, csum_apply, csum_replace},
    parse::{ETH_HLEN, ETH_P_IPV6, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, Packet},
    translate::rewrite_of,
};

pub use crate::parse::ICMP_REPLY_LEN as REPLY_LEN;
/// RFC 792: the offending IP header and the first 8 bytes of its payload.
const QUOTED_LEN: usize = IPV4_HLEN + 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Offsets in an ICMP error without IP options: the outer IPv4 header, the
/// ICMP header, the quoted IPv4 header and the quoted ports.
const OUTER_IP: usize = ETH_HLEN;
const ICMP: usize = OUTER_IP + IPV4_HLEN;
const INNER_IP: usize = ICMP + ICMP_HLEN;
const INNER_PORTS: usize = INNER_IP + IPV4_HLEN;
const IP_PROTOCOL: usize = 9;
const IP_ADDRS: usize = 12;
const IP_CHECK: usize = 10;

pub use crate::parse::ICMP6_REPLY_LEN as REPLY6_LEN;
const IPPROTO_ICMPV6: u8 = crate::parse::PROTO_ICMPV6;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Offsets in an ICMPv6 error without extension headers: the outer IPv6
/// header, the ICMPv6 header, the quoted IPv6 header and its ports.
const OUTER6: usize = ETH_HLEN;
const ICMP6: usize = OUTER6 + IPV6_HLEN;
const INNER6: usize = ICMP6 + ICMP_HLEN;
const INNER6_PORTS: usize = INNER6 + IPV6_HLEN;
const IPV6_NEXT_HEADER: usize = 6;
const IPV6_ADDRS: usize = 8;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// RFC 4443 asks for as much of the offending packet as fits in 1280
/// bytes; the IPv6 header and the ports are what the sender's stack needs
/// to find the socket, and a fixed size keeps the reply in a small buffer.
const QUOTED6_LEN: usize = IPV6_HLEN + 8;
const _: () = assert!(REPLY6_LEN == ETH_HLEN + IPV6_HLEN + ICMP_HLEN + QUOTED6_LEN);

/// Internet checksum of `bytes` (an even number, as big-endian 16-bit words).
#[inline(always)]
fn checksum(bytes: &[u8]) -> [u8; 2] {
    fold(sum_words(bytes))
}

/// The sum of `bytes` as big-endian 16-bit words, not folded.
#[inline(always)]
fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// A sum of 16-bit words folded into the Internet checksum.
#[inline(always)]
fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The ICMP port unreachable that refuses `packet`, addressed back to its
/// sender from the address it tried to reach, built in a per-CPU scratch
/// buffer (it would not fit on the stack next to the rest); `None` when
/// the packet has IP options (it is then only dropped).
#[inline(always)]
pub fn port_unreachable<F: Frame>(frame: &F, packet: &Packet) -> Result<Option<&'static [u8; REPLY_LEN]>, i64> {
    if packet.l4_offset != ETH_HLEN + IPV4_HLEN {
        return Ok(None);
    }
    let Some(reply) = ICMP_REPLY.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: this CPU's slot, used by one program run at a time.
    let reply = unsafe { &mut *reply };
    // Fixed-size loads: the verifier refuses a length that might be zero.
    let macs: [u8; 12] = frame.load(0)?;
    let quoted: [u8; QUOTED_LEN] = frame.load(ETH_HLEN)?;
    *reply = [0u8; REPLY_LEN];
    reply[ETH_HLEN + IPV4_HLEN + ICMP_HLEN..].copy_from_slice(&quoted);

    // Ethernet: back to the sender's MAC, from the MAC it sent to.
    reply[..6].copy_from_slice(&macs[6..12]);
    reply[6..12].copy_from_slice(&macs[..6]);
    reply[12..14].copy_from_slice(&[0x08, 0x00]);
    // IPv4: from the service address, to the client.
    let ip = ETH_HLEN;
    reply[ip] = 0x45;
    reply[ip + 2..ip + 4].copy_from_slice(&((REPLY_LEN - ETH_HLEN) as u16).to_be_bytes());
    reply[ip + 8] = 64;
    reply[ip + 9] = PROTO_ICMP;
    reply[ip + 12..ip + 16].copy_from_slice(&packet.daddr);
    reply[ip + 16..ip + 20].copy_from_slice(&packet.saddr);
    let ip_check = checksum(&reply[ip..ip + IPV4_HLEN]);
    reply[ip + 10..ip + 12].copy_from_slice(&ip_check);
    // ICMP: destination unreachable, port unreachable.
    let icmp = ip + IPV4_HLEN;
    reply[icmp] = ICMP_DEST_UNREACH;
    reply[icmp + 1] = ICMP_PORT_UNREACH;
    let icmp_check = checksum(&reply[icmp..]);
    reply[icmp + 2..icmp + 4].copy_from_slice(&icmp_check);
    Ok(Some(reply))
}

/// The ICMPv6 port unreachable (RFC 4443) that refuses `packet`, as
/// `port_unreachable` does for IPv4: from the address the client tried,
/// quoting its IPv6 header and ports. `None` when extension headers come
/// before the ports (the packet is then only dropped).
#[inline(always)]
pub fn port_unreachable6<F: Frame>(frame: &F, packet: &Packet<Ipv6>) -> Result<Option<&'static [u8; REPLY6_LEN]>, i64> {
    if packet.l4_offset != ETH_HLEN + IPV6_HLEN {
        return Ok(None);
    }
    let Some(reply) = ICMP6_REPLY.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: this CPU's slot, used by one program run at a time.
    let reply = unsafe { &mut *reply };
    reply.fill(0);
    let ip = ETH_HLEN;
    let icmp = ip + IPV6_HLEN;
    // Read straight into the reply (the stack has no room for copies):
    // the quote, and the MACs, swapped in place.
    frame.load_into(ETH_HLEN, &mut reply[icmp + ICMP_HLEN..])?;
    frame.load_into(0, &mut reply[..12])?;
    for i in 0..6 {
        reply.swap(i, i + 6);
    }
    reply[12..14].copy_from_slice(&ETH_P_IPV6);
    // IPv6: from the service address, to the client.
    let payload_len = (REPLY6_LEN - icmp) as u16;
    reply[ip] = 0x60;
    reply[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
    reply[ip + 6] = IPPROTO_ICMPV6;
    reply[ip + 7] = 64;
    for w in 0..4 {
        reply[ip + 8 + 4 * w..ip + 12 + 4 * w].copy_from_slice(&packet.daddr[w].to_ne_bytes());
        reply[ip + 24 + 4 * w..ip + 28 + 4 * w].copy_from_slice(&packet.saddr[w].to_ne_bytes());
    }
    reply[icmp] = ICMPV6_DEST_UNREACH;
    reply[icmp + 1] = ICMPV6_PORT_UNREACH;
    // The checksum covers the pseudo-header: both addresses, the length
    // and the next header.
    let pseudo = sum_words(&reply[ip + 8..icmp]) + u32::from(payload_len) + u32::from(IPPROTO_ICMPV6);
    let check = fold(pseudo + sum_words(&reply[icmp..]));
    reply[icmp + 2..icmp + 4].copy_from_slice(&check);
    Ok(Some(reply))
}

/// How a translated ICMP error goes on.
pub enum ErrorRoute {
    /// To a pod on this node, or from a pod: the stack routes it.
    Pass,
    /// To another node or an external client (an SNAT flow): the hook
    /// routes it, as it does the flow's packets.
    Forward,
}

/// What the live conntrack entry at `key` makes of the packets of its
/// flow, if there is one. (A function of its own: the hooks' stacks are
/// full.)
#[inline(never)]
fn rewrite_at(key: &CtKey, rewrite: &mut Rewrite) -> bool {
    let Some(verdict) = conntrack::tracked(key) else {
        return false;
    };
    match rewrite_of(&verdict, (key.saddr, key.sport), (key.daddr, key.dport)) {
        Some(found) => {
            *rewrite = found;
            true
        }
        None => false,
    }
}

/// Translates an ICMP error (destination unreachable, which includes
/// fragmentation needed, or time exceeded) that quotes a packet of a
/// translated flow. The quoted packet is what left this node; the error
/// is rewritten to quote the packet its sender sent, and is addressed to
/// that sender. `None` when it is not such an error.
///
/// The quoted TCP or UDP checksum is left as it is: the quote may be cut
/// short before it, and receivers do not check it.
///
/// The steps are functions of their own, called one after the other, so
/// that their buffers never share the hook's stack at the same time.
#[inline(always)]
pub fn translate_error<F: Frame>(frame: &F) -> Result<Option<ErrorRoute>, i64> {
    let mut key = CtKey::default();
    if !quoted_flow(frame, &mut key)? {
        return Ok(None);
    }
    let mut rewrite = Rewrite::default();
    if !rewrite_at(&key, &mut rewrite) {
        return Ok(None);
    }
    rewrite_quote(frame, &key, &rewrite)?;
    readdress(frame, &key, &rewrite)?;
    Ok(Some(if rewrite.forward { ErrorRoute::Forward } else { ErrorRoute::Pass }))
}

/// Reads the flow an ICMP error is about into `key`: the reverse of the
/// quoted packet, which went out translated, so that the conntrack entry
/// at `key` is the one for packets the other way. False when the packet
/// is not an ICMP error quoting TCP or UDP.
#[inline(never)]
fn quoted_flow<F: Frame>(frame: &F, key: &mut CtKey) -> Result<bool, i64> {
    if frame.len() < INNER_PORTS + 4 {
        return Ok(false);
    }
    let [outer_version]: [u8; 1] = frame.load(OUTER_IP)?;
    let [icmp_type]: [u8; 1] = frame.load(ICMP)?;
    if outer_version != 0x45 || (icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED) {
        return Ok(false);
    }
    let [inner_version]: [u8; 1] = frame.load(INNER_IP)?;
    let [protocol]: [u8; 1] = frame.load(INNER_IP + IP_PROTOCOL)?;
    if inner_version != 0x45 || (protocol != PROTO_TCP && protocol != PROTO_UDP) {
        return Ok(false);
    }
    let addrs: [u8; 8] = frame.load(INNER_IP + IP_ADDRS)?;
    let ports: [u8; 4] = frame.load(INNER_PORTS)?;
    *key = CtKey {
        saddr: [addrs[4], addrs[5], addrs[6], addrs[7]],
        daddr: [addrs[0], addrs[1], addrs[2], addrs[3]],
        sport: [ports[2], ports[3]],
        dport: [ports[0], ports[1]],
        protocol,
        _pad: [0; 3],
    };
    Ok(true)
}

/// Rewrites the quoted packet to the original: the reverse of where the
/// entry at `key` sends its packets. The ICMP checksum covers the quoted
/// addresses, header checksum and ports.
#[inline(never)]
fn rewrite_quote<F: Frame>(frame: &F, key: &CtKey, rewrite: &Rewrite) -> Result<(), i64> {
    let (new_src, new_dst) = (rewrite.destination, rewrite.source);
    // Header checksum and addresses, then the ports, rewritten in place.
    let old: [u8; 10] = frame.load(INNER_IP + IP_CHECK)?;
    let mut new = old;
    new[2..6].copy_from_slice(&new_src.0);
    new[6..].copy_from_slice(&new_dst.0);
    let check = csum_replace([old[0], old[1]], &old, &new);
    new[..2].copy_from_slice(&check);
    let old_ports = [key.dport[0], key.dport[1], key.sport[0], key.sport[1]];
    let new_ports = [new_src.1[0], new_src.1[1], new_dst.1[0], new_dst.1[1]];
    let icmp_check: [u8; 2] = frame.load(ICMP + 2)?;
    let icmp_check = csum_replace(csum_replace(icmp_check, &old, &new), &old_ports, &new_ports);
    frame.store(ICMP + 2, &icmp_check)?;
    frame.store(INNER_IP + IP_CHECK, &new)?;
    frame.store(INNER_PORTS, &new_ports)
}

/// Addresses the error to the quoted packet's original sender; when the
/// other end sent the error itself, it comes from the address that end had.
#[inline(never)]
fn readdress<F: Frame>(frame: &F, key: &CtKey, rewrite: &Rewrite) -> Result<(), i64> {
    // Header checksum and addresses, rewritten in place.
    let old: [u8; 10] = frame.load(OUTER_IP + IP_CHECK)?;
    let mut new = old;
    // The quoted packet went from key.daddr to key.saddr.
    if old[2..6] == key.saddr {
        new[2..6].copy_from_slice(&rewrite.source.0);
    }
    if old[6..] == key.daddr {
        new[6..].copy_from_slice(&rewrite.destination.0);
    }
    let check = csum_replace([old[0], old[1]], &old, &new);
    new[..2].copy_from_slice(&check);
    frame.store(OUTER_IP + IP_CHECK, &new)
}

/// The outer header of an ICMP error without options, as `Packet` offsets,
/// for routing it (addresses and ports are not filled in).
pub fn error_header() -> Packet {
    Packet {
        l3_offset: OUTER_IP,
        l4_offset: ICMP,
        protocol: PROTO_ICMP,
        saddr: [0; 4],
        daddr: [0; 4],
        sport: [0; 2],
        dport: [0; 2],
        tcp_syn: false,
        tcp_closing: false,
    }
}

/// `translate_error` for IPv6 (RFC 4443's destination unreachable, packet
/// too big, time exceeded), on any hook's frame: the ICMPv6 checksum covers the
/// pseudo-header, so the outer addresses count in it too. Packet Too Big
/// must reach the flow's original sender, translated, or path-MTU
/// discovery through a Service fails. Each step is a function of its own,
/// as for IPv4; the key and the rewrite live in the caller's per-CPU slot.
#[inline(always)]
pub fn translate_error6<F: Frame>(ctx: &F, key: &mut CtKey<Ipv6>, rewrite: &mut Rewrite<Ipv6>) -> Result<bool, i64> {
    if result(quoted_flow6(ctx, key))? == 0 || !rewrite_at6(key, rewrite) {
        return Ok(false);
    }
    result(rewrite_quote6(ctx, key, rewrite))?;
    result(readdress6(ctx, key, rewrite))?;
    Ok(true)
}

/// A step's outcome in one register: its answer (0 or more), or the
/// helper's error (negative). As a `Result`, 16 bytes, it would come back
/// through the caller's stack, and on XDP LLVM hands back the pointer to
/// it, which the verifier refuses ("cannot return stack pointer").
#[inline(always)]
fn status<T: Into<i64>>(outcome: Result<T, i64>) -> i64 {
    match outcome {
        Ok(answer) => answer.into(),
        Err(error) => error,
    }
}

/// `status` read back.
#[inline(always)]
fn result(status: i64) -> Result<i64, i64> {
    if status < 0 { Err(status) } else { Ok(status) }
}

/// `quoted_flow` for IPv6: the reverse of the quoted packet (no
/// extension headers in either), into `key`.
#[inline(never)]
fn quoted_flow6<F: Frame>(ctx: &F, key: &mut CtKey<Ipv6>) -> i64 {
    status((|| {
        if Frame::len(ctx) < INNER6_PORTS + 4 {
            return Ok(false);
        }
        let [icmp_type]: [u8; 1] = ctx.load(ICMP6)?;
        if !matches!(icmp_type, ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED) {
            return Ok(false);
        }
        let [inner_version]: [u8; 1] = ctx.load(INNER6)?;
        let [protocol]: [u8; 1] = ctx.load(INNER6 + IPV6_NEXT_HEADER)?;
        if inner_version >> 4 != 6 || (protocol != PROTO_TCP && protocol != PROTO_UDP) {
            return Ok(false);
        }
        let saddr = load6(ctx, INNER6 + IPV6_ADDRS)?;
        let daddr = load6(ctx, INNER6 + IPV6_ADDRS + 16)?;
        let ports: [u8; 4] = ctx.load(INNER6_PORTS)?;
        key.saddr = daddr;
        key.daddr = saddr;
        key.sport = [ports[2], ports[3]];
        key.dport = [ports[0], ports[1]];
        key.protocol = protocol;
        key._pad = [0; 3];
        Ok(true)
    })())
}

/// `rewrite_at` for IPv6.
#[inline(never)]
fn rewrite_at6(key: &CtKey<Ipv6>, rewrite: &mut Rewrite<Ipv6>) -> bool {
    let Some(verdict) = conntrack::tracked(key) else {
        return false;
    };
    match rewrite_of(&verdict, (key.saddr, key.sport), (key.daddr, key.dport)) {
        Some(found) => {
            rewrite.source = found.source;
            rewrite.destination = found.destination;
            rewrite.forward = found.forward;
            true
        }
        None => false,
    }
}

/// `rewrite_quote` for IPv6: the quoted addresses and ports become those
/// of the packet the sender sent; the ICMPv6 checksum follows.
#[inline(never)]
fn rewrite_quote6<F: Frame>(ctx: &F, key: &CtKey<Ipv6>, rewrite: &Rewrite<Ipv6>) -> i64 {
    status((|| {
        // SAFETY: reads of the caller's values (see `readdress6`).
        let (key, rewrite) = unsafe { (core::ptr::read_volatile(key), core::ptr::read_volatile(rewrite)) };
        let (new_src, new_dst) = (rewrite.destination, rewrite.source);
        let old_ports = [key.dport[0], key.dport[1], key.sport[0], key.sport[1]];
        let new_ports = [new_src.1[0], new_src.1[1], new_dst.1[0], new_dst.1[1]];
        let diff = new_src.0.sum16() + new_dst.0.sum16() + key.daddr.sum16_complement() + key.saddr.sum16_complement();
        let check: [u8; 2] = ctx.load(ICMP6 + 2)?;
        let check = csum_replace(csum_apply(check, diff), &old_ports, &new_ports);
        Frame::store(ctx, ICMP6 + 2, &check)?;
        Frame::store(ctx, INNER6 + IPV6_ADDRS, bytes6(&new_src.0))?;
        Frame::store(ctx, INNER6 + IPV6_ADDRS + 16, bytes6(&new_dst.0))?;
        Frame::store(ctx, INNER6_PORTS, &new_ports).map(|()| 0)
    })())
}

/// `readdress` for IPv6: the error goes to the quoted packet's original
/// sender, and comes from the address the other end had; the ICMPv6
/// checksum's pseudo-header follows.
#[inline(never)]
fn readdress6<F: Frame>(ctx: &F, key: &CtKey<Ipv6>, rewrite: &Rewrite<Ipv6>) -> i64 {
    status((|| {
        // Read volatile, so that LLVM keeps passing pointers: promoted to
        // values, the addresses make more arguments than BPF has registers.
        // SAFETY: reads of the caller's values.
        let (key, rewrite) = unsafe { (core::ptr::read_volatile(key), core::ptr::read_volatile(rewrite)) };
        let source = load6(ctx, OUTER6 + IPV6_ADDRS)?;
        let destination = load6(ctx, OUTER6 + IPV6_ADDRS + 16)?;
        // The quoted packet went from key.daddr to key.saddr.
        let new_source = if source == key.saddr { rewrite.source.0 } else { source };
        let new_destination = if destination == key.daddr { rewrite.destination.0 } else { destination };
        let diff =
            new_source.sum16() + new_destination.sum16() + source.sum16_complement() + destination.sum16_complement();
        let check: [u8; 2] = ctx.load(ICMP6 + 2)?;
        Frame::store(ctx, ICMP6 + 2, &csum_apply(check, diff))?;
        Frame::store(ctx, OUTER6 + IPV6_ADDRS, bytes6(&new_source))?;
        Frame::store(ctx, OUTER6 + IPV6_ADDRS + 16, bytes6(&new_destination)).map(|()| 0)
    })())
}

/// The IPv6 address at `offset` of `frame`.
#[inline(always)]
fn load6<F: Frame>(frame: &F, offset: usize) -> Result<Ipv6, i64> {
    let bytes: [u8; 16] = frame.load(offset)?;
    // SAFETY: any 16 bytes are an address; read unaligned.
    Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const Ipv6) })
}

/// An IPv6 address's bytes as they lie in a packet, by reference (a
/// 16-byte value copied would need 128-bit registers BPF lacks).
#[inline(always)]
fn bytes6(addr: &Ipv6) -> &[u8; 16] {
    // SAFETY: the same 16 bytes, at an alignment [u8; 16] does not need.
    unsafe { &*(addr as *const Ipv6 as *const [u8; 16]) }
}
