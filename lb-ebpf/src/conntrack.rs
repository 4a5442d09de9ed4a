//! Connection tracking: the entries of translated flows, their lifecycle
//! (state, timeouts, refresh), and the verdict an entry gives its packets.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN, CT_DIRECTION_HAIRPIN_REPLY, CT_DIRECTION_REVERSE_SNAT,
    CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, CtKey, CtValue,
    ct_timeout,
};

use crate::{
    family::{Ct, Family},
    parse::Packet,
    verdict::Verdict,
};

/// The time conntrack and affinity entries are stamped with:
/// CLOCK_MONOTONIC_COARSE. Timeouts are seconds long, so a clock that
/// moves once a tick serves them, at a fraction of the cost of reading the
/// precise one on every packet. Ages are `now.wrapping_sub(stamp)`: a
/// clock that started a minute ago is as good as any.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The conntrack key of `packet`'s flow (`Family::flow_key`).
#[inline(always)]
pub fn flow_key<A: Family>(packet: &Packet<A>) -> CtKey<A> {
    A::flow_key(packet.saddr, packet.daddr, packet.sport, packet.dport, packet.protocol)
}

/// The conntrack key of `packet`'s flow, written to this CPU's slot of
/// the family's key scratch (`Family::key_scratch`); `None` if the slot
/// cannot be had (it always can).
#[inline(always)]
pub fn scratch_key<A: Family>(packet: &Packet<A>) -> Option<&'static CtKey<A>> {
    let slot = A::key_scratch()?;
    // SAFETY: this CPU's slot, used by one program run at a time.
    let slot = unsafe { &mut *slot };
    *slot = flow_key(packet);
    Some(slot)
}

/// The key `scratch_key` wrote to this CPU's slot earlier in this program
/// run, as it is: for the later frames of a split pipeline (pipeline6.rs), which
/// would otherwise build it again.
#[inline(always)]
pub fn scratched_key<A: Family>() -> Option<&'static CtKey<A>> {
    // SAFETY: this CPU's slot, used by one program run at a time.
    A::key_scratch().map(|slot| unsafe { &*slot })
}

/// Moves a live entry's state on with this packet and refreshes its time.
#[inline(always)]
fn track<A: Family>(key: &CtKey<A>, ct: *mut Ct<A>, packet: &Packet<A>, now: u64) {
    // SAFETY: a pointer to a map value, valid for this program run; racing
    // writers on other CPUs store the same kind of values.
    let ct = unsafe { &mut *ct };
    if packet.tcp_closing {
        ct.state = CT_STATE_CLOSING;
        ct.last_seen_ns = now;
        // The other direction ends with this one; FIN and RST are rare
        // enough to pay for the second lookup.
        // Its clock restarts too: a direction idle for longer than the
        // closing timeout must still carry the other side's FIN or RST.
        if let Some(peer) = A::conntrack().get_ptr_mut(ct.peer_key(key)) {
            // SAFETY: as above.
            unsafe {
                (*peer).state = CT_STATE_CLOSING;
                (*peer).last_seen_ns = now;
            }
        }
        return;
    }
    if ct.state == CT_STATE_NEW && !packet.tcp_syn {
        ct.state = CT_STATE_ESTABLISHED;
    }
    if now.wrapping_sub(ct.last_seen_ns) >= ct_timeout::REFRESH_NS {
        ct.last_seen_ns = now;
    }
}

/// What conntrack entry `value` (at `key`) does to the packets of its flow.
#[inline(always)]
fn tracked_verdict<A: Family>(key: &CtKey<A>, value: &Ct<A>) -> Verdict<A> {
    let nat = Backend::new(value.nat_addr, value.nat_port);
    match value.direction {
        CT_DIRECTION_REVERSE_SNAT => Verdict::ReverseNat(value.nat_addr, value.nat_port),
        CT_DIRECTION_HAIRPIN_REPLY => {
            Verdict::HairpinReply { service: (value.nat_addr, value.nat_port), client: key.saddr }
        }
        CT_DIRECTION_SNAT_REPLY => {
            Verdict::SnatReply { service: (value.nat_addr, value.nat_port), client: (value.snat_addr, value.snat_port) }
        }
        CT_DIRECTION_DNAT => Verdict::Dnat { backend: nat, new: false, hairpin: false, snat: None },
        CT_DIRECTION_HAIRPIN => Verdict::Dnat { backend: nat, new: false, hairpin: true, snat: None },
        CT_DIRECTION_SNAT => {
            Verdict::Dnat { backend: nat, new: false, hairpin: false, snat: Some((value.snat_addr, value.snat_port)) }
        }
        _ => Verdict::Pass,
    }
}

/// The verdict of the live conntrack entry at `key`, if any, without
/// refreshing it: for ICMP errors about a flow, which are not its traffic.
#[inline(always)]
pub fn tracked<A: Family>(key: &CtKey<A>) -> Option<Verdict<A>> {
    // SAFETY: plain data; a torn read gives a mix of valid entries at worst.
    let value = unsafe { A::conntrack().get(key) }?;
    let now = now();
    (now.wrapping_sub(value.last_seen_ns) < value.timeout_ns(key.protocol)).then(|| tracked_verdict(key, value))
}

/// The verdict of `packet`'s live entry, refreshed with it; `None` when the
/// flow has none (or a TCP SYN starts it anew).
#[inline(always)]
pub fn established<A: Family>(key: &CtKey<A>, packet: &Packet<A>) -> Option<Verdict<A>> {
    let ct = A::conntrack().get_ptr_mut(key)?;
    // The clock is read only on paths that need it: traffic that is not
    // for a service never pays for it.
    let now = now();
    // Read in place, not copied: a copy of an IPv6 entry is 56 bytes of
    // a 512-byte stack. The verdict is taken before `track` writes.
    // SAFETY: a pointer to a map value, valid for this program run.
    let value = unsafe { &*ct };
    // An entry idle past its state's timeout is gone.
    let live = now.wrapping_sub(value.last_seen_ns) < value.timeout_ns(packet.protocol);
    // A SYN starts a new connection: pick a backend afresh, so a reused
    // source port never follows a stale entry to a backend that has since
    // left the service.
    let reusable = live && !(value.is_forward() && packet.tcp_syn);
    let verdict = tracked_verdict(key, value);
    if reusable && !matches!(verdict, Verdict::Pass) {
        track(key, ct, packet, now);
        return Some(verdict);
    }
    None
}

/// What a new conntrack entry rewrites to, its direction, and its second
/// rewrite (`entry`).
pub type EntrySpec<A> = ((A, [u8; 2]), u8, (A, [u8; 2]));

/// Records a new flow, its entries built where the family keeps them
/// (`Family::entry_scratch`: on the stack, or for IPv6 in a per-CPU slot).
#[inline(always)]
pub fn record<A: Family>(key: &CtKey<A>, forward: EntrySpec<A>, reply: EntrySpec<A>, now: u64) {
    match A::entry_scratch() {
        Some(slots) => {
            // SAFETY: this CPU's slots, used by one program run at a time.
            let slots = unsafe { &mut *slots };
            slots[0] = entry(forward.0, forward.1, forward.2, now);
            slots[1] = entry(reply.0, reply.1, reply.2, now);
            create(key, &slots[0], &slots[1]);
        }
        None => create(key, &entry(forward.0, forward.1, forward.2, now), &entry(reply.0, reply.1, reply.2, now)),
    }
}

/// Records a new flow: the entry of its first packet (at `key`) and of its
/// replies.
#[inline(always)]
pub fn create<A: Family>(key: &CtKey<A>, forward: &Ct<A>, reply: &Ct<A>) {
    // The reply entry goes in first: once the forward entry exists, a reply
    // may already be on its way. An LRU map evicts rather than fails when
    // full, so the results only matter if the kernel is out of memory, and
    // then the packet is still translated and the next one retries.
    let _ = A::conntrack().insert(&forward.peer_key(key), reply, 0);
    let _ = A::conntrack().insert(key, forward, 0);
}

/// A new entry of `direction` rewriting to `nat`, with `snat` as its
/// second rewrite (zero when none).
#[inline(always)]
pub fn entry<A: Family>(nat: (A, [u8; 2]), direction: u8, snat: (A, [u8; 2]), now: u64) -> Ct<A> {
    CtValue {
        nat_addr: nat.0,
        nat_port: nat.1,
        direction,
        state: CT_STATE_NEW,
        _pad_to_u64: Default::default(),
        last_seen_ns: now,
        snat_addr: snat.0,
        snat_port: snat.1,
        _pad: [0; 2],
        _pad_tail: Default::default(),
    }
}
