//! The benchmarks of issue 7, side by side with their anchors, in network
//! namespaces of their own. Run through `cargo xtask bench [--quick]`,
//! which builds everything in release first. Writes bench/RESULTS.md and
//! PNG plots next to it, prints a summary; reports, never fails on a
//! number.
//!
//! 1. New connections (TCP_CRR) vs number of Services (4 endpoints each,
//!    the target last): ours, kube-proxy iptables, kube-proxy nftables,
//!    and the direct path (no load balancer).
//! 2. Kept-open connections (TCP_RR), the same four.
//! 3. Per-packet cost through BPF_PROG_TEST_RUN of the external hook (XDP
//!    and tc) and the pod hook (tc), against the minimal programs
//!    (`baseline.rs`).
//! 4. Control plane: cold start, one EndpointSlice change (through the
//!    test API server, `control-plane-bench`), ruleset loads of the anchors.
//! 5. Memory: agent RSS and kernel map memory.
//! 6. NodePort from a client outside the cluster (TCP_CRR), the one
//!    backend on the other node: ours with tc and with XDP, kube-proxy
//!    iptables, and the direct path to the pod.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use lb_tests::{
    agent::{Agent, TempDir, lb_binary},
    anchors::{self, AnchorService},
    clients::{TestCgroup, move_into_cgroup},
    harness::{Harness, round_trip_services, test_run, timing_frames, timing_frames6, xdp_ctx},
    interrupt,
    load::Report,
    manifests::{Endpoint, endpoint_slice, service, write_yaml},
    netns::{Cluster, Lan, MultiNode, Netns, Topology, run, unique_tag},
};
use lb_userspace::{
    datapath::{Baseline, MapSizes},
    model::{Algorithm, Frontend, FrontendKind, Protocol, ServicePort},
    plan::MaglevConfig,
};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// A run of a few minutes: fewer sizes, shorter loads.
    #[arg(long)]
    quick: bool,
    /// Benchmarks to run: crr, crr6, rr, packet, control, memory, nodeport (default all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Numbers of Services for the end-to-end benchmarks.
    #[arg(long, value_delimiter = ',')]
    services: Vec<u32>,
    /// Systems for the TCP_CRR and memory benchmarks: ours, ours-socket,
    /// iptables, nftables, direct (default all). Ours and direct alone
    /// skip the anchors' ruleset loads, which take minutes at 30,000
    /// Services and more.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Seconds of load per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Where RESULTS.md and the plots go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
}

const SYSTEMS: [System; 5] = [System::Ours, System::OursSocket, System::Iptables, System::Nftables, System::Direct];
const CONCURRENCY: &str = "2";
const TARGET_PORT: u16 = 8080;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    /// The agent's defaults: the pod client's flows through tc.
    Ours,
    /// `--socket-lb all`: the pod client's sockets translated at connect.
    OursSocket,
    Iptables,
    Nftables,
    Direct,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::OursSocket => "ours-socket",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Direct => "direct",
        }
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1)
}

fn fake_endpoint(i: u32, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 4 + n)
}

/// Service `i`'s cluster IP in the family of `like`, and its `n`th fake
/// endpoint (IPv6: fd00:96::/96 and fd00:128::/96 with IPv4's low bits).
fn vip_like(like: IpAddr, i: u32) -> IpAddr {
    match like {
        IpAddr::V4(_) => vip(i).into(),
        IpAddr::V6(_) => {
            Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + u128::from(i) + 1).into()
        }
    }
}

fn fake_endpoint_like(like: IpAddr, i: u32, n: u32) -> IpAddr {
    match like {
        IpAddr::V4(_) => fake_endpoint(i, n).into(),
        IpAddr::V6(_) => {
            Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 0)) + u128::from(i * 4 + n)).into()
        }
    }
}

/// N Services of 4 endpoints; the last one's endpoints are the real
/// backend pods; all of the backends' family.
fn anchor_services(n: u32, backends: &[IpAddr]) -> Vec<AnchorService> {
    let like = backends[0];
    (0..n)
        .map(|i| AnchorService {
            name: format!("bench/svc-{i}:http"),
            vip: vip_like(like, i),
            port: 80,
            endpoints: if i + 1 == n {
                backends.to_vec()
            } else {
                (0..4).map(|e| fake_endpoint_like(like, i, e)).collect()
            },
            target_port: TARGET_PORT,
            node_port: None,
        })
        .collect()
}

/// The same Services as manifests for the agent's dir source, one file.
fn manifests(services: &[AnchorService]) -> String {
    let mut out = String::new();
    for (i, s) in services.iter().enumerate() {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: \"{}\", ipFamilies: [{family}], ports: [{{name: http, port: 80, protocol: TCP}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-x, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: {family}\nports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}]\nendpoints:\n",
            s.vip,
            family = if s.vip.is_ipv6() { "IPv6" } else { "IPv4" },
        );
        for e in &s.endpoints {
            let _ = writeln!(out, "- addresses: [\"{e}\"]\n  conditions: {{ready: true}}");
        }
        out.push_str("---\n");
    }
    out
}

/// A process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn load_binary() -> PathBuf {
    lb_binary().with_file_name("lb-load")
}

fn in_netns(netns: &Netns) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", netns.path().display()));
    command
}

/// What one end-to-end measurement found besides the load report.
#[derive(Default)]
struct Setup {
    /// Time to a programmed datapath (agent) or a loaded ruleset (anchors).
    load: Option<Duration>,
    /// Time to apply one endpoint change (anchors).
    change: Option<Duration>,
    agent_rss_kib: Option<u64>,
    map_kib: Option<u64>,
}

/// One end-to-end run: fresh namespaces (TIME_WAIT left by an earlier run
/// would stall SYNs), four backend pods, a client pod, the system under
/// test programmed with `n` Services (IPv6 ones with `ipv6`: the pods are
/// dual-stack), then the load.
fn end_to_end(system: System, n: u32, mode: &str, seconds: f64, ipv6: bool) -> anyhow::Result<(Report, Setup)> {
    let cluster = Cluster::new(Topology::Routed, &["client", "b1", "b2", "b3", "b4"])?;
    let backends: Vec<IpAddr> =
        cluster.pods[1..].iter().map(|p| if ipv6 { IpAddr::from(p.ip6) } else { IpAddr::from(p.ip) }).collect();
    // Tens of thousands of connections in a few seconds: the client's
    // ports would otherwise run out behind TIME_WAIT and time the port
    // search, not the path.
    let client_ns = &cluster.pods[0].netns;
    client_ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    client_ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let _servers: Vec<Process> = cluster.pods[1..]
        .iter()
        .map(|p| in_netns(&p.netns).arg(load_binary()).arg("serve").stdout(Stdio::null()).spawn().map(Process))
        .collect::<Result<_, _>>()?;
    let services = anchor_services(n, &backends);
    let target_vip = services.last().expect("n >= 1").vip;
    let mut setup = Setup::default();
    let manifests_dir = TempDir::new("lb-bench-manifests")?;
    let rules = TempDir::new("lb-bench-rules")?;
    let _agent; // kept running through the load
    let socket_cgroup = (system == System::OursSocket).then(TestCgroup::new);
    // Timed after the load: with one Service, the change is the target's.
    let mut change_after_load: Option<Vec<String>> = None;
    let target = match system {
        System::Direct => SocketAddr::new(backends[0], TARGET_PORT),
        System::Ours | System::OursSocket => {
            fs::write(manifests_dir.0.join("services.yaml"), manifests(&services))?;
            let started = Instant::now();
            let dir = format!("dir:{}", manifests_dir.0.display());
            // No sizing flags: the agent sizes its maps for the cluster.
            let mut args = vec!["--source", &dir, "--metrics-addr", "", "--healthz-addr", ""];
            let cgroup_arg = socket_cgroup.as_ref().map(|c| c.0.display().to_string());
            if let Some(cgroup) = &cgroup_arg {
                // `all` at a cgroup of the bench's own: only its client is
                // translated, nothing else running on the machine.
                args.extend(["--socket-lb", "all", "--cgroup-path", cgroup]);
            }
            let mut agent = Agent::start(&cluster.node, &args)?;
            agent.wait_for_attachments(cluster.pods.len())?;
            let frontends = format!("{n} frontends");
            match ipv6 {
                false => agent.wait_for_maps(&frontends, |c| c.frontends().count() == n as usize)?,
                true => agent.wait_for_maps6(&frontends, |c| c.frontends().count() == n as usize)?,
            }
            setup.load = Some(started.elapsed());
            setup.agent_rss_kib = Some(agent.rss_kib()?);
            setup.map_kib = Some(agent.map_memory_kib()?);
            _agent = agent;
            SocketAddr::new(target_vip, 80)
        }
        System::Iptables => {
            // kube-proxy writes each family's rules with its own tool.
            let restore = if ipv6 { "ip6tables-restore" } else { "iptables-restore" };
            let path = rules.0.join("iptables.rules");
            fs::write(&path, anchors::iptables_ruleset(&services))?;
            let node = format!("--net={}", cluster.node.path().display());
            setup.load = Some(timed(restore, &[&node, restore, path_str(&path)?])?);
            let (old, new) = changed(&services[0]);
            let change = rules.0.join("iptables.change");
            fs::write(&change, anchors::iptables_service_update(&old, &new))?;
            change_after_load = Some(vec![node, restore.into(), "--noflush".into(), path_str(&change)?.into()]);
            SocketAddr::new(target_vip, 80)
        }
        System::Nftables => {
            let path = rules.0.join("nftables.nft");
            fs::write(&path, anchors::nftables_ruleset("kube-proxy", &services))?;
            let node = format!("--net={}", cluster.node.path().display());
            setup.load = Some(timed("nft", &[&node, "nft", "-f", path_str(&path)?])?);
            let (old, new) = changed(&services[0]);
            let change = rules.0.join("nftables.change");
            fs::write(&change, anchors::nftables_service_update("kube-proxy", &old, &new))?;
            change_after_load = Some(vec![node, "nft".into(), "-f".into(), path_str(&change)?.into()]);
            SocketAddr::new(target_vip, 80)
        }
    };
    let mut client = in_netns(&cluster.pods[0].netns);
    if let Some(cgroup) = &socket_cgroup {
        move_into_cgroup(&mut client, &cgroup.0);
    }
    let out = client
        .arg(load_binary())
        .args([mode, "--target", &target.to_string(), "--seconds", &seconds.to_string(), "--concurrency", CONCURRENCY])
        .output()?;
    if !out.status.success() {
        bail!("lb-load {mode}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: Report = serde_json::from_slice(&out.stdout)?;
    if let Some(change) = change_after_load {
        let args: Vec<&str> = change.iter().map(String::as_str).collect();
        setup.change = Some(timed(args[1], &args)?);
    }
    Ok((report, setup))
}

/// What serves the NodePort in the NodePort benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodePortSystem {
    /// An agent per node with the default flags (`--external-datapath
    /// auto`: tc on veth uplinks).
    Ours,
    /// An agent per node with `--external-datapath xdp`.
    OursXdp,
    /// kube-proxy's iptables rules on each node, no agent.
    Iptables,
    /// No load balancer: the client straight to the backend pod.
    Direct,
}

/// The NodePort benchmark's runs, each on the LAN it needs.
const NODE_PORT_RUNS: [(NodePortSystem, Lan); 5] = [
    // kind's topology.
    (NodePortSystem::Ours, Lan::PlainBridge),
    // XDP forwarding to the other node works on veths only on this LAN,
    // whose ports run XDP themselves (on a plain bridge the frames XDP
    // sends wait in the peer's ring: see `Lan::XdpCapable`).
    (NodePortSystem::OursXdp, Lan::XdpCapable),
    (NodePortSystem::Iptables, Lan::PlainBridge),
    // A direct path on each LAN, so that each row is compared on its own.
    (NodePortSystem::Direct, Lan::PlainBridge),
    (NodePortSystem::Direct, Lan::XdpCapable),
];
const NODE_PORT: u16 = 30080;
const NODE_PORT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// NodePort TCP_CRR on two fresh nodes: the external client connects to
/// node 1's address, whose only backend is a pod on node 2, so every
/// connection is translated (and source-NATed) on node 1 and crosses to
/// node 2. Returns the report and what served it (with eth0's program,
/// as `lb stats` names it, for ours).
fn node_port_crr(system: NodePortSystem, lan: Lan, seconds: f64) -> anyhow::Result<(Report, String)> {
    let mut topology = MultiNode::new(2, &[], lan)?;
    let backend = topology.add_pod(2, "backend")?.ip;
    let client = &topology.client;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let _server = in_netns(&topology.pod("backend").netns)
        .arg(load_binary())
        .arg("serve")
        .stdout(Stdio::null())
        .spawn()
        .map(Process)?;
    let node_port = SocketAddrV4::new(MultiNode::node_ip(1), NODE_PORT);
    let manifests_dir = TempDir::new("lb-bench-manifests")?;
    let rules = TempDir::new("lb-bench-rules")?;
    let mut agents = Vec::new(); // kept running through the load
    let (target, served_by) = match system {
        NodePortSystem::Direct => {
            // As a router that knows the pod range would route.
            client.ip(&["route", "add", "10.1.2.0/24", "via", &MultiNode::node_ip(2).to_string()])?;
            (SocketAddrV4::new(backend, TARGET_PORT), "direct (no load balancer)".to_owned())
        }
        NodePortSystem::Iptables => {
            let path = rules.0.join("iptables.rules");
            let service = AnchorService {
                name: "bench/np:http".into(),
                vip: NODE_PORT_VIP.into(),
                port: 80,
                endpoints: vec![backend.into()],
                target_port: TARGET_PORT,
                node_port: Some(NODE_PORT),
            };
            fs::write(&path, anchors::iptables_ruleset(&[service]))?;
            // On both nodes, as kube-proxy runs on both (node 2's rules
            // only cost its conntrack and a miss).
            for node in &topology.nodes {
                timed(
                    "iptables-restore",
                    &[&format!("--net={}", node.path().display()), "iptables-restore", path_str(&path)?],
                )?;
            }
            (node_port, "kube-proxy iptables".to_owned())
        }
        NodePortSystem::Ours | NodePortSystem::OursXdp => {
            let mut svc = service("bench", "np", NODE_PORT_VIP, &[("http", 80, "TCP")], json!({"type": "NodePort"}));
            svc["spec"]["ports"][0]["nodePort"] = json!(NODE_PORT);
            write_yaml(&manifests_dir.0, "np.yaml", &svc);
            let endpoint = Endpoint::ready("backend", backend).on("node-2");
            let slice = endpoint_slice("bench", "np", &[("http", TARGET_PORT, "TCP")], &[endpoint]);
            write_yaml(&manifests_dir.0, "np-slice.yaml", &slice);
            let dir = format!("dir:{}", manifests_dir.0.display());
            for n in 1..=2 {
                let node_name = format!("node-{n}");
                let mut args =
                    vec!["--source", &dir, "--node-name", &node_name, "--metrics-addr", "", "--healthz-addr", ""];
                if system == NodePortSystem::OursXdp {
                    args.extend(["--external-datapath", "xdp"]);
                }
                let mut agent = Agent::start(&topology.nodes[n - 1], &args)?;
                // The pod veths and eth0.
                agent.wait_for_attachments(topology.pods.iter().filter(|(m, _)| *m == n).count() + 1)?;
                agent.wait_for_maps("the node port with its backend", |c| {
                    c.frontends().any(|(k, b)| k.port == NODE_PORT.to_be_bytes() && k.protocol == 6 && b.len() == 1)
                })?;
                agents.push(agent);
            }
            let stats: serde_json::Value = serde_json::from_str(&agents[0].cli("stats", &["-o", "json"])?)?;
            let eth0: Vec<&str> = stats["attachments"]
                .as_array()
                .context("lb stats: no attachments")?
                .iter()
                .filter(|a| a["interface"] == "eth0")
                .filter_map(|a| a["program"].as_str())
                .collect();
            let flags = if system == NodePortSystem::Ours { "default flags" } else { "--external-datapath xdp" };
            (node_port, format!("ours, {flags} (eth0: {})", eth0.join(", ")))
        }
    };
    wait_until_connects(client, target)?;
    let out = in_netns(client)
        .arg(load_binary())
        .args(["crr", "--target", &target.to_string(), "--seconds", &seconds.to_string(), "--concurrency", CONCURRENCY])
        .output()?;
    if !out.status.success() {
        bail!("lb-load crr: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((serde_json::from_slice(&out.stdout)?, served_by))
}

/// Waits (up to 5 s) until a TCP connection from `netns` to `target`
/// completes: the server listens and the path works, its neighbours
/// resolved before the load starts.
fn wait_until_connects(netns: &Netns, target: SocketAddrV4) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    netns.enter(|| {
        while std::net::TcpStream::connect_timeout(&target.into(), Duration::from_millis(500)).is_err() {
            if Instant::now() > deadline {
                bail!("{target} does not answer");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

/// Runs `nsenter ARGS` and returns how long it took.
fn timed(what: &str, args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    run("nsenter", args).with_context(|| what.to_owned())?;
    Ok(started.elapsed())
}

/// `service` before and after its first endpoint is replaced.
fn changed(service: &AnchorService) -> (AnchorService, AnchorService) {
    let mut new = service.clone();
    new.endpoints[0] = fake_endpoint_like(service.vip, 1 << 20, 1);
    (service.clone(), new)
}

const HOOK_XDP_WIRE: &str = "xdp (external)";
const HOOK_TC_WIRE: &str = "tc (external)";
const HOOK_TC_POD: &str = "tc (pod)";
const HOOK_XDP_WIRE6: &str = "xdp (external), IPv6";
const HOOK_TC_WIRE6: &str = "tc (external), IPv6";
const HOOK_TC_POD6: &str = "tc (pod), IPv6";

/// One row of the per-packet table.
struct Cost {
    hook: &'static str,
    services: u32,
    backends: u32,
    algorithm: Algorithm,
    new_flow: u64,
    established: u64,
    not_a_service: u64,
    baseline: u64,
}

/// Per-packet cost by BPF_PROG_TEST_RUN, on the timed frontend of
/// `round_trip_services`: a real new flow on every SYN run and a real
/// established-flow hit on every ACK run, each with its rewrite. The timed
/// frontend has `backends` backends (frontends that lead back to it), so
/// half the SYN runs pick among them and half pick the one way back.
fn packet_costs(quick: bool) -> anyhow::Result<Vec<Cost>> {
    let repeat = 1_000_000;
    let netns = Netns::new(format!("lbt{}-cost", unique_tag()))?;
    netns.ip(&["link", "set", "lo", "up"])?;
    let mut baseline = Baseline::load()?;
    let node = Ipv4Addr::new(10, 200, 0, 1);
    let timed = SocketAddrV4::new(node, 8080);
    let client = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 100), 40000);
    let frames = timing_frames(client, timed, SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 7), 80)).map(|(_, f)| f);
    let baseline_xdp = netns
        .enter(|| test_run(baseline.xdp().expect("baseline"), &frames[1], Some(&xdp_ctx(&frames[1], 1)), repeat).2);
    let baseline_tc = test_run(baseline.tc()?, &frames[1], None, repeat).2;

    let sweeps: Vec<(u32, u32, Algorithm)> = if quick {
        vec![
            (1, 4, Algorithm::Random),
            (10_000, 4, Algorithm::Random),
            (1, 100, Algorithm::Random),
            (1, 100, Algorithm::Maglev),
        ]
    } else {
        vec![
            (1, 4, Algorithm::Random),
            (1_000, 4, Algorithm::Random),
            (100_000, 4, Algorithm::Random),
            (1, 1, Algorithm::Random),
            (1, 1_000, Algorithm::Random),
            (1, 4, Algorithm::Maglev),
            (1, 1_000, Algorithm::Maglev),
        ]
    };
    let mut costs = Vec::new();
    for (services, backends, algorithm) in sweeps {
        // The other Services, filling the maps.
        let mut ports: Vec<ServicePort> = (1..services)
            .map(|i| ServicePort {
                name: format!("svc-{i}"),
                frontend: Frontend { addr: vip(i).into(), port: 80, protocol: Protocol::Tcp },
                backends: (0..backends)
                    .map(|b| SocketAddrV4::new(fake_endpoint(i, b % 4), 8080 + (b / 4) as u16).into())
                    .collect(),
                ..Default::default()
            })
            .collect();
        let way_back: Vec<SocketAddrV4> =
            (0..backends).map(|b| SocketAddrV4::new(Ipv4Addr::new(10, 99, (b >> 8) as u8, b as u8), 8080)).collect();
        ports.extend(round_trip_services(timed, FrontendKind::NodePort, &way_back, algorithm));
        let sizes = MapSizes {
            services: (services * (backends + 1) + 1024).max(lb_common::DEFAULT_SERVICES_MAX_ENTRIES),
            backends: (services * backends + 1024).max(lb_common::DEFAULT_BACKENDS_MAX_ENTRIES),
            maglev: MaglevConfig { tables: 4, table_size: 16381 },
            ..MapSizes::default()
        };
        let mut harness = Harness::with_sizes(&ports, sizes);
        // The external interface's two programs (the one `auto` picks per
        // driver) and the pod interfaces' program, on the same frames.
        let mut xdp_wire = [0u64; 3];
        let mut tc_wire = [0u64; 3];
        let mut tc_pod = [0u64; 3];
        for (i, frame) in frames.iter().enumerate() {
            xdp_wire[i] = harness.run_xdp(&netns, 1, frame, repeat).2;
            tc_wire[i] = harness.run_tc_wire(&netns, 1, frame, repeat).2;
            tc_pod[i] = harness.run_tc(frame, repeat).2;
        }
        for (hook, ns, baseline) in [
            (HOOK_XDP_WIRE, xdp_wire, baseline_xdp),
            (HOOK_TC_WIRE, tc_wire, baseline_tc),
            (HOOK_TC_POD, tc_pod, baseline_tc),
        ] {
            costs.push(Cost {
                hook,
                services,
                backends,
                algorithm,
                new_flow: ns[0],
                established: ns[1],
                not_a_service: ns[2],
                baseline,
            });
        }
    }
    costs.extend(ipv6_costs(&netns, &mut baseline, repeat)?);
    Ok(costs)
}

/// The three hooks on IPv6 frames (each IPv4 program tail-calling its
/// IPv6 half), on the same round trip as IPv4's, with 4 backends; the
/// minimal programs parse the same IPv6 headers.
fn ipv6_costs(netns: &Netns, baseline: &mut Baseline, repeat: u32) -> anyhow::Result<Vec<Cost>> {
    let at = |addr: &str, port: u16| SocketAddrV6::new(addr.parse::<Ipv6Addr>().unwrap(), port, 0, 0);
    let timed = at("fd00:200::1", 8080);
    let way_back: Vec<SocketAddrV6> = (1..=4).map(|b| at(&format!("fd00:99::{b}"), 8080)).collect();
    let mut harness = Harness::new(&round_trip_services(timed, FrontendKind::NodePort, &way_back, Algorithm::Random));
    let frames = timing_frames6(at("fd00:200::100", 40000), timed, at("fd00:200::7", 80)).map(|(_, frame)| frame);
    let baseline_xdp = netns
        .enter(|| test_run(baseline.xdp().expect("baseline"), &frames[1], Some(&xdp_ctx(&frames[1], 1)), repeat).2);
    let baseline_tc = test_run(baseline.tc()?, &frames[1], None, repeat).2;
    let mut costs = Vec::new();
    for (hook, baseline) in [(HOOK_XDP_WIRE6, baseline_xdp), (HOOK_TC_WIRE6, baseline_tc), (HOOK_TC_POD6, baseline_tc)]
    {
        let mut ns = [0u64; 3];
        for (i, frame) in frames.iter().enumerate() {
            ns[i] = match hook {
                HOOK_XDP_WIRE6 => harness.run_xdp(netns, 1, frame, repeat).2,
                HOOK_TC_WIRE6 => harness.run_tc_wire(netns, 1, frame, repeat).2,
                _ => harness.run_tc(frame, repeat).2,
            };
        }
        costs.push(Cost {
            hook,
            services: 1,
            backends: 4,
            algorithm: Algorithm::Random,
            new_flow: ns[0],
            established: ns[1],
            not_a_service: ns[2],
            baseline,
        });
    }
    Ok(costs)
}

/// Runs `control-plane-bench N CHANGES` and returns its lines.
fn control_plane(services: u32, changes: u32) -> anyhow::Result<Vec<String>> {
    let binary = lb_binary().with_file_name("control-plane-bench");
    let out = Command::new(binary).args([services.to_string(), changes.to_string()]).output()?;
    if !out.status.success() {
        bail!("control-plane-bench {services}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// A load table row: Services, system, rate, p50, p99, and `last`.
fn row(n: u32, system: System, r: &Report, last: &str) -> String {
    format!("| {n} | {} | {:.0} | {:.1} | {:.1} | {last} |", system.name(), r.rate, r.p50_us, r.p99_us)
}

fn ratio(a: f64, b: f64) -> String {
    if a == 0.0 || b == 0.0 { "-".into() } else { format!("{:.2}", a / b) }
}

/// Plots p50 new-connection latency against the number of Services.
fn plot_crr(path: &Path, crr: &BTreeMap<(System, u32), (Report, Setup)>, sizes: &[u32]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = crr.values().map(|(r, _)| r.p50_us).fold(0.0, f64::max) * 1.2 + 1.0;
    let xs: Vec<f64> = sizes.iter().map(|n| f64::from(*n).log10()).collect();
    let x_max = xs.iter().copied().fold(0.0, f64::max) + 0.5;
    let mut chart = ChartBuilder::on(&root)
        .caption("TCP_CRR p50 latency vs number of Services", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.2..x_max, 0.0..max)?;
    chart
        .configure_mesh()
        .x_desc("Services (log10)")
        .y_desc("p50 µs per connection")
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .draw()?;
    for (system, color) in SYSTEMS.iter().zip([RED, MAGENTA, BLUE, GREEN, BLACK]) {
        let points: Vec<(f64, f64)> =
            sizes.iter().zip(&xs).filter_map(|(n, x)| crr.get(&(*system, *n)).map(|(r, _)| (*x, r.p50_us))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(system.name())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

/// Plots per-packet cost of each path against the minimal program.
fn plot_costs(path: &Path, costs: &[Cost]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let rows: Vec<&Cost> = costs.iter().collect();
    let width = (rows.len() as u32 * 90).max(1000);
    let root = BitMapBackend::new(path, (width, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows.iter().map(|c| c.new_flow.max(c.established) as f64).fold(0.0, f64::max) * 1.15 + 10.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("Per-packet cost (BPF_PROG_TEST_RUN): established / not a service / minimal", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..rows.len() as f64, 0.0..max)?;
    let labels: Vec<String> = rows
        .iter()
        .map(|c| format!("{} {}s {}b {:?}", c.hook, c.services, c.backends, c.algorithm).to_lowercase())
        .collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() + 1)
        .x_label_formatter(&|x| labels.get(*x as usize).cloned().unwrap_or_default())
        .y_desc("ns per packet")
        .draw()?;
    for (offset, color, label, value) in [
        (0.1, BLUE, "established flow", &(|c: &Cost| c.established) as &dyn Fn(&Cost) -> u64),
        (0.4, GREEN, "not a service", &|c: &Cost| c.not_a_service),
        (0.7, BLACK, "minimal program", &|c: &Cost| c.baseline),
    ] {
        chart
            .draw_series(rows.iter().enumerate().map(|(i, c)| {
                let x = i as f64 + offset;
                Rectangle::new([(x, 0.0), (x + 0.25, value(c) as f64)], color.filled())
            }))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

fn register_font() -> anyhow::Result<()> {
    let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = fs::read(path).with_context(|| format!("{path} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{path} is not a font"))
}

fn main() -> anyhow::Result<()> {
    interrupt::clean_up_on_interrupt();
    let args = Args::parse();
    let wants = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let sizes = if !args.services.is_empty() {
        args.services.clone()
    } else if args.quick {
        vec![1, 1_000]
    } else {
        vec![1, 1_000, 10_000, 30_000]
    };
    let seconds = args.seconds.unwrap_or(if args.quick { 2.0 } else { 5.0 });
    fs::create_dir_all(&args.out)?;
    register_font()?;
    let started = Instant::now();
    let kernel = run("uname", &["-r"])?.trim().to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let command: Vec<String> = std::env::args().skip(1).collect();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Command: `cargo xtask bench {}`. Machine: {cpus} CPUs, kernel {kernel}. Date: {}.\n",
        command.join(" "),
        run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?.trim()
    );
    let _ = writeln!(
        md,
        "Absolute numbers drift on shared machines; the ratios, taken within one run, are the result. \
         Load: `lb-load`, {CONCURRENCY} workers, {seconds} s per measurement, 64-byte request and response, \
         fresh namespaces per measurement. Each system serves N ClusterIP Services of 4 endpoints; the target is \
         the last one (last in iptables order).\n"
    );
    let mut summary = Vec::new();

    let mut crr: BTreeMap<(System, u32), (Report, Setup)> = BTreeMap::new();
    if wants("crr") || wants("memory") || wants("control") {
        let chosen = |s: &System| args.systems.is_empty() || args.systems.iter().any(|name| name == s.name());
        for n in &sizes {
            for system in SYSTEMS.into_iter().filter(chosen) {
                if system == System::Direct && *n != sizes[0] {
                    // The direct path has no Services: once is enough.
                    let (report, _) =
                        crr.get(&(System::Direct, sizes[0])).map(|(r, _)| (r.clone(), ())).context("direct")?;
                    crr.insert((system, *n), (report, Setup::default()));
                    continue;
                }
                eprintln!("bench: TCP_CRR, {} with {n} Services", system.name());
                let result = end_to_end(system, *n, "crr", seconds, false)?;
                crr.insert((system, *n), result);
            }
        }
        // Systems left out (`--systems`) read as zero, which `ratio` shows as "-".
        let missing = Report {
            mode: lb_tests::load::Mode::Crr,
            transactions: 0,
            errors: 0,
            seconds: 0.0,
            rate: 0.0,
            p50_us: 0.0,
            p90_us: 0.0,
            p99_us: 0.0,
        };
        let get = |s: System, n: u32| crr.get(&(s, n)).map_or(&missing, |(r, _)| r);
        md.push_str("## 1. New connections (TCP_CRR) vs number of Services\n\n");
        md.push_str("| Services | system | conn/s | p50 µs | p99 µs | errors |\n|---:|---|---:|---:|---:|---:|\n");
        for n in &sizes {
            for system in SYSTEMS.into_iter().filter(chosen) {
                let r = get(system, *n);
                let _ = writeln!(md, "{}", row(*n, system, r, &r.errors.to_string()));
            }
        }
        md.push_str(
            "\nRatios of p50 latency (below 1 is better for ours in the first column, above 1 in the others):\n\n",
        );
        md.push_str("| Services | ours/direct | iptables/ours | nftables/ours | ours conn/s / iptables conn/s |\n|---:|---:|---:|---:|---:|\n");
        for n in &sizes {
            let (o, i, f, d) =
                (get(System::Ours, *n), get(System::Iptables, *n), get(System::Nftables, *n), get(System::Direct, *n));
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {} |",
                ratio(o.p50_us, d.p50_us),
                ratio(i.p50_us, o.p50_us),
                ratio(f.p50_us, o.p50_us),
                ratio(o.rate, i.rate)
            );
        }
        let (first, last) = (sizes[0], *sizes.last().expect("sizes"));
        let flat = ratio(get(System::Ours, last).p50_us, get(System::Ours, first).p50_us);
        let _ = writeln!(md, "\nours({last}) / ours({first}) p50: {flat}. Plot: `crr.png`.\n");
        plot_crr(&args.out.join("crr.png"), &crr, &sizes)?;
        summary.push(format!(
            "TCP_CRR at {last} Services: ours/direct {}, iptables/ours {}, nftables/ours {}; ours({last})/ours({first}) {flat}",
            ratio(get(System::Ours, last).p50_us, get(System::Direct, last).p50_us),
            ratio(get(System::Iptables, last).p50_us, get(System::Ours, last).p50_us),
            ratio(get(System::Nftables, last).p50_us, get(System::Ours, last).p50_us),
        ));
    }

    if wants("crr6") {
        // The same over IPv6: IPv6 Services, the pods' IPv6 addresses, and
        // kube-proxy's IPv6 rulesets (ip6tables-restore, an `ip6` table).
        let sizes6: Vec<u32> = if args.quick { vec![1, 1_000] } else { vec![1, 1_000, 10_000] };
        let chosen = |s: &System| args.systems.is_empty() || args.systems.iter().any(|name| name == s.name());
        md.push_str("## 1b. New connections (TCP_CRR) over IPv6\n\n");
        md.push_str(
            "| Services | system | conn/s | p50 µs | p99 µs | p50 / ours p50 |\n|---:|---|---:|---:|---:|---:|\n",
        );
        let mut last = BTreeMap::new();
        for n in &sizes6 {
            let mut reports = BTreeMap::new();
            for system in SYSTEMS.into_iter().filter(chosen) {
                eprintln!("bench: TCP_CRR over IPv6, {} with {n} Services", system.name());
                reports.insert(system, end_to_end(system, *n, "crr", seconds, true)?.0);
            }
            let ours_p50 = reports.get(&System::Ours).map_or(0.0, |r| r.p50_us);
            for (system, r) in &reports {
                let _ = writeln!(md, "{}", row(*n, *system, r, &ratio(r.p50_us, ours_p50)));
            }
            last = reports;
        }
        md.push('\n');
        let p50 = |s: System| last.get(&s).map_or(0.0, |r| r.p50_us);
        summary.push(format!(
            "TCP_CRR over IPv6 at {} Services: ours/direct {}, ip6tables/ours {}, nftables/ours {}",
            sizes6.last().expect("sizes"),
            ratio(p50(System::Ours), p50(System::Direct)),
            ratio(p50(System::Iptables), p50(System::Ours)),
            ratio(p50(System::Nftables), p50(System::Ours)),
        ));
    }

    if wants("rr") {
        let rr_sizes: Vec<u32> = if args.quick { vec![1] } else { vec![1, 10_000] };
        md.push_str("## 2. Requests on kept-open connections (TCP_RR)\n\n");
        md.push_str(
            "| Services | system | req/s | p50 µs | p99 µs | p99 / ours p99 |\n|---:|---|---:|---:|---:|---:|\n",
        );
        for n in rr_sizes {
            let mut reports = BTreeMap::new();
            for system in SYSTEMS {
                eprintln!("bench: TCP_RR, {} with {n} Services", system.name());
                reports.insert(system, end_to_end(system, n, "rr", seconds, false)?.0);
            }
            let ours_p99 = reports[&System::Ours].p99_us;
            for (system, r) in &reports {
                let _ = writeln!(md, "{}", row(n, *system, r, &ratio(r.p99_us, ours_p99)));
            }
        }
        md.push('\n');
    }

    if wants("packet") {
        eprintln!("bench: per-packet cost");
        let costs = packet_costs(args.quick)?;
        md.push_str("## 3. Per-packet cost (BPF_PROG_TEST_RUN, repeat 1,000,000)\n\n");
        md.push_str(
            "ns per packet; the minimal program parses the same headers and passes, with no lookups.\n\n\
             | hook | Services | backends | algorithm | new flow | established | not a service | minimal | established / minimal | not a service / minimal | new flow / minimal |\n\
             |---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for c in &costs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:?} | {} | {} | {} | {} | {} | {} | {} |",
                c.hook,
                c.services,
                c.backends,
                c.algorithm,
                c.new_flow,
                c.established,
                c.not_a_service,
                c.baseline,
                ratio(c.established as f64, c.baseline as f64),
                ratio(c.not_a_service as f64, c.baseline as f64),
                ratio(c.new_flow as f64, c.baseline as f64)
            );
        }
        let mut lines = Vec::new();
        for (hook, label) in [
            (HOOK_XDP_WIRE, "XDP"),
            (HOOK_TC_WIRE, "tc external"),
            (HOOK_TC_POD, "tc pod"),
            (HOOK_XDP_WIRE6, "XDP IPv6"),
            (HOOK_TC_WIRE6, "tc external IPv6"),
            (HOOK_TC_POD6, "tc pod IPv6"),
        ] {
            let rows: Vec<&Cost> = costs
                .iter()
                .filter(|c| c.hook == hook && c.backends == 4 && c.algorithm == Algorithm::Random)
                .collect();
            if let (Some(small), Some(large)) = (rows.first(), rows.last()) {
                // The issue's targets: established <= 2x, not a service
                // <= 1.5x, new flow <= 8x, unchanged with the size.
                let scaled = if rows.len() > 1 {
                    format!(
                        "; {} Services cost {} of 1",
                        large.services,
                        ratio(large.established as f64, small.established as f64)
                    )
                } else {
                    String::new()
                };
                lines.push(format!(
                    "{label} established hit: {} ns ({}x minimal); not a service {} ns ({}x); new flow {} ns ({}x)\
                     {scaled}",
                    large.established,
                    ratio(large.established as f64, large.baseline as f64),
                    large.not_a_service,
                    ratio(large.not_a_service as f64, large.baseline as f64),
                    large.new_flow,
                    ratio(large.new_flow as f64, large.baseline as f64),
                ));
            }
        }
        md.push('\n');
        for line in lines {
            let _ = writeln!(md, "{line}.  ");
            summary.push(line);
        }
        md.push_str("\nPlot: `packet.png`.\n\n");
        plot_costs(&args.out.join("packet.png"), &costs)?;
    }

    if wants("control") {
        md.push_str("## 4. Control plane\n\n");
        md.push_str("Cold start of the agent (dir source) to a programmed datapath, and the anchors' ruleset loads, from the runs above:\n\n");
        md.push_str("| Services | ours cold start ms | iptables-restore ms | iptables one change ms | nft -f ms | nft one change ms |\n|---:|---:|---:|---:|---:|---:|\n");
        for n in &sizes {
            let setup = |s: System| crr.get(&(s, *n)).map(|(_, setup)| setup);
            let cell = |d: Option<Duration>| d.map_or("-".into(), ms);
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {} | {} |",
                cell(setup(System::Ours).and_then(|s| s.load)),
                cell(setup(System::Iptables).and_then(|s| s.load)),
                cell(setup(System::Iptables).and_then(|s| s.change)),
                cell(setup(System::Nftables).and_then(|s| s.load)),
                cell(setup(System::Nftables).and_then(|s| s.change)),
            );
        }
        let (control_sizes, changes): (Vec<u32>, u32) =
            if args.quick { (vec![1_000], 100) } else { (vec![1_000, 10_000, 30_000, 100_000], 300) };
        md.push_str("\nThrough the Kubernetes test API server (`control-plane-bench SERVICES CHANGES`):\n\n```\n");
        // One change, ours (p50 and p99) beside the anchors' at the sizes
        // both were run at.
        let mut one_change: Vec<(u32, String)> = Vec::new();
        for n in control_sizes {
            eprintln!("bench: control plane, {n} Services");
            for line in control_plane(n, changes)? {
                let _ = writeln!(md, "{line}");
                if line.starts_with("EndpointSlice change") || line.starts_with("cold start") {
                    summary.push(format!("{n} Services: {line}"));
                }
                if let Some(times) = line.strip_prefix("EndpointSlice change -> maps: ") {
                    one_change.push((n, times.to_owned()));
                }
            }
        }
        md.push_str("```\n\n| Services | ours one change | iptables one change ms | nft one change ms |\n|---:|---|---:|---:|\n");
        for (n, ours) in one_change {
            let change = |s: System| crr.get(&(s, n)).and_then(|(_, setup)| setup.change).map_or("-".into(), ms);
            let _ = writeln!(md, "| {n} | {ours} | {} | {} |", change(System::Iptables), change(System::Nftables));
        }
        md.push('\n');
    }

    if wants("memory") {
        md.push_str("## 5. Memory\n\n| Services | agent RSS MiB | kernel map memory MiB |\n|---:|---:|---:|\n");
        for n in &sizes {
            if let Some((_, setup)) = crr.get(&(System::Ours, *n)) {
                let mib = |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
                let _ = writeln!(md, "| {n} | {} | {} |", mib(setup.agent_rss_kib), mib(setup.map_kib));
            }
        }
        md.push('\n');
    }

    if wants("nodeport") {
        let mut runs = Vec::new();
        for (system, lan) in NODE_PORT_RUNS {
            eprintln!("bench: NodePort TCP_CRR, {system:?} on {lan:?}");
            runs.push((system, lan, node_port_crr(system, lan, seconds)?));
        }
        let p50 = |system: NodePortSystem, lan: Lan| {
            runs.iter().find(|(s, l, _)| (*s, *l) == (system, lan)).map_or(0.0, |(_, _, (r, _))| r.p50_us)
        };
        md.push_str("## 6. NodePort from outside the cluster (TCP_CRR, backend on the other node)\n\n");
        let _ = writeln!(
            md,
            "The client on the nodes' LAN connects to node 1's address and node port {NODE_PORT}; the Service's one \
             backend is a pod on node 2, so each connection is translated on node 1 and crosses to node 2. The direct \
             path goes to the pod through node 2's routing alone.\n"
        );
        md.push_str("| system | LAN | conn/s | p50 µs | p99 µs | errors | p50 / direct p50 |\n|---|---|---:|---:|---:|---:|---:|\n");
        for (_, lan, (r, served_by)) in &runs {
            let lan_name = match lan {
                Lan::PlainBridge => "plain bridge",
                Lan::XdpCapable => "XDP-capable",
            };
            let _ = writeln!(
                md,
                "| {served_by} | {lan_name} | {:.0} | {:.1} | {:.1} | {} | {} |",
                r.rate,
                r.p50_us,
                r.p99_us,
                r.errors,
                ratio(r.p50_us, p50(NodePortSystem::Direct, *lan))
            );
        }
        let (tc, xdp, iptables) = (
            p50(NodePortSystem::Ours, Lan::PlainBridge),
            p50(NodePortSystem::OursXdp, Lan::XdpCapable),
            p50(NodePortSystem::Iptables, Lan::PlainBridge),
        );
        let line = format!(
            "NodePort TCP_CRR to the other node: tc p50 {tc:.1} µs, xdp {xdp:.1} µs, iptables {iptables:.1} µs \
             (iptables/tc {}, iptables/xdp {})",
            ratio(iptables, tc),
            ratio(iptables, xdp)
        );
        let _ = writeln!(md, "\n{line}.\n");
        summary.push(line);
    }

    let _ = writeln!(md, "Whole run: {:.0} s.", started.elapsed().as_secs_f64());
    let results = args.out.join("RESULTS.md");
    fs::write(&results, md)?;
    println!("wrote {}", results.display());
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}
