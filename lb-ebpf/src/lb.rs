//! Service lookup and backend selection: the one place the kernel applies a
//! Service's semantics (which frontend and which view of it a client gets,
//! refusal, session affinity, Maglev, random), for packets (tc, XDP) and
//! sockets (the cgroup hooks) alike. The hooks only adapt a packet or a
//! socket to `lookup` and `select`.
use lb_common::{
    ADDR_DROP_UNKNOWN_PORTS, AffinityKey, AffinityValue, Backend, FRONTEND_DROP_WHEN_EMPTY, FRONTEND_SOURCE_RANGES,
    FRONTEND_TWO_SCOPES, SCOPE_INTERNAL, ServiceKey, ct_timeout, random_slot,
};

use crate::maps::{AFFINITY, BACKENDS, MAGLEV, SERVICE_ADDRS, SERVICES, flow_seed, maglev_table_size};

/// A frontend as one client sees it.
#[derive(Clone, Copy)]
pub struct Frontend {
    /// Slot 0 of the view the client gets: for clients inside the cluster,
    /// the internal one when the frontend has two.
    pub key: ServiceKey,
    pub backend_count: u16,
    /// `FRONTEND_*` bits of that view.
    pub flags: u8,
    pub affinity_timeout_s: u32,
    pub maglev_table: u32,
    /// New flows only from clients in the frontend's loadBalancerSourceRanges.
    pub source_ranges: bool,
}

/// What a service address and port are.
pub enum Lookup {
    /// Not a service address: none of our business.
    NotService,
    /// A service address on a port (and protocol) no Service defines.
    /// `cluster_ip`: the address is only a cluster IP, whose other ports
    /// nobody serves; node and external addresses have other owners.
    UnknownPort {
        cluster_ip: bool,
    },
    Frontend(Frontend),
}

/// What a client gets from a frontend without backends.
pub enum Empty {
    /// Refused at once (kube-proxy's REJECT): no endpoints anywhere.
    Refuse,
    /// Dropped: a traffic policy of Local on a node without local
    /// endpoints, while other nodes have some.
    Drop,
}

impl Frontend {
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
pub fn lookup(addr: [u8; 4], port: [u8; 2], protocol: u8, internal_client: bool) -> Lookup {
    // Most traffic is not to a service address: one lookup tells.
    // SAFETY: map values are plain data; a concurrent update can at worst
    // give a torn mix of two valid entries, which is harmless here.
    let Some(service_addr) = (unsafe { SERVICE_ADDRS.get(&addr) }) else {
        return Lookup::NotService;
    };
    let cluster_ip = service_addr.flags & ADDR_DROP_UNKNOWN_PORTS != 0;
    let mut key = ServiceKey::new(addr, port, protocol, 0);
    // SAFETY: as above.
    let Some(external) = (unsafe { SERVICES.get(&key) }) else {
        return Lookup::UnknownPort { cluster_ip };
    };
    let mut value = *external;
    if internal_client && value.flags & FRONTEND_TWO_SCOPES != 0 {
        let internal = key.with_scope(SCOPE_INTERNAL);
        // SAFETY: as above. A missing internal view (the agent writes it
        // after the external one) falls back to the external view.
        if let Some(view) = unsafe { SERVICES.get(&internal) } {
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
pub struct Selector {
    /// The client as session affinity knows it (`AFFINITY_CLIENT_*` and
    /// its value): a client address at the packet hooks, a network
    /// namespace at the socket hooks.
    pub client_kind: u8,
    pub client: [u8; 8],
    /// The hash of the flow (or socket) that Maglev and random selection
    /// map to a backend.
    pub hash: u32,
    /// Without session affinity, keep one backend for this key for this
    /// long (ns): an unconnected UDP socket, which is one flow.
    pub sticky: Option<(u8, [u8; 8], u64)>,
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
pub fn select(frontend: &Frontend, selector: &Selector, now: u64) -> Option<(u32, Backend)> {
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
        let _ = AFFINITY.insert(&key, &value, 0);
    }
    Some(picked)
}

/// The backend remembered at `key`, if used within the timeout and still
/// there, with when it was last used. The agent deletes entries whose
/// backend left the frontend.
#[inline(always)]
fn remembered_backend(key: &AffinityKey, now: u64, timeout_ns: u64) -> Option<(u64, (u32, Backend))> {
    // SAFETY: plain data, as in `lookup`.
    let entry = unsafe { AFFINITY.get(key) }?;
    let (last_used, backend_id) = (entry.last_used_ns, entry.backend_id);
    if now.wrapping_sub(last_used) >= timeout_ns {
        return None;
    }
    Some((last_used, backend(backend_id)?))
}

#[inline(always)]
fn backend(backend_id: u32) -> Option<(u32, Backend)> {
    // SAFETY: plain data, as in `lookup`.
    let backend = unsafe { BACKENDS.get(&backend_id) }?;
    Some((backend_id, *backend))
}

/// The backend Maglev table `table` (1-based) gives `hash`.
#[inline(always)]
fn maglev_backend(table: u32, hash: u32) -> Option<(u32, Backend)> {
    let size = maglev_table_size();
    if size == 0 {
        return None;
    }
    let index = (table - 1) * size + hash % size;
    backend(*MAGLEV.get(index)?)
}

/// The backend in the slot of `frontend` (which has `count` slots) that
/// `hash` draws under this boot's seed.
#[inline(always)]
fn hashed_backend(frontend: &ServiceKey, count: u16, hash: u32) -> Option<(u32, Backend)> {
    if count == 0 {
        return None;
    }
    let slot = random_slot(hash, flow_seed(), count);
    // SAFETY: plain data, as in `lookup`.
    let backend_id = unsafe { SERVICES.get(&frontend.with_slot(slot)) }?.backend_id;
    backend(backend_id)
}
