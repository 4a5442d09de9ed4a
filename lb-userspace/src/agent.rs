//! The agent's main loop: poll the source, reconcile the maps, attach to new
//! pod interfaces, stop on SIGINT/SIGTERM. Stopping leaves the datapath
//! pinned and attached, so traffic keeps flowing until the next agent adopts it.
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{Datapath, MapSizes},
    dir_source::DirSource,
    interfaces::{self, PodInterfaces},
    model::desired_state,
    reconcile::Reconciler,
};

const SOURCE_POLL: Duration = Duration::from_millis(200);
const INTERFACE_POLL: Duration = Duration::from_millis(500);

pub struct AgentConfig {
    pub source_dir: PathBuf,
    pub pod_interfaces: PodInterfaces,
    pub pin_path: PathBuf,
    pub map_sizes: MapSizes,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    anyhow::ensure!(config.source_dir.is_dir(), "source directory {} does not exist", config.source_dir.display());
    let mut datapath = Datapath::load(Some(&config.pin_path), config.map_sizes)?;
    let adopted = datapath.maps.read_contents()?;
    info!(
        pin_path = %config.pin_path.display(),
        frontends = adopted.frontends().count(),
        backends = adopted.backends.len(),
        "datapath loaded"
    );
    let mut reconciler = Reconciler::new(adopted);
    let mut source = DirSource::new(&config.source_dir);

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut source_tick = tokio::time::interval(SOURCE_POLL);
    let mut interface_tick = tokio::time::interval(INTERFACE_POLL);
    let mut failed_attachments = BTreeSet::new();
    loop {
        tokio::select! {
            _ = source_tick.tick() => sync_from_dir(&mut source, &mut reconciler, &mut datapath),
            _ = interface_tick.tick() => {
                refresh_interfaces(&mut datapath, &config.pod_interfaces, &mut failed_attachments)
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping; the datapath stays pinned at {} for the next agent", config.pin_path.display());
    Ok(())
}

fn sync_from_dir(source: &mut DirSource, reconciler: &mut Reconciler, datapath: &mut Datapath) {
    let rescan = match source.rescan() {
        Ok(r) => r,
        Err(e) => {
            warn!(dir = %source.dir().display(), "cannot read source directory, keeping the current state: {e}");
            return;
        }
    };
    for e in &rescan.errors {
        error!("{e}");
    }
    for skipped in &rescan.skipped {
        warn!("skipped (only Service v1 and EndpointSlice discovery.k8s.io/v1 are read): {skipped}");
    }
    if !rescan.changed {
        return;
    }
    let snapshot = source.snapshot();
    for (object, ignored, kept) in &snapshot.duplicates {
        error!("{}: {object}: also defined in {}; this copy is ignored", ignored.display(), kept.display());
    }
    let desired = desired_state(&snapshot.services, &snapshot.slices, None);
    for e in &desired.errors {
        let file = snapshot.origins.get(&e.object).map(|p| p.display().to_string()).unwrap_or_default();
        error!("{file}: {e}");
    }
    match reconciler.sync(&desired.services, &mut datapath.maps) {
        Ok(writes) => info!(frontends = desired.services.len(), writes, "synced"),
        // Re-read the maps: the next change retries from what is really there.
        Err(e) => {
            error!("sync failed: {e}");
            if let Ok(actual) = datapath.maps.read_contents() {
                *reconciler = Reconciler::new(actual);
            }
        }
    }
}

/// Attaches to new pod interfaces. A failed attachment is retried every
/// poll and reported once per interface (`failed` holds their indexes).
fn refresh_interfaces(datapath: &mut Datapath, selector: &PodInterfaces, failed: &mut BTreeSet<u32>) {
    let present = match interfaces::list() {
        Ok(list) => list,
        Err(e) => return warn!("cannot list interfaces: {e}"),
    };
    for name in datapath.forget_vanished(&present) {
        info!(interface = %name, "interface gone");
    }
    failed.retain(|index| present.iter().any(|i| i.index == *index));
    for interface in &present {
        if datapath.is_attached(interface) || !selector.selects(interface) {
            continue;
        }
        match datapath.attach(interface) {
            Ok(()) => {
                failed.remove(&interface.index);
                info!(interface = %interface.name, "attached");
            }
            Err(e) if failed.insert(interface.index) => warn!("{e}; retrying"),
            Err(e) => debug!("{e}; retrying"),
        }
    }
}
