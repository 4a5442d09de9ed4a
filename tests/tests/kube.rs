//! The Kubernetes source end to end: the real agent, watching the test API
//! server through a kubeconfig, in the routed netns topology. Needs root.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, TempDir},
    apiserver::{ApiServer, Kind},
    manifests::{Endpoint, Port, endpoint_slice, service},
    netns::{Cluster, Netns, Topology},
    pods::{PodServer, Session, TCP_PORT, UDP_PORT, http_get, tcp_ask},
    traffic::Traffic,
};
use serde_json::{Value, json};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

fn web() -> Value {
    service("demo", "web", *VIP.ip(), &PORTS, json!({}))
}

fn slice(backends: &[(&str, Ipv4Addr)]) -> Value {
    let endpoints: Vec<Endpoint> = backends.iter().map(|(name, ip)| Endpoint::ready(name, *ip)).collect();
    endpoint_slice("demo", "web", &SLICE_PORTS, &endpoints)
}

/// A test API server in the node namespace and an agent watching it.
fn kube_agent(cluster: &Cluster, objects: &[(Kind, Value)], extra_args: &[&str]) -> (ApiServer, TempDir, Agent) {
    let api = ApiServer::start(&cluster.node).unwrap();
    for (kind, object) in objects {
        api.apply(*kind, object.clone());
    }
    let config = TempDir::new("lb-kubeconfig").unwrap();
    let kubeconfig = api.write_kubeconfig(&config.0).unwrap();
    let mut args = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let agent = Agent::start(&cluster.node, &args).unwrap();
    (api, config, agent)
}

fn wait_for_backends(agent: &mut Agent, wanted: &[Ipv4Addr]) {
    let wanted: BTreeSet<[u8; 4]> = wanted.iter().map(|a| a.octets()).collect();
    agent
        .wait_for_maps(&format!("backends {wanted:?}"), |c| {
            c.frontends().any(|(k, b)| k.protocol == 6 && b.iter().map(|b| b.addr).collect::<BTreeSet<_>>() == wanted)
        })
        .unwrap();
}

fn asks(client: &Netns, n: usize) -> Vec<String> {
    client.enter(|| (0..n).map(|_| tcp_ask(VIP)).collect::<Result<_, _>>()).unwrap()
}

fn get(node: &Netns, port: u16, path: &str) -> (u16, String) {
    node.enter(|| http_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), path)).unwrap()
}

fn metric(node: &Netns, name: &str) -> f64 {
    let (_, body) = get(node, 10249, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn follows_the_cluster_through_scaling_an_api_outage_and_deletion() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let pod = |i: usize| (cluster.pods[i].name.as_str(), cluster.pods[i].ip);
    let (node, client) = (&cluster.node, &cluster.pod("client").netns);
    let (mut api, _config, mut agent) = kube_agent(&cluster, &[], &[]);
    agent.wait_for_attachments(4).unwrap();

    // Not healthy before the first sync; healthy after, with kube-proxy's body.
    api.apply(Kind::Service, web());
    api.apply(Kind::EndpointSlice, slice(&[pod(0)]));
    wait_for_backends(&mut agent, &[pod(0).1]);
    assert_eq!(asks(client, 5), vec!["backend-0"; 5]);
    let (status, body) = get(node, 10256, "/healthz");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(health["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
    assert_eq!(get(node, 10256, "/livez").0, 200);

    // Scaling up and down is followed.
    api.apply(Kind::EndpointSlice, slice(&[pod(0), pod(1), pod(2)]));
    wait_for_backends(&mut agent, &[pod(0).1, pod(1).1, pod(2).1]);
    assert!(asks(client, 30).iter().collect::<BTreeSet<_>>().len() > 1);
    api.apply(Kind::EndpointSlice, slice(&[pod(2)]));
    wait_for_backends(&mut agent, &[pod(2).1]);
    assert_eq!(asks(client, 10), vec!["backend-2"; 10]);
    let mut session = client.enter(|| Session::connect(VIP)).unwrap();
    assert_eq!(session.ask("before the outage").unwrap(), "backend-2");

    // The API server goes away: traffic keeps flowing on the last known state.
    api.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(asks(client, 10), vec!["backend-2"; 10]);
    assert_eq!(session.ask("during the outage").unwrap(), "backend-2");
    assert_eq!(get(node, 10256, "/healthz").0, 200, "no change is pending: still healthy");

    // It comes back with other objects and no history before them (410 on
    // re-watch): the agent lists again and converges, keeping open flows.
    api.apply(Kind::EndpointSlice, slice(&[pod(1)]));
    api.compact();
    let lists_before = api.lists();
    api.restart().unwrap();
    wait_for_backends(&mut agent, &[pod(1).1]);
    assert!(api.expired() >= 1, "no watch was refused with 410");
    assert!(api.lists() > lists_before, "no relist");
    assert_eq!(asks(client, 10), vec!["backend-1"; 10]);
    assert_eq!(session.ask("after the outage").unwrap(), "backend-2", "established flow kept its backend");

    // Deleting the Service removes its frontends.
    api.delete(Kind::Service, "demo", "web");
    agent.wait_for_maps("no frontends", |c| c.frontends().count() == 0).unwrap();

    // Metrics with kube-proxy's names, and the datapath's counters.
    assert!(metric(node, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 4.0);
    assert!(metric(node, "kubeproxy_network_programming_duration_seconds_count") >= 1.0);
    assert!(metric(node, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    assert!(metric(node, "lb_datapath_packets_total{verdict=\"dnat_new\"}") >= 60.0);
    assert_eq!(metric(node, "lb_service_frontends"), 0.0);
    // Map fill: the agent's maps after its last sync, the datapath's at
    // scrape, each against the kernel's size (default flags: SERVICES
    // 65,536; CONNTRACK from this node's memory).
    assert_eq!(metric(node, "lb_map_entries{map=\"SERVICES\"}"), 0.0);
    assert_eq!(metric(node, "lb_map_capacity{map=\"SERVICES\"}"), 65_536.0);
    assert!(metric(node, "lb_map_entries{map=\"CONNTRACK\"}") >= 2.0);
    assert!(metric(node, "lb_map_capacity{map=\"CONNTRACK\"}") >= 262_144.0, "never below kube-proxy's floor");
    // The endpoint filter: its bits, 32 per SERVICES and BACKENDS entry.
    assert_eq!(metric(node, "lb_map_capacity{map=\"ENDPOINT_FILTER\"}"), f64::from(1u32 << 22));
    assert!(metric(node, "lb_map_entries{map=\"ENDPOINT_FILTER\"}") < f64::from(1u32 << 22) * 0.01);
}

#[test]
fn killing_and_restarting_the_agent_loses_no_request() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..2].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let backends = slice(&[("backend-0", cluster.pods[0].ip), ("backend-1", cluster.pods[1].ip)]);
    let (_api, _config, mut agent) =
        kube_agent(&cluster, &[(Kind::Service, web()), (Kind::EndpointSlice, backends)], &[]);
    wait_for_backends(&mut agent, &[cluster.pods[0].ip, cluster.pods[1].ip]);
    agent.wait_for_attachments(3).unwrap();

    let traffic = Traffic::start(&cluster.pod("client").netns, VIP).unwrap();
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        agent.restart().unwrap();
        agent
            .wait_for_log_count("synced frontends=2 writes=0", round + 1)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    traffic.stop().assert_none_failed(100);
}

#[test]
fn a_burst_of_changes_becomes_a_few_syncs() {
    let cluster = Cluster::new(Topology::Routed, &[]).unwrap();
    let (api, _config, mut agent) = kube_agent(&cluster, &[(Kind::Service, web())], &[]);
    agent.wait_for_log("synced").unwrap();
    let syncs_before = metric(&cluster.node, "kubeproxy_sync_proxy_rules_duration_seconds_count");
    for i in 0..1000u32 {
        let ip = Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1);
        api.apply(Kind::EndpointSlice, slice(&[("pod", ip)]));
    }
    let last = Ipv4Addr::new(10, 244, 3, 250);
    wait_for_backends(&mut agent, &[last]);
    let syncs = metric(&cluster.node, "kubeproxy_sync_proxy_rules_duration_seconds_count") - syncs_before;
    assert!((1.0..=20.0).contains(&syncs), "1000 events took {syncs} syncs");
}

#[test]
fn a_node_being_removed_fails_healthz_but_not_livez() {
    let cluster = Cluster::new(Topology::Routed, &[]).unwrap();
    let node = |taints: Value| json!({"metadata": {"name": "node-1"}, "spec": {"taints": taints}});
    let other = json!({"metadata": {"name": "other-node"}, "spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}});
    let objects = [(Kind::Node, node(json!([]))), (Kind::Node, other)];
    let (api, _config, mut agent) = kube_agent(&cluster, &objects, &["--node-name", "node-1"]);
    agent.wait_for_log("synced").unwrap();
    let health = |path: &str| {
        let (status, body) = get(&cluster.node, 10256, path);
        (status, serde_json::from_str::<Value>(&body).unwrap()["nodeEligible"].clone())
    };
    assert_eq!(health("/healthz"), (200, json!(true)), "another node's taint is not ours");

    api.apply(
        Kind::Node,
        node(json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}])),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health("/healthz").0 != 503 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(health("/healthz"), (503, json!(false)));
    assert_eq!(health("/livez"), (200, json!(false)), "alive, only not a load-balancer target");

    api.apply(Kind::Node, node(json!([])));
    while health("/healthz").0 != 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(health("/healthz"), (200, json!(true)));
}

/// A dual-stack Service from the API server, as a dual-stack cluster has
/// it (two cluster IPs, one slice per address family): both families
/// answer, each from its own slice, and a change to the IPv6 slice alone
/// reaches the IPv6 frontend alone.
#[test]
fn a_dual_stack_service_is_served_in_both_families() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..2].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let vip6: std::net::Ipv6Addr = "fd00:96::10".parse().unwrap();
    let dual = lb_tests::manifests::service_with_cluster_ips(
        "demo",
        "web",
        &[(*VIP.ip()).into(), vip6.into()],
        &PORTS,
        json!({}),
    );
    let pods = &cluster.pods[..2];
    let slice6 = |pods: &[lb_tests::netns::Pod]| {
        let endpoints: Vec<Endpoint> = pods.iter().map(|p| Endpoint::ready(&p.name, p.ip6)).collect();
        lb_tests::manifests::endpoint_slice6("demo", "web", &SLICE_PORTS, &endpoints)
    };
    let backends: Vec<(&str, Ipv4Addr)> = pods.iter().map(|p| (p.name.as_str(), p.ip)).collect();
    let objects = [(Kind::Service, dual), (Kind::EndpointSlice, slice(&backends)), (Kind::EndpointSlice, slice6(pods))];
    let (api, _config, mut agent) = kube_agent(&cluster, &objects, &[]);
    let ipv6_backends = |count: usize| {
        move |c: &lb_userspace::plan::MapContents<lb_common::Ipv6>| {
            c.frontends().any(|(k, b)| k.protocol == 6 && b.len() == count)
        }
    };
    agent.wait_for_maps6("the IPv6 frontend", ipv6_backends(2)).unwrap();
    wait_for_backends(&mut agent, &[pods[0].ip, pods[1].ip]);
    agent.wait_for_attachments(3).unwrap();
    let client = &cluster.pod("client").netns;
    let vip6_tcp = std::net::SocketAddr::new(vip6.into(), 80);
    let reached = |addr: std::net::SocketAddr| -> BTreeSet<String> {
        client.enter(|| (0..20).map(|_| tcp_ask(addr)).collect::<Result<_, _>>()).unwrap()
    };
    let both: BTreeSet<String> = ["backend-0".into(), "backend-1".into()].into();
    assert_eq!(reached(VIP.into()), both);
    assert_eq!(reached(vip6_tcp), both);

    // The IPv6 slice shrinks: the IPv6 frontend follows, the IPv4 one keeps both.
    api.apply(Kind::EndpointSlice, slice6(&cluster.pods[..1]));
    agent.wait_for_maps6("one IPv6 backend", ipv6_backends(1)).unwrap();
    assert_eq!(reached(vip6_tcp), ["backend-0".to_string()].into());
    assert_eq!(reached(VIP.into()), both);
    assert!(agent.stop().unwrap().success(), "{}", agent.log());
}
