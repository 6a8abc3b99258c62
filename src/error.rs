//! The one error type of the use-case layer (ingest, retrieve, retention).
//! `api/status.rs` maps it to gRPC statuses in one place.

use crate::catalog::{CatalogError, CustomerState};
use crate::keys::KeyError;
use crate::model::InvalidInput;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (malformed id, type mismatch, ...).
    #[error("{0}")]
    Invalid(String),
    /// The request is well-formed but out of order for the current state;
    /// the message names the state (e.g. the durable offset).
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller could not be identified (no, unknown, expired or revoked
    /// credentials).
    #[error("{0}")]
    Unauthenticated(String),
    /// Not allowed for this caller or purpose (e.g. a customer's opt-out).
    #[error("{0}")]
    PermissionDenied(String),
    /// A size cap or quota was hit.
    #[error("{0}")]
    TooLarge(String),
    /// Another stream holds the upload; retry later.
    #[error("{0}")]
    Busy(String),
    #[error("customer shredded")]
    CustomerShredded,
    #[error("customer is pending shred: content is locked until the shred completes or is cancelled")]
    CustomerPendingShred,
    /// Opaque integrity failure of stored data. Never says which check.
    #[error("stored object failed its integrity check")]
    Integrity,
    #[error(
        "the server's storage is full; nothing past the last acknowledgement was kept — retry once space is freed \
         (a stream resumes from its durable offset)"
    )]
    StorageFull,
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Idle(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A bug or unexpected failure: logged in full, shown generically.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }

    /// The `result` of the audit record of a request this error ended:
    /// `refused: …` when the request was refused, `failed: …` when the
    /// service failed it. An internal error's text stays in the log, as it
    /// stays out of the caller's answer.
    pub fn audit_result(&self) -> String {
        match self {
            Self::Internal(_) => "failed: internal error".to_owned(),
            Self::Unavailable(_) | Self::StorageFull | Self::Integrity => format!("failed: {self}"),
            _ => format!("refused: {self}"),
        }
    }

    pub fn from_state(state: CustomerState) -> Self {
        match state {
            CustomerState::Shredded => Self::CustomerShredded,
            CustomerState::PendingShred => Self::CustomerPendingShred,
            CustomerState::Active => Self::Internal("customer unexpectedly active".into()),
        }
    }
}

impl From<InvalidInput> for Error {
    fn from(e: InvalidInput) -> Self {
        Self::Invalid(e.0)
    }
}

impl From<CatalogError> for Error {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound => Self::NotFound("not found".into()),
            CatalogError::CustomerState(s) => Self::from_state(s),
            e @ (CatalogError::Held(_) | CatalogError::Conflict(_)) => Self::Precondition(e.to_string()),
            CatalogError::Backend(m) => {
                crate::metrics::catalog_error();
                Self::Internal(format!("catalog: {m}"))
            }
        }
    }
}

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::DecryptionFailed => Self::Integrity,
            KeyError::CustomerState(s) => Self::from_state(s),
            KeyError::Catalog(c) => c.into(),
            KeyError::Unavailable(m) | KeyError::Sealed(m) | KeyError::Config(m) => Self::Unavailable(m),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        crate::metrics::store_error();
        match e {
            StoreError::Full => Self::StorageFull,
            // A committed object missing from storage is an integrity problem
            // of the deployment, not a user error.
            StoreError::NotFound => Self::Integrity,
            // The operator must act (C4): say so loudly in the log, and
            // tell the caller its data is safe to send again later.
            StoreError::Denied(detail) => {
                tracing::error!(%detail, "object storage refused access; check its credentials and bucket policy");
                Self::Unavailable(
                    "object storage refused access; nothing was committed — retry after an operator fixes the \
                     storage credentials or bucket policy"
                        .into(),
                )
            }
            StoreError::Unavailable { op, attempts, .. } => Self::Unavailable(format!(
                "object storage failed {attempts} time(s) on {op}; nothing was committed — retry later (an upload \
                 keeps its durable bytes)"
            )),
            e @ (StoreError::TimedOut(_) | StoreError::Short { .. }) => {
                Self::Unavailable(format!("object storage misbehaved ({e}); nothing was committed — retry later"))
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::crypto::CryptoError> for Error {
    fn from(e: crate::crypto::CryptoError) -> Self {
        match e {
            crate::crypto::CryptoError::DecryptionFailed => Self::Integrity,
            crate::crypto::CryptoError::CounterExhausted => {
                Self::TooLarge("object exceeds the format's limit of 2^32 segments".into())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}
