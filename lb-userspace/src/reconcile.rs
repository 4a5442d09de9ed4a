//! Applies desired services to the maps through one narrow interface.
use std::collections::BTreeSet;

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
#[error("map write {op:?} failed after {done} of {total} writes: {source}")]
pub struct SyncError<E: std::error::Error + 'static> {
    pub op: MapOp,
    pub done: usize,
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

impl Reconciler {
    /// Starts from what the maps hold now (adopted pinned maps, or empty).
    pub fn new(current: MapContents, maglev: MaglevConfig) -> Self {
        Self { current, maglev }
    }

    pub fn current(&self) -> &MapContents {
        &self.current
    }

    /// Writes what differs between the maps and `desired`. On a failed
    /// write, the writes before it stay (each prefix of the plan is
    /// consistent) and the next sync carries on from there.
    pub fn sync<W: MapWriter>(&mut self, desired: &[ServicePort], maps: &mut W) -> Result<SyncOutcome, SyncError<W::Error>> {
        let target = target_contents(desired, &self.current, self.maglev);
        let ops = plan(&self.current, &target, self.maglev);
        let lost_udp_backends = lost_udp_backends(&self.current, &target);
        for (done, op) in ops.iter().enumerate() {
            maps.write(op).map_err(|source| SyncError { op: op.clone(), done, total: ops.len(), source })?;
            self.current.apply(op);
        }
        Ok(SyncOutcome { writes: ops.len(), lost_udp_backends })
    }
}
