//! /healthz, /livez and /metrics, with kube-proxy's names and semantics.
//!
//! Health: unhealthy until the first sync; afterwards unhealthy only while a
//! change has been waiting longer than the timeout without a sync (kube-proxy
//! `ProxierHealthServer`). The body is JSON either way. A feature that does
//! not work (socket-level balancing, a program on one interface) leaves the
//! node healthy, since the rest still serves, and is listed in the body's
//! `degraded` and in the `lb_degraded` metric.
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::datapath::Maps;

struct HealthState {
    last_updated: Option<SystemTime>,
    queued_since: Option<Instant>,
    node_eligible: bool,
    /// Features that do not work, with why.
    degraded: BTreeMap<String, String>,
}

pub struct Health {
    state: Mutex<HealthState>,
    timeout: Duration,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        let state =
            HealthState { last_updated: None, queued_since: None, node_eligible: true, degraded: BTreeMap::new() };
        Self { state: Mutex::new(state), timeout }
    }

    /// Whether this node should get load-balancer traffic (see
    /// `kube_source::node_eligible`); /healthz fails while it should not.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state.lock().expect("health lock").node_eligible = eligible;
    }

    /// Records that `feature` does not work (with why), or works again.
    pub fn set_degraded(&self, feature: &str, reason: Option<String>) {
        let mut s = self.state.lock().expect("health lock");
        match reason {
            Some(reason) => s.degraded.insert(feature.to_owned(), reason),
            None => s.degraded.remove(feature),
        };
    }

    /// Replaces the degraded features named `prefix...` with `now`.
    pub fn set_degraded_group(&self, prefix: &str, now: BTreeMap<String, String>) {
        let mut s = self.state.lock().expect("health lock");
        s.degraded.retain(|feature, _| !feature.starts_with(prefix));
        s.degraded.extend(now);
    }

    pub fn degraded(&self) -> BTreeMap<String, String> {
        self.state.lock().expect("health lock").degraded.clone()
    }

    /// A change arrived that the datapath does not have yet.
    pub fn queued(&self) {
        let mut s = self.state.lock().expect("health lock");
        s.queued_since.get_or_insert_with(Instant::now);
    }

    /// The datapath now holds every change seen so far.
    pub fn updated(&self) {
        let mut s = self.state.lock().expect("health lock");
        s.last_updated = Some(SystemTime::now());
        s.queued_since = None;
    }

    /// (healthy, JSON body). /livez asks with `for_load_balancers` false:
    /// a node being drained is alive, only not a target.
    pub fn check(&self, for_load_balancers: bool) -> (bool, String) {
        let s = self.state.lock().expect("health lock");
        let synced = s.last_updated.is_some() && s.queued_since.is_none_or(|q| q.elapsed() < self.timeout);
        let healthy = synced && (s.node_eligible || !for_load_balancers);
        let stamp =
            |t: SystemTime| k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default();
        let body = serde_json::json!({
            "lastUpdated": s.last_updated.map(stamp).unwrap_or_default(),
            "currentTime": stamp(SystemTime::now()),
            "nodeEligible": s.node_eligible,
            "degraded": s.degraded,
        });
        (healthy, body.to_string())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabel {
    feature: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachmentLabel {
    interface: String,
    program: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub programming_duration: Histogram,
    pub sync_failures: Counter,
    pub frontends: Gauge,
    pub backends: Gauge,
    packets: Family<VerdictLabel, Counter>,
    bytes: Family<VerdictLabel, Counter>,
    conntrack_entries: Gauge,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    degraded: Family<FeatureLabel, Gauge>,
    attachments: Family<AttachmentLabel, Gauge>,
    /// Totals last read from COUNTERS, to turn them into counter increments.
    seen: Mutex<Vec<(u64, u64)>>,
    pin_path: PathBuf,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18)
}

impl Metrics {
    pub fn new(pin_path: PathBuf) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(seconds_buckets());
        let programming_duration = Histogram::new(seconds_buckets());
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let (sync_failures, frontends, backends) = (Counter::default(), Gauge::default(), Gauge::default());
        let (packets, bytes) = (Family::default(), Family::default());
        let conntrack_entries = Gauge::default();
        let (map_entries, map_capacity) = (Family::default(), Family::default());
        let (degraded, attachments) = (Family::default(), Family::default());
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time to compute and write the datapath maps for one sync",
            sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last successful sync finished (Unix time)",
            last_sync.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from an EndpointSlice change (its last-change-trigger-time) to the datapath holding it",
            programming_duration.clone(),
        );
        registry.register("lb_sync_failures", "Syncs that failed to write the maps", sync_failures.clone());
        registry.register(
            "lb_service_frontends",
            "Frontends (cluster IP, port, protocol) in the datapath",
            frontends.clone(),
        );
        registry.register("lb_backends", "Backends in the datapath", backends.clone());
        registry.register("lb_datapath_packets", "Packets seen by the datapath, by verdict", packets.clone());
        registry.register("lb_datapath_bytes", "Bytes seen by the datapath, by verdict", bytes.clone());
        registry.register(
            "lb_conntrack_entries",
            "Entries in the connection-tracking maps of both families (two per flow)",
            conntrack_entries.clone(),
        );
        registry.register(
            "lb_map_entries",
            "Entries in each datapath map (the agent's after its last sync; the datapath's counted at scrape)",
            map_entries.clone(),
        );
        registry.register(
            "lb_map_capacity",
            "Maximum entries of each datapath map, as the kernel has it",
            map_capacity.clone(),
        );
        registry.register(
            "lb_degraded",
            "Features that do not work (socket_lb, or an interface's program), 1 each; the rest still serves",
            degraded.clone(),
        );
        registry.register(
            "lb_interface_program",
            "The program serving each interface (tc_from_pod, tc_from_wire or xdp_from_wire), 1 each",
            attachments.clone(),
        );
        Self {
            registry,
            sync_duration,
            last_sync,
            programming_duration,
            sync_failures,
            frontends,
            backends,
            packets,
            bytes,
            conntrack_entries,
            map_entries,
            map_capacity,
            degraded,
            attachments,
            seen: Mutex::new(vec![(0, 0); lb_common::counter::COUNT as usize]),
            pin_path,
        }
    }

    pub fn record_sync(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    /// The agent-written maps' entries after a sync, each family's under
    /// its maps' names (counting them at scrape would walk SERVICES,
    /// hundreds of thousands of entries).
    pub fn set_agent_map_entries(&self, entries: &crate::sizing::Entries, entries6: &crate::sizing::Entries) {
        for (map, n) in entries.by_map().into_iter().chain(entries6.by_map6()) {
            self.map_entries.get_or_create(&MapLabel { map }).set(n as i64);
        }
    }

    /// ENDPOINT_FILTER's bits set and bits in all, as map entries and
    /// capacity (from the agent's copy: counting at scrape would read the
    /// whole map).
    pub fn set_endpoint_filter_fill(&self, set: u64, bits: u64) {
        let map = lb_common::MAP_ENDPOINT_FILTER;
        self.map_entries.get_or_create(&MapLabel { map }).set(i64::try_from(set).unwrap_or(i64::MAX));
        self.map_capacity.get_or_create(&MapLabel { map }).set(i64::try_from(bits).unwrap_or(i64::MAX));
    }

    /// Reads the datapath's counters from the pinned maps and the degraded
    /// features from `health`, then encodes all.
    fn render(&self, health: &Health) -> String {
        self.degraded.clear();
        for feature in health.degraded().into_keys() {
            self.degraded.get_or_create(&FeatureLabel { feature }).set(1);
        }
        self.attachments.clear();
        for a in crate::datapath::pinned_attachments(&self.pin_path) {
            self.attachments.get_or_create(&AttachmentLabel { interface: a.interface, program: a.program }).set(1);
        }
        if let Ok(maps) = Maps::open_pinned(&self.pin_path) {
            if let Ok(totals) = maps.counters() {
                let mut seen = self.seen.lock().expect("metrics lock");
                for ((name, total), last) in lb_common::counter::NAMES.iter().zip(totals).zip(seen.iter_mut()) {
                    let label = VerdictLabel { verdict: name };
                    self.packets.get_or_create(&label).inc_by(total.packets.saturating_sub(last.0));
                    self.bytes.get_or_create(&label).inc_by(total.bytes.saturating_sub(last.1));
                    *last = (total.packets, total.bytes);
                }
            }
            let mut conntrack = 0;
            for (map, n) in maps.traffic_entries() {
                if map == lb_common::MAP_CONNTRACK || map == lb_common::MAP_CONNTRACK6 {
                    conntrack += n;
                }
                self.map_entries.get_or_create(&MapLabel { map }).set(n as i64);
            }
            self.conntrack_entries.set(conntrack as i64);
            for (map, capacity) in maps.capacities().unwrap_or_default() {
                self.map_capacity.get_or_create(&MapLabel { map }).set(i64::from(capacity));
            }
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Answers GET requests on `addr` until the process ends.
pub async fn serve(listener: TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let Some(path) = read_request_path(&mut stream).await else { return };
            let (status, content_type, body) = match path.as_str() {
                "/healthz" | "/livez" => {
                    let (healthy, body) = health.check(path == "/healthz");
                    (if healthy { "200 OK" } else { "503 Service Unavailable" }, "application/json", body)
                }
                "/metrics" => {
                    // Reading the maps walks CONNTRACK (hundreds of
                    // thousands of entries): off this thread, so that a
                    // scrape never delays a probe.
                    let render = tokio::task::spawn_blocking(move || metrics.render(&health));
                    let body = render.await.unwrap_or_default();
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            respond(&mut stream, status, content_type, &body).await;
        });
    }
}

/// Reads an HTTP request head and returns its path, without the query.
pub(crate) async fn read_request_path(stream: &mut TcpStream) -> Option<String> {
    let mut request = vec![0u8; 4096];
    let mut len = 0;
    while !request[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < request.len() {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request[len..])).await {
            Ok(Ok(n)) if n > 0 => len += n,
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&request[..len]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    Some(path.split('?').next().unwrap_or(path).to_owned())
}

/// Writes a whole HTTP/1.1 response and closes the exchange.
pub(crate) async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!("status endpoint: {e}");
    }
}

/// Binds a status listener, naming the flag when it fails.
/// A runtime on a thread of its own for everything that answers the
/// outside: /healthz, /livez, /metrics and the health-check node ports.
/// The agent's own thread spends whole syncs (hundreds of milliseconds at
/// tens of thousands of Services) without yielding; kubelet probes and
/// cloud load balancers must not wait for them. Returns its handle; the
/// thread lives as long as the process.
pub fn serving_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("lb-serving".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Binds `addr` for `flag` on the runtime of `handle` (the serving one),
/// as `listen` does.
pub fn bind_on(handle: &tokio::runtime::Handle, flag: &str, addr: SocketAddr) -> anyhow::Result<Vec<TcpListener>> {
    listen(handle, addr).map_err(|e| anyhow::anyhow!("{flag} {addr}: {e}"))
}

/// Listeners on `addr`, on the runtime of `handle`, taken as given (an
/// operator's `0.0.0.0` stays IPv4, as kube-proxy's flags have it), but
/// `[::]` is both families, for clients (load balancers, kubelets) of
/// either: it takes IPv4 too unless the host says otherwise
/// (net.ipv6.bindv6only), and then has `0.0.0.0` beside it; on a node
/// without IPv6 it is `0.0.0.0` alone.
pub fn listen(handle: &tokio::runtime::Handle, addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
    let port = addr.port();
    let ipv4 = || std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
    let listeners = if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match std::net::TcpListener::bind(addr) {
            Ok(ipv6) if ipv6_only(&ipv6) => vec![ipv6, ipv4()?],
            Ok(ipv6) => vec![ipv6],
            // No IPv6 on this node (disabled, or no address family).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)) => vec![ipv4()?],
            Err(e) => return Err(e),
        }
    } else {
        vec![std::net::TcpListener::bind(addr)?]
    };
    let _serving = handle.enter();
    listeners
        .into_iter()
        .map(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .collect()
}

/// Whether an IPv6 socket takes IPv6 connections only.
fn ipv6_only(listener: &std::net::TcpListener) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` outlive the call, which writes at most
    // `len` bytes to `value`.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && value != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_kube_proxy_semantics() {
        let health = Health::new(Duration::from_millis(50));
        assert!(!health.check(true).0, "unhealthy before the first sync");
        health.updated();
        assert!(health.check(true).0);
        health.set_node_eligible(false);
        assert!(!health.check(true).0, "/healthz fails for a node being removed");
        assert!(health.check(false).0, "/livez does not");
        health.set_node_eligible(true);
        health.queued();
        assert!(health.check(true).0, "a fresh pending change is fine");
        std::thread::sleep(Duration::from_millis(80));
        let (healthy, body) = health.check(true);
        assert!(!healthy, "a change pending past the timeout is not");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(body["lastUpdated"].as_str().unwrap().ends_with('Z'));
        assert!(body["currentTime"].as_str().unwrap().ends_with('Z'));
        health.updated();
        assert!(health.check(true).0);
    }

    #[test]
    fn a_degraded_feature_is_listed_and_leaves_the_node_healthy() {
        let health = Health::new(Duration::from_secs(10));
        health.updated();
        health.set_degraded("socket_lb", Some("no cgroup v2".into()));
        health.set_degraded_group("interface ", [("interface eth1 (external)".to_owned(), "EBUSY".to_owned())].into());
        let (healthy, body) = health.check(true);
        assert!(healthy, "the rest still serves");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body["degraded"],
            serde_json::json!({"socket_lb": "no cgroup v2", "interface eth1 (external)": "EBUSY"})
        );
        let metrics = Metrics::new("/nonexistent".into());
        assert!(metrics.render(&health).contains("lb_degraded{feature=\"socket_lb\"} 1"));
        // The interface attached after all; the group is replaced whole.
        health.set_degraded_group("interface ", BTreeMap::new());
        health.set_degraded("socket_lb", None);
        assert!(health.degraded().is_empty());
        assert!(!metrics.render(&health).contains("lb_degraded{"), "cleared, not left at 1");
    }
}
