//! The wire protocols behind `kubectl exec`, `attach` and `port-forward`, shared by the
//! agent's streaming server and the tests' client: SPDY/3.1 framing and sessions
//! ([`spdy`]), and the Kubernetes channel protocols spoken over them ([`channel`]).

pub mod channel;
pub mod spdy;
