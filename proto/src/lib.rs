//! Wire types of isola.
//!
//! * [`cri`]: the Kubernetes CRI `runtime.v1` API that kubelet and crictl speak, re-exported
//!   from the `k8s-cri` crate (see README: why k8s-cri rather than a vendored proto).
//! * [`shim`]: the API between `isolad` and a per-pod shim (`proto/shim.proto`).

/// CRI `runtime.v1`: messages, the `RuntimeService`/`ImageService` servers and clients.
pub mod cri {
    pub use k8s_cri::v1::*;
}

/// The agent ↔ shim API: one shim process per pod serves it on a unix socket.
#[allow(clippy::all, missing_docs)]
pub mod shim {
    tonic::include_proto!("isola.shim.v1");
}

/// The VM shim ↔ guest agent API (`proto/guest.proto`): framed prost messages over the
/// guest's virtio-console port (see the proto for the framing and why not gRPC).
#[allow(clippy::all, missing_docs)]
pub mod guest {
    tonic::include_proto!("isola.guest.v1");
}

/// Version of the guest API; `HelloResponse.api_version` must match it.
pub const GUEST_API_VERSION: u32 = 1;

/// Version of the shim API; the agent refuses a shim that answers another one.
pub const SHIM_API_VERSION: u32 = 1;
