//! The agent: computes what the datapath maps should hold from Kubernetes
//! objects and keeps the maps, and the program's attachments, in step.
pub mod agent;
pub mod cidr;
pub mod cli;
pub mod datapath;
pub mod dir_source;
pub mod health_check;
pub mod inspect;
pub mod interfaces;
pub mod kube_source;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod mounts;
pub mod plan;
pub mod reconcile;
pub mod sizing;
pub mod sock_destroy;
pub mod status;
#[cfg(test)]
mod test_rng;
