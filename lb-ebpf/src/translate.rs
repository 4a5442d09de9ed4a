//! Applying a verdict to a packet: the rewrites every hook shares. What
//! happens to the packet afterwards (pass, forward, drop, refuse) is the
//! hook's business.
use lb_common::counter;

use crate::{
    family::Family,
    nat::{Endpoint, Frame, Rewrite},
    parse::Packet,
    verdict::Verdict,
};

/// What `verdict` makes of a packet from `source` to `destination`;
/// `None` for verdicts that do not translate it. The one place that knows
/// what each conntrack direction rewrites, for packets and for the packets
/// quoted in ICMP errors alike.
#[inline(always)]
pub fn rewrite_of<A: Family>(
    verdict: &Verdict<A>,
    source: Endpoint<A>,
    destination: Endpoint<A>,
) -> Option<Rewrite<A>> {
    Some(match *verdict {
        Verdict::Dnat { backend, snat, hairpin, .. } => Rewrite {
            source: match snat {
                Some(snat) => snat,
                None if hairpin => (A::HAIRPIN, source.1),
                None => source,
            },
            destination: (backend.addr, backend.port),
            forward: snat.is_some(),
        },
        Verdict::ReverseNat(addr, port) => Rewrite { source: (addr, port), destination, forward: false },
        Verdict::HairpinReply { service, client } => {
            Rewrite { source: service, destination: (client, destination.1), forward: false }
        }
        Verdict::SnatReply { service, client } => Rewrite { source: service, destination: client, forward: true },
        _ => return None,
    })
}

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
pub fn translate<F: Frame, A: Family>(
    frame: &F,
    packet: &Packet<A>,
    verdict: Verdict<A>,
) -> Result<(u32, Action), i64> {
    let (index, action, rewrite) = decide(packet, verdict);
    if let Some(rewrite) = rewrite {
        frame.rewrite(packet, &rewrite)?;
    }
    Ok((index, action))
}

/// What `translate` does with `packet` under `verdict`: the counter, the
/// action, and the rewrite to apply first, if any.
#[inline(always)]
pub fn decide<A: Family>(packet: &Packet<A>, verdict: Verdict<A>) -> (u32, Action, Option<Rewrite<A>>) {
    if let Some(rewrite) = rewrite_of(&verdict, (packet.saddr, packet.sport), (packet.daddr, packet.dport)) {
        let index = match verdict {
            Verdict::Dnat { new: true, .. } => counter::DNAT_NEW,
            Verdict::Dnat { .. } => counter::DNAT_ESTABLISHED,
            _ => counter::REVERSE_NAT,
        };
        return (index, if rewrite.forward { Action::Forward } else { Action::Pass }, Some(rewrite));
    }
    let (index, action) = match verdict {
        Verdict::NoBackend => (counter::REJECT_NO_BACKEND, Action::Reject),
        Verdict::UnknownPort => (counter::DROP_UNKNOWN_PORT, Action::Drop),
        Verdict::SourceRangeDenied => (counter::DROP_SOURCE_RANGE, Action::Drop),
        Verdict::NoLocalBackend => (counter::DROP_NO_LOCAL_BACKEND, Action::Drop),
        Verdict::SnatFailed => (counter::DROP_SNAT_FAILED, Action::Drop),
        _ => (counter::PASS, Action::Pass),
    };
    (index, action, None)
}
