//! peerd: a peer-to-peer, pull-only OCI registry mirror for Kubernetes nodes.
//!
//! The binary (`main.rs`) wires these rooms together; they are a library so that the parsers can
//! be fuzzed and the rooms tested on their own.

pub mod cache;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod egress;
pub mod hosts_config;
pub mod messages;
pub mod metrics;
pub mod oci;
pub mod store;
pub mod sys;
pub mod upstream;
