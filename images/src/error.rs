//! The crate's error type, with variants the agent maps one to one onto gRPC codes.

use crate::reference::ReferenceError;

/// What went wrong in an image or snapshot operation.
///
/// Suggested gRPC codes are in each variant's doc.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference string is not a valid image reference (InvalidArgument).
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),
    /// An argument other than the reference is invalid, e.g. a container id that cannot
    /// name a directory (InvalidArgument).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No image, snapshot or registry object by that name (NotFound).
    #[error("not found: {0}")]
    NotFound(String),
    /// A snapshot for that container already exists (AlreadyExists).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The registry wants credentials, or refused the ones given (Unauthenticated).
    #[error("registry authentication failed for {reference}: {detail}")]
    Unauthenticated {
        /// The image reference being pulled.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry knows the credentials but denies access (PermissionDenied).
    #[error("registry denied access to {reference}: {detail}")]
    PermissionDenied {
        /// The image reference being pulled.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry could not be reached or answered with a server error (Unavailable).
    #[error("registry unavailable for {reference}: {detail}")]
    Unavailable {
        /// The image reference being pulled.
        reference: String,
        /// What went wrong.
        detail: String,
    },
    /// Content did not match its digest or size (DataLoss or Internal); nothing of it was
    /// kept.
    #[error("content verification failed for {digest}: {detail}")]
    Verification {
        /// The digest the content was expected to have.
        digest: String,
        /// What did not match.
        detail: String,
    },
    /// The image's manifest or config is malformed or unsupported (FailedPrecondition or
    /// InvalidArgument), e.g. no linux/amd64 entry in an index.
    #[error("unsupported image {reference}: {detail}")]
    Unsupported {
        /// The image reference being pulled.
        reference: String,
        /// What is unsupported.
        detail: String,
    },
    /// A layer tar has an entry that would leave the layer directory, or is otherwise
    /// unsafe (InvalidArgument or FailedPrecondition); nothing of the layer was kept.
    #[error("layer {layer}: refused entry {entry:?}: {why}")]
    UnsafeLayer {
        /// Digest of the layer blob.
        layer: String,
        /// The tar entry's path.
        entry: String,
        /// Why it was refused.
        why: String,
    },
    /// A layer could not be read as a tar stream (InvalidArgument).
    #[error("layer {layer}: bad archive: {detail}")]
    BadLayer {
        /// Digest of the layer blob.
        layer: String,
        /// What is wrong.
        detail: String,
    },
    /// A local file system operation failed (Internal).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The error from the system.
        source: std::io::Error,
    },
    /// The record database failed (Internal).
    #[error("image records: {0}")]
    Db(String),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
