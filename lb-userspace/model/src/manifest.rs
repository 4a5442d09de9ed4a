//! Kubernetes manifests (multi-document YAML) to typed objects.
//!
//! Only Service (v1) and EndpointSlice (discovery.k8s.io/v1) are kept; other
//! kinds are reported as skipped. A document that does not deserialize is
//! reported with its file, object and the path of the failing field, and the
//! other documents of the file are still read.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;
use serde_yaml::Value;

use crate::model::{ObjectRef, object_ref};

#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    /// Read for this node's labels (its zone) and deletion.
    Node(Arc<Node>),
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Object::Service(s) => object_ref("Service", &s.metadata),
            Object::EndpointSlice(s) => object_ref("EndpointSlice", &s.metadata),
            Object::Node(n) => node_ref(n.metadata.name.as_deref().unwrap_or_default()),
        }
    }
}

/// Parsed objects sorted by kind, as owned copies: what the whole
/// computation (`model::desired_state`), tests and fuzz targets take.
#[derive(Debug, Default)]
pub struct ByKind {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

impl ByKind {
    pub fn of(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut by_kind = Self::default();
        for object in objects {
            match object {
                Object::Service(s) => by_kind.services.push((*s).clone()),
                Object::EndpointSlice(s) => by_kind.slices.push((*s).clone()),
                Object::Node(n) => by_kind.nodes.push((*n).clone()),
            }
        }
        by_kind
    }
}

/// Names a Node (cluster-scoped: no namespace).
pub fn node_ref(name: &str) -> ObjectRef {
    ObjectRef { kind: "Node".to_owned(), namespace: String::new(), name: name.to_owned() }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: document {document}: {message}")]
    Document { file: PathBuf, document: usize, message: String },
    #[error("{file}: {object}: {field}: {message}")]
    Field { file: PathBuf, object: ObjectRef, field: String, message: String },
}

#[derive(Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub errors: Vec<ManifestError>,
    /// Documents of other kinds, as `kind namespace/name`.
    pub skipped: Vec<String>,
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

/// Parses every document of one manifest file.
pub fn parse_manifests(file: &Path, text: &str) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document_number = index + 1;
        let doc_error =
            |message: String| ManifestError::Document { file: file.to_owned(), document: document_number, message };
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                // The YAML stream cannot be resynchronised after a syntax error.
                parsed.errors.push(doc_error(format!("invalid YAML: {e}")));
                break;
            }
        };
        let (Some(api_version), Some(kind)) = (str_at(&value, &["apiVersion"]), str_at(&value, &["kind"])) else {
            parsed.errors.push(doc_error("not a Kubernetes object: apiVersion and kind are required".into()));
            continue;
        };
        let name = str_at(&value, &["metadata", "name"]).unwrap_or_default();
        let object = match kind {
            "Node" => node_ref(name),
            _ => ObjectRef {
                kind: kind.to_owned(),
                namespace: str_at(&value, &["metadata", "namespace"]).unwrap_or("default").to_owned(),
                name: name.to_owned(),
            },
        };
        let result = match (api_version, kind) {
            ("v1", "Service") => deserialize(&value).map(|s| Object::Service(Arc::new(s))),
            ("discovery.k8s.io/v1", "EndpointSlice") => deserialize(&value).map(|s| Object::EndpointSlice(Arc::new(s))),
            ("v1", "Node") => deserialize(&value).map(|n| Object::Node(Arc::new(n))),
            _ => {
                parsed.skipped.push(format!("{api_version} {object}"));
                continue;
            }
        };
        match result {
            Ok(_) if object.name.is_empty() => parsed.errors.push(ManifestError::Field {
                file: file.to_owned(),
                object,
                field: "metadata.name".into(),
                message: "required".into(),
            }),
            Ok(obj) => parsed.objects.push(obj),
            Err((field, message)) => {
                parsed.errors.push(ManifestError::Field { file: file.to_owned(), object, field, message })
            }
        }
    }
    parsed
}

/// Deserializes `value`, naming the failing field's path on error.
fn deserialize<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let field = e.path().to_string();
        (if field == "." { "(object)".into() } else { field }, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutated manifests (bytes flipped, dropped, repeated, spliced from
    /// other documents): the parser and the model never panic, whatever
    /// they are given, and the parse is bounded in time.
    #[test]
    fn no_mutated_manifest_panics_the_parser_or_the_model() {
        let seeds = [
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, annotations: {service.lb.io/lb-algorithm: maglev}}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.10, externalIPs: [203.0.113.5], loadBalancerSourceRanges: [10.0.0.0/8], externalTrafficPolicy: Local, healthCheckNodePort: 32000, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ports: [{name: http, port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.10}]}}\n",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [10.1.1.1], nodeName: node-1, conditions: {ready: true}, hints: {forZones: [{name: a}], forNodes: [{name: node-1}]}}\n",
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-1, labels: {topology.kubernetes.io/zone: a}}\n",
        ];
        let mut rng = crate::test_rng::Rng(0x9e37_79b9_7f4a_7c15);
        let options = crate::model::ModelOptions {
            node_name: "node-1".into(),
            zone: Some("a".into()),
            node_addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, 1).into()],
            external_ip_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
            ..Default::default()
        };
        let started = std::time::Instant::now();
        for _ in 0..20_000 {
            let mut text: Vec<u8> = seeds[rng.below(3) as usize].as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(text.len() as u64 + 1) as usize;
                match rng.below(5) {
                    0 if at < text.len() => text[at] = rng.below(256) as u8,
                    1 if at < text.len() => {
                        text.remove(at);
                    }
                    2 => {
                        let end = (at + rng.below(16) as usize).min(text.len());
                        let piece = text[at..end].to_vec();
                        text.splice(at..at, piece);
                    }
                    3 => {
                        let other = seeds[rng.below(3) as usize].as_bytes();
                        let from = rng.below(other.len() as u64) as usize;
                        text.splice(at..at, other[from..].iter().copied().take(40));
                    }
                    _ => text.splice(at..at, b"---\n".iter().copied()).for_each(drop),
                }
            }
            let text = String::from_utf8_lossy(&text);
            let objects = ByKind::of(parse_manifests(Path::new("fuzz.yaml"), &text).objects);
            objects.nodes.iter().for_each(|n| drop(crate::model::NodeView::of(Some(n))));
            crate::model::desired_state(&objects.services, &objects.slices, &options);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
    }

    #[test]
    fn reads_every_document_and_names_file_object_and_field_of_a_bad_one() {
        let parsed = parse_manifests(
            Path::new("/m/app.yaml"),
            r#"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: ns}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: ns}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}, {port: {nested: 1}}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
just: a map
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns}
addressType: IPv4
endpoints: []
"#,
        );
        let refs: Vec<String> = parsed.objects.iter().map(|o| o.object_ref().to_string()).collect();
        assert_eq!(refs, ["Service ns/good", "EndpointSlice ns/web-1"]);
        assert_eq!(parsed.skipped, ["apps/v1 Deployment default/web"]);
        let errors: Vec<String> = parsed.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("/m/app.yaml: Service ns/bad: spec.ports[1].port: invalid type: map"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[1], "/m/app.yaml: document 4: not a Kubernetes object: apiVersion and kind are required");
    }

    #[test]
    fn a_yaml_syntax_error_keeps_the_documents_before_it() {
        let parsed = parse_manifests(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n---\nkind: [unclosed\n",
        );
        assert_eq!(parsed.objects.len(), 1);
        assert!(parsed.errors[0].to_string().starts_with("x.yaml: document 2: invalid YAML"), "{:?}", parsed.errors);
    }
}
