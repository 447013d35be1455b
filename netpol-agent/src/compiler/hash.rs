//! A fast hasher for the compiler's numeric keys.
//!
//! Most of the compiler's tables are keyed by numbers it allocates itself
//! (atom, identity, rule and policy-set ids) or reads from fixed-width
//! fields (addresses, policy map keys). SipHash, the standard library's
//! default, guards against keys chosen to collide; these keys are not chosen
//! by anyone, and hashing them is most of the cost of an incremental change.
//! Tables keyed by names (pods, policies, namespaces, labels) keep SipHash.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
};

/// The multiply-rotate hash of rustc's `FxHasher` (rustc-hash 2): one
/// multiplication per word.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NumHasher(u64);

const SEED: u64 = 0xf135_7aea_2e62_a9c5;

impl NumHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = self.0.wrapping_add(word).wrapping_mul(SEED);
    }
}

impl Hasher for NumHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // The high bits are the well-mixed ones; hash tables index with
        // the low ones.
        self.0.rotate_left(26)
    }
}

pub(crate) type NumBuild = BuildHasherDefault<NumHasher>;
/// A hash map keyed by numbers (ids, addresses, policy keys).
pub(crate) type NumMap<K, V> = HashMap<K, V, NumBuild>;
/// A hash set of numbers.
pub(crate) type NumSet<K> = HashSet<K, NumBuild>;
