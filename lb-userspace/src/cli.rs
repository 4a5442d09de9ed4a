//! The command line. A library module so that other code (the Helm chart's
//! tests) can check flags against the real definition.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "lb", version, about = "eBPF service load balancer for Kubernetes (kube-proxy replacement)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level or tracing filter (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum Command {
    /// Run the agent: keep the datapath in step with the Services.
    Run(RunArgs),
    /// Print the services the pinned maps hold.
    Services(InspectArgs),
    /// Print the backends the pinned maps hold.
    Backends(InspectArgs),
    /// Print the datapath's packet counters by verdict and its conntrack entries.
    Stats(InspectArgs),
    /// Say which frontend a flow meets, which backend it gets and why, from
    /// the pinned maps: conntrack, session affinity, Maglev or the seeded
    /// random draw, traffic policy, source ranges, refusal.
    Explain(ExplainArgs),
    /// Mount bpffs and the cgroup v2 hierarchy where they are missing, from
    /// the given namespaces (the host's): the Helm chart's init container.
    Mount(MountArgs),
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// A cgroup namespace to enter first, such as /hostproc/1/ns/cgroup, so
    /// that the cgroup v2 mount shows the whole hierarchy.
    #[arg(long)]
    pub cgroup_ns: Option<PathBuf>,
    /// A mount namespace to mount in, such as /hostproc/1/ns/mnt.
    #[arg(long)]
    pub mount_ns: Option<PathBuf>,
    /// Where bpffs must be mounted.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Where the cgroup v2 hierarchy must be mounted.
    #[arg(long)]
    pub cgroup2: Option<PathBuf>,
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The Kubernetes API server.
    Kube,
    /// A directory of manifests, watched for changes.
    Dir(PathBuf),
}

fn parse_source(value: &str) -> Result<Source, String> {
    match value.split_once(':') {
        _ if value == "kube" => Ok(Source::Kube),
        Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(path.into())),
        _ => Err(format!("{value:?}: expected kube or dir:PATH")),
    }
}

fn parse_duration(value: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len()));
    let n: u64 = number.parse().map_err(|_| format!("{value:?}: expected a duration such as 100ms or 30s"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(format!("{value:?}: expected a duration such as 100ms or 30s")),
    }
}

/// A path, or none ("") to turn a feature off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionalPath(pub Option<PathBuf>);

impl std::fmt::Display for OptionalPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(path) => write!(f, "{}", path.display()),
            None => Ok(()),
        }
    }
}

fn parse_optional_path(value: &str) -> Result<OptionalPath, String> {
    Ok(OptionalPath((!value.is_empty()).then(|| PathBuf::from(value))))
}

/// An address to serve an endpoint on, or none to turn it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

fn parse_listen(value: &str) -> Result<Listen, String> {
    if value.is_empty() || value == "0" {
        return Ok(Listen(None));
    }
    value.parse().map(|a| Listen(Some(a))).map_err(|_| format!("{value:?}: expected IP:PORT, or \"\" for off"))
}

/// The host name, lower-cased as Kubernetes node names are.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call, which writes at most its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if rc == 0 { String::from_utf8_lossy(&buf[..end]).to_lowercase() } else { String::new() }
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Source of Services and EndpointSlices: kube (the API server), or
    /// dir:PATH (every YAML file in PATH, watched).
    #[arg(long, value_parser = parse_source, default_value = "kube")]
    pub source: Source,
    /// Kubeconfig for the kube source; default KUBECONFIG, ~/.kube/config, then in-cluster.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the kubeconfig's (the kubernetes Service's
    /// ClusterIP is ours to serve, so it cannot be used to reach the API).
    #[arg(long)]
    pub k8s_api_server: Option<String>,
    /// This node's name (its Node object), as kube-proxy's --hostname-override.
    #[arg(long, default_value_t = host_name())]
    pub node_name: String,
    /// Serve Services labelled service.kubernetes.io/service-proxy-name=NAME
    /// (others with that label are left to their proxy).
    #[arg(long)]
    pub proxy_name: Option<String>,
    /// Least time between two syncs; changes in between are batched.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub min_sync_period: std::time::Duration,
    /// /healthz and /livez (kube-proxy semantics); "" turns it off. `[::]`
    /// (the default) is both families: an IPv6 cluster's load balancers
    /// and kubelets check it too.
    #[arg(long, value_parser = parse_listen, default_value = "[::]:10256")]
    pub healthz_addr: Listen,
    /// Prometheus /metrics; "" turns it off.
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:10249")]
    pub metrics_addr: Listen,
    /// Unhealthy when a change has waited this long without a sync.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub healthz_timeout: std::time::Duration,
    /// Interfaces to attach to, as globs (e.g. "veth*,cali*"); default: every veth.
    #[arg(long, value_delimiter = ',')]
    pub pod_interfaces: Vec<String>,
    /// External interfaces, where NodePort, LoadBalancer and ExternalIP
    /// traffic is served, as globs (e.g. "eth*,bond0"); default: every
    /// interface holding a node address.
    #[arg(long, value_delimiter = ',')]
    pub external_interfaces: Vec<String>,
    /// The program on external interfaces: `tc` (tc ingress, any
    /// interface), `xdp` (XDP, for NICs whose driver runs it natively), or
    /// `auto`: XDP on drivers known to run it natively and send frames on
    /// (not veth), tc on the rest.
    #[arg(long, value_enum, default_value = "auto")]
    pub external_datapath: crate::interfaces::ExternalDatapath,
    /// Node addresses NodePorts are served on, as CIDRs (kube-proxy's flag);
    /// default: every node address. Loopback addresses never are. As with
    /// kube-proxy, each family reads its own CIDRs and takes every address
    /// when the flag has none of it.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<crate::cidr::Cidr>,
    /// Service externalIPs are served only inside these CIDRs (either
    /// family); none by default, since an ExternalIP can capture any
    /// address's traffic (CVE-2020-8554).
    #[arg(long, value_delimiter = ',')]
    pub external_ip_cidrs: Vec<crate::cidr::Cidr>,
    /// Socket-level balancing (cgroup connect/sendmsg hooks): `host`
    /// translates the sockets of the agent's own network namespace (the
    /// node's, for a hostNetwork agent), so pods take the per-packet path;
    /// `all` translates every namespace's sockets, pods' too, so their
    /// connections need no per-packet NAT; `off` attaches none and
    /// detaches any an earlier agent left.
    #[arg(long, value_enum, default_value = "host")]
    pub socket_lb: SocketLb,
    /// cgroup v2 directory where the socket programs attach: processes in
    /// it and below are candidates for socket-level balancing. Default: the
    /// root of the cgroup v2 hierarchy, wherever it is mounted (unified,
    /// hybrid, or where `lb mount` put it); "" turns them off, as
    /// `--socket-lb off` does.
    #[arg(long, value_parser = parse_optional_path)]
    pub cgroup_path: Option<OptionalPath>,
    /// bpffs directory for the pinned maps, program and links.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Initial size of the services map (frontends plus backend slots), and
    /// the least it grows to: the agent grows it when the cluster needs more.
    #[arg(long, default_value_t = lb_common::DEFAULT_SERVICES_MAX_ENTRIES)]
    pub services_max_entries: u32,
    /// Initial size of the backends map, and the least it grows to.
    #[arg(long, default_value_t = lb_common::DEFAULT_BACKENDS_MAX_ENTRIES)]
    pub backends_max_entries: u32,
    /// Never grow the services, backends and source-ranges maps: their
    /// --*-max-entries are fixed sizes, and a sync that does not fit fails.
    #[arg(long)]
    pub fixed_map_sizes: bool,
    /// Size of the connection-tracking map (two entries per flow). Default:
    /// 0.25 % of the node's memory at 112 bytes an entry (at most a quarter
    /// of --memory-limit), at least 262,144 (kube-proxy's 131,072 flows),
    /// at most 2^24. A pinned map keeps its size until its pin is removed.
    #[arg(long)]
    pub conntrack_max_entries: Option<u32>,
    /// The agent's memory limit in bytes (the chart passes its container's
    /// limit). Map memory is charged to the agent's cgroup, so CONNTRACK's
    /// default takes at most a quarter of it.
    #[arg(long, env = "LB_MEMORY_LIMIT")]
    pub memory_limit: Option<u64>,
    /// Backend selection for Services without the service.lb.io/lb-algorithm annotation.
    #[arg(long, value_enum, default_value = "random")]
    pub lb_algorithm: LbAlgorithm,
    /// Entries per Maglev table: a prime, such as 16381 or 65521.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// How many Service ports can use Maglev; further ones fall back to random.
    /// The map holds one table more: a spare, into which a changed table is
    /// written before its Service port switches to it.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_TABLES)]
    pub maglev_tables: u32,
    /// Size of the session-affinity map (one entry per client and Service port).
    #[arg(long, default_value_t = lb_common::DEFAULT_AFFINITY_MAX_ENTRIES)]
    pub affinity_max_entries: u32,
    /// Initial size of the source-ranges map (one entry per load-balancer
    /// frontend and range), and the least it grows to.
    #[arg(long, default_value_t = lb_common::DEFAULT_SOURCE_RANGES_MAX_ENTRIES)]
    pub source_ranges_max_entries: u32,
}

/// Which sockets the cgroup hooks translate (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SocketLb {
    /// The agent's own network namespace: the node's processes.
    Host,
    /// Every network namespace: pods too.
    All,
    /// None: no cgroup programs.
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The client: IP, or IP:PORT ([IP]:PORT for IPv6) to know the
    /// backend of a new flow (its hash picks it).
    #[arg(long, value_parser = parse_client)]
    pub from: (std::net::IpAddr, Option<u16>),
    /// The service, of the client's family: IP:PORT ([IP]:PORT for IPv6),
    /// or with /tcp or /udp after it.
    #[arg(long, value_parser = parse_service)]
    pub to: (std::net::SocketAddr, crate::model::Protocol),
    /// Where the flow meets the datapath: a pod's packets, packets from
    /// outside (an external interface), or a host process's socket.
    #[arg(long, value_enum, default_value = "pod")]
    pub hook: ExplainHook,
    /// The agent's --maglev-table-size (the pins do not record it): a
    /// Maglev answer is only right with the size the agent runs with.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_TABLE_SIZE)]
    pub maglev_table_size: u32,
    #[command(flatten)]
    pub inspect: InspectArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExplainHook {
    Pod,
    Wire,
    Socket,
}

impl From<ExplainHook> for crate::explain::Hook {
    fn from(hook: ExplainHook) -> Self {
        match hook {
            ExplainHook::Pod => Self::Pod,
            ExplainHook::Wire => Self::Wire,
            ExplainHook::Socket => Self::Socket,
        }
    }
}

fn parse_client(value: &str) -> Result<(std::net::IpAddr, Option<u16>), String> {
    if let Ok(addr) = value.parse::<std::net::SocketAddr>() {
        return Ok((addr.ip(), Some(addr.port())));
    }
    value.parse().map(|ip| (ip, None)).map_err(|_| format!("{value:?}: expected IP, IP:PORT or [IPv6]:PORT"))
}

fn parse_service(value: &str) -> Result<(std::net::SocketAddr, crate::model::Protocol), String> {
    let (addr, protocol) = value.split_once('/').unwrap_or((value, "tcp"));
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => crate::model::Protocol::Tcp,
        "udp" => crate::model::Protocol::Udp,
        other => return Err(format!("{other:?}: expected tcp or udp")),
    };
    let addr = addr.parse().map_err(|_| format!("{value:?}: expected IP:PORT or [IPv6]:PORT, then /tcp or /udp"))?;
    Ok((addr, protocol))
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// `--lb-algorithm`: `model::Algorithm` as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LbAlgorithm {
    /// Uniformly at random.
    Random,
    /// Maglev consistent hashing of the flow: the same flow picks the same
    /// backend on every node and after backend changes, mostly.
    Maglev,
}

impl From<LbAlgorithm> for crate::model::Algorithm {
    fn from(algorithm: LbAlgorithm) -> Self {
        match algorithm {
            LbAlgorithm::Random => Self::Random,
            LbAlgorithm::Maglev => Self::Maglev,
        }
    }
}
