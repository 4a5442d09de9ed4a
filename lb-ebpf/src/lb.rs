//! Service lookup and backend selection: the one place the kernel applies a
//! Service's semantics (which frontend and which view of it a client gets,
//! refusal, session affinity, Maglev, random), for packets (tc, XDP) and
//! sockets (the cgroup hooks) alike. The hooks only adapt a packet or a
//! socket to `lookup` and `select`.
use lb_common::{
    ADDR_DROP_UNKNOWN_PORTS, Address, AffinityKey, AffinityValue, Backend, FRONTEND_DROP_WHEN_EMPTY,
    FRONTEND_SOURCE_RANGES, FRONTEND_TWO_SCOPES, Ipv4, SCOPE_INTERNAL, ServiceKey, ct_timeout, random_slot,
};

use crate::{
    family::Family,
    maps::{flow_seed, maglev_table_size},
};

/// A frontend as one client sees it.
#[derive(Clone, Copy)]
pub struct Frontend<A = Ipv4> {
    /// Slot 0 of the view the client gets: for clients inside the cluster,
    /// the internal one when the frontend has two.
    pub key: ServiceKey<A>,
    pub backend_count: u16,
    /// `FRONTEND_*` bits of that view.
    pub flags: u8,
    pub affinity_timeout_s: u32,
    pub maglev_table: u32,
    /// New flows only from clients in the frontend's loadBalancerSourceRanges.
    pub source_ranges: bool,
}

/// What a service address and port are.
pub enum Lookup<A = Ipv4> {
    /// Not a service address: none of our business.
    NotService,
    /// A service address on a port (and protocol) no Service defines.
    /// `cluster_ip`: the address is only a cluster IP, whose other ports
    /// nobody serves; node and external addresses have other owners.
    UnknownPort {
        cluster_ip: bool,
    },
    Frontend(Frontend<A>),
}

/// What a client gets from a frontend without backends.
pub enum Empty {
    /// Refused at once (kube-proxy's REJECT): no endpoints anywhere.
    Refuse,
    /// Dropped: a traffic policy of Local on a node without local
    /// endpoints, while other nodes have some.
    Drop,
}

impl<A> Frontend<A> {
    /// `Some` when the frontend has no backend for this client.
    #[inline(always)]
    pub fn empty(&self) -> Option<Empty> {
        match (self.backend_count, self.flags & FRONTEND_DROP_WHEN_EMPTY != 0) {
            (0, true) => Some(Empty::Drop),
            (0, false) => Some(Empty::Refuse),
            _ => None,
        }
    }
}

/// The frontend at `addr`:`port`/`protocol` for a client inside the
/// cluster (`internal_client`: pods, the node) or outside it.
#[inline(always)]
pub fn lookup<A: Family>(addr: A, port: [u8; 2], protocol: u8, internal_client: bool) -> Lookup<A> {
    // Most traffic is not to a service address: one lookup tells.
    // SAFETY: map values are plain data; a concurrent update can at worst
    // give a torn mix of two valid entries, which is harmless here.
    let Some(service_addr) = (unsafe { A::service_addrs().get(&addr) }) else {
        return Lookup::NotService;
    };
    let cluster_ip = service_addr.flags & ADDR_DROP_UNKNOWN_PORTS != 0;
    let mut key = ServiceKey::new(addr, port, protocol, 0);
    // SAFETY: as above.
    let Some(external) = (unsafe { A::services().get(&key) }) else {
        return Lookup::UnknownPort { cluster_ip };
    };
    let mut value = *external;
    if internal_client && value.flags & FRONTEND_TWO_SCOPES != 0 {
        let internal = key.with_scope(SCOPE_INTERNAL);
        // SAFETY: as above. A missing internal view (the agent writes it
        // after the external one) falls back to the external view.
        if let Some(view) = unsafe { A::services().get(&internal) } {
            key = internal;
            value = *view;
        }
    }
    Lookup::Frontend(Frontend {
        key,
        backend_count: value.backend_count,
        flags: value.flags,
        affinity_timeout_s: value.affinity_timeout_s,
        maglev_table: value.maglev_table,
        source_ranges: external.flags & FRONTEND_SOURCE_RANGES != 0,
    })
}

/// Who is choosing, besides the frontend.
pub struct Selector<A: Address = Ipv4> {
    /// The client as session affinity knows it (`AFFINITY_CLIENT_*` and
    /// its value): a client address at the packet hooks, a network
    /// namespace at the socket hooks.
    pub client_kind: u8,
    pub client: A::Client,
    /// The hash of the flow (or socket) that Maglev and random selection
    /// map to a backend.
    pub hash: u32,
    /// Without session affinity, keep one backend for this key for this
    /// long (ns): an unconnected UDP socket, which is one flow.
    pub sticky: Option<(u8, A::Client, u64)>,
}

/// Picks `frontend`'s backend for `selector` (which must have backends):
/// the one session affinity remembers, if used within its timeout and
/// still there; else Maglev's for Maglev frontends; else a "random" one:
/// a slot drawn from the flow's hash and a per-boot seed, so the same flow
/// always draws the same slot (a packet whose conntrack entry was evicted
/// goes on to its backend while the backend set is unchanged), and
/// different flows spread as evenly as with a random draw.
/// The choice is remembered for affinity (each new connection restarts
/// the timer, as kube-proxy's `recent` match does).
#[inline(always)]
pub fn select<A: Family>(frontend: &Frontend<A>, selector: &Selector<A>, now: u64) -> Option<(u32, Backend<A>)> {
    let memory = if frontend.affinity_timeout_s != 0 {
        let timeout_ns = u64::from(frontend.affinity_timeout_s) * 1_000_000_000;
        Some((AffinityKey::new(&frontend.key, selector.client_kind, selector.client), timeout_ns))
    } else {
        selector.sticky.map(|(kind, client, timeout_ns)| (AffinityKey::new(&frontend.key, kind, client), timeout_ns))
    };
    let remembered = memory.as_ref().and_then(|(key, timeout_ns)| remembered_backend(key, now, *timeout_ns));
    // An unconnected UDP socket's entry is looked up on every message: its
    // stamp is refreshed at most once per interval, as conntrack's is, so
    // that most messages cost a lookup and no write. Session affinity is
    // refreshed by every new connection (its timeout may be 1 s).
    if frontend.affinity_timeout_s == 0
        && let Some((last_used, picked)) = remembered
        && now.wrapping_sub(last_used) < ct_timeout::REFRESH_NS
    {
        return Some(picked);
    }
    let picked = remembered.map(|(_, picked)| picked).or_else(|| match frontend.maglev_table {
        0 => hashed_backend(&frontend.key, frontend.backend_count, selector.hash),
        table => maglev_backend(table, selector.hash),
    })?;
    if let Some((key, _)) = memory {
        let value = AffinityValue { last_used_ns: now, backend_id: picked.0, _pad: [0; 4] };
        let _ = A::affinity().insert(&key, &value, 0);
    }
    Some(picked)
}

/// The backend remembered at `key`, if used within the timeout and still
/// there, with when it was last used. The agent deletes entries whose
/// backend left the frontend.
#[inline(always)]
fn remembered_backend<A: Family>(key: &AffinityKey<A>, now: u64, timeout_ns: u64) -> Option<(u64, (u32, Backend<A>))> {
    // SAFETY: plain data, as in `lookup`.
    let entry = unsafe { A::affinity().get(key) }?;
    let (last_used, backend_id) = (entry.last_used_ns, entry.backend_id);
    if now.wrapping_sub(last_used) >= timeout_ns {
        return None;
    }
    Some((last_used, backend(backend_id)?))
}

#[inline(always)]
fn backend<A: Family>(backend_id: u32) -> Option<(u32, Backend<A>)> {
    // SAFETY: plain data, as in `lookup`.
    let backend = unsafe { A::backends().get(&backend_id) }?;
    Some((backend_id, *backend))
}

/// The backend Maglev table `table` (1-based) gives `hash`.
#[inline(always)]
fn maglev_backend<A: Family>(table: u32, hash: u32) -> Option<(u32, Backend<A>)> {
    let size = maglev_table_size();
    if size == 0 {
        return None;
    }
    let index = (table - 1) * size + hash % size;
    backend(*A::maglev().get(index)?)
}

/// The backend in the slot of `frontend` (which has `count` slots) that
/// `hash` draws under this boot's seed.
#[inline(always)]
fn hashed_backend<A: Family>(frontend: &ServiceKey<A>, count: u16, hash: u32) -> Option<(u32, Backend<A>)> {
    if count == 0 {
        return None;
    }
    let slot = random_slot(hash, flow_seed(), count);
    // SAFETY: plain data, as in `lookup`.
    let backend_id = unsafe { A::services().get(&frontend.with_slot(slot)) }?.backend_id;
    backend(backend_id)
}
