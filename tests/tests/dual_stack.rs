//! IPv6 and dual-stack Services end to end: the real agent, with its
//! default flags, in a node namespace; dual-stack pods (`netns::Cluster`
//! gives every pod an IPv4 and an IPv6 address) in both CNI topologies;
//! the Services and slices as a dual-stack cluster has them (one slice per
//! address family). Pods reach IPv6 cluster IPs through the pods' hook
//! (`tc_from_pod6`, by tail call from `tc_from_pod`). Needs root.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{Agent, TempDir},
    manifests::{Endpoint, Port, endpoint_slice, endpoint_slice6, service_with_cluster_ips, write_yaml},
    netns::{Cluster, NODE_IP, NODE_IP6, Pod, Topology},
    pods::{PodServer, Session, TCP_PORT, UDP_PORT, tcp_ask, udp_ask},
    traffic::Traffic,
};
use serde_json::json;

const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];
/// An IPv6-only Service.
const SIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// A dual-stack Service's two cluster IPs.
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
/// The IPv6-only Service's node port (TCP and UDP).
const NODE_PORT: u16 = 30080;
/// An IPv6 Service without endpoints.
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30);
/// An IPv6-only Service whose one endpoint is backend-0: hairpin.
const SELF6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x40);

fn write_slices(dir: &Path, service: &str, backends: &[&Pod], ipv4: bool) {
    let endpoints6: Vec<Endpoint> = backends.iter().map(|p| Endpoint::ready(&p.name, p.ip6)).collect();
    write_yaml(dir, &format!("{service}-slice6.yaml"), &endpoint_slice6("demo", service, &SLICE_PORTS, &endpoints6));
    if ipv4 {
        let endpoints: Vec<Endpoint> = backends.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
        write_yaml(dir, &format!("{service}-slice.yaml"), &endpoint_slice("demo", service, &SLICE_PORTS, &endpoints));
    }
}

/// Asks `count` new TCP connections to `addr` which backends answer.
fn reached(client: &Pod, addr: SocketAddr, count: usize) -> BTreeSet<String> {
    let answers: Vec<String> =
        client.netns.enter(|| (0..count).map(|_| tcp_ask(addr)).collect::<Result<_, _>>()).unwrap();
    answers.into_iter().collect()
}

fn dual_stack_end_to_end(topology: Topology) {
    let cluster = Cluster::new(topology, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let backends: Vec<&Pod> = cluster.pods[..3].iter().collect();
    let manifests = TempDir::new("lb-manifests").unwrap();
    let dir = &manifests.0;
    // A NodePort: its node ports are served on the node's IPv6 addresses
    // (the Service has no IPv4 cluster IP, so none on IPv4 ones).
    let node_ports = json!({"type": "NodePort", "ports": [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": NODE_PORT},
        {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP", "nodePort": NODE_PORT},
    ]});
    write_yaml(dir, "six.yaml", &service_with_cluster_ips("demo", "six", &[SIX.into()], &PORTS, node_ports));
    write_slices(dir, "six", &backends, false);
    let dual = service_with_cluster_ips("demo", "dual", &[DUAL4.into(), DUAL6.into()], &PORTS, json!({}));
    write_yaml(dir, "dual.yaml", &dual);
    write_slices(dir, "dual", &backends[..2], true);
    write_yaml(dir, "empty6.yaml", &service_with_cluster_ips("demo", "empty6", &[EMPTY6.into()], &PORTS, json!({})));
    write_yaml(dir, "self6.yaml", &service_with_cluster_ips("demo", "self6", &[SELF6.into()], &PORTS, json!({})));
    write_slices(dir, "self6", &backends[..1], false);

    // Default flags.
    let mut agent = Agent::with_manifests(&cluster.node, dir).unwrap();
    let tcp_backends = |vip: [u32; 4], count: usize| {
        move |c: &lb_userspace::plan::MapContents<lb_common::Ipv6>| {
            c.frontends().any(|(k, b)| k.vip == vip && k.protocol == 6 && b.len() == count)
        }
    };
    agent.wait_for_maps6("IPv6-only frontend", tcp_backends(lb_common::ipv6(SIX.octets()), 3)).unwrap();
    agent.wait_for_maps6("dual-stack IPv6 frontend", tcp_backends(lb_common::ipv6(DUAL6.octets()), 2)).unwrap();
    agent.wait_for_maps6("hairpin frontend", tcp_backends(lb_common::ipv6(SELF6.octets()), 1)).unwrap();
    agent
        .wait_for_maps("dual-stack IPv4 frontend", |c| {
            c.frontends().any(|(k, b)| k.vip == DUAL4.octets() && b.len() == 2)
        })
        .unwrap();
    agent.wait_for_attachments(4).unwrap();
    // The IPv6 maps, dormant at start, woke for the first sync, as big as
    // their IPv4 namesakes.
    assert!(agent.log().contains("ipv6_woken=true"), "{}", agent.log());
    for (six, four) in [("CONNTRACK6", "CONNTRACK"), ("SERVICES6", "SERVICES"), ("MAGLEV6", "MAGLEV")] {
        assert_eq!(agent.map_max_entries(six).unwrap(), agent.map_max_entries(four).unwrap(), "{six}");
    }
    // /metrics names the IPv6 maps as they are filled.
    let (_, metrics) = cluster
        .node
        .enter(|| lb_tests::pods::http_get(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 10249), "/metrics"))
        .unwrap();
    let value = |line: &str| metrics.lines().find_map(|l| l.strip_prefix(line)?.trim().parse::<f64>().ok());
    assert!(value("lb_map_entries{map=\"SERVICES6\"}").is_some_and(|n| n > 0.0), "{metrics}");
    assert!(value("lb_map_capacity{map=\"CONNTRACK6\"}").is_some_and(|n| n > 1024.0), "{metrics}");
    // /healthz (default --healthz-addr [::]:10256: both families) answers
    // on the node's IPv6 address too, for the load balancers and kubelets
    // of an IPv6 cluster.
    for addr in [IpAddr::from(NODE_IP6), IpAddr::from(NODE_IP)] {
        let (status, _) =
            cluster.node.enter(|| lb_tests::pods::http_get(SocketAddr::new(addr, 10256), "/healthz")).unwrap();
        assert_eq!(status, 200, "/healthz on {addr}");
    }
    // `lb services` shows both families.
    let services: serde_json::Value = serde_json::from_str(&agent.cli("services", &["-o", "json"]).unwrap()).unwrap();
    let rows = services.as_array().unwrap();
    let backends_of = |address: String| {
        rows.iter()
            .find(|r| r["address"] == address.as_str() && r["port"] == 80)
            .map(|r| r["backends"].as_array().unwrap().len())
    };
    assert_eq!(
        (backends_of(SIX.to_string()), backends_of(DUAL4.to_string()), backends_of(DUAL6.to_string())),
        (Some(3), Some(2), Some(2)),
        "{services}"
    );
    let client = cluster.pod("client");

    // An IPv6-only Service: every new connection succeeds and they spread;
    // UDP too.
    let six = SocketAddr::new(SIX.into(), 80);
    let answers = reached(client, six, 30);
    assert!(answers.len() > 1 && answers.iter().all(|a| a.starts_with("backend-")), "{answers:?}");
    let who = client.netns.enter(|| udp_ask(SocketAddr::new(SIX.into(), 53))).unwrap();
    assert!(who.starts_with("backend-"), "UDP answer {who:?}");
    // `lb explain` over the IPv6 maps: the backend it names for a new flow
    // from a given port is the one that answers; then the flow is tracked.
    let explain = |port: u16| -> serde_json::Value {
        let (from, to) = (format!("[{}]:{port}", client.ip6), format!("[{SIX}]:80/tcp"));
        serde_json::from_str(&agent.cli("explain", &["--from", &from, "--to", &to, "-o", "json"]).unwrap()).unwrap()
    };
    let pod_of = |backend: &serde_json::Value| {
        let addr: SocketAddr = backend.as_str().unwrap().parse().unwrap();
        backends.iter().find(|p| IpAddr::from(p.ip6) == addr.ip()).unwrap().name.clone()
    };
    for port in [42001, 42008, 42015] {
        let before = explain(port);
        assert_eq!(before["verdict"], "new", "{before}");
        let answered = client.netns.enter(|| Session::connect_from(six, port)?.ask("who")).unwrap();
        assert_eq!(answered, pod_of(&before["backend"]), "port {port}: {before}");
        let after = explain(port);
        assert_eq!((after["verdict"].as_str(), pod_of(&after["backend"])), (Some("established"), answered));
    }
    // A pod reaching itself through an IPv6 Service (hairpin), TCP and UDP.
    let own = backends[0];
    assert_eq!(reached(own, SocketAddr::new(SELF6.into(), 80), 5), BTreeSet::from(["backend-0".to_owned()]));
    let who = own.netns.enter(|| udp_ask(SocketAddr::new(SELF6.into(), 53))).unwrap();
    assert_eq!(who, "backend-0", "UDP hairpin");
    // `lb stats` counts their conntrack entries (no IPv4 flow yet), two per flow.
    let stats: serde_json::Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    assert!(stats["conntrack_entries"].as_u64().is_some_and(|n| n >= 2 * 31), "{stats}");
    // ... and its counters their packets.
    let packets = |verdict: &str| {
        let rows = stats["verdicts"].as_array().unwrap();
        rows.iter().find(|r| r["verdict"] == verdict).and_then(|r| r["packets"].as_u64()).unwrap_or(0)
    };
    assert!(packets("dnat_new") >= 31 && packets("reverse_nat") > 0, "{stats}");
    // Pod-to-pod IPv6 traffic is no Service's: left alone.
    let direct = SocketAddr::new(backends[1].ip6.into(), TCP_PORT);
    assert_eq!(client.netns.enter(|| tcp_ask(direct)).unwrap(), "backend-1");

    // Its node port on the node's IPv6 address, from a pod; none on the
    // node's IPv4 address (the Service has no IPv4 side).
    let node_port = SocketAddr::new(NODE_IP6.into(), NODE_PORT);
    assert!(reached(client, node_port, 10).iter().all(|a| a.starts_with("backend-")));
    let four = SocketAddr::new(NODE_IP.into(), NODE_PORT);
    assert!(client.netns.enter(|| tcp_ask(four)).is_err(), "an IPv6-only Service has no IPv4 node port");
    // A host process cannot bind the node port on that address (it would
    // never see its traffic), and still can on loopback.
    let bind = |addr: SocketAddr| cluster.node.enter(|| std::net::TcpListener::bind(addr).map(drop));
    for addr in [node_port, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), NODE_PORT)] {
        let taken = bind(addr).err();
        assert_eq!(taken.as_ref().map(|e| e.kind()), Some(ErrorKind::AddrInUse), "{addr}: {taken:?}");
    }
    // Loopback stays free, and so does IPv4's wildcard: no IPv4 NodePort.
    bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), NODE_PORT)).unwrap();
    bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), NODE_PORT)).unwrap();

    // A dual-stack Service answers on both cluster IPs, each from the
    // endpoints of its own family's slice.
    for vip in [IpAddr::from(DUAL4), IpAddr::from(DUAL6)] {
        let answers = reached(client, SocketAddr::new(vip, 80), 20);
        assert_eq!(answers, BTreeSet::from(["backend-0".to_string(), "backend-1".to_string()]), "through {vip}");
    }

    // A Service without endpoints is refused at once (ICMPv6 port
    // unreachable from the pods' hook), not left to time out.
    let started = Instant::now();
    let refused = client.netns.enter(|| tcp_ask(SocketAddr::new(EMPTY6.into(), 80))).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused after {:?}", started.elapsed());

    // One long-lived IPv6 connection keeps its backend: while its backend
    // stays, across the removal of another, and across an agent restart
    // (the IPv6 maps and conntrack are pinned and adopted).
    let mut session = client.netns.enter(|| Session::connect(six)).unwrap();
    let pinned = session.ask("m0").unwrap();
    let others: Vec<&Pod> = backends.iter().copied().filter(|p| p.name != pinned).collect();
    let kept: Vec<&Pod> = backends.iter().copied().filter(|p| p.name == pinned || p.name == others[0].name).collect();
    write_slices(dir, "six", &kept, false);
    agent.wait_for_maps6("one backend fewer", tcp_backends(lb_common::ipv6(SIX.octets()), 2)).unwrap();
    assert_eq!(session.ask("after a removal").unwrap(), pinned);
    let answers = reached(client, six, 20);
    assert!(!answers.contains(&others[1].name), "a new connection reached removed {}: {answers:?}", others[1].name);
    // It comes back (a late pod): new connections reach it again.
    write_slices(dir, "six", &backends, false);
    agent.wait_for_maps6("the three backends again", tcp_backends(lb_common::ipv6(SIX.octets()), 3)).unwrap();
    let answers = reached(client, six, 30);
    assert!(answers.contains(&others[1].name), "no new connection reached {} again: {answers:?}", others[1].name);
    assert_eq!(session.ask("after the return").unwrap(), pinned);

    // The restarted agent finds its IPv6 maps as it left them: its first
    // sync has nothing to write.
    agent.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_sync = loop {
        let log = agent.log();
        // The second agent's part of the log, once it has loaded.
        let since_restart = log.split("datapath loaded").nth(2).unwrap_or_default().to_owned();
        if let Some(line) = since_restart.lines().find(|l| l.contains("synced frontends=")) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no sync after the restart:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(first_sync.contains(" writes=0 "), "{first_sync}");
    let after = session.ask("after a restart");
    assert_eq!(after.as_ref().ok(), Some(&pinned), "{after:?}\n{}", agent.log());
    assert!(reached(client, six, 5).iter().all(|a| a.starts_with("backend-")));
    // An open IPv6 connection and a stream of new ones through two
    // SIGKILLs and restarts: not one request fails.
    let traffic = Traffic::start(&client.netns, six).unwrap();
    for round in 0..2 {
        let syncs = agent.log().matches("synced frontends=").count();
        std::thread::sleep(Duration::from_millis(300));
        agent.kill().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        agent.restart().unwrap();
        agent.wait_for_log_count("synced frontends=", syncs + 1).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    traffic.stop().assert_none_failed(100);
    assert!(agent.stop().unwrap().success(), "{}", agent.log());
    // Stopped, the agent leaves the datapath serving (its programs, links,
    // maps and the IPv6 tail-call arrays are pinned): new IPv6 connections
    // and the open one go on.
    assert!(reached(client, six, 5).iter().all(|a| a.starts_with("backend-")));
    assert_eq!(session.ask("with no agent").ok(), Some(pinned));
}

#[test]
fn ipv6_and_dual_stack_cluster_ips_routed() {
    dual_stack_end_to_end(Topology::Routed);
}

#[test]
fn ipv6_and_dual_stack_cluster_ips_bridged() {
    dual_stack_end_to_end(Topology::Bridged);
}

/// An IPv4-only cluster's agent keeps its IPv6 maps dormant; the first
/// IPv6 Service wakes them at run time (the growth reload, which makes
/// CONNTRACK6 and its kin anew and moves every link to the new programs),
/// and not one IPv4 request fails meanwhile: an open connection and a
/// stream of new ones.
#[test]
fn the_first_ipv6_service_wakes_the_ipv6_maps_without_failing_an_ipv4_request() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..2].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let backends: Vec<&Pod> = cluster.pods[..2].iter().collect();
    let manifests = TempDir::new("lb-wake").unwrap();
    let dir = &manifests.0;
    write_yaml(dir, "dual.yaml", &service_with_cluster_ips("demo", "four", &[DUAL4.into()], &PORTS, json!({})));
    let endpoints: Vec<Endpoint> = backends.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    write_yaml(dir, "four-slice.yaml", &endpoint_slice("demo", "four", &SLICE_PORTS, &endpoints));
    let mut agent = Agent::with_manifests(&cluster.node, dir).unwrap();
    agent
        .wait_for_maps("the IPv4 Service", |c| c.frontends().any(|(k, b)| k.vip == DUAL4.octets() && b.len() == 2))
        .unwrap();
    agent.wait_for_attachments(3).unwrap();
    assert_eq!(agent.map_max_entries("CONNTRACK6").unwrap(), 1024, "dormant");

    let client = cluster.pod("client");
    let traffic = Traffic::start(&client.netns, SocketAddr::new(DUAL4.into(), 80)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    write_yaml(dir, "six.yaml", &service_with_cluster_ips("demo", "six", &[SIX.into()], &PORTS, json!({})));
    write_slices(dir, "six", &backends, false);
    agent
        .wait_for_maps6("the IPv6 Service", |c| {
            c.frontends().any(|(k, b)| k.vip == lb_common::ipv6(SIX.octets()) && b.len() == 2)
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    traffic.stop().assert_none_failed(50);
    assert!(agent.log().contains("ipv6_woken=true"), "{}", agent.log());
    assert_eq!(agent.map_max_entries("CONNTRACK6").unwrap(), agent.map_max_entries("CONNTRACK").unwrap());
    assert!(reached(client, SocketAddr::new(SIX.into(), 80), 10).iter().all(|a| a.starts_with("backend-")));
}

/// ClientIP affinity over IPv6 holds within its timeout and lapses after
/// a quiet spell longer than it, as IPv4's (service_semantics.rs).
#[test]
fn ipv6_session_affinity_expires_after_its_timeout_without_traffic() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let backends: Vec<&Pod> = cluster.pods[..3].iter().collect();
    let manifests = TempDir::new("lb-affinity6").unwrap();
    let dir = &manifests.0;
    let one_second =
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}});
    write_yaml(dir, "six.yaml", &service_with_cluster_ips("demo", "six", &[SIX.into()], &PORTS, one_second));
    write_slices(dir, "six", &backends, false);
    let mut agent = Agent::with_manifests(&cluster.node, dir).unwrap();
    agent
        .wait_for_maps6("a 1 s affinity", |c| {
            c.frontend_entries().any(|(_, v)| v.affinity_timeout_s == 1 && v.backend_count == 3)
        })
        .unwrap();
    agent.wait_for_attachments(4).unwrap();
    // Over 8 spells, staying on one backend every time would happen with
    // probability (1/3)^7.
    let client = cluster.pod("client");
    let mut chosen = BTreeSet::new();
    for _ in 0..8 {
        let burst = reached(client, SocketAddr::new(SIX.into(), 80), 3);
        assert_eq!(burst.len(), 1, "within the timeout: {burst:?}");
        chosen.extend(burst);
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(chosen.len() > 1, "affinity never expired: {chosen:?}");
}
