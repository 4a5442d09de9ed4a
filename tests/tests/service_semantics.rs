//! Service behaviours beyond plain ClusterIP, end to end with the real agent
//! (dir source) in the routed netns topology. Needs root.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use lb_tests::{
    agent::{Agent, TempDir},
    manifests::{Endpoint, Port, endpoint_slice, endpoint_slice6, service, service_with_cluster_ips, write_yaml},
    netns::{Cluster, Netns, Topology},
    pods::{PodServer, TCP_PORT, tcp_ask},
};
use lb_userspace::family::Family;
use serde_json::{Value, json};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);

const HTTP: [Port; 1] = [("http", 80, "TCP")];
const HTTP_TARGET: [Port; 1] = [("http", TCP_PORT, "TCP")];

/// The `sticky` Service; `affinity` goes into its spec.
fn sticky_service(affinity: Value) -> Value {
    service("default", "sticky", *VIP.ip(), &HTTP, affinity)
}

fn sticky_slice(backends: &[(&str, Ipv4Addr)]) -> Value {
    let endpoints: Vec<Endpoint> = backends.iter().map(|(n, ip)| Endpoint::ready(n, *ip)).collect();
    endpoint_slice("default", "sticky", &HTTP_TARGET, &endpoints)
}

/// Pods backend-0..2 serving, and a client pod, in the routed topology.
fn three_backends_and_a_client() -> (Cluster, Vec<PodServer>) {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let servers = cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    (cluster, servers)
}

fn wait_for_affinity(agent: &mut Agent, timeout_s: u32, backends: usize) {
    agent
        .wait_for_maps(&format!("affinity {timeout_s}s, {backends} backends"), |c| {
            c.services
                .iter()
                .any(|(k, v)| k.slot == 0 && v.affinity_timeout_s == timeout_s && v.backend_count as usize == backends)
        })
        .unwrap();
}

fn reached(client: &Netns, connections: usize) -> BTreeSet<String> {
    client.enter(|| (0..connections).map(|_| tcp_ask(VIP)).collect::<Result<_, _>>()).unwrap()
}

#[test]
fn session_affinity_holds_and_can_be_switched_at_run_time() {
    let (cluster, _servers) = three_backends_and_a_client();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let client = &cluster.pod("client").netns;
    let manifests = TempDir::new("lb-affinity").unwrap();
    let on = |timeout: u32| json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}}});
    write_yaml(&manifests.0, "service.yaml", &sticky_service(on(60)));
    write_yaml(&manifests.0, "slice.yaml", &sticky_slice(&pods));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    wait_for_affinity(&mut agent, 60, 3);
    agent.wait_for_attachments(4).unwrap();

    let sticky = reached(client, 20);
    assert_eq!(sticky.len(), 1, "20 connections with ClientIP affinity reached {sticky:?}");

    // Off: connections spread again.
    write_yaml(&manifests.0, "service.yaml", &sticky_service(json!({})));
    wait_for_affinity(&mut agent, 0, 3);
    assert!(reached(client, 30).len() > 1);

    // On again; then the remembered backend leaves the Service: the client
    // gets another backend and sticks to that one.
    write_yaml(&manifests.0, "service.yaml", &sticky_service(on(30)));
    wait_for_affinity(&mut agent, 30, 3);
    let sticky = reached(client, 10);
    assert_eq!(sticky.len(), 1);
    let remembered = sticky.into_iter().next().unwrap();
    let rest: Vec<(&str, Ipv4Addr)> = pods.iter().copied().filter(|(n, _)| *n != remembered).collect();
    write_yaml(&manifests.0, "slice.yaml", &sticky_slice(&rest));
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
    let ports = [("http", 80, "TCP"), ("dns", 53, "UDP")];
    write_yaml(
        &manifests.0,
        "empty.yaml",
        &service("default", "empty", Ipv4Addr::new(10, 96, 0, 30), &ports, json!({})),
    );
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_maps("the empty service", |c| c.frontends().count() == 2).unwrap();
    agent.wait_for_attachments(1).unwrap();
    let client = &cluster.pod("client").netns;
    let empty = |port| std::net::SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), port));

    client.enter(|| {
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let error =
                std::net::TcpStream::connect_timeout(&empty(80), std::time::Duration::from_secs(3)).unwrap_err();
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
        let error =
            std::net::TcpStream::connect_timeout(&empty(8080), std::time::Duration::from_millis(500)).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    });
    let stats = agent.cli("stats", &["-o", "json"]).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let packets = |verdict: &str| {
        stats["verdicts"].as_array().unwrap().iter().find(|r| r["verdict"] == verdict).unwrap()["packets"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(packets("reject_no_backend"), 6);
    assert!(packets("drop_unknown_port") >= 1);
}

#[test]
fn a_udp_flow_survives_the_removal_of_its_backend() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..2].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..2].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let dns = |backends: &[(&str, Ipv4Addr)]| {
        let endpoints: Vec<Endpoint> = backends.iter().map(|(n, ip)| Endpoint::ready(n, *ip)).collect();
        endpoint_slice("default", "dns", &[("dns", lb_tests::pods::UDP_PORT, "UDP")], &endpoints)
    };
    let manifests = TempDir::new("lb-udp").unwrap();
    let dns_service = service("default", "dns", Ipv4Addr::new(10, 96, 0, 53), &[("dns", 53, "UDP")], json!({}));
    write_yaml(&manifests.0, "service.yaml", &dns_service);
    write_yaml(&manifests.0, "slice.yaml", &dns(&pods));
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
    write_yaml(&manifests.0, "slice.yaml", &dns(&rest));
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
    write_yaml(&manifests.0, "service.yaml", &sticky_service(json!({})));
    write_yaml(&manifests.0, "slice.yaml", &sticky_slice(&[(pod.name.as_str(), pod.ip)]));
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

#[test]
fn a_rolling_replacement_of_every_backend_fails_no_request() {
    rolling_replacement(false);
}

#[test]
fn a_rolling_replacement_of_every_ipv6_backend_fails_no_request() {
    rolling_replacement(true);
}

/// Every backend replaced, one at a time, the old one terminating first
/// (ready false, terminating true), under a stream of new connections: to
/// an IPv4 Service, or with `ipv6` an IPv6-only one (its IPv6 slice).
fn rolling_replacement(ipv6: bool) {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let names = ["old-0", "old-1", "old-2", "new-0", "new-1", "new-2", "client"];
    let cluster = Cluster::new(Topology::Routed, &names).unwrap();
    let mut servers: Vec<Option<PodServer>> =
        cluster.pods[..6].iter().map(|p| Some(PodServer::start(&p.netns, &p.name).unwrap())).collect();
    let pod = |i: usize| {
        let p = &cluster.pods[i];
        (p.name.as_str(), if ipv6 { IpAddr::from(p.ip6) } else { IpAddr::from(p.ip) })
    };
    let manifests = TempDir::new("lb-rolling").unwrap();
    let (service, vip) = if ipv6 {
        let vip6 = std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
        (
            service_with_cluster_ips("default", "sticky", &[vip6.into()], &HTTP, json!({})),
            SocketAddr::new(vip6.into(), 80),
        )
    } else {
        (sticky_service(json!({})), SocketAddr::V4(VIP))
    };
    write_yaml(&manifests.0, "service.yaml", &service);
    // (pod index, ready, terminating) of the slice's endpoints.
    let mut endpoints: Vec<(usize, bool, bool)> = vec![(0, true, false), (1, true, false), (2, true, false)];
    let publish = |endpoints: &[(usize, bool, bool)]| {
        let list: Vec<Endpoint> = endpoints
            .iter()
            .map(|(i, ready, terminating)| Endpoint {
                ready: *ready,
                terminating: *terminating,
                ..Endpoint::ready(pod(*i).0, pod(*i).1)
            })
            .collect();
        let slice = if ipv6 {
            endpoint_slice6("default", "sticky", &HTTP_TARGET, &list)
        } else {
            endpoint_slice("default", "sticky", &HTTP_TARGET, &list)
        };
        write_yaml(&manifests.0, "slice.yaml", &slice);
    };
    publish(&endpoints);
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    let wait_for = |agent: &mut Agent, wanted: &[usize]| {
        let wanted: BTreeSet<IpAddr> = wanted.iter().map(|i| pod(*i).1).collect();
        let serves = |addrs: BTreeSet<IpAddr>| addrs == wanted;
        if ipv6 {
            agent.wait_for_maps6("backends", |c| {
                c.frontends().any(|(_, b)| serves(b.iter().map(|b| b.addr.ip()).collect()))
            })
        } else {
            agent.wait_for_maps("backends", |c| {
                c.frontends().any(|(_, b)| serves(b.iter().map(|b| b.addr.ip()).collect()))
            })
        }
        .unwrap();
    };
    wait_for(&mut agent, &[0, 1, 2]);
    agent.wait_for_attachments(7).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let stream = {
        let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
        cluster.pod("client").netns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tcp_ask(vip) {
                    Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push(e.to_string());
                        0
                    }
                };
            }
        })
    };

    for step in 0..3 {
        let (old, new) = (step, step + 3);
        // The new pod is ready...
        endpoints.push((new, true, false));
        publish(&endpoints);
        // ...then the old one terminates: no new connections, still serving.
        for e in endpoints.iter_mut().filter(|e| e.0 == old) {
            *e = (old, false, true);
        }
        publish(&endpoints);
        let serving: Vec<usize> = endpoints.iter().filter(|e| e.1).map(|e| e.0).collect();
        wait_for(&mut agent, &serving);
        std::thread::sleep(std::time::Duration::from_millis(150));
        // Its grace period ends: out of the slice, then gone.
        endpoints.retain(|e| e.0 != old);
        publish(&endpoints);
        wait_for(&mut agent, &serving);
        servers[old] = None;
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    let failures = failures.lock().unwrap();
    let answered = answered.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {answered} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(answered > 50, "only {answered} requests");
    wait_for(&mut agent, &[3, 4, 5]);
}

#[test]
fn the_algorithm_can_be_switched_per_service_at_run_time() {
    let (cluster, _servers) = three_backends_and_a_client();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let client = &cluster.pod("client").netns;
    let manifests = TempDir::new("lb-algorithm").unwrap();
    let with_annotation = |algorithm: Option<&str>| {
        let mut object = sticky_service(json!({}));
        if let Some(a) = algorithm {
            object["metadata"]["annotations"] = json!({"service.lb.io/lb-algorithm": a});
        }
        object
    };
    write_yaml(&manifests.0, "slice.yaml", &sticky_slice(&pods));
    write_yaml(&manifests.0, "service.yaml", &with_annotation(Some("maglev")));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    let uses = |agent: &mut Agent, maglev: bool| {
        agent
            .wait_for_maps("the algorithm", |c| {
                c.services.iter().any(|(k, v)| k.slot == 0 && v.backend_count == 3 && (v.maglev_table != 0) == maglev)
            })
            .unwrap()
    };
    uses(&mut agent, true);
    agent.wait_for_attachments(4).unwrap();
    assert!(agent.cli("services", &[]).unwrap().contains("maglev #1"));
    // Clients on ephemeral ports are different flows: they spread.
    assert!(reached(client, 30).len() > 1);
    write_yaml(&manifests.0, "service.yaml", &with_annotation(None));
    uses(&mut agent, false);
    assert!(reached(client, 30).len() > 1);
    write_yaml(&manifests.0, "service.yaml", &with_annotation(Some("maglev")));
    uses(&mut agent, true);
    assert!(reached(client, 30).len() > 1);
}

#[test]
fn session_affinity_expires_after_its_timeout_without_traffic() {
    let (cluster, _servers) = three_backends_and_a_client();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let client = &cluster.pod("client").netns;
    let manifests = TempDir::new("lb-affinity-timeout").unwrap();
    let one_second =
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}});
    write_yaml(&manifests.0, "service.yaml", &sticky_service(one_second));
    write_yaml(&manifests.0, "slice.yaml", &sticky_slice(&pods));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    wait_for_affinity(&mut agent, 1, 3);
    agent.wait_for_attachments(4).unwrap();
    // Within the timeout a client sticks; after a quiet spell longer than
    // it, it is balanced afresh. Over 8 spells, staying on one backend
    // every time would happen with probability (1/3)^7.
    let mut chosen = BTreeSet::new();
    for _ in 0..8 {
        let burst = reached(client, 3);
        assert_eq!(burst.len(), 1, "within the timeout: {burst:?}");
        chosen.extend(burst);
        std::thread::sleep(std::time::Duration::from_millis(1200));
    }
    assert!(chosen.len() > 1, "affinity never expired: {chosen:?}");
}

#[test]
fn a_newer_service_claiming_a_live_services_address_never_takes_its_traffic() {
    let (cluster, _servers) = three_backends_and_a_client();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let client = &cluster.pod("client").netns;
    let manifests = TempDir::new("lb-conflict").unwrap();
    write_yaml(&manifests.0, "z-live.yaml", &sticky_service(json!({})));
    write_yaml(&manifests.0, "z-live-slice.yaml", &sticky_slice(&pods));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_maps("the live service", |c| c.frontends().any(|(_, backends)| backends.len() == 3)).unwrap();
    agent.wait_for_attachments(4).unwrap();
    assert!(!reached(client, 5).is_empty());

    // A newcomer with no endpoints, whose name and file sort first, claims
    // the same cluster IP and port: it is reported by name and field, and
    // the live Service keeps answering, before and after an agent restart.
    write_yaml(&manifests.0, "a-new.yaml", &service("default", "a-new", *VIP.ip(), &HTTP, json!({})));
    agent
        .wait_for_log(
            "Service default/a-new: spec.clusterIP: 10.96.0.20:80/TCP is already served for default/sticky:http",
        )
        .unwrap();
    client.enter(|| (0..20).try_for_each(|_| tcp_ask(VIP).map(drop))).unwrap();
    drop(agent);
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_log("already served for default/sticky:http").unwrap();
    // The error is reported as the sync starts; the live Service is served
    // once it has written the maps (this agent's are new).
    agent.wait_for_log("synced frontends=").unwrap();
    client.enter(|| (0..20).try_for_each(|_| tcp_ask(VIP).map(drop))).unwrap();
}

/// What `lb explain` says a flow from `client`:`port` gets, as JSON.
fn explain(agent: &Agent, client: Ipv4Addr, port: Option<u16>) -> Value {
    let from = match port {
        Some(port) => format!("{client}:{port}"),
        None => client.to_string(),
    };
    let to = format!("{VIP}/tcp");
    serde_json::from_str(&agent.cli("explain", &["--from", &from, "--to", &to, "-o", "json"]).unwrap()).unwrap()
}

#[test]
fn lb_explain_names_the_backend_the_datapath_then_picks() {
    let (cluster, _servers) = three_backends_and_a_client();
    let pods: Vec<(&str, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let pod_of = |backend: &Value| {
        let ip: Ipv4Addr = backend.as_str().unwrap().split(':').next().unwrap().parse().unwrap();
        pods.iter().find(|(_, pod_ip)| *pod_ip == ip).unwrap().0.to_owned()
    };
    let client = cluster.pod("client");
    let manifests = TempDir::new("lb-explain").unwrap();
    write_yaml(&manifests.0, "service.yaml", &sticky_service(json!({})));
    write_yaml(&manifests.0, "slice.yaml", &sticky_slice(&pods));
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    wait_for_affinity(&mut agent, 0, 3);
    agent.wait_for_attachments(4).unwrap();

    let without_port = explain(&agent, client.ip, None);
    assert_eq!(
        (without_port["verdict"].as_str(), without_port["candidates"].as_array().map(Vec::len)),
        (Some("new"), Some(3))
    );
    // Random selection, then Maglev: for each new flow, from a port chosen
    // here, the backend explained beforehand is the one that answers, and
    // afterwards the flow is explained by its conntrack entry.
    let mut reached = BTreeSet::new();
    for (round, algorithm) in ["random", "maglev"].into_iter().enumerate() {
        if algorithm == "maglev" {
            let mut service = sticky_service(json!({}));
            service["metadata"]["annotations"] = json!({"service.lb.io/lb-algorithm": "maglev"});
            write_yaml(&manifests.0, "service.yaml", &service);
            agent.wait_for_maps("a Maglev table", |c| c.frontend_entries().any(|(_, v)| v.maglev_table != 0)).unwrap();
        }
        for i in 0..12u16 {
            let port = 41000 + round as u16 * 100 + i * 7;
            let before = explain(&agent, client.ip, Some(port));
            assert_eq!(before["verdict"], "new", "{before}");
            let predicted = pod_of(&before["backend"]);
            let answered = client.netns.enter(|| lb_tests::pods::Session::connect_from(VIP, port)?.ask("who")).unwrap();
            assert_eq!(answered, predicted, "{algorithm}, port {port}: {before}");
            reached.insert(answered);
            let after = explain(&agent, client.ip, Some(port));
            assert_eq!(
                (after["verdict"].as_str(), pod_of(&after["backend"])),
                (Some("established"), predicted.clone())
            );
        }
    }
    assert!(reached.len() > 1, "24 flows all reached {reached:?}");
}
