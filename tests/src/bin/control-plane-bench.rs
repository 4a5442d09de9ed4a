//! Control-plane numbers through the Kubernetes source: cold start to a
//! programmed datapath with N Services of 4 endpoints, the agent's resident
//! memory there, and the time from one EndpointSlice change at the API
//! server to the maps holding it (p50, p99). Prints numbers; asserts nothing.
//!
//! `control-plane-bench [SERVICES] [CHANGES]` (defaults 1000 and 1000), as
//! root, best built with --release. Runs the agent with --min-sync-period 0ms
//! so that each change is timed alone, not behind the rate limit.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context;
use lb_common::ServiceKey;
use lb_tests::{
    agent::{Agent, TempDir},
    apiserver::{ApiServer, Kind},
    interrupt,
    netns::{Cluster, Topology},
};
use lb_userspace::datapath::Maps;
use serde_json::{Value, json};

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1)
}

fn endpoint(i: u32, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 8 + n)
}

fn service(i: u32) -> Value {
    json!({"metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
           "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "http", "port": 80}]}})
}

fn slice(i: u32, endpoints: &[Ipv4Addr]) -> Value {
    json!({"metadata": {"name": format!("svc-{i}-x"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": endpoints.iter().map(|a| json!({"addresses": [a.to_string()]})).collect::<Vec<_>>()})
}

/// Whether the frontend of service `i` has `addr` among its backends.
fn has_backend(maps: &Maps, i: u32, addr: Ipv4Addr) -> bool {
    let key = ServiceKey::new(vip(i).octets(), 80u16.to_be_bytes(), 6, 0);
    let Ok(frontend) = maps.svc.services.get(&key, 0) else { return false };
    (1..=frontend.backend_count).any(|slot| {
        maps.svc
            .services
            .get(&key.with_slot(slot), 0)
            .ok()
            .and_then(|v| maps.svc.backends.get(&v.backend_id, 0).ok())
            .is_some_and(|b| b.addr == addr.octets())
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    interrupt::clean_up_on_interrupt();
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>());
    let services = args.next().transpose()?.unwrap_or(1000);
    let changes = args.next().transpose()?.unwrap_or(1000);

    let cluster = Cluster::new(Topology::Routed, &[])?;
    let api = ApiServer::start(&cluster.node)?;
    let config = TempDir::new("lb-bench-kubeconfig")?;
    let kubeconfig = api.write_kubeconfig(&config.0)?;
    for i in 0..services {
        api.apply(Kind::Service, service(i));
        api.apply(Kind::EndpointSlice, slice(i, &(0..4).map(|n| endpoint(i, n)).collect::<Vec<_>>()));
    }
    // /healthz polled all through the run, from the node, as the kubelet
    // would: its answers must not wait for syncs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (stop, node) = (stop.clone(), cluster.node.path());
        std::thread::spawn(move || -> Vec<Duration> {
            let mut answers = Vec::new();
            if lb_tests::netns::setns(&node).is_err() {
                return answers;
            }
            let healthz = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = Instant::now();
                // Refused until the agent listens: not an answer.
                if lb_tests::pods::http_get(healthz, "/healthz").is_ok() {
                    answers.push(t0.elapsed());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            answers
        })
    };
    let started = Instant::now();
    // No sizing flags: the agent sizes its maps for the cluster.
    let mut args = vec!["--kubeconfig", kubeconfig.to_str().context("path")?, "--min-sync-period", "0ms"];
    args.extend(["--metrics-addr", ""]);
    let mut agent = Agent::start(&cluster.node, &args)?;
    // A cold start at 100,000 Services takes longer than one wait (10 s).
    let programmed = |c: &lb_userspace::plan::MapContents| c.frontends().count() == services as usize;
    let mut waited = agent.wait_for_maps(&format!("{services} frontends"), programmed);
    for _ in 0..5 {
        if waited.is_ok() {
            break;
        }
        waited = agent.wait_for_maps(&format!("{services} frontends"), programmed);
    }
    waited?;
    let cold_start = started.elapsed();
    let rss = agent.rss_kib()?;
    let map_kib = agent.map_memory_kib()?;
    let maps_now = Maps::open_pinned(&agent.pin_path)?.capacities()?;

    let maps = Maps::open_pinned(&agent.pin_path)?;
    let mut latencies = Vec::with_capacity(changes as usize);
    for c in 0..changes {
        let i = c % services;
        // Replace the service's first endpoint with a new address.
        let fresh = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 192, 0, 0)) + c);
        let endpoints = [fresh, endpoint(i, 1), endpoint(i, 2), endpoint(i, 3)];
        let t0 = Instant::now();
        api.apply(Kind::EndpointSlice, slice(i, &endpoints));
        while !has_backend(&maps, i, fresh) {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "change {c} never reached the maps");
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    let rss_after = agent.rss_kib()?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = poller.join().unwrap_or_default();
    answers.sort();
    let log = agent.log();
    let mut sync_ms: Vec<u64> =
        log.lines().filter_map(|l| l.split("took_ms=").nth(1)?.split_whitespace().next()?.parse().ok()).collect();
    sync_ms.sort();
    println!("services: {services} (4 endpoints each), changes: {changes}");
    println!("cold start to programmed maps: {:.0} ms", cold_start.as_secs_f64() * 1e3);
    println!("list requests (pages of the test API server): {}", api.lists());
    println!("agent resident memory: {:.1} MiB", rss as f64 / 1024.0);
    println!("agent resident memory after the changes: {:.1} MiB", rss_after as f64 / 1024.0);
    println!("kernel map memory: {:.1} MiB (no sizing flags)", map_kib as f64 / 1024.0);
    let sizes: Vec<String> = maps_now.iter().map(|(map, capacity)| format!("{map} {capacity}")).collect();
    println!("map sizes: {}", sizes.join(", "));
    println!(
        "EndpointSlice change -> maps: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    if !sync_ms.is_empty() {
        println!(
            "agent sync (compute and write) of those: p50 {} ms, max {} ms",
            sync_ms[sync_ms.len() / 2],
            sync_ms[sync_ms.len() - 1]
        );
    }
    if !answers.is_empty() {
        println!(
            "/healthz during cold start and changes: {} answers, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            answers.len(),
            percentile(&answers, 0.5).as_secs_f64() * 1e3,
            percentile(&answers, 0.99).as_secs_f64() * 1e3,
            answers.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        );
    }
    // Where the first and the last sync's time went, as the agent logs it.
    let mut breakdowns = log.lines().filter(|l| l.contains("model_ms="));
    for (which, line) in [("first", breakdowns.clone().next()), ("last", breakdowns.next_back())] {
        let Some(last) = line else { continue };
        let parts: Vec<&str> = ["model_ms=", "target_ms=", "sizing_ms=", "write_ms="]
            .into_iter()
            .filter_map(|field| Some(last.split_once(field)?.1.split_whitespace().next()?).map(|v| (field, v)))
            .map(|(field, v)| &last[last.find(field).unwrap_or(0)..][..field.len() + v.len()])
            .collect();
        println!("{which} sync: {}", parts.join(" "));
    }
    Ok(())
}
