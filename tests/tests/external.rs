//! External traffic end to end, on two nodes: the real agent on each (with
//! its own --node-name, reading the same manifests), backend pods on both,
//! and a client outside the cluster on the nodes' LAN. Needs root.
//!
//! Every test runs twice: with the agent's default flags on a plain bridge
//! (kind's topology), where `--external-datapath auto` picks tc for the
//! veth uplinks; and with `--external-datapath xdp` forced, on a LAN whose
//! ports can carry what XDP sends, so that the XDP hook stays covered. (On
//! the plain bridge, forced XDP loses every request to a backend on the
//! other node: the reason auto never picks XDP on a veth.)
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    external::{Family, Mode, TwoNodes, eth0_programs},
    in_both_modes,
    manifests::{Endpoint, Port, endpoint_slice, service, write_yaml},
    netns::{EXTERNAL_CLIENT_IP, Lan, MultiNode},
    pods::{Session, TCP_PORT, UDP_PORT, http_get, tcp_ask, tcp_whoami, udp_ask},
};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const HEALTH_PORT: u16 = 32000;
const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

fn web(extra_spec: Value, status: Value) -> Value {
    let mut object = service("demo", "web", VIP, &PORTS, extra_spec);
    object["spec"]["ports"][0]["nodePort"] = json!(NODE_PORT);
    object["spec"]["ports"][1]["nodePort"] = json!(UDP_NODE_PORT);
    object["status"] = status;
    object
}

/// The two nodes serving `service` (`demo/web`) with default flags but
/// for `mode`'s, on its LAN.
fn setup(mode: Mode, service: Value, extra_pods: &[(usize, &str)]) -> TwoNodes {
    setup_on(mode, mode.lan(), service, extra_pods)
}

fn setup_on(mode: Mode, lan: Lan, service: Value, extra_pods: &[(usize, &str)]) -> TwoNodes {
    TwoNodes::start(Family::V4, mode, lan, ("web", service), &SLICE_PORTS, extra_pods)
}

fn node_port(n: usize) -> SocketAddrV4 {
    SocketAddrV4::new(MultiNode::node_ip(n), NODE_PORT)
}

fn node_port_reaches_backends_on_both_nodes_from_outside(mode: Mode) {
    let mut setup = setup(mode, web(json!({"type": "NodePort"}), json!({})), &[]);
    setup.wait_for_backends(NODE_PORT, [2, 2]);
    for agent in &setup.agents {
        assert_eq!(eth0_programs(agent), [mode.program()], "{mode:?}");
    }
    for n in 1..=2 {
        // As many requests as the kind run, every one answered.
        let answers: Vec<(String, String)> =
            setup.in_client(|| (0..40).map(|_| tcp_whoami(node_port(n)).unwrap()).collect());
        let reached: BTreeSet<&str> = answers.iter().map(|(pod, _)| pod.as_str()).collect();
        assert_eq!(reached, BTreeSet::from(["pod-1", "pod-2"]), "via node-{n}");
        for (pod, peer) in &answers {
            // The local backend sees the client; the remote one sees the
            // node that forwarded (SNAT), so its reply comes back that way.
            let expected = if *pod == format!("pod-{n}") { EXTERNAL_CLIENT_IP } else { MultiNode::node_ip(n) };
            assert_eq!(peer, &expected.to_string(), "{pod} via node-{n}");
        }
    }
    for n in 1..=2 {
        let udp = SocketAddrV4::new(MultiNode::node_ip(n), UDP_NODE_PORT);
        let reached: BTreeSet<String> = setup.in_client(|| (0..20).map(|_| udp_ask(udp).unwrap()).collect());
        assert_eq!(reached, BTreeSet::from(["pod-1".to_owned(), "pod-2".to_owned()]), "UDP NodePort via node-{n}");
    }
}

fn load_balancer_and_external_ips_are_served_and_source_ranges_enforced(mode: Mode) {
    let status = json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}});
    let spec = |ranges: &[&str]| json!({"type": "LoadBalancer", "externalIPs": [EXTERNAL_IP.to_string(), "10.252.0.10"], "loadBalancerSourceRanges": ranges});
    let mut setup = setup(mode, web(spec(&["10.200.0.96/29"]), status.clone()), &[]);
    let lb = SocketAddrV4::new(LB_IP, 80);
    setup.wait_for_backends(80, [2, 2]);
    let reached: BTreeSet<String> = setup.in_client(|| (0..16).map(|_| tcp_ask(lb).unwrap()).collect());
    assert_eq!(reached.len(), 2, "the load-balancer IP reaches both backends: {reached:?}");
    let external = SocketAddrV4::new(EXTERNAL_IP, 80);
    let reached: BTreeSet<String> = setup.in_client(|| (0..16).map(|_| tcp_ask(external).unwrap()).collect());
    assert_eq!(reached.len(), 2, "the allowed ExternalIP reaches both backends: {reached:?}");
    assert!(
        setup.agents[0].log().contains("spec.externalIPs[1]: 10.252.0.10 is outside --external-ip-cidrs"),
        "the other ExternalIP is refused by name"
    );

    // The client leaves the allowed ranges: its new connections are dropped.
    write_yaml(&setup.manifests.0, "web.yaml", &web(spec(&["192.0.2.0/24"]), status));
    // The new range in, and the old one gone: between the two writes both
    // admit (ranges are put before the frontend checks them, deleted after).
    setup.agents[0]
        .wait_for_maps("the new range alone", |c| {
            !c.source_ranges.is_empty() && c.source_ranges.iter().all(|(_, r)| r.client == [192, 0, 2, 0])
        })
        .unwrap();
    let refused = setup.in_client(|| tcp_ask(lb));
    assert!(refused.is_err(), "a client outside the ranges got {refused:?}");
    assert!(setup.in_client(|| tcp_ask(node_port(1))).is_ok(), "source ranges apply to the load-balancer IP only");
}

fn policy_local_keeps_the_client_address_and_health_checks_follow_local_endpoints(mode: Mode) {
    let spec = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": HEALTH_PORT});
    let mut setup = setup(mode, web(spec, json!({})), &[(1, "client")]);
    setup.write_endpoints(&["pod-2"]);
    setup.wait_for_backends(NODE_PORT, [0, 1]);
    let health = |n: usize| SocketAddrV4::new(MultiNode::node_ip(n), HEALTH_PORT);

    let answers: Vec<(String, String)> =
        setup.in_client(|| (0..6).map(|_| tcp_whoami(node_port(2)).unwrap()).collect());
    assert!(answers.iter().all(|(pod, peer)| pod == "pod-2" && *peer == EXTERNAL_CLIENT_IP.to_string()), "{answers:?}");
    let forwarded = setup.in_client(|| tcp_ask(node_port(1)));
    assert!(forwarded.is_err(), "node-1 has no local endpoint and must not forward: {forwarded:?}");
    // A pod on node-1 reaching the same address gets the whole Service, as
    // kube-proxy short-circuits traffic from inside the cluster.
    let client = setup.topology.pod("client");
    let answers: Vec<(String, String)> =
        client.netns.enter(|| (0..3).map(|_| tcp_whoami(node_port(1)).unwrap()).collect());
    assert!(answers.iter().all(|(pod, peer)| pod == "pod-2" && *peer == client.ip.to_string()), "{answers:?}");

    let (status, body) = setup.in_client(|| http_get(health(2), "/healthz")).unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, body["localEndpoints"].as_u64()), (200, Some(1)));
    assert_eq!(body["service"], json!({"namespace": "demo", "name": "web"}));
    let (status, body) = setup.in_client(|| http_get(health(1), "/")).unwrap();
    assert_eq!(status, 503, "no local endpoints: {body}");

    // An endpoint comes up on node-1, and node-1's answer changes.
    setup.write_endpoints(&["pod-1", "pod-2"]);
    setup.wait_for_backends(NODE_PORT, [1, 1]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while setup.in_client(|| http_get(health(1), "/")).map(|r| r.0).unwrap_or(0) != 200 {
        assert!(std::time::Instant::now() < deadline, "node-1's health check never turned 200");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(setup.in_client(|| tcp_whoami(node_port(1))).unwrap().1, EXTERNAL_CLIENT_IP.to_string());
}

fn cluster_ip_traffic_to_a_backend_on_another_node_keeps_the_pod_address(mode: Mode) {
    let mut setup = setup(mode, web(json!({}), json!({})), &[(1, "client")]);
    setup.write_endpoints(&["pod-2"]);
    setup.wait_for_backends(80, [1, 1]);
    let client = setup.topology.pod("client");
    let answers: Vec<(String, String)> =
        client.netns.enter(|| (0..5).map(|_| tcp_whoami(SocketAddrV4::new(VIP, 80)).unwrap()).collect());
    assert!(answers.iter().all(|(pod, peer)| pod == "pod-2" && *peer == client.ip.to_string()), "{answers:?}");
}

fn node_ports_are_not_served_on_loopback(mode: Mode) {
    let mut setup = setup(mode, web(json!({"type": "NodePort"}), json!({})), &[]);
    setup.wait_for_backends(NODE_PORT, [2, 2]);
    let node = &setup.topology.nodes[0];
    let loopback = node.enter(|| tcp_ask(SocketAddrV4::new(Ipv4Addr::LOCALHOST, NODE_PORT)));
    assert!(loopback.is_err(), "127.0.0.1:{NODE_PORT} answered: {loopback:?}");
    let services = setup.agents[0].cli("services", &["-o", "json"]).unwrap();
    assert!(!services.contains("127.0.0.1"), "a loopback frontend: {services}");
    assert!(services.contains("\"10.200.0.1\""), "the node address is served: {services}");
}

/// A backend with nothing on the port answers ICMP port unreachable; the
/// client must get it as if from the node it used, quoting its own packet,
/// whether the backend is on that node or behind the other (SNAT).
fn a_backend_port_unreachable_reaches_the_external_client(mode: Mode) {
    let mut setup = setup(mode, web(json!({"type": "NodePort"}), json!({})), &[]);
    let closed_port: u16 = 30054;
    let mut closed =
        service("demo", "closed", Ipv4Addr::new(10, 96, 0, 11), &[("dns", 54, "UDP")], json!({"type": "NodePort"}));
    closed["spec"]["ports"][0]["nodePort"] = json!(closed_port);
    write_yaml(&setup.manifests.0, "closed.yaml", &closed);
    // Only on node-2, and nothing listens on port 9 there.
    let pod = setup.topology.pod("pod-2");
    let endpoint = Endpoint::ready(&pod.name, pod.ip).on("node-2");
    write_yaml(
        &setup.manifests.0,
        "closed-slice.yaml",
        &endpoint_slice("demo", "closed", &[("dns", 9, "UDP")], &[endpoint]),
    );
    for agent in &mut setup.agents {
        agent
            .wait_for_maps("the closed service", |c| {
                c.frontends().any(|(k, b)| k.port == closed_port.to_be_bytes() && b.len() == 1)
            })
            .unwrap();
    }
    for n in [1, 2] {
        let target = SocketAddrV4::new(MultiNode::node_ip(n), closed_port);
        let outcome = setup.in_client(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.connect(target)?;
            socket.send(b"ping")?;
            socket.recv(&mut [0u8; 64])
        });
        let error = outcome.expect_err("nothing listens");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "via node-{n}: {error}");
    }
}

/// An agent restarted with the other external program replaces the one
/// on eth0: the new one is attached before the old one goes, the open
/// connections (their conntrack entries are shared) go on, and XDP is off
/// the interface afterwards. Started with the default (tc); the LAN
/// carries XDP_TX so that both work.
#[test]
fn switching_the_external_program_keeps_open_connections() {
    let mut setup = setup_on(Mode::Default, Lan::XdpCapable, web(json!({"type": "NodePort"}), json!({})), &[]);
    setup.wait_for_backends(NODE_PORT, [2, 2]);
    assert_eq!(eth0_programs(&setup.agents[0]), ["tc_from_wire"]);
    // Connections until both nodes' pods have some (each goes to either
    // with even odds; six alone miss one 1 time in 32).
    let mut sessions: Vec<(Session, String)> = Vec::new();
    for i in 0..40 {
        let mut session = setup.in_client(|| Session::connect(node_port(1))).unwrap();
        let backend = session.ask(&format!("hello {i}")).unwrap();
        sessions.push((session, backend));
        let reached: BTreeSet<&str> = sessions.iter().map(|(_, b)| b.as_str()).collect();
        if sessions.len() >= 6 && reached.len() == 2 {
            break;
        }
    }
    let backends: BTreeSet<&str> = sessions.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(backends.len(), 2, "open connections to both nodes' pods: {backends:?}");

    // Not the default: XDP is for NICs that run it natively.
    setup.agents[0].restart_with(&["--external-datapath", "xdp"]).unwrap();
    setup.agents[0].wait_for_log("program=\"xdp_from_wire\"").unwrap();
    setup.agents[0].wait_for_log("replaced: detached").unwrap();
    assert_eq!(eth0_programs(&setup.agents[0]), ["xdp_from_wire"]);
    for (i, (session, backend)) in sessions.iter_mut().enumerate() {
        assert_eq!(&session.ask(&format!("after {i}")).unwrap(), backend, "connection {i} kept its backend");
    }
    let reached: BTreeSet<String> = setup.in_client(|| (0..16).map(|_| tcp_ask(node_port(1)).unwrap()).collect());
    assert_eq!(reached.len(), 2, "new connections reach both nodes' pods: {reached:?}");
}

in_both_modes!(
    node_port_reaches_backends_on_both_nodes_from_outside,
    load_balancer_and_external_ips_are_served_and_source_ranges_enforced,
    policy_local_keeps_the_client_address_and_health_checks_follow_local_endpoints,
    cluster_ip_traffic_to_a_backend_on_another_node_keeps_the_pod_address,
    node_ports_are_not_served_on_loopback,
    a_backend_port_unreachable_reaches_the_external_client,
);
