//! A manifest file as the directory source reads it (YAML, and so JSON):
//! parsed, then every Service, EndpointSlice and Node through the model.
#![no_main]

use std::{net::Ipv4Addr, path::Path};

use lb_model::{
    manifest::{ByKind, parse_manifests},
    model::{ModelOptions, NodeView, desired_state},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let objects = ByKind::of(parse_manifests(Path::new("fuzz.yaml"), &text).objects);
    objects.nodes.iter().for_each(|n| drop(NodeView::of(Some(n))));
    let options = ModelOptions {
        node_name: "node-1".into(),
        zone: Some("a".into()),
        node_addresses: vec![Ipv4Addr::new(192, 0, 2, 1)],
        external_ip_cidrs: vec!["203.0.113.0/24".parse().expect("a CIDR")],
        ..Default::default()
    };
    desired_state(&objects.services, &objects.slices, &options);
});
