//! The agent's main loop: wait for a change from the source, reconcile the
//! maps (at most once per `min_sync_period`, so a burst of events becomes a
//! few syncs), attach to new pod and external interfaces, follow the node's
//! addresses, serve health, health-check node ports and metrics, stop on
//! SIGINT/SIGTERM. Stopping leaves the datapath pinned and attached, so
//! traffic keeps flowing until the next agent adopts it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use lb_common::Ipv6;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    cidr::Cidr,
    datapath::{Datapath, Hook, MapSizes},
    dir_source::DirSource,
    health_check::HealthCheckServers,
    interfaces::{self, ExternalDatapath, ExternalInterfaces, PodInterfaces, WireChoice},
    kube_source::{Connection, KubeSource},
    model::{Changes, Model, ModelOptions, NodeView},
    plan::MaglevConfig,
    reconcile::{Reconciler, Step},
    sizing::{self, Entries, Ipv6Maps},
    status::{self, Health, Metrics},
};

const DIR_POLL: Duration = Duration::from_millis(200);
/// A failed sync (a full map, say) is retried without waiting for a change,
/// backing off from the first to the last delay.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LAST: Duration = Duration::from_secs(30);
const INTERFACE_POLL: Duration = Duration::from_millis(500);
/// How often ENDPOINT_FILTER loses the bits nothing needs any more (a bit
/// goes at the second sweep that finds it unneeded: see `lb_model::filter`).
/// Until then a stale bit only costs its packets the full path. A sweep
/// that reads conntrack (some bit is not one the maps need) and clears
/// nothing doubles the wait, up to `FILTER_SWEEP_MAX`: a deleted Service's
/// connection may live for a day, and each sweep reads the whole table
/// on the agent's loop (about 1 µs an entry here).
const FILTER_SWEEP: Duration = Duration::from_secs(60);
const FILTER_SWEEP_MAX: Duration = Duration::from_secs(16 * 60);
/// The degraded-feature names (`Health::set_degraded`) of socket-level
/// balancing and of the interfaces a program failed to attach to.
const FEATURE_SOCKET_LB: &str = "socket_lb";
const FEATURE_INTERFACE: &str = "interface ";

pub enum SourceConfig {
    Dir(PathBuf),
    /// The API server, and the name of this node's Node object.
    Kube(Connection, String),
}

/// Where the socket programs attach and whose sockets they translate.
pub struct SocketBalancing {
    /// Where to attach; None: the root of the cgroup v2 hierarchy, found
    /// among the mounts (`mounts::cgroup2_root`).
    pub cgroup: Option<PathBuf>,
    /// Only the agent's own network namespace (`--socket-lb host`), or all.
    pub own_netns_only: bool,
}

pub struct AgentConfig {
    pub source: SourceConfig,
    /// Node addresses in it are filled in by the agent.
    pub model: ModelOptions,
    pub nodeport_addresses: Vec<Cidr>,
    pub external_interfaces: ExternalInterfaces,
    /// Which program serves each external interface: tc or XDP.
    pub external_datapath: ExternalDatapath,
    pub pod_interfaces: PodInterfaces,
    pub pin_path: PathBuf,
    /// Socket-level balancing: where the programs attach, and which
    /// sockets they translate. None: off.
    pub socket_lb: Option<SocketBalancing>,
    /// The maps' sizes when created: floors the agent grows the agent-written
    /// maps from as the cluster needs (`sizing`), unless `fixed_map_sizes`.
    pub map_sizes: MapSizes,
    pub fixed_map_sizes: bool,
    pub min_sync_period: Duration,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_timeout: Duration,
}

/// Where Services and EndpointSlices come from.
enum Source {
    /// The directory, polled; what changed since the last sync.
    Dir {
        dir: Box<DirSource>,
        tick: tokio::time::Interval,
        pending: Changes,
    },
    Kube(KubeSource),
}

impl Source {
    /// Returns once something changed. Cancel-safe.
    async fn changed(&mut self) {
        match self {
            Source::Dir { dir, tick, pending } => loop {
                tick.tick().await;
                match dir.rescan() {
                    Ok(rescan) => {
                        for e in &rescan.errors {
                            error!("{e}");
                        }
                        for skipped in &rescan.skipped {
                            warn!(
                                "skipped (only Service v1, EndpointSlice discovery.k8s.io/v1 and Node v1 are read): {skipped}"
                            );
                        }
                        // The first scan syncs even without objects: maps
                        // adopted from an earlier agent must be brought
                        // to what the directory holds now.
                        if !rescan.changes.is_empty() || rescan.nodes_changed || rescan.first {
                            pending.extend(rescan.changes);
                            return;
                        }
                    }
                    Err(e) => warn!(dir = %dir.dir().display(), "cannot read, keeping the current state: {e}"),
                }
            },
            Source::Kube(kube) => kube.changed().await,
        }
    }

    /// The objects that changed since the last call.
    fn take_changes(&mut self) -> Changes {
        match self {
            Source::Dir { pending, .. } => std::mem::take(pending),
            Source::Kube(kube) => kube.take_changes(),
        }
    }

    /// This node's Node object, as the source has it.
    fn node(&self, name: &str) -> NodeView {
        match self {
            Source::Dir { dir, .. } => NodeView::of(dir.node(name)),
            Source::Kube(kube) => kube.node(),
        }
    }

    /// The directory, for errors to name the file of an object.
    fn files(&self) -> Option<&DirSource> {
        match self {
            Source::Dir { dir, .. } => Some(dir.as_ref()),
            Source::Kube(_) => None,
        }
    }
}

struct Agent {
    datapath: Datapath,
    /// Socket-level balancing translates other namespaces' sockets too
    /// (`--socket-lb all`): their sockets are destroyed there as well.
    sockets_of_all_netns: bool,
    reconciler: Reconciler,
    /// The IPv6 frontends' (`Maps6`), as `reconciler` the IPv4 ones'.
    reconciler6: Reconciler<Ipv6>,
    model: ModelOptions,
    /// The Services' frontends, kept between syncs and updated from the
    /// objects that changed.
    kept_model: Model,
    maglev: MaglevConfig,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Object errors already logged, so a sync logs only new ones.
    reported: BTreeSet<String>,
    /// Newest EndpointSlice trigger time already counted in the
    /// programming-duration metric.
    newest_trigger: SystemTime,
    synced_once: bool,
    health_checks: HealthCheckServers,
    /// The flags' map sizes: floors of grown maps.
    map_floors: MapSizes,
    fixed_map_sizes: bool,
    /// Maps last reported at or above 90 % full, so each crossing is
    /// logged once.
    nearly_full: BTreeSet<&'static str>,
    /// What NODE_PORTS holds (None: not read yet, or a write failed).
    node_ports: Option<BTreeMap<u16, u8>>,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let socket_netns = match &config.socket_lb {
        Some(SocketBalancing { own_netns_only: true, .. }) => {
            crate::datapath::netns_cookie().context("reading this network namespace's cookie")?
        }
        _ => 0,
    };
    let mut datapath = Datapath::load(Some(&config.pin_path), config.map_sizes, socket_netns)?;
    let health = Arc::new(Health::new(config.healthz_timeout));
    match &config.socket_lb {
        // One feature lost is no reason to stop serving the rest: pods
        // still take the per-packet path. /healthz and /metrics say so.
        Some(socket_lb) => {
            let attached =
                socket_lb.cgroup.clone().map_or_else(crate::mounts::cgroup2_root, Ok).map_err(|e| e.to_string());
            let attached = attached.and_then(|cgroup| match datapath.attach_cgroup(&cgroup) {
                Ok(()) => Ok(cgroup),
                Err(e) => Err(e.to_string()),
            });
            match attached {
                Ok(cgroup) => info!(
                    cgroup = %cgroup.display(),
                    scope = if socket_lb.own_netns_only { "host" } else { "all" },
                    "sockets balanced at connect"
                ),
                Err(e) => {
                    error!("socket-level balancing unavailable, host-network clients are not translated: {e}");
                    health.set_degraded(FEATURE_SOCKET_LB, Some(e));
                }
            }
        }
        None => {
            let detached = datapath.detach_cgroup();
            info!(detached, "socket-level balancing off");
        }
    }
    let (adopted, adopted6) = (datapath.maps.read_contents()?, datapath.maps.read_contents6()?);
    // Before any interface gets these programs: the filter must let every
    // adopted frontend's and live flow's packets through.
    datapath.maps.fill_endpoint_filter(&adopted, &adopted6)?;
    info!(
        pin_path = %config.pin_path.display(),
        frontends = adopted.frontends().count() + adopted6.frontends().count(),
        backends = adopted.backends.len() + adopted6.backends.len(),
        "datapath loaded"
    );
    let maglev = datapath.maps.maglev_capacity().unwrap_or(config.map_sizes.maglev);
    if maglev != config.map_sizes.maglev {
        warn!(
            pinned_tables = maglev.tables,
            flag_tables = config.map_sizes.maglev.tables,
            "MAGLEV was pinned by an earlier agent with another size: it keeps that size until its pin is removed"
        );
    }
    let metrics = Arc::new(Metrics::new(config.pin_path.clone()));
    let serving = status::serving_runtime().context("starting the serving thread")?;
    for (flag, addr) in [("--healthz-addr", config.healthz_addr), ("--metrics-addr", config.metrics_addr)] {
        if let Some(addr) = addr {
            for listener in status::bind_on(&serving, flag, addr)? {
                info!("serving {flag} on {}", listener.local_addr()?);
                serving.spawn(status::serve(listener, health.clone(), metrics.clone()));
            }
        }
    }
    let mut source = match config.source {
        SourceConfig::Dir(path) => {
            anyhow::ensure!(path.is_dir(), "source directory {} does not exist", path.display());
            Source::Dir {
                dir: Box::new(DirSource::new(path)),
                tick: tokio::time::interval(DIR_POLL),
                pending: Changes::default(),
            }
        }
        SourceConfig::Kube(connection, node_name) => Source::Kube(KubeSource::start(&connection, &node_name).await?),
    };
    let mut interfaces = Interfaces {
        pod: config.pod_interfaces,
        external: config.external_interfaces,
        external_datapath: config.external_datapath,
        nodeport_addresses: config.nodeport_addresses,
        failed: BTreeMap::new(),
    };
    let mut model = config.model;
    model.node_addresses = interfaces.refresh(&mut datapath, &[], &health);
    info!(node = %model.node_name, addresses = ?model.node_addresses, "node addresses for NodePorts");
    let mut agent = Agent {
        datapath,
        sockets_of_all_netns: matches!(config.socket_lb, Some(SocketBalancing { own_netns_only: false, .. })),
        reconciler: Reconciler::new(adopted, maglev),
        reconciler6: Reconciler::new(adopted6, maglev),
        model,
        kept_model: Model::default(),
        maglev,
        health,
        metrics,
        reported: BTreeSet::new(),
        newest_trigger: SystemTime::now(),
        synced_once: false,
        health_checks: HealthCheckServers::new(serving.clone()),
        map_floors: config.map_sizes,
        fixed_map_sizes: config.fixed_map_sizes,
        nearly_full: BTreeSet::new(),
        node_ports: None,
    };

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut interface_tick = tokio::time::interval(INTERFACE_POLL);
    // A sleep from the end of the last sweep, never a burst of missed
    // ticks: the second of two sweeps must come well after the first.
    let mut sweep_wait = FILTER_SWEEP;
    let mut next_sweep = tokio::time::Instant::now() + sweep_wait;
    let mut next_sync = tokio::time::Instant::now();
    // After a failed sync: when to try again, and the delay after that.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let retry_at = retry.map_or_else(|| tokio::time::Instant::now() + RETRY_LAST, |(at, _)| at);
        tokio::select! {
            () = source.changed() => {
                agent.health.queued();
                let node = source.node(&agent.model.node_name);
                agent.health.set_node_eligible(node.eligible);
                if node.zone != agent.model.zone {
                    info!(zone = ?node.zone, "this node's zone, for topology hints");
                    agent.model.zone = node.zone;
                }
                // Changes that arrive while waiting are folded into this sync.
                tokio::time::sleep_until(next_sync).await;
                let changes = source.take_changes();
                retry = if agent.sync(changes, source.files()) {
                    None
                } else {
                    Some((tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST))
                };
                next_sync = tokio::time::Instant::now() + config.min_sync_period;
            }
            () = tokio::time::sleep_until(retry_at), if retry.is_some() => {
                let delay = retry.map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_LAST));
                warn!("retrying the failed sync");
                // The model has the changes; the reconciler starts over
                // from the maps as they are.
                let changes = source.take_changes();
                retry = if agent.sync(changes, source.files()) {
                    None
                } else {
                    Some((tokio::time::Instant::now() + delay, delay))
                };
            }
            _ = interface_tick.tick() => {
                let addresses = interfaces.refresh(&mut agent.datapath, &agent.model.node_addresses, &agent.health);
                if addresses != agent.model.node_addresses {
                    info!(?addresses, "node addresses changed");
                    agent.model.node_addresses = addresses;
                    // Before the first sync the changes wait for it (the
                    // source may not have listed everything yet).
                    if agent.synced_once && !agent.sync(Changes::default(), source.files()) && retry.is_none() {
                        retry = Some((tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST));
                    }
                }
            }
            () = tokio::time::sleep_until(next_sweep) => {
                sweep_wait = match agent.sweep_endpoint_filter() {
                    Some(sweep) if sweep.flows_scanned > 0 && sweep.lines_written == 0 => {
                        (sweep_wait * 2).min(FILTER_SWEEP_MAX)
                    }
                    _ => FILTER_SWEEP,
                };
                next_sweep = tokio::time::Instant::now() + sweep_wait;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping; the datapath stays pinned at {} for the next agent", config.pin_path.display());
    Ok(())
}

impl Agent {
    /// Destroys the connected UDP sockets the socket hooks sent to a
    /// backend that has left their frontend (`lost`): they are connected to
    /// the backend itself, so no conntrack cleanup can move them. The
    /// application sees ECONNABORTED and makes a new socket, which gets a
    /// live backend.
    /// `cookies` and `backends` from `plan::udp_sockets_to_destroy`.
    fn destroy_udp_sockets(&self, cookies: BTreeSet<u64>, backends: BTreeSet<SocketAddr>) {
        if cookies.is_empty() {
            return;
        }
        let destroyed = if self.sockets_of_all_netns {
            crate::sock_destroy::destroy_udp_sockets_in_every_netns(&backends, &cookies)
        } else {
            crate::sock_destroy::destroy_udp_sockets_to(&backends, Some(&cookies))
        };
        match destroyed {
            Ok(sockets) => debug!(sockets, "destroyed connected UDP sockets of removed backends"),
            Err(e) => warn!("destroying connected UDP sockets of removed backends: {e}"),
        }
    }

    /// Applies the source's changes to the model and brings the maps to
    /// it; false when a map write failed. `files`: where the objects were
    /// read, to name in errors.
    fn sync(&mut self, changes: Changes, files: Option<&DirSource>) -> bool {
        let started = Instant::now();
        let changed = self.kept_model.update(changes, &self.model);
        let modelled = started.elapsed();
        let duplicates = files.into_iter().flat_map(DirSource::duplicates).map(|(object, ignored, kept)| {
            format!("{}: {object}: also defined in {}; this copy is ignored", ignored.display(), kept.display())
        });
        let errors = self.kept_model.errors();
        let object_errors = errors.iter().map(|e| {
            let file =
                files.and_then(|f| f.origin(&e.object)).map(|p| format!("{}: ", p.display())).unwrap_or_default();
            format!("{file}{e}")
        });
        let mut reported = BTreeSet::new();
        for line in duplicates.chain(object_errors) {
            if !self.reported.contains(&line) {
                error!("{line}");
            }
            reported.insert(line);
        }
        self.reported = reported;

        let frontends = self.kept_model.desired().len();
        // One reconciler per family, each over its own maps: the IPv6 one
        // plans the IPv6 frontends, the IPv4 one the rest.
        let touched = (!changed.all).then_some(&changed.frontends);
        let step = self.reconciler.prepare(self.kept_model.desired(), touched);
        let step6 = self.reconciler6.prepare(self.kept_model.desired(), touched);
        let targeted = started.elapsed();
        self.fit_maps(&step, &step6);
        let node_addresses = &self.model.node_addresses;
        let node_ports_touched = self.node_ports.is_none()
            || changed.all
            || changed.frontends.iter().any(|f| node_addresses.contains(&f.addr));
        // The NodePorts this sync serves, for the bind hooks (NODE_PORTS).
        let node_ports =
            node_ports_touched.then(|| crate::plan::node_ports(self.kept_model.desired().values().map(AsRef::as_ref)));
        if let Some(wanted) = &node_ports {
            self.claim_node_ports(wanted);
        }
        let fitted = started.elapsed();
        let synced = self.reconciler.sync_step(&step, &mut self.datapath.maps);
        // IPv6 frontends go only into awake maps: written into dormant ones
        // (a wake that failed), they would hold flows a later wake would
        // have to drop. The sync fails instead, and is retried.
        let synced6 = if self.ipv6_wanted(&step6) && !self.datapath.maps.ipv6_awake() {
            Err("the IPv6 maps could not be made ready (see the error growing the maps); IPv6 frontends wait"
                .to_owned())
        } else {
            self.reconciler6.sync_step(&step6, &mut self.datapath.maps).map_err(|e| e.to_string())
        };
        let failed = synced.is_err() || synced6.is_err();
        if !failed {
            // The maps hold every change seen so far: /healthz says so now,
            // not after the follow-ups below (NODE_PORTS, UDP flow cleanup,
            // affinity pruning), which take tens of ms on a first sync and
            // longer on a busy node.
            self.health.updated();
        }
        let took = started.elapsed();
        // Each family's follow-ups come from its own outcome: one family
        // failing holds back none of the other's. A family that failed is
        // read back from its maps: the retry carries on from what is
        // really there.
        let mut writes = 0;
        match synced {
            Ok(outcome) => {
                writes += outcome.writes;
                if !outcome.lost_udp_backends.is_empty() {
                    let flows = self.datapath.maps.forget_udp_flows(&outcome.lost_udp_backends);
                    debug!(flows, "forgot UDP flows of removed backends");
                    let entries = self.datapath.maps.sock_revnat.iter().filter_map(Result::ok);
                    let lost = &outcome.lost_udp_backends;
                    let (cookies, backends) =
                        crate::plan::udp_sockets_to_destroy(entries, lost, self.reconciler.current());
                    self.destroy_udp_sockets(cookies, backends);
                }
                // The next sync computes only what changed from this.
                self.reconciler.remember();
            }
            Err(e) => {
                error!("sync failed: {e}");
                if let Ok(actual) = self.datapath.maps.read_contents() {
                    self.reconciler = Reconciler::new(actual, self.maglev);
                }
            }
        }
        match synced6 {
            Ok(outcome6) => {
                writes += outcome6.writes;
                if !outcome6.lost_udp_backends.is_empty() {
                    let flows = self.datapath.maps.forget_udp_flows6(&outcome6.lost_udp_backends);
                    debug!(flows, "forgot IPv6 UDP flows of removed backends");
                    if let Some(ipv6) = &self.datapath.maps.ipv6 {
                        let entries = ipv6.sock_revnat.iter().filter_map(Result::ok);
                        let lost = &outcome6.lost_udp_backends;
                        let after = self.reconciler6.current();
                        let (cookies, backends) = crate::plan::udp_sockets_to_destroy(entries, lost, after);
                        self.destroy_udp_sockets(cookies, backends);
                    }
                }
                self.reconciler6.remember();
            }
            Err(e) => {
                error!("sync failed (IPv6): {e}");
                if let Ok(actual) = self.datapath.maps.read_contents6() {
                    self.reconciler6 = Reconciler::new(actual, self.maglev);
                }
            }
        }
        if failed {
            self.metrics.sync_failures.inc();
        } else {
            self.metrics.record_sync(took);
        }
        self.metrics.frontends.set(frontends as i64);
        let backends = self.reconciler.current().backends.len() + self.reconciler6.current().backends.len();
        self.metrics.backends.set(backends as i64);
        let (held, held6) = (Entries::held(self.reconciler.current()), Entries::held(self.reconciler6.current()));
        self.metrics.set_agent_map_entries(&held, &held6);
        self.record_endpoint_filter_fill();
        self.observe_programming_latency(&changed.slice_triggers);
        self.health_checks.update(&self.kept_model.health_checks());
        if let Some(wanted) = node_ports {
            self.sync_node_ports(wanted);
        }
        if writes > 0 {
            match self.datapath.maps.prune_affinity(self.reconciler.current(), self.reconciler6.current()) {
                0 => {}
                n => debug!(entries = n, "pruned session affinity"),
            }
        }
        if failed {
            // The model has taken this sync's changes: the retry, which may
            // see none, reads NODE_PORTS afresh and rewrites it.
            self.node_ports = None;
            return false;
        }
        // A large sync (the first, say) leaves freed memory that the
        // allocator keeps for reuse; give it back.
        if took > Duration::from_millis(100) {
            release_free_memory();
        }
        // The first sync says whether adopted maps were already right.
        if writes > 0 || !std::mem::replace(&mut self.synced_once, true) || took > Duration::from_millis(100) {
            // Where the time went: the model of every object, the target
            // contents, sizing, then plan and writes.
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            info!(
                frontends,
                writes,
                took_ms = took.as_millis() as u64,
                model_ms = ms(modelled),
                target_ms = ms(targeted - modelled),
                sizing_ms = ms(fitted - targeted),
                write_ms = ms(took - fitted),
                "synced"
            );
        } else {
            debug!(frontends, "synced, nothing to write");
        }
        true
    }

    /// Whether the IPv6 maps hold, or `step6` writes, IPv6 entries: then
    /// they must be awake.
    fn ipv6_wanted(&self, step6: &Step<Ipv6>) -> bool {
        !step6.target().services.is_empty() || !self.reconciler6.current().services.is_empty()
    }

    /// Clears the ENDPOINT_FILTER bits no map entry and no live flow needs.
    fn sweep_endpoint_filter(&mut self) -> Option<crate::datapath::FilterSweep> {
        let started = Instant::now();
        let swept = self.datapath.maps.sweep_endpoint_filter(self.reconciler.current(), self.reconciler6.current());
        self.record_endpoint_filter_fill();
        match swept {
            Ok(sweep) => {
                if sweep.lines_written > 0 || sweep.flows_scanned > 0 {
                    debug!(
                        flows_scanned = sweep.flows_scanned,
                        lines_written = sweep.lines_written,
                        took_ms = started.elapsed().as_millis() as u64,
                        "swept the endpoint filter"
                    );
                }
                Some(sweep)
            }
            Err(e) => {
                warn!("sweeping the endpoint filter: {e}");
                None
            }
        }
    }

    /// How full ENDPOINT_FILTER is, for `lb_map_entries`/`lb_map_capacity`.
    fn record_endpoint_filter_fill(&mut self) {
        if let Some((set, bits)) = self.datapath.maps.endpoint_filter_fill() {
            self.metrics.set_endpoint_filter_fill(set, bits);
        }
    }

    /// Brings NODE_PORTS to `wanted`, the NodePorts served, for the bind hooks.
    fn sync_node_ports(&mut self, wanted: BTreeMap<u16, u8>) {
        let before = match self.node_ports.take() {
            Some(before) => Ok(before),
            None => self.datapath.maps.node_ports(),
        };
        match before.and_then(|before| self.datapath.maps.write_node_ports(&before, &wanted)) {
            Ok(()) => self.node_ports = Some(wanted),
            Err(e) => warn!("updating the NodePorts that binds may not take: {e}"),
        }
    }

    /// Before a sync's map writes: the NodePorts it serves take their bits
    /// (those it stops serving keep theirs until `sync_node_ports`), so
    /// that a host bind the port would clash with fails from the moment
    /// the frontend takes the port's traffic, not from after the sync.
    /// Without the agent's copy of NODE_PORTS, only those ports are read:
    /// the whole map is 65,536 reads, which would hold back the writes.
    fn claim_node_ports(&mut self, wanted: &BTreeMap<u16, u8>) {
        let held = match &self.node_ports {
            Some(all) => Ok(all.clone()),
            None => self.datapath.maps.node_ports_at(wanted.keys().copied()),
        };
        let claimed = held.and_then(|held| {
            let mut claimed = held.clone();
            for (port, bits) in wanted {
                *claimed.entry(*port).or_insert(0) |= bits;
            }
            self.datapath.maps.write_node_ports(&held, &claimed).map(|()| claimed)
        });
        match claimed {
            Ok(claimed) => {
                if self.node_ports.is_some() {
                    self.node_ports = Some(claimed);
                }
            }
            Err(e) => {
                warn!("claiming the NodePorts that binds may not take: {e}");
                self.node_ports = None;
            }
        }
    }

    /// Makes room for a sync to `step` and `step6`: grows the agent-written
    /// maps that cannot hold it (old and new entries side by side, as
    /// mid-sync) unless sizes are fixed, wakes dormant IPv6 maps before
    /// the first IPv6 frontend is written (even with fixed sizes: at the
    /// flags' sizes), and warns once when a map passes 90 %. A sync that
    /// still does not fit fails on the full map, naming it.
    fn fit_maps(&mut self, step: &Step, step6: &Step<Ipv6>) {
        let ipv6 = match (self.datapath.maps.ipv6_awake(), self.ipv6_wanted(step6)) {
            (true, _) => Ipv6Maps::Awake,
            (false, true) => Ipv6Maps::Waking,
            (false, false) => Ipv6Maps::Dormant,
        };
        // Awake, both families' maps have one size: room for the larger need.
        let needed = match ipv6 {
            Ipv6Maps::Dormant => self.reconciler.needed(step),
            Ipv6Maps::Waking | Ipv6Maps::Awake => self.reconciler.needed(step).most(&self.reconciler6.needed(step6)),
        };
        let mut capacity = match self.datapath.maps.capacity() {
            Ok(capacity) => capacity,
            Err(e) => return warn!("reading the maps' sizes: {e}"),
        };
        let resized = if self.fixed_map_sizes {
            // No growth; a wake keeps every Service map's size.
            (ipv6 == Ipv6Maps::Waking)
                .then(|| sizing::grown(&capacity, &Entries::default(), &self.map_floors, ipv6))
                .flatten()
        } else {
            sizing::grown(&capacity, &needed, &self.map_floors, ipv6)
        };
        if let Some(sizes) = resized {
            let started = Instant::now();
            match self.datapath.grow(sizes) {
                Ok(unmoved) => {
                    for what in unmoved {
                        warn!("after growing the maps, left on the previous maps until attached again: {what}");
                    }
                    info!(
                        services = sizes.services,
                        backends = sizes.backends,
                        source_ranges = sizes.source_ranges,
                        needed_services = needed.services,
                        needed_backends = needed.backends,
                        ipv6_woken = ipv6 == Ipv6Maps::Waking,
                        took_ms = started.elapsed().as_millis() as u64,
                        "maps grown for the cluster, traffic kept on its conntrack entries"
                    );
                }
                Err(e) => error!("growing the maps failed; syncing into the maps there are: {e}"),
            }
            capacity = self.datapath.maps.capacity().unwrap_or(capacity);
        }
        let full: BTreeSet<&'static str> = sizing::nearly_full(&capacity, &needed)
            .into_iter()
            .map(|(map, entries, room)| {
                if !self.nearly_full.contains(map) {
                    let what = if self.fixed_map_sizes {
                        "raise its --*-max-entries flag (sizes are fixed by --fixed-map-sizes)"
                    } else {
                        "it grows when a sync needs more"
                    };
                    warn!(map, entries, capacity = room, "map over 90% full: {what}");
                }
                map
            })
            .collect();
        self.nearly_full = full;
    }

    /// Time from each EndpointSlice change not yet counted to now.
    fn observe_programming_latency(&mut self, triggers: &[SystemTime]) {
        let now = SystemTime::now();
        let mut newest = self.newest_trigger;
        for &trigger in triggers {
            if trigger > self.newest_trigger {
                let latency = now.duration_since(trigger).unwrap_or_default();
                self.metrics.programming_duration.observe(latency.as_secs_f64());
                newest = newest.max(trigger);
            }
        }
        self.newest_trigger = newest;
    }
}

/// Returns the allocator's free memory to the kernel: after the first sync
/// at 30,000 Services that is a third of the resident set.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Which interfaces get which program, and what failed to attach.
struct Interfaces {
    pod: PodInterfaces,
    external: ExternalInterfaces,
    external_datapath: ExternalDatapath,
    nodeport_addresses: Vec<Cidr>,
    /// Attachments that failed, by hook and ifindex: the interface's name
    /// and the error. Logged once each, and reported as degraded.
    failed: BTreeMap<(Hook, u32), (String, String)>,
}

impl Interfaces {
    /// Attaches to new pod and external interfaces and detaches from
    /// interfaces no longer external; returns the node addresses now
    /// (`known` when they cannot be read). An interface holding a node
    /// address is external, never a pod interface.
    fn refresh(&mut self, datapath: &mut Datapath, known: &[IpAddr], health: &Health) -> Vec<IpAddr> {
        let (present, addresses) = match (interfaces::list(), interfaces::addresses()) {
            (Ok(list), Ok(addresses)) => (list, addresses),
            (Err(e), _) | (_, Err(e)) => {
                warn!("cannot list interfaces: {e}");
                return known.to_vec();
            }
        };
        let node_addresses = interfaces::node_addresses(&addresses, &self.nodeport_addresses);
        // Interfaces are told apart by their IPv4 addresses, as before IPv6
        // was served: an IPv6 address on a pod's host veth (some CNIs put a
        // gateway there), or on a tunnel or a management NIC with SLAAC,
        // must not turn it into an external interface (XDP's attach resets
        // a NIC's queues). An IPv6-only uplink is named with
        // --external-interfaces.
        let ipv4: Vec<(String, IpAddr)> = addresses.iter().filter(|(_, a)| a.is_ipv4()).cloned().collect();
        let node_ipv4: Vec<IpAddr> = node_addresses.iter().filter(|a| a.is_ipv4()).copied().collect();
        for name in datapath.forget_vanished(&present) {
            info!(interface = %name, "interface gone");
        }
        self.failed.retain(|(_, index), _| present.iter().any(|i| i.index == *index));
        for interface in &present {
            let external = self.external.selects(interface, &node_ipv4, &ipv4);
            let (hook, why) = if external {
                match self.external_datapath.choose(interfaces::driver(&interface.name).ok().as_deref()) {
                    WireChoice::Tc(why) => (Hook::WireTc, why),
                    WireChoice::Xdp(why) => (Hook::WireXdp, why),
                }
            } else if self.pod.selects(interface) && !ipv4.iter().any(|(name, _)| *name == interface.name) {
                (Hook::Pod, "pod interface")
            } else {
                for hook in [Hook::WireTc, Hook::WireXdp] {
                    if datapath.is_attached(hook, interface) && datapath.detach(hook, interface) {
                        info!(interface = %interface.name, program = hook.program(), "no longer external: detached");
                    }
                }
                continue;
            };
            if datapath.is_attached(hook, interface) {
                continue;
            }
            match datapath.attach(hook, interface) {
                Ok(()) => {
                    self.failed.remove(&(hook, interface.index));
                    allow_local_source(&interface.name);
                    info!(interface = %interface.name, program = hook.program(), reason = why, "attached");
                    // The other external program, if an earlier agent (or
                    // another --external-datapath) attached it, goes only
                    // now: no packet passed untranslated in between.
                    let other = [Hook::WireTc, Hook::WireXdp].into_iter().filter(|h| hook.is_external() && *h != hook);
                    for other in other {
                        if datapath.detach(other, interface) {
                            info!(interface = %interface.name, program = other.program(), "replaced: detached");
                        }
                    }
                }
                Err(e) => {
                    let failure = (interface.name.clone(), e.to_string());
                    if self.failed.insert((hook, interface.index), failure).is_none() {
                        warn!("{e}; retrying");
                    } else {
                        debug!("{e}; retrying");
                    }
                }
            }
        }
        let failures = self.failed.iter().map(|((hook, _), (name, error))| {
            let hook = match hook {
                Hook::Pod => "pod",
                Hook::WireTc | Hook::WireXdp => "external",
            };
            (format!("{FEATURE_INTERFACE}{name} ({hook})"), error.clone())
        });
        health.set_degraded_group(FEATURE_INTERFACE, failures.collect());
        node_addresses
    }
}

/// Lets the stack forward frames that arrive on an interface we translate
/// with this node's own address as their source, which it would otherwise
/// drop as martians: a pod's reply to a NodePort client, translated back at
/// the pod interface, comes from the node address; and an SNATed frame an
/// external program passes to the stack (XDP without a neighbour entry yet,
/// say) does too.
fn allow_local_source(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        warn!("{path}: {e}; NodePort traffic to other nodes may stall until their neighbour entries exist");
    }
}
