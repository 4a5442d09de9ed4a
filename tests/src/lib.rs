//! Shared by the BPF_PROG_TEST_RUN tests, the end-to-end tests and the demo.
pub mod agent;
pub mod anchors;
pub mod apiserver;
pub mod clients;
pub mod external;
pub mod harness;
pub mod interrupt;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod pods;
pub mod traffic;
pub mod wire;
