//! Services and EndpointSlices for tests, as JSON values: the test API
//! server takes them as they are, the dir source as YAML files.
use std::{fs, net::Ipv4Addr, path::Path};

use serde_json::{Value, json};

/// A Service port: (name, port, protocol).
pub type Port<'a> = (&'a str, u16, &'a str);

/// An endpoint of a slice, with the conditions kube-proxy reads.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub pod: &'a str,
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// Terminating but still serving, as during a pod's grace period.
    pub terminating: bool,
    /// The node the pod runs on (`nodeName`).
    pub node: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    pub fn ready(pod: &'a str, ip: Ipv4Addr) -> Self {
        Self { pod, ip, ready: true, terminating: false, node: None }
    }

    pub fn on(self, node: &'a str) -> Self {
        Self { node: Some(node), ..self }
    }
}

/// A ClusterIP Service in `namespace`; `extra_spec` is merged into its spec.
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, ports: &[Port], extra_spec: Value) -> Value {
    let mut spec = json!({
        "type": "ClusterIP",
        "clusterIP": cluster_ip.to_string(),
        "ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "targetPort": n, "protocol": proto})).collect::<Vec<_>>(),
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// The EndpointSlice of `service`, its ports named as the Service's.
pub fn endpoint_slice(namespace: &str, service: &str, ports: &[Port], endpoints: &[Endpoint]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": k8s_openapi::jiff::Timestamp::now().to_string()},
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(|e| json!({
            "addresses": [e.ip.to_string()],
            "conditions": {"ready": e.ready, "serving": true, "terminating": e.terminating},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.pod},
            "nodeName": e.node,
        })).collect::<Vec<_>>(),
    })
}

/// Writes `object` as YAML to `dir/file` atomically (the agent ignores
/// dot-files, so it never reads half a file).
pub fn write_yaml(dir: &Path, file: &str, object: &Value) {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, serde_yaml::to_string(object).expect("YAML")).expect("write manifest");
    fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}
