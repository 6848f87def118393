//! One-time codes: generation from a CSPRNG, keyed hashing, constant-time
//! comparison, and the random identifiers the gateway hands out.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// A code of `length` decimal digits (6..=10).
///
/// `random_range` samples uniformly (rejection, not `%`), so every code is
/// equally likely; `rand::rng()` is a ChaCha CSPRNG seeded from the OS.
pub fn generate_code(length: u32) -> String {
    let length = length.clamp(1, 19);
    let n: u64 = rand::rng().random_range(0..10u64.pow(length));
    format!("{n:0width$}", width = length as usize)
}

/// Whether `code` has the shape of a code: exactly `length` ASCII digits.
pub fn well_formed(code: &str, length: u32) -> bool {
    code.len() == length as usize && code.bytes().all(|b| b.is_ascii_digit())
}

/// The keyed hash under which a code is stored. Binding the challenge id
/// means one stored hash is useless for any other challenge.
pub fn hash_code(key: &[u8], challenge_id: &str, code: &str) -> [u8; 32] {
    keyed_hash(key, &[b"code", challenge_id.as_bytes(), code.as_bytes()])
}

/// HMAC-SHA256 over length-prefixed parts (so `("ab","c")` != `("a","bc")`).
pub fn keyed_hash(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two hashes or MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A sub-key for one purpose, derived from a master secret.
pub fn derive_key(master: &[u8], label: &[u8]) -> Vec<u8> {
    keyed_hash(master, &[label]).to_vec()
}

/// 128 random bits, base64url: challenge ids, token ids, CSRF nonces.
pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // Codes have exactly the configured number of digits, leading zeros kept.
    fn codes_have_fixed_width() {
        for len in 6..=10 {
            for _ in 0..200 {
                let c = generate_code(len);
                assert!(well_formed(&c, len), "{c}");
            }
        }
    }

    #[test]
    // A biased or constant generator would show up as a skewed first digit.
    fn first_digit_is_roughly_uniform() {
        let mut counts = [0u32; 10];
        for _ in 0..20_000 {
            let c = generate_code(6);
            counts[usize::from(c.as_bytes()[0] - b'0')] += 1;
        }
        for (d, n) in counts.iter().enumerate() {
            assert!((1600..2400).contains(n), "digit {d}: {n} of 20000");
        }
    }

    #[test]
    // Non-ASCII digits (Arabic-Indic, fullwidth) and wrong lengths are not codes.
    fn malformed_codes() {
        assert!(!well_formed("12345", 6));
        assert!(!well_formed("1234567", 6));
        assert!(!well_formed("١٢٣٤٥٦", 6));
        assert!(!well_formed("１２３４５６", 6));
        assert!(!well_formed("12 456", 6));
        assert!(well_formed("012345", 6));
    }

    #[test]
    // The stored hash depends on the key, the challenge and the code.
    fn hash_binds_key_challenge_and_code() {
        let h = hash_code(b"k1", "c1", "123456");
        assert!(ct_eq(&h, &hash_code(b"k1", "c1", "123456")));
        assert!(!ct_eq(&h, &hash_code(b"k2", "c1", "123456")));
        assert!(!ct_eq(&h, &hash_code(b"k1", "c2", "123456")));
        assert!(!ct_eq(&h, &hash_code(b"k1", "c1", "123457")));
        assert_ne!(
            keyed_hash(b"k", &[b"ab", b"c"]),
            keyed_hash(b"k", &[b"a", b"bc"])
        );
    }

    #[test]
    // Identifiers must not repeat.
    fn ids_are_unique() {
        let a = random_id();
        assert_eq!(a.len(), 22);
        assert_ne!(a, random_id());
    }
}
