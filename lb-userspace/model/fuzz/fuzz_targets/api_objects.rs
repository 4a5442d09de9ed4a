//! Objects as the Kubernetes source receives them (JSON from the API
//! server): each read as it arrives (`ParsedService`, `ParsedSlice`) and
//! applied to the kept model, as watch events are.
#![no_main]

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_model::model::{Changes, Model, ModelOptions, NodeNames, ParsedService, ParsedSlice, key_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut changes = Changes::default();
    let mut nodes = NodeNames::default();
    // One object per line: a Service or an EndpointSlice.
    for line in data.split(|b| *b == b'\n') {
        if let Ok(service) = serde_json::from_slice::<Service>(line) {
            changes.service(key_of(&service.metadata), Some(ParsedService::parse(&service)));
        } else if let Ok(slice) = serde_json::from_slice::<EndpointSlice>(line) {
            changes.slice(key_of(&slice.metadata), Some(ParsedSlice::parse(&slice, &mut nodes)));
        }
    }
    let mut model = Model::default();
    model.update(changes, &ModelOptions { node_name: "node-1".into(), ..Default::default() });
    let _ = model.errors();
    let _ = model.health_checks();
});
