//! The one place where the agent's errors become gRPC statuses.

use tonic::{Code, Status};

use crate::classes::ClassError;
use crate::records::RecordError;
use crate::shim::ShimError;

/// An error answered to a CRI client.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The id (or prefix) names nothing.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// "pod sandbox", "container", "image".
        kind: &'static str,
        /// The id as given.
        id: String,
    },
    /// The prefix names several objects.
    #[error("{kind} id prefix {prefix:?} is ambiguous: it matches {}", .matches.join(", "))]
    Ambiguous {
        /// "pod sandbox" or "container".
        kind: &'static str,
        /// The prefix as given.
        prefix: String,
        /// The ids it matches.
        matches: Vec<String>,
    },
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The name is held by another object.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Credentials are missing or refused (a registry's answer).
    #[error("{0}")]
    Unauthenticated(String),
    /// Access is denied (a registry's answer).
    #[error("{0}")]
    PermissionDenied(String),
    /// A capability that is not built (yet); the message says which.
    #[error("{0}")]
    Unimplemented(String),
    /// Something needed is not available right now.
    #[error("{0}")]
    Unavailable(String),
    /// A deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// An internal failure; the message says what was being done.
    #[error("{0}")]
    Internal(String),
}

impl CriError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CriError::NotFound { .. } | CriError::Ambiguous { .. } => Code::NotFound,
            CriError::InvalidArgument(_) => Code::InvalidArgument,
            CriError::AlreadyExists(_) => Code::AlreadyExists,
            CriError::FailedPrecondition(_) => Code::FailedPrecondition,
            CriError::Unauthenticated(_) => Code::Unauthenticated,
            CriError::PermissionDenied(_) => Code::PermissionDenied,
            CriError::Unimplemented(_) => Code::Unimplemented,
            CriError::Unavailable(_) => Code::Unavailable,
            CriError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CriError::Internal(_) => Code::Internal,
        }
    }

    /// Prefixes the message with what was being done (keeps the code).
    pub fn context(self, what: impl std::fmt::Display) -> CriError {
        let msg = format!("{what}: {self}");
        match self {
            CriError::NotFound { .. } | CriError::Ambiguous { .. } => {
                CriError::InvalidArgument(msg)
            }
            CriError::InvalidArgument(_) => CriError::InvalidArgument(msg),
            CriError::AlreadyExists(_) => CriError::AlreadyExists(msg),
            CriError::FailedPrecondition(_) => CriError::FailedPrecondition(msg),
            CriError::Unauthenticated(_) => CriError::Unauthenticated(msg),
            CriError::PermissionDenied(_) => CriError::PermissionDenied(msg),
            CriError::Unimplemented(_) => CriError::Unimplemented(msg),
            CriError::Unavailable(_) => CriError::Unavailable(msg),
            CriError::DeadlineExceeded(_) => CriError::DeadlineExceeded(msg),
            CriError::Internal(_) => CriError::Internal(msg),
        }
    }
}

impl From<CriError> for Status {
    fn from(e: CriError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl From<isola_images::Error> for CriError {
    fn from(e: isola_images::Error) -> CriError {
        use isola_images::Error as E;
        let msg = e.to_string();
        match e {
            E::InvalidReference(_) | E::InvalidArgument(_) | E::UnsafeLayer { .. } => {
                CriError::InvalidArgument(msg)
            }
            E::BadLayer { .. } | E::Unsupported { .. } | E::Verification { .. } => {
                CriError::FailedPrecondition(msg)
            }
            E::NotFound(what) => CriError::NotFound {
                kind: "image",
                id: what,
            },
            E::AlreadyExists(_) => CriError::AlreadyExists(msg),
            E::Unauthenticated { .. } => CriError::Unauthenticated(msg),
            E::PermissionDenied { .. } => CriError::PermissionDenied(msg),
            E::Unavailable { .. } => CriError::Unavailable(msg),
            _ => CriError::Internal(msg),
        }
    }
}

impl From<crate::network::NetworkError> for CriError {
    fn from(e: crate::network::NetworkError) -> CriError {
        use crate::network::NetworkError as E;
        let msg = format!("pod network: {e}");
        match &e {
            E::Conf(_) => CriError::FailedPrecondition(msg),
            _ if e.is_timeout() => CriError::DeadlineExceeded(msg),
            _ => CriError::Internal(msg),
        }
    }
}

impl From<RecordError> for CriError {
    fn from(e: RecordError) -> CriError {
        CriError::Internal(e.to_string())
    }
}

impl From<ClassError> for CriError {
    fn from(e: ClassError) -> CriError {
        match e {
            ClassError::UnknownHandler { .. } => CriError::InvalidArgument(e.to_string()),
            other => CriError::Internal(other.to_string()),
        }
    }
}

impl From<ShimError> for CriError {
    fn from(e: ShimError) -> CriError {
        match &e {
            ShimError::BinaryNotFound { .. } => CriError::Unimplemented(e.to_string()),
            ShimError::Call { code, .. } => match code {
                // The agent knows the object but its shim does not: a state mismatch.
                Code::NotFound => CriError::FailedPrecondition(e.to_string()),
                Code::InvalidArgument => CriError::InvalidArgument(e.to_string()),
                Code::AlreadyExists => CriError::AlreadyExists(e.to_string()),
                Code::FailedPrecondition => CriError::FailedPrecondition(e.to_string()),
                Code::Unimplemented => CriError::Unimplemented(e.to_string()),
                Code::DeadlineExceeded => CriError::DeadlineExceeded(e.to_string()),
                Code::Unavailable => CriError::Unavailable(e.to_string()),
                _ => CriError::Internal(e.to_string()),
            },
            ShimError::Gone { .. } => CriError::Unavailable(e.to_string()),
            _ => CriError::Internal(e.to_string()),
        }
    }
}
