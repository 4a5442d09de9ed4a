//! From desired services to map entries, and from current entries to an
//! ordered list of map writes.
//!
//! Pure code. The order of the writes is what keeps packets from seeing half
//! a service: backends exist before a slot names them, slots exist before
//! the frontend's count covers them, and a frontend shrinks or goes away
//! before the slots and backends it no longer covers are deleted. A service
//! address is listed once its frontends exist, so no port of it is dropped
//! as unknown while its Service is being added.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
};

use lb_common::{
    ADDR_DROP_UNKNOWN_PORTS, Address, AffinityKey, AffinityValue, BACKEND_LOCAL, Backend, FRONTEND_DROP_WHEN_EMPTY,
    FRONTEND_EXTERNAL, FRONTEND_SOURCE_RANGES, FRONTEND_TWO_SCOPES, Ipv4, SCOPE_INTERNAL, ServiceAddr, ServiceKey,
    ServiceValue, SockRevNatKey, SockRevNatValue, SourceRangeKey,
};

use crate::{
    family::Family,
    maglev,
    model::{Algorithm, FrontendKind, MAX_BACKENDS, Narrowed, ServicePort},
};

/// `--maglev-table-size` and `--maglev-tables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    /// Entries per table, a prime.
    pub table_size: u32,
    /// How many frontends can use Maglev (further ones fall back to
    /// random). The MAGLEV map holds one table more: see `map_tables`.
    pub tables: u32,
}

impl MaglevConfig {
    /// Tables in the MAGLEV map: one per Maglev frontend and a spare. A
    /// frontend whose backends change gets its new table written into the
    /// spare and is then pointed at it, so no packet ever reads a table
    /// half rewritten; its old table is the next change's spare.
    pub fn map_tables(self) -> u32 {
        self.tables.saturating_add(1)
    }
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self { table_size: lb_common::DEFAULT_MAGLEV_TABLE_SIZE, tables: lb_common::DEFAULT_MAGLEV_TABLES }
    }
}

/// A SOURCE_RANGES entry: the LPM prefix length and the key data.
pub type SourceRange<A = Ipv4> = (u32, SourceRangeKey<A>);

/// The exact contents of the SERVICES, BACKENDS, SERVICE_ADDRS and
/// SOURCE_RANGES maps of one family (their `*6` namesakes for IPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents<A: Address = Ipv4> {
    pub services: BTreeMap<ServiceKey<A>, ServiceValue>,
    pub backends: BTreeMap<u32, Backend<A>>,
    pub addrs: BTreeMap<A, ServiceAddr>,
    pub source_ranges: BTreeSet<SourceRange<A>>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp<A: Address = Ipv4> {
    PutBackend(u32, Backend<A>),
    PutService(ServiceKey<A>, ServiceValue),
    DeleteService(ServiceKey<A>),
    DeleteBackend(u32),
    PutAddr(A, ServiceAddr),
    DeleteAddr(A),
    PutSourceRange(SourceRange<A>),
    DeleteSourceRange(SourceRange<A>),
    /// Fill Maglev table `table` (1-based) with these backend ids.
    PutMaglevTable(u32, Vec<u32>),
    /// Set these (index, backend id) entries of Maglev table `table`,
    /// which holds a whole table already: a `PutMaglevTable` written as
    /// the delta from what the table held (`Reconciler::sync_step`).
    PutMaglevEntries(u32, Vec<(u32, u32)>),
}

impl<A: Address> MapContents<A> {
    pub fn apply(&mut self, op: &MapOp<A>) {
        match op {
            MapOp::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            MapOp::PutService(k, v) => {
                self.services.insert(*k, *v);
            }
            MapOp::DeleteService(k) => {
                self.services.remove(k);
            }
            MapOp::DeleteBackend(id) => {
                self.backends.remove(id);
            }
            MapOp::PutAddr(addr, frontends) => {
                self.addrs.insert(*addr, *frontends);
            }
            MapOp::DeleteAddr(addr) => {
                self.addrs.remove(addr);
            }
            MapOp::PutSourceRange(range) => {
                self.source_ranges.insert(*range);
            }
            MapOp::DeleteSourceRange(range) => {
                self.source_ranges.remove(range);
            }
            // Tables follow from a frontend's backends; they are not kept.
            MapOp::PutMaglevTable(..) | MapOp::PutMaglevEntries(..) => {}
        }
    }

    /// Backends of `frontend` (a slot-0 key), in slot order.
    pub fn slots_of(&self, frontend: &ServiceKey<A>) -> Vec<u32> {
        let count = self.services.get(frontend).map_or(0, |v| v.backend_count);
        (1..=count).filter_map(|slot| self.services.get(&frontend.with_slot(slot)).map(|v| v.backend_id)).collect()
    }

    /// The backend ids the slots name.
    pub fn slot_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.services.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id)
    }

    /// Frontend entries (slot-0 keys), in key order.
    pub fn frontend_entries(&self) -> impl Iterator<Item = (&ServiceKey<A>, &ServiceValue)> {
        self.services.iter().filter(|(k, _)| k.slot == 0)
    }

    /// The backend ids of `frontend`, in no order (a Maglev table's).
    fn backend_set(&self, frontend: &ServiceKey<A>) -> BTreeSet<u32> {
        self.slots_of(frontend).into_iter().collect()
    }

    /// Frontends (slot-0 keys) with their backends, in key order.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServiceKey<A>, Vec<&Backend<A>>)> {
        self.services.iter().filter(|(k, _)| k.slot == 0).map(|(k, _)| {
            let backends = self.slots_of(k).iter().filter_map(|id| self.backends.get(id)).collect();
            (k, backends)
        })
    }
}

/// The SERVICES key of a frontend, when it is of family `A`.
pub fn frontend_key<A: Family>(frontend: &crate::model::Frontend) -> Option<ServiceKey<A>> {
    Some(ServiceKey::new(A::of(frontend.addr)?, frontend.port.to_be_bytes(), frontend.protocol.number(), 0))
}

/// The BACKENDS value of a backend, when it is of family `A`.
pub fn backend_value<A: Family>(addr: &SocketAddr, local: bool) -> Option<Backend<A>> {
    let flags = if local { BACKEND_LOCAL } else { 0 };
    Some(Backend::new(A::of(addr.ip())?, addr.port().to_be_bytes()).with_flags(flags))
}

/// The `FRONTEND_*` flags of a frontend.
fn frontend_flags(service: &ServicePort) -> u8 {
    let mut flags = 0;
    if service.kind.is_external() {
        flags |= FRONTEND_EXTERNAL;
    }
    if !service.source_ranges.is_empty() {
        flags |= FRONTEND_SOURCE_RANGES;
    }
    if service.drop_when_empty {
        flags |= FRONTEND_DROP_WHEN_EMPTY;
    }
    flags
        | match service.narrowed {
            Narrowed::No => 0,
            Narrowed::PolicyLocal => lb_common::FRONTEND_NARROWED_POLICY_LOCAL,
            Narrowed::NodeHints => lb_common::FRONTEND_NARROWED_NODE_HINTS,
            Narrowed::ZoneHints => lb_common::FRONTEND_NARROWED_ZONE_HINTS,
        }
}

/// NODE_PORTS' contents for `desired`: the `NODE_PORT_*` bits of each
/// port a NodePort frontend serves, for the bind hooks.
pub fn node_ports<'a>(desired: impl IntoIterator<Item = &'a ServicePort>) -> BTreeMap<u16, u8> {
    let mut ports = BTreeMap::new();
    for service in desired.into_iter().filter(|s| s.kind == FrontendKind::NodePort) {
        let bit = match (service.frontend.protocol, service.frontend.addr.is_ipv6()) {
            (crate::model::Protocol::Tcp, false) => lb_common::NODE_PORT_TCP,
            (crate::model::Protocol::Udp, false) => lb_common::NODE_PORT_UDP,
            (crate::model::Protocol::Tcp, true) => lb_common::NODE_PORT_TCP6,
            (crate::model::Protocol::Udp, true) => lb_common::NODE_PORT_UDP6,
        };
        *ports.entry(service.frontend.port).or_insert(0) |= bit;
    }
    ports
}

/// What family `A`'s maps should hold for `desired` (whose frontends of
/// the other family are left out), given what they hold now.
///
/// Backend ids, slot positions and Maglev tables already in use are kept,
/// so a sync writes only what changed. A new backend never takes an id, nor
/// a Maglev frontend a table, that is still in the current maps: another
/// frontend might still name it. Maglev frontends beyond `maglev.tables`
/// fall back to random selection.
pub fn target_contents<A: Family>(
    desired: &[ServicePort],
    current: &MapContents<A>,
    maglev: MaglevConfig,
) -> MapContents<A> {
    let ids: BTreeMap<Backend<A>, u32> = current.backends.iter().map(|(id, b)| (*b, *id)).collect();
    let tables: BTreeSet<u32> = current.services.values().map(|v| v.maglev_table).filter(|t| *t != 0).collect();
    let everything = Globals {
        ids: &ids,
        id_taken: &|id| current.backends.contains_key(&id),
        first_free_id: 1,
        tables: &tables,
        hashed_elsewhere: 0,
    };
    target_contents_within(desired, current, maglev, &everything)
}

/// A service address before its frontends are counted: unknown ports are
/// dropped until a frontend other than a cluster IP is on it.
pub const EMPTY_ADDR: ServiceAddr = ServiceAddr { frontends: 0, flags: ADDR_DROP_UNKNOWN_PORTS, _pad: 0 };

/// Counts `service` into the SERVICE_ADDRS entry of its address.
pub fn count_on_address(addr: &mut ServiceAddr, service: &ServicePort) {
    addr.frontends += 1;
    if service.kind != FrontendKind::ClusterIp {
        addr.flags &= !ADDR_DROP_UNKNOWN_PORTS;
    }
}

/// What a target computed for some frontends only must know of the rest
/// of the maps (`Reconciler` keeps these as indexes, so that one changed
/// Service costs its own frontends, not a walk over all).
pub struct Globals<'a, A: Address = Ipv4> {
    /// Every backend in the maps and its id: a backend another frontend
    /// already has keeps its id.
    pub ids: &'a BTreeMap<Backend<A>, u32>,
    /// Whether an id is in the maps: a new backend never takes one.
    pub id_taken: &'a dyn Fn(u32) -> bool,
    /// Every id below this is taken (1 if unknown): where the search for a
    /// free id starts.
    pub first_free_id: u32,
    /// Maglev tables any frontend in the maps names: never a spare.
    pub tables: &'a BTreeSet<u32>,
    /// Frontends with a Maglev table outside `current`'s (which keep it).
    pub hashed_elsewhere: usize,
}

/// `target_contents` for the frontends of `desired`, which `current`
/// holds only the entries of (its SERVICES entries, SOURCE_RANGES and the
/// backends they name); `globals` stands for the rest. SERVICE_ADDRS is
/// counted from `desired` alone: a caller with frontends elsewhere on the
/// same addresses corrects it.
pub fn target_contents_within<A: Family>(
    desired: &[ServicePort],
    current: &MapContents<A>,
    maglev: MaglevConfig,
    globals: &Globals<A>,
) -> MapContents<A> {
    let mut placer = Placer {
        current,
        globals,
        new_maglev: Vec::new(),
        new_ids: BTreeMap::new(),
        next_id: globals.first_free_id,
        target: MapContents::default(),
    };

    for service in desired {
        let Some(frontend) = frontend_key::<A>(&service.frontend) else { continue };
        count_on_address(placer.target.addrs.entry(frontend.vip).or_insert(EMPTY_ADDR), service);
        for range in &service.source_ranges {
            // The model keeps a frontend's own family's ranges only.
            let Some(client) = A::of(range.addr) else { continue };
            let data =
                SourceRangeKey { vip: frontend.vip, port: frontend.port, protocol: frontend.protocol, _pad: 0, client };
            placer
                .target
                .source_ranges
                .insert((SourceRangeKey::<A>::FRONTEND_BITS + u32::from(range.prefix_len), data));
        }
        let mut flags = frontend_flags(service);
        if let Some(internal) = &service.internal_backends {
            flags |= FRONTEND_TWO_SCOPES;
            placer.place(frontend.with_scope(SCOPE_INTERNAL), service, internal, 0);
        }
        placer.place(frontend, service, &service.backends, flags);
    }
    let mut target = placer.target;
    assign_maglev_tables(&mut target, current, &placer.new_maglev, maglev, globals);
    target
}

/// Gives Maglev tables to the frontends of `target` (see
/// `MaglevConfig::map_tables`). A frontend whose backends changed moves to
/// a spare table and frees its own for the next one; `plan` orders the
/// writes so that no table is written while a frontend names it. New
/// Maglev frontends (`new`, in order) then take what is left, up to
/// `maglev.tables` in all. A table named by the current maps is never a
/// spare: a frontend deleted in this sync frees its table for the next.
fn assign_maglev_tables<A: Address>(
    target: &mut MapContents<A>,
    current: &MapContents<A>,
    new: &[ServiceKey<A>],
    maglev: MaglevConfig,
    globals: &Globals<A>,
) {
    let mut spares: VecDeque<u32> = (1..=maglev.map_tables()).filter(|t| !globals.tables.contains(t)).collect();
    let changed: Vec<ServiceKey<A>> = target
        .frontend_entries()
        .filter(|(k, v)| v.maglev_table != 0 && target.backend_set(k) != current.backend_set(k))
        .map(|(k, _)| *k)
        .collect();
    for key in changed {
        // Without a spare (maps adopted from an agent that kept none) the
        // table is rewritten where it is.
        let Some(spare) = spares.pop_front() else { break };
        if let Some(value) = target.services.get_mut(&key) {
            spares.push_back(std::mem::replace(&mut value.maglev_table, spare));
        }
    }
    let hashed = globals.hashed_elsewhere + target.frontend_entries().filter(|(_, v)| v.maglev_table != 0).count();
    let room = (maglev.tables as usize).saturating_sub(hashed);
    for key in new.iter().take(room) {
        let (Some(spare), Some(value)) = (spares.pop_front(), target.services.get_mut(key)) else { break };
        value.maglev_table = spare;
    }
}

/// Places frontends and their backends in the target maps, reusing what
/// the current maps hold.
struct Placer<'a, A: Address> {
    current: &'a MapContents<A>,
    globals: &'a Globals<'a, A>,
    /// Maglev frontends without a table yet, in order.
    new_maglev: Vec<ServiceKey<A>>,
    /// Ids given in this target to backends the maps do not hold.
    new_ids: BTreeMap<Backend<A>, u32>,
    next_id: u32,
    target: MapContents<A>,
}

impl<A: Family> Placer<'_, A> {
    /// The frontend entry `frontend` of `service`, with `backends` (of its
    /// family, as the model gives them) in slots.
    fn place(&mut self, frontend: ServiceKey<A>, service: &ServicePort, backends: &BTreeSet<SocketAddr>, flags: u8) {
        let (current, target) = (self.current, &mut self.target);
        let mut chosen: Vec<Backend<A>> =
            backends.iter().filter_map(|a| backend_value(a, service.local_backends.contains(a))).collect();
        if chosen.len() > MAX_BACKENDS {
            // The model reports this as an error of the Service. Keep the
            // backends already in this frontend's slots (their flows stay
            // put), then the lowest addresses: deterministic, and chosen
            // before ids are given, so a backend left out takes no id.
            let slotted: BTreeSet<Backend<A>> =
                current.slots_of(&frontend).iter().filter_map(|id| current.backends.get(id)).copied().collect();
            chosen.sort_by_key(|b| !slotted.contains(b));
            chosen.truncate(MAX_BACKENDS);
        }
        let mut wanted_ids = BTreeSet::new();
        let globals = self.globals;
        for backend in chosen {
            let known = globals.ids.get(&backend).copied();
            let id = known.unwrap_or_else(|| {
                *self.new_ids.entry(backend).or_insert_with(|| {
                    while (globals.id_taken)(self.next_id) || target.backends.contains_key(&self.next_id) {
                        self.next_id += 1;
                    }
                    self.next_id
                })
            });
            target.backends.insert(id, backend);
            wanted_ids.insert(id);
        }
        let slots = assign_slots(&current.slots_of(&frontend), &wanted_ids);
        // A Maglev frontend keeps its table here; `assign_maglev_tables`
        // gives new ones theirs and moves changed ones to a spare.
        let table = match service.algorithm {
            Algorithm::Random => 0,
            Algorithm::Maglev => current.services.get(&frontend).map_or(0, |v| v.maglev_table),
        };
        if service.algorithm == Algorithm::Maglev && table == 0 {
            self.new_maglev.push(frontend);
        }
        // At most MAX_BACKENDS (u16::MAX) slots, numbered 1..=count.
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        let value = ServiceValue::frontend(count, flags, service.affinity_timeout_s, table);
        target.services.insert(frontend, value);
        for (slot, id) in (1..=u16::MAX).zip(&slots) {
            target.services.insert(frontend.with_slot(slot), ServiceValue::slot(*id));
        }
    }
}

/// UDP backends that leave a frontend, or whose frontend goes. Their
/// conntrack entries must go too, or the flows keep going to a backend that
/// is no longer there (kube-proxy clears UDP conntrack for the same reason;
/// TCP flows keep their backend until they end).
pub fn lost_udp_backends<A: Address>(
    current: &MapContents<A>,
    target: &MapContents<A>,
) -> BTreeSet<(ServiceKey<A>, Backend<A>)> {
    let backends_of = |contents: &MapContents<A>, frontend: &ServiceKey<A>| -> BTreeSet<Backend<A>> {
        contents.slots_of(frontend).iter().filter_map(|id| contents.backends.get(id)).copied().collect()
    };
    let mut lost = BTreeSet::new();
    for frontend in current.services.keys().filter(|k| k.slot == 0 && k.protocol == lb_common::PROTO_UDP) {
        let after = backends_of(target, frontend);
        lost.extend(backends_of(current, frontend).difference(&after).map(|b| (*frontend, *b)));
    }
    lost
}

/// The connected UDP sockets (by cookie) the socket hooks sent to a
/// backend that has since left their frontend (`lost`, from
/// `lost_udp_backends`), with those backends: such a socket is connected
/// to the backend itself, so no conntrack cleanup can move it; it must be
/// destroyed. `entries` are SOCK_REVNAT's; a socket is judged by the view
/// the socket hooks use (internal when the frontend has one).
pub fn udp_sockets_to_destroy<A: Family, P>(
    entries: impl IntoIterator<Item = (SockRevNatKey<A, P>, SockRevNatValue<A>)>,
    lost: &BTreeSet<(ServiceKey<A>, Backend<A>)>,
    after: &MapContents<A>,
) -> (BTreeSet<u64>, BTreeSet<SocketAddr>) {
    // An address and port, network order, as in the maps.
    type Endpoint<A> = (A, [u8; 2]);
    let lost_pairs: BTreeSet<(Endpoint<A>, Endpoint<A>)> =
        lost.iter().map(|(frontend, backend)| ((frontend.vip, frontend.port), (backend.addr, backend.port))).collect();
    let mut cookies = BTreeSet::new();
    let mut backends = BTreeSet::new();
    for (key, value) in entries {
        let (service, backend) = ((value.vip, value.port), (key.backend_addr, key.backend_port));
        if !lost_pairs.contains(&(service, backend)) {
            continue;
        }
        let external = ServiceKey::new(value.vip, value.port, lb_common::PROTO_UDP, 0);
        let internal = external.with_scope(SCOPE_INTERNAL);
        let view = if after.services.contains_key(&internal) { internal } else { external };
        let still_there =
            after.slots_of(&view).iter().filter_map(|id| after.backends.get(id)).any(|b| (b.addr, b.port) == backend);
        if !still_there {
            cookies.insert(key.cookie);
            backends.insert(SocketAddr::new(backend.0.ip(), u16::from_be_bytes(backend.1)));
        }
    }
    (cookies, backends)
}

/// Affinity entries to delete: their frontend view is gone, or their
/// backend is no longer one of its backends, or (session affinity) the
/// frontend has no affinity any more. (The kernel also checks that the
/// backend still exists, but a backend of several services outlives its
/// removal from one of them.) Entries of unconnected UDP sockets
/// (`AFFINITY_CLIENT_SOCKET`) need no affinity on the frontend.
pub fn stale_affinity<A: Address>(
    entries: impl IntoIterator<Item = (AffinityKey<A>, AffinityValue)>,
    contents: &MapContents<A>,
) -> Vec<AffinityKey<A>> {
    let mut members: BTreeMap<ServiceKey<A>, BTreeSet<u32>> = BTreeMap::new();
    entries
        .into_iter()
        .filter(|(key, value)| {
            let frontend = key.frontend();
            let Some(view) = contents.services.get(&frontend) else { return true };
            let backends =
                members.entry(frontend).or_insert_with(|| contents.slots_of(&frontend).into_iter().collect());
            (key.is_session_affinity() && view.affinity_timeout_s == 0) || !backends.contains(&value.backend_id)
        })
        .map(|(key, _)| key)
        .collect()
}

/// Slot order for `wanted`: a backend keeps its slot when that slot still
/// exists; new backends fill the gaps.
fn assign_slots(current: &[u32], wanted: &BTreeSet<u32>) -> Vec<u32> {
    let mut slots: Vec<Option<u32>> = vec![None; wanted.len()];
    let mut placed = BTreeSet::new();
    for (i, id) in current.iter().enumerate().take(wanted.len()) {
        if wanted.contains(id) && placed.insert(*id) {
            slots[i] = Some(*id);
        }
    }
    let mut rest = wanted.iter().filter(|id| !placed.contains(id));
    slots.into_iter().map(|s| s.or_else(|| rest.next().copied())).collect::<Option<Vec<_>>>().unwrap_or_default()
}

/// The entries of a Maglev table for these backend ids (in any order).
pub fn maglev_entries<A: Family>(contents: &MapContents<A>, backend_ids: &BTreeSet<u32>, table_size: u32) -> Vec<u32> {
    // Ordered by address, so the table does not depend on id assignment.
    let mut by_address: Vec<(Backend<A>, u32)> =
        backend_ids.iter().filter_map(|id| contents.backends.get(id).map(|b| (*b, *id))).collect();
    by_address.sort();
    let backends: Vec<Backend<A>> = by_address.iter().map(|(b, _)| *b).collect();
    maglev::table(&backends, table_size).into_iter().map(|i| by_address[i as usize].1).collect()
}

/// The writes that turn `current` into `target`, in an order where every
/// prefix leaves each frontend whole.
pub fn plan<A: Family>(current: &MapContents<A>, target: &MapContents<A>, maglev: MaglevConfig) -> Vec<MapOp<A>> {
    let mut ops = Vec::new();
    // Ranges are there before a frontend is flagged to check them, and go
    // only after it no longer is.
    ops.extend(target.source_ranges.difference(&current.source_ranges).map(|r| MapOp::PutSourceRange(*r)));
    for (id, backend) in &target.backends {
        if current.backends.get(id) != Some(backend) {
            ops.push(MapOp::PutBackend(*id, *backend));
        }
    }
    let changed = |k: &ServiceKey<A>, v: &ServiceValue| current.services.get(k) != Some(v);
    for (k, v) in target.services.iter().filter(|(k, _)| k.slot != 0) {
        if changed(k, v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    // Frontends, each after its Maglev table is filled (when it is new to
    // the table or its backends changed). A table is written only while no
    // other frontend names it: a frontend that frees a table goes first.
    let needs_table = |k: &ServiceKey<A>, v: &ServiceValue| {
        v.maglev_table != 0
            && (current.services.get(k).is_none_or(|c| c.maglev_table != v.maglev_table)
                || target.backend_set(k) != current.backend_set(k))
    };
    let mut namers: BTreeMap<u32, BTreeSet<ServiceKey<A>>> = BTreeMap::new();
    for (k, v) in current.frontend_entries().filter(|(_, v)| v.maglev_table != 0) {
        namers.entry(v.maglev_table).or_default().insert(*k);
    }
    // (frontend, value, whether its table is to be filled), judged once.
    let mut pending: VecDeque<(&ServiceKey<A>, &ServiceValue, bool)> = target
        .frontend_entries()
        .map(|(k, v)| (k, v, needs_table(k, v)))
        .filter(|(k, v, fill)| *fill || changed(k, v))
        .collect();
    let mut waited = 0;
    while let Some((k, v, fill)) = pending.pop_front() {
        let free = |namers: &BTreeMap<u32, BTreeSet<ServiceKey<A>>>| {
            namers.get(&v.maglev_table).is_none_or(|n| n.iter().all(|other| other == k))
        };
        // A table still named elsewhere waits for its namer to move, unless
        // nothing else can move (adopted maps without a spare): then it is
        // rewritten in place.
        if fill && !free(&namers) && waited < pending.len() + 1 {
            pending.push_back((k, v, fill));
            waited += 1;
            continue;
        }
        waited = 0;
        if fill {
            let ids = target.backend_set(k);
            ops.push(MapOp::PutMaglevTable(v.maglev_table, maglev_entries(target, &ids, maglev.table_size)));
        }
        if changed(k, v) {
            ops.push(MapOp::PutService(*k, *v));
            if let Some(old) = current.services.get(k).map(|c| c.maglev_table).filter(|t| *t != 0) {
                namers.entry(old).or_default().remove(k);
            }
            if v.maglev_table != 0 {
                namers.entry(v.maglev_table).or_default().insert(*k);
            }
        }
    }
    for (addr, frontends) in &target.addrs {
        if current.addrs.get(addr) != Some(frontends) {
            ops.push(MapOp::PutAddr(*addr, *frontends));
        }
    }
    ops.extend(current.addrs.keys().filter(|a| !target.addrs.contains_key(*a)).map(|a| MapOp::DeleteAddr(*a)));
    let gone = |k: &&ServiceKey<A>| !target.services.contains_key(k);
    ops.extend(current.services.keys().filter(|k| k.slot == 0).filter(gone).map(|k| MapOp::DeleteService(*k)));
    ops.extend(current.services.keys().filter(|k| k.slot != 0).filter(gone).map(|k| MapOp::DeleteService(*k)));
    ops.extend(
        current.backends.keys().filter(|id| !target.backends.contains_key(id)).map(|id| MapOp::DeleteBackend(*id)),
    );
    ops.extend(current.source_ranges.difference(&target.source_ranges).map(|r| MapOp::DeleteSourceRange(*r)));
    ops
}

/// Helpers shared by the planner's and the reconciler's tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::model::{Frontend, Protocol};

    /// TCP port 80 of 10.96.0.VIP, with backends 10.0.0.B:8080.
    pub fn service(vip: u8, backends: &[u8]) -> ServicePort {
        ServicePort {
            name: format!("svc-{vip}"),
            frontend: Frontend { addr: Ipv4Addr::new(10, 96, 0, vip).into(), port: 80, protocol: Protocol::Tcp },
            backends: backends.iter().map(|b| SocketAddr::from((Ipv4Addr::new(10, 0, 0, *b), 8080))).collect(),
            ..Default::default()
        }
    }

    /// Last octets of the backends of 10.96.0.VIP:80/TCP, sorted.
    pub fn backends_of(contents: &MapContents, vip: u8) -> Vec<u8> {
        let key = ServiceKey::new([10, 96, 0, vip], 80u16.to_be_bytes(), 6, 0);
        let mut octets: Vec<u8> = contents.slots_of(&key).iter().map(|id| contents.backends[id].addr[3]).collect();
        octets.sort();
        octets
    }

    /// Every frontend's slots exist and name existing backends.
    pub fn assert_slots_whole(contents: &MapContents, after: &str) {
        for (key, value) in contents.services.iter().filter(|(k, _)| k.slot == 0) {
            for slot in 1..=value.backend_count {
                let slot_value = contents.services.get(&key.with_slot(slot));
                let slot_value = slot_value.unwrap_or_else(|| panic!("after {after}: slot {slot} of {key:?} missing"));
                assert!(contents.backends.contains_key(&slot_value.backend_id), "after {after}: dangling backend");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::{test_support::*, *};
    use crate::model::{Frontend, Protocol};
    use lb_common::{AFFINITY_CLIENT_ADDR, AFFINITY_CLIENT_SOCKET};

    const MAGLEV: MaglevConfig = MaglevConfig { table_size: 13, tables: 2 };

    /// Every frontend is whole, and a listed service address has its frontends.
    fn assert_whole(contents: &MapContents, after: &str) {
        for addr in contents.addrs.keys() {
            assert!(contents.services.keys().any(|k| k.vip == *addr), "after {after}: address without frontends");
        }
        assert_slots_whole(contents, after);
    }

    /// Applies a sync op by op, checking the invariant after each write.
    fn sync(current: &MapContents, desired: &[ServicePort]) -> (MapContents, Vec<MapOp>) {
        let target = target_contents(desired, current, MAGLEV);
        let ops = plan(current, &target, MAGLEV);
        let mut maps = current.clone();
        // Maglev table → the backend ids written into it.
        let mut tables: BTreeMap<u32, BTreeSet<u32>> = current
            .frontend_entries()
            .filter(|(_, v)| v.maglev_table != 0)
            .map(|(k, v)| (v.maglev_table, current.backend_set(k)))
            .collect();
        for op in &ops {
            if let MapOp::PutMaglevTable(table, entries) = op {
                let named = maps.frontend_entries().any(|(_, v)| v.maglev_table == *table);
                assert!(!named, "{op:?}: table {table} written while a frontend reads it");
                tables.insert(*table, entries.iter().copied().collect());
            }
            maps.apply(op);
            assert_whole(&maps, &format!("{op:?}"));
            for (key, value) in maps.frontend_entries().filter(|(_, v)| v.maglev_table != 0) {
                let table = tables.get(&value.maglev_table);
                let table = table.unwrap_or_else(|| panic!("after {op:?}: {key:?} names an unwritten table"));
                assert!(table.iter().all(|id| maps.backends.contains_key(id)), "after {op:?}: dangling table entry");
            }
        }
        assert_eq!(maps, target);
        (maps, ops)
    }

    #[test]
    fn every_prefix_of_a_plan_leaves_services_whole() {
        let steps: [&[ServicePort]; 5] = [
            &[service(1, &[1, 2, 3]), service(2, &[3, 4])],
            &[service(1, &[2, 3, 5, 6]), service(2, &[4])],
            &[service(1, &[7]), service(3, &[1, 2])],
            &[service(1, &[]), service(3, &[2, 1, 8])],
            &[],
        ];
        let mut maps = MapContents::default();
        for desired in steps {
            (maps, _) = sync(&maps, desired);
            for s in desired {
                let vip = Ipv4::of(s.frontend.addr).unwrap()[3];
                let want: Vec<u8> = s.backends.iter().map(|b| Ipv4::of(b.ip()).unwrap()[3]).collect();
                assert_eq!(backends_of(&maps, vip), want);
            }
        }
        assert_eq!(maps, MapContents::default());
    }

    #[test]
    fn removing_one_backend_keeps_ids_and_slots_of_the_others() {
        let (maps, _) = sync(&MapContents::default(), &[service(1, &[1, 2, 3])]);
        let before = maps.clone();
        let (after, ops) = sync(&maps, &[service(1, &[1, 3])]);
        for (id, backend) in &after.backends {
            assert_eq!(before.backends.get(id), Some(backend), "backend ids are stable");
        }
        // Backend 3 moves into the freed slot 2; the count shrinks; slot 3 and
        // backend 2 go: four writes, in that order.
        let kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                MapOp::PutBackend(..) => "put-backend",
                MapOp::PutService(k, _) if k.slot == 0 => "put-frontend",
                MapOp::PutService(..) => "put-slot",
                MapOp::DeleteService(..) => "delete-slot",
                MapOp::DeleteBackend(..) => "delete-backend",
                MapOp::PutAddr(..) | MapOp::DeleteAddr(..) => "addr",
                MapOp::PutMaglevTable(..) | MapOp::PutMaglevEntries(..) => "maglev",
                MapOp::PutSourceRange(..) | MapOp::DeleteSourceRange(..) => "range",
            })
            .collect();
        assert_eq!(kinds, ["put-slot", "put-frontend", "delete-slot", "delete-backend"]);
    }

    #[test]
    fn an_unchanged_sync_writes_nothing() {
        let desired = [service(1, &[1, 2]), service(2, &[2, 3])];
        let (maps, _) = sync(&MapContents::default(), &desired);
        assert!(sync(&maps, &desired).1.is_empty());
    }

    #[test]
    fn a_new_backend_never_takes_an_id_still_in_the_maps() {
        let (maps, _) = sync(&MapContents::default(), &[service(1, &[1, 2])]);
        let (after, _) = sync(&maps, &[service(1, &[9])]);
        let new_id = *after.backends.keys().next().unwrap();
        assert!(!maps.backends.contains_key(&new_id));
    }

    #[test]
    fn affinity_entries_go_when_their_backend_leaves_the_service_or_affinity_is_off() {
        let with_affinity = |vip, backends: &[u8]| ServicePort { affinity_timeout_s: 60, ..service(vip, backends) };
        let (maps, _) = sync(&MapContents::default(), &[with_affinity(1, &[1, 2]), service(2, &[1])]);
        let id_of = |octet: u8| *maps.backends.iter().find(|(_, b)| b.addr[3] == octet).unwrap().0;
        let entry = |vip: u8, client: u8, backend: u8| {
            let frontend = ServiceKey::new([10, 96, 0, vip], 80u16.to_be_bytes(), 6, 0);
            let key = AffinityKey::new(&frontend, AFFINITY_CLIENT_ADDR, AffinityKey::addr_client([10u8, 1, 0, client]));
            (key, AffinityValue { last_used_ns: 1, backend_id: id_of(backend), _pad: [0; 4] })
        };
        let (keep, gone_backend, no_affinity) = (entry(1, 1, 1), entry(1, 2, 2), entry(2, 3, 1));
        // An unconnected UDP socket's entry needs no affinity on the frontend.
        let socket = |(key, value): (AffinityKey, AffinityValue)| {
            (AffinityKey { client_kind: AFFINITY_CLIENT_SOCKET, client: 7u64.to_ne_bytes(), ..key }, value)
        };
        let (socket_kept, socket_gone) = (socket(entry(2, 0, 1)), socket(entry(1, 0, 2)));
        let (after, _) = sync(&maps, &[with_affinity(1, &[1]), service(2, &[1])]);
        let stale = stale_affinity([keep, gone_backend, no_affinity, socket_kept, socket_gone], &after);
        assert_eq!(stale, [gone_backend.0, no_affinity.0, socket_gone.0]);
    }

    #[test]
    fn connected_udp_sockets_of_a_backend_that_left_their_frontend_are_to_be_destroyed() {
        let udp = |vip, backends: &[u8]| ServicePort {
            frontend: Frontend { protocol: Protocol::Udp, ..service(vip, backends).frontend },
            ..service(vip, backends)
        };
        let (before, _) = sync(&MapContents::default(), &[udp(1, &[1, 2]), udp(2, &[2])]);
        let (after, _) = sync(&before, &[udp(1, &[1]), udp(2, &[2])]);
        let lost = lost_udp_backends(&before, &after);
        let backend_of = |n: u8| before.backends.values().find(|b| b.addr[3] == n).map(|b| (b.addr, b.port)).unwrap();
        let service_port = before.services.keys().find(|k| k.slot == 0).unwrap().port;
        let socket = |cookie: u64, vip: u8, backend: u8| {
            let (addr, port) = backend_of(backend);
            let key = SockRevNatKey { cookie, backend_addr: addr, backend_port: port, _pad: [0; 2] };
            (key, SockRevNatValue { vip: [10, 96, 0, vip], port: service_port, _pad: [0; 2] })
        };
        // Sent to backend 2 of service 1 (gone), backend 1 of service 1
        // (stays), backend 2 of service 2 (stays there).
        let entries = [socket(7, 1, 2), socket(8, 1, 1), socket(9, 2, 2)];
        let (cookies, backends) = udp_sockets_to_destroy(entries, &lost, &after);
        assert_eq!(cookies, BTreeSet::from([7]));
        let (addr, port) = backend_of(2);
        assert_eq!(backends, BTreeSet::from([SocketAddr::new(Ipv4::ip(addr), u16::from_be_bytes(port))]));
    }

    #[test]
    fn affinity_entries_are_judged_by_the_view_of_the_frontend_they_were_chosen_from() {
        // externalTrafficPolicy Local: the external view has the local
        // backend 1, the internal view (pods, the node) backends 1 and 2.
        let external = ServiceKey::new([10, 96, 0, 1], 80u16.to_be_bytes(), 6, 0);
        let internal = external.with_scope(SCOPE_INTERNAL);
        let mut contents = MapContents::default();
        contents.services.insert(external, ServiceValue::frontend(1, FRONTEND_TWO_SCOPES, 60, 0));
        contents.services.insert(external.with_slot(1), ServiceValue::slot(1));
        contents.services.insert(internal, ServiceValue::frontend(2, 0, 60, 0));
        contents.services.insert(internal.with_slot(1), ServiceValue::slot(1));
        contents.services.insert(internal.with_slot(2), ServiceValue::slot(2));
        let entry = |view: &ServiceKey, backend_id| {
            let key = AffinityKey::new(view, AFFINITY_CLIENT_ADDR, AffinityKey::addr_client([10u8, 1, 0, 9]));
            (key, AffinityValue { last_used_ns: 1, backend_id, _pad: [0; 4] })
        };
        let (pod_remote, outside_remote) = (entry(&internal, 2), entry(&external, 2));
        assert_eq!(stale_affinity([pod_remote, outside_remote], &contents), [outside_remote.0]);
    }

    #[test]
    fn udp_backends_leaving_a_frontend_are_reported_and_tcp_ones_are_not() {
        let udp = |vip, backends: &[u8]| ServicePort {
            frontend: Frontend { protocol: Protocol::Udp, ..service(vip, backends).frontend },
            ..service(vip, backends)
        };
        let (before, _) = sync(&MapContents::default(), &[udp(1, &[1, 2]), udp(2, &[3]), service(3, &[4])]);
        let target = target_contents(&[udp(1, &[2]), service(3, &[])], &before, MAGLEV);
        let lost: Vec<(u8, u8)> =
            lost_udp_backends(&before, &target).iter().map(|(f, b)| (f.vip[3], b.addr[3])).collect();
        assert_eq!(lost, [(1, 1), (2, 3)], "a removed backend, and the backend of a deleted frontend");
    }

    #[test]
    fn maglev_tables_are_filled_before_use_kept_while_unchanged_and_limited_in_number() {
        let hashed = |vip, backends: &[u8]| ServicePort { algorithm: Algorithm::Maglev, ..service(vip, backends) };
        let (maps, ops) = sync(&MapContents::default(), &[hashed(1, &[1, 2]), hashed(2, &[3]), hashed(3, &[4])]);
        let table_of = |m: &MapContents, vip: u8| {
            m.services[&ServiceKey::new([10, 96, 0, vip], 80u16.to_be_bytes(), 6, 0)].maglev_table
        };
        assert_eq!((table_of(&maps, 1), table_of(&maps, 2), table_of(&maps, 3)), (1, 2, 0), "two tables, then random");
        let fill = ops.iter().position(|op| matches!(op, MapOp::PutMaglevTable(1, _))).unwrap();
        let named = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutService(k, v) if k.slot == 0 && v.maglev_table == 1))
            .unwrap();
        assert!(fill < named, "table filled before the frontend names it");
        let MapOp::PutMaglevTable(_, entries) = &ops[fill] else { unreachable!() };
        assert_eq!(entries.len(), 13);
        assert_eq!(
            entries.iter().collect::<BTreeSet<_>>(),
            maps.slots_of(&ServiceKey::new([10, 96, 0, 1], 80u16.to_be_bytes(), 6, 0)).iter().collect()
        );

        // Unchanged: nothing to write.
        assert!(sync(&maps, &[hashed(1, &[1, 2]), hashed(2, &[3]), hashed(3, &[4])]).1.is_empty());
        let written = |ops: &[MapOp]| -> Vec<u32> {
            ops.iter().filter_map(|op| if let MapOp::PutMaglevTable(t, _) = op { Some(*t) } else { None }).collect()
        };
        // One backend fewer: the new table goes into the spare (3), and the
        // frontend switches to it; table 1 is the next spare.
        let (maps, ops) = sync(&maps, &[hashed(1, &[2]), hashed(2, &[3]), hashed(3, &[4])]);
        assert_eq!(written(&ops), [3]);
        assert_eq!((table_of(&maps, 1), table_of(&maps, 2)), (3, 2));
        // Both change at once: one moves to the spare, the other to the
        // table the first left (written only after the first has left it).
        let (maps, ops) = sync(&maps, &[hashed(1, &[2, 5]), hashed(2, &[3, 6]), hashed(3, &[4])]);
        assert_eq!(written(&ops).len(), 2);
        let tables = BTreeSet::from([table_of(&maps, 1), table_of(&maps, 2)]);
        assert_eq!(tables.len(), 2);
        assert!(tables.is_subset(&BTreeSet::from([1, 2, 3])));
        // A frontend deleted and a new one in one sync: the new one takes
        // the spare, not the table the deleted one still names; that table
        // is the spare of the next sync.
        let left = table_of(&maps, 2);
        let (maps, _) = sync(&maps, &[hashed(1, &[2, 5]), hashed(4, &[7])]);
        assert!(![0, left, table_of(&maps, 1)].contains(&table_of(&maps, 4)));
        let (maps, ops) = sync(&maps, &[hashed(1, &[2]), hashed(4, &[7, 8])]);
        assert_eq!(written(&ops).len(), 2, "both changed, each atomically");
        assert!([table_of(&maps, 1), table_of(&maps, 4)].contains(&left));
    }

    #[test]
    fn a_frontend_with_more_backends_than_slots_keeps_its_slotted_ones_then_the_lowest_addresses() {
        // Service 1 starts with ten backends at the top of a large range.
        let address = |i: u32| SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 8080));
        let many = |range: std::ops::RangeInclusive<u32>| ServicePort {
            backends: range.map(address).collect(),
            ..service(1, &[])
        };
        let top = MAX_BACKENDS as u32 + 10;
        let (before, _) = sync(&MapContents::default(), &[many(top - 9..=top), service(2, &[1, 2])]);
        let key = frontend_key::<Ipv4>(&service(1, &[]).frontend).unwrap();
        let slotted = before.slots_of(&key);

        // Grown past the limit: its ten keep their slots, the lowest
        // addresses fill the rest, nothing wraps, service 2 is untouched.
        let desired = [many(1..=top), service(2, &[1, 2])];
        let target = target_contents(&desired, &before, MAGLEV);
        assert_eq!(target, target_contents(&desired, &before, MAGLEV), "deterministic");
        assert_eq!(target.services[&key].backend_count, u16::MAX);
        let slots = target.slots_of(&key);
        assert_eq!(slots.len(), MAX_BACKENDS);
        assert_eq!(slots[..10], slotted[..], "backends in slots keep them");
        let kept: BTreeSet<u32> = slots.iter().map(|id| u32::from(Ipv4Addr::from(target.backends[id].addr))).collect();
        let lowest: BTreeSet<u32> = (1..=top - 10 - 10).chain(top - 9..=top).map(|i| 0x0a00_0000 + i).collect();
        assert_eq!(kept, lowest);
        assert_eq!(backends_of(&target, 2), [1, 2]);
        assert_eq!(
            target.services.keys().filter(|k| k.vip == key.vip).count(),
            MAX_BACKENDS + 1,
            "no slot 0 or beyond"
        );
        let named: BTreeSet<u32> =
            target.services.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id).collect();
        assert!(target.backends.keys().all(|id| named.contains(id)), "a backend left out takes no id");
        let mut maps = before.clone();
        for op in plan(&before, &target, MAGLEV) {
            maps.apply(&op);
        }
        assert_eq!(maps, target);
        assert_slots_whole(&maps, "the whole plan");
    }

    #[test]
    fn each_family_plans_its_own_frontends_into_its_own_maps() {
        let four = service(1, &[1, 2]);
        let six = ServicePort {
            name: "six".into(),
            frontend: Frontend { addr: "fd00:96::1".parse().unwrap(), port: 80, protocol: Protocol::Tcp },
            kind: FrontendKind::LoadBalancer,
            backends: ["[fd00:10::1]:8080".parse().unwrap()].into(),
            source_ranges: vec!["2001:db8::/48".parse().unwrap()],
            ..Default::default()
        };
        let desired = [four, six];
        let v4 = target_contents::<Ipv4>(&desired, &MapContents::default(), MAGLEV);
        let v6 = target_contents::<lb_common::Ipv6>(&desired, &MapContents::default(), MAGLEV);
        assert_eq!((v4.frontend_entries().count(), v6.frontend_entries().count()), (1, 1));
        assert_eq!(backends_of(&v4, 1), [1, 2]);
        assert!(v4.source_ranges.is_empty());
        let six_key = frontend_key::<lb_common::Ipv6>(&desired[1].frontend).unwrap();
        let backend = &v6.backends[&v6.slots_of(&six_key)[0]];
        assert_eq!(
            (backend.addr, backend.port),
            (lb_common::ipv6("fd00:10::1".parse::<std::net::Ipv6Addr>().unwrap().octets()), 8080u16.to_be_bytes())
        );
        // The range's prefix counts the IPv6 key's frontend part (160 bits).
        let (bits, range) = v6.source_ranges.first().unwrap();
        assert_eq!(*bits, 160 + 48);
        assert_eq!(range.client, lb_common::ipv6("2001:db8::".parse::<std::net::Ipv6Addr>().unwrap().octets()));
        assert_eq!(v6.addrs[&six_key.vip].flags, 0, "a load-balancer address passes other ports");
    }

    #[test]
    fn a_backend_shared_by_two_services_is_one_entry() {
        let (maps, _) = sync(&MapContents::default(), &[service(1, &[1]), service(2, &[1])]);
        assert_eq!(maps.backends.len(), 1);
        let (maps, _) = sync(&maps, &[service(2, &[1])]);
        assert_eq!(maps.backends.len(), 1, "still used by service 2");
    }

    #[test]
    fn external_frontends_carry_their_flags_ranges_and_local_backends() {
        let mut lb = service(7, &[1, 2]);
        lb.kind = FrontendKind::LoadBalancer;
        lb.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        lb.local_backends = [SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 8080))].into();
        let mut empty = service(8, &[]);
        empty.kind = FrontendKind::NodePort;
        empty.drop_when_empty = true;
        let (maps, ops) = sync(&MapContents::default(), &[service(1, &[1]), lb.clone(), empty]);
        let key = |vip| ServiceKey::new([10, 96, 0, vip], 80u16.to_be_bytes(), 6, 0);
        assert_eq!(maps.services[&key(1)].flags, 0);
        assert_eq!(maps.services[&key(7)].flags, FRONTEND_EXTERNAL | FRONTEND_SOURCE_RANGES);
        assert_eq!(maps.services[&key(8)].flags, FRONTEND_EXTERNAL | FRONTEND_DROP_WHEN_EMPTY);
        let local: Vec<u8> = maps.backends.values().filter(|b| b.is_local()).map(|b| b.addr[3]).collect();
        assert_eq!(local, [1]);
        assert_eq!(maps.addrs[&[10, 96, 0, 1]].flags, ADDR_DROP_UNKNOWN_PORTS, "a cluster IP drops other ports");
        assert_eq!(maps.addrs[&[10, 96, 0, 7]].flags, 0, "other addresses pass them");
        let (prefix_len, range) = maps.source_ranges.first().unwrap();
        assert_eq!(
            (*prefix_len, range.client, range.vip),
            (lb_common::SOURCE_RANGE_FRONTEND_BITS + 24, [192, 0, 2, 0], [10, 96, 0, 7])
        );
        let first_frontend = ops.iter().position(|op| matches!(op, MapOp::PutService(k, _) if k.slot == 0)).unwrap();
        assert!(matches!(ops[0], MapOp::PutSourceRange(_)), "ranges before the frontend that checks them");
        assert!(first_frontend > 0);

        // Dropping the ranges: the frontend stops checking before they go.
        lb.source_ranges.clear();
        let (maps, ops) = sync(&maps, &[service(1, &[1]), lb]);
        assert!(maps.source_ranges.is_empty());
        assert!(matches!(ops.last(), Some(MapOp::DeleteSourceRange(_))));
    }

    #[test]
    fn a_local_policy_frontend_has_an_internal_view_with_the_whole_service() {
        let mut lb = service(7, &[1]);
        lb.kind = FrontendKind::LoadBalancer;
        lb.local_backends = [SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 8080))].into();
        lb.internal_backends = Some([1, 2].map(|b| SocketAddr::from((Ipv4Addr::new(10, 0, 0, b), 8080))).into());
        let (maps, _) = sync(&MapContents::default(), &[lb.clone()]);
        let external = frontend_key::<Ipv4>(&lb.frontend).unwrap();
        let internal = external.with_scope(SCOPE_INTERNAL);
        assert_eq!(maps.services[&external].flags, FRONTEND_EXTERNAL | FRONTEND_TWO_SCOPES);
        assert_eq!(maps.services[&internal].flags, 0, "no policy, no SNAT, no ranges for clients inside");
        let addrs_of = |key: &ServiceKey| -> Vec<u8> {
            maps.slots_of(key).iter().map(|id| maps.backends[id].addr[3]).collect::<BTreeSet<_>>().into_iter().collect()
        };
        assert_eq!((addrs_of(&external), addrs_of(&internal)), (vec![1], vec![1, 2]));
        assert_eq!(maps.addrs[&external.vip].frontends, 1, "one frontend, in two views");

        // Policy back to Cluster: the internal view goes.
        lb.internal_backends = None;
        let (maps, _) = sync(&maps, &[lb]);
        assert!(!maps.services.contains_key(&internal));
        assert_eq!(maps.services[&external].flags, FRONTEND_EXTERNAL);
    }
}
