//! tc ingress on the host side of a pod interface: everything a pod sends.
//! Requests to a service are DNATed to a backend; replies from backends are
//! translated back to the service address.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{TAIL_CALL_POD6, counter};

use crate::{
    classify, icmp,
    maps::TAIL_CALLS,
    parse::Unparsed,
    skb,
    translate::{Action, translate},
    verdict::Origin,
};

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    skb::counted(len, try_tc_from_pod(&ctx))
}

/// Returns the counter to bump and the tc action. (Inlined: the tail
/// call must be made from the program's own frame.)
#[inline(always)]
fn try_tc_from_pod(ctx: &TcContext) -> Result<(u32, i32), i64> {
    let packet = match skb::parse(ctx) {
        Ok(packet) => packet,
        Err(Unparsed::Icmp) => return icmp_error(ctx),
        Err(Unparsed::Ipv6) => {
            // IPv6 goes on in `tc_from_pod6`, a program of its own so that
            // its stack is its own (see pipeline6.rs). Without the tail call
            // (an agent that did not set it), the packet passes untouched.
            // SAFETY: a tail call to a program the agent put there, or none.
            unsafe { TAIL_CALLS.tail_call(ctx, TAIL_CALL_POD6) };
            return Ok((counter::PASS_UNPARSED, TC_ACT_OK as i32));
        }
        Err(_) => return Ok((counter::PASS_UNPARSED, TC_ACT_OK as i32)),
    };
    let (index, action) = translate(ctx, &packet, classify::classify(&packet, Origin::Pod))?;
    let action = match action {
        // The stack routes the translated packet, to a pod or another node.
        Action::Pass | Action::Forward => TC_ACT_OK as i32,
        Action::Drop => TC_ACT_SHOT as i32,
        Action::Reject => skb::reject(ctx, &packet)?,
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
