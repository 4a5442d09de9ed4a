//! tc ingress on the host side of a pod interface: everything a pod sends.
//! Requests to a service are DNATed to a backend; replies from backends are
//! translated back to the service address.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::counter;

use crate::{
    classify, icmp,
    maps::count,
    parse::Unparsed,
    skb,
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

/// Returns the counter to bump and the tc action.
fn try_tc_from_pod(ctx: &TcContext) -> Result<(u32, i32), i64> {
    let packet = match skb::parse(ctx) {
        Ok(packet) => packet,
        Err(Unparsed::Icmp) => return icmp_error(ctx),
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
