//! Services and EndpointSlices for tests, as JSON values: the test API
//! server takes them as they are, the dir source as YAML files.
//!
//! IPv4 objects come from `service` and `endpoint_slice`; IPv6 and
//! dual-stack ones from `service_with_cluster_ips` and `endpoint_slice6`.
//! A dual-stack Service has one slice per family, as Kubernetes makes them.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use serde_json::{Value, json};

/// A Service port: (name, port, protocol).
pub type Port<'a> = (&'a str, u16, &'a str);

/// An endpoint of a slice, with the conditions kube-proxy reads.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub pod: &'a str,
    /// Of the family of the slice it goes in (`endpoint_slice` IPv4,
    /// `endpoint_slice6` IPv6).
    pub ip: IpAddr,
    pub ready: bool,
    /// Terminating but still serving, as during a pod's grace period.
    pub terminating: bool,
    /// The node the pod runs on (`nodeName`).
    pub node: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    pub fn ready(pod: &'a str, ip: impl Into<IpAddr>) -> Self {
        Self { pod, ip: ip.into(), ready: true, terminating: false, node: None }
    }

    pub fn on(self, node: &'a str) -> Self {
        Self { node: Some(node), ..self }
    }
}

/// A ClusterIP Service in `namespace`; `extra_spec` is merged into its spec.
pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, ports: &[Port], extra_spec: Value) -> Value {
    service_object(namespace, name, json!({"clusterIP": cluster_ip.to_string()}), ports, extra_spec)
}

/// A Service in `namespace` with the given cluster IPs, one per family
/// (IPv6 alone, or both families in either order: the first is the
/// primary, `clusterIP`), its `ipFamilies` in the same order and the
/// `ipFamilyPolicy` the API server would have set: SingleStack for one,
/// RequireDualStack for two. `extra_spec` is merged into the spec, so it
/// can set another policy (PreferDualStack) or anything else.
pub fn service_with_cluster_ips(
    namespace: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    ports: &[Port],
    extra_spec: Value,
) -> Value {
    assert!(matches!(cluster_ips.len(), 1 | 2), "a Service has one or two cluster IPs, not {cluster_ips:?}");
    assert!(
        cluster_ips.len() == 1 || cluster_ips[0].is_ipv6() != cluster_ips[1].is_ipv6(),
        "two cluster IPs must be of two families: {cluster_ips:?}"
    );
    let family = |ip: &IpAddr| if ip.is_ipv6() { "IPv6" } else { "IPv4" };
    let policy = if cluster_ips.len() == 1 { "SingleStack" } else { "RequireDualStack" };
    let addresses = json!({
        "clusterIP": cluster_ips[0].to_string(),
        "clusterIPs": cluster_ips.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
        "ipFamilies": cluster_ips.iter().map(family).collect::<Vec<_>>(),
        "ipFamilyPolicy": policy,
    });
    service_object(namespace, name, addresses, ports, extra_spec)
}

/// A ClusterIP Service whose spec holds `addresses` (its cluster IP
/// fields), `ports`, and then `extra_spec` merged in.
fn service_object(namespace: &str, name: &str, addresses: Value, ports: &[Port], extra_spec: Value) -> Value {
    let mut spec = json!({"type": "ClusterIP"});
    if let (Some(spec), Some(addresses)) = (spec.as_object_mut(), addresses.as_object()) {
        spec.extend(addresses.clone());
        let ports = ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "targetPort": n, "protocol": proto}));
        spec.insert("ports".into(), ports.collect::<Vec<_>>().into());
    }
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// The EndpointSlice of `service`, its ports named as the Service's.
pub fn endpoint_slice(namespace: &str, service: &str, ports: &[Port], endpoints: &[Endpoint]) -> Value {
    slice(namespace, service, &format!("{service}-abcde"), "IPv4", ports, endpoints)
}

/// The IPv6 EndpointSlice of `service`, as `endpoint_slice` the IPv4 one.
/// Its name differs, so a dual-stack Service can have both.
pub fn endpoint_slice6(namespace: &str, service: &str, ports: &[Port], endpoints: &[Endpoint]) -> Value {
    slice(namespace, service, &format!("{service}-v6-abcde"), "IPv6", ports, endpoints)
}

/// An EndpointSlice named `name` of `service`, of `address_type`; every
/// endpoint must be of that family, as the API server requires.
fn slice(
    namespace: &str,
    service: &str,
    name: &str,
    address_type: &str,
    ports: &[Port],
    endpoints: &[Endpoint],
) -> Value {
    for e in endpoints {
        let family = if e.ip.is_ipv6() { "IPv6" } else { "IPv4" };
        assert_eq!(family, address_type, "endpoint {} ({}) in an {address_type} slice", e.pod, e.ip);
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": k8s_openapi::jiff::Timestamp::now().to_string()},
        },
        "addressType": address_type,
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
