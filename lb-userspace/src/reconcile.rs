//! Applies desired services to the maps through one narrow interface.
//!
//! A failed write holds back only the frontends that depend on it: their
//! later writes are skipped, so each keeps a whole (old or new) state, and
//! every other frontend is still brought up to date. One Service that does
//! not fit never stops the others.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Backend, ServiceKey};

use crate::{
    model::ServicePort,
    plan::{MaglevConfig, MapContents, MapOp, lost_udp_backends, plan, target_contents},
};

/// Where map writes go: the real maps, or a fake in tests.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn write(&mut self, op: &MapOp) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
#[error("map write {op:?} failed ({failed} failed, {skipped} held back, of {total} writes): {source}")]
pub struct SyncError<E: std::error::Error + 'static> {
    /// The first write that failed.
    pub op: MapOp,
    pub failed: usize,
    /// Writes skipped because a frontend they belong to had a failed write.
    pub skipped: usize,
    pub total: usize,
    #[source]
    pub source: E,
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub writes: usize,
    /// UDP backends that left a frontend: their flows must be forgotten.
    pub lost_udp_backends: BTreeSet<(ServiceKey, Backend)>,
}

/// Keeps a copy of what the maps hold, so a sync writes only the difference.
pub struct Reconciler {
    current: MapContents,
    maglev: MaglevConfig,
}

/// Which frontends (slot-0 keys) each write belongs to, for holding back
/// the rest of a frontend's writes when one of them fails.
struct Dependents {
    /// Backend id → frontends whose target slots name it.
    by_backend: BTreeMap<u32, Vec<ServiceKey>>,
    /// Maglev table → the frontend that will use it.
    by_table: BTreeMap<u32, ServiceKey>,
}

impl Dependents {
    fn new(target: &MapContents) -> Self {
        let mut by_backend: BTreeMap<u32, Vec<ServiceKey>> = BTreeMap::new();
        for (key, value) in target.services.iter().filter(|(k, _)| k.slot != 0) {
            by_backend.entry(value.backend_id).or_default().push(key.with_slot(0));
        }
        let by_table =
            target.services.iter().filter(|(_, v)| v.maglev_table != 0).map(|(k, v)| (v.maglev_table, *k)).collect();
        Self { by_backend, by_table }
    }

    fn of(&self, op: &MapOp) -> Vec<ServiceKey> {
        match op {
            MapOp::PutBackend(id, _) => self.by_backend.get(id).cloned().unwrap_or_default(),
            MapOp::PutService(key, _) | MapOp::DeleteService(key) => vec![key.with_slot(0)],
            MapOp::PutMaglevTable(table, _) => self.by_table.get(table).copied().into_iter().collect(),
            MapOp::PutSourceRange((_, range)) => vec![ServiceKey::new(range.vip, range.port, range.protocol, 0)],
            // Nothing waits on a backend's deletion or on a service address.
            MapOp::DeleteBackend(_) | MapOp::PutAddr(..) | MapOp::DeleteAddr(_) | MapOp::DeleteSourceRange(_) => {
                Vec::new()
            }
        }
    }
}

impl Reconciler {
    /// Starts from what the maps hold now (adopted pinned maps, or empty).
    pub fn new(current: MapContents, maglev: MaglevConfig) -> Self {
        Self { current, maglev }
    }

    pub fn current(&self) -> &MapContents {
        &self.current
    }

    /// Writes what differs between the maps and `desired`. A failed write
    /// holds back the rest of its frontends' writes (see the module); the
    /// error names the first failure, and a later sync retries.
    pub fn sync<W: MapWriter>(
        &mut self,
        desired: &[ServicePort],
        maps: &mut W,
    ) -> Result<SyncOutcome, SyncError<W::Error>> {
        let target = self.target(desired);
        self.sync_to(&target, maps)
    }

    /// What the maps will hold once `desired` is written: ids, slots and
    /// tables placed from what they hold now. The agent sizes the maps
    /// from it before `sync_to` writes it.
    pub fn target(&self, desired: &[ServicePort]) -> MapContents {
        target_contents(desired, &self.current, self.maglev)
    }

    /// `sync` with the target already computed (by `target`, from the
    /// current contents).
    pub fn sync_to<W: MapWriter>(
        &mut self,
        target: &MapContents,
        maps: &mut W,
    ) -> Result<SyncOutcome, SyncError<W::Error>> {
        let ops = plan(&self.current, target, self.maglev);
        let mut lost_udp_backends = lost_udp_backends(&self.current, target);
        let dependents = Dependents::new(target);
        let mut held_back: BTreeSet<ServiceKey> = BTreeSet::new();
        let (mut first_error, mut failed, mut skipped) = (None, 0, 0);
        for op in &ops {
            let frontends = dependents.of(op);
            if frontends.iter().any(|f| held_back.contains(f)) {
                skipped += 1;
                continue;
            }
            // A table another frontend still reads (its move to a spare
            // was held back) must not be rewritten under it.
            if let MapOp::PutMaglevTable(table, _) = op
                && self.current.frontend_entries().any(|(k, v)| v.maglev_table == *table && !frontends.contains(k))
            {
                skipped += 1;
                held_back.extend(frontends);
                continue;
            }
            // A backend a held-back frontend still names must stay.
            if let MapOp::DeleteBackend(id) = op
                && self.current.services.values().any(|v| v.backend_id == *id)
            {
                skipped += 1;
                continue;
            }
            match maps.write(op) {
                Ok(()) => self.current.apply(op),
                Err(source) => {
                    failed += 1;
                    held_back.extend(frontends);
                    first_error.get_or_insert((op.clone(), source));
                }
            }
        }
        match first_error {
            None => Ok(SyncOutcome { writes: ops.len(), lost_udp_backends }),
            Some((op, source)) => {
                lost_udp_backends.retain(|(frontend, _)| !held_back.contains(frontend));
                Err(SyncError { op, failed, skipped, total: ops.len(), source })
            }
        }
    }
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
            if let MapOp::PutMaglevTable(table, _) = op {
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
}
