//! Applies desired services to the maps through one narrow interface.
//!
//! A failed write holds back only the frontends that depend on it: their
//! later writes are skipped, so each keeps a whole (old or new) state, and
//! every other frontend is still brought up to date. One Service that does
//! not fit never stops the others.
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
};

use lb_common::{
    Address, Backend, FRONTEND_EXTERNAL, Ipv4, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceAddr, ServiceKey, ServiceValue,
};

use crate::{
    family::Family,
    model::{Algorithm, Frontend, ServicePort},
    plan::{
        EMPTY_ADDR, Globals, MaglevConfig, MapContents, MapOp, frontend_key, lost_udp_backends, plan, target_contents,
        target_contents_within,
    },
    sizing::Entries,
};

/// Where map writes of family `A` go: the real maps, or a fake in tests.
pub trait MapWriter<A: Address = Ipv4> {
    type Error: std::error::Error + Send + Sync + 'static;
    fn write(&mut self, op: &MapOp<A>) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
#[error("map write {op:?} failed ({failed} failed, {skipped} held back, of {total} writes): {source}")]
pub struct SyncError<E: std::error::Error + 'static, A: Address = Ipv4> {
    /// The first write that failed.
    pub op: MapOp<A>,
    pub failed: usize,
    /// Writes skipped because a frontend they belong to had a failed write.
    pub skipped: usize,
    pub total: usize,
    #[source]
    pub source: E,
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncOutcome<A: Address = Ipv4> {
    pub writes: usize,
    /// UDP backends that left a frontend: their flows must be forgotten.
    pub lost_udp_backends: BTreeSet<(ServiceKey<A>, Backend<A>)>,
}

/// Keeps a copy of what the maps hold, so a sync writes only the difference,
/// and what they were last synced to, so that a sync computes only the
/// frontends whose desired state changed (one changed Service costs its
/// own frontends, not a walk over all of them). One per family: it plans
/// the frontends of its family (`A`) and leaves the others to the other.
pub struct Reconciler<A: Family = Ipv4> {
    current: MapContents<A>,
    maglev: MaglevConfig,
    index: Index<A>,
    /// Whether `current` holds the desired state last remembered, so that
    /// the next sync may compute only the frontends that changed since;
    /// false at first and after a failed sync: every frontend then.
    in_step: bool,
    /// Whether the last step wrote every frontend it touched.
    last_step_whole: bool,
    /// Maglev frontends that fell back to random for want of a table:
    /// looked at in every sync, since a table freed lets one have it.
    waiting: BTreeSet<Frontend>,
    /// What the Maglev tables this reconciler wrote hold, so that a table
    /// written again gets only the entries that differ. A frontend whose
    /// backends change moves to the spare, and its old table becomes the
    /// spare; its next change (a rolling update's next step) is written
    /// into that old table, which differs from the new one by about one
    /// entry in N per backend changed (Maglev's minimal disruption).
    /// Unknown after adoption or a failed write: written whole.
    tables: BTreeMap<u32, Vec<u32>>,
}

/// Indexes of `current` kept in step with every write, for what a sync of
/// some frontends must know of all the others.
#[derive(Debug, Default, PartialEq, Eq)]
struct Index<A: Address> {
    /// Backend → its id.
    ids: BTreeMap<Backend<A>, u32>,
    /// Backend id → how many slots name it.
    refs: BTreeMap<u32, u32>,
    /// Maglev table → how many frontends name it.
    tables: BTreeMap<u32, u32>,
    /// Service address → its frontends, and how many of them are not
    /// cluster IPs (the SERVICE_ADDRS entry follows from these).
    on_address: BTreeMap<A, (u32, u32)>,
    /// Backend ids not in the maps below `id_top`; every id from `id_top`
    /// on is free. So the lowest free id costs a lookup, not a walk over
    /// the ids in use.
    free_ids: BTreeSet<u32>,
    id_top: u32,
}

impl<A: Address> Index<A> {
    fn of(contents: &MapContents<A>) -> Self {
        let mut index = Self { ids: contents.backends.iter().map(|(id, b)| (*b, *id)).collect(), ..Self::default() };
        index.id_top = contents.backends.keys().next_back().map_or(1, |max| max.saturating_add(1));
        index.free_ids = (1..index.id_top).filter(|id| !contents.backends.contains_key(id)).collect();
        for (key, value) in &contents.services {
            index.count(key, value, true);
        }
        index
    }

    /// Counts (or uncounts) one SERVICES entry.
    fn count(&mut self, key: &ServiceKey<A>, value: &ServiceValue, add: bool) {
        if key.slot == 0 && key.scope == SCOPE_EXTERNAL {
            let (frontends, external) = self.on_address.entry(key.vip).or_default();
            let step = |n: &mut u32, counted: bool| {
                if counted {
                    *n = if add { *n + 1 } else { n.saturating_sub(1) };
                }
            };
            step(frontends, true);
            step(external, value.flags & FRONTEND_EXTERNAL != 0);
            if *frontends == 0 {
                self.on_address.remove(&key.vip);
            }
        }
        let (map, id) = if key.slot != 0 {
            (&mut self.refs, value.backend_id)
        } else if value.maglev_table != 0 {
            (&mut self.tables, value.maglev_table)
        } else {
            return;
        };
        let n = map.entry(id).or_default();
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            map.remove(&id);
        }
    }

    /// The lowest backend id not in the maps.
    fn first_free_id(&self) -> u32 {
        self.free_ids.first().copied().unwrap_or(self.id_top)
    }

    /// Keeps the free ids in step with `op`, just applied.
    fn follow_free_ids(&mut self, op: &MapOp<A>) {
        match op {
            MapOp::PutBackend(id, _) if *id < self.id_top => {
                self.free_ids.remove(id);
            }
            MapOp::PutBackend(id, _) => {
                // Ids come lowest-first, so this gap is empty but for maps
                // adopted from elsewhere.
                self.free_ids.extend(self.id_top..*id);
                self.id_top = id.saturating_add(1);
            }
            MapOp::DeleteBackend(id) if id.saturating_add(1) == self.id_top => {
                self.id_top = *id;
                while self.id_top > 1 && self.free_ids.remove(&(self.id_top - 1)) {
                    self.id_top -= 1;
                }
            }
            MapOp::DeleteBackend(id) if *id < self.id_top => {
                self.free_ids.insert(*id);
            }
            _ => {}
        }
    }

    /// Follows `op`, about to be applied to `current`.
    fn track(&mut self, current: &MapContents<A>, op: &MapOp<A>) {
        match op {
            MapOp::PutService(key, value) => {
                if let Some(old) = current.services.get(key) {
                    self.count(key, old, false);
                }
                self.count(key, value, true);
            }
            MapOp::DeleteService(key) => {
                if let Some(old) = current.services.get(key) {
                    self.count(key, old, false);
                }
            }
            MapOp::PutBackend(id, backend) => {
                if let Some(old) = current.backends.get(id)
                    && self.ids.get(old) == Some(id)
                {
                    self.ids.remove(old);
                }
                self.ids.insert(*backend, *id);
            }
            MapOp::DeleteBackend(id) => {
                if let Some(old) = current.backends.get(id)
                    && self.ids.get(old) == Some(id)
                {
                    self.ids.remove(old);
                }
            }
            MapOp::PutAddr(..)
            | MapOp::DeleteAddr(_)
            | MapOp::PutSourceRange(_)
            | MapOp::DeleteSourceRange(_)
            | MapOp::PutMaglevTable(..)
            | MapOp::PutMaglevEntries(..) => {}
        }
    }
}

/// The Maglev frontends of family `A` among `ports` that `target` gives no
/// table.
fn waiting_for_a_table<'a, A: Family>(
    ports: impl Iterator<Item = &'a ServicePort>,
    target: &MapContents<A>,
) -> BTreeSet<Frontend> {
    let without_table = |key: ServiceKey<A>| target.services.get(&key).is_none_or(|v| v.maglev_table == 0);
    ports
        .filter(|s| s.algorithm == Algorithm::Maglev)
        // The internal view of a two-scope frontend has a table of its own.
        .filter(|s| {
            let Some(key) = frontend_key::<A>(&s.frontend) else { return false };
            without_table(key) || (s.internal_backends.is_some() && without_table(key.with_scope(SCOPE_INTERNAL)))
        })
        .map(|s| s.frontend)
        .collect()
}

/// How many Maglev tables the frontends' entries (both scopes) name.
fn tables_named<A: Family>(current: &MapContents<A>, frontends: &BTreeSet<Frontend>) -> usize {
    let named = |key: ServiceKey<A>| current.services.get(&key).is_some_and(|v| v.maglev_table != 0);
    let keys = frontends.iter().filter_map(frontend_key::<A>);
    keys.map(|k| usize::from(named(k)) + usize::from(named(k.with_scope(SCOPE_INTERNAL)))).sum()
}

/// A sync's work: what the maps should hold for the frontends it touches,
/// and what they hold of them now.
pub struct Step<A: Address = Ipv4> {
    /// The maps' entries of the touched frontends; None: all (every
    /// frontend is touched).
    before: Option<MapContents<A>>,
    target: MapContents<A>,
    /// `Reconciler::waiting` once the step is written.
    waiting: BTreeSet<Frontend>,
}

impl<A: Address> Step<A> {
    /// The entries the sync writes toward.
    pub fn target(&self) -> &MapContents<A> {
        &self.target
    }
}

/// Which frontends (slot-0 keys) each write belongs to, for holding back
/// the rest of a frontend's writes when one of them fails.
struct Dependents<A: Address> {
    /// Backend id → frontends whose target slots name it.
    by_backend: BTreeMap<u32, Vec<ServiceKey<A>>>,
    /// Maglev table → the frontend that will use it.
    by_table: BTreeMap<u32, ServiceKey<A>>,
}

impl<A: Address> Dependents<A> {
    fn new(target: &MapContents<A>) -> Self {
        let mut by_backend: BTreeMap<u32, Vec<ServiceKey<A>>> = BTreeMap::new();
        for (key, value) in target.services.iter().filter(|(k, _)| k.slot != 0) {
            by_backend.entry(value.backend_id).or_default().push(key.with_slot(0));
        }
        let by_table =
            target.services.iter().filter(|(_, v)| v.maglev_table != 0).map(|(k, v)| (v.maglev_table, *k)).collect();
        Self { by_backend, by_table }
    }

    fn of(&self, op: &MapOp<A>) -> Vec<ServiceKey<A>> {
        match op {
            MapOp::PutBackend(id, _) => self.by_backend.get(id).cloned().unwrap_or_default(),
            MapOp::PutService(key, _) | MapOp::DeleteService(key) => vec![key.with_slot(0)],
            MapOp::PutMaglevTable(table, _) | MapOp::PutMaglevEntries(table, _) => {
                self.by_table.get(table).copied().into_iter().collect()
            }
            MapOp::PutSourceRange((_, range)) => vec![ServiceKey::new(range.vip, range.port, range.protocol, 0)],
            // Nothing waits on a backend's deletion or on a service address.
            MapOp::DeleteBackend(_) | MapOp::PutAddr(..) | MapOp::DeleteAddr(_) | MapOp::DeleteSourceRange(_) => {
                Vec::new()
            }
        }
    }
}

impl<A: Family> Reconciler<A> {
    /// Starts from what the maps hold now (adopted pinned maps, or empty).
    pub fn new(current: MapContents<A>, maglev: MaglevConfig) -> Self {
        Self {
            index: Index::of(&current),
            current,
            maglev,
            in_step: false,
            last_step_whole: false,
            waiting: BTreeSet::new(),
            tables: BTreeMap::new(),
        }
    }

    pub fn current(&self) -> &MapContents<A> {
        &self.current
    }

    /// Writes what differs between the maps and `desired`, computing every
    /// frontend. A failed write holds back the rest of its frontends'
    /// writes (see the module); the error names the first failure, and a
    /// later sync retries.
    pub fn sync<W: MapWriter<A>>(
        &mut self,
        desired: &[ServicePort],
        maps: &mut W,
    ) -> Result<SyncOutcome<A>, SyncError<W::Error, A>> {
        let desired: BTreeMap<Frontend, ServicePort> = desired.iter().map(|s| (s.frontend, s.clone())).collect();
        let step = self.prepare(&desired, None);
        let outcome = self.sync_step(&step, maps);
        if outcome.is_ok() {
            self.remember();
        }
        outcome
    }

    /// The work of a sync to `desired`: with `changed` (the frontends whose
    /// desired state changed since the last sync remembered, as
    /// `model::Model` says), those alone, and Maglev frontends waiting for
    /// a table; every frontend without it, or when the last sync is not
    /// known to have been written.
    pub fn prepare<P: Borrow<ServicePort>>(
        &self,
        desired: &BTreeMap<Frontend, P>,
        changed: Option<&BTreeSet<Frontend>>,
    ) -> Step<A> {
        let Some(changed) = changed.filter(|_| self.in_step) else {
            // This family's frontends only (the other family's reconciler
            // plans the rest).
            let all: Vec<ServicePort> =
                desired.values().map(Borrow::borrow).filter(|p| A::of(p.frontend.addr).is_some()).cloned().collect();
            let target = target_contents(&all, &self.current, self.maglev);
            let waiting = waiting_for_a_table(all.iter(), &target);
            return Step { before: None, target, waiting };
        };
        // A table free (now, or freed by a frontend of this sync) lets a
        // Maglev frontend that fell back to random have one, though its own
        // state is unchanged: those waiting are looked at then. With every
        // table taken they would get none, as a whole computation shows.
        let hashed: usize = self.index.tables.values().map(|n| *n as usize).sum();
        let room = hashed.saturating_sub(tables_named(&self.current, changed)) < self.maglev.tables as usize;
        let of_family = |f: &&Frontend| A::of(f.addr).is_some();
        let touched: BTreeSet<Frontend> = if room {
            changed.union(&self.waiting).filter(of_family).copied().collect()
        } else {
            changed.iter().filter(of_family).copied().collect()
        };
        let mut before = MapContents::default();
        for frontend in touched.iter().filter_map(frontend_key::<A>) {
            let (mut low, mut high) = (frontend, frontend);
            (low.slot, low.protocol, low.scope, low._pad) = (0, 0, 0, [0; 2]);
            (high.slot, high.protocol, high.scope, high._pad) = (u16::MAX, u8::MAX, u8::MAX, [u8::MAX; 2]);
            let entries = self.current.services.range(low..=high).filter(|(k, _)| k.protocol == frontend.protocol);
            before.services.extend(entries.map(|(k, v)| (*k, *v)));
            if let Some(addr) = self.current.addrs.get(&frontend.vip) {
                before.addrs.insert(frontend.vip, *addr);
            }
        }
        let keys: BTreeSet<ServiceKey<A>> = touched.iter().filter_map(frontend_key::<A>).collect();
        let is_touched = |vip, port, protocol| keys.contains(&ServiceKey::new(vip, port, protocol, 0));
        before.source_ranges =
            self.current.source_ranges.iter().filter(|(_, r)| is_touched(r.vip, r.port, r.protocol)).copied().collect();
        let wanted: Vec<ServicePort> =
            touched.iter().filter_map(|f| desired.get(f)).map(|p| p.borrow().clone()).collect();
        let before_ids: BTreeSet<u32> = before.slot_ids().collect();
        let hashed_elsewhere = self.index.tables.values().map(|n| *n as usize).sum::<usize>()
            - before.frontend_entries().filter(|(_, v)| v.maglev_table != 0).count();
        let tables: BTreeSet<u32> = self.index.tables.keys().copied().collect();
        let globals = Globals {
            ids: &self.index.ids,
            id_taken: &|id| self.current.backends.contains_key(&id),
            first_free_id: self.index.first_free_id(),
            tables: &tables,
            hashed_elsewhere,
        };
        before.backends = before_ids.iter().filter_map(|id| Some((*id, *self.current.backends.get(id)?))).collect();
        let mut target = target_contents_within(&wanted, &before, self.maglev, &globals);
        // Backends the target names that the maps already hold (another
        // frontend's) are no news: `plan` compares with `before`.
        for id in target.slot_ids().collect::<Vec<_>>() {
            if let Some(backend) = self.current.backends.get(&id) {
                before.backends.insert(id, *backend);
            }
        }
        // An address is shared with frontends outside this step: its entry
        // counts them all, from the index, less the touched frontends as
        // they are and plus them as they will be.
        for vip in before.addrs.keys().chain(target.addrs.keys()).copied().collect::<BTreeSet<_>>() {
            let (mut frontends, mut external) = self.index.on_address.get(&vip).copied().unwrap_or_default();
            let on_vip = |contents: &MapContents<A>| -> Vec<bool> {
                let own = contents.frontend_entries().filter(|(k, _)| k.vip == vip && k.scope == SCOPE_EXTERNAL);
                own.map(|(_, v)| v.flags & FRONTEND_EXTERNAL != 0).collect()
            };
            for is_external in on_vip(&before) {
                frontends = frontends.saturating_sub(1);
                external = external.saturating_sub(u32::from(is_external));
            }
            for is_external in on_vip(&target) {
                frontends += 1;
                external += u32::from(is_external);
            }
            if frontends == 0 {
                target.addrs.remove(&vip);
            } else {
                let flags = if external > 0 { 0 } else { EMPTY_ADDR.flags };
                let frontends = u16::try_from(frontends).unwrap_or(u16::MAX);
                target.addrs.insert(vip, ServiceAddr { frontends, flags, ..EMPTY_ADDR });
            }
        }
        let still = waiting_for_a_table(wanted.iter(), &target);
        let waiting = self.waiting.iter().filter(|f| !touched.contains(f)).copied().chain(still).collect();
        Step { before: Some(before), target, waiting }
    }

    /// What the maps need room for during `step`: all they hold, and the
    /// keys the step adds (old and new are side by side mid-sync).
    pub fn needed(&self, step: &Step<A>) -> Entries {
        Entries::needed(&self.current, &step.target)
    }

    /// Records that the maps now hold the desired state the last step was
    /// prepared for, after `sync_step` succeeded: the next sync may compute
    /// only what changed since.
    pub fn remember(&mut self) {
        self.in_step = self.last_step_whole;
    }

    /// Writes `step` (from `prepare`); `remember` the desired state after
    /// it succeeds. After a failure the next sync computes every frontend.
    pub fn sync_step<W: MapWriter<A>>(
        &mut self,
        step: &Step<A>,
        maps: &mut W,
    ) -> Result<SyncOutcome<A>, SyncError<W::Error, A>> {
        let target = &step.target;
        let before = step.before.as_ref().unwrap_or(&self.current);
        let ops = plan(before, target, self.maglev);
        let mut lost_udp_backends = lost_udp_backends(before, target);
        let dependents = Dependents::new(target);
        let mut held_back: BTreeSet<ServiceKey<A>> = BTreeSet::new();
        let (mut first_error, mut failed, mut skipped) = (None, 0, 0);
        for op in &ops {
            let frontends = dependents.of(op);
            if frontends.iter().any(|f| held_back.contains(f)) {
                skipped += 1;
                continue;
            }
            // A table another frontend still reads (its move to a spare
            // was held back) must not be rewritten under it.
            if let MapOp::PutMaglevTable(table, _) = op {
                let named = self.index.tables.get(table).copied().unwrap_or(0) as usize;
                let by_its_own = frontends
                    .iter()
                    .filter(|k| self.current.services.get(k).is_some_and(|v| v.maglev_table == *table))
                    .count();
                if named > by_its_own {
                    skipped += 1;
                    held_back.extend(frontends);
                    continue;
                }
            }
            // A backend a slot still names (a held-back frontend's, or
            // another frontend's) must stay.
            if let MapOp::DeleteBackend(id) = op
                && self.index.refs.contains_key(id)
            {
                skipped += 1;
                continue;
            }
            let delta = match op {
                MapOp::PutMaglevTable(table, entries) => {
                    self.tables.get(table).map(|old| maglev_delta(*table, old, entries))
                }
                _ => None,
            };
            let written = match &delta {
                // The table already holds this.
                Some(MapOp::PutMaglevEntries(_, changed)) if changed.is_empty() => Ok(()),
                Some(delta) => maps.write(delta),
                None => maps.write(op),
            };
            match written {
                Ok(()) => {
                    self.index.track(&self.current, op);
                    self.current.apply(op);
                    self.index.follow_free_ids(op);
                    if let MapOp::PutMaglevTable(table, entries) = op {
                        self.tables.insert(*table, entries.clone());
                    }
                }
                Err(source) => {
                    failed += 1;
                    held_back.extend(frontends);
                    first_error.get_or_insert((op.clone(), source));
                    if let MapOp::PutMaglevTable(table, _) = op {
                        self.tables.remove(table);
                    }
                }
            }
        }
        match first_error {
            None => {
                self.waiting = step.waiting.clone();
                // A frontend held back without an error (a table another
                // frontend still reads) is not where its desired state says:
                // the next sync computes everything and finds it.
                self.last_step_whole = held_back.is_empty();
                Ok(SyncOutcome { writes: ops.len() - skipped, lost_udp_backends })
            }
            Some((op, source)) => {
                // The maps hold neither the old state nor the new: the next
                // sync computes every frontend.
                self.in_step = false;
                lost_udp_backends.retain(|(frontend, _)| !held_back.contains(frontend));
                Err(SyncError { op, failed, skipped, total: ops.len(), source })
            }
        }
    }
}

/// The entries of Maglev table `table` that differ between what it holds
/// (`old`) and `new`, as one write; the whole table when the sizes differ.
fn maglev_delta<A: Address>(table: u32, old: &[u32], new: &[u32]) -> MapOp<A> {
    if old.len() != new.len() {
        return MapOp::PutMaglevTable(table, new.to_vec());
    }
    let changed = (0u32..).zip(old.iter().zip(new)).filter(|(_, (o, n))| o != n).map(|(i, (_, n))| (i, *n)).collect();
    MapOp::PutMaglevEntries(table, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::test_support::{assert_slots_whole, backends_of, service};

    #[derive(Debug, thiserror::Error)]
    #[error("injected fault")]
    struct Fault;

    /// In-memory maps that refuse chosen writes and check, after every
    /// write, that each frontend is whole.
    struct FaultyMaps {
        contents: MapContents,
        refuse: fn(&MapOp) -> bool,
    }

    impl MapWriter for FaultyMaps {
        type Error = Fault;

        fn write(&mut self, op: &MapOp) -> Result<(), Fault> {
            if (self.refuse)(op) {
                return Err(Fault);
            }
            if let MapOp::PutMaglevTable(table, _) | MapOp::PutMaglevEntries(table, _) = op {
                let named = self.contents.frontend_entries().any(|(_, v)| v.maglev_table == *table);
                assert!(!named, "{op:?}: table {table} written while a frontend reads it");
            }
            self.contents.apply(op);
            assert_slots_whole(&self.contents, &format!("{op:?}"));
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_holds_back_only_its_own_frontends() {
        let mut maps = FaultyMaps { contents: MapContents::default(), refuse: |_| false };
        let mut reconciler = Reconciler::new(MapContents::default(), MaglevConfig::default());
        reconciler.sync(&[service(1, &[1, 2]), service(2, &[3])], &mut maps).unwrap();

        // Backend 9 cannot be written (a full map, say).
        maps.refuse = |op| matches!(op, MapOp::PutBackend(_, b) if b.addr[3] == 9);
        let error =
            reconciler.sync(&[service(1, &[1, 9]), service(2, &[3, 4]), service(3, &[5])], &mut maps).unwrap_err();
        assert_eq!(error.failed, 1);
        assert_eq!(backends_of(&maps.contents, 1), [1, 2], "service 1 keeps its whole old state");
        assert_eq!(backends_of(&maps.contents, 2), [3, 4], "the others are brought up to date");
        assert_eq!(backends_of(&maps.contents, 3), [5]);
        assert_eq!(reconciler.current(), &maps.contents, "the reconciler knows what was written");

        // Once the write succeeds, the next sync finishes the job.
        maps.refuse = |_| false;
        reconciler.sync(&[service(1, &[1, 9]), service(2, &[3, 4]), service(3, &[5])], &mut maps).unwrap();
        assert_eq!(backends_of(&maps.contents, 1), [1, 9]);
    }

    #[test]
    fn a_failed_delete_keeps_what_its_frontend_still_names() {
        let mut maps = FaultyMaps { contents: MapContents::default(), refuse: |_| false };
        let mut reconciler = Reconciler::new(MapContents::default(), MaglevConfig::default());
        reconciler.sync(&[service(1, &[1, 2]), service(2, &[3])], &mut maps).unwrap();

        // Service 1's frontend cannot be deleted: its slots and backends
        // stay, while service 2 changes.
        maps.refuse = |op| matches!(op, MapOp::DeleteService(k) if k.slot == 0 && k.vip[3] == 1);
        reconciler.sync(&[service(2, &[3, 4])], &mut maps).unwrap_err();
        assert_eq!(backends_of(&maps.contents, 1), [1, 2]);
        assert_eq!(backends_of(&maps.contents, 2), [3, 4]);
    }

    /// Maps with the Maglev tables as written, and the table ops seen.
    #[derive(Default)]
    struct TableMaps {
        contents: MapContents,
        tables: BTreeMap<u32, Vec<u32>>,
        /// (table, entries written) of each table write.
        writes: Vec<(u32, usize)>,
    }

    impl MapWriter for TableMaps {
        type Error = Fault;

        fn write(&mut self, op: &MapOp) -> Result<(), Fault> {
            match op {
                MapOp::PutMaglevTable(table, entries) => {
                    self.tables.insert(*table, entries.clone());
                    self.writes.push((*table, entries.len()));
                }
                MapOp::PutMaglevEntries(table, entries) => {
                    let held = self.tables.get_mut(table).expect("entries of a table written whole before");
                    for (i, id) in entries {
                        held[*i as usize] = *id;
                    }
                    self.writes.push((*table, entries.len()));
                }
                _ => {}
            }
            self.contents.apply(op);
            Ok(())
        }
    }

    #[test]
    fn a_rolling_update_writes_only_the_maglev_entries_that_change() {
        use crate::model::Algorithm;
        let hashed = |backends: &[u8]| ServicePort { algorithm: Algorithm::Maglev, ..service(1, backends) };
        let config = MaglevConfig { table_size: 251, tables: 1 };
        let mut maps = TableMaps::default();
        let mut reconciler = Reconciler::new(MapContents::default(), config);
        // Ten backends replaced one at a time, as a rolling update does.
        let mut backends: Vec<u8> = (1..=10).collect();
        reconciler.sync(&[hashed(&backends)], &mut maps).unwrap();
        for step in 0..10u8 {
            backends[usize::from(step)] = 100 + step;
            reconciler.sync(&[hashed(&backends)], &mut maps).unwrap();
            // What the frontend's table holds is what a whole write gives.
            let whole = plan(&MapContents::default(), &maps.contents, config);
            for op in whole {
                if let MapOp::PutMaglevTable(table, entries) = op {
                    assert_eq!(maps.tables[&table], entries, "step {step}: table {table}");
                }
            }
        }
        let written: Vec<usize> = maps.writes.iter().map(|(_, n)| *n).collect();
        // The first table and the spare's first use are whole; after that
        // each step writes into the table two steps old: about two backends
        // in ten differ.
        assert_eq!(written[..2], [251, 251], "{written:?}");
        assert!(written[2..].iter().all(|n| *n < 251 / 2), "{written:?}");
    }

    #[test]
    fn a_held_back_move_to_a_spare_table_keeps_its_old_table_from_being_rewritten() {
        use crate::model::Algorithm;
        let hashed = |vip, backends: &[u8]| ServicePort { algorithm: Algorithm::Maglev, ..service(vip, backends) };
        let config = MaglevConfig { table_size: 13, tables: 2 };
        let table_of = |m: &MapContents, vip: u8| {
            m.services[&ServiceKey::new([10, 96, 0, vip], 80u16.to_be_bytes(), 6, 0)].maglev_table
        };
        let mut maps = FaultyMaps { contents: MapContents::default(), refuse: |_| false };
        let mut reconciler = Reconciler::new(MapContents::default(), config);
        reconciler.sync(&[hashed(1, &[1]), hashed(2, &[2])], &mut maps).unwrap();
        let before = (table_of(&maps.contents, 1), table_of(&maps.contents, 2));

        // Both change: one moves to the spare, the other to the table the
        // first leaves. The first move fails, so the second must wait.
        let first_to_move = if before.0 < before.1 { 1 } else { 2 };
        maps.refuse = if first_to_move == 1 {
            |op| matches!(op, MapOp::PutService(k, _) if k.slot == 0 && k.vip[3] == 1)
        } else {
            |op| matches!(op, MapOp::PutService(k, _) if k.slot == 0 && k.vip[3] == 2)
        };
        reconciler.sync(&[hashed(1, &[1, 3]), hashed(2, &[2, 4])], &mut maps).unwrap_err();
        assert_eq!((table_of(&maps.contents, 1), table_of(&maps.contents, 2)), before, "neither moved");
        assert_eq!(reconciler.current(), &maps.contents);

        maps.refuse = |_| false;
        reconciler.sync(&[hashed(1, &[1, 3]), hashed(2, &[2, 4])], &mut maps).unwrap();
        assert_eq!(backends_of(&maps.contents, 1), [1, 3]);
        assert_eq!(backends_of(&maps.contents, 2), [2, 4]);
    }

    use crate::test_rng::Rng;

    /// Up to 4 of 10 backends.
    fn random_backends(rng: &mut Rng) -> BTreeSet<std::net::SocketAddr> {
        (0..rng.below(5))
            .map(|_| std::net::SocketAddr::from((std::net::Ipv4Addr::from([10, 0, 0, 1 + rng.below(10) as u8]), 8080)))
            .collect()
    }

    /// A random change of the desired state: frontends come, go and change
    /// their backends, algorithm, kind, scopes and source ranges, on a few
    /// shared addresses and backends.
    fn mutate(rng: &mut Rng, desired: &mut BTreeMap<crate::model::Frontend, ServicePort>) {
        use crate::model::{Frontend, FrontendKind, Narrowed, Protocol};
        for _ in 0..1 + rng.below(3) {
            let protocol = if rng.below(4) == 0 { Protocol::Udp } else { Protocol::Tcp };
            let frontend =
                Frontend { addr: [10, 96, 0, 1 + rng.below(6) as u8].into(), port: 80 + rng.below(2) as u16, protocol };
            if rng.below(4) == 0 {
                desired.remove(&frontend);
                continue;
            }
            let backends = random_backends(rng);
            let external = rng.below(3) == 0;
            let service = ServicePort {
                name: format!("svc/{frontend}"),
                frontend,
                kind: if external { FrontendKind::NodePort } else { FrontendKind::ClusterIp },
                local_backends: backends.iter().filter(|_| rng.below(2) == 0).copied().collect(),
                backends,
                affinity_timeout_s: if rng.below(5) == 0 { 30 } else { 0 },
                algorithm: if rng.below(3) == 0 { Algorithm::Maglev } else { Algorithm::Random },
                source_ranges: if external && rng.below(2) == 0 { vec!["10.0.0.0/8".parse().unwrap()] } else { vec![] },
                drop_when_empty: false,
                internal_backends: (external && rng.below(2) == 0).then(|| random_backends(rng)),
                narrowed: [Narrowed::No, Narrowed::PolicyLocal, Narrowed::NodeHints][rng.below(3) as usize],
            };
            desired.insert(frontend, service);
        }
    }

    #[test]
    fn syncing_only_what_changed_gives_the_maps_a_whole_sync_gives() {
        let maglev = MaglevConfig { table_size: 13, tables: 2 };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut desired = BTreeMap::new();
        let empty = || FaultyMaps { contents: MapContents::default(), refuse: |_| false };
        let (mut partial_maps, mut whole_maps) = (empty(), empty());
        let mut partial = Reconciler::new(MapContents::default(), maglev);
        let (mut touched, mut total) = (0, 0);
        let mut previous: BTreeMap<Frontend, ServicePort> = BTreeMap::new();
        for round in 0..400 {
            mutate(&mut rng, &mut desired);
            let wanted: Vec<ServicePort> = desired.values().cloned().collect();
            // The reference: every frontend, from the maps as they are.
            let mut whole = Reconciler::new(whole_maps.contents.clone(), maglev);
            whole.sync(&wanted, &mut whole_maps).unwrap();
            // What the model would say changed.
            let changed: BTreeSet<Frontend> =
                previous.keys().chain(desired.keys()).filter(|f| previous.get(f) != desired.get(f)).copied().collect();
            let step = partial.prepare(&desired, Some(&changed));
            if let Some(before) = &step.before {
                touched += before.frontend_entries().count().max(step.target.frontend_entries().count());
                total += wanted.len();
            }
            partial.sync_step(&step, &mut partial_maps).unwrap();
            partial.remember();
            previous = desired.clone();
            if partial_maps.contents != whole_maps.contents {
                let (a, b) = (&partial_maps.contents, &whole_maps.contents);
                let keys: BTreeSet<_> = a.services.keys().chain(b.services.keys()).collect();
                let differ: Vec<_> = keys
                    .into_iter()
                    .filter(|k| a.services.get(k) != b.services.get(k))
                    .map(|k| (k, a.services.get(k), b.services.get(k)))
                    .take(6)
                    .collect();
                panic!(
                    "round {round}: partial vs whole SERVICES {differ:?}; addrs equal {}, backends equal {}, ranges equal {}",
                    a.addrs == b.addrs,
                    a.backends == b.backends,
                    a.source_ranges == b.source_ranges
                );
            }
            assert_eq!(partial.current, partial_maps.contents, "round {round}");
            assert_eq!(partial.index, Index::of(&partial.current), "round {round}: indexes kept in step");
        }
        assert!(touched < total / 2, "syncs touched {touched} of {total} frontends: not only what changed");
        let again = partial.prepare(&desired, Some(&BTreeSet::new()));
        let waiting = desired.values().filter(|s| s.algorithm == Algorithm::Maglev).count();
        assert!(again.target.frontend_entries().count() <= waiting, "nothing changed: only Maglev frontends waiting");
    }

    #[test]
    fn one_changed_frontend_among_a_thousand_is_all_a_sync_computes_and_writes() {
        let maglev = MaglevConfig::default();
        let services: Vec<ServicePort> = (0..1000u32)
            .map(|i| {
                let mut s = service(1, &[1, 2]);
                s.frontend.addr = std::net::Ipv4Addr::from(0x0a60_0001 + i).into();
                s
            })
            .collect();
        let mut maps = FaultyMaps { contents: MapContents::default(), refuse: |_| false };
        let mut reconciler = Reconciler::new(MapContents::default(), maglev);
        reconciler.sync(&services, &mut maps).unwrap();
        let mut changed: BTreeMap<Frontend, ServicePort> = services.iter().map(|s| (s.frontend, s.clone())).collect();
        let frontend = services[500].frontend;
        changed.get_mut(&frontend).unwrap().backends = service(1, &[2, 3]).backends;
        let step = reconciler.prepare(&changed, Some(&BTreeSet::from([frontend])));
        assert_eq!(step.target.frontend_entries().count(), 1);
        assert_eq!(step.before.as_ref().map(|b| b.services.len()), Some(3), "its frontend entry and two slots");
        let outcome = reconciler.sync_step(&step, &mut maps).unwrap();
        // The new backend and its slot; backend 2's slot and the count are
        // unchanged, and backend 1 stays (the 999 others name it: its
        // planned deletion is skipped).
        assert_eq!(outcome.writes, 2, "{:?}", plan(step.before.as_ref().unwrap(), &step.target, maglev));
        let key = frontend_key::<Ipv4>(&frontend).unwrap();
        let now: Vec<u8> = maps.contents.slots_of(&key).iter().map(|id| maps.contents.backends[id].addr[3]).collect();
        assert_eq!(now, [3, 2], "backend 3 in backend 1's slot; backend 2 kept its own");
        assert_eq!(maps.contents.backends.len(), 3, "backend 1 stays for the 999 others");
    }
}
