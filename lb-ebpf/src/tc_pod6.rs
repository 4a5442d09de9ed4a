//! tc ingress on the host side of a pod interface, for IPv6: `tc_from_pod`
//! tail-calls `tc_from_pod6` for every IPv6 frame. The pipeline is the
//! one every hook shares (`classify`, `translate`), compiled for IPv6; what
//! differs is only where its state lives. IPv6's addresses, keys and
//! entries are four times IPv4's, and the verifier allows 512 bytes of
//! stack for a program's whole call chain, so this program keeps the
//! packet and its rewrite in a per-CPU slot (STATE6), and runs each half
//! of the pipeline (a flow with a live conntrack entry; a new flow) in a
//! frame of its own that hands back plain data: the counter, the action,
//! and the rewrite, which this frame applies. Measured frames (bytes):
//! this one 48, parse 72, tracked 200, untracked 392, the tc rewrite 168,
//! refusal 144, ICMPv6 error steps up to 240: 440 on the deepest chain,
//! of the verifier's 512.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{Ipv6, counter};

use crate::{
    classify,
    family::Family,
    filter, icmp,
    maps::STATE6,
    nat::{Frame, Rewrite},
    parse::{Packet, Unparsed},
    skb,
    translate::{Action, decide},
    verdict::Origin,
};

#[classifier]
pub fn tc_from_pod6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    skb::counted(len, try_tc_from_pod6(&ctx))
}

#[inline(always)]
fn try_tc_from_pod6(ctx: &TcContext) -> Result<(u32, i32), i64> {
    // The packet and its rewrite live in this CPU's slot of STATE6: on the
    // stack they would leave the pipeline's frames too little of it.
    let Some(state) = STATE6.get_ptr_mut(0) else {
        return Ok((counter::PASS_UNPARSED, TC_ACT_OK as i32));
    };
    // SAFETY: this CPU's slot, used by one program run at a time.
    let state = unsafe { &mut *state };
    match parse6(ctx, &mut state.packet) {
        PARSED => {}
        ICMP => {
            // A failed rewrite may have left the error half translated:
            // dropped, as IPv4's is.
            let index = icmp_error6(ctx, &mut state.rewrite);
            let action = if index == counter::DROP_REWRITE_FAILED { TC_ACT_SHOT } else { TC_ACT_OK };
            return Ok((index, action as i32));
        }
        _ => return Ok((counter::PASS_UNPARSED, TC_ACT_OK as i32)),
    }
    let packet = &state.packet;
    if !filter::may_be_service_traffic(packet) {
        return Ok((counter::PASS, TC_ACT_OK as i32));
    }
    // Each half of the pipeline in a frame of its own, which hands back
    // the rewrite, as plain data, for this frame to apply.
    let mut outcome = tracked6(packet, &mut state.rewrite);
    if outcome == UNTRACKED {
        outcome = untracked6(packet, &mut state.rewrite);
    }
    if outcome & REWRITE != 0 {
        ctx.rewrite(packet, &state.rewrite)?;
    }
    let index = (outcome >> 8) as u32;
    let action = match (outcome & 0x0f) as u8 {
        ACTION_DROP => TC_ACT_SHOT as i32,
        ACTION_REJECT => skb::reject6(ctx, packet)?,
        _ => TC_ACT_OK as i32,
    };
    Ok((index, action))
}

/// `parse6`'s answers: a TCP or UDP packet (in `packet`), ICMPv6, other.
const PARSED: u32 = 0;
const ICMP: u32 = 1;
const OTHER: u32 = 2;

/// Parses the skb into `packet`, in a frame of its own (its temporaries
/// would add to the pipeline's).
#[inline(never)]
fn parse6(ctx: &TcContext, packet: &mut Packet<Ipv6>) -> u32 {
    match skb::parse6(ctx) {
        Ok(parsed) => {
            *packet = parsed;
            PARSED
        }
        Err(Unparsed::Icmp) => ICMP,
        Err(_) => OTHER,
    }
}

/// Translates a pod's ICMPv6 error about a translated flow (a backend's
/// port unreachable, a Packet Too Big); the stack routes it on. Returns
/// the counter to bump. The flow's key goes in IPv6's key slot.
#[inline(never)]
fn icmp_error6(ctx: &TcContext, rewrite: &mut Rewrite<Ipv6>) -> u32 {
    let Some(key) = <Ipv6 as Family>::key_scratch() else {
        return counter::PASS_UNPARSED;
    };
    // SAFETY: this CPU's slot, used by one program run at a time.
    let key = unsafe { &mut *key };
    match icmp::translate_error6(ctx, key, rewrite) {
        Ok(true) => counter::ICMP_ERROR_TRANSLATED,
        Ok(false) => counter::PASS_UNPARSED,
        Err(_) => counter::DROP_REWRITE_FAILED,
    }
}

/// `tracked6`'s answer for a flow without a live entry.
const UNTRACKED: i64 = i64::MAX;
const ACTION_PASS: u8 = 0;
const ACTION_DROP: u8 = 1;
const ACTION_REJECT: u8 = 2;

/// `outcome`'s bit saying the rewrite it filled in is to be applied.
const REWRITE: i64 = 0x10;

/// A decision in one register (the counter, the action, whether to
/// rewrite), its rewrite copied field by field into `out`: a value
/// written whole through a pointer may carry bytes LLVM never set, which
/// the verifier refuses.
#[inline(always)]
fn outcome(decided: (u32, Action, Option<Rewrite<Ipv6>>), out: &mut Rewrite<Ipv6>) -> i64 {
    let (index, action, rewrite) = decided;
    let action = match action {
        Action::Pass | Action::Forward => ACTION_PASS,
        Action::Drop => ACTION_DROP,
        Action::Reject => ACTION_REJECT,
    };
    let mut code = i64::from(index) << 8 | i64::from(action);
    if let Some(rewrite) = rewrite {
        out.source.0 = rewrite.source.0;
        out.source.1 = rewrite.source.1;
        out.destination.0 = rewrite.destination.0;
        out.destination.1 = rewrite.destination.1;
        out.forward = rewrite.forward;
        code |= REWRITE;
    }
    code
}

#[inline(never)]
fn tracked6(packet: &Packet<Ipv6>, out: &mut Rewrite<Ipv6>) -> i64 {
    // Through memory: LLVM otherwise carries the verdict's fields in
    // registers across the arms of its matches, unset in the arms whose
    // variant lacks them, which the verifier refuses ("!read_ok").
    let verdict = classify::tracked(packet);
    // SAFETY: a read of a local.
    match unsafe { core::ptr::read_volatile(&verdict) } {
        Some(verdict) => outcome(decide(packet, verdict), out),
        None => UNTRACKED,
    }
}

#[inline(never)]
fn untracked6(packet: &Packet<Ipv6>, out: &mut Rewrite<Ipv6>) -> i64 {
    let verdict = classify::untracked(packet, Origin::Pod);
    // SAFETY: a read of a local (see `tracked6`).
    outcome(decide(packet, unsafe { core::ptr::read_volatile(&verdict) }), out)
}
