//! XDP on the node's external interfaces whose driver runs it natively
//! (`--external-datapath`; `tc_wire.rs` serves the others): NodePort,
//! LoadBalancer and ExternalIP traffic from clients anywhere, and replies
//! coming back to this node.
//!
//! A backend on this node: DNAT and pass to the stack, which routes to the
//! pod; its reply is translated back by `tc_from_pod`. A backend on another
//! node: DNAT and SNAT to this node, and send the frame straight back out
//! (XDP_TX, or a redirect to another interface) after a FIB lookup; the
//! reply comes back here and is translated and sent to the client the same
//! way. When the FIB cannot say where to (no neighbour entry yet), the
//! translated frame is passed to the stack, which routes it. ICMP errors
//! about translated flows are translated the same way.
use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_redirect, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::counter;

use crate::{
    classify,
    icmp::{self, ErrorRoute},
    maps::count,
    nat::Frame,
    parse::{self, Packet, Unparsed},
    route::{Route, Sender, next_hop},
    translate::{Action, translate},
    verdict::Origin,
};

#[xdp]
pub fn xdp_from_wire(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    match try_xdp_from_wire(&ctx) {
        Ok((index, action)) => {
            count(index, len);
            action
        }
        Err(_) => {
            count(counter::DROP_REWRITE_FAILED, len);
            XDP_DROP
        }
    }
}

/// Returns the counter to bump and the XDP action. TCP and UDP, and ICMP
/// errors, each go their own way in a function of their own, so that
/// neither's stack is held while the other runs.
fn try_xdp_from_wire(ctx: &XdpContext) -> Result<(u32, u32), i64> {
    let ifindex = ctx.ingress_ifindex() as u32;
    match service_packet(ctx, ifindex)? {
        Some(done) => Ok(done),
        None => icmp_error(ctx, ifindex),
    }
}

/// A TCP or UDP packet: translated if it is service traffic. `None` for
/// ICMP, which `icmp_error` takes.
#[inline(never)]
fn service_packet(ctx: &XdpContext, ifindex: u32) -> Result<Option<(u32, u32)>, i64> {
    let packet = match parse::parse(ctx.data(), ctx.data_end()) {
        Ok(packet) => packet,
        Err(Unparsed::Icmp) => return Ok(None),
        Err(_) => return Ok(Some((counter::PASS_UNPARSED, XDP_PASS))),
    };
    let verdict = classify::classify(&packet, Origin::Wire { ctx: ctx.as_ptr(), ifindex });
    let (index, action) = translate(ctx, &packet, verdict)?;
    let action = match action {
        Action::Pass => XDP_PASS,
        Action::Forward => forward(ctx, &packet, ifindex)?,
        Action::Drop => XDP_DROP,
        Action::Reject => reject(ctx, &packet)?,
    };
    Ok(Some((index, action)))
}

/// Translates an ICMP error about a translated flow, and routes it as its
/// flow's packets are.
#[inline(never)]
fn icmp_error(ctx: &XdpContext, ifindex: u32) -> Result<(u32, u32), i64> {
    Ok(match icmp::translate_error(ctx)? {
        None => (counter::PASS_UNPARSED, XDP_PASS),
        Some(ErrorRoute::Pass) => (counter::ICMP_ERROR_TRANSLATED, XDP_PASS),
        Some(ErrorRoute::Forward) => (counter::ICMP_ERROR_TRANSLATED, forward(ctx, &icmp::error_header(), ifindex)?),
    })
}

/// Sends a translated frame on by the FIB: new MACs, TTL down by one, out
/// the interface the route names. Without a complete answer (no neighbour
/// entry yet, say) the stack routes it instead.
#[inline(never)]
fn forward(ctx: &XdpContext, packet: &Packet, ifindex: u32) -> Result<u32, i64> {
    Ok(match next_hop(ctx, ctx.as_ptr(), packet, ifindex, Sender::Xdp)? {
        Route::Out { ifindex: out } if out == ifindex => XDP_TX,
        // SAFETY: a plain helper call; it returns the XDP action.
        Route::Out { ifindex: out } => (unsafe { bpf_redirect(out, 0) }) as u32,
        Route::Stack | Route::Resolve { .. } => XDP_PASS,
    })
}

/// Turns the frame into an ICMP port unreachable and sends it back out.
/// (A function of its own: the reply needs stack the main path does not.)
#[inline(never)]
fn reject(ctx: &XdpContext, packet: &Packet) -> Result<u32, i64> {
    let Some(reply) = icmp::port_unreachable(ctx, packet)? else {
        return Ok(XDP_DROP);
    };
    let delta = icmp::REPLY_LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context's own xdp_md pointer.
    let rc = unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) };
    if rc != 0 {
        return Err(rc);
    }
    Frame::store(ctx, 0, reply)?;
    Ok(XDP_TX)
}
