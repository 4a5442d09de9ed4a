//! What the datapath should serve, computed from Kubernetes objects.
//!
//! Pure code: Services and EndpointSlices in, one `ServicePort` per frontend
//! (cluster IP, port, protocol) with its ready backends out, plus an error
//! for every object or field that could not be used. A bad object costs only
//! itself: every other Service is still computed. Both sources (a directory
//! of manifests, the Kubernetes API) feed this same function.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::cidr::Cidr;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services (and their slices) with this label belong to another proxy,
/// unless its value is our `--proxy-name`.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Objects with this label are headless: DNS only, nothing to proxy.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The labels of a Service or slice that say whether kube-proxy handles
/// it: not headless, and no service-proxy-name or ours.
#[derive(Clone, Debug, Default)]
struct ProxyLabels {
    headless: bool,
    proxy_name: Option<String>,
}

impl ProxyLabels {
    fn of(labels: Option<&std::collections::BTreeMap<String, String>>) -> Self {
        Self {
            headless: labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)),
            proxy_name: labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)).cloned(),
        }
    }

    fn is_ours(&self, proxy_name: Option<&str>) -> bool {
        !self.headless && self.proxy_name.as_deref().is_none_or(|name| Some(name) == proxy_name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Parses a Kubernetes `protocol` field; absent means TCP.
    fn from_field(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Err("SCTP is not supported yet".into()),
            other => Err(format!("{other:?} is not a protocol (TCP, UDP or SCTP)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where clients send: a service address (of either family), port and
/// protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Default for Frontend {
    fn default() -> Self {
        Self { addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED), port: 0, protocol: Protocol::Tcp }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.addr, self.port), self.protocol)
    }
}

/// Most backends one frontend can hold: they fill SERVICES slots 1..=count,
/// numbered by a u16. A port with more gets an `ObjectError`, and the
/// planner keeps this many (`plan::target_contents`).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// How clients reach a frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// A cluster IP: only pods and nodes send to it.
    #[default]
    ClusterIp,
    /// A node address and a nodePort.
    NodePort,
    /// An address from `status.loadBalancer.ingress`.
    LoadBalancer,
    /// An address from `spec.externalIPs`.
    ExternalIp,
}

impl FrontendKind {
    /// Reached from outside the cluster: remote backends through SNAT.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

/// One frontend of one Service and the backends that get new connections:
/// backends of the frontend's family (from the slices of that
/// addressType).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name`, for logs and inspection.
    pub name: String,
    pub frontend: Frontend,
    pub kind: FrontendKind,
    pub backends: BTreeSet<SocketAddr>,
    /// The backends that run on this node (a subset of `backends`).
    pub local_backends: BTreeSet<SocketAddr>,
    /// Session affinity (ClientIP) timeout in seconds; 0 is none.
    pub affinity_timeout_s: u32,
    pub algorithm: Algorithm,
    /// loadBalancerSourceRanges: when not empty, only clients inside one of
    /// these get new connections.
    pub source_ranges: Vec<Cidr>,
    /// Without backends, drop rather than refuse: a traffic policy of Local
    /// on a node without local endpoints, while other nodes have some.
    pub drop_when_empty: bool,
    /// For an external frontend with externalTrafficPolicy Local: the
    /// backends that clients inside the cluster (pods, the node) get, as
    /// through the cluster IP. kube-proxy short-circuits them so, since
    /// they need no source address kept and should not depend on a local
    /// endpoint.
    pub internal_backends: Option<BTreeSet<SocketAddr>>,
    /// Why `backends` are fewer than the Service's ready endpoints.
    pub narrowed: Narrowed,
}

/// How a frontend picks a backend for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Uniformly at random.
    #[default]
    Random,
    /// Maglev consistent hashing of the flow: the same flow picks the same
    /// backend on every node and after backend changes, mostly.
    Maglev,
}

/// Per-Service choice of algorithm, overriding `--lb-algorithm`.
pub const ALGORITHM_ANNOTATION: &str = "service.lb.io/lb-algorithm";

/// What the model needs besides the objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelOptions {
    /// Our `--proxy-name`: Services labelled for another proxy are skipped.
    pub proxy_name: Option<String>,
    /// `--lb-algorithm`, for Services without the annotation.
    pub algorithm: Algorithm,
    /// `--node-name`: endpoints whose `nodeName` is this are local.
    pub node_name: String,
    /// This node's `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
    /// The node addresses NodePorts are served on (`--nodeport-addresses`),
    /// of either family: a Service gets NodePorts on those of its families.
    pub node_addresses: Vec<IpAddr>,
    /// `--external-ip-cidrs`: ExternalIPs are honoured only inside these.
    pub external_ip_cidrs: Vec<Cidr>,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// Names a Kubernetes object, the way a user would look for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.namespace.as_str() {
            // Cluster-scoped (a Node).
            "" => write!(f, "{} {}", self.kind, self.name),
            namespace => write!(f, "{} {namespace}/{}", self.kind, self.name),
        }
    }
}

/// The label naming a Node's zone, for zone hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The cluster autoscaler's taint on a node it is about to remove.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What the model and /healthz need of this node's Node object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Whether load balancers should keep sending to this node
    /// (kube-proxy's `nodeEligible`): not when it is being deleted or
    /// drained for deletion.
    pub eligible: bool,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

impl NodeView {
    /// From the Node object; while it is unknown, eligible and in no zone.
    pub fn of(node: Option<&k8s_openapi::api::core::v1::Node>) -> Self {
        let Some(node) = node else { return Self { eligible: true, zone: None } };
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).filter(|z| !z.is_empty()).cloned();
        Self { eligible: node.metadata.deletion_timestamp.is_none() && !tainted, zone }
    }
}

/// An object, or one field of it, that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ObjectError {
    pub object: ObjectRef,
    /// Path of the offending field, such as `spec.ports[1].protocol`.
    pub field: String,
    pub message: String,
}

/// What a Service's healthCheckNodePort answers (kube-proxy's health server
/// for externalTrafficPolicy Local).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Sorted by frontend.
    pub services: Vec<ServicePort>,
    /// By healthCheckNodePort.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub errors: Vec<ObjectError>,
}

/// Names an object; an object without a namespace is in "default", as
/// `kubectl apply` would put it.
pub(crate) fn object_ref(kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind: kind.to_owned(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// A port of a Service, before endpoints are joined.
#[derive(Clone, Debug)]
struct PortSpec {
    /// Index in `spec.ports`, for errors.
    index: usize,
    name: String,
    port: u16,
    protocol: Protocol,
    node_port: Option<u16>,
}

/// An endpoint address with the conditions that decide its use.
#[derive(Clone, Copy, Debug)]
struct EndpointState {
    addr: IpAddr,
    ready: bool,
    /// Serving but terminating: used only when no endpoint is ready.
    serving_terminating: bool,
    /// On this node (`nodeName` is ours).
    local: bool,
    /// Its topology hints (`hints.forNodes`, `hints.forZones`), as seen
    /// from this node.
    node_hint: Hint,
    zone_hint: Hint,
}

/// Whether an endpoint's topology hints name this node (or its zone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hint {
    Absent,
    Elsewhere,
    Here,
}

impl Hint {
    fn of(hints: &[Arc<str>], here: Option<&str>) -> Self {
        match here {
            _ if hints.is_empty() => Hint::Absent,
            Some(here) if !here.is_empty() && hints.iter().any(|h| **h == *here) => Hint::Here,
            _ => Hint::Elsewhere,
        }
    }
}

/// Which endpoints a Service's ready endpoints are narrowed to by their
/// topology hints (kube-proxy's topology mode, `pkg/proxy/topology.go`):
/// this node's when every ready endpoint has node hints and one names this
/// node (PreferSameNode), else this zone's when every ready endpoint has
/// zone hints and one names this node's zone (PreferSameZone, PreferClose,
/// topology-mode Auto), else all. The EndpointSlice controller writes the
/// hints from the Service's trafficDistribution or annotation, so the
/// hints alone decide, as in kube-proxy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topology {
    #[default]
    All,
    SameNode,
    SameZone,
}

impl Topology {
    fn of<'a>(endpoints: impl Iterator<Item = &'a EndpointState>) -> Self {
        let (mut any_ready, mut all_node, mut node_here, mut all_zone, mut zone_here) =
            (false, true, false, true, false);
        for endpoint in endpoints.filter(|e| e.ready) {
            any_ready = true;
            all_node &= endpoint.node_hint != Hint::Absent;
            node_here |= endpoint.node_hint == Hint::Here;
            all_zone &= endpoint.zone_hint != Hint::Absent;
            zone_here |= endpoint.zone_hint == Hint::Here;
        }
        match () {
            _ if !any_ready => Topology::All,
            _ if all_node && node_here => Topology::SameNode,
            _ if all_zone && zone_here => Topology::SameZone,
            _ => Topology::All,
        }
    }

    fn admits(self, endpoint: &EndpointState) -> bool {
        match self {
            Topology::All => true,
            Topology::SameNode => endpoint.node_hint == Hint::Here,
            Topology::SameZone => endpoint.zone_hint == Hint::Here,
        }
    }
}

/// Why a frontend has fewer backends than its Service has ready
/// endpoints, for `lb services`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Narrowed {
    #[default]
    No,
    /// A traffic policy of Local: this node's endpoints.
    PolicyLocal,
    /// Topology hints (`Topology`).
    NodeHints,
    ZoneHints,
}

/// A port of an EndpointSlice, with the endpoints behind it.
#[derive(Clone, Debug)]
struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
    endpoints: Arc<[EndpointState]>,
}

/// An endpoint as its slice says it, before this node is known.
#[derive(Clone, Debug)]
struct SliceEndpoint {
    addr: IpAddr,
    ready: bool,
    serving_terminating: bool,
    /// `nodeName`, shared by every endpoint on that node (`NodeNames`).
    node: Option<Arc<str>>,
    /// Topology hints; None for most endpoints, which have none.
    hints: Option<Box<Hints>>,
}

/// `hints.forNodes` and `hints.forZones` of an endpoint (names shared
/// through `NodeNames`).
#[derive(Clone, Debug, Default)]
struct Hints {
    nodes: Vec<Arc<str>>,
    zones: Vec<Arc<str>>,
}

/// Node names, each held once however many endpoints name it.
#[derive(Default)]
pub struct NodeNames(std::collections::HashSet<Arc<str>>);

impl NodeNames {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        let name: Arc<str> = Arc::from(name);
        self.0.insert(name.clone());
        name
    }
}

/// What the model keeps of an EndpointSlice: read once when it arrives,
/// so the object itself need not be kept. Independent of the options, so
/// new node addresses recompute every Service without the objects.
#[derive(Clone, Debug)]
pub struct ParsedSlice {
    /// The Service it belongs to (namespace, service-name label); None is
    /// an error of the slice.
    owner: Option<Key>,
    labels: ProxyLabels,
    /// (name, protocol, port) of each usable port.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<SliceEndpoint>,
    errors: Vec<ObjectError>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, for the
    /// programming-latency metric.
    trigger: Option<std::time::SystemTime>,
}

impl ParsedSlice {
    /// Reads a slice; bad endpoints and ports are errors of the slice and
    /// left out. FQDN slices are for no proxy: kept without ports.
    pub fn parse(slice: &EndpointSlice, nodes: &mut NodeNames) -> Self {
        let object = object_ref("EndpointSlice", &slice.metadata);
        let mut errors = Vec::new();
        let mut fail =
            |field: String, message: String| errors.push(ObjectError { object: object.clone(), field, message });
        let labels = slice.metadata.labels.as_ref();
        let mut parsed = ParsedSlice {
            owner: None,
            labels: ProxyLabels::of(labels),
            ports: Vec::new(),
            endpoints: Vec::new(),
            errors: Vec::new(),
            trigger: trigger_time(slice),
        };
        let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            fail(format!("metadata.labels[{SERVICE_NAME_LABEL}]"), "missing: the slice belongs to no Service".into());
            parsed.errors = errors;
            return parsed;
        };
        parsed.owner = Some((object.namespace.clone(), service.clone()));
        let family = match slice.address_type.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            // kube-proxy ignores FQDN slices too.
            "FQDN" => return parsed,
            other => {
                fail("addressType".into(), format!("{other:?} is not IPv4, IPv6 or FQDN"));
                parsed.errors = errors;
                return parsed;
            }
        };
        for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
            let Some(first) = endpoint.addresses.first() else {
                fail(format!("endpoints[{i}].addresses"), "empty".into());
                continue;
            };
            let Some(addr) = first.parse::<IpAddr>().ok().filter(|a| IpFamily::of(a) == family) else {
                fail(format!("endpoints[{i}].addresses[0]"), format!("{first:?} is not an {family} address"));
                continue;
            };
            // As kube-proxy reads them: absent ready and serving mean true,
            // absent terminating means false.
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let node = endpoint.node_name.as_deref().map(|n| nodes.get(n));
            let hints = endpoint.hints.as_ref().map(|h| Hints {
                nodes: h.for_nodes.iter().flatten().map(|n| nodes.get(&n.name)).collect(),
                zones: h.for_zones.iter().flatten().map(|z| nodes.get(&z.name)).collect(),
            });
            let hints = hints.filter(|h| !h.nodes.is_empty() || !h.zones.is_empty()).map(Box::new);
            parsed.endpoints.push(SliceEndpoint {
                addr,
                ready,
                serving_terminating: serving && terminating,
                node,
                hints,
            });
        }
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            let protocol = match Protocol::from_field(port.protocol.as_deref()) {
                Ok(p) => p,
                Err(message) => {
                    fail(format!("ports[{i}].protocol"), message);
                    continue;
                }
            };
            let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
                fail(format!("ports[{i}].port"), "missing or not a port (1-65535)".into());
                continue;
            };
            parsed.ports.push((port.name.clone().unwrap_or_default(), protocol, number));
        }
        parsed.errors = errors;
        parsed
    }

    /// Whether kube-proxy would use this slice.
    fn is_ours(&self, proxy_name: Option<&str>) -> bool {
        self.labels.is_ours(proxy_name)
    }

    /// The errors to report: a slice for another proxy is not read, beyond
    /// the label that ties it to a Service.
    fn errors(&self, proxy_name: Option<&str>) -> &[ObjectError] {
        if self.owner.is_none() || self.is_ours(proxy_name) { &self.errors } else { &[] }
    }

    /// Its ports with their endpoints, `local` as seen from `node_name`.
    fn slice_ports(&self, node_name: &str, zone: Option<&str>) -> impl Iterator<Item = SlicePort> + '_ {
        let no_hints = Hints::default();
        let endpoints: Arc<[EndpointState]> = self
            .endpoints
            .iter()
            .map(|e| {
                let hints = e.hints.as_deref().unwrap_or(&no_hints);
                EndpointState {
                    addr: e.addr,
                    ready: e.ready,
                    serving_terminating: e.serving_terminating,
                    local: !node_name.is_empty() && e.node.as_deref() == Some(node_name),
                    node_hint: Hint::of(&hints.nodes, Some(node_name)),
                    zone_hint: Hint::of(&hints.zones, zone),
                }
            })
            .collect();
        self.ports.iter().map(move |(name, protocol, port)| SlicePort {
            name: name.clone(),
            protocol: *protocol,
            port: *port,
            endpoints: endpoints.clone(),
        })
    }
}

/// Unix time of an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`.
pub fn trigger_time(slice: &EndpointSlice) -> Option<std::time::SystemTime> {
    let value = slice.metadata.annotations.as_ref()?.get("endpoints.kubernetes.io/last-change-trigger-time")?;
    let stamp: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    // Before 1970 or past 2554: not a time this agent will see.
    let nanos = u64::try_from(stamp.as_nanosecond()).ok()?;
    Some(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

/// The backends of one service port in one family, as kube-proxy picks them
/// (`CategorizeEndpoints`): ready endpoints, narrowed by their topology
/// hints (`Topology`); when none is ready, those still serving while
/// terminating, whatever their hints, so that a rolling update never
/// leaves a Service without backends. With `local_only` (a traffic policy
/// of Local), only this node's endpoints, and hints do not apply.
struct Picked {
    backends: BTreeSet<SocketAddr>,
    /// The ones on this node (a subset of `backends`).
    local: BTreeSet<SocketAddr>,
    topology: Topology,
}

fn backends_of(slice_ports: &[SlicePort], port: &PortSpec, family: IpFamily, local_only: bool) -> Picked {
    let endpoints: Vec<(SocketAddr, &EndpointState)> = slice_ports
        .iter()
        .filter(|sp| sp.name == port.name && sp.protocol == port.protocol)
        .flat_map(|sp| sp.endpoints.iter().map(|e| (SocketAddr::new(e.addr, sp.port), e)))
        .filter(|(a, _)| IpFamily::of(&a.ip()) == family)
        .collect();
    let topology = if local_only { Topology::All } else { Topology::of(endpoints.iter().map(|(_, e)| *e)) };
    let pick = |wanted: &dyn Fn(&EndpointState) -> bool| -> BTreeSet<(SocketAddr, bool)> {
        endpoints.iter().filter(|(_, e)| (e.local || !local_only) && wanted(e)).map(|(a, e)| (*a, e.local)).collect()
    };
    let ready = pick(&|e| e.ready && topology.admits(e));
    let (picked, topology) =
        if ready.is_empty() { (pick(&|e| e.serving_terminating), Topology::All) } else { (ready, topology) };
    let local = picked.iter().filter(|(_, local)| *local).map(|(b, _)| *b).collect();
    Picked { backends: picked.into_iter().map(|(b, _)| b).collect(), local, topology }
}

/// Whether `spec.<field>` (externalTrafficPolicy, internalTrafficPolicy)
/// is Local; anything but Cluster, Local or absent is an error.
fn policy_is_local(value: Option<&str>, field: &str, fail: &mut impl FnMut(String, String)) -> bool {
    match value {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            fail(format!("spec.{field}"), format!("{other:?} is not Cluster or Local; using Cluster"));
            false
        }
    }
}

/// What one Service asks of the datapath, computed from it and its
/// slices alone (so it can be kept while neither changes): the frontends
/// it claims, its own errors, its health-check node port.
#[derive(Clone, Debug, Default)]
struct ServiceModel {
    /// Frontends in the order claimed, each with the field that claims it
    /// (named when another Service already has the frontend).
    claims: Vec<(ServicePort, String)>,
    errors: Vec<ObjectError>,
    health_check: Option<(u16, HealthCheck)>,
}

/// Computes the desired state of the datapath.
pub fn desired_state<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    options: &ModelOptions,
) -> DesiredState {
    let mut errors = Vec::new();
    let endpoints = endpoints_by_service(
        slices,
        options.proxy_name.as_deref(),
        &options.node_name,
        options.zone.as_deref(),
        &mut errors,
    );
    let mut sorted: Vec<&Service> = services.into_iter().collect();
    sorted.sort_by_cached_key(|s| claimant(s));
    let models: Vec<(ObjectRef, ServiceModel)> = sorted
        .into_iter()
        .map(|service| {
            let object = object_ref("Service", &service.metadata);
            let key = (object.namespace.clone(), object.name.clone());
            let slice_ports = endpoints.get(&key).map(Vec::as_slice).unwrap_or_default();
            (object, model_service(&key, &ParsedService::parse(service), slice_ports, options))
        })
        .collect();
    merge(models.iter().map(|(object, model)| (object, model)), errors)
}

/// A Service (or slice) by namespace and name.
pub type Key = (String, String);

/// How old a Service is, for conflicts: the older one keeps a frontend
/// both claim, so a newcomer never takes traffic from a Service that
/// serves it. Unknown (no creationTimestamp) counts as newest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Age {
    Created(k8s_openapi::jiff::Timestamp),
    Unknown,
}

/// A Service in the order it claims frontends: oldest first, then by
/// namespace and name.
type Claimant = (Age, Key);

fn claimant(service: &Service) -> Claimant {
    let age = service.metadata.creation_timestamp.as_ref().map_or(Age::Unknown, |t| Age::Created(t.0));
    (age, key_of(&service.metadata))
}

/// An object's key: namespace (absent is "default") and name.
pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_else(|| "default".to_owned()), meta.name.clone().unwrap_or_default())
}

/// The objects that changed since the last sync, as the sources report
/// them (kube-proxy's change trackers): the newest state of each, or None
/// for one deleted. A burst of events between syncs becomes one sync, and
/// an object changed many times is computed once.
#[derive(Default)]
pub struct Changes {
    services: HashMap<Key, Option<ParsedService>>,
    slices: HashMap<Key, Option<ParsedSlice>>,
}

impl Changes {
    pub fn service(&mut self, key: Key, now: Option<ParsedService>) {
        self.services.insert(key, now);
    }

    pub fn slice(&mut self, key: Key, now: Option<ParsedSlice>) {
        self.slices.insert(key, now);
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }

    pub fn len(&self) -> usize {
        self.services.len() + self.slices.len()
    }

    /// Folds later changes in: theirs win.
    pub fn extend(&mut self, later: Changes) {
        self.services.extend(later.services);
        self.slices.extend(later.slices);
    }
}

/// A map kept as a sorted vector: the model's inner maps mostly hold one
/// entry (a frontend's claimants, a Service's slices), where a BTreeMap
/// would allocate a whole node for each.
#[derive(Debug)]
struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    fn insert(&mut self, key: K, value: V) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    fn remove(&mut self, key: &K) {
        if let Ok(i) = self.0.binary_search_by(|(k, _)| k.cmp(key)) {
            self.0.remove(i);
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn first(&self) -> Option<&V> {
        self.0.first().map(|(_, v)| v)
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// What changed in the desired state at one `Model::update`.
#[derive(Debug, Default)]
pub struct Changed {
    /// Frontends whose serving Service port is new, different or gone.
    pub frontends: BTreeSet<Frontend>,
    /// Everything may have changed (first update, or new options).
    pub all: bool,
    /// Trigger times of the EndpointSlices that are new or replaced (for
    /// the programming latency of their changes).
    pub slice_triggers: Vec<std::time::SystemTime>,
}

/// What the model keeps of one Service between updates: its errors, the
/// frontends it claims (its ports are in `Model::claims`) and its
/// health-check node port.
#[derive(Default)]
struct ServiceEntry {
    /// Where its claims are filed in `Model::claims`.
    age: Option<Age>,
    errors: Vec<ObjectError>,
    claimed: Vec<Frontend>,
    health_check: Option<u16>,
}

/// The model kept between syncs: `desired_state`'s result, updated from
/// the objects the sources say changed. A Service is computed again when
/// it or one of its slices changed; the frontends it claims are re-decided
/// among their claimants (the oldest Service owns a frontend, as in
/// `merge`). One changed EndpointSlice among 100,000
/// Services costs its Service, and an update without changes nothing.
#[derive(Default)]
pub struct Model {
    options: Option<ModelOptions>,
    /// What the model keeps for each Service key (one map, one copy of
    /// each key: at 30,000 Services each map costs megabytes).
    services: HashMap<Key, ServiceState>,
    /// Every EndpointSlice, as parsed when it arrived (boxed: most of a
    /// table's buckets are empty).
    slices: HashMap<Key, Box<ParsedSlice>>,
    slices_with_errors: BTreeSet<Key>,
    /// Claims on each frontend by Service, oldest first: the first owns it.
    claims: BTreeMap<Frontend, SmallMap<Claimant, (Arc<ServicePort>, String)>>,
    /// A Service's claims on a frontend it already claimed (two ports
    /// alike): errors, like any claim on a frontend someone else has.
    repeated_claims: HashMap<Key, Vec<(Arc<ServicePort>, String)>>,
    /// Health-check node ports by Service, oldest first: the first has it.
    checks: BTreeMap<u16, SmallMap<Claimant, HealthCheck>>,
    /// Keys of the Services whose entries hold errors, and frontends with
    /// more than one claimant: `errors` reads these alone, not every
    /// Service.
    services_with_errors: BTreeSet<Key>,
    shared_frontends: BTreeSet<Frontend>,
    /// The port of the Service owning each frontend (shared with `claims`).
    desired: BTreeMap<Frontend, Arc<ServicePort>>,
}

/// What the model keeps for one Service key.
#[derive(Default)]
struct ServiceState {
    /// The Service, while it exists.
    parsed: Option<ParsedService>,
    /// The slices naming it (they may come before the Service does).
    slices: SmallMap<Key, ()>,
    /// What it asks for, as last computed.
    entry: Option<ServiceEntry>,
}

impl ServiceState {
    fn is_empty(&self) -> bool {
        self.parsed.is_none() && self.slices.is_empty() && self.entry.is_none()
    }
}

fn service_ref(key: &Key) -> ObjectRef {
    ObjectRef { kind: "Service".to_owned(), namespace: key.0.clone(), name: key.1.clone() }
}

impl Model {
    /// Applies the sources' changes (and new options, if they differ) and
    /// says which frontends changed. New options recompute every Service
    /// from what the model keeps.
    pub fn update(&mut self, changes: Changes, options: &ModelOptions) -> Changed {
        let all = self.options.as_ref() != Some(options);
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        if all {
            self.options = Some(options.clone());
            for state in self.services.values_mut() {
                state.entry = None;
            }
            self.claims.clear();
            self.repeated_claims.clear();
            self.checks.clear();
            self.services_with_errors.clear();
            self.shared_frontends.clear();
            self.desired.clear();
            dirty.extend(self.services.iter().filter(|(_, state)| state.parsed.is_some()).map(|(key, _)| key.clone()));
        }
        let mut slice_triggers = Vec::new();
        for (key, now) in changes.slices {
            if let Some(owner) = self.slices.remove(&key).and_then(|old| old.owner) {
                if let Some(state) = self.services.get_mut(&owner) {
                    state.slices.remove(&key);
                }
                dirty.insert(owner);
            }
            self.slices_with_errors.remove(&key);
            let Some(parsed) = now else { continue };
            slice_triggers.extend(parsed.trigger);
            if !parsed.errors.is_empty() {
                self.slices_with_errors.insert(key.clone());
            }
            if let Some(owner) = &parsed.owner {
                self.services.entry(owner.clone()).or_default().slices.insert(key.clone(), ());
                dirty.insert(owner.clone());
            }
            self.slices.insert(key, Box::new(parsed));
        }
        for (key, now) in changes.services {
            self.services.entry(key.clone()).or_default().parsed = now;
            dirty.insert(key);
        }
        let proxy_name = options.proxy_name.as_deref();
        let mut contested = BTreeSet::new();
        for key in dirty {
            self.repeated_claims.remove(&key);
            self.services_with_errors.remove(&key);
            let Some(state) = self.services.get_mut(&key) else { continue };
            if let Some(old) = state.entry.take() {
                let claimant = (old.age.unwrap_or(Age::Unknown), key.clone());
                for frontend in old.claimed {
                    if let Some(claimants) = self.claims.get_mut(&frontend) {
                        claimants.remove(&claimant);
                    }
                    contested.insert(frontend);
                }
                if let Some(port) = old.health_check
                    && let Some(claimants) = self.checks.get_mut(&port)
                {
                    claimants.remove(&claimant);
                }
            }
            let Some(service) = &state.parsed else {
                if state.is_empty() {
                    self.services.remove(&key);
                }
                continue;
            };
            let ports: Vec<SlicePort> = state
                .slices
                .iter()
                .filter_map(|(slice, ())| self.slices.get(slice))
                .filter(|slice| slice.is_ours(proxy_name))
                .flat_map(|slice| slice.slice_ports(&options.node_name, options.zone.as_deref()))
                .collect();
            let model = model_service(&key, service, &ports, options);
            // The ports move to the claims (one copy of each is kept); a
            // Service claiming one frontend twice: its first claim counts.
            let claimant = (service.age, key.clone());
            let mut entry = ServiceEntry { age: Some(claimant.0), errors: model.errors, ..ServiceEntry::default() };
            for (port, field) in model.claims {
                let frontend = port.frontend;
                contested.insert(frontend);
                if entry.claimed.contains(&frontend) {
                    self.repeated_claims.entry(key.clone()).or_default().push((Arc::new(port), field));
                } else {
                    entry.claimed.push(frontend);
                    self.claims.entry(frontend).or_default().insert(claimant.clone(), (Arc::new(port), field));
                }
            }
            if let Some((port, check)) = model.health_check {
                self.checks.entry(port).or_default().insert(claimant.clone(), check);
                entry.health_check = Some(port);
            }
            if !entry.errors.is_empty() {
                self.services_with_errors.insert(key.clone());
            }
            state.entry = Some(entry);
        }
        let mut changed = Changed { all, slice_triggers, ..Changed::default() };
        for frontend in contested {
            let owner = self.claims.get(&frontend).and_then(SmallMap::first).map(|(port, _)| port);
            let now = match owner {
                Some(port) => self.desired.insert(frontend, port.clone()).is_none_or(|old| old != *port),
                None => self.desired.remove(&frontend).is_some(),
            };
            if now {
                changed.frontends.insert(frontend);
            }
            match self.claims.get(&frontend).map(SmallMap::len) {
                Some(0) => {
                    self.claims.remove(&frontend);
                    self.shared_frontends.remove(&frontend);
                }
                Some(1) | None => {
                    self.shared_frontends.remove(&frontend);
                }
                Some(_) => {
                    self.shared_frontends.insert(frontend);
                }
            }
        }
        self.checks.retain(|_, claimants| !claimants.is_empty());
        changed
    }

    /// The Service ports to serve, by frontend.
    pub fn desired(&self) -> &BTreeMap<Frontend, Arc<ServicePort>> {
        &self.desired
    }

    /// Health-check node ports to serve.
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        self.checks.iter().filter_map(|(port, c)| Some((*port, c.first()?.clone()))).collect()
    }

    /// Every object error: slices', Services', and claims on frontends
    /// another Service owns.
    pub fn errors(&self) -> Vec<ObjectError> {
        let proxy_name = self.options.as_ref().and_then(|o| o.proxy_name.as_deref());
        let slices = self.slices_with_errors.iter().filter_map(|key| self.slices.get(key));
        let mut errors: Vec<ObjectError> = slices.flat_map(|s| s.errors(proxy_name)).cloned().collect();
        let services = self.services_with_errors.iter().filter_map(|key| self.services.get(key)?.entry.as_ref());
        errors.extend(services.flat_map(|entry| &entry.errors).cloned());
        let owner = |frontend: &Frontend| self.claims.get(frontend)?.first().map(|(port, _)| port.name.clone());
        let shared = self.shared_frontends.iter().filter_map(|f| self.claims.get(f));
        let losing = shared.flat_map(|c| c.iter().skip(1));
        let repeated = self.repeated_claims.iter().flat_map(|(key, claims)| claims.iter().map(move |c| (key, c)));
        let losing = losing.map(|((_, key), claim)| (key, claim));
        for (key, (port, field)) in losing.chain(repeated) {
            let Some(owner) = owner(&port.frontend) else { continue };
            errors.push(ObjectError {
                object: service_ref(key),
                field: field.clone(),
                message: format!("{} is already served for {owner}", port.frontend),
            });
        }
        errors
    }
}

/// Puts the Services' models together, in order: the first Service (the
/// oldest, see `Claimant`) to claim a frontend has it, and a later one's
/// claim is an error of that one, naming the field.
fn merge<'a>(
    models: impl Iterator<Item = (&'a ObjectRef, &'a ServiceModel)>,
    mut errors: Vec<ObjectError>,
) -> DesiredState {
    let mut by_frontend: BTreeMap<Frontend, ServicePort> = BTreeMap::new();
    let mut health_checks = BTreeMap::new();
    for (object, model) in models {
        errors.extend(model.errors.iter().cloned());
        for (service_port, field) in &model.claims {
            match by_frontend.get(&service_port.frontend) {
                Some(owner) => errors.push(ObjectError {
                    object: object.clone(),
                    field: field.clone(),
                    message: format!("{} is already served for {}", service_port.frontend, owner.name),
                }),
                None => {
                    by_frontend.insert(service_port.frontend, service_port.clone());
                }
            }
        }
        if let Some((port, check)) = &model.health_check {
            health_checks.entry(*port).or_insert_with(|| check.clone());
        }
    }
    DesiredState { services: by_frontend.into_values().collect(), health_checks, errors }
}

/// What the model keeps of a Service: read once when it arrives, so the
/// object itself need not be kept (a k8s-openapi Service is over a
/// kilobyte; this, a few hundred bytes). Independent of the options, like
/// `ParsedSlice`. Its errors are those of fields wrong whatever the node.
#[derive(Clone, Debug)]
pub struct ParsedService {
    age: Age,
    labels: ProxyLabels,
    /// ExternalName: nothing to serve, nothing to report.
    external_name: bool,
    /// No spec: an error whoever serves it.
    spec_missing: bool,
    errors: Vec<ObjectError>,
    /// None when the Service gets no frontend (no usable cluster IP, bad
    /// session affinity, no spec): only its errors count.
    serves: Option<Box<Served>>,
}

/// The fields of a Service that has frontends.
#[derive(Clone, Debug)]
struct Served {
    /// One per family, in spec.ipFamilies order.
    cluster_ips: Vec<IpAddr>,
    ports: Vec<PortSpec>,
    affinity_timeout_s: u32,
    /// The algorithm annotation: a valid choice, or what it wrongly said.
    algorithm: Option<Result<Algorithm, String>>,
    external_local: bool,
    internal_local: bool,
    node_ports: bool,
    /// spec.externalIPs by index, before the allow-list.
    external_ips: Vec<(usize, IpAddr)>,
    /// status.loadBalancer.ingress IPs by index.
    lb_ips: Vec<(usize, IpAddr)>,
    source_ranges: Vec<Cidr>,
    health_check_node_port: Option<u16>,
}

impl ParsedService {
    pub fn parse(service: &Service) -> Self {
        let mut parsed = ParsedService {
            age: claimant(service).0,
            labels: ProxyLabels::of(service.metadata.labels.as_ref()),
            external_name: false,
            spec_missing: false,
            errors: Vec::new(),
            serves: None,
        };
        let object = object_ref("Service", &service.metadata);
        let mut errors = Vec::new();
        let mut fail =
            |field: String, message: String| errors.push(ObjectError { object: object.clone(), field, message });
        let Some(spec) = &service.spec else {
            fail("spec".into(), "missing".into());
            parsed.spec_missing = true;
            parsed.errors = errors;
            return parsed;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            parsed.external_name = true;
            return parsed;
        }
        parsed.serves = (|| {
            let cluster_ips = cluster_ips(spec, &mut fail)?;
            let ports = service_ports(spec, &mut fail);
            let affinity_timeout_s = session_affinity(spec, &mut fail)?;
            let annotation = service.metadata.annotations.as_ref().and_then(|a| a.get(ALGORITHM_ANNOTATION));
            let algorithm = annotation.map(|value| match value.as_str() {
                "random" => Ok(Algorithm::Random),
                "maglev" => Ok(Algorithm::Maglev),
                other => Err(other.to_owned()),
            });
            let external_local =
                policy_is_local(spec.external_traffic_policy.as_deref(), "externalTrafficPolicy", &mut fail);
            let internal_local =
                policy_is_local(spec.internal_traffic_policy.as_deref(), "internalTrafficPolicy", &mut fail);
            let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
            let load_balancer = type_ == "LoadBalancer";
            let external_ips = external_ips(spec, &mut fail);
            let (lb_ips, source_ranges) = if load_balancer {
                (load_balancer_ips(service, &mut fail), source_ranges(spec, &mut fail))
            } else {
                (Vec::new(), Vec::new())
            };
            let health_check_node_port = match spec.health_check_node_port.filter(|_| load_balancer && external_local) {
                None => None,
                Some(port) => match u16::try_from(port).ok().filter(|p| *p != 0) {
                    Some(port) => Some(port),
                    None => {
                        fail("spec.healthCheckNodePort".into(), format!("{port} is not a port (1-65535)"));
                        None
                    }
                },
            };
            Some(Box::new(Served {
                cluster_ips,
                ports,
                affinity_timeout_s,
                algorithm,
                external_local,
                internal_local,
                node_ports: matches!(type_, "NodePort" | "LoadBalancer"),
                external_ips,
                lb_ips,
                source_ranges,
                health_check_node_port,
            }))
        })();
        parsed.errors = errors;
        parsed
    }
}

/// The model of one Service with the endpoints of its slices.
fn model_service(
    key: &Key,
    service: &ParsedService,
    slice_ports: &[SlicePort],
    options: &ModelOptions,
) -> ServiceModel {
    let object = service_ref(key);
    let fail = |errors: &mut Vec<ObjectError>, field: String, message: String| {
        errors.push(ObjectError { object: object.clone(), field, message })
    };
    // A Service without a spec is an error whoever serves it; one for
    // another proxy, or an ExternalName, is nothing of ours.
    let ours = service.labels.is_ours(options.proxy_name.as_deref());
    if service.external_name || (!ours && !service.spec_missing) {
        return ServiceModel::default();
    }
    let mut errors = service.errors.clone();
    let Some(served) = &service.serves else {
        return ServiceModel { errors, ..Default::default() };
    };
    let mut health_check = None;
    let algorithm = match &served.algorithm {
        None => options.algorithm,
        Some(Ok(algorithm)) => *algorithm,
        Some(Err(other)) => {
            fail(
                &mut errors,
                format!("metadata.annotations[{ALGORITHM_ANNOTATION}]"),
                format!("{other:?} is not random or maglev; using {:?}", options.algorithm),
            );
            options.algorithm
        }
    };
    // The families the Service has a cluster IP of: its other addresses
    // (node, external, load-balancer) are served in those only, each with
    // the endpoints of its family, as kube-proxy's per-family proxiers do.
    let families: Vec<IpFamily> = served.cluster_ips.iter().map(IpFamily::of).collect();
    let of_own_family = |errors: &mut Vec<ObjectError>, field: String, addr: &IpAddr| {
        let family = IpFamily::of(addr);
        families.contains(&family) || {
            fail(errors, field, format!("{addr} is {family}, but the Service has no {family} cluster IP; not served"));
            false
        }
    };
    let mut external_ips = Vec::new();
    for (i, addr) in &served.external_ips {
        if !of_own_family(&mut errors, format!("spec.externalIPs[{i}]"), addr) {
            continue;
        }
        if options.external_ip_cidrs.iter().any(|c| c.contains(*addr)) {
            external_ips.push(*addr);
        } else {
            fail(
                &mut errors,
                format!("spec.externalIPs[{i}]"),
                format!("{addr} is outside --external-ip-cidrs; not served"),
            );
        }
    }
    let lb_ips: Vec<IpAddr> = served
        .lb_ips
        .iter()
        .filter(|(i, addr)| of_own_family(&mut errors, format!("status.loadBalancer.ingress[{i}].ip"), addr))
        .map(|(_, addr)| *addr)
        .collect();
    let (external_local, internal_local) = (served.external_local, served.internal_local);
    let mut claims = Vec::new();
    let mut add = |port: &PortSpec, kind: FrontendKind, addr: IpAddr, number: u16| {
        let local_only = if kind.is_external() { external_local } else { internal_local };
        let family = IpFamily::of(&addr);
        let Picked { backends, local: local_backends, topology } = backends_of(slice_ports, port, family, local_only);
        let drop_when_empty =
            local_only && backends.is_empty() && !backends_of(slice_ports, port, family, false).backends.is_empty();
        let internal_backends = (kind.is_external() && external_local)
            .then(|| backends_of(slice_ports, port, family, internal_local).backends);
        let narrowed = match (local_only, topology) {
            (true, _) => Narrowed::PolicyLocal,
            (false, Topology::SameNode) => Narrowed::NodeHints,
            (false, Topology::SameZone) => Narrowed::ZoneHints,
            (false, Topology::All) => Narrowed::No,
        };
        let frontend = Frontend { addr, port: number, protocol: port.protocol };
        // Named in the error of whoever else claims this frontend.
        let field = match kind {
            FrontendKind::ClusterIp => "spec.clusterIP".to_owned(),
            FrontendKind::NodePort => format!("spec.ports[{}].nodePort", port.index),
            FrontendKind::LoadBalancer => "status.loadBalancer.ingress".to_owned(),
            FrontendKind::ExternalIp => "spec.externalIPs".to_owned(),
        };
        // A range of the other family could never match this frontend's
        // clients: only its own family's are kept.
        let source_ranges = match kind {
            FrontendKind::LoadBalancer => {
                served.source_ranges.iter().filter(|r| IpFamily::of(&r.addr) == family).copied().collect()
            }
            _ => Vec::new(),
        };
        let service_port = ServicePort {
            name: format!("{}/{}:{}", object.namespace, object.name, port.name),
            frontend,
            kind,
            backends,
            local_backends,
            affinity_timeout_s: served.affinity_timeout_s,
            algorithm,
            source_ranges,
            drop_when_empty,
            internal_backends,
            narrowed,
        };
        claims.push((service_port, field));
    };
    for port in &served.ports {
        let all = families.iter().map(|f| backends_of(slice_ports, port, *f, false).backends.len()).max().unwrap_or(0);
        if all > MAX_BACKENDS {
            fail(
                &mut errors,
                format!("spec.ports[{}]", port.index),
                format!(
                    "{all} endpoints, but a frontend holds at most {MAX_BACKENDS} backends: those already \
                     in its slots, then the lowest addresses, get new connections; the rest none"
                ),
            );
        }
        for addr in &served.cluster_ips {
            add(port, FrontendKind::ClusterIp, *addr, port.port);
        }
        if let Some(node_port) = port.node_port.filter(|_| served.node_ports) {
            for addr in options.node_addresses.iter().filter(|a| families.contains(&IpFamily::of(a))) {
                add(port, FrontendKind::NodePort, *addr, node_port);
            }
        }
        for addr in &lb_ips {
            add(port, FrontendKind::LoadBalancer, *addr, port.port);
        }
        for addr in &external_ips {
            add(port, FrontendKind::ExternalIp, *addr, port.port);
        }
    }
    if let Some(port) = served.health_check_node_port {
        // A dual-stack pod is an endpoint in each family's slice: counted
        // in the family that has the most.
        let local_endpoints = families
            .iter()
            .map(|family| {
                let local_ready = |e: &&EndpointState| e.local && e.ready && IpFamily::of(&e.addr) == *family;
                let addrs = slice_ports.iter().flat_map(|sp| sp.endpoints.iter().filter(local_ready).map(|e| e.addr));
                addrs.collect::<BTreeSet<_>>().len()
            })
            .max()
            .unwrap_or(0);
        health_check = Some((
            port,
            HealthCheck { namespace: object.namespace.clone(), name: object.name.clone(), local_endpoints },
        ));
    }
    // In field order, whether found reading the Service or applying the
    // options.
    errors.sort_by(|a, b| a.field.cmp(&b.field));
    ServiceModel { claims, errors, health_check }
}

/// `spec.externalIPs`' addresses, by index; the allow-list is the
/// model's (`model_service`), since an ExternalIP lets whoever writes a
/// Service capture traffic to any address (CVE-2020-8554).
fn external_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    fail: &mut impl FnMut(String, String),
) -> Vec<(usize, IpAddr)> {
    let mut addrs = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(addr) => addrs.push((i, addr)),
            Err(_) => fail(format!("spec.externalIPs[{i}]"), format!("{ip:?} is not an IP address")),
        }
    }
    addrs
}

/// The addresses of `status.loadBalancer.ingress`, by index. An ingress whose
/// ipMode is Proxy is reached through the load balancer's own proxy, so
/// it is not served here (as kube-proxy).
fn load_balancer_ips(service: &Service, fail: &mut impl FnMut(String, String)) -> Vec<(usize, IpAddr)> {
    let ingress = service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    let mut addrs = Vec::new();
    for (i, entry) in ingress.into_iter().flatten().enumerate() {
        if entry.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        let Some(ip) = &entry.ip else { continue };
        match ip.parse::<IpAddr>() {
            Ok(addr) => addrs.push((i, addr)),
            Err(_) => fail(format!("status.loadBalancer.ingress[{i}].ip"), format!("{ip:?} is not an IP address")),
        }
    }
    addrs
}

/// `spec.loadBalancerSourceRanges`, of both families (each frontend keeps
/// its own family's). An unparsable entry is reported and skipped.
fn source_ranges(spec: &k8s_openapi::api::core::v1::ServiceSpec, fail: &mut impl FnMut(String, String)) -> Vec<Cidr> {
    let mut ranges = Vec::new();
    for (i, range) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        match range.parse() {
            Ok(cidr) => ranges.push(cidr),
            Err(message) => fail(format!("spec.loadBalancerSourceRanges[{i}]"), message),
        }
    }
    ranges
}

/// The cluster IPs of a Service, one per family; `None` when it gets no
/// datapath entry.
fn cluster_ips(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    fail: &mut impl FnMut(String, String),
) -> Option<Vec<IpAddr>> {
    let (field, listed): (&str, Vec<&String>) = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ("spec.clusterIPs", ips.iter().collect()),
        _ => ("spec.clusterIP", spec.cluster_ip.iter().collect()),
    };
    if listed.first().is_some_and(|ip| ip.as_str() == "None") {
        return None; // headless: DNS only, nothing to load-balance
    }
    if listed.is_empty() || listed.iter().all(|ip| ip.is_empty()) {
        fail(field.into(), "no cluster IP is assigned".into());
        return None;
    }
    let families = ip_families(spec, fail);
    let mut addrs = Vec::new();
    let mut seen = Vec::new();
    for (i, ip) in listed.iter().enumerate() {
        let field = if field == "spec.clusterIPs" { format!("{field}[{i}]") } else { field.into() };
        let Ok(parsed) = ip.parse::<IpAddr>() else {
            fail(field, format!("{ip:?} is not an IP address"));
            continue;
        };
        let family = IpFamily::of(&parsed);
        // The address is what clients use: served all the same.
        if let Some(Some(listed)) = families.get(i).filter(|f| f.is_some_and(|f| f != family)) {
            fail(field.clone(), format!("{ip} is {family}, but spec.ipFamilies[{i}] is {listed}"));
        }
        if seen.contains(&family) {
            fail(field, format!("{ip} is a second {family} cluster IP: a Service has one per family"));
            continue;
        }
        seen.push(family);
        addrs.push(parsed);
    }
    if spec.ip_family_policy.as_deref() == Some("RequireDualStack") && seen.len() < 2 {
        fail(
            "spec.ipFamilyPolicy".into(),
            format!("RequireDualStack, but {field} holds {} family; the Service is served as it is", seen.len()),
        );
    }
    (!addrs.is_empty()).then_some(addrs)
}

/// An IP family, as `spec.ipFamilies` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn of(addr: &IpAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// `spec.ipFamilies`, by index (`None` for a bad entry), and a check of
/// `spec.ipFamilyPolicy`: values the API server would refuse are errors
/// naming the field.
fn ip_families(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    fail: &mut impl FnMut(String, String),
) -> Vec<Option<IpFamily>> {
    let mut families = Vec::new();
    for (i, name) in spec.ip_families.iter().flatten().enumerate() {
        let family = match name.as_str() {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            other => {
                fail(format!("spec.ipFamilies[{i}]"), format!("{other:?} is not IPv4 or IPv6"));
                None
            }
        };
        if family.is_some() && families.contains(&family) {
            fail(format!("spec.ipFamilies[{i}]"), format!("{name} is listed twice"));
        }
        families.push(family);
    }
    if let Some(policy) = spec.ip_family_policy.as_deref()
        && !matches!(policy, "SingleStack" | "PreferDualStack" | "RequireDualStack")
    {
        fail(
            "spec.ipFamilyPolicy".into(),
            format!("{policy:?} is not SingleStack, PreferDualStack or RequireDualStack"),
        );
    }
    families
}

/// The ClientIP affinity timeout in seconds (0 for none); `None` when the
/// fields are invalid, which costs the Service, as the API server would
/// have refused it.
fn session_affinity(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    fail: &mut impl FnMut(String, String),
) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Some(0),
        Some("ClientIP") => {
            let config = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref());
            match config.and_then(|c| c.timeout_seconds) {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t @ 1..=MAX_AFFINITY_TIMEOUT_S) => Some(t as u32),
                Some(t) => {
                    fail(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{t} is not within 1-{MAX_AFFINITY_TIMEOUT_S}"),
                    );
                    None
                }
            }
        }
        Some(other) => {
            fail("spec.sessionAffinity".into(), format!("{other:?} is not None or ClientIP"));
            None
        }
    }
}

fn service_ports(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    fail: &mut impl FnMut(String, String),
) -> Vec<PortSpec> {
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let protocol = match Protocol::from_field(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(message) => {
                fail(format!("spec.ports[{i}].protocol"), message);
                continue;
            }
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            fail(format!("spec.ports[{i}].port"), format!("{} is not a port (1-65535)", port.port));
            continue;
        };
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(n) => match u16::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    fail(format!("spec.ports[{i}].nodePort"), format!("{n} is not a port (1-65535)"));
                    None
                }
            },
        };
        ports.push(PortSpec {
            index: i,
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
            node_port,
        });
    }
    ports
}

/// Endpoints of every Service, keyed by (namespace, service name).
fn endpoints_by_service<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    proxy_name: Option<&str>,
    node_name: &str,
    zone: Option<&str>,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<Key, Vec<SlicePort>> {
    let mut nodes = NodeNames::default();
    let mut by_service: BTreeMap<Key, Vec<SlicePort>> = BTreeMap::new();
    for slice in slices {
        let parsed = ParsedSlice::parse(slice, &mut nodes);
        errors.extend(parsed.errors(proxy_name).iter().cloned());
        if let Some(owner) = parsed.owner.as_ref().filter(|_| parsed.is_ours(proxy_name)) {
            by_service.entry(owner.clone()).or_default().extend(parsed.slice_ports(node_name, zone));
        }
    }
    by_service
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ByKind, parse_manifests};

    fn desired(yaml: &str) -> DesiredState {
        let parsed = parse_manifests(std::path::Path::new("test.yaml"), yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let ByKind { services, slices, .. } = ByKind::of(parsed.objects);
        let options = ModelOptions {
            proxy_name: Some("lb".into()),
            node_name: "node-1".into(),
            node_addresses: vec![
                Ipv4Addr::new(192, 0, 2, 1).into(),
                Ipv4Addr::new(198, 51, 100, 1).into(),
                "2001:db8:1::1".parse().unwrap(),
            ],
            external_ip_cidrs: vec!["203.0.113.0/24".parse().unwrap(), "2001:db8::/64".parse().unwrap()],
            ..Default::default()
        };
        desired_state(&services, &slices, &options)
    }

    fn backends(state: &DesiredState, frontend: &str) -> Vec<String> {
        let service = state.services.iter().find(|s| s.frontend.to_string() == frontend);
        service.unwrap_or_else(|| panic!("no {frontend} in {state:?}")).backends.iter().map(|b| b.to_string()).collect()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP}
"#;

    #[test]
    fn named_ports_map_to_the_slice_port_of_the_same_name_across_slices() {
        let state = desired(&format!(
            "{WEB}---{}---{}",
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.0.1.1]
- addresses: [10.0.1.2]
  conditions: {ready: false}
"#,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints:
- addresses: [10.0.2.1]
  conditions: {ready: true}
"#
        ));
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        assert_eq!(backends(&state, "10.96.0.10:80/TCP"), ["10.0.1.1:8080", "10.0.2.1:9090"]);
        assert_eq!(backends(&state, "10.96.0.10:53/UDP"), ["10.0.1.1:5353"]);
        assert_eq!(state.services[0].name, "shop/web:dns");
    }

    #[test]
    fn slices_of_other_namespaces_or_services_do_not_join() {
        let state = desired(&format!(
            "{WEB}---{}",
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.9.9]}]
"#
        ));
        assert!(backends(&state, "10.96.0.10:80/TCP").is_empty());
    }

    #[test]
    fn headless_and_external_name_services_get_no_frontend() {
        let state = desired(
            r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
"#,
        );
        assert_eq!(state, DesiredState::default());
    }

    #[test]
    fn a_bad_field_costs_only_its_own_port_or_service() {
        let state = desired(
            r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: x, port: 80, protocol: SCTP}, {name: y, port: 81}]
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: not-an-ip, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIPs: [10.96.0.3, "fd00::3"], ports: [{port: 70000}, {port: 443}]}
"#,
        );
        let fields: Vec<String> = state.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            fields,
            [
                "Service default/a: spec.ports[0].protocol: SCTP is not supported yet",
                "Service default/b: spec.clusterIP: \"not-an-ip\" is not an IP address",
                "Service default/c: spec.ports[0].port: 70000 is not a port (1-65535)",
            ]
        );
        let frontends: Vec<String> = state.services.iter().map(|s| s.frontend.to_string()).collect();
        assert_eq!(frontends, ["10.96.0.1:81/TCP", "10.96.0.3:443/TCP", "[fd00::3]:443/TCP"]);
    }

    #[test]
    fn dual_stack_fields_are_checked() {
        let state = desired(
            r#"
apiVersion: v1
kind: Service
metadata: {name: odd}
spec: {ipFamilies: [IPv5, IPv4, IPv4], ipFamilyPolicy: Sometimes, clusterIPs: [10.96.0.6], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: swapped}
spec: {ipFamilies: [IPv6, IPv4], clusterIPs: [10.96.0.7, "fd00::7"], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: half}
spec: {ipFamilyPolicy: RequireDualStack, clusterIPs: [10.96.0.8, 10.96.0.9], ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: half-x, labels: {kubernetes.io/service-name: half}}
addressType: IPX
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: half-mixed, labels: {kubernetes.io/service-name: half}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.2]}, {addresses: ["fd00:10::2"]}]
"#,
        );
        let errors: Vec<String> = state.errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
        assert_eq!(
            errors,
            [
                "addressType: \"IPX\" is not IPv4, IPv6 or FQDN",
                "endpoints[0].addresses[0]: \"10.0.0.2\" is not an IPv6 address",
                "spec.clusterIPs[1]: 10.96.0.9 is a second IPv4 cluster IP: a Service has one per family",
                "spec.ipFamilyPolicy: RequireDualStack, but spec.clusterIPs holds 1 family; the Service is served as \
                 it is",
                "spec.ipFamilies[0]: \"IPv5\" is not IPv4 or IPv6",
                "spec.ipFamilies[2]: IPv4 is listed twice",
                "spec.ipFamilyPolicy: \"Sometimes\" is not SingleStack, PreferDualStack or RequireDualStack",
                "spec.clusterIPs[0]: 10.96.0.7 is IPv4, but spec.ipFamilies[0] is IPv6",
                "spec.clusterIPs[1]: fd00::7 is IPv6, but spec.ipFamilies[1] is IPv4",
            ]
        );
        // A cluster IP of the wrong family for its index is what clients
        // use: served all the same.
        let frontends: Vec<String> = state.services.iter().map(|s| s.frontend.to_string()).collect();
        assert_eq!(frontends, ["10.96.0.6:80/TCP", "10.96.0.7:80/TCP", "10.96.0.8:80/TCP", "[fd00::7]:80/TCP"]);
    }

    #[test]
    fn each_family_of_a_dual_stack_service_gets_its_frontends_with_the_endpoints_of_its_family() {
        let state = desired(
            r#"
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: RequireDualStack
  clusterIPs: ["fd00::4", 10.96.0.4]
  externalIPs: ["2001:db8::4", 203.0.113.4]
  loadBalancerSourceRanges: [192.0.2.0/24, "2001:db8:9::/48"]
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: "2001:db8::40"}, {ip: 203.0.113.40}]}}
---
apiVersion: v1
kind: Service
metadata: {name: six}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIPs: ["fd00::5"]
  externalIPs: [203.0.113.5]
  ports: [{port: 80, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-4, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1], nodeName: node-1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-6, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00:10::1"], nodeName: node-1}, {addresses: ["fd00:10::2"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00:10::5"]}]
"#,
        );
        let errors: Vec<String> = state.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            ["Service default/six: spec.externalIPs[0]: 203.0.113.5 is IPv4, but the Service has no IPv4 cluster IP; \
              not served"]
        );
        let frontends: Vec<String> = state
            .services
            .iter()
            .map(|s| {
                let backends: Vec<String> = s.backends.iter().map(|b| b.to_string()).collect();
                let ranges: Vec<String> = s.source_ranges.iter().map(|r| r.to_string()).collect();
                format!("{} {:?} -> {} {}", s.frontend, s.kind, backends.join(","), ranges.join(","))
            })
            .collect();
        assert_eq!(
            frontends,
            [
                "10.96.0.4:80/TCP ClusterIp -> 10.0.0.1:8080 ",
                "192.0.2.1:30080/TCP NodePort -> 10.0.0.1:8080 ",
                "198.51.100.1:30080/TCP NodePort -> 10.0.0.1:8080 ",
                "203.0.113.4:80/TCP ExternalIp -> 10.0.0.1:8080 ",
                "203.0.113.40:80/TCP LoadBalancer -> 10.0.0.1:8080 192.0.2.0/24",
                "[2001:db8::4]:80/TCP ExternalIp -> [fd00:10::1]:8080,[fd00:10::2]:8080 ",
                "[2001:db8::40]:80/TCP LoadBalancer -> [fd00:10::1]:8080,[fd00:10::2]:8080 2001:db8:9::/48",
                "[2001:db8:1::1]:30080/TCP NodePort -> [fd00:10::1]:8080,[fd00:10::2]:8080 ",
                "[2001:db8:1::1]:30081/TCP NodePort -> [fd00:10::5]:8080 ",
                "[fd00::4]:80/TCP ClusterIp -> [fd00:10::1]:8080,[fd00:10::2]:8080 ",
                "[fd00::5]:80/TCP ClusterIp -> [fd00:10::5]:8080 ",
            ]
        );
        let local: Vec<String> = state.services.iter().flat_map(|s| &s.local_backends).map(|b| b.to_string()).collect();
        assert!(local.iter().all(|b| b == "10.0.0.1:8080" || b == "[fd00:10::1]:8080"), "{local:?}");
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_older_service_then_the_first_by_name() {
        let service = |name: &str, created: Option<&str>| {
            let created = created.map(|t| format!(", creationTimestamp: \"{t}\"")).unwrap_or_default();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}{created}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            )
        };
        // Alike in age: the first by name.
        let state = desired(&format!("{}---\n{}", service("zz", None), service("aa", None)));
        assert_eq!(state.services.len(), 1);
        assert_eq!(state.services[0].name, "default/aa:");
        assert_eq!(state.errors[0].object.name, "zz");
        // The older keeps it, whatever the names; the newer is the error.
        let state = desired(&format!(
            "{}---\n{}",
            service("zz", Some("2026-01-01T00:00:00Z")),
            service("aa", Some("2026-06-01T00:00:00Z"))
        ));
        assert_eq!(state.services[0].name, "default/zz:");
        assert_eq!(state.errors.len(), 1);
        assert_eq!(state.errors[0].object.name, "aa");
        assert_eq!(state.errors[0].field, "spec.clusterIP");
        assert_eq!(state.errors[0].message, "10.96.0.1:80/TCP is already served for default/zz:");
        // No creation time counts as newest.
        let state = desired(&format!("{}---\n{}", service("zz", Some("2026-01-01T00:00:00Z")), service("aa", None)));
        assert_eq!(state.services[0].name, "default/zz:");
    }

    #[test]
    fn an_ipv6_frontend_claimed_twice_goes_to_the_older_service_and_the_newer_keeps_its_ipv4_side() {
        let service = |name: &str, created: &str, ips: &str, families: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\n\
                 spec: {{clusterIPs: [{ips}], ipFamilies: [{families}], ipFamilyPolicy: PreferDualStack, ports: [{{port: 80}}]}}\n"
            )
        };
        let state = desired(&format!(
            "{}---\n{}",
            service("old", "2026-01-01T00:00:00Z", "\"fd00:96::1\"", "IPv6"),
            service("new", "2026-06-01T00:00:00Z", "10.96.0.9, \"fd00:96::1\"", "IPv4, IPv6"),
        ));
        let owners: BTreeSet<(String, &str)> =
            state.services.iter().map(|s| (s.frontend.addr.to_string(), s.name.as_str())).collect();
        let expected =
            BTreeSet::from([("fd00:96::1".to_owned(), "default/old:"), ("10.96.0.9".to_owned(), "default/new:")]);
        assert_eq!(owners, expected, "the older keeps the IPv6 address; the newer serves its IPv4 one");
        assert_eq!(state.errors.len(), 1, "{:?}", state.errors);
        assert_eq!(state.errors[0].object.name, "new");
        assert!(state.errors[0].message.contains("fd00:96::1") && state.errors[0].message.contains("default/old:"));
    }

    #[test]
    fn a_newer_service_claiming_a_frontend_changes_nothing_of_it() {
        let options = ModelOptions::default();
        let service = |name: &str, created: &str, ip: &str| -> ParsedService {
            ParsedService::parse(
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
                    "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
                }))
                .unwrap(),
            )
        };
        let mut model = Model::default();
        let mut changes = Changes::default();
        changes.service(("default".into(), "live".into()), Some(service("live", "2026-01-01T00:00:00Z", "10.96.0.1")));
        model.update(changes, &options);
        let mut changes = Changes::default();
        changes
            .service(("default".into(), "a-new".into()), Some(service("a-new", "2026-02-01T00:00:00Z", "10.96.0.1")));
        let changed = model.update(changes, &options);
        assert!(changed.frontends.is_empty(), "the live Service's frontend is untouched: {changed:?}");
        assert_eq!(model.desired().values().next().unwrap().name, "default/live:");
        let errors = model.errors();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "Service default/a-new: spec.clusterIP: 10.96.0.1:80/TCP is already served for default/live:"
        );
        // The owner goes: the newer one has it now.
        let mut changes = Changes::default();
        changes.service(("default".into(), "live".into()), None);
        let changed = model.update(changes, &options);
        assert_eq!(changed.frontends.len(), 1);
        assert_eq!(model.desired().values().next().unwrap().name, "default/a-new:");
        assert!(model.errors().is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let slice = |second_ready: bool| {
            format!(
                "{WEB}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [10.0.0.1]\n  conditions: {{ready: false, serving: true, terminating: true}}\n- addresses: [10.0.0.2]\n  conditions: {{ready: {second_ready}, serving: false, terminating: true}}\n- addresses: [10.0.0.3]\n  conditions: {{ready: false, serving: false}}\n"
            )
        };
        // 10.0.0.2 is ready (an odd but valid report): only it gets traffic.
        assert_eq!(backends(&desired(&slice(true)), "10.96.0.10:80/TCP"), ["10.0.0.2:8080"]);
        // Nothing ready: the serving-and-terminating endpoint is used.
        assert_eq!(backends(&desired(&slice(false)), "10.96.0.10:80/TCP"), ["10.0.0.1:8080"]);
    }

    #[test]
    fn services_for_another_proxy_and_headless_objects_are_skipped() {
        let state = desired(
            r#"
apiVersion: v1
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ours, labels: {service.kubernetes.io/service-proxy-name: lb}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: plain-1, labels: {kubernetes.io/service-name: plain, service.kubernetes.io/headless: ""}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
        );
        let frontends: Vec<String> = state.services.iter().map(|s| s.frontend.to_string()).collect();
        assert_eq!(frontends, ["10.96.0.2:80/TCP", "10.96.0.3:80/TCP"]);
        assert!(backends(&state, "10.96.0.3:80/TCP").is_empty(), "headless slice ignored");
    }

    /// A Service manifest on port 80, with more metadata and spec fields
    /// (each starting with ", ") after the name and the ports.
    fn port_80_service(name: &str, metadata: &str, ip: &str, spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}{metadata}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]{spec}}}\n---\n"
        )
    }

    #[test]
    fn session_affinity_is_read_with_kubernetes_defaults_and_limits() {
        let service = |name: &str, ip: &str, affinity: &str| port_80_service(name, "", ip, affinity);
        let state = desired(
            &[
                service("none", "10.96.0.1", ""),
                service("default", "10.96.0.2", ", sessionAffinity: ClientIP"),
                service(
                    "short",
                    "10.96.0.3",
                    ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}",
                ),
                service(
                    "too-long",
                    "10.96.0.4",
                    ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}",
                ),
                service("odd", "10.96.0.5", ", sessionAffinity: Cookie"),
            ]
            .concat(),
        );
        let timeouts: Vec<(String, u32)> =
            state.services.iter().map(|s| (s.frontend.to_string(), s.affinity_timeout_s)).collect();
        assert_eq!(
            timeouts,
            [("10.96.0.1:80/TCP".into(), 0), ("10.96.0.2:80/TCP".into(), 10_800), ("10.96.0.3:80/TCP".into(), 30)]
        );
        let fields: Vec<&str> = state.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.sessionAffinity", "spec.sessionAffinityConfig.clientIP.timeoutSeconds"]);
    }

    #[test]
    fn the_algorithm_annotation_overrides_the_default() {
        let service = |name: &str, ip: &str, annotation: &str| port_80_service(name, annotation, ip, "");
        let state = desired(
            &[
                service("plain", "10.96.0.1", ""),
                service("hashed", "10.96.0.2", ", annotations: {service.lb.io/lb-algorithm: maglev}"),
                service("odd", "10.96.0.3", ", annotations: {service.lb.io/lb-algorithm: roundrobin}"),
            ]
            .concat(),
        );
        let algorithms: Vec<Algorithm> = state.services.iter().map(|s| s.algorithm).collect();
        assert_eq!(algorithms, [Algorithm::Random, Algorithm::Maglev, Algorithm::Random]);
        assert_eq!(state.errors[0].field, "metadata.annotations[service.lb.io/lb-algorithm]");
    }

    #[test]
    fn slice_errors_name_the_field() {
        let state = desired(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [300.1.1.1]}]
"#,
        );
        let fields: Vec<&str> = state.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["metadata.labels[kubernetes.io/service-name]", "endpoints[0].addresses[0]"]);
    }

    #[test]
    fn a_port_with_more_endpoints_than_a_frontend_holds_is_an_error_of_that_port_only() {
        let parsed = parse_manifests(
            std::path::Path::new("test.yaml"),
            &format!(
                "{WEB}---{}",
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.0.0.1]}]
"#
            ),
        );
        let ByKind { services, mut slices, .. } = ByKind::of(parsed.objects);
        // A second slice with one endpoint too many for port http only.
        let mut big = slices[0].clone();
        big.metadata.name = Some("web-2".into());
        big.ports.as_mut().unwrap().truncate(1);
        big.endpoints = Some(
            (1..=MAX_BACKENDS as u32)
                .map(|i| k8s_openapi::api::discovery::v1::Endpoint {
                    addresses: vec![Ipv4Addr::from(0x0a01_0000 + i).to_string()],
                    ..Default::default()
                })
                .collect(),
        );
        slices.push(big);
        let state = desired_state(&services, &slices, &ModelOptions::default());
        let errors: Vec<(String, &str)> =
            state.errors.iter().map(|e| (e.object.to_string(), e.field.as_str())).collect();
        assert_eq!(errors, [("Service shop/web".to_owned(), "spec.ports[0]")], "{:?}", state.errors);
        assert!(state.errors[0].message.starts_with("65536 endpoints, but a frontend holds at most 65535"));
        assert_eq!(backends(&state, "10.96.0.10:80/TCP").len(), MAX_BACKENDS + 1, "the planner picks which");
        assert_eq!(backends(&state, "10.96.0.10:53/UDP"), ["10.0.0.1:5353"], "the other port is untouched");
    }

    const EXPOSED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.5, 8.8.8.8]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [10.0.0.0/8, not-a-range]
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.10}, {ip: 198.51.100.11, ipMode: Proxy}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.1.1], nodeName: node-1}
- {addresses: [10.1.2.1], nodeName: node-2}
- {addresses: [10.1.1.2], nodeName: node-1, conditions: {ready: false}}
"#;

    /// A Service of three endpoints, 10.2.0.1 on node-1 (ours, in zone-a),
    /// 10.2.0.2 on node-2 (zone-a), 10.2.0.3 on node-3 (zone-b), each
    /// endpoint's hints as given ("" for none).
    fn hinted(hints: [(&str, &str); 3], extra: &str) -> String {
        let endpoints: String = hints
            .iter()
            .enumerate()
            .map(|(i, (node, zone))| {
                let mut hints = Vec::new();
                if !node.is_empty() {
                    hints.push(format!("forNodes: [{{name: {node}}}]"));
                }
                if !zone.is_empty() {
                    hints.push(format!("forZones: [{{name: {zone}}}]"));
                }
                format!(
                    "- {{addresses: [10.2.0.{}], nodeName: node-{}, hints: {{{}}}}}\n",
                    i + 1,
                    i + 1,
                    hints.join(", ")
                )
            })
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: near}}\nspec: {{clusterIP: 10.96.0.7, ports: [{{name: http, port: 80}}]{extra}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: near-1, labels: {{kubernetes.io/service-name: near}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
        )
    }

    fn near(yaml: &str, zone: Option<&str>) -> (Vec<String>, Narrowed) {
        let parsed = parse_manifests(std::path::Path::new("test.yaml"), yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let ByKind { services, slices, .. } = ByKind::of(parsed.objects);
        let options = ModelOptions { node_name: "node-1".into(), zone: zone.map(str::to_owned), ..Default::default() };
        let state = desired_state(&services, &slices, &options);
        let port = &state.services[0];
        (port.backends.iter().map(|b| b.ip().to_string()).collect(), port.narrowed)
    }

    #[test]
    fn the_node_view_follows_kube_proxy_eligibility_and_the_zone_label() {
        let node = |extra: serde_json::Value| -> k8s_openapi::api::core::v1::Node {
            let mut node = serde_json::json!({"metadata": {"name": "node-1", "labels": {ZONE_LABEL: "zone-a"}}});
            if let (Some(node), Some(extra)) = (node.as_object_mut(), extra.as_object()) {
                for (key, value) in extra {
                    node.insert(key.clone(), value.clone());
                }
            }
            serde_json::from_value(node).unwrap()
        };
        assert_eq!(NodeView::of(None), NodeView { eligible: true, zone: None }, "unknown: eligible");
        assert_eq!(
            NodeView::of(Some(&node(serde_json::json!({})))),
            NodeView { eligible: true, zone: Some("zone-a".into()) }
        );
        let tainted = node(
            serde_json::json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}),
        );
        assert!(!NodeView::of(Some(&tainted)).eligible);
        let deleting =
            node(serde_json::json!({"metadata": {"name": "node-1", "deletionTimestamp": "2026-12-07T00:00:00Z"}}));
        assert_eq!(NodeView::of(Some(&deleting)), NodeView { eligible: false, zone: None });
    }

    #[test]
    fn node_hints_keep_traffic_on_this_node_when_every_endpoint_has_them() {
        let (backends, narrowed) = near(&hinted([("node-1", ""), ("node-2", ""), ("node-3", "")], ""), None);
        assert_eq!((backends, narrowed), (vec!["10.2.0.1".to_owned()], Narrowed::NodeHints));
        // One endpoint without a node hint: node hints are ignored.
        let (backends, narrowed) = near(&hinted([("node-1", ""), ("node-2", ""), ("", "")], ""), None);
        assert_eq!((backends.len(), narrowed), (3, Narrowed::No));
        // All hinted, none for this node: all endpoints.
        let (backends, _) = near(&hinted([("node-2", ""), ("node-2", ""), ("node-3", "")], ""), None);
        assert_eq!(backends.len(), 3);
    }

    #[test]
    fn zone_hints_keep_traffic_in_this_zone_and_node_hints_come_first() {
        let zones = [("", "zone-a"), ("", "zone-a"), ("", "zone-b")];
        let (backends, narrowed) = near(&hinted(zones, ""), Some("zone-a"));
        assert_eq!((backends, narrowed), (vec!["10.2.0.1".to_owned(), "10.2.0.2".to_owned()], Narrowed::ZoneHints));
        // This node without a zone label, or in a zone no endpoint names: all.
        assert_eq!(near(&hinted(zones, ""), None).0.len(), 3);
        assert_eq!(near(&hinted(zones, ""), Some("zone-c")).0.len(), 3);
        // One endpoint without a zone hint: all.
        assert_eq!(near(&hinted([("", "zone-a"), ("", "zone-a"), ("", "")], ""), Some("zone-a")).0.len(), 3);
        // Node and zone hints on all (PreferSameNode): the node's first.
        let both = [("node-1", "zone-a"), ("node-2", "zone-a"), ("node-3", "zone-b")];
        assert_eq!(near(&hinted(both, ""), Some("zone-a")), (vec!["10.2.0.1".to_owned()], Narrowed::NodeHints));
        // Node hints for other nodes only: the zone's.
        let elsewhere = [("node-2", "zone-a"), ("node-2", "zone-a"), ("node-3", "zone-b")];
        assert_eq!(near(&hinted(elsewhere, ""), Some("zone-a")).1, Narrowed::ZoneHints);
    }

    #[test]
    fn hints_count_ready_endpoints_and_yield_to_policy_local_and_terminating_fallback() {
        // The unhinted endpoint is not ready: every ready one is hinted.
        let yaml = hinted([("node-1", ""), ("node-2", ""), ("", "")], "")
            .replace("nodeName: node-3", "nodeName: node-3, conditions: {ready: false}");
        assert_eq!(near(&yaml, None), (vec!["10.2.0.1".to_owned()], Narrowed::NodeHints));
        // internalTrafficPolicy Local: this node's endpoints, hints aside.
        let hints = [("node-2", ""), ("node-2", ""), ("node-2", "")];
        let (backends, narrowed) = near(&hinted(hints, ", internalTrafficPolicy: Local"), None);
        assert_eq!((backends, narrowed), (vec!["10.2.0.1".to_owned()], Narrowed::PolicyLocal));
        // Nothing ready: serving-terminating endpoints, whatever their hints.
        let yaml = hinted([("node-1", ""), ("node-2", ""), ("node-3", "")], "")
            .replace("hints:", "conditions: {ready: false, serving: true, terminating: true}, hints:");
        assert_eq!(
            near(&yaml, None),
            (vec!["10.2.0.1".to_owned(), "10.2.0.2".to_owned(), "10.2.0.3".to_owned()], Narrowed::No)
        );
    }

    #[test]
    fn node_ports_load_balancer_and_external_ips_get_frontends_of_their_kind() {
        let state = desired(EXPOSED);
        let frontends: Vec<(String, FrontendKind)> =
            state.services.iter().map(|s| (s.frontend.to_string(), s.kind)).collect();
        assert_eq!(
            frontends,
            [
                ("10.96.0.10:80/TCP".to_owned(), FrontendKind::ClusterIp),
                ("192.0.2.1:30080/TCP".to_owned(), FrontendKind::NodePort),
                ("198.51.100.1:30080/TCP".to_owned(), FrontendKind::NodePort),
                ("198.51.100.10:80/TCP".to_owned(), FrontendKind::LoadBalancer),
                ("203.0.113.5:80/TCP".to_owned(), FrontendKind::ExternalIp),
            ],
            "one NodePort frontend per node address; the Proxy-mode ingress and the ExternalIP outside the allow-list are not served"
        );
        let fields: Vec<&str> = state.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.externalIPs[1]", "spec.loadBalancerSourceRanges[1]"]);
        let lb = state.services.iter().find(|s| s.kind == FrontendKind::LoadBalancer).unwrap();
        assert_eq!(lb.source_ranges, ["10.0.0.0/8".parse().unwrap()]);
        assert!(
            state.services.iter().filter(|s| s.kind != FrontendKind::LoadBalancer).all(|s| s.source_ranges.is_empty())
        );
    }

    #[test]
    fn external_policy_local_keeps_external_frontends_on_local_endpoints() {
        let state = desired(EXPOSED);
        assert_eq!(backends(&state, "10.96.0.10:80/TCP"), ["10.1.1.1:8080", "10.1.2.1:8080"], "cluster IP: all");
        for external in ["192.0.2.1:30080/TCP", "198.51.100.10:80/TCP", "203.0.113.5:80/TCP"] {
            assert_eq!(backends(&state, external), ["10.1.1.1:8080"], "{external}: only this node's");
        }
        let cluster = state.services.iter().find(|s| s.kind == FrontendKind::ClusterIp).unwrap();
        assert_eq!(cluster.local_backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(), ["10.1.1.1:8080"]);
        // Clients inside the cluster reaching the external addresses get
        // the whole Service, as through the cluster IP.
        for service in &state.services {
            let expected = service.kind.is_external().then(|| cluster.backends.clone());
            assert_eq!(service.internal_backends, expected, "{}", service.frontend);
        }
        assert_eq!(
            state.health_checks.get(&32000),
            Some(&HealthCheck { namespace: "shop".into(), name: "web".into(), local_endpoints: 1 })
        );
    }

    #[test]
    fn a_local_policy_without_local_endpoints_drops_while_no_endpoints_at_all_refuses() {
        let elsewhere = EXPOSED.replace("nodeName: node-1", "nodeName: node-3");
        let state = desired(&elsewhere);
        let node_port = state.services.iter().find(|s| s.kind == FrontendKind::NodePort).unwrap();
        assert!(node_port.backends.is_empty() && node_port.drop_when_empty);
        assert_eq!(state.health_checks[&32000].local_endpoints, 0);
        let none = EXPOSED.split("---").next().unwrap();
        let state = desired(none);
        assert!(state.services.iter().all(|s| s.backends.is_empty() && !s.drop_when_empty));
    }

    #[test]
    fn internal_policy_local_keeps_the_cluster_ip_on_local_endpoints() {
        let internal = EXPOSED
            .replace("externalTrafficPolicy: Local", "internalTrafficPolicy: Local")
            .replace("type: LoadBalancer", "type: ClusterIP");
        let state = desired(&internal);
        assert_eq!(state.services.len(), 2, "a ClusterIP Service has no NodePort or load-balancer frontends");
        assert_eq!(backends(&state, "10.96.0.10:80/TCP"), ["10.1.1.1:8080"]);
        assert_eq!(backends(&state, "203.0.113.5:80/TCP"), ["10.1.1.1:8080", "10.1.2.1:8080"]);
        assert!(state.health_checks.is_empty());
    }

    use crate::test_rng::Rng;

    /// A random Service: a few names in two namespaces on a few cluster
    /// IPs and node ports, so that claims collide.
    fn random_service(rng: &mut Rng, name: &str, namespace: &str) -> Service {
        let local = rng.below(3) == 0;
        let type_ = ["ClusterIP", "NodePort", "LoadBalancer"][rng.below(3) as usize];
        let mut ports = vec![serde_json::json!({"name": "http", "port": 80, "nodePort": 30080 + rng.below(2)})];
        if rng.below(2) == 0 {
            ports.push(serde_json::json!({"name": "dns", "port": 53, "protocol": "UDP"}));
        }
        if rng.below(6) == 0 {
            ports.push(serde_json::json!({"name": "again", "port": 80}));
        }
        // Few distinct ages, some unknown: both orders of conflicts.
        let mut metadata = serde_json::json!({"name": name, "namespace": namespace});
        if rng.below(3) != 0 {
            metadata["creationTimestamp"] = format!("2026-0{}-01T00:00:00Z", 1 + rng.below(3)).into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": metadata,
            "spec": {
                "type": type_,
                "clusterIP": format!("10.96.0.{}", 1 + rng.below(4)),
                "ports": ports,
                "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                "healthCheckNodePort": 32000 + rng.below(2),
                "sessionAffinity": if rng.below(4) == 0 { "ClientIP" } else { "None" },
            },
            "status": {"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{}", 1 + rng.below(2))}]}},
        }))
        .unwrap()
    }

    fn random_slice(rng: &mut Rng, name: &str, namespace: &str) -> EndpointSlice {
        let endpoints: Vec<serde_json::Value> = (0..rng.below(4))
            .map(|_| {
                let mut endpoint = serde_json::json!({
                    "addresses": [format!("10.1.0.{}", 1 + rng.below(6))],
                    "nodeName": format!("node-{}", 1 + rng.below(2)),
                    "conditions": {"ready": rng.below(4) != 0, "serving": true, "terminating": rng.below(4) == 0},
                });
                // Hints on most endpoints, so that all-hinted slices occur.
                if rng.below(4) != 0 {
                    endpoint["hints"]["forNodes"] = serde_json::json!([{"name": format!("node-{}", 1 + rng.below(2))}]);
                }
                if rng.below(4) != 0 {
                    endpoint["hints"]["forZones"] = serde_json::json!([{"name": format!("zone-{}", 1 + rng.below(2))}]);
                }
                endpoint
            })
            .collect();
        let mut labels = serde_json::json!({});
        if rng.below(8) != 0 {
            labels["kubernetes.io/service-name"] = format!("s{}", rng.below(5)).into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn the_kept_model_follows_changes_as_the_whole_computation_does() {
        let options = ModelOptions {
            node_name: "node-1".into(),
            zone: Some("zone-1".into()),
            node_addresses: vec![Ipv4Addr::new(192, 0, 2, 1).into()],
            ..Default::default()
        };
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut services: BTreeMap<Key, Arc<Service>> = BTreeMap::new();
        let mut slices: BTreeMap<Key, Arc<EndpointSlice>> = BTreeMap::new();
        let mut model = Model::default();
        let mut nodes = NodeNames::default();
        let mut previous: BTreeMap<Frontend, Arc<ServicePort>> = BTreeMap::new();
        let (mut conflicts, mut checks, mut repeated, mut stray) = (0, 0, 0, 0);
        for round in 0..300 {
            let mut changes = Changes::default();
            for _ in 0..1 + rng.below(3) {
                let namespace = ["a", "b"][rng.below(2) as usize].to_owned();
                let (kind, index) = (rng.below(2), rng.below(5));
                let gone = rng.below(5) == 0;
                if kind == 0 {
                    let key = (namespace.clone(), format!("s{index}"));
                    if gone {
                        services.remove(&key);
                        changes.service(key, None);
                    } else {
                        let service = Arc::new(random_service(&mut rng, &key.1, &namespace));
                        services.insert(key.clone(), service.clone());
                        changes.service(key, Some(ParsedService::parse(&service)));
                    }
                } else {
                    let key = (namespace.clone(), format!("e{index}"));
                    if gone {
                        slices.remove(&key);
                        changes.slice(key, None);
                    } else {
                        let slice = random_slice(&mut rng, &key.1, &namespace);
                        changes.slice(key.clone(), Some(ParsedSlice::parse(&slice, &mut nodes)));
                        slices.insert(key, Arc::new(slice));
                    }
                }
            }
            let changed = model.update(changes, &options);
            let whole =
                desired_state(services.values().map(AsRef::as_ref), slices.values().map(AsRef::as_ref), &options);
            let kept: Vec<ServicePort> = model.desired().values().map(|p| (**p).clone()).collect();
            assert_eq!(kept, whole.services, "round {round}");
            assert_eq!(model.health_checks(), whole.health_checks, "round {round}");
            let set = |errors: Vec<ObjectError>| errors.into_iter().map(|e| e.to_string()).collect::<BTreeSet<_>>();
            let errors = set(model.errors());
            conflicts += errors.iter().filter(|e| e.contains("already served")).count();
            // A Service's own second claim: "Service a/s1: ... served for a/s1:http".
            let own = |e: &&String| {
                let service = e.split(':').next().unwrap_or("").trim_start_matches("Service ");
                e.contains(&format!("already served for {service}:"))
            };
            repeated += errors.iter().filter(own).count();
            stray += errors.iter().filter(|e| e.contains("belongs to no Service")).count();
            checks += model.health_checks().len();
            assert_eq!(errors, set(whole.errors), "round {round}");
            if round > 0 {
                assert!(!changed.all);
                let differ: BTreeSet<Frontend> = previous
                    .keys()
                    .chain(model.desired().keys())
                    .filter(|f| previous.get(f) != model.desired().get(f))
                    .copied()
                    .collect();
                assert_eq!(changed.frontends, differ, "round {round}: the changes said are the changes made");
            }
            previous = model.desired().clone();
            let nothing = model.update(Changes::default(), &options);
            assert!(nothing.frontends.is_empty() && !nothing.all, "round {round}: no change, no work");
        }
        assert!(conflicts > 50 && repeated > 0 && stray > 0 && checks > 50, "{conflicts} {repeated} {stray} {checks}");
        // New options (the node's addresses moved): everything again.
        let moved = ModelOptions { node_addresses: vec![Ipv4Addr::new(192, 0, 2, 9).into()], ..options };
        assert!(model.update(Changes::default(), &moved).all, "recomputed from what the model kept");
        let whole = desired_state(services.values().map(AsRef::as_ref), slices.values().map(AsRef::as_ref), &moved);
        assert_eq!(model.desired().values().map(|p| (**p).clone()).collect::<Vec<_>>(), whole.services);
    }
}
