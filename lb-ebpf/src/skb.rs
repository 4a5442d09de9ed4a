//! What both tc hooks share: reading headers that lie outside an skb's
//! linear part, and refusing a packet with an ICMP error.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use lb_common::{Ipv6, counter};

use crate::{
    icmp,
    maps::count,
    nat::Frame,
    parse::{Packet, Parse, Unparsed},
};

/// Parses the skb's headers, pulling them into the linear part first
/// when they are not all there.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Unparsed> {
    parse_pulled(ctx)
}

/// `parse` for an IPv6 skb.
#[inline(always)]
pub fn parse6(ctx: &TcContext) -> Result<Packet<Ipv6>, Unparsed> {
    parse_pulled(ctx)
}

#[inline(always)]
fn parse_pulled<A: Parse>(ctx: &TcContext) -> Result<Packet<A>, Unparsed> {
    match A::parse(ctx.data(), ctx.data_end()) {
        Err(Unparsed::Short) if ctx.data_end() - ctx.data() < ctx.len() as usize => {
            // Headers not in the linear part of the skb: pull them in, once.
            let want = (ctx.len() as usize).min(A::MAX_HEADERS_LEN);
            ctx.pull_data(want as u32).map_err(|_| Unparsed::Short)?;
            A::parse(ctx.data(), ctx.data_end())
        }
        parsed => parsed,
    }
}

/// A tc hook's answer from its counter and action: the counter bumped
/// for `len` bytes; a rewrite that failed drops the packet, counted so.
#[inline(always)]
pub fn counted(len: u32, result: Result<(u32, i32), i64>) -> i32 {
    match result {
        Ok((index, action)) => {
            count(index, len);
            action
        }
        Err(_) => {
            count(counter::DROP_REWRITE_FAILED, len);
            TC_ACT_SHOT as i32
        }
    }
}

/// The skb's interface: the one it arrived on, at ingress.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading the skb's own interface index.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Turns the packet into an ICMP port unreachable and sends it back out
/// the interface it came in on. (A function of its own: the reply needs
/// stack the main path does not.)
#[inline(never)]
pub fn reject(ctx: &TcContext, packet: &Packet) -> Result<i32, i64> {
    match icmp::port_unreachable(ctx, packet)? {
        Some(reply) => send_back(ctx, reply),
        None => Ok(TC_ACT_SHOT as i32),
    }
}

/// `reject` for IPv6: an ICMPv6 port unreachable.
#[inline(never)]
pub fn reject6(ctx: &TcContext, packet: &Packet<Ipv6>) -> Result<i32, i64> {
    match icmp::port_unreachable6(ctx, packet)? {
        Some(reply) => send_back(ctx, reply),
        None => Ok(TC_ACT_SHOT as i32),
    }
}

/// Makes the skb `reply` and sends it back out the interface it came in on.
#[inline(always)]
fn send_back<const N: usize>(ctx: &TcContext, reply: &[u8; N]) -> Result<i32, i64> {
    // SAFETY: the context's own skb pointer.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    Frame::store(ctx, 0, reply)?;
    // SAFETY: a plain helper call; the verdict it returns is the tc action.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}
