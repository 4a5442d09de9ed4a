//! Service behaviours beyond plain ClusterIP, end to end with the real agent
//! (dir source) in the routed netns topology. Needs root.
use std::{
    collections::BTreeSet,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use lb_tests::{
    agent::{Agent, TempDir},
    netns::{Cluster, Netns, Topology},
    pods::{PodServer, TCP_PORT, tcp_ask},
};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

fn service(affinity: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: sticky}}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{{name: http, port: 80}}]\n{affinity}")
}

fn slice(backends: &[(&str, Ipv4Addr)]) -> String {
    let endpoints: String = backends.iter().map(|(n, ip)| format!("- addresses: [{ip}]\n  targetRef: {{kind: Pod, name: {n}}}\n")).collect();
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sticky-1, labels: {{kubernetes.io/service-name: sticky}}}}\naddressType: IPv4\nports: [{{name: http, port: {TCP_PORT}}}]\nendpoints:\n{endpoints}")
}

fn wait_for_affinity(agent: &mut Agent, timeout_s: u32, backends: usize) {
    agent
        .wait_for_maps(&format!("affinity {timeout_s}s, {backends} backends"), |c| {
            c.services.iter().any(|(k, v)| k.slot == 0 && v.affinity_timeout_s == timeout_s && v.backend_count as usize == backends)
        })
        .unwrap();
}

fn reached(client: &Netns, connections: usize) -> BTreeSet<String> {
    client.enter(|| (0..connections).map(|_| tcp_ask(VIP)).collect::<Result<_, _>>()).unwrap()
}

#[test]
fn session_affinity_holds_and_can_be_switched_at_run_time() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> = cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let client = &cluster.pod("client").netns;
    let manifests = TempDir::new("lb-affinity").unwrap();
    let on = |timeout: u32| format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n");
    write(&manifests.0, "service.yaml", &service(&on(60)));
    write(&manifests.0, "slice.yaml", &slice(&pods));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    wait_for_affinity(&mut agent, 60, 3);
    agent.wait_for_attachments(4).unwrap();

    let sticky = reached(client, 20);
    assert_eq!(sticky.len(), 1, "20 connections with ClientIP affinity reached {sticky:?}");

    // Off: connections spread again.
    write(&manifests.0, "service.yaml", &service(""));
    wait_for_affinity(&mut agent, 0, 3);
    assert!(reached(client, 30).len() > 1);

    // On again; then the remembered backend leaves the Service: the client
    // gets another backend and sticks to that one.
    write(&manifests.0, "service.yaml", &service(&on(30)));
    wait_for_affinity(&mut agent, 30, 3);
    let sticky = reached(client, 10);
    assert_eq!(sticky.len(), 1);
    let remembered = sticky.into_iter().next().unwrap();
    let rest: Vec<(&str, Ipv4Addr)> = pods.iter().copied().filter(|(n, _)| *n != remembered).collect();
    write(&manifests.0, "slice.yaml", &slice(&rest));
    wait_for_affinity(&mut agent, 30, 2);
    let after = reached(client, 10);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!after.contains(&remembered));
    let lb_services = agent.cli("services", &[]).unwrap();
    assert!(lb_services.contains("ClientIP 30s"), "{lb_services}");
}

#[test]
fn a_service_without_endpoints_refuses_at_once_and_undefined_ports_get_no_answer() {
    let cluster = Cluster::new(Topology::Routed, &["client"]).unwrap();
    let manifests = TempDir::new("lb-reject").unwrap();
    write(
        &manifests.0,
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]\n",
    );
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_maps("the empty service", |c| c.frontends().count() == 2).unwrap();
    agent.wait_for_attachments(1).unwrap();
    let client = &cluster.pod("client").netns;
    let empty = |port| std::net::SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), port));

    client.enter(|| {
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let error = std::net::TcpStream::connect_timeout(&empty(80), std::time::Duration::from_secs(3)).unwrap_err();
            let took = started.elapsed();
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");
            assert!(took < std::time::Duration::from_millis(100), "refused after {took:?}");
        }

        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.connect(empty(53)).unwrap();
        udp.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        udp.send(b"anyone?").unwrap();
        let error = udp.recv(&mut [0u8; 64]).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");

        // A port the Service does not define: no answer at all.
        let error = std::net::TcpStream::connect_timeout(&empty(8080), std::time::Duration::from_millis(500)).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    });
    let stats = agent.cli("stats", &["-o", "json"]).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let packets = |verdict: &str| {
        stats["verdicts"].as_array().unwrap().iter().find(|r| r["verdict"] == verdict).unwrap()["packets"].as_u64().unwrap()
    };
    assert_eq!(packets("reject_no_backend"), 6);
    assert!(packets("drop_unknown_port") >= 1);
}

#[test]
fn a_udp_flow_survives_the_removal_of_its_backend() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "client"]).unwrap();
    let _servers: Vec<PodServer> = cluster.pods[..2].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..2].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let dns = |backends: &[(&str, Ipv4Addr)]| {
        let endpoints: String = backends.iter().map(|(n, ip)| format!("- addresses: [{ip}]\n  targetRef: {{kind: Pod, name: {n}}}\n")).collect();
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{name: dns, port: {}, protocol: UDP}}]\nendpoints:\n{endpoints}", lb_tests::pods::UDP_PORT)
    };
    let manifests = TempDir::new("lb-udp").unwrap();
    write(&manifests.0, "service.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  clusterIP: 10.96.0.53\n  ports: [{name: dns, port: 53, protocol: UDP}]\n");
    write(&manifests.0, "slice.yaml", &dns(&pods));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_maps("2 UDP backends", |c| c.frontends().any(|(_, b)| b.len() == 2)).unwrap();
    agent.wait_for_attachments(3).unwrap();

    // One UDP "flow": one client socket, the same 5-tuple every time.
    let client = &cluster.pod("client").netns;
    let socket = client.enter(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53)).unwrap();
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        socket
    });
    let ask = || {
        socket.send(b"query").unwrap();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).expect("an answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = ask();
    assert_eq!(ask(), first, "the flow keeps its backend");
    let rest: Vec<(&str, Ipv4Addr)> = pods.iter().copied().filter(|(n, _)| *n != first).collect();
    write(&manifests.0, "slice.yaml", &dns(&rest));
    agent.wait_for_maps("1 UDP backend", |c| c.frontends().any(|(_, b)| b.len() == 1)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    // The agent forgets the flow right after the sync that removed it.
    while ask() == first {
        assert!(std::time::Instant::now() < deadline, "the flow still goes to removed {first}");
    }
    assert_eq!(ask(), rest[0].0);
}

fn hairpin(topology: Topology) {
    let cluster = Cluster::new(topology, &["self"]).unwrap();
    let pod = &cluster.pods[0];
    let _server = PodServer::start(&pod.netns, &pod.name).unwrap();
    let manifests = TempDir::new("lb-hairpin").unwrap();
    write(&manifests.0, "service.yaml", &service(""));
    write(&manifests.0, "slice.yaml", &slice(&[(pod.name.as_str(), pod.ip)]));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_maps("the service", |c| c.frontends().any(|(_, b)| b.len() == 1)).unwrap();
    agent.wait_for_attachments(1).unwrap();
    // The pod is both the client and the only backend.
    let answers = reached(&pod.netns, 10);
    assert_eq!(answers, BTreeSet::from(["self".to_owned()]));
    let mut session = pod.netns.enter(|| lb_tests::pods::Session::connect(VIP)).unwrap();
    for i in 0..20 {
        assert_eq!(session.ask(&format!("m{i}")).unwrap(), "self");
    }
}

#[test]
fn a_pod_reaches_itself_through_its_service_routed() {
    hairpin(Topology::Routed);
}

#[test]
fn a_pod_reaches_itself_through_its_service_bridged() {
    hairpin(Topology::Bridged);
}
