//! `isolad`, the isola node agent: the CRI server, records, runtime classes and the
//! shims of running pods.

pub mod classes;
pub mod config;
pub mod cri;
pub mod ids;
pub mod leftovers;
pub mod network;
pub mod records;
pub mod rollback;
pub mod runtime;
pub mod server;
pub mod shim;
pub mod streaming;
