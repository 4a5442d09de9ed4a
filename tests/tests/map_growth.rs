//! Maps that fit the cluster, end to end: an agent whose maps start too
//! small for the Services it is given grows them while traffic flows, and
//! neither an open connection nor a stream of new ones notices, in either
//! family. Needs root.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, TempDir},
    manifests::{Endpoint, endpoint_slice, endpoint_slice6, service, service_with_cluster_ips, write_yaml},
    netns::{Cluster, Topology},
    pods::{PodServer, Session, TCP_PORT, tcp_ask},
    traffic::Traffic,
};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// `count` Services (from `first` on) of 4 endpoints nobody connects to.
fn write_fillers(dir: &std::path::Path, first: u32, count: u32) {
    for i in first..first + count {
        let name = format!("filler-{i}");
        let vip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1);
        write_yaml(dir, &format!("{name}.yaml"), &service("fill", &name, vip, &[("http", 80, "TCP")], json!({})));
        let pods: Vec<String> = (1..=4).map(|e| format!("{name}-{e}")).collect();
        let endpoints: Vec<Endpoint> = (1..=4u32)
            .zip(&pods)
            .map(|(e, pod)| Endpoint::ready(pod, Ipv4Addr::new(10, 250, (i / 60) as u8, (i % 60 * 4 + e) as u8)))
            .collect();
        let slice = endpoint_slice("fill", &name, &[("http", TCP_PORT, "TCP")], &endpoints);
        write_yaml(dir, &format!("{name}-slice.yaml"), &slice);
    }
}

fn map_stats(agent: &Agent) -> Value {
    let stats: Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    stats["maps"].clone()
}

fn capacity(maps: &Value, map: &str) -> u64 {
    let row = maps.as_array().unwrap().iter().find(|m| m["map"] == map).unwrap_or_else(|| panic!("{map}: {maps}"));
    row["capacity"].as_u64().unwrap()
}

#[test]
fn maps_grow_under_traffic_without_breaking_connections() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let manifests = TempDir::new("lb-manifests").unwrap();
    write_yaml(&manifests.0, "web.yaml", &service("demo", "web", VIP, &[("http", 80, "TCP")], json!({})));
    let endpoints: Vec<Endpoint> = cluster.pods[..3].iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    write_yaml(
        &manifests.0,
        "web-slice.yaml",
        &endpoint_slice("demo", "web", &[("http", TCP_PORT, "TCP")], &endpoints),
    );

    // Small initial sizes (the flags are floors), so that growth happens
    // at a test's scale; the default sizes grow the same way, from 65,536
    // (the benchmark runs 30,000 Services with no sizing flags).
    let dir = format!("dir:{}", manifests.0.display());
    let mut agent = Agent::start(
        &cluster.node,
        &["--source", &dir, "--services-max-entries", "32", "--backends-max-entries", "16"],
    )
    .unwrap();
    agent.wait_for_maps("the web frontend", |c| c.frontends().any(|(_, b)| b.len() == 3)).unwrap();
    agent.wait_for_attachments(4).unwrap();
    let maps = map_stats(&agent);
    assert_eq!((capacity(&maps, "SERVICES"), capacity(&maps, "BACKENDS")), (32, 16), "{maps}");
    let links_before = agent.links().unwrap();
    assert_eq!(links_before.len(), 4, "one TCX link per pod interface");

    let client = &cluster.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 80);
    let mut session = client.enter(|| Session::connect(vip)).unwrap();
    let pinned = session.ask("before").unwrap();

    // New connections all through the growth, from another thread.
    let (stop, made, failed) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            client.enter(|| {
                // Bounded: at most 60 s of connections, stopped earlier by the test.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    match tcp_ask(vip) {
                        Ok(_) => made.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failures.lock().unwrap().push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        });
        // 40 Services of 4 endpoints: 201 SERVICES entries, 163 backends;
        // then 40 more, past the first growth's headroom. (The directory
        // may be read mid-write: a third growth is fine.)
        write_fillers(&manifests.0, 0, 40);
        agent.wait_for_log_count("maps grown", 1).unwrap();
        agent.wait_for_maps("41 frontends", |c| c.frontends().count() == 41).unwrap();
        write_fillers(&manifests.0, 40, 40);
        agent.wait_for_log_count("maps grown", 2).unwrap();
        agent.wait_for_maps("81 frontends", |c| c.frontends().count() == 81).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let (made, failed) = (made.into_inner(), failed.into_inner());
    assert!(made > 20, "only {made} connections were made during the growth");
    assert_eq!(failed, 0, "{failed} of {} new connections failed: {:?}", made + failed, failures.into_inner());
    for i in 0..20 {
        assert_eq!(session.ask(&format!("after {i}")).unwrap(), pinned, "the open connection moved or broke");
    }

    let maps = map_stats(&agent);
    assert!(capacity(&maps, "SERVICES") >= 401 && capacity(&maps, "BACKENDS") >= 323, "{maps}");
    // Every link moved: same links, each now running the grown
    // generation's program (the one pinned now).
    let program = agent.program_id().unwrap();
    let links = agent.links().unwrap();
    assert_eq!(links.iter().map(|l| l.0).collect::<Vec<_>>(), links_before.iter().map(|l| l.0).collect::<Vec<_>>());
    assert!(links.iter().all(|(_, prog)| *prog == program), "links {links:?}, program {program}");
    assert!(links_before.iter().all(|(_, prog)| *prog != program), "a new generation: {links_before:?}");
    let log = agent.log();
    assert!(!log.contains("sync failed") && !log.contains("left on the previous maps"), "{log}");
    // Packets read the grown maps: a Service that exists only there works.
    let second = Ipv4Addr::new(10, 96, 0, 11);
    write_yaml(&manifests.0, "second.yaml", &service("demo", "second", second, &[("http", 80, "TCP")], json!({})));
    let first_pod = [Endpoint::ready(&cluster.pods[0].name, cluster.pods[0].ip)];
    let slice = endpoint_slice("demo", "second", &[("http", TCP_PORT, "TCP")], &first_pod);
    write_yaml(&manifests.0, "second-slice.yaml", &slice);
    agent.wait_for_maps("82 frontends", |c| c.frontends().count() == 82).unwrap();
    let answer = client.enter(|| tcp_ask(SocketAddrV4::new(second, 80))).unwrap();
    assert_eq!(answer, cluster.pods[0].name);
    let stats: Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    let dropped: u64 = stats["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["verdict"].as_str().is_some_and(|n| n.starts_with("drop")))
        .map(|v| v["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped, 0, "{stats}");

    // A restarted agent adopts the grown maps as they are.
    let synced = agent.log().matches("synced").count();
    let grown = agent.log().matches("maps grown").count();
    agent.restart().unwrap();
    agent.wait_for_log_count("synced", synced + 1).unwrap();
    let after_restart = map_stats(&agent);
    assert_eq!(capacity(&after_restart, "SERVICES"), capacity(&maps, "SERVICES"), "{after_restart}");
    assert_eq!(agent.log().matches("maps grown").count(), grown, "no growth after the restart");
    assert_eq!(session.ask("restarted").unwrap(), pinned);
    assert!(client.enter(|| tcp_ask(vip)).is_ok());
}

#[test]
fn fixed_map_sizes_fail_a_sync_that_does_not_fit_and_name_the_map() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0"]).unwrap();
    let manifests = TempDir::new("lb-manifests").unwrap();
    write_fillers(&manifests.0, 0, 10);
    let dir = format!("dir:{}", manifests.0.display());
    // --fixed-map-sizes: the operator's choice to size by hand.
    let mut agent =
        Agent::start(&cluster.node, &["--source", &dir, "--services-max-entries", "32", "--fixed-map-sizes"]).unwrap();
    agent.wait_for_log("sync failed").unwrap();
    let log = agent.log();
    assert!(log.contains("SERVICES is full") && log.contains("--services-max-entries"), "{log}");
    assert!(!log.contains("maps grown"), "{log}");
    let maps = map_stats(&agent);
    assert_eq!(capacity(&maps, "SERVICES"), 32, "{maps}");
}

/// IPv6 flows through the growth reload as IPv4's: the IPv6 maps are
/// grown with their namesakes (one set of sizes), CONNTRACK6 shared, and
/// an open IPv6 connection and a stream of new ones notice nothing.
#[test]
fn ipv6_flows_go_on_while_the_maps_grow() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1", "backend-2", "client"]).unwrap();
    let _servers: Vec<PodServer> =
        cluster.pods[..3].iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let manifests = TempDir::new("lb-manifests").unwrap();
    let six = std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
    let web6 = service_with_cluster_ips("demo", "web6", &[six.into()], &[("http", 80, "TCP")], json!({}));
    write_yaml(&manifests.0, "web6.yaml", &web6);
    let endpoints: Vec<Endpoint> = cluster.pods[..3].iter().map(|p| Endpoint::ready(&p.name, p.ip6)).collect();
    let slice = endpoint_slice6("demo", "web6", &[("http", TCP_PORT, "TCP")], &endpoints);
    write_yaml(&manifests.0, "web6-slice.yaml", &slice);
    // Small initial sizes (floors), so that growth happens at a test's
    // scale, as above.
    let dir = format!("dir:{}", manifests.0.display());
    let mut agent = Agent::start(
        &cluster.node,
        &["--source", &dir, "--services-max-entries", "32", "--backends-max-entries", "16"],
    )
    .unwrap();
    agent
        .wait_for_maps6("the IPv6 frontend", |c| {
            c.frontends().any(|(k, b)| k.vip == lb_common::ipv6(six.octets()) && b.len() == 3)
        })
        .unwrap();
    agent.wait_for_attachments(4).unwrap();
    let grown = agent.log().matches("maps grown").count();

    let vip = std::net::SocketAddr::new(six.into(), 80);
    let traffic = Traffic::start(&cluster.pod("client").netns, vip).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // IPv4 fillers: SERVICES and BACKENDS outgrow their sizes, and the
    // IPv6 maps grow with them.
    write_fillers(&manifests.0, 0, 40);
    agent.wait_for_log_count("maps grown", grown + 1).unwrap();
    agent.wait_for_maps("40 frontends", |c| c.frontends().count() == 40).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    traffic.stop().assert_none_failed(20);
    let maps = map_stats(&agent);
    assert!(capacity(&maps, "SERVICES6") >= capacity(&maps, "SERVICES") && capacity(&maps, "SERVICES") > 32, "{maps}");
    let log = agent.log();
    assert!(!log.contains("sync failed") && !log.contains("left on the previous maps"), "{log}");
}
