//! Applying a verdict to a packet: the rewrites every hook shares. What
//! happens to the packet afterwards (pass, forward, drop, refuse) is the
//! hook's business.
use lb_common::{HAIRPIN_ADDR, counter};

use crate::{
    nat::{End, Frame},
    parse::Packet,
    service::Verdict,
};

/// What the hook does with the packet after the rewrite.
pub enum Action {
    /// Hand it to the stack.
    Pass,
    /// Send it on toward its new destination (another node, or the client).
    Forward,
    Drop,
    /// Answer with ICMP port unreachable.
    Reject,
}

/// Rewrites `packet` as `verdict` says; returns the counter to bump and
/// the action to take.
#[inline(always)]
pub fn translate<F: Frame>(frame: &F, packet: &Packet, verdict: Verdict) -> Result<(u32, Action), i64> {
    Ok(match verdict {
        Verdict::Dnat { backend, new, hairpin, snat } => {
            frame.rewrite(packet, End::Destination, backend.addr, backend.port)?;
            let action = if let Some((addr, port)) = snat {
                frame.rewrite(packet, End::Source, addr, port)?;
                Action::Forward
            } else {
                if hairpin {
                    frame.rewrite(packet, End::Source, HAIRPIN_ADDR, packet.sport)?;
                }
                Action::Pass
            };
            (if new { counter::DNAT_NEW } else { counter::DNAT_ESTABLISHED }, action)
        }
        Verdict::ReverseNat(addr, port) => {
            frame.rewrite(packet, End::Source, addr, port)?;
            (counter::REVERSE_NAT, Action::Pass)
        }
        Verdict::HairpinReply { service: (addr, port), client } => {
            frame.rewrite(packet, End::Source, addr, port)?;
            frame.rewrite(packet, End::Destination, client, packet.dport)?;
            (counter::REVERSE_NAT, Action::Pass)
        }
        Verdict::SnatReply { service: (addr, port), client: (client_addr, client_port) } => {
            frame.rewrite(packet, End::Source, addr, port)?;
            frame.rewrite(packet, End::Destination, client_addr, client_port)?;
            (counter::REVERSE_NAT, Action::Forward)
        }
        Verdict::Pass => (counter::PASS, Action::Pass),
        Verdict::NoBackend => (counter::REJECT_NO_BACKEND, Action::Reject),
        Verdict::UnknownPort => (counter::DROP_UNKNOWN_PORT, Action::Drop),
        Verdict::SourceRangeDenied => (counter::DROP_SOURCE_RANGE, Action::Drop),
        Verdict::NoLocalBackend => (counter::DROP_NO_LOCAL_BACKEND, Action::Drop),
    })
}
