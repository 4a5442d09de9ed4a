//! The IPv6 packet pipeline, the one every packet hook shares
//! (`classify`, `translate`) compiled for IPv6, for the hooks' IPv6
//! halves: `tc_from_pod6`, `tc_from_wire6` (tc6.rs) and `xdp_from_wire6`
//! (xdp_wire.rs), which their IPv4 programs tail-call. They differ in the
//! packet's origin (a pod, or an external interface, whose clients may be
//! outside the cluster and are source-NATed toward backends on other
//! nodes) and in what the hook is (`Hook6`). A translated frame goes to
//! the stack, which routes it to a pod, except an SNAT flow's (toward
//! the other node, or back to the client), which the external hooks send
//! on by the FIB as IPv4's are (`route::next_hop`).
//!
//! What differs from IPv4 is where the pipeline's state lives. IPv6's
//! addresses, keys and entries are four times IPv4's, and the verifier
//! allows 512 bytes of stack for a program's whole call chain, so the
//! pipeline keeps the packet and its rewrite in a per-CPU slot (STATE6),
//! and runs each part (a flow with a live conntrack entry; a new flow's
//! choice of backend, source NAT and admission) in a frame of its own
//! that hands back plain data: the counter, the action, and the rewrite,
//! which the hook's frame applies. Measured frames on tc (bytes): the
//! program's 48, parse 72, tracked 200, untracked 392, the tc rewrite
//! 168, refusal 144, ICMPv6 error steps up to 240: 440 on the deepest
//! chain, of the verifier's 512.
use core::ffi::c_void;

use aya_ebpf::EbpfContext;
use lb_common::{Backend6, Ipv6, counter};

use crate::{
    classify::{self, Chosen},
    conntrack,
    family::Family,
    filter, icmp,
    maps::{STATE6, State6},
    nat::{Frame, Rewrite},
    parse::{Packet, Unparsed},
    translate::{Action, decide},
    verdict::{Origin, Verdict},
};

/// What a packet hook brings to the IPv6 pipeline: its frame's parser,
/// its actions, and its way of refusing a packet.
pub trait Hook6: Frame + EbpfContext {
    /// TC_ACT_*, XDP_*.
    type Action: Copy;
    /// Hands the frame to the stack.
    const PASS: Self::Action;
    const DROP: Self::Action;
    fn parse6(&self) -> Result<Packet<Ipv6>, Unparsed>;
    /// Turns the frame into an ICMPv6 port unreachable for `packet`'s
    /// sender and sends it back out.
    fn reject6(&self, packet: &Packet<Ipv6>) -> Result<Self::Action, i64>;
    /// Sends the translated frame on by the FIB (an SNAT flow's packets,
    /// either way), or to the stack; it arrived on `ifindex`.
    fn forward6(&self, packet: &Packet<Ipv6>, ifindex: u32) -> Result<Self::Action, i64>;
}

/// The counter to bump and the hook's action for an IPv6 frame from a pod
/// (`wire_ifindex` 0) or from the external interface `wire_ifindex`.
#[inline(always)]
pub fn pipeline6<H: Hook6>(ctx: &H, wire_ifindex: u32) -> Result<(u32, H::Action), i64> {
    // The packet and its rewrite live in this CPU's slot of STATE6: on the
    // stack they would leave the pipeline's frames too little of it.
    let Some(slot) = STATE6.get_ptr_mut(0) else {
        return Ok((counter::PASS_UNPARSED, H::PASS));
    };
    // SAFETY: this CPU's slot, used by one program run at a time.
    let state = unsafe { &mut *slot };
    match parse6(ctx, &mut state.packet) {
        PARSED => {}
        ICMP => {
            // A failed rewrite may have left the error half translated:
            // dropped, as IPv4's is.
            let index = icmp_error6(ctx, &mut state.rewrite);
            let action = if index == counter::DROP_REWRITE_FAILED { H::DROP } else { H::PASS };
            return Ok((index, action));
        }
        _ => return Ok((counter::PASS_UNPARSED, H::PASS)),
    }
    let packet = &state.packet;
    if !filter::may_be_service_traffic(packet) {
        return Ok((counter::PASS, H::PASS));
    }
    // Each part of the pipeline in a frame of its own, which hands back
    // the rewrite, as plain data, for this frame to apply: a flow's live
    // entry; else the Service's choice of backend; then its admission
    // (source NAT, the entries).
    let mut outcome = tracked6(packet, &mut state.rewrite);
    if outcome == UNTRACKED {
        outcome = choose6(packet, &mut state.rewrite, &mut state.backend, wire_ifindex == 0);
    }
    if outcome != UNTRACKED && outcome & CHOSEN != 0 {
        let external = outcome & CHOSEN_EXTERNAL != 0;
        // Source NAT only for clients from the wire, of external frontends,
        // toward backends on other nodes (`classify::snat_for`).
        outcome = if wire_ifindex != 0 && external && !state.backend.is_local() {
            snat6(slot, ctx.as_ptr(), wire_ifindex)
        } else {
            0
        };
        if outcome == 0 || outcome == SNATTED {
            outcome = admit6(slot, outcome == SNATTED);
        }
    }
    if outcome & REWRITE != 0 {
        ctx.rewrite(packet, &state.rewrite)?;
    }
    let index = (outcome >> 8) as u32;
    let action = match (outcome & 0x0f) as u8 {
        ACTION_DROP => H::DROP,
        ACTION_REJECT => ctx.reject6(packet)?,
        // Only SNAT flows forward, and only the wire's clients get SNAT.
        ACTION_FORWARD if wire_ifindex != 0 => ctx.forward6(packet, wire_ifindex)?,
        _ => H::PASS,
    };
    Ok((index, action))
}

/// `parse6`'s answers: a TCP or UDP packet (in `packet`), ICMPv6, other.
const PARSED: u32 = 0;
const ICMP: u32 = 1;
const OTHER: u32 = 2;

/// Parses the frame into `packet`, in a frame of its own (its temporaries
/// would add to the pipeline's).
#[inline(never)]
fn parse6<H: Hook6>(ctx: &H, packet: &mut Packet<Ipv6>) -> u32 {
    match ctx.parse6() {
        Ok(parsed) => {
            *packet = parsed;
            PARSED
        }
        Err(Unparsed::Icmp) => ICMP,
        Err(_) => OTHER,
    }
}

/// Translates an ICMPv6 error about a translated flow (a backend's port
/// unreachable, a Packet Too Big from a router on the way); the stack
/// routes it on. Returns the counter to bump. The flow's key goes in
/// IPv6's key slot.
#[inline(never)]
fn icmp_error6<F: Frame>(ctx: &F, rewrite: &mut Rewrite<Ipv6>) -> u32 {
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
/// `choose6`'s answer when it chose a backend (in the state's slot), with
/// `CHOSEN_EXTERNAL` for a frontend reached from outside. Bits no
/// `outcome` has (its counter index sits in bits 8 to 39).
const CHOSEN: i64 = 1 << 61;
const CHOSEN_EXTERNAL: i64 = 1 << 60;
/// `snat6`'s answer when it found the flow's source (in the state's slot).
const SNATTED: i64 = 1 << 59;
/// The outcome of a packet passed untouched.
const PASSED: i64 = (counter::PASS as i64) << 8 | ACTION_PASS as i64;
const ACTION_PASS: u8 = 0;
const ACTION_DROP: u8 = 1;
const ACTION_REJECT: u8 = 2;
const ACTION_FORWARD: u8 = 3;

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
        Action::Pass => ACTION_PASS,
        Action::Forward => ACTION_FORWARD,
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

/// A new flow's Service, lookup to selection: the outcome of a verdict
/// already reached, or `CHOSEN` (with `CHOSEN_EXTERNAL`) and the backend
/// in `backend`. The flow's key is in IPv6's key slot, where `tracked6`
/// left it.
#[inline(never)]
fn choose6(packet: &Packet<Ipv6>, out: &mut Rewrite<Ipv6>, backend: &mut Backend6, internal_client: bool) -> i64 {
    let Some(key) = conntrack::scratched_key::<Ipv6>() else { return PASSED };
    match classify::choose(key, packet, internal_client) {
        Chosen::Refused(refusal) => outcome(decide(packet, refusal.verdict()), out),
        Chosen::Backend { backend: chosen, external, now } => {
            // Field by field (see `outcome`); the clock is read again by
            // `admit6`, a tick later at most.
            let _ = now;
            backend.addr = chosen.addr;
            backend.port = chosen.port;
            backend.flags = chosen.flags;
            CHOSEN | if external { CHOSEN_EXTERNAL } else { 0 }
        }
    }
}

/// A new flow's source NAT (`classify::snat_for`) toward the backend
/// `choose6` left in `state`, for a client from the wire interface
/// `wire_ifindex`: `SNATTED` with the source in `state`, or the outcome of
/// a flow that cannot be (dropped). A frame of its own, beside `admit6`'s:
/// nested, the route lookup's would take the chain past 512 bytes.
#[inline(never)]
fn snat6(state: *mut State6, ctx: *mut c_void, wire_ifindex: u32) -> i64 {
    // SAFETY: this CPU's slot (see `pipeline6`), valid for the run; its
    // fields borrowed apart (the caller holds the packet).
    let (packet, backend, out) = unsafe { (&(*state).packet, &(*state).backend, &mut (*state).rewrite) };
    match classify::snat_for(Origin::Wire { ctx, ifindex: wire_ifindex }, packet, backend, true) {
        Some(Some((addr, port))) => {
            // SAFETY: as above.
            unsafe {
                (*state).snat_addr = addr;
                (*state).snat_port = port;
            }
            SNATTED
        }
        Some(None) => 0,
        None => outcome(decide(packet, Verdict::SnatFailed), out),
    }
}

/// A new flow's admission to the backend `choose6` left in `state`, from
/// the source `snat6` left there when `snatted`: its entries, its verdict.
#[inline(never)]
fn admit6(state: *mut State6, snatted: bool) -> i64 {
    // SAFETY: this CPU's slot (see `pipeline6`), valid for the run; its
    // fields borrowed apart (the caller holds the packet).
    let (packet, backend, out) = unsafe { (&(*state).packet, &(*state).backend, &mut (*state).rewrite) };
    let Some(key) = conntrack::scratched_key::<Ipv6>() else { return PASSED };
    let chosen = Backend6 {
        addr: <Ipv6 as Family>::read_volatile(&backend.addr),
        // SAFETY: reads of a valid reference (see `Family::read_volatile`).
        port: unsafe { core::ptr::read_volatile(&backend.port) },
        flags: unsafe { core::ptr::read_volatile(&backend.flags) },
        ..Default::default()
    };
    // SAFETY: as above.
    let snat = snatted.then(|| unsafe {
        (<Ipv6 as Family>::read_volatile(&(*state).snat_addr), core::ptr::read_volatile(&(*state).snat_port))
    });
    let verdict = classify::admit(key, packet, chosen, snat, conntrack::now());
    // SAFETY: a read of a local (see `tracked6`).
    outcome(decide(packet, unsafe { core::ptr::read_volatile(&verdict) }), out)
}
