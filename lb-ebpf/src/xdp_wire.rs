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
//!
//! IPv6 frames go on in `xdp_from_wire6`, by tail call: the IPv6 pipeline
//! (pipeline6.rs) on an XDP frame, the one `tc_from_wire6` runs on an skb.
use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_redirect, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{Ipv6, TAIL_CALL_WIRE6, counter};

use crate::{
    classify,
    icmp::{self, ErrorRoute},
    maps::{XDP_TAIL_CALLS, count},
    nat::{Frame, xdp_data},
    parse::{self, Packet, Unparsed},
    pipeline6::{Hook6, pipeline6},
    route::{FibFamily, Route, Sender, next_hop},
    translate::{Action, translate},
    verdict::Origin,
};

#[xdp]
pub fn xdp_from_wire(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    counted(len, try_xdp_from_wire(&ctx))
}

#[xdp]
pub fn xdp_from_wire6(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let ifindex = ctx.ingress_ifindex() as u32;
    counted(len, pipeline6(&ctx, ifindex))
}

/// The XDP action from a counter and an action: the counter bumped for
/// `len` bytes; a rewrite that failed drops the packet, counted so.
#[inline(always)]
fn counted(len: u32, result: Result<(u32, u32), i64>) -> u32 {
    match result {
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
/// neither's stack is held while the other runs; IPv6 frames in
/// `xdp_from_wire6`, by a tail call made from the program's own frame
/// (hence inlined) once parsing has said the frame is IPv6. Without the
/// tail call (an agent that did not set it) an IPv6 frame passes.
#[inline(always)]
fn try_xdp_from_wire(ctx: &XdpContext) -> Result<(u32, u32), i64> {
    let ifindex = ctx.ingress_ifindex() as u32;
    match service_packet(ctx, ifindex)? {
        Some((IPV6_FRAME, _)) => {
            // SAFETY: a tail call to a program the agent put there, or none.
            unsafe { XDP_TAIL_CALLS.tail_call(ctx, TAIL_CALL_WIRE6) };
            Ok((counter::PASS_UNPARSED, XDP_PASS))
        }
        Some(done) => Ok(done),
        None => icmp_error(ctx, ifindex),
    }
}

/// `service_packet`'s counter for an IPv6 frame, for `xdp_from_wire6`.
const IPV6_FRAME: u32 = u32::MAX;

/// A TCP or UDP packet: translated if it is service traffic. `None` for
/// ICMP, which `icmp_error` takes; `IPV6_FRAME` for IPv6.
#[inline(never)]
fn service_packet(ctx: &XdpContext, ifindex: u32) -> Result<Option<(u32, u32)>, i64> {
    let packet = match parse::parse(ctx.data(), ctx.data_end()) {
        Ok(packet) => packet,
        Err(Unparsed::Icmp) => return Ok(None),
        Err(Unparsed::Ipv6) => return Ok(Some((IPV6_FRAME, XDP_PASS))),
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

/// Sends a translated frame on by the FIB: new MACs, TTL (IPv6: hop
/// limit) down by one, out the interface the route names. Without a complete answer (no neighbour
/// entry yet, say) the stack routes it instead. For both families.
#[inline(never)]
fn forward<A: FibFamily>(ctx: &XdpContext, packet: &Packet<A>, ifindex: u32) -> Result<u32, i64> {
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
    match icmp::port_unreachable(ctx, packet)? {
        Some(reply) => send_back(ctx, reply),
        None => Ok(XDP_DROP),
    }
}

/// Makes the frame `reply` and sends it back out the interface it came in on.
#[inline(always)]
fn send_back<const N: usize>(ctx: &XdpContext, reply: &[u8; N]) -> Result<u32, i64> {
    let delta = N as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context's own xdp_md pointer.
    let rc = unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) };
    if rc != 0 {
        return Err(rc);
    }
    Frame::store(ctx, 0, reply)?;
    Ok(XDP_TX)
}

impl Hook6 for XdpContext {
    type Action = u32;
    const PASS: u32 = XDP_PASS;
    const DROP: u32 = XDP_DROP;

    /// An XDP frame's headers are in its first buffer, all there is to
    /// parse. Its bounds are read volatile (`nat::xdp_data`): the parser
    /// runs in a frame of its own.
    #[inline(always)]
    fn parse6(&self) -> Result<Packet<Ipv6>, Unparsed> {
        let (data, data_end) = xdp_data(self);
        parse::parse6(data as usize, data_end as usize)
    }

    #[inline(always)]
    fn forward6(&self, packet: &Packet<Ipv6>, ifindex: u32) -> Result<u32, i64> {
        forward(self, packet, ifindex)
    }

    /// `reject` for IPv6. (A function of its own, as `reject` is.)
    #[inline(never)]
    fn reject6(&self, packet: &Packet<Ipv6>) -> Result<u32, i64> {
        match icmp::port_unreachable6(self, packet)? {
            Some(reply) => send_back(self, reply),
            None => Ok(XDP_DROP),
        }
    }
}
