//! Key wrapping: AES-256-GCM with a random 96-bit nonce and the key's
//! identity bound as associated data.
//!
//! Each customer key version wraps one data key per object, far below the
//! 2^32 invocations SP 800-38D §8.3 allows for random nonces; each root key
//! wraps one key per customer version.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::CryptoError;
use super::secret::{KEY_LEN, SecretKey, random_bytes};

// Do not change: wrapped keys in every catalog use this layout.
const WRAP_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Length of a wrapped key: version, nonce, ciphertext, tag.
pub const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;

const DATA_KEY_LABEL: &[u8] = b"recvault v1 data key";
const CUSTOMER_KEY_LABEL: &[u8] = b"recvault v1 customer key";
const CANARY_LABEL: &[u8] = b"recvault v1 canary";

fn aead(kek: &SecretKey) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&AES_256_GCM, kek.expose()).map(LessSafeKey::new).map_err(|_| CryptoError::DecryptionFailed)
}

/// Wraps `key` under `kek` with `aad` bound.
pub fn wrap_key(kek: &SecretKey, key: &SecretKey, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce: [u8; NONCE_LEN] = random_bytes()?;
    let mut buf = zeroize::Zeroizing::new(key.expose().to_vec());
    let tag = aead(kek)?
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::DecryptionFailed)?;
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(WRAP_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Unwraps a key wrapped by [`wrap_key`]; any mismatch is the opaque error.
pub fn unwrap_key(kek: &SecretKey, wrapped: &[u8], aad: &[u8]) -> Result<SecretKey, CryptoError> {
    if wrapped.len() != WRAPPED_LEN || wrapped[0] != WRAP_VERSION {
        return Err(CryptoError::DecryptionFailed);
    }
    let nonce: [u8; NONCE_LEN] = wrapped[1..1 + NONCE_LEN].try_into().expect("12 bytes");
    let mut buf = zeroize::Zeroizing::new(wrapped[1 + NONCE_LEN..].to_vec());
    let plain = aead(kek)?
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::DecryptionFailed)?;
    SecretKey::from_slice_zeroizing(plain)
}

/// Associated data binding a data key to its customer, object and the
/// customer key version that wraps it.
pub fn data_key_aad(customer_ref: &[u8; 16], object_id: &[u8; 16], key_version: u32) -> Vec<u8> {
    let mut aad = DATA_KEY_LABEL.to_vec();
    aad.extend_from_slice(customer_ref);
    aad.extend_from_slice(object_id);
    aad.extend_from_slice(&key_version.to_be_bytes());
    aad
}

/// Associated data binding a customer key to its customer (internal ref and
/// CRM id) and version.
pub fn customer_key_aad(customer_ref: &[u8; 16], customer_id: &str, key_version: u32) -> Vec<u8> {
    let mut aad = CUSTOMER_KEY_LABEL.to_vec();
    aad.extend_from_slice(customer_ref);
    aad.extend_from_slice(&(customer_id.len() as u32).to_be_bytes());
    aad.extend_from_slice(customer_id.as_bytes());
    aad.extend_from_slice(&key_version.to_be_bytes());
    aad
}

/// Associated data of a customer's canary: a random key wrapped under the
/// customer key at creation. Unwrapping it proves the customer key works;
/// after a shred, failing to unwrap it proves the key is gone.
pub fn canary_aad(customer_ref: &[u8; 16], key_version: u32) -> Vec<u8> {
    let mut aad = CANARY_LABEL.to_vec();
    aad.extend_from_slice(customer_ref);
    aad.extend_from_slice(&key_version.to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_binding() {
        let kek = SecretKey::generate().unwrap();
        let key = SecretKey::generate().unwrap();
        let aad = data_key_aad(&[1; 16], &[2; 16], 1);
        let wrapped = wrap_key(&kek, &key, &aad).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert_eq!(unwrap_key(&kek, &wrapped, &aad).unwrap().expose(), key.expose());

        // F6: the same wrapped key presented for another object or customer fails.
        for other in [
            data_key_aad(&[1; 16], &[3; 16], 1),
            data_key_aad(&[9; 16], &[2; 16], 1),
            data_key_aad(&[1; 16], &[2; 16], 2),
        ] {
            assert_eq!(unwrap_key(&kek, &wrapped, &other).unwrap_err(), CryptoError::DecryptionFailed);
        }
        // F1: any bit flip of the wrapped key fails.
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x10;
            assert_eq!(unwrap_key(&kek, &bad, &aad).unwrap_err(), CryptoError::DecryptionFailed);
        }
        let other_kek = SecretKey::generate().unwrap();
        assert_eq!(unwrap_key(&other_kek, &wrapped, &aad).unwrap_err(), CryptoError::DecryptionFailed);
    }

    #[test]
    fn customer_key_aad_is_unambiguous() {
        // Length-prefixing keeps "ab"+version from colliding with "a"+"b...".
        assert_ne!(customer_key_aad(&[0; 16], "ab", 1), customer_key_aad(&[0; 16], "a", 1));
    }
}
