//! A memo of successful certificate-signature verifications.
//!
//! Every mutual-TLS handshake verifies the same few signatures again and
//! again: each intermediate's signature by its root on every handshake, and a
//! leaf's signature by its intermediate every time the same peer reconnects.
//! Verifying a signature is a pure function of (algorithm, public key,
//! message, signature), so a success can be remembered under a
//! collision-resistant hash of all four and the curve arithmetic skipped the
//! next time the same bytes arrive.
//!
//! Only that arithmetic is memoized. webpki still builds the path and checks
//! validity periods, name and basic constraints, EKU and the trust anchors on
//! every handshake, and a trust bundle that drops a root still refuses chains
//! to it at once. A handshake's CertificateVerify (the proof that the peer
//! holds its key, over a fresh transcript) never goes through this cache: the
//! wrapped algorithms are used for chain validation only.
//!
//! Failures are not remembered: a wrong signature costs a full verification
//! every time, as it would without the cache, and cannot evict anything.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use aws_lc_rs::digest;
use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};

type Key = [u8; 32];

/// Remembered successful verifications, bounded. Two generations give an
/// approximate LRU without per-entry bookkeeping: entries go into `current`;
/// when it is full it becomes `previous` (dropping the old `previous`), and a
/// hit in `previous` moves the entry back into `current`.
pub struct SigCache {
    capacity: usize,
    generations: Mutex<Generations>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Generations {
    current: HashSet<Key>,
    previous: HashSet<Key>,
}

impl Generations {
    fn insert(&mut self, key: Key, capacity: usize) {
        if self.current.len() >= capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key);
    }
}

/// Hit and miss counts since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Verifications answered from the cache.
    pub hits: u64,
    /// Verifications that ran the signature algorithm.
    pub misses: u64,
}

impl SigCache {
    /// Entries per generation for the process-wide cache: a mesh's
    /// intermediates plus a few thousand recently seen peer leaves, at 32
    /// bytes (plus table overhead) each.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty cache holding up to about `2 * capacity` entries.
    pub fn new(capacity: usize) -> SigCache {
        SigCache {
            capacity: capacity.max(1),
            generations: Mutex::new(Generations::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The process-wide cache the SVID verifiers share. Sharing is safe
    /// because an entry says nothing about trust, only that these exact
    /// bytes verify under this exact key; it also means a reloaded trust
    /// bundle does not start cold.
    pub fn global() -> &'static SigCache {
        static GLOBAL: LazyLock<SigCache> =
            LazyLock::new(|| SigCache::new(SigCache::DEFAULT_CAPACITY));
        &GLOBAL
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> Stats {
        Stats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn lookup(&self, key: &Key) -> bool {
        let mut g = self
            .generations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let hit = g.current.contains(key) || {
            let was_previous = g.previous.remove(key);
            if was_previous {
                g.insert(*key, self.capacity);
            }
            was_previous
        };
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    fn remember(&self, key: Key) {
        self.generations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, self.capacity);
    }
}

impl fmt::Debug for SigCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigCache")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A signature algorithm that consults a [`SigCache`] before doing the work.
pub struct Cached {
    inner: &'static dyn SignatureVerificationAlgorithm,
    cache: &'static SigCache,
}

impl Cached {
    /// Wraps `inner`, remembering its successes in `cache`.
    pub fn new(
        inner: &'static dyn SignatureVerificationAlgorithm,
        cache: &'static SigCache,
    ) -> Cached {
        Cached { inner, cache }
    }

    /// SHA-256 over every input of the verification, each length-prefixed so
    /// that no two different inputs share an encoding.
    fn key(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Key {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in [
            self.inner.public_key_alg_id().as_ref(),
            self.inner.signature_alg_id().as_ref(),
            public_key,
            message,
            signature,
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }
}

impl fmt::Debug for Cached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cached({:?})", self.inner)
    }
}

impl SignatureVerificationAlgorithm for Cached {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let key = self.key(public_key, message, signature);
        if self.cache.lookup(&key) {
            return Ok(());
        }
        self.inner
            .verify_signature(public_key, message, signature)?;
        self.cache.remember(key);
        Ok(())
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

/// webpki's algorithms, each wrapped with the process-wide cache: what the
/// SVID verifier validates chains with.
pub fn chain_algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    static WRAPPED: LazyLock<Vec<Cached>> = LazyLock::new(|| {
        webpki::ALL_VERIFICATION_ALGS
            .iter()
            .map(|alg| Cached::new(*alg, SigCache::global()))
            .collect()
    });
    static REFS: LazyLock<Vec<&'static dyn SignatureVerificationAlgorithm>> = LazyLock::new(|| {
        WRAPPED
            .iter()
            .map(|a| a as &'static dyn SignatureVerificationAlgorithm)
            .collect()
    });
    &REFS
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    fn leak(cache: SigCache) -> &'static SigCache {
        Box::leak(Box::new(cache))
    }

    fn p256() -> &'static dyn SignatureVerificationAlgorithm {
        webpki::aws_lc_rs::ECDSA_P256_SHA256
    }

    fn signed(msg: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
        let sig = kp.sign(&rng, msg).unwrap();
        (kp.public_key().as_ref().to_vec(), sig.as_ref().to_vec())
    }

    #[test]
    fn a_success_is_remembered_and_reused() {
        let cache = leak(SigCache::new(16));
        let alg = Cached::new(p256(), cache);
        let (pk, sig) = signed(b"tbs");
        alg.verify_signature(&pk, b"tbs", &sig).unwrap();
        alg.verify_signature(&pk, b"tbs", &sig).unwrap();
        assert_eq!(cache.stats(), Stats { hits: 1, misses: 1 });
    }

    #[test]
    fn any_changed_input_misses_and_is_verified_for_real() {
        let cache = leak(SigCache::new(16));
        let alg = Cached::new(p256(), cache);
        let (pk, sig) = signed(b"tbs");
        alg.verify_signature(&pk, b"tbs", &sig).unwrap();
        // Another message, a flipped signature bit, another key: each must be
        // refused even though the original is cached.
        assert!(alg.verify_signature(&pk, b"tbs!", &sig).is_err());
        let mut bad = sig.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(alg.verify_signature(&pk, b"tbs", &bad).is_err());
        let (other_pk, _) = signed(b"x");
        assert!(alg.verify_signature(&other_pk, b"tbs", &sig).is_err());
        // Failures are not remembered: refused again, still as misses.
        assert!(alg.verify_signature(&pk, b"tbs!", &sig).is_err());
        assert_eq!(cache.stats(), Stats { hits: 0, misses: 5 });
    }

    #[test]
    fn the_same_bytes_under_another_algorithm_do_not_hit() {
        let cache = leak(SigCache::new(16));
        let (pk, sig) = signed(b"tbs");
        Cached::new(p256(), cache)
            .verify_signature(&pk, b"tbs", &sig)
            .unwrap();
        let p384 = Cached::new(webpki::aws_lc_rs::ECDSA_P256_SHA384, cache);
        assert!(p384.verify_signature(&pk, b"tbs", &sig).is_err());
        assert_eq!(cache.stats().hits, 0);
    }

    #[test]
    fn it_stays_bounded_and_keeps_what_is_used() {
        let cache = leak(SigCache::new(2));
        let alg = Cached::new(p256(), cache);
        let entries: Vec<_> = (0..5u8)
            .map(|i| {
                let msg = vec![i; 8];
                let (pk, sig) = signed(&msg);
                (pk, msg, sig)
            })
            .collect();
        let (pk0, m0, s0) = &entries[0];
        for (pk, m, s) in &entries {
            alg.verify_signature(pk, m, s).unwrap();
            // Entry 0 is used all the time, so it survives the churn.
            alg.verify_signature(pk0, m0, s0).unwrap();
        }
        let g = cache.generations.lock().unwrap();
        assert!(g.current.len() + g.previous.len() <= 4);
        drop(g);
        let before = cache.stats();
        alg.verify_signature(pk0, m0, s0).unwrap();
        assert_eq!(cache.stats().hits, before.hits + 1);
    }
}
