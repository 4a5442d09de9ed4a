//! From desired services to map entries, and from current entries to an
//! ordered list of map writes.
//!
//! Pure code. The order of the writes is what keeps packets from seeing half
//! a service: backends exist before a slot names them, slots exist before
//! the frontend's count covers them, and a frontend shrinks or goes away
//! before the slots and backends it no longer covers are deleted.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use lb_common::{Backend, ServiceKey, ServiceValue};

use crate::model::ServicePort;

/// The exact contents of the SERVICES and BACKENDS maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    DeleteBackend(u32),
}

impl MapContents {
    pub fn apply(&mut self, op: &MapOp) {
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
        }
    }

    /// Backends of `frontend` (a slot-0 key), in slot order.
    pub fn slots_of(&self, frontend: &ServiceKey) -> Vec<u32> {
        let count = self.services.get(frontend).map_or(0, |v| v.backend_count);
        (1..=count)
            .filter_map(|slot| self.services.get(&frontend.with_slot(slot)).map(|v| v.backend_id))
            .collect()
    }

    /// Frontends (slot-0 keys) with their backends, in key order.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServiceKey, Vec<&Backend>)> {
        self.services.iter().filter(|(k, _)| k.slot == 0).map(|(k, _)| {
            let backends = self.slots_of(k).iter().filter_map(|id| self.backends.get(id)).collect();
            (k, backends)
        })
    }
}

pub fn frontend_key(service: &ServicePort) -> ServiceKey {
    let f = &service.frontend;
    ServiceKey::new(f.addr.octets(), f.port.to_be_bytes(), f.protocol.number(), 0)
}

pub fn backend_value(addr: &SocketAddrV4) -> Backend {
    Backend::new(addr.ip().octets(), addr.port().to_be_bytes())
}

/// What the maps should hold for `desired`, given what they hold now.
///
/// Backend ids and slot positions already in use are kept, so a sync writes
/// only what changed. A new backend never takes an id that is still in the
/// current maps: a slot of another service might still name it.
pub fn target_contents(desired: &[ServicePort], current: &MapContents) -> MapContents {
    let mut ids: BTreeMap<Backend, u32> = current.backends.iter().map(|(id, b)| (*b, *id)).collect();
    let mut next_id = 1u32;
    let mut target = MapContents::default();

    for service in desired {
        let frontend = frontend_key(service);
        let wanted: BTreeSet<Backend> = service.backends.iter().map(backend_value).collect();
        let mut wanted_ids = BTreeSet::new();
        for backend in &wanted {
            let id = *ids.entry(*backend).or_insert_with(|| {
                while current.backends.contains_key(&next_id) || target.backends.contains_key(&next_id) {
                    next_id += 1;
                }
                next_id
            });
            target.backends.insert(id, *backend);
            wanted_ids.insert(id);
        }
        let slots = assign_slots(&current.slots_of(&frontend), &wanted_ids);
        target.services.insert(frontend, ServiceValue::frontend(slots.len() as u16));
        for (i, id) in slots.iter().enumerate() {
            target.services.insert(frontend.with_slot(i as u16 + 1), ServiceValue::slot(*id));
        }
    }
    target
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

/// The writes that turn `current` into `target`, in an order where every
/// prefix leaves each frontend whole.
pub fn plan(current: &MapContents, target: &MapContents) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (id, backend) in &target.backends {
        if current.backends.get(id) != Some(backend) {
            ops.push(MapOp::PutBackend(*id, *backend));
        }
    }
    let changed = |k: &ServiceKey, v: &ServiceValue| current.services.get(k) != Some(v);
    for (k, v) in target.services.iter().filter(|(k, _)| k.slot != 0) {
        if changed(k, v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    for (k, v) in target.services.iter().filter(|(k, _)| k.slot == 0) {
        if changed(k, v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    let gone = |k: &&ServiceKey| !target.services.contains_key(k);
    ops.extend(current.services.keys().filter(|k| k.slot == 0).filter(gone).map(|k| MapOp::DeleteService(*k)));
    ops.extend(current.services.keys().filter(|k| k.slot != 0).filter(gone).map(|k| MapOp::DeleteService(*k)));
    ops.extend(
        current.backends.keys().filter(|id| !target.backends.contains_key(id)).map(|id| MapOp::DeleteBackend(*id)),
    );
    ops
}
