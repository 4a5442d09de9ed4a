//! ClusterIP end to end: the real agent in a node namespace, real TCP and
//! UDP servers in backend pods, real clients in a client pod; in both CNI
//! topologies. Needs root.
use std::{
    collections::BTreeSet,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use lb_tests::{
    agent::{Agent, TempDir},
    manifests::{Endpoint, Port, endpoint_slice, service, write_yaml},
    netns::{Cluster, Topology},
    pods::{PodServer, Session, TCP_PORT, UDP_PORT, tcp_ask, udp_ask},
};
use serde_json::json;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORTS: [Port; 2] = [("http", 80, "TCP"), ("dns", 53, "UDP")];
const SLICE_PORTS: [Port; 2] = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];

fn write_slice(dir: &Path, backends: &[(String, Ipv4Addr)]) {
    let endpoints: Vec<Endpoint> = backends.iter().map(|(name, ip)| Endpoint::ready(name, *ip)).collect();
    write_yaml(dir, "web-slice.yaml", &endpoint_slice("demo", "web", &SLICE_PORTS, &endpoints));
}

fn frontend_has(agent: &mut Agent, count: usize) {
    agent
        .wait_for_maps(&format!("{count} TCP backends"), |c| {
            c.frontends().any(|(k, b)| k.protocol == 6 && b.len() == count)
        })
        .unwrap();
}

fn clusterip_end_to_end(topology: Topology) {
    let mut cluster = Cluster::new(topology, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let backends: Vec<(String, Ipv4Addr)> = cluster.pods[..3].iter().map(|p| (p.name.clone(), p.ip)).collect();
    let manifests = TempDir::new("lb-manifests").unwrap();
    write_yaml(&manifests.0, "web.yaml", &service("demo", "web", VIP, &PORTS, json!({})));
    write_slice(&manifests.0, &backends);

    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0).unwrap();
    frontend_has(&mut agent, 3);
    agent.wait_for_attachments(4).unwrap();
    // No IPv6 frontend: the IPv6 maps stay dormant, costing next to no
    // memory (`lb_common::IPV6_DORMANT_ENTRIES`).
    assert_eq!(agent.map_max_entries("CONNTRACK6").unwrap(), u64::from(lb_common::IPV6_DORMANT_ENTRIES));
    let client = &cluster.pod("client").netns;
    let vip_tcp = SocketAddrV4::new(VIP, 80);

    // Every new connection succeeds, and they spread.
    let answers: Vec<String> = client.enter(|| (0..30).map(|_| tcp_ask(vip_tcp)).collect::<Result<_, _>>()).unwrap();
    let reached: BTreeSet<&String> = answers.iter().collect();
    assert!(reached.len() > 1, "30 connections all reached {reached:?}");

    // The CLI reads the datapath's counters from the pinned maps.
    let stats: serde_json::Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    let packets = |verdict: &str| {
        let rows = stats["verdicts"].as_array().unwrap();
        rows.iter().find(|r| r["verdict"] == verdict).unwrap()["packets"].as_u64().unwrap()
    };
    assert!(packets("dnat_new") >= 30, "{stats}");
    assert!(packets("dnat_established") > 0 && packets("reverse_nat") > 0, "{stats}");
    assert_eq!(packets("drop_rewrite_failed"), 0, "{stats}");
    assert!(stats["conntrack_entries"].as_u64().unwrap() >= 60, "{stats}");

    // UDP through the ClusterIP.
    let who = client.enter(|| udp_ask(SocketAddrV4::new(VIP, 53))).unwrap();
    assert!(who.starts_with("backend-"), "UDP answer {who:?}");

    // Traffic not for a service is untouched: straight to a pod address.
    let direct = client.enter(|| tcp_ask(SocketAddrV4::new(cluster.pods[1].ip, TCP_PORT))).unwrap();
    assert_eq!(direct, "backend-1");

    // One long-lived connection keeps its backend for 100 messages.
    let mut session = client.enter(|| Session::connect(vip_tcp)).unwrap();
    let pinned = session.ask("m0").unwrap();
    for i in 1..100 {
        assert_eq!(session.ask(&format!("m{i}")).unwrap(), pinned, "message {i}");
    }

    // A broken manifest is reported by file, object and field, and nothing
    // else is disturbed.
    fs::write(
        manifests.0.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {clusterIP: 10.96.0.99, ports: [{port: high}]}\n",
    )
    .unwrap();

    // The backend of the open connection leaves the Service.
    let remaining: Vec<(String, Ipv4Addr)> = backends.iter().filter(|(name, _)| *name != pinned).cloned().collect();
    write_slice(&manifests.0, &remaining);
    frontend_has(&mut agent, 2);
    let log = agent.log();
    assert!(log.contains("broken.yaml: Service default/broken: spec.ports[0].port: invalid type"), "{log}");

    // The established connection is not dropped by the change...
    assert_eq!(session.ask("after removal").unwrap(), pinned);
    // ...and no new connection reaches the removed backend.
    let answers: Vec<String> = client.enter(|| (0..40).map(|_| tcp_ask(vip_tcp)).collect::<Result<_, _>>()).unwrap();
    assert!(!answers.contains(&pinned), "a new connection reached removed {pinned}: {answers:?}");
    assert_eq!(answers.iter().collect::<BTreeSet<_>>().len(), 2);

    // A pod created while the agent runs gets the program too.
    cluster.add_pod("late-client").unwrap();
    agent.wait_for_attachments(5).unwrap();
    let late = &cluster.pod("late-client").netns;
    assert!(late.enter(|| tcp_ask(vip_tcp)).unwrap().starts_with("backend-"));

    // SIGTERM: a clean exit that leaves the datapath serving, new
    // connections and the open one alike.
    assert!(agent.stop().unwrap().success(), "{}", agent.log());
    // The IPv6 half of the pods' program stays reachable while no agent
    // runs: its program array is pinned (unpinned, the kernel would have
    // emptied it as the agent exited).
    assert_eq!(agent.tail_calls().unwrap(), [lb_common::TAIL_CALL_POD6]);
    let client = &cluster.pod("client").netns;
    assert!(client.enter(|| tcp_ask(vip_tcp)).unwrap().starts_with("backend-"));
    assert_eq!(session.ask("agent stopped").unwrap(), pinned);

    // A new agent adopts the pinned maps and links: nothing to write, the
    // same TCX links now run its program, and the open connection never
    // notices.
    let links_before = agent.links().unwrap();
    agent.restart().unwrap();
    agent.wait_for_log("synced frontends=2 writes=0").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (new_program, links_after) = loop {
        let (program, links) = (agent.program_id().unwrap(), agent.links().unwrap());
        if links.iter().all(|(_, p)| *p == program) || std::time::Instant::now() > deadline {
            break (program, links);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(links_after.len(), links_before.len());
    for ((id_before, old_program), (id_after, program)) in links_before.iter().zip(&links_after) {
        assert_eq!(id_before, id_after, "link replaced instead of updated");
        assert_ne!(old_program, program);
        assert_eq!(*program, new_program);
    }
    assert_eq!(session.ask("agent restarted").unwrap(), pinned);
    assert_eq!(agent.tail_calls().unwrap(), [lb_common::TAIL_CALL_POD6], "the new agent's IPv6 half");
    let answers: Vec<String> = client.enter(|| (0..10).map(|_| tcp_ask(vip_tcp)).collect::<Result<_, _>>()).unwrap();
    assert!(!answers.contains(&pinned), "{answers:?}");
}

#[test]
fn clusterip_routed_topology() {
    clusterip_end_to_end(Topology::Routed);
}

#[test]
fn clusterip_bridged_topology() {
    clusterip_end_to_end(Topology::Bridged);
}
