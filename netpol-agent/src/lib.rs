//! netpol agent library: the pure policy compiler and the thin shell around
//! it (sources, netlink, BPF maps, flow logs).
pub mod agent;
pub mod api;
pub mod cnp_status;
pub mod compiler;
pub mod convert;
pub mod crd;
pub mod datapath;
pub mod epoch;
pub mod explain;
pub mod flowlog;
pub mod health;
pub mod kube_source;
pub mod manifest;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod neigh;
pub mod netlink;
pub mod pins;
pub mod source;
pub mod xdp;
