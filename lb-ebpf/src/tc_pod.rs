//! tc ingress on the host side of a pod interface: everything a pod sends.
//! Requests to a service are DNATed to a backend; replies from backends are
//! translated back to the service address.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    macros::classifier,
    programs::TcContext,
};
use lb_common::counter;

use crate::{
    classify, icmp,
    maps::count,
    nat::Frame,
    parse::{self, MAX_HEADERS_LEN, Packet, Unparsed},
    translate::{Action, translate},
    verdict::Origin,
};

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    match try_tc_from_pod(&ctx) {
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

fn parse_skb(ctx: &TcContext) -> Result<Packet, Unparsed> {
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

/// Returns the counter to bump and the tc action.
fn try_tc_from_pod(ctx: &TcContext) -> Result<(u32, i32), i64> {
    let packet = match parse_skb(ctx) {
        Ok(packet) => packet,
        Err(Unparsed::Icmp) => return icmp_error(ctx),
        Err(_) => return Ok((counter::PASS_UNPARSED, TC_ACT_OK as i32)),
    };
    let (index, action) = translate(ctx, &packet, classify::classify(&packet, Origin::Pod))?;
    let action = match action {
        // The stack routes the translated packet, to a pod or another node.
        Action::Pass | Action::Forward => TC_ACT_OK as i32,
        Action::Drop => TC_ACT_SHOT as i32,
        Action::Reject => reject(ctx, &packet)?,
    };
    Ok((index, action))
}

/// Translates a pod's ICMP error about a translated flow (a backend's port
/// unreachable, say); the stack routes it on.
/// (A function of its own: it needs stack the main path does not.)
#[inline(never)]
fn icmp_error(ctx: &TcContext) -> Result<(u32, i32), i64> {
    let translated = icmp::translate_error(ctx)?.is_some();
    let index = if translated { counter::ICMP_ERROR_TRANSLATED } else { counter::PASS_UNPARSED };
    Ok((index, TC_ACT_OK as i32))
}

/// Turns the packet into an ICMP port unreachable and sends it back out
/// the interface it came in on.
fn reject(ctx: &TcContext, packet: &Packet) -> Result<i32, i64> {
    let Some(reply) = icmp::port_unreachable(ctx, packet)? else {
        return Ok(TC_ACT_SHOT as i32);
    };
    // SAFETY: the context's own skb pointer.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, icmp::REPLY_LEN as u32, 0) };
    if rc != 0 {
        return Err(rc);
    }
    Frame::store(ctx, 0, reply)?;
    // SAFETY: reading the skb's own interface index.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain helper call; the verdict it returns is the tc action.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
