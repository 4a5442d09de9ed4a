//! What both tc hooks share: reading headers that lie outside an skb's
//! linear part, and refusing a packet with an ICMP error.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::{
    icmp,
    nat::Frame,
    parse::{self, MAX_HEADERS_LEN, Packet, Unparsed},
};

/// Parses the skb's headers, pulling them into the linear part first
/// when they are not all there.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, Unparsed> {
    match parse::parse(ctx.data(), ctx.data_end()) {
        Err(Unparsed::Short) if ctx.data_end() - ctx.data() < ctx.len() as usize => {
            // Headers not in the linear part of the skb: pull them in, once.
            let want = (ctx.len() as usize).min(MAX_HEADERS_LEN);
            ctx.pull_data(want as u32).map_err(|_| Unparsed::Short)?;
            parse::parse(ctx.data(), ctx.data_end())
        }
        parsed => parsed,
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
    let Some(reply) = icmp::port_unreachable(ctx, packet)? else {
        return Ok(TC_ACT_SHOT as i32);
    };
    // SAFETY: the context's own skb pointer.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, icmp::REPLY_LEN as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    Frame::store(ctx, 0, reply)?;
    // SAFETY: a plain helper call; the verdict it returns is the tc action.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}
