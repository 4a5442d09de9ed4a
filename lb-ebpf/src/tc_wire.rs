//! tc ingress on the node's external interfaces: the same service as
//! `xdp_from_wire` (NodePort, LoadBalancer and ExternalIP traffic, replies
//! coming back, ICMP errors about translated flows), for interfaces where
//! XDP cannot send frames on: a veth on a bridge (kind, containerlab), or
//! any driver without native XDP. The default there (`--external-datapath`).
//!
//! Translation is `classify` and `translate` as in every packet hook; the
//! L4 checksum is updated by the kernel's helper, which also handles a
//! frame that carries only a partial checksum (CHECKSUM_PARTIAL, as a
//! veth forwards it). Frames sent on go out by the FIB
//! (`route::next_hop`): redirected with the next hop's MAC, or, while that
//! is not known, with `bpf_redirect_neigh`, which resolves it.
use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_redir_neigh},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use core::mem::size_of;
use lb_common::{TAIL_CALL_WIRE6, counter};

use crate::{
    classify,
    icmp::{self, ErrorRoute},
    maps::WIRE_TAIL_CALLS,
    parse::{Packet, Unparsed},
    route::{FibFamily, Route, Sender, next_hop},
    skb,
    translate::{Action, translate},
    verdict::Origin,
};

const AF_INET: u32 = 2;

#[classifier]
pub fn tc_from_wire(ctx: TcContext) -> i32 {
    let len = ctx.len();
    skb::counted(len, try_tc_from_wire(&ctx))
}

/// Returns the counter to bump and the tc action. TCP and UDP, and ICMP
/// errors, each go their own way, as in `xdp_from_wire`; IPv6 frames in
/// `tc_from_wire6` (tc6.rs), by tail call, made from the program's own
/// frame (hence inlined) once parsing has said the frame is IPv6: IPv4
/// pays nothing for it. Without the tail call (an agent that did not set
/// it) an IPv6 frame passes untouched.
#[inline(always)]
fn try_tc_from_wire(ctx: &TcContext) -> Result<(u32, i32), i64> {
    let ifindex = skb::ifindex(ctx);
    match service_packet(ctx, ifindex)? {
        Some((IPV6_FRAME, _)) => {
            // SAFETY: a tail call to a program the agent put there, or none.
            unsafe { WIRE_TAIL_CALLS.tail_call(ctx, TAIL_CALL_WIRE6) };
            Ok((counter::PASS_UNPARSED, TC_ACT_OK as i32))
        }
        Some((index, Some(action))) => Ok((index, action)),
        Some((index, None)) => Ok((index, refuse(ctx)?)),
        None => icmp_error(ctx, ifindex),
    }
}

/// `service_packet`'s counter for an IPv6 frame, for `tc_from_wire6`.
const IPV6_FRAME: u32 = u32::MAX;

/// A TCP or UDP packet, translated if it is service traffic: the counter
/// to bump and the tc action, or no action for a packet to refuse. `None`
/// for ICMP, which `icmp_error` takes; `IPV6_FRAME` for IPv6.
#[inline(never)]
fn service_packet(ctx: &TcContext, ifindex: u32) -> Result<Option<(u32, Option<i32>)>, i64> {
    let packet = match skb::parse(ctx) {
        Ok(packet) => packet,
        Err(Unparsed::Icmp) => return Ok(None),
        Err(Unparsed::Ipv6) => return Ok(Some((IPV6_FRAME, None))),
        Err(_) => return Ok(Some((counter::PASS_UNPARSED, Some(TC_ACT_OK as i32)))),
    };
    let verdict = classify::classify(&packet, Origin::Wire { ctx: ctx.as_ptr(), ifindex });
    let (index, action) = translate(ctx, &packet, verdict)?;
    let action = match action {
        Action::Pass => TC_ACT_OK as i32,
        Action::Forward => forward(ctx, &packet, ifindex)?,
        Action::Drop => TC_ACT_SHOT as i32,
        Action::Reject => return Ok(Some((index, None))),
    };
    Ok(Some((index, Some(action))))
}

/// Refuses the packet `service_packet` left untouched. Rare (a Service
/// without endpoints), so the packet is parsed again here rather than
/// held across: the reply's stack on top of `service_packet`'s would
/// break the verifier's 512-byte limit on nested calls.
#[inline(never)]
fn refuse(ctx: &TcContext) -> Result<i32, i64> {
    match skb::parse(ctx) {
        Ok(packet) => skb::reject(ctx, &packet),
        Err(_) => Ok(TC_ACT_SHOT as i32),
    }
}

/// Translates an ICMP error about a translated flow, and routes it as its
/// flow's packets are.
#[inline(never)]
fn icmp_error(ctx: &TcContext, ifindex: u32) -> Result<(u32, i32), i64> {
    Ok(match icmp::translate_error(ctx)? {
        None => (counter::PASS_UNPARSED, TC_ACT_OK as i32),
        Some(ErrorRoute::Pass) => (counter::ICMP_ERROR_TRANSLATED, TC_ACT_OK as i32),
        Some(ErrorRoute::Forward) => (counter::ICMP_ERROR_TRANSLATED, forward(ctx, &icmp::error_header(), ifindex)?),
    })
}

/// Sends a translated frame on by the FIB, or to the stack when the FIB
/// has no answer for it. For both families (`tc_from_wire6` too).
#[inline(never)]
pub fn forward<A: FibFamily>(ctx: &TcContext, packet: &Packet<A>, ifindex: u32) -> Result<i32, i64> {
    // SAFETY (both helper calls): plain calls; the verdict each returns is the tc action.
    Ok(match next_hop(ctx, ctx.as_ptr(), packet, ifindex, Sender::Tc)? {
        Route::Stack => TC_ACT_OK as i32,
        Route::Out { ifindex } => (unsafe { bpf_redirect(ifindex, 0) }) as i32,
        // IPv6: the kernel finds the route's next hop itself.
        Route::Resolve { ifindex, nexthop: 0 } => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        Route::Resolve { ifindex, nexthop } => {
            let mut params = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: nexthop },
            };
            unsafe { bpf_redirect_neigh(ifindex, &mut params, size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
        }
    })
}
