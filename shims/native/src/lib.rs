//! `isola-shim-native`: one process per native pod, serving the shim API
//! (proto/shim.proto) on a unix socket for the agent.

pub mod daemon;
pub mod service;
