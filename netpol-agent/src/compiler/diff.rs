//! Map updates between two compiles of one node (the types are
//! `crate::maps`').

use super::Compiled;
pub use crate::maps::{Diff, MapUpdate, diff_maps};

/// The map updates from `old` to `new` (both compiles of the same node).
pub fn diff(old: &Compiled, new: &Compiled) -> Diff {
    diff_maps(&old.maps, &new.maps)
}
