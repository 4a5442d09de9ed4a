//! The README's demo: a sandbox of network namespaces (a node, three backend
//! pods running HTTP servers, a client pod), the real agent applying
//! examples/clusterip, curl from the client pod, and the spread of requests
//! over the backends, before and after one backend leaves the EndpointSlice.
//! Everything is removed on exit, Ctrl-C included.
use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, bail, ensure};
use lb_tests::{
    agent::{Agent, TempDir},
    netns::{Cluster, Topology},
    pods::PodServer,
};
use serde_yaml::Value;

const EXAMPLE: &str = include_str!("../../../examples/clusterip/web.yaml");
const URL: &str = "http://10.96.0.10/";
const REQUESTS: usize = 30;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // Everything the demo made lives in `demo`'s locals: returning runs
    // their Drop, which removes namespaces, pins and files.
    let result = demo();
    println!("\n== Cleaned up: namespaces, bpffs pins, agent and servers are gone.");
    if INTERRUPTED.load(Ordering::Relaxed) {
        eprintln!("demo interrupted");
        std::process::exit(130);
    }
    if let Err(e) = result {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn demo() -> anyhow::Result<()> {
    section("Sandbox: a node namespace and four pods on point-to-point veths (Calico-style)");
    let cluster = Cluster::new(Topology::Routed, &["backend-1", "backend-2", "backend-3", "client"])?;
    let mut servers = Vec::new();
    for pod in &cluster.pods {
        let role = if pod.name == "client" {
            "client".to_owned()
        } else {
            servers.push(PodServer::start(&pod.netns, &pod.name)?);
            "HTTP server on :8080".to_owned()
        };
        println!("   {:<10} {:<12} {}", pod.name, pod.ip, role);
    }
    check_interrupted()?;

    section("Agent: lb run --source dir:<manifests>, applying examples/clusterip/web.yaml");
    let manifests = TempDir::new("lb-demo-manifests")?;
    let mut docs = parse_example()?;
    check_sandbox_matches(&docs, &cluster)?;
    write_docs(&manifests.0, &docs)?;
    let mut agent = Agent::with_manifests(&cluster.node, &manifests.0)?;
    agent.wait_for_maps("the web Service", |c| c.frontends().any(|(_, b)| b.len() == 3))?;
    agent.wait_for_attachments(cluster.pods.len())?;
    println!(
        "   attached to the host side of {} pod veths; pinned at {}",
        cluster.pods.len(),
        agent.pin_path.display()
    );
    print_cli(&agent, "services")?;
    check_interrupted()?;

    section(&format!("{REQUESTS} requests from the client pod: curl {URL}"));
    let before = spread(&cluster)?;
    print_spread(&before);
    ensure!(before.len() > 1, "all requests reached one backend");

    section("Removing backend-2 from the EndpointSlice (the YAML file is rewritten)");
    remove_endpoint(&mut docs, "backend-2")?;
    write_docs(&manifests.0, &docs)?;
    agent.wait_for_maps("backend-2 to leave", |c| c.frontends().any(|(_, b)| b.len() == 2))?;
    print_cli(&agent, "services")?;
    check_interrupted()?;

    section(&format!("{REQUESTS} more requests"));
    let after = spread(&cluster)?;
    print_spread(&after);
    ensure!(!after.contains_key("backend-2"), "a new request reached the removed backend-2");
    println!("   backend-2 gets no new connections.");

    section("What the datapath counted");
    print_cli(&agent, "stats")?;

    section("Agent stopped with SIGTERM");
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}:\n{}", agent.log());
    println!("   exited cleanly ({status})");
    drop(servers);
    Ok(())
}

fn parse_example() -> anyhow::Result<Vec<Value>> {
    serde_yaml::Deserializer::from_str(EXAMPLE)
        .map(|d| serde::Deserialize::deserialize(d).context("examples/clusterip/web.yaml"))
        .collect()
}

fn endpoints(docs: &mut [Value]) -> anyhow::Result<&mut Vec<Value>> {
    docs.iter_mut()
        .find(|d| d["kind"] == "EndpointSlice")
        .and_then(|d| d.get_mut("endpoints"))
        .and_then(Value::as_sequence_mut)
        .context("the example has no EndpointSlice endpoints")
}

fn check_sandbox_matches(docs: &[Value], cluster: &Cluster) -> anyhow::Result<()> {
    let mut docs = docs.to_vec();
    for endpoint in endpoints(&mut docs)?.iter() {
        let (name, addr) = (endpoint["targetRef"]["name"].as_str(), endpoint["addresses"][0].as_str());
        let pod = cluster.pods.iter().find(|p| Some(p.name.as_str()) == name).context("endpoint of no pod")?;
        ensure!(
            Some(pod.ip.to_string().as_str()) == addr,
            "the example's address for {} is not the sandbox's",
            pod.name
        );
    }
    Ok(())
}

fn remove_endpoint(docs: &mut [Value], pod: &str) -> anyhow::Result<()> {
    endpoints(docs)?.retain(|e| e["targetRef"]["name"].as_str() != Some(pod));
    Ok(())
}

fn write_docs(dir: &Path, docs: &[Value]) -> anyhow::Result<()> {
    let text: Vec<String> = docs.iter().map(serde_yaml::to_string).collect::<Result<_, _>>()?;
    let tmp = dir.join(".web.yaml.tmp");
    fs::write(&tmp, text.join("---\n"))?;
    fs::rename(&tmp, dir.join("web.yaml"))?;
    Ok(())
}

fn print_cli(agent: &Agent, subcommand: &str) -> anyhow::Result<()> {
    println!("   $ lb {subcommand}");
    for line in agent.cli(subcommand, &[])?.lines() {
        println!("   {line}");
    }
    Ok(())
}

/// Sends the requests with curl from the client pod; counts answers per backend.
fn spread(cluster: &Cluster) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    let client = &cluster.pod("client").netns;
    for _ in 0..REQUESTS {
        check_interrupted()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &client.name, "curl", "--noproxy", "*", "-sS", "--max-time", "3", URL])
            .output()
            .context("running curl")?;
        ensure!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
        *counts.entry(String::from_utf8_lossy(&out.stdout).trim().to_owned()).or_default() += 1;
    }
    Ok(counts)
}

fn print_spread(counts: &BTreeMap<String, usize>) {
    for name in ["backend-1", "backend-2", "backend-3"] {
        let n = counts.get(name).copied().unwrap_or(0);
        println!("   {name:<10} {:>3}  {}", n, "#".repeat(n));
    }
}
