//! Route lookups in the kernel's FIB: the address source NAT picks toward
//! a backend (`snat`), and where a translated frame goes next, for both
//! external hooks.
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup_helper,
};

use crate::{
    nat::{Frame, csum_replace},
    parse::Packet,
};

const AF_INET: u8 = 2;

/// A route lookup for an IPv4 packet from `saddr` to `daddr`.
#[inline(always)]
pub fn fib_params(packet: &Packet, saddr: [u8; 4], daddr: [u8; 4], ifindex: u32, tot_len: u16) -> bpf_fib_lookup {
    // SAFETY: a plain C struct of integers, valid when zeroed.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = packet.protocol;
    params.ifindex = ifindex;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
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
    /// (the stack answers with fragmentation needed), a TTL about to run
    /// out (time exceeded), or an XDP frame whose next hop has no MAC yet.
    Stack,
    /// MACs set and TTL down by one: send it out of `ifindex`.
    Out { ifindex: u32 },
    /// TTL down by one, the next hop's MAC not known yet: out of
    /// `ifindex` toward `nexthop`, once the kernel has resolved it.
    Resolve { ifindex: u32, nexthop: u32 },
}

/// Looks up the route of the translated `packet` (which arrived on
/// `ifindex`) and readies the frame for it: new MACs, TTL down by one.
/// Leaves the frame as it was when it goes to the stack.
#[inline(always)]
pub fn next_hop<F: Frame>(
    frame: &F,
    ctx: *mut c_void,
    packet: &Packet,
    ifindex: u32,
    sender: Sender,
) -> Result<Route, i64> {
    let l3 = packet.l3_offset;
    let addrs: [u8; 8] = frame.load(packet.saddr_offset())?;
    let tot_len = match sender {
        Sender::Xdp => u16::from_be_bytes(frame.load(l3 + 2)?),
        // 0: the helper measures the skb against the route's MTU.
        Sender::Tc => 0,
    };
    let mut params = fib_params(
        packet,
        [addrs[0], addrs[1], addrs[2], addrs[3]],
        [addrs[4], addrs[5], addrs[6], addrs[7]],
        ifindex,
        tot_len,
    );
    let resolve = match fib_lookup(ctx, &mut params, 0) {
        BPF_FIB_LKUP_RET_SUCCESS => false,
        BPF_FIB_LKUP_RET_NO_NEIGH if sender == Sender::Tc => true,
        _ => return Ok(Route::Stack),
    };
    let ttl_protocol: [u8; 2] = frame.load(l3 + 8)?;
    if ttl_protocol[0] <= 1 {
        return Ok(Route::Stack);
    }
    let decremented = [ttl_protocol[0] - 1, ttl_protocol[1]];
    let check: [u8; 2] = frame.load(packet.ip_check_offset())?;
    frame.store(packet.ip_check_offset(), &csum_replace(check, &ttl_protocol, &decremented))?;
    frame.store(l3 + 8, &decremented)?;
    if resolve {
        // SAFETY: the helper wrote the next hop (the gateway, or the destination) here.
        let nexthop = unsafe { params.__bindgen_anon_4.ipv4_dst };
        return Ok(Route::Resolve { ifindex: params.ifindex, nexthop });
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    frame.store(0, &macs)?;
    Ok(Route::Out { ifindex: params.ifindex })
}
