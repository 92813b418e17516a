//! `isola-shim-native`: one process per native pod, serving the shim API
//! (proto/shim.proto) on a unix socket for the agent. The pod's namespaces are held by an
//! infra process ([`pause`]); containers run through libcontainer ([`containers`]).

pub mod console;
pub mod containers;
pub mod daemon;
pub mod forker;
pub mod pause;
pub mod sandbox;
pub mod service;
pub mod streams;
