//! Route lookups in the kernel's FIB: the address source NAT picks toward
//! a backend (`snat`), and where a translated frame goes next, for both
//! external hooks.
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup_helper,
};

use lb_common::{Ipv4, Ipv6};

use crate::{
    family::Family,
    nat::{Frame, csum_replace},
    parse::Packet,
};

/// What a route lookup needs of an address family: how its addresses go
/// into the helper's parameters, and come out; and what forwarding a
/// frame changes in its header.
pub trait FibFamily: Family {
    /// AF_INET, AF_INET6.
    const AF: u8;
    fn set_addresses(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self);
    /// The source address the lookup chose (BPF_FIB_LOOKUP_SRC).
    fn source(params: &bpf_fib_lookup) -> Self;
    /// `set_addresses` with the frame's own addresses (as rewritten).
    fn load_addresses<F: Frame>(frame: &F, packet: &Packet<Self>, params: &mut bpf_fib_lookup) -> Result<(), i64>;
    /// The packet's length from its IP header, for the lookup's MTU check.
    fn ip_len<F: Frame>(frame: &F, packet: &Packet<Self>) -> Result<u16, i64>;
    /// Takes one off the TTL (IPv4, whose header checksum follows) or hop
    /// limit (IPv6); false, and the frame untouched, when it would run out.
    fn hop<F: Frame>(frame: &F, packet: &Packet<Self>) -> Result<bool, i64>;
    /// The next hop the lookup found, for `bpf_redirect_neigh`; 0 for
    /// IPv6, whose neighbour the kernel finds by a lookup of its own.
    fn ipv4_nexthop(params: &bpf_fib_lookup) -> u32;
}

impl FibFamily for Ipv4 {
    const AF: u8 = 2;

    #[inline(always)]
    fn set_addresses(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self) {
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    }

    #[inline(always)]
    fn source(params: &bpf_fib_lookup) -> Self {
        // SAFETY: the IPv4 member of the union, which an AF_INET lookup fills.
        unsafe { params.__bindgen_anon_3.ipv4_src }.to_ne_bytes()
    }

    #[inline(always)]
    fn load_addresses<F: Frame>(frame: &F, packet: &Packet, params: &mut bpf_fib_lookup) -> Result<(), i64> {
        let addrs: [u8; 8] = frame.load(packet.saddr_offset())?;
        Self::set_addresses(params, [addrs[0], addrs[1], addrs[2], addrs[3]], [addrs[4], addrs[5], addrs[6], addrs[7]]);
        Ok(())
    }

    #[inline(always)]
    fn ip_len<F: Frame>(frame: &F, packet: &Packet) -> Result<u16, i64> {
        Ok(u16::from_be_bytes(frame.load(packet.l3_offset + 2)?))
    }

    #[inline(always)]
    fn hop<F: Frame>(frame: &F, packet: &Packet) -> Result<bool, i64> {
        let ttl_protocol: [u8; 2] = frame.load(packet.l3_offset + 8)?;
        if ttl_protocol[0] <= 1 {
            return Ok(false);
        }
        let decremented = [ttl_protocol[0] - 1, ttl_protocol[1]];
        let check: [u8; 2] = frame.load(packet.ip_check_offset())?;
        frame.store(packet.ip_check_offset(), &csum_replace(check, &ttl_protocol, &decremented))?;
        frame.store(packet.l3_offset + 8, &decremented)?;
        Ok(true)
    }

    #[inline(always)]
    fn ipv4_nexthop(params: &bpf_fib_lookup) -> u32 {
        // SAFETY: the helper wrote the next hop (the gateway, or the destination) here.
        unsafe { params.__bindgen_anon_4.ipv4_dst }
    }
}

impl FibFamily for Ipv6 {
    const AF: u8 = 10;

    /// A word at a time, through volatile accesses: moved whole, the
    /// 16-byte addresses become 128-bit values the BPF backend cannot hold
    /// in its registers.
    #[inline(always)]
    fn set_addresses(params: &mut bpf_fib_lookup, saddr: Self, daddr: Self) {
        for i in 0..4 {
            // SAFETY: writes of the union's IPv6 members, within the struct.
            unsafe {
                core::ptr::write_volatile(&mut params.__bindgen_anon_3.ipv6_src[i], saddr[i]);
                core::ptr::write_volatile(&mut params.__bindgen_anon_4.ipv6_dst[i], daddr[i]);
            }
        }
    }

    #[inline(always)]
    fn source(params: &bpf_fib_lookup) -> Self {
        // SAFETY: the IPv6 member of the union, which an AF_INET6 lookup
        // fills; read a word at a time (see `set_addresses`).
        unsafe {
            let src = &params.__bindgen_anon_3.ipv6_src;
            [
                core::ptr::read_volatile(&src[0]),
                core::ptr::read_volatile(&src[1]),
                core::ptr::read_volatile(&src[2]),
                core::ptr::read_volatile(&src[3]),
            ]
        }
    }

    /// Both addresses in one load, written a word at a time (see
    /// `set_addresses`).
    #[inline(always)]
    fn load_addresses<F: Frame>(frame: &F, packet: &Packet<Ipv6>, params: &mut bpf_fib_lookup) -> Result<(), i64> {
        // Read volatile: otherwise LLVM derives it from an offset computed
        // earlier, less a constant, which the verifier finds may be negative.
        let at = packet.saddr_offset();
        // SAFETY: a read of a local.
        let addrs: [u8; 32] = frame.load(unsafe { core::ptr::read_volatile(&at) })?;
        let word = |at: usize| u32::from_ne_bytes([addrs[at], addrs[at + 1], addrs[at + 2], addrs[at + 3]]);
        for i in 0..4 {
            // SAFETY: writes of the union's IPv6 members, within the struct.
            unsafe {
                core::ptr::write_volatile(&mut params.__bindgen_anon_3.ipv6_src[i], word(4 * i));
                core::ptr::write_volatile(&mut params.__bindgen_anon_4.ipv6_dst[i], word(16 + 4 * i));
            }
        }
        Ok(())
    }

    /// The payload length and the fixed header's 40 bytes.
    #[inline(always)]
    fn ip_len<F: Frame>(frame: &F, packet: &Packet<Ipv6>) -> Result<u16, i64> {
        Ok(u16::from_be_bytes(frame.load(packet.l3_offset + 4)?).saturating_add(40))
    }

    #[inline(always)]
    fn hop<F: Frame>(frame: &F, packet: &Packet<Ipv6>) -> Result<bool, i64> {
        // With the next-header byte before it: the verifier takes a 2-byte
        // bound check on XDP's packet, which LLVM writes as `<` for one.
        let [next_header, hop_limit]: [u8; 2] = frame.load(packet.l3_offset + 6)?;
        if hop_limit <= 1 {
            return Ok(false);
        }
        frame.store_uncovered(packet.l3_offset + 6, &[next_header, hop_limit - 1])?;
        Ok(true)
    }

    #[inline(always)]
    fn ipv4_nexthop(_: &bpf_fib_lookup) -> u32 {
        0
    }
}

/// A route lookup for a packet of `protocol` from `saddr` to `daddr`.
#[inline(always)]
pub fn fib_params<A: FibFamily>(protocol: u8, saddr: A, daddr: A, ifindex: u32, tot_len: u16) -> bpf_fib_lookup {
    // SAFETY: a plain C struct of integers, valid when zeroed.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = A::AF;
    params.l4_protocol = protocol;
    params.ifindex = ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    A::set_addresses(&mut params, saddr, daddr);
    params
}

/// Runs `bpf_fib_lookup`; returns its BPF_FIB_LKUP_RET_* code.
#[inline(always)]
pub fn fib_lookup(ctx: *mut c_void, params: &mut bpf_fib_lookup, flags: u32) -> u32 {
    // SAFETY: `params` is ours and sized as the helper expects.
    let rc = unsafe { fib_lookup_helper(ctx, params, size_of::<bpf_fib_lookup>() as i32, flags) };
    if rc < 0 { u32::MAX } else { rc as u32 }
}

/// Which hook sends the frame on: they differ in what the kernel can do
/// for them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// XDP: no skb. The MTU is checked against the IP length, and a next
    /// hop whose MAC is not known yet leaves the frame to the stack.
    Xdp,
    /// tc: the helper checks the skb against the MTU itself (aware of
    /// GRO-merged packets), and the kernel resolves a missing neighbour
    /// (`bpf_redirect_neigh`).
    Tc,
}

/// Where a translated frame goes next.
pub enum Route {
    /// To the stack, which routes it: no route, too big for the way out
    /// (the stack answers with fragmentation needed, to the frame's source
    /// as translated: for an SNAT flow, this node, not the client; see
    /// ARCHITECTURE.md), a TTL about to run out (time exceeded), or an XDP
    /// frame whose next hop has no MAC yet.
    Stack,
    /// MACs set and TTL down by one: send it out of `ifindex`.
    Out { ifindex: u32 },
    /// TTL down by one, the next hop's MAC not known yet: out of
    /// `ifindex` toward `nexthop` (IPv4; 0 for IPv6: the kernel looks the
    /// route up again), once the kernel has resolved it.
    Resolve { ifindex: u32, nexthop: u32 },
}

/// Looks up the route of the translated `packet` (which arrived on
/// `ifindex`) and readies the frame for it: new MACs, TTL (hop limit)
/// down by one. Leaves the frame as it was when it goes to the stack.
#[inline(always)]
pub fn next_hop<F: Frame, A: FibFamily>(
    frame: &F,
    ctx: *mut c_void,
    packet: &Packet<A>,
    ifindex: u32,
    sender: Sender,
) -> Result<Route, i64> {
    let tot_len = match sender {
        Sender::Xdp => A::ip_len(frame, packet)?,
        // 0: the helper measures the skb against the route's MTU.
        Sender::Tc => 0,
    };
    let mut params = fib_params(packet.protocol, A::default(), A::default(), ifindex, tot_len);
    A::load_addresses(frame, packet, &mut params)?;
    let resolve = match fib_lookup(ctx, &mut params, 0) {
        BPF_FIB_LKUP_RET_SUCCESS => false,
        BPF_FIB_LKUP_RET_NO_NEIGH if sender == Sender::Tc => true,
        _ => return Ok(Route::Stack),
    };
    if !A::hop(frame, packet)? {
        return Ok(Route::Stack);
    }
    if resolve {
        return Ok(Route::Resolve { ifindex: params.ifindex, nexthop: A::ipv4_nexthop(&params) });
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    frame.store(0, &macs)?;
    Ok(Route::Out { ifindex: params.ifindex })
}
