//! Pure, synchronous cryptography: the segmented object format, key wrapping
//! and secret types. No I/O happens here.

pub mod format;
pub mod secret;
pub mod wrap;

pub use secret::{CustomerKey, DataKey, RootKeyMaterial, SecretKey};

/// Errors of the crypto layer. Every authentication problem — a bad tag, a
/// malformed header, a wrong key, truncation, trailing data — is the one
/// opaque [`CryptoError::DecryptionFailed`], so callers learn nothing about
/// which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("decryption failed")]
    DecryptionFailed,
    #[error("segment counter exhausted: an object holds at most 2^32 segments")]
    CounterExhausted,
    #[error("segment has an invalid length for its position")]
    InvalidSegment,
    #[error("the system random number generator failed")]
    Random,
}
