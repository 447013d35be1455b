//! Equivalence classes of members (addresses, endpoints) by key, with ids
//! that follow the members rather than the keys.
//!
//! Members with equal keys share one class and its id. When the keys of
//! members change, [`Classes::regroup`] moves them, and a class whose members
//! all move to the same new key keeps its id (it is *rekeyed* in place):
//! a selector that enters play and matches a whole class only adds the
//! entries of that selector, it does not renumber the class (which would
//! rewrite every peer entry of its members and every policy entry keyed on
//! it). The partition is always the one by key, whatever the history, so an
//! incremental compile and a fresh one agree up to the choice of ids.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::Hash,
};

use super::{
    hash::{NumMap, NumSet},
    ids::IdAlloc,
};

/// One class: its key and its members.
#[derive(Debug)]
pub(crate) struct Class<K, M> {
    pub(crate) key: K,
    members: NumSet<M>,
}

/// The classes of one kind of member.
#[derive(Debug)]
pub(crate) struct Classes<K, M> {
    by_key: HashMap<K, u32>,
    classes: NumMap<u32, Class<K, M>>,
}

impl<K, M> Default for Classes<K, M> {
    fn default() -> Self {
        Self {
            by_key: HashMap::default(),
            classes: NumMap::default(),
        }
    }
}

/// A member's move: out of class `from` (`None`: a new member) into the
/// class of key `keys[to]` (`None`: the member goes away), where `keys` are
/// the distinct new keys of a batch of moves.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Move<M> {
    pub(crate) member: M,
    pub(crate) from: Option<u32>,
    pub(crate) to: Option<u32>,
}

/// Classes whose key changed in a batch: id -> the key it had before the
/// batch (`None` for a class the batch created). The current key (or its
/// absence, for a class that went away) is in [`Classes`].
pub(crate) type KeyChanges<K> = NumMap<u32, Option<K>>;

/// Moves from one class to one key: ((from, to), members).
type Group<M> = ((Option<u32>, Option<u32>), Vec<M>);

/// Collects the distinct keys of a batch of moves.
pub(crate) struct Keys<K> {
    index: HashMap<K, u32>,
    keys: Vec<K>,
}

impl<K> Default for Keys<K> {
    fn default() -> Self {
        Self {
            index: HashMap::new(),
            keys: Vec::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> Keys<K> {
    /// The index of `key` (added if new).
    pub(crate) fn index(&mut self, key: K) -> u32 {
        match self.index.entry(key) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let i = u32::try_from(self.keys.len()).expect("fewer than 2^32 keys");
                self.keys.push(e.key().clone());
                e.insert(i);
                i
            }
        }
    }
}

impl<K: Clone + Eq + Hash + Ord, M: Copy + Eq + Hash> Classes<K, M> {
    pub(crate) fn key(&self, id: u32) -> Option<&K> {
        self.classes.get(&id).map(|c| &c.key)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.classes.len()
    }

    /// Applies `moves` (to the keys collected in `keys`) and records in
    /// `changes` the classes that were created, rekeyed or removed. Returns
    /// the members whose class changed, with their new class (`None` for
    /// members that went away): the moved members that did not keep their
    /// id, and possibly members that did not move but were renumbered (when
    /// most of a class moves to one new key, the class goes with them and
    /// the few that stay get a new id).
    pub(crate) fn regroup(
        &mut self,
        moves: &[Move<M>],
        keys: Keys<K>,
        alloc: &mut IdAlloc,
        changes: &mut KeyChanges<K>,
    ) -> Vec<(M, Option<u32>)> {
        let keys = keys.keys;
        let mut renumbered = Vec::new();
        // Group the moves by (from, to); drop those that stay put.
        let mut groups: NumMap<(Option<u32>, Option<u32>), Vec<M>> = NumMap::default();
        for m in moves {
            groups.entry((m.from, m.to)).or_default().push(m.member);
        }
        groups.retain(|(from, to), _| match (from, to) {
            (Some(from), Some(to)) => self.classes[from].key != keys[*to as usize],
            (None, None) => false,
            _ => true,
        });
        let mut leaving: NumMap<u32, usize> = NumMap::default();
        for ((from, _), members) in &groups {
            if let Some(from) = from {
                *leaving.entry(*from).or_default() += members.len();
            }
        }
        // Classes that every member leaves give up their key: one of their
        // groups can take the class (and its id) over. Others note how many
        // members stay.
        let mut free: NumMap<u32, bool> = NumMap::default();
        let mut staying: NumMap<u32, usize> = NumMap::default();
        for (&id, &n) in &leaving {
            let class = &self.classes[&id];
            if n == class.members.len() {
                self.by_key.remove(&class.key);
                free.insert(id, true);
                changes.entry(id).or_insert_with(|| Some(class.key.clone()));
            } else {
                staying.insert(id, class.members.len() - n);
            }
        }
        // Biggest groups first: they keep ids, so fewer members get new ones.
        let mut groups: Vec<Group<M>> = groups.into_iter().collect();
        groups.sort_by(|a, b| {
            b.1.len().cmp(&a.1.len()).then_with(|| {
                let key = |g: &(Option<u32>, Option<u32>)| (g.0, g.1.map(|k| &keys[k as usize]));
                key(&a.0).cmp(&key(&b.0))
            })
        });
        let mut swapped: NumSet<u32> = NumSet::default();
        for at in 0..groups.len() {
            let ((from, to), ref members) = groups[at];
            let Some(to) = to else {
                let class = self.classes.get_mut(&from.expect("a move")).expect("class");
                for m in members {
                    class.members.remove(m);
                    renumbered.push((*m, None));
                }
                continue;
            };
            let to = &keys[to as usize];
            let target = match (self.by_key.get(to), from) {
                (Some(&id), _) => id,
                (None, Some(c)) if free.get(&c) == Some(&true) => {
                    free.insert(c, false);
                    self.classes.get_mut(&c).expect("class").key = to.clone();
                    self.by_key.insert(to.clone(), c);
                    c
                }
                (None, Some(c))
                    if !free.contains_key(&c)
                        && !swapped.contains(&c)
                        && members.len() > staying[&c] =>
                {
                    // Most of `c` moves here: `c` goes with it, and the
                    // members that stay get a new class with the old key.
                    swapped.insert(c);
                    let moving: NumSet<M> = groups
                        .iter()
                        .filter(|((f, _), _)| *f == Some(c))
                        .flat_map(|(_, ms)| ms.iter().copied())
                        .collect();
                    let class = self.classes.get_mut(&c).expect("class");
                    let stay: NumSet<M> = class
                        .members
                        .iter()
                        .filter(|m| !moving.contains(m))
                        .copied()
                        .collect();
                    class.members.retain(|m| !stay.contains(m));
                    let old = std::mem::replace(&mut class.key, to.clone());
                    changes.entry(c).or_insert_with(|| Some(old.clone()));
                    let n = alloc.next();
                    renumbered.extend(stay.iter().map(|m| (*m, Some(n))));
                    self.by_key.insert(old.clone(), n);
                    self.by_key.insert(to.clone(), c);
                    self.classes.insert(
                        n,
                        Class {
                            key: old,
                            members: stay,
                        },
                    );
                    changes.insert(n, None);
                    c
                }
                _ => {
                    let id = alloc.next();
                    self.classes.insert(
                        id,
                        Class {
                            key: to.clone(),
                            members: NumSet::default(),
                        },
                    );
                    self.by_key.insert(to.clone(), id);
                    changes.insert(id, None);
                    id
                }
            };
            if from == Some(target) {
                continue; // the class moved with them
            }
            if let Some(from) = from {
                let class = self.classes.get_mut(&from).expect("class");
                for m in members {
                    class.members.remove(m);
                }
            }
            let class = self.classes.get_mut(&target).expect("class");
            for m in members {
                class.members.insert(*m);
                renumbered.push((*m, Some(target)));
            }
        }
        // Vacated classes that no group took over are gone.
        for (id, unclaimed) in free {
            if unclaimed {
                let removed = self.classes.remove(&id).expect("free classes exist");
                debug_assert!(removed.members.is_empty());
            }
        }
        renumbered
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Classes of members named by numbers, keyed by strings.
    #[derive(Default)]
    struct Fixture {
        classes: Classes<&'static str, u32>,
        alloc: IdAlloc,
        changes: KeyChanges<&'static str>,
        /// member -> class.
        of: BTreeMap<u32, u32>,
    }

    impl Fixture {
        /// Moves members to keys (`None`: they go).
        fn regroup(&mut self, moves: &[(u32, Option<&'static str>)]) {
            let mut keys = Keys::default();
            let moves: Vec<Move<u32>> = moves
                .iter()
                .map(|&(member, to)| Move {
                    member,
                    from: self.of.get(&member).copied(),
                    to: to.map(|k| keys.index(k)),
                })
                .collect();
            self.changes.clear();
            for (m, id) in self
                .classes
                .regroup(&moves, keys, &mut self.alloc, &mut self.changes)
            {
                match id {
                    Some(id) => self.of.insert(m, id),
                    None => self.of.remove(&m),
                };
            }
        }

        fn key_of(&self, member: u32) -> &'static str {
            self.classes.key(self.of[&member]).unwrap()
        }
    }

    #[test]
    fn equal_keys_share_a_class_and_whole_classes_keep_their_id() {
        let mut f = Fixture::default();
        f.regroup(&[(1, Some("a")), (2, Some("a")), (3, Some("b"))]);
        assert_eq!(f.of[&1], f.of[&2]);
        assert_ne!(f.of[&1], f.of[&3]);
        let (a, b) = (f.of[&1], f.of[&3]);

        // Both members of "a" move to "a2": the class is rekeyed, same id.
        f.regroup(&[(1, Some("a2")), (2, Some("a2"))]);
        assert_eq!((f.of[&1], f.of[&2]), (a, a));
        assert_eq!(f.key_of(1), "a2");
        assert_eq!(f.changes.get(&a), Some(&Some("a")));

        // One member of "a2" moves to "b": it joins b's class.
        f.regroup(&[(1, Some("b"))]);
        assert_eq!(f.of[&1], b);

        // Swap: "a2" -> "b" and "b" -> "a2" (the classes trade keys).
        f.regroup(&[(2, Some("b")), (1, Some("a2")), (3, Some("a2"))]);
        assert_eq!(f.of[&1], f.of[&3]);
        assert_ne!(f.of[&1], f.of[&2]);
        assert_eq!(f.classes.len(), 2);
        assert_eq!((f.key_of(2), f.key_of(1)), ("b", "a2"));

        // Everyone leaves: no classes.
        f.regroup(&[(1, None), (2, None), (3, None)]);
        assert_eq!(f.classes.len(), 0);
        assert!(f.of.is_empty());
    }

    #[test]
    fn most_of_a_class_moving_takes_the_id_along() {
        let mut f = Fixture::default();
        f.regroup(&[
            (1, Some("a")),
            (2, Some("a")),
            (3, Some("a")),
            (4, Some("a")),
        ]);
        let a = f.of[&1];
        // Three of four move to a new key: they keep the id, the one that
        // stays gets a new one (with the old key).
        f.regroup(&[(1, Some("a2")), (2, Some("a2")), (3, Some("a2"))]);
        assert_eq!((f.of[&1], f.of[&2], f.of[&3]), (a, a, a));
        assert_eq!(f.key_of(1), "a2");
        assert_ne!(f.of[&4], a);
        assert_eq!(f.key_of(4), "a");
        assert_eq!(f.changes.get(&a), Some(&Some("a")));
        assert_eq!(f.changes.get(&f.of[&4]), Some(&None));
        // One of four moving to a new key: it gets a new id.
        f.regroup(&[(1, Some("a3"))]);
        assert_eq!((f.of[&2], f.of[&3]), (a, a));
        assert_ne!(f.of[&1], a);
    }
}
