//! Values of the shared cache level are sealed: AES-256-GCM (aws-lc-rs), a random 96-bit nonce
//! per value, and the key id and the Redis key as associated data.
//!
//! Whoever reads Redis (a backup, a replica, a `MONITOR`, another tenant of a shared instance)
//! learns neither the exchanged token nor whether two entries hold the same one; whoever writes
//! to it cannot forge a value, alter one, or move one to another key (another caller's), since
//! every such value fails to open and is treated as a miss. Random nonces are safe for far more
//! values than one key ever seals between rotations (NIST SP 800-38D §8.3: 2^32 per key).
//!
//! Layout: `version (1) | key id (4) | nonce (12) | ciphertext | tag (16)`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::config::SealingKey;

const VERSION: u8 = 1;
const AAD_LABEL: &[u8] = b"txgate-shared-cache-v1";
const HEADER: usize = 1 + 4 + NONCE_LEN;

/// The sealing keys, ready: the first seals, every one opens.
pub struct Sealer {
    keys: Vec<([u8; 4], LessSafeKey)>,
}

impl Sealer {
    /// Builds the ciphers from the configured keys; `None` if there is no key (the config
    /// requires one) or the crypto library refuses a key.
    pub fn new(keys: &[SealingKey]) -> Option<Sealer> {
        let keys = keys
            .iter()
            .map(|k| {
                UnboundKey::new(&AES_256_GCM, k.expose())
                    .ok()
                    .map(|unbound| (k.id(), LessSafeKey::new(unbound)))
            })
            .collect::<Option<Vec<_>>>()?;
        (!keys.is_empty()).then_some(Sealer { keys })
    }

    fn aad(id: &[u8; 4], redis_key: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + 4 + redis_key.len());
        aad.extend_from_slice(AAD_LABEL);
        aad.extend_from_slice(id);
        aad.extend_from_slice(redis_key);
        aad
    }

    /// `plaintext` sealed for `redis_key` with the first key; `None` only if the system's random
    /// source fails.
    pub fn seal(&self, redis_key: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let (id, key) = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER + plaintext.len() + AES_256_GCM.tag_len());
        out.push(VERSION);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(Self::aad(id, redis_key)),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// The plaintext of `sealed` if it was sealed for `redis_key` by one of the keys and is
    /// unchanged; `None` for anything else (another version, an unknown key id, a changed
    /// byte, another key's value, a truncated value).
    pub fn open(&self, redis_key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < HEADER + AES_256_GCM.tag_len() || sealed[0] != VERSION {
            return None;
        }
        let id: [u8; 4] = sealed[1..5].try_into().ok()?;
        let nonce: [u8; NONCE_LEN] = sealed[5..HEADER].try_into().ok()?;
        let (_, key) = self.keys.iter().find(|(k, _)| *k == id)?;
        let mut body = sealed[HEADER..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(&id, redis_key)),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(keys: &[u8]) -> Sealer {
        let keys: Vec<SealingKey> = keys.iter().map(|b| SealingKey::new([*b; 32])).collect();
        Sealer::new(&keys).unwrap()
    }

    #[test]
    fn a_value_opens_for_its_key_only() {
        let s = sealer(&[1]);
        let sealed = s.seal(b"txgate:aa", b"exchanged-token").unwrap();
        assert_eq!(s.open(b"txgate:aa", &sealed).unwrap(), b"exchanged-token");
        // Moved to another key: refused.
        assert!(s.open(b"txgate:bb", &sealed).is_none());
        // Nothing of the plaintext is visible.
        assert!(!sealed.windows(9).any(|w| w == b"exchanged"));
        // Two seals of one value differ (random nonce).
        assert_ne!(sealed, s.seal(b"txgate:aa", b"exchanged-token").unwrap());
    }

    #[test]
    fn every_changed_byte_and_every_truncation_is_refused() {
        let s = sealer(&[1]);
        let sealed = s.seal(b"k", b"token").unwrap();
        for i in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[i] ^= 0x01;
            assert!(s.open(b"k", &flipped).is_none(), "byte {i}");
        }
        for len in 0..sealed.len() {
            assert!(s.open(b"k", &sealed[..len]).is_none(), "length {len}");
        }
    }

    #[test]
    fn rotation_old_values_open_new_values_use_the_first_key() {
        let old = sealer(&[1]);
        let rotated = sealer(&[2, 1]);
        let by_old = old.seal(b"k", b"t1").unwrap();
        assert_eq!(rotated.open(b"k", &by_old).unwrap(), b"t1");
        let by_new = rotated.seal(b"k", b"t2").unwrap();
        // Sealed with the new key, which the old key set does not have.
        assert!(old.open(b"k", &by_new).is_none());
        assert_eq!(sealer(&[2]).open(b"k", &by_new).unwrap(), b"t2");
    }
}
