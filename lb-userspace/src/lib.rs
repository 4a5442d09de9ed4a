//! The agent: computes what the datapath maps should hold from Kubernetes
//! objects and keeps the maps, and the program's attachments, in step.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod dir_source;
pub mod health_check;
pub mod inspect;
pub mod interfaces;
pub mod kube_source;
pub mod mounts;
pub mod sock_destroy;
pub mod status;

// The pure part, a crate of its own (lb-userspace/model), under the paths
// the rest of the agent and the tests use.
pub use lb_model::{cidr, explain, family, filter, maglev, manifest, model, plan, reconcile, reference, sizing};
