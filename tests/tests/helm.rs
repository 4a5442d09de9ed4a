//! The Helm chart, rendered by the real helm binary: lint, strict parsing of
//! every manifest into k8s-openapi types (unknown fields rejected), values
//! carried into the objects, the schema's refusals, and the agent's own CLI
//! accepting the flags the DaemonSet passes.
use std::{path::Path, process::Command};

use clap::Parser;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_tests::agent::TempDir;
use lb_userspace::cli::{Cli, Command as LbCommand, RunArgs, Source};
use serde::de::DeserializeOwned;
use serde_yaml::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/lb");

fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm").args(args).output().expect("helm on PATH (scripts/setup.sh installs it)")
}

/// `helm template` with a values file; Err(stderr) when helm refuses.
fn render(values: &str) -> Result<Vec<Value>, String> {
    let dir = TempDir::new("lb-helm").unwrap();
    let file = dir.0.join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let out = helm(&["template", "lb", CHART, "--namespace", "lb-system", "-f", file.to_str().unwrap()]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect())
}

/// Deserializes a manifest, failing on any field the type does not know.
fn strict<T: DeserializeOwned>(doc: &Value) -> T {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(doc.clone(), |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", doc["kind"].as_str().unwrap_or("?")));
    assert!(unknown.is_empty(), "{} has unknown fields {unknown:?}", doc["kind"].as_str().unwrap_or("?"));
    parsed
}

struct Rendered {
    daemonset: DaemonSet,
    role: ClusterRole,
    others: Vec<Value>,
}

/// Parses every rendered object strictly by kind.
fn parse(docs: &[Value]) -> Rendered {
    let (mut daemonset, mut role, mut others) = (None, None, Vec::new());
    for doc in docs {
        match doc["kind"].as_str().unwrap() {
            "DaemonSet" => daemonset = Some(strict::<DaemonSet>(doc)),
            "ClusterRole" => role = Some(strict::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(doc)),
            "ServiceAccount" => drop(strict::<ServiceAccount>(doc)),
            "Service" => drop(strict::<Service>(doc)),
            // A CRD (Prometheus Operator): no k8s-openapi type; checked by hand.
            "ServiceMonitor" => others.push(doc.clone()),
            kind => panic!("unexpected kind {kind}"),
        }
    }
    Rendered { daemonset: daemonset.expect("a DaemonSet"), role: role.expect("a ClusterRole"), others }
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    spec.containers.iter().find(|c| c.name == "agent").unwrap()
}

/// The DaemonSet's args, parsed by the agent's own command line.
fn run_args(ds: &DaemonSet) -> RunArgs {
    let args = agent_container(ds).args.clone().unwrap();
    let cli = Cli::try_parse_from(std::iter::once("lb".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the agent refuses {args:?}:\n{e}"));
    match cli.command {
        LbCommand::Run(run) => run,
        other => panic!("not `run`: {other:?}"),
    }
}

fn ds_args(ds: &DaemonSet) -> Vec<String> {
    agent_container(ds).args.clone().unwrap()
}

/// An init container's args, parsed by `lb mount`: the namespaces it
/// enters and where it mounts bpffs and cgroup v2 ("" where not asked).
fn mount_args(container: &Container) -> [String; 4] {
    let args = container.args.clone().unwrap();
    let cli = Cli::try_parse_from(std::iter::once("lb".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("lb refuses {args:?}:\n{e}"));
    let LbCommand::Mount(mount) = cli.command else { panic!("not `mount`: {args:?}") };
    let text = |p: Option<std::path::PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
    [text(mount.cgroup_ns), text(mount.mount_ns), text(mount.bpffs), text(mount.cgroup2)]
}

fn env(container: &Container, name: &str) -> Option<String> {
    container.env.as_ref()?.iter().find(|e| e.name == name)?.value.clone()
}

#[test]
fn lint_passes_strictly() {
    let out = helm(&["lint", "--strict", CHART]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(Path::new(CHART).join("README.md").exists());
}

#[test]
fn default_values_render_a_kube_proxy_replacement() {
    let rendered = parse(&render("").unwrap());
    let ds = &rendered.daemonset;
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, None, "the host's PID namespace only for --socket-lb all");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let strategy = ds.spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));

    let agent = agent_container(ds);
    let security = agent.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(caps.add.clone().unwrap(), ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE"]);
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| p.as_ref()?.http_get.as_ref()?.path.clone();
    assert_eq!(probe_path(&agent.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe_path(&agent.readiness_probe).as_deref(), Some("/healthz"));
    let volumes: Vec<String> =
        pod.volumes.as_ref().unwrap().iter().map(|v| v.host_path.as_ref().unwrap().path.clone()).collect();
    assert_eq!(volumes, ["/sys/fs/bpf", "/run/lb/cgroupv2", "/proc"]);
    let mounts = |c: &Container| -> Vec<(String, String, Option<String>)> {
        let mounts = c.volume_mounts.as_deref().unwrap_or_default();
        mounts.iter().map(|m| (m.name.clone(), m.mount_path.clone(), m.mount_propagation.clone())).collect()
    };
    let host_to_container = Some("HostToContainer".to_owned());
    assert_eq!(
        mounts(agent),
        [
            ("bpffs".to_owned(), "/sys/fs/bpf".to_owned(), host_to_container.clone()),
            ("cgroup".to_owned(), "/run/lb/cgroupv2".to_owned(), host_to_container),
        ],
        "the agent sees the host's bpffs and the cgroup v2 hierarchy the init container mounted"
    );
    // The init container mounts both on the host, from the host's
    // namespaces (its /proc): the only place such mounts outlive the pod.
    let init = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].security_context.as_ref().unwrap().privileged, Some(true));
    assert_eq!(mounts(&init[0]), [("hostproc".to_owned(), "/hostproc".to_owned(), None)]);
    assert_eq!(
        mount_args(&init[0]),
        ["/hostproc/1/ns/cgroup", "/hostproc/1/ns/mnt", "/sys/fs/bpf", "/run/lb/cgroupv2"]
    );
    assert_eq!(env(agent, "KUBERNETES_SERVICE_HOST"), None, "in-cluster default until k8sServiceHost is set");

    let run = run_args(ds);
    assert_eq!(run.source, Source::Kube);
    assert_eq!(run.node_name, "$(NODE_NAME)", "filled in by the kubelet");
    assert_eq!(run.conntrack_max_entries, None, "sized from the node's memory");
    let limit = agent.env.as_ref().unwrap().iter().find(|e| e.name == "LB_MEMORY_LIMIT").expect("LB_MEMORY_LIMIT");
    let field = limit.value_from.as_ref().and_then(|v| v.resource_field_ref.as_ref()).expect("from the downward API");
    assert_eq!(field.resource, "limits.memory", "within the container's memory limit");
    assert!(!run.fixed_map_sizes, "the agent grows the maps it writes");
    assert_eq!(run.healthz_addr.0, Some("[::]:10256".parse().unwrap()));
    assert_eq!(run.metrics_addr.0, Some("127.0.0.1:10249".parse().unwrap()));
    // No fixed cgroup path: the agent finds the v2 root, which on hybrid
    // hosts (this one) is not /sys/fs/cgroup.
    assert!(!ds_args(ds).iter().any(|a| a.starts_with("--cgroup-path")), "{:?}", ds_args(ds));
    assert_eq!(run.cgroup_path, None);
    assert_eq!(run.socket_lb, lb_userspace::cli::SocketLb::Host);
    assert_eq!(run.external_datapath, lb_userspace::interfaces::ExternalDatapath::Auto);

    // Read-only on what the datapath needs, plus events; nothing else.
    let rules: Vec<(Vec<String>, Vec<String>, Vec<String>)> = rendered
        .role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.api_groups.unwrap_or_default(), r.resources.unwrap_or_default(), r.verbs))
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        [
            (s(&[""]), s(&["services", "nodes"]), s(&["get", "list", "watch"])),
            (s(&["discovery.k8s.io"]), s(&["endpointslices"]), s(&["get", "list", "watch"])),
            (s(&["", "events.k8s.io"]), s(&["events"]), s(&["create", "patch"])),
        ]
    );
    assert!(rendered.others.is_empty(), "no ServiceMonitor by default");
}

#[test]
fn non_default_values_are_carried_into_the_objects() {
    let rendered = parse(
        &render(
            r#"
image: {repository: registry.example/lb, tag: v9, pullPolicy: Always}
imagePullSecrets: [{name: regcred}]
k8sServiceHost: api.internal.example
k8sServicePort: 443
agent:
  logLevel: debug
  podInterfaces: ["cali*", "veth*"]
  externalInterfaces: ["eth*", "bond0"]
  externalDatapath: xdp
  nodeportAddresses: [192.0.2.0/24, "fd00:1::/64"]
  externalIPCidrs: [203.0.113.0/24, 198.51.100.7]
  minSyncPeriod: 1s
  proxyName: lb
  pinPath: /sys/fs/bpf/lb-canary
  socketLB: "off"
  lbAlgorithm: maglev
  maglev: {tableSize: 65521, tables: 4}
mapSizes: {services: 262144, backends: 131072, conntrack: 1048576, affinity: 4096, sourceRanges: 512, fixed: true}
healthz: {port: 10266}
metrics:
  bindAddress: 0.0.0.0
  port: 9962
  serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}
updateStrategy: {maxUnavailable: "20%"}
resources: {requests: {cpu: 200m, memory: 128Mi}, limits: {memory: 1Gi}}
nodeSelector: {node-role.kubernetes.io/worker: "true"}
securityContext: {privileged: true}
"#,
        )
        .unwrap(),
    );
    let ds = &rendered.daemonset;
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let agent = agent_container(ds);
    assert_eq!(agent.image.as_deref(), Some("registry.example/lb:v9"));
    assert_eq!(agent.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
    assert_eq!(env(agent, "KUBERNETES_SERVICE_HOST").as_deref(), Some("api.internal.example"));
    assert_eq!(env(agent, "KUBERNETES_SERVICE_PORT").as_deref(), Some("443"));
    assert_eq!(pod.node_selector.as_ref().unwrap()["node-role.kubernetes.io/worker"], "true");
    let limits = agent.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "1Gi");
    let rolling = ds.spec.update_strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("20%".into()))
    );
    let security = agent.security_context.as_ref().unwrap();
    assert_eq!((security.privileged, security.capabilities.is_none()), (Some(true), true));
    let probe_port = agent.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port.clone();
    assert_eq!(probe_port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10266));

    let run = run_args(ds);
    assert_eq!(run.pod_interfaces, ["cali*", "veth*"]);
    assert_eq!(run.proxy_name.as_deref(), Some("lb"));
    assert_eq!(run.min_sync_period, std::time::Duration::from_secs(1));
    assert_eq!(run.pin_path, Path::new("/sys/fs/bpf/lb-canary"));
    assert_eq!(run.socket_lb, lb_userspace::cli::SocketLb::Off);
    assert_eq!(
        (run.services_max_entries, run.backends_max_entries, run.conntrack_max_entries),
        (262144, 131072, Some(1048576))
    );
    assert!(run.fixed_map_sizes);
    assert_eq!(run.affinity_max_entries, 4096);
    assert_eq!(run.source_ranges_max_entries, 512);
    assert_eq!(run.external_interfaces, ["eth*", "bond0"]);
    assert_eq!(run.external_datapath, lb_userspace::interfaces::ExternalDatapath::Xdp);
    let cidrs = |c: &[lb_userspace::cidr::Cidr]| c.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    // A dual-stack cluster's list: the agent starts, and serves IPv4
    // NodePorts on the IPv4 prefix.
    assert_eq!(cidrs(&run.nodeport_addresses), ["192.0.2.0/24", "fd00:1::/64"]);
    assert_eq!(cidrs(&run.external_ip_cidrs), ["203.0.113.0/24", "198.51.100.7/32"]);
    assert_eq!(run.lb_algorithm, lb_userspace::cli::LbAlgorithm::Maglev);
    assert_eq!((run.maglev_table_size, run.maglev_tables), (65521, 4));
    assert_eq!(run.healthz_addr.0, Some("[::]:10266".parse().unwrap()));
    assert_eq!(run.metrics_addr.0, Some("0.0.0.0:9962".parse().unwrap()));
    let args = agent_container(ds).args.clone().unwrap();
    assert!(args.contains(&"--log-level=debug".to_owned()));

    let monitor = &rendered.others[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
}

#[test]
fn values_the_schema_forbids_fail_with_a_clear_message() {
    for (values, message) in [
        ("mapSizes: {conntrack: big}", "at '/mapSizes/conntrack': got string, want integer"),
        ("replicas: 3", "additional properties 'replicas' not allowed"),
        ("agent: {podInterface: [veth*]}", "additional properties 'podInterface' not allowed"),
        ("image: {repository: x, pullPolicy: Sometimes}", "/image/pullPolicy"),
        ("agent: {minSyncPeriod: soon}", "/agent/minSyncPeriod"),
        ("agent: {lbAlgorithm: roundrobin}", "/agent/lbAlgorithm"),
        ("agent: {externalIPCidrs: [everywhere]}", "/agent/externalIPCidrs/0"),
        ("metrics: {port: 70000}", "/metrics/port"),
        ("metrics: {serviceMonitor: {enabled: true}}", "needs metrics.bindAddress 0.0.0.0"),
    ] {
        let error = render(values).expect_err(values);
        assert!(error.contains(message), "for {values:?}: {error}");
    }
}

#[test]
fn the_init_container_mounts_only_what_is_asked_and_goes_with_both_off() {
    let pod_of = |values: &str| parse(&render(values).unwrap()).daemonset.spec.template.spec.unwrap();
    let pod = pod_of("bpf: {autoMount: false}\n");
    let init = pod.init_containers.unwrap();
    assert_eq!(mount_args(&init[0]), ["/hostproc/1/ns/cgroup", "/hostproc/1/ns/mnt", "", "/run/lb/cgroupv2"]);
    // No socket programs, or a cgroup path given: no cgroup mount.
    for values in ["agent: {socketLB: \"off\"}\n", "agent: {cgroupPath: /sys/fs/cgroup}\n"] {
        let init = pod_of(values).init_containers.unwrap();
        assert_eq!(mount_args(&init[0]), ["", "/hostproc/1/ns/mnt", "/sys/fs/bpf", ""], "{values}");
    }
    let pod = pod_of("bpf: {autoMount: false}\ncgroup: {autoMount: {enabled: false}}\n");
    assert!(pod.init_containers.is_none());
    let volumes: Vec<String> =
        pod.volumes.unwrap().iter().map(|v| v.host_path.as_ref().unwrap().path.clone()).collect();
    assert_eq!(volumes, ["/sys/fs/bpf", "/sys/fs/cgroup"], "the host's cgroup tree, searched by the agent");
    assert!(render("cgroup: {hostRoot: relative}\n").unwrap_err().contains("/cgroup/hostRoot"));
}

#[test]
fn socket_lb_all_gets_the_hosts_pid_namespace_to_reach_pods_sockets() {
    let rendered = parse(&render("agent:\n  socketLB: all\n").unwrap());
    let pod = rendered.daemonset.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(run_args(&rendered.daemonset).socket_lb, lb_userspace::cli::SocketLb::All);
    assert!(render("agent:\n  socketLB: pods\n").is_err(), "the schema names the choices");
    assert!(render("agent:\n  externalDatapath: native\n").is_err(), "the schema names the choices");
}

/// The host layouts the chart must handle, each arranged in a mount
/// namespace of the test's own (nothing else on the machine sees it), held
/// by a sleeping process: the agent and `lb mount` (the chart's init
/// container, which enters the host's namespaces) enter it.
mod layout {
    use std::{
        io::{BufRead, BufReader},
        path::PathBuf,
        process::{Child, Command, Stdio},
    };

    use lb_tests::{
        clients::{TestCgroup, move_into_cgroup},
        netns::unique_tag,
    };

    pub struct Layout {
        holder: Child,
        /// The holder's cgroup, when the layout has a private cgroup namespace.
        _cgroup: Option<TestCgroup>,
        /// A directory for `lb mount --cgroup2`, removed on drop.
        pub cgroup2_dir: PathBuf,
    }

    impl Layout {
        /// A mount namespace (and, with `private_cgroup`, a cgroup
        /// namespace rooted at a test cgroup) set up by the shell `script`.
        pub fn new(script: &str, private_cgroup: bool) -> Self {
            let mut command = Command::new("unshare");
            command.args(["--mount", "--propagation", "private"]);
            let cgroup = private_cgroup.then(TestCgroup::new);
            if let Some(cgroup) = &cgroup {
                command.arg("--cgroup");
                move_into_cgroup(&mut command, &cgroup.0);
            }
            command.args(["sh", "-c", &format!("set -e; {script}; echo ready; exec sleep 600")]);
            let mut holder = command.stdout(Stdio::piped()).spawn().expect("unshare (util-linux)");
            let mut line = String::new();
            BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "layout script {script:?} failed");
            let cgroup2_dir = PathBuf::from(format!("/run/lbt-cgroup2-{}", unique_tag()));
            Self { holder, _cgroup: cgroup, cgroup2_dir }
        }

        /// nsenter options that enter this layout.
        pub fn namespaces(&self) -> Vec<String> {
            let pid = self.holder.id();
            let mut options = vec![format!("--mount=/proc/{pid}/ns/mnt")];
            if self._cgroup.is_some() {
                options.push(format!("--cgroup=/proc/{pid}/ns/cgroup"));
            }
            options
        }

        /// `lb mount ARGS` as the chart's init container runs it: entering
        /// this layout's mount namespace (the "host's") and the machine's
        /// cgroup namespace. Its output.
        pub fn init_container(&self, args: &[&str]) -> String {
            let out = Command::new(lb_tests::agent::lb_binary())
                .arg("mount")
                .arg(format!("--mount-ns=/proc/{}/ns/mnt", self.holder.id()))
                .arg("--cgroup-ns=/proc/self/ns/cgroup")
                .args(args)
                .output()
                .unwrap();
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "lb mount {args:?}: {stdout}{stderr}");
            stdout.into_owned()
        }
    }

    impl Drop for Layout {
        fn drop(&mut self) {
            let _ = self.holder.kill();
            let _ = self.holder.wait();
            // Its mounts went with the namespace; the directory stays.
            let _ = std::fs::remove_dir(&self.cgroup2_dir);
        }
    }
}

/// A cluster with one backend serving a dual-stack ClusterIP (a cluster
/// IP and a slice per family), and the agent started
/// with the DaemonSet's default arguments as rendered, but for what only a
/// cluster gives (the API server, the kubelet's node name) and the pin path
/// (the test's own, not a real install's); in `layout` when given.
struct ChartAgent {
    agent: lb_tests::agent::Agent,
    _server: lb_tests::pods::PodServer,
    _manifests: TempDir,
    cluster: lb_tests::netns::Cluster,
}

const CHART_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 70);
const CHART_VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x70);

impl ChartAgent {
    fn start(layout: Option<&layout::Layout>) -> Self {
        use lb_tests::{
            manifests::{Endpoint, endpoint_slice, endpoint_slice6, service_with_cluster_ips, write_yaml},
            netns::{Cluster, Topology},
            pods::{PodServer, TCP_PORT},
        };
        let rendered = parse(&render("").unwrap());
        let args: Vec<String> = ds_args(&rendered.daemonset)
            .into_iter()
            .skip(1) // `run`
            .filter(|a| !["--source=", "--node-name=", "--pin-path="].iter().any(|p| a.starts_with(p)))
            .collect();
        let cluster = Cluster::new(Topology::Routed, &["backend-0", "client"]).unwrap();
        let backend = cluster.pod("backend-0");
        let server = PodServer::start(&backend.netns, &backend.name).unwrap();
        let manifests = TempDir::new("lb-helm-e2e").unwrap();
        write_yaml(
            &manifests.0,
            "service.yaml",
            &service_with_cluster_ips(
                "default",
                "web",
                &[CHART_VIP.into(), CHART_VIP6.into()],
                &[("http", 80, "TCP")],
                serde_json::json!({}),
            ),
        );
        let endpoints = [Endpoint::ready(&backend.name, backend.ip)];
        let slice = endpoint_slice("default", "web", &[("http", TCP_PORT, "TCP")], &endpoints);
        write_yaml(&manifests.0, "slice.yaml", &slice);
        let endpoints6 = [Endpoint::ready(&backend.name, backend.ip6)];
        let slice6 = endpoint_slice6("default", "web", &[("http", TCP_PORT, "TCP")], &endpoints6);
        write_yaml(&manifests.0, "slice6.yaml", &slice6);
        let source = format!("--source=dir:{}", manifests.0.display());
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.push(&source);
        let namespaces = layout.map(layout::Layout::namespaces).unwrap_or_default();
        let agent = lb_tests::agent::Agent::start_entering(&cluster.node, &namespaces, &all).unwrap();
        Self { agent, _server: server, _manifests: manifests, cluster }
    }

    /// Waits for the first sync (read from the log: the pins may be on a
    /// bpffs only the layout sees).
    fn wait_until_synced(&mut self) {
        self.agent.wait_for_log("synced frontends=2").unwrap();
    }

    /// Both cluster IPs answer a client on each of `paths`.
    fn serves(&self, paths: &[lb_tests::clients::ClientPath]) {
        use lb_tests::clients::{Client, ClientPath};
        let targets: [std::net::SocketAddr; 2] =
            [(CHART_VIP, 80).into(), (std::net::IpAddr::from(CHART_VIP6), 80).into()];
        for (path, target) in paths.iter().flat_map(|p| targets.map(|t| (p, t))) {
            let netns = if *path == ClientPath::Host { &self.cluster.node } else { &self.cluster.pod("client").netns };
            // The pod interfaces are attached within the 500 ms interface poll.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let answer = loop {
                let answer = Client::start(*path, netns, None).ask("tcp", target);
                if answer.pod() == Some("backend-0") || std::time::Instant::now() > deadline {
                    break answer;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            };
            assert!(answer.pod() == Some("backend-0"), "{path:?} {target}: {answer:?}\n{}", self.agent.log());
        }
    }

    /// /healthz: (status, the `degraded` features).
    fn healthz(&self) -> (u16, serde_json::Value) {
        let addr = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 10256);
        let (status, body) = self.cluster.node.enter(|| lb_tests::pods::http_get(addr, "/healthz")).unwrap();
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (status, body["degraded"].clone())
    }
}

#[test]
fn the_agent_with_the_charts_default_arguments_serves_a_cluster_ip_on_this_host() {
    // This host is hybrid: v1 controllers at /sys/fs/cgroup, v2 at
    // /sys/fs/cgroup/unified; bpffs at /sys/fs/bpf.
    use lb_tests::clients::ClientPath;
    let mut chart = ChartAgent::start(None);
    chart.wait_until_synced();
    chart.agent.wait_for_log("sockets balanced at connect cgroup=/sys/fs/cgroup/unified").unwrap();
    chart.serves(&[ClientPath::Host, ClientPath::PodTc]);
    assert_eq!(chart.healthz(), (200, serde_json::json!({})));
}

#[test]
fn unified_cgroup_v2_at_sys_fs_cgroup() {
    use lb_tests::clients::ClientPath;
    let layout = layout::Layout::new("umount -l /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup", false);
    let mut chart = ChartAgent::start(Some(&layout));
    chart.wait_until_synced();
    chart.agent.wait_for_log("sockets balanced at connect cgroup=/sys/fs/cgroup ").unwrap();
    chart.serves(&[ClientPath::Host, ClientPath::PodTc]);
}

#[test]
fn no_cgroup_v2_mounted_serves_pods_then_the_init_container_mounts_it() {
    use lb_tests::clients::ClientPath;
    let layout = layout::Layout::new("umount -l /sys/fs/cgroup", false);
    let mut chart = ChartAgent::start(Some(&layout));
    chart.wait_until_synced();
    // Without it, only socket-level balancing is lost: said in the log,
    // /healthz (still healthy) and metrics; pods are served.
    chart.agent.wait_for_log("no cgroup v2 hierarchy is mounted here").unwrap();
    chart.serves(&[ClientPath::PodTc]);
    let (status, degraded) = chart.healthz();
    assert_eq!(status, 200);
    assert!(degraded["socket_lb"].as_str().unwrap().contains("no cgroup v2"), "{degraded}");

    let dir = layout.cgroup2_dir.display().to_string();
    let said = layout.init_container(&[&format!("--cgroup2={dir}")]);
    assert_eq!(said.trim(), format!("mounted cgroup v2 at {dir}"));
    assert_eq!(
        layout.init_container(&[&format!("--cgroup2={dir}")]).trim(),
        format!("cgroup v2 already mounted at {dir}")
    );
    chart.agent.restart().unwrap();
    chart.agent.wait_for_log(&format!("sockets balanced at connect cgroup={dir}")).unwrap();
    chart.agent.wait_for_log_count("synced frontends=2", 2).unwrap();
    chart.serves(&[ClientPath::Host, ClientPath::PodTc]);
    assert_eq!(chart.healthz(), (200, serde_json::json!({})));
}

#[test]
fn a_private_cgroup_namespace_sees_a_subtree_until_the_init_container_mounts_the_hosts() {
    use lb_tests::clients::ClientPath;
    // As a container runtime with a private cgroup namespace gives a pod:
    // /sys/fs/cgroup is the pod's own cgroup.
    let layout = layout::Layout::new("umount -l /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup", true);
    let mut chart = ChartAgent::start(Some(&layout));
    chart.wait_until_synced();
    chart.agent.wait_for_log("only part of the cgroup v2 hierarchy is mounted here (/sys/fs/cgroup").unwrap();
    chart.serves(&[ClientPath::PodTc]);
    assert!(chart.healthz().1["socket_lb"].is_string());

    // The init container mounts the hierarchy from the host's cgroup
    // namespace: its root, whatever the agent's namespace shows.
    let dir = layout.cgroup2_dir.display().to_string();
    layout.init_container(&[&format!("--cgroup2={dir}")]);
    chart.agent.restart().unwrap();
    chart.agent.wait_for_log(&format!("sockets balanced at connect cgroup={dir}")).unwrap();
    chart.serves(&[ClientPath::Host, ClientPath::PodTc]);
}

#[test]
fn no_bpffs_on_the_host_is_refused_in_a_container_until_the_init_container_mounts_it() {
    use lb_tests::clients::ClientPath;
    // A container's mount namespace, where a bpffs the agent mounted would
    // vanish with the pod (and the datapath's pins with it).
    let layout = layout::Layout::new("umount -l /sys/fs/bpf", false);
    let mut chart = ChartAgent::start(Some(&layout));
    let status = chart.agent.wait_for_exit().unwrap();
    assert!(!status.success());
    let log = chart.agent.log();
    assert!(log.contains("bpffs is not mounted on the host at /sys/fs/bpf"), "{log}");
    assert!(log.contains("bpf.autoMount"), "says what to do: {log}");

    assert_eq!(layout.init_container(&["--bpffs=/sys/fs/bpf"]).trim(), "mounted bpffs at /sys/fs/bpf");
    chart.agent.restart().unwrap();
    chart.wait_until_synced();
    chart.serves(&[ClientPath::Host, ClientPath::PodTc]);
}
