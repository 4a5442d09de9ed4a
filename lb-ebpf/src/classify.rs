//! The packet pipeline of the tc and XDP hooks: the endpoint filter, which
//! lets most packets that are no service's pass at once; conntrack, then the
//! Service's lookup and selection (`lb`), then source NAT where the client
//! is outside the cluster (`snat`), then new conntrack entries. Returns a
//! `Verdict`; knows nothing of the hook.
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    AFFINITY_CLIENT_ADDR, Backend, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN, CT_DIRECTION_HAIRPIN_REPLY,
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

/// `classify` in parts, for a hook that runs each in a frame of its own
/// (pipeline6.rs), after the endpoint filter: the verdict of the flow's live
/// conntrack entry, or `None` when it has none; then `choose` and
/// `admit`. The flow's key is kept in the family's per-CPU slot
/// (`Family::key_scratch`), where the later parts find it again.
#[inline(always)]
pub fn tracked<A: SnatSource>(packet: &Packet<A>) -> Option<Verdict<A>> {
    match conntrack::scratch_key(packet) {
        Some(key) => conntrack::established(key, packet),
        None => Some(Verdict::Pass),
    }
}

/// The first packet of a flow (or one whose entry is gone): the Service's
/// lookup and selection (`choose`), then source NAT and the flow's
/// conntrack entries (`admit`).
#[inline(always)]
fn new_flow<A: SnatSource>(key: &CtKey<A>, packet: &Packet<A>, origin: Origin) -> Verdict<A> {
    match choose(key, packet, matches!(origin, Origin::Pod)) {
        Chosen::Refused(refusal) => refusal.verdict(),
        Chosen::Backend { backend, external, now } => match snat_for(origin, packet, &backend, external) {
            Some(snat) => admit(key, packet, backend, snat, now),
            None => Verdict::SnatFailed,
        },
    }
}

/// What a new flow's Service gives it: no backend (why), or a backend
/// (whether its frontend is external, and when it was chosen) for `admit`.
pub enum Chosen<A> {
    Refused(Refusal),
    Backend { backend: Backend<A>, external: bool, now: u64 },
}

/// Why a new flow gets no backend: plain data (a `Verdict` carried inside
/// `Chosen` made LLVM mix a stack pointer into its bytes, which the
/// verifier refuses).
#[derive(Clone, Copy)]
pub enum Refusal {
    NotService,
    UnknownPort,
    SourceRangeDenied,
    NoLocalBackend,
    NoBackend,
}

impl Refusal {
    #[inline(always)]
    pub fn verdict<A>(self) -> Verdict<A> {
        match self {
            Refusal::NotService => Verdict::Pass,
            Refusal::UnknownPort => Verdict::UnknownPort,
            Refusal::SourceRangeDenied => Verdict::SourceRangeDenied,
            Refusal::NoLocalBackend => Verdict::NoLocalBackend,
            Refusal::NoBackend => Verdict::NoBackend,
        }
    }
}

/// A new flow's first half: the Service's lookup, source ranges, refusal
/// and selection. A hook short of stack (pipeline6.rs) runs each half in a frame
/// of its own; the others inline both (`new_flow`).
#[inline(always)]
pub fn choose<A: SnatSource>(key: &CtKey<A>, packet: &Packet<A>, internal_client: bool) -> Chosen<A> {
    let frontend = match lb::lookup(packet.daddr, packet.dport, packet.protocol, internal_client) {
        Lookup::NotService => return Chosen::Refused(Refusal::NotService),
        // A port no Service defines on a cluster IP is not answered.
        Lookup::UnknownPort { cluster_ip } => {
            // A volatile read keeps the flag on this path: otherwise LLVM
            // may merge this arm with the one above and mask whatever the
            // flag's register holds there, a pointer maybe, which the
            // verifier refuses.
            // SAFETY: a read of a local.
            let cluster_ip = unsafe { core::ptr::read_volatile(&cluster_ip) };
            return Chosen::Refused(if cluster_ip { Refusal::UnknownPort } else { Refusal::NotService });
        }
        Lookup::Frontend(frontend) => frontend,
    };
    if frontend.source_ranges && !source_allowed(packet) {
        return Chosen::Refused(Refusal::SourceRangeDenied);
    }
    match frontend.empty() {
        Some(Empty::Drop) => return Chosen::Refused(Refusal::NoLocalBackend),
        Some(Empty::Refuse) => return Chosen::Refused(Refusal::NoBackend),
        None => {}
    }
    let now = conntrack::now();
    let selector = Selector {
        client_kind: AFFINITY_CLIENT_ADDR,
        client: packet.saddr.client(),
        hash: flow_hash(key),
        sticky: None,
    };
    match lb::select(&frontend, &selector, now) {
        Some((_, backend)) => Chosen::Backend { backend, external: frontend.flags & FRONTEND_EXTERNAL != 0, now },
        None => Chosen::Refused(Refusal::NoBackend),
    }
}

/// Whether a new flow to `backend` of a frontend (`external` when the
/// frontend is reached from outside) is source-NATed: when the client may
/// be outside the cluster and the backend is on another node, which would
/// reply from the pod's address. `Some(None)`: not; `Some(Some(source))`:
/// from this node's address and port; `None`: it must be and cannot be.
#[inline(always)]
pub fn snat_for<A: SnatSource>(
    origin: Origin,
    packet: &Packet<A>,
    backend: &Backend<A>,
    external: bool,
) -> Option<Option<(A, [u8; 2])>> {
    match origin {
        Origin::Wire { ctx, ifindex } if external && !backend.is_local() => {
            A::snat_source(ctx, ifindex, packet, backend).map(Some)
        }
        _ => Some(None),
    }
}

/// A new flow's last part, for `backend` and its source NAT (`snat_for`):
/// the flow's conntrack entries, and its verdict.
#[inline(always)]
pub fn admit<A: SnatSource>(
    key: &CtKey<A>,
    packet: &Packet<A>,
    backend: Backend<A>,
    snat: Option<(A, [u8; 2])>,
    now: u64,
) -> Verdict<A> {
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
