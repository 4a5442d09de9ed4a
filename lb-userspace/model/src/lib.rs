//! The agent's pure part: what the datapath should serve, computed from
//! Kubernetes objects (`model`, `manifest`), and how the maps get there
//! (`plan`, `reconcile`, `maglev`, `sizing`, `cidr`). Nothing here touches
//! the kernel, the network or a clock of its own, so all of it is tested
//! without root, and a simulator or `lb explain` can reuse it.
pub mod cidr;
pub mod explain;
pub mod family;
pub mod filter;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod reference;
pub mod sizing;
#[cfg(test)]
mod test_rng;
