//! netpol agent library: the pure policy compiler and the thin shell around
//! it (sources, netlink, BPF maps).
pub mod compiler;
pub mod model;
