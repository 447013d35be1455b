//! Id allocation and interning.
//!
//! Ids start at 1 (0 is reserved by every id space: `IDENTITY_ANY`, "no
//! rule", "no policy") and are never reused, so a stale id in a flow entry or
//! a log can't name something else.

use std::{collections::HashMap, hash::Hash};

/// Hands out fresh ids: 1, 2, 3, ... never the same twice.
#[derive(Debug)]
pub(crate) struct IdAlloc {
    next: u32,
}

impl Default for IdAlloc {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl IdAlloc {
    pub(crate) fn next(&mut self) -> u32 {
        let id = self.next;
        // The top bit of a stored policy set id is its epoch, and the
        // agent's lockdown set is the largest id below it.
        assert!(
            id < !netpol_common::EPOCH_BIT,
            "id space exhausted (ids stay below 2^31 - 1)"
        );
        self.next += 1;
        id
    }
}

/// Interns keys with a reference count: a key keeps its id while something
/// holds a reference to it. Keys whose count dropped to zero are forgotten
/// by [`Interner::sweep`] (not at once, so that a key released and acquired
/// again within one batch keeps its id).
#[derive(Debug)]
pub(crate) struct Interner<K> {
    by_key: HashMap<K, u32>,
    entries: HashMap<u32, Interned<K>>,
    alloc: IdAlloc,
}

#[derive(Debug)]
pub(crate) struct Interned<K> {
    pub(crate) key: K,
    pub(crate) refs: u32,
}

impl<K> Default for Interner<K> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            entries: HashMap::new(),
            alloc: IdAlloc::default(),
        }
    }
}

impl<K: Hash + Eq + Clone> Interner<K> {
    /// The id of `key` (allocated if new), with one more reference.
    pub(crate) fn acquire(&mut self, key: &K) -> u32 {
        let id = match self.by_key.get(key) {
            Some(&id) => id,
            None => {
                let id = self.alloc.next();
                self.by_key.insert(key.clone(), id);
                self.entries.insert(
                    id,
                    Interned {
                        key: key.clone(),
                        refs: 0,
                    },
                );
                id
            }
        };
        self.entries.get_mut(&id).expect("interned").refs += 1;
        id
    }

    /// Drops one reference to `id`.
    pub(crate) fn release(&mut self, id: u32) {
        let entry = self.entries.get_mut(&id).expect("released an unknown id");
        entry.refs = entry.refs.checked_sub(1).expect("released too often");
    }

    pub(crate) fn get(&self, id: u32) -> &K {
        &self.entries[&id].key
    }

    pub(crate) fn id_of(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    pub(crate) fn refs(&self, id: u32) -> u32 {
        self.entries.get(&id).map_or(0, |e| e.refs)
    }

    /// Forgets the given ids if nothing references them any more.
    pub(crate) fn sweep(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if let Some(entry) = self.entries.get(&id)
                && entry.refs == 0
            {
                self.by_key.remove(&entry.key);
                self.entries.remove(&id);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_while_referenced_and_never_reused() {
        let mut t = Interner::<String>::default();
        let a = t.acquire(&"a".to_string());
        let b = t.acquire(&"b".to_string());
        assert_eq!((a, b), (1, 2));
        assert_eq!(t.acquire(&"a".to_string()), a);
        t.release(a);
        t.release(b);
        t.sweep([a, b]);
        assert_eq!(t.len(), 1, "a is still referenced once");
        assert_eq!(t.id_of(&"a".to_string()), Some(a));
        assert_eq!(t.acquire(&"b".to_string()), 3, "b was forgotten: new id");
    }

    #[test]
    fn released_and_reacquired_before_a_sweep_keeps_its_id() {
        let mut t = Interner::<String>::default();
        let a = t.acquire(&"a".to_string());
        t.release(a);
        assert_eq!(t.acquire(&"a".to_string()), a);
        t.sweep([a]);
        assert_eq!(t.get(a), "a");
    }
}
