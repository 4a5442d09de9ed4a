//! The packet pipeline of the tc and XDP hooks: the endpoint filter, which
//! lets most packets that are no service's pass at once; conntrack, then the
//! Service's lookup and selection (`lb`), then source NAT where the client
//! is outside the cluster (`snat`), then new conntrack entries. Returns a
//! `Verdict`; knows nothing of the hook.
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    AFFINITY_CLIENT_ADDR, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN, CT_DIRECTION_HAIRPIN_REPLY,
    CT_DIRECTION_REVERSE_SNAT, CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY, CtKey, FRONTEND_EXTERNAL, SourceRangeKey,
    flow_hash,
};

use crate::{
    conntrack, filter,
    lb::{self, Empty, Lookup, Selector},
    parse::Packet,
    snat::SnatSource,
    verdict::{Origin, Verdict},
};

/// Decides what to do with `packet`, creating conntrack entries for new flows.
#[inline(always)]
pub fn classify<A: SnatSource>(packet: &Packet<A>, origin: Origin) -> Verdict<A> {
    if !filter::may_be_service_traffic(packet) {
        return Verdict::Pass;
    }
    let key = conntrack::flow_key(packet);
    if let Some(verdict) = conntrack::established(&key, packet) {
        return verdict;
    }
    new_flow(&key, packet, origin)
}

/// `classify`'s two halves, for a hook that runs each in a frame of its
/// own (tc_from_pod6), after the endpoint filter: the verdict of the
/// flow's live conntrack entry, or `None` when it has none. The flow's key
/// is kept in the family's per-CPU slot (`Family::key_scratch`), where
/// `untracked` finds it again.
#[inline(always)]
pub fn tracked<A: SnatSource>(packet: &Packet<A>) -> Option<Verdict<A>> {
    match conntrack::scratch_key(packet) {
        Some(key) => conntrack::established(key, packet),
        None => Some(Verdict::Pass),
    }
}

/// The second half: a packet whose flow `tracked` found no live entry for.
#[inline(always)]
pub fn untracked<A: SnatSource>(packet: &Packet<A>, origin: Origin) -> Verdict<A> {
    match conntrack::scratch_key(packet) {
        Some(key) => new_flow(key, packet, origin),
        None => Verdict::Pass,
    }
}

/// The first packet of a flow (or one whose entry is gone): the Service's
/// lookup and selection, then the flow's conntrack entries.
#[inline(always)]
fn new_flow<A: SnatSource>(key: &CtKey<A>, packet: &Packet<A>, origin: Origin) -> Verdict<A> {
    let internal_client = matches!(origin, Origin::Pod);
    let frontend = match lb::lookup(packet.daddr, packet.dport, packet.protocol, internal_client) {
        Lookup::NotService => return Verdict::Pass,
        // A port no Service defines on a cluster IP is not answered.
        Lookup::UnknownPort { cluster_ip } => {
            // A volatile read keeps the flag on this path: otherwise LLVM
            // may merge this arm with the one above and mask whatever the
            // flag's register holds there, a pointer maybe, which the
            // verifier refuses.
            // SAFETY: a read of a local.
            let cluster_ip = unsafe { core::ptr::read_volatile(&cluster_ip) };
            return if cluster_ip { Verdict::UnknownPort } else { Verdict::Pass };
        }
        Lookup::Frontend(frontend) => frontend,
    };
    if frontend.source_ranges && !source_allowed(packet) {
        return Verdict::SourceRangeDenied;
    }
    match frontend.empty() {
        Some(Empty::Drop) => return Verdict::NoLocalBackend,
        Some(Empty::Refuse) => return Verdict::NoBackend,
        None => {}
    }
    let now = conntrack::now();
    let selector = Selector {
        client_kind: AFFINITY_CLIENT_ADDR,
        client: packet.saddr.client(),
        hash: flow_hash(key),
        sticky: None,
    };
    let Some((_, backend)) = lb::select(&frontend, &selector, now) else {
        return Verdict::NoBackend;
    };

    // A client outside the cluster cannot be answered by a backend on
    // another node directly: that node would reply from the pod's address.
    let snat = match origin {
        Origin::Wire { ctx, ifindex } if frontend.flags & FRONTEND_EXTERNAL != 0 && !backend.is_local() => {
            let Some(source) = A::snat_source(ctx, ifindex, packet, &backend) else {
                return Verdict::SnatFailed;
            };
            Some(source)
        }
        _ => None,
    };
    let hairpin = snat.is_none() && backend.addr == packet.saddr;
    let (direction, reply_direction) = match (hairpin, snat) {
        (true, _) => (CT_DIRECTION_HAIRPIN, CT_DIRECTION_HAIRPIN_REPLY),
        (false, Some(_)) => (CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY),
        (false, None) => (CT_DIRECTION_DNAT, CT_DIRECTION_REVERSE_SNAT),
    };
    // An SNAT flow's reply entry also restores the client.
    let client = if snat.is_some() { (packet.saddr, packet.sport) } else { Default::default() };
    conntrack::record(
        key,
        ((backend.addr, backend.port), direction, snat.unwrap_or_default()),
        ((packet.daddr, packet.dport), reply_direction, client),
        now,
    );
    Verdict::Dnat { backend, new: true, hairpin, snat }
}

/// Whether the client of `packet` is inside one of its frontend's
/// loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed<A: SnatSource>(packet: &Packet<A>) -> bool {
    let data = SourceRangeKey {
        vip: packet.daddr,
        port: packet.dport,
        protocol: packet.protocol,
        _pad: 0,
        client: packet.saddr,
    };
    let client_bits = 8 * core::mem::size_of::<A>() as u32;
    A::source_ranges().get(&Key::new(SourceRangeKey::<A>::FRONTEND_BITS + client_bits, data)).is_some()
}
