//! Key material as types: zeroized on drop, never cloned, never printed.

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// Length of every symmetric key in the hierarchy (AES-256).
pub const KEY_LEN: usize = 32;

/// 256 bits of secret key material.
///
/// No `Clone`, no `Copy`, and a `Debug` that prints `[redacted]`: the bytes
/// leave this type only through [`SecretKey::expose`], on the line that hands
/// them to a cipher.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Self([0u8; KEY_LEN]);
        SystemRandom::new().fill(&mut key.0).map_err(|_| CryptoError::Random)?;
        Ok(key)
    }

    /// Takes ownership of key bytes, zeroizing the source slice.
    pub fn from_slice_zeroizing(bytes: &mut [u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            bytes.zeroize();
            return Err(CryptoError::DecryptionFailed);
        }
        let mut key = Self([0u8; KEY_LEN]);
        key.0.copy_from_slice(bytes);
        bytes.zeroize();
        Ok(key)
    }

    /// The raw bytes. Call only where they go straight into a cipher or a
    /// key file.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

macro_rules! key_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(SecretKey);

        impl $name {
            /// A fresh random key.
            pub fn generate() -> Result<Self, CryptoError> {
                SecretKey::generate().map(Self)
            }

            pub fn from_secret(secret: SecretKey) -> Self {
                Self(secret)
            }

            pub fn secret(&self) -> &SecretKey {
                &self.0
            }
        }
    };
}

key_newtype!(
    /// The key wrapping every customer key (held by a root-key provider).
    RootKeyMaterial
);
key_newtype!(
    /// A customer's key encryption key: wraps the data keys of that
    /// customer's objects. Destroying it is what shredding means.
    CustomerKey
);
key_newtype!(
    /// One object's data encryption key; never stored unwrapped.
    DataKey
);

/// Fills a buffer with random bytes (nonces, prefixes).
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).map_err(|_| CryptoError::Random)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_bytes() {
        let mut bytes = [0xAB; KEY_LEN];
        let key = DataKey::from_secret(SecretKey::from_slice_zeroizing(&mut bytes).unwrap());
        let printed = format!("{key:?}");
        assert!(printed.contains("redacted"));
        assert!(!printed.to_lowercase().contains("ab, ab"));
        assert!(!printed.contains("171"));
        assert_eq!(bytes, [0u8; KEY_LEN], "source bytes are zeroized");
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }
}
