//! Service lookup, backend selection and connection tracking, shared by hooks.
use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    maps::lpm_trie::Key,
};
use lb_common::{
    ADDR_DROP_UNKNOWN_PORTS, AffinityKey, AffinityValue, Backend, CT_DIRECTION_DNAT, CT_DIRECTION_HAIRPIN,
    CT_DIRECTION_HAIRPIN_REPLY, CT_DIRECTION_REVERSE_SNAT, CT_DIRECTION_SNAT, CT_DIRECTION_SNAT_REPLY,
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, CtKey, CtValue, FRONTEND_DROP_WHEN_EMPTY, FRONTEND_EXTERNAL,
    FRONTEND_SOURCE_RANGES, FRONTEND_TWO_SCOPES, SCOPE_INTERNAL, SOURCE_RANGE_FRONTEND_BITS, ServiceKey, ServiceValue,
    SourceRangeKey, ct_timeout, flow_hash,
};

use crate::{
    maps::{AFFINITY, BACKENDS, CONNTRACK, MAGLEV, SERVICE_ADDRS, SERVICES, SOURCE_RANGES, maglev_table_size},
    parse::Packet,
    snat,
};

/// Where a packet entered the node.
#[derive(Clone, Copy)]
pub enum Origin {
    /// From a pod, whose replies come back through this node anyway.
    Pod,
    /// From an external interface (`ifindex`, the hook's `ctx`): a client
    /// that may be outside the cluster.
    Wire { ctx: *mut core::ffi::c_void, ifindex: u32 },
}

/// What a hook does with a packet.
pub enum Verdict {
    /// Rewrite the destination to this backend; `new` for the first packet
    /// of a flow; `hairpin` when the backend is the client itself, and the
    /// source must become `HAIRPIN_ADDR`; `snat` when the backend is on
    /// another node and the source must become this node's address and
    /// port, after which the packet is sent on.
    Dnat { backend: Backend, new: bool, hairpin: bool, snat: Option<([u8; 4], [u8; 2])> },
    /// The reply of an SNAT flow: rewrite the source to the service and the
    /// destination to the client, and send it back to the client.
    SnatReply { service: ([u8; 4], [u8; 2]), client: ([u8; 4], [u8; 2]) },
    /// New flow from a client outside the frontend's source ranges.
    SourceRangeDenied,
    /// For a traffic-policy-Local frontend without a local backend.
    NoLocalBackend,
    /// Rewrite the source back to the service address and port.
    ReverseNat([u8; 4], [u8; 2]),
    /// Rewrite the source back to the service address and port, and the
    /// destination back to the client's own address.
    HairpinReply { service: ([u8; 4], [u8; 2]), client: [u8; 4] },
    /// Not for a service.
    Pass,
    /// For a service without a ready backend: refuse the connection.
    NoBackend,
    /// For a service address on a port no Service defines.
    UnknownPort,
}

/// The time conntrack and affinity entries are stamped with:
/// CLOCK_MONOTONIC_COARSE. Timeouts are seconds long, so a clock that
/// moves once a tick serves them, at a fraction of the cost of reading the
/// precise one on every packet.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn flow_key(packet: &Packet) -> CtKey {
    CtKey {
        saddr: packet.saddr,
        daddr: packet.daddr,
        sport: packet.sport,
        dport: packet.dport,
        protocol: packet.protocol,
        _pad: [0; 3],
    }
}

/// Moves a live entry's state on with this packet and refreshes its time.
#[inline(always)]
fn track(key: &CtKey, ct: *mut CtValue, packet: &Packet, now: u64) {
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
        if let Some(peer) = CONNTRACK.get_ptr_mut(ct.peer_key(key)) {
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
fn tracked_verdict(key: &CtKey, value: &CtValue) -> Verdict {
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
pub fn tracked(key: &CtKey) -> Option<Verdict> {
    // SAFETY: plain data; a torn read gives a mix of valid entries at worst.
    let value = unsafe { CONNTRACK.get(key) }?;
    let now = now();
    (now.wrapping_sub(value.last_seen_ns) < value.timeout_ns(key.protocol)).then(|| tracked_verdict(key, value))
}

/// Decides what to do with `packet`, creating conntrack entries for new flows.
#[inline(always)]
pub fn classify(packet: &Packet, origin: Origin) -> Verdict {
    let key = flow_key(packet);
    // The clock is read only on paths that need it: traffic that is not
    // for a service never pays for it.
    if let Some(ct) = CONNTRACK.get_ptr_mut(key) {
        let now = now();
        // SAFETY: a pointer to a map value, valid for this program run.
        let value = unsafe { *ct };
        // An entry idle past its state's timeout is gone.
        let live = now.wrapping_sub(value.last_seen_ns) < value.timeout_ns(packet.protocol);
        // A SYN starts a new connection: pick a backend afresh, so a reused
        // source port never follows a stale entry to a backend that has
        // since left the service.
        let reusable = live && !(value.is_forward() && packet.tcp_syn);
        let verdict = tracked_verdict(&key, &value);
        if reusable && !matches!(verdict, Verdict::Pass) {
            track(&key, ct, packet, now);
            return verdict;
        }
    }

    // Most traffic is not to a service address: one lookup tells.
    // SAFETY: map values are plain data; a concurrent update can at worst
    // give a torn mix of two valid entries, which is harmless here.
    let Some(addr) = (unsafe { SERVICE_ADDRS.get(&packet.daddr) }) else {
        return Verdict::Pass;
    };
    let addr_flags = addr.flags;
    let frontend = ServiceKey::new(packet.daddr, packet.dport, packet.protocol, 0);
    // SAFETY: as above.
    let Some(service) = (unsafe { SERVICES.get(&frontend) }) else {
        return if addr_flags & ADDR_DROP_UNKNOWN_PORTS != 0 { Verdict::UnknownPort } else { Verdict::Pass };
    };
    if service.flags & FRONTEND_SOURCE_RANGES != 0 && !source_allowed(packet) {
        return Verdict::SourceRangeDenied;
    }
    let (frontend, service) = scoped(frontend, service, matches!(origin, Origin::Pod));
    let (count, flags, affinity_timeout_s, maglev_table) =
        (service.backend_count, service.flags, service.affinity_timeout_s, service.maglev_table);
    if count == 0 {
        return if flags & FRONTEND_DROP_WHEN_EMPTY != 0 { Verdict::NoLocalBackend } else { Verdict::NoBackend };
    }
    let now = now();
    let affinity =
        AffinityKey { vip: packet.daddr, client: packet.saddr, port: packet.dport, protocol: packet.protocol, _pad: 0 };
    let remembered = if affinity_timeout_s == 0 {
        None
    } else {
        affinity_backend(&affinity, now, u64::from(affinity_timeout_s) * 1_000_000_000)
    };
    let picked = remembered.or_else(|| match maglev_table {
        0 => random_backend(&frontend, count),
        table => maglev_backend(table, &key),
    });
    let Some((backend_id, backend)) = picked else {
        return Verdict::NoBackend;
    };
    if affinity_timeout_s != 0 {
        // Each new connection restarts the timer, as kube-proxy's does.
        let value = AffinityValue { last_used_ns: now, backend_id, _pad: [0; 4] };
        let _ = AFFINITY.insert(&affinity, &value, 0);
    }

    // A client outside the cluster cannot be answered by a backend on
    // another node directly: that node would reply from the pod's address.
    let snat = match origin {
        Origin::Wire { ctx, ifindex } if flags & FRONTEND_EXTERNAL != 0 && !backend.is_local() => {
            let Some(source) = snat::source(ctx, ifindex, packet, &backend) else {
                return Verdict::NoBackend;
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
    let (snat_addr, snat_port) = snat.unwrap_or(([0; 4], [0; 2]));
    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction,
        state: CT_STATE_NEW,
        last_seen_ns: now,
        snat_addr,
        snat_port,
        _pad: [0; 2],
    };
    let reply_key = forward.peer_key(&key);
    let (client_addr, client_port) = if snat.is_some() { (packet.saddr, packet.sport) } else { ([0; 4], [0; 2]) };
    let reply = CtValue {
        nat_addr: packet.daddr,
        nat_port: packet.dport,
        direction: reply_direction,
        state: CT_STATE_NEW,
        last_seen_ns: now,
        snat_addr: client_addr,
        snat_port: client_port,
        _pad: [0; 2],
    };
    // The reply entry goes in first: once the forward entry exists, a reply
    // may already be on its way. An LRU map evicts rather than fails when
    // full, so the results only matter if the kernel is out of memory, and
    // then the packet is still translated and the next one retries.
    let _ = CONNTRACK.insert(&reply_key, &reply, 0);
    let _ = CONNTRACK.insert(&key, &forward, 0);
    Verdict::Dnat { backend, new: true, hairpin, snat }
}

/// The view of `frontend` (with value `service`) that a client gets: for a
/// client inside the cluster, the internal one when the frontend has two.
#[inline(always)]
pub fn scoped(frontend: ServiceKey, service: &ServiceValue, internal_client: bool) -> (ServiceKey, &ServiceValue) {
    if internal_client && service.flags & FRONTEND_TWO_SCOPES != 0 {
        let internal = frontend.with_scope(SCOPE_INTERNAL);
        // SAFETY: plain data, as in `classify`.
        if let Some(value) = unsafe { SERVICES.get(&internal) } {
            return (internal, value);
        }
    }
    (frontend, service)
}

/// Whether the client of `packet` is inside one of its frontend's
/// loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed(packet: &Packet) -> bool {
    let data = SourceRangeKey {
        vip: packet.daddr,
        port: packet.dport,
        protocol: packet.protocol,
        _pad: 0,
        client: packet.saddr,
    };
    SOURCE_RANGES.get(&Key::new(SOURCE_RANGE_FRONTEND_BITS + 32, data)).is_some()
}

/// The backend this client had, if it was used within the timeout and
/// still exists. The agent deletes entries whose backend left the service.
#[inline(always)]
fn affinity_backend(key: &AffinityKey, now: u64, timeout_ns: u64) -> Option<(u32, Backend)> {
    // SAFETY: plain data, as in `classify`.
    let entry = unsafe { AFFINITY.get(key) }?;
    let (last_used, backend_id) = (entry.last_used_ns, entry.backend_id);
    if now.wrapping_sub(last_used) >= timeout_ns {
        return None;
    }
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(&backend_id) }?;
    Some((backend_id, *backend))
}

/// The backend Maglev table `table` (1-based) gives this flow.
#[inline(always)]
fn maglev_backend(table: u32, key: &CtKey) -> Option<(u32, Backend)> {
    let size = maglev_table_size();
    if size == 0 {
        return None;
    }
    let index = (table - 1) * size + flow_hash(key) % size;
    let backend_id = *MAGLEV.get(index)?;
    // SAFETY: plain data, as in `classify`.
    let backend = unsafe { BACKENDS.get(&backend_id) }?;
    Some((backend_id, *backend))
}

/// A backend from a random slot of `frontend`, which has `count` slots.
#[inline(always)]
pub fn random_backend(frontend: &ServiceKey, count: u16) -> Option<(u32, Backend)> {
    // SAFETY: a plain helper call.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16 + 1;
    // SAFETY: plain data, as in `classify`.
    let backend_id = unsafe { SERVICES.get(&frontend.with_slot(slot)) }?.backend_id;
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(&backend_id) }?;
    Some((backend_id, *backend))
}
