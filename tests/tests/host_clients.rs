//! Host-network clients (the node itself, hostNetwork pods) reaching
//! ClusterIPs through socket-level balancing: the agent's cgroup programs
//! attached to a cgroup of the test's own, a client process moved into it.
//! Needs root and cgroup v2.
use std::{
    collections::BTreeSet,
    ffi::CString,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use lb_tests::{
    agent::{Agent, TempDir, lb_binary},
    manifests::{Endpoint, endpoint_slice, service, write_yaml},
    netns::{Cluster, Netns, Topology, unique_tag},
    pods::{PodServer, TCP_PORT, UDP_PORT},
};
use serde_json::json;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);

/// A cgroup of the test's own, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Self {
        let root = lb_userspace::datapath::cgroup2_root().expect("cgroup v2 mounted");
        let path = root.join(format!("lbt-{}", unique_tag()));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty once the probes have exited.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs `probe ARGS` in `node`'s network namespace, inside `cgroup` if given.
fn probe(node: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let probe = lb_binary().with_file_name("probe");
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", node.path().display())).arg(probe).args(args);
    if let Some(cgroup) = cgroup {
        let procs = CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process: the child, before it execs.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                let written = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                if fd >= 0 {
                    libc::close(fd);
                }
                if written { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
    }
    let out = command.output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() { Ok(text) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

#[test]
fn host_clients_reach_cluster_ips_through_socket_level_balancing() {
    let cluster = Cluster::new(Topology::Routed, &["backend-0", "backend-1"]).unwrap();
    let _servers: Vec<PodServer> = cluster.pods.iter().map(|p| PodServer::start(&p.netns, &p.name).unwrap()).collect();
    let manifests = TempDir::new("lb-host").unwrap();
    let ports = [("http", 80, "TCP"), ("dns", 53, "UDP")];
    let targets = [("http", TCP_PORT, "TCP"), ("dns", UDP_PORT, "UDP")];
    let endpoints: Vec<Endpoint> = cluster.pods.iter().map(|p| Endpoint::ready(&p.name, p.ip)).collect();
    write_yaml(&manifests.0, "service.yaml", &service("default", "web", VIP, &ports, json!({})));
    write_yaml(&manifests.0, "slice.yaml", &endpoint_slice("default", "web", &targets, &endpoints));
    let cgroup = TestCgroup::new();
    let source = format!("dir:{}", manifests.0.display());
    let cgroup_arg = cgroup.0.to_str().unwrap().to_owned();
    let mut agent = Agent::start(&cluster.node, &["--source", &source, "--cgroup-path", &cgroup_arg]).unwrap();
    agent.wait_for_maps("the service", |c| c.frontends().count() == 2).unwrap();
    let node = &cluster.node;
    let in_cgroup = Some(cgroup.0.as_path());

    // TCP: connected straight to a backend; the application sees the service.
    let mut answers = BTreeSet::new();
    for _ in 0..10 {
        let out = probe(node, in_cgroup, &["tcp", "10.96.0.40:80"]).unwrap();
        assert!(out.ends_with("peer=10.96.0.40:80"), "{out}");
        answers.insert(out.split_whitespace().next().unwrap().to_owned());
    }
    assert_eq!(answers.len(), 2, "10 connections reached {answers:?}");

    // UDP, unconnected (sendmsg/recvmsg) and connected (connect/getpeername).
    for mode in ["udp", "udp-connected"] {
        let out = probe(node, in_cgroup, &[mode, "10.96.0.40:53"]).unwrap();
        assert!(out.starts_with("answer=backend-") && out.ends_with("peer=10.96.0.40:53"), "{mode}: {out}");
    }

    // A process outside the cgroup is not balanced: the node has no route
    // to the cluster IP.
    assert!(probe(node, None, &["tcp", "10.96.0.40:80"]).is_err());
    drop(agent);
}
