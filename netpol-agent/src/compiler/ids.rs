//! Stable id allocation across compiles.

use std::{borrow::Borrow, collections::HashMap, hash::Hash};

/// Gives every key a `u32` id that stays the same for as long as the key is
/// used by consecutive compiles. Ids start at 1 (0 is reserved by every id
/// space: `IDENTITY_ANY`, "no rule", "no policy") and are never reused, so a
/// stale id in a flow entry or a log can't name something else.
#[derive(Debug)]
pub(crate) struct IdTable<K> {
    ids: HashMap<K, Slot>,
    next: u32,
}

#[derive(Debug)]
struct Slot {
    id: u32,
    used: bool,
}

impl<K> Default for IdTable<K> {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
            next: 1,
        }
    }
}

impl<K: Hash + Eq> IdTable<K> {
    /// The id of `key`, allocated if it is new; marks it used by this compile.
    pub(crate) fn id<Q>(&mut self, key: &Q) -> u32
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(slot) = self.ids.get_mut(key) {
            slot.used = true;
            return slot.id;
        }
        let id = self.next;
        self.next = self.next.checked_add(1).expect("u32 id space exhausted");
        self.ids.insert(key.to_owned(), Slot { id, used: true });
        id
    }

    /// Forgets the keys no compile used since the last call, and starts a
    /// new round.
    pub(crate) fn end_round(&mut self) {
        self.ids.retain(|_, slot| std::mem::take(&mut slot.used));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_while_used_and_never_reused() {
        let mut t = IdTable::<String>::default();
        let a = t.id("a");
        let b = t.id("b");
        assert_eq!((a, b), (1, 2));
        t.end_round();
        assert_eq!(t.id("a"), a);
        t.end_round(); // "b" unused in this round: forgotten
        assert_eq!(t.len(), 1);
        assert_eq!(t.id("b"), 3);
        assert_eq!(t.id("a"), a);
    }
}
