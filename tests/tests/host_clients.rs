//! Host-network clients (the node itself, hostNetwork pods) reaching
//! ClusterIPs through socket-level balancing, with the agent's defaults
//! (`--socket-lb host`, attached at the cgroup v2 root): only sockets of the
//! agent's own network namespace are translated. Needs root and cgroup v2.
use std::{collections::BTreeSet, net::Ipv4Addr, net::SocketAddrV4};

use lb_tests::{
    agent::{Agent, TempDir},
    clients::{Answer, Client, ClientPath, TestCgroup},
    manifests::{Endpoint, endpoint_slice, service, write_yaml},
    netns::{Cluster, Topology},
    pods::{PodServer, TCP_PORT, UDP_PORT},
};
use serde_json::json;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const HTTP: SocketAddrV4 = SocketAddrV4::new(VIP, 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(VIP, 53);

/// Two backends behind VIP (TCP 80, UDP 53), an agent started with `args`.
fn web(cluster: &Cluster, args: &[&str]) -> (Agent, TempDir) {
    let manifests = TempDir::new("lb-host").unwrap();
    let ports = [("http", 80, "TCP"), ("dns", 53, "UDP")];
    let targets = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];
    let endpoints: Vec<Endpoint> = cluster.pods.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    write_yaml(&manifests.0, "service.yaml", &service("default", "web", VIP, &ports, json!({})));
    write_yaml(&manifests.0, "slice.yaml", &endpoint_slice("default", "web", &targets, &endpoints));
    let source = format!("dir:{}", manifests.0.display());
    let mut all_args = vec!["--source", &source];
    all_args.extend(args);
    let mut agent = Agent::start(&cluster.node, &all_args).unwrap();
    agent.wait_for_maps("the service", |c| c.frontends().count() == 2).unwrap();
    agent.wait_for_log("sockets balanced at connect").unwrap();
    (agent, manifests)
}

fn two_backends() -> (Cluster, Vec<PodServer>) {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1"]).unwrap();
    let servers = cluster.pods.iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    (cluster, servers)
}

fn assert_shows_service(path: ClientPath, answer: &Answer, service: SocketAddrV4) {
    let Answer::From { pod, peer } = answer else { panic!("{path:?}: {answer:?}") };
    assert!(pod.starts_with("backend-"), "{path:?}: {answer:?}");
    let shown = match path {
        ClientPath::Host6 => format!("[::ffff:{}]:{}", service.ip(), service.port()),
        _ => service.to_string(),
    };
    assert_eq!(*peer, shown, "{path:?}: the application sees the service address");
}

#[test]
fn host_clients_reach_cluster_ips_through_socket_level_balancing_with_the_defaults() {
    let (cluster, _servers) = two_backends();
    let (_agent, _manifests) = web(&cluster, &[]);
    for path in [ClientPath::Host, ClientPath::Host6] {
        let mut client = Client::start(path, &cluster.node, None);
        // TCP: connected straight to a backend; the application sees the service.
        let mut pods = BTreeSet::new();
        // 20: each goes to either pod with even odds (10 miss one 1 time in 512).
        for _ in 0..20 {
            let answer = client.ask("tcp", HTTP);
            assert_shows_service(path, &answer, HTTP);
            pods.insert(answer.pod().unwrap().to_owned());
        }
        assert_eq!(pods.len(), 2, "{path:?}: 20 connections reached {pods:?}");
        // UDP, unconnected (sendmsg/recvmsg) and connected (connect/getpeername).
        for mode in ["udp", "udp-connected"] {
            assert_shows_service(path, &client.ask(mode, DNS), DNS);
        }
    }
    // A pod's sockets are not the node's: the pod takes the tc path, and
    // still reaches the service.
    let pod = Client::start(ClientPath::PodTc, &cluster.pods[0].netns, None).ask("tcp", HTTP);
    assert_shows_service(ClientPath::PodTc, &pod, HTTP);
}

#[test]
fn a_cgroup_path_limits_socket_balancing_to_its_processes() {
    // Non-default on purpose: `--cgroup-path` narrows the hooks to one
    // cgroup; the default (the root) is tested above.
    let (cluster, _servers) = two_backends();
    let cgroup = TestCgroup::new();
    let (_agent, _manifests) = web(&cluster, &["--cgroup-path", cgroup.0.to_str().unwrap()]);
    let inside = Client::start(ClientPath::Host, &cluster.node, Some(&cgroup.0)).ask("tcp", HTTP);
    assert_shows_service(ClientPath::Host, &inside, HTTP);
    // Outside the cgroup nothing translates it: the node has no route to
    // the cluster IP.
    let outside = Client::start(ClientPath::Host, &cluster.node, None).ask("tcp", HTTP);
    assert!(matches!(outside, Answer::Error { .. }), "{outside:?}");
}

#[test]
fn two_agents_in_two_namespaces_never_translate_each_others_sockets() {
    // Both at the cgroup root (the default), each for its own namespace;
    // only the first serves VIP. Were the first to translate the second
    // node's sockets, the second node would reach VIP.
    let (first, _first_servers) = two_backends();
    let (second, _second_servers) = two_backends();
    let (_first_agent, _m) = web(&first, &[]);
    let manifests = TempDir::new("lb-host-other").unwrap();
    let other = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 41), 80);
    let endpoints: Vec<Endpoint> = second.pods.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    write_yaml(
        &manifests.0,
        "service.yaml",
        &service("default", "other", *other.ip(), &[("http", 80, "TCP")], json!({})),
    );
    write_yaml(
        &manifests.0,
        "slice.yaml",
        &endpoint_slice("default", "other", &[("http", TCP_PORT, "TCP")], &endpoints),
    );
    let mut second_agent = Agent::with_manifests(&second.node, &manifests.0).unwrap();
    second_agent.wait_for_maps("the other service", |c| c.frontends().count() == 1).unwrap();
    second_agent.wait_for_log("sockets balanced at connect").unwrap();

    let mut on_first = Client::start(ClientPath::Host, &first.node, None);
    let mut on_second = Client::start(ClientPath::Host, &second.node, None);
    for _ in 0..3 {
        assert_shows_service(ClientPath::Host, &on_first.ask("tcp", HTTP), HTTP);
        assert_shows_service(ClientPath::Host, &on_second.ask("tcp", other), other);
        assert!(
            matches!(on_second.ask("tcp", HTTP), Answer::Error { .. }),
            "the first agent translated the second node"
        );
        assert!(
            matches!(on_first.ask("tcp", other), Answer::Error { .. }),
            "the second agent translated the first node"
        );
    }
}

#[test]
fn socket_lb_off_detaches_the_programs_an_earlier_agent_left() {
    let (cluster, _servers) = two_backends();
    let (mut agent, _manifests) = web(&cluster, &[]);
    let links = |agent: &Agent| {
        std::fs::read_dir(agent.pin_path.join("links"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("cgroup_"))
            .count()
    };
    assert_eq!(links(&agent), lb_common::PROGS_SOCK.len() + lb_common::PROGS_SOCK_BIND.len());
    let mut client = Client::start(ClientPath::Host, &cluster.node, None);
    assert_shows_service(ClientPath::Host, &client.ask("tcp", HTTP), HTTP);
    agent.restart_with(&["--socket-lb", "off"]).unwrap();
    agent.wait_for_log("socket-level balancing off").unwrap();
    assert_eq!(links(&agent), 0);
    assert!(matches!(client.ask("tcp", HTTP), Answer::Error { .. }), "still translated after --socket-lb off");
}

#[test]
fn a_host_process_cannot_bind_a_port_a_node_port_serves() {
    let (cluster, _servers) = two_backends();
    let manifests = TempDir::new("lb-bind").unwrap();
    let endpoints: Vec<Endpoint> = cluster.pods.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    let node_port = |type_: &str| {
        let spec = json!({"type": type_, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080}]});
        service("default", "web", VIP, &[("http", 80, "TCP")], spec)
    };
    write_yaml(&manifests.0, "service.yaml", &node_port("NodePort"));
    write_yaml(&manifests.0, "slice.yaml", &endpoint_slice("default", "web", &[("http", TCP_PORT, "TCP")], &endpoints));
    let source = format!("dir:{}", manifests.0.display());
    let mut agent = Agent::start(&cluster.node, &["--source", &source]).unwrap();
    agent.wait_for_log("sockets balanced at connect").unwrap();
    let node_address = std::cell::Cell::new(None);
    agent
        .wait_for_maps("the NodePort", |c| {
            let frontend = c.frontends().find(|(k, _)| u16::from_be_bytes(k.port) == 30080);
            node_address.set(frontend.map(|(k, _)| Ipv4Addr::from(k.vip)));
            node_address.get().is_some()
        })
        .unwrap();
    let node_address = node_address.get().unwrap();
    let tcp = |addr: std::net::SocketAddr| std::net::TcpListener::bind(addr).map(drop).map_err(|e| e.kind());
    let udp = |addr: std::net::SocketAddr| std::net::UdpSocket::bind(addr).map(drop).map_err(|e| e.kind());
    let in_use = Err(std::io::ErrorKind::AddrInUse);
    // Waits for the agent's NODE_PORTS write, which follows the maps'.
    let refused = |addr: &str| {
        let addr = addr.parse().unwrap();
        (0..50).any(|_| {
            let refused = cluster.node.enter(|| tcp(addr)) == in_use;
            if !refused {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            refused
        })
    };
    assert!(refused("0.0.0.0:30080"), "the wildcard takes the NodePort's port on every node address");
    assert!(refused("[::]:30080"), "so does the IPv6 wildcard, which takes IPv4 too");
    assert!(refused(&format!("{node_address}:30080")), "and the node address itself");
    cluster.node.enter(|| {
        assert_eq!(tcp("127.0.0.1:30080".parse().unwrap()), Ok(()), "NodePorts are never served on loopback");
        assert_eq!(tcp("0.0.0.0:30081".parse().unwrap()), Ok(()), "another port");
        assert_eq!(udp("0.0.0.0:30080".parse().unwrap()), Ok(()), "the NodePort is TCP only");
    });
    // A pod's namespace has no NodePorts: its binds are its own.
    assert_eq!(cluster.pods[0].netns.enter(|| tcp("0.0.0.0:30080".parse().unwrap())), Ok(()));

    // No longer a NodePort: the port is free again.
    write_yaml(&manifests.0, "service.yaml", &node_port("ClusterIP"));
    agent.wait_for_maps("no NodePort", |c| c.frontends().all(|(k, _)| u16::from_be_bytes(k.port) != 30080)).unwrap();
    let free = (0..50).any(|_| {
        let free = cluster.node.enter(|| tcp("0.0.0.0:30080".parse().unwrap())).is_ok();
        if !free {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        free
    });
    assert!(free, "the port is free once no NodePort serves it");
}

/// Native IPv6: a host process's AF_INET6 socket to an IPv6 cluster IP is
/// sent to a backend at connect (sendmsg for unconnected UDP) through the
/// IPv6 maps, and sees the service address back (SOCK_REVNAT6), with the
/// defaults. A dual-stack Service: its IPv4 address still works alike.
#[test]
fn host_clients_reach_ipv6_cluster_ips_through_socket_level_balancing() {
    let (cluster, _servers) = two_backends();
    let manifests = TempDir::new("lb-host6").unwrap();
    let vip6: std::net::Ipv6Addr = "fd00:96::40".parse().unwrap();
    let ports = [("http", 80, "TCP"), ("dns", 53, "UDP")];
    let targets = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];
    let dual =
        lb_tests::manifests::service_with_cluster_ips("default", "web", &[VIP.into(), vip6.into()], &ports, json!({}));
    write_yaml(&manifests.0, "service.yaml", &dual);
    let endpoints: Vec<Endpoint> = cluster.pods.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    write_yaml(&manifests.0, "slice.yaml", &endpoint_slice("default", "web", &targets, &endpoints));
    let endpoints6: Vec<Endpoint> = cluster.pods.iter().map(|p| Endpoint::ready(&p.name, p.ip6)).collect();
    let slice6 = lb_tests::manifests::endpoint_slice6("default", "web", &targets, &endpoints6);
    write_yaml(&manifests.0, "slice6.yaml", &slice6);
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    agent.wait_for_maps6("the IPv6 service", |c| c.frontends().count() == 2).unwrap();
    agent.wait_for_maps("the IPv4 service", |c| c.frontends().count() == 2).unwrap();
    agent.wait_for_log("sockets balanced at connect").unwrap();

    let mut client = Client::start(ClientPath::Host, &cluster.node, None);
    let (http6, dns6) = (std::net::SocketAddr::new(vip6.into(), 80), std::net::SocketAddr::new(vip6.into(), 53));
    let mut pods = BTreeSet::new();
    for _ in 0..20 {
        let answer = client.ask("tcp", http6);
        let Answer::From { pod, peer } = &answer else { panic!("TCP to {http6}: {answer:?}") };
        assert_eq!(*peer, http6.to_string(), "the application sees the service address");
        pods.insert(pod.clone());
    }
    assert_eq!(pods.len(), 2, "20 connections reached {pods:?}");
    for mode in ["udp", "udp-connected"] {
        let answer = client.ask(mode, dns6);
        let Answer::From { pod, peer } = &answer else { panic!("{mode} to {dns6}: {answer:?}") };
        assert!(pod.starts_with("backend-") && *peer == dns6.to_string(), "{mode}: {answer:?}");
    }
    // Translated at the socket: no packet of it met the pods' hook's
    // conntrack.
    let maps = lb_userspace::datapath::Maps::open_pinned(&agent.pin_path).unwrap();
    let ipv6 = maps.ipv6.as_ref().unwrap();
    assert!(ipv6.sock_revnat.keys().filter(Result::is_ok).count() >= 20);
    assert_eq!(ipv6.conntrack.keys().filter(Result::is_ok).count(), 0);
    // The IPv4 side of the same Service, through the IPv4 maps.
    assert_shows_service(ClientPath::Host, &client.ask("tcp", HTTP), HTTP);
}
