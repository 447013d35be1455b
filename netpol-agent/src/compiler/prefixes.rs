//! The partition of address space by the ipBlocks in play.
//!
//! Every cidr and except of an ipBlock in play is a *net* (plus both /0,
//! always). For an address whose longest matching net is N, membership in
//! every ipBlock is a function of N: the blocks whose cidr contains N and no
//! except of which contains N. That set of blocks is N's *class*.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::model::IpBlock;

/// One net of the partition.
#[derive(Debug)]
pub(crate) struct Net {
    /// How many blocks in play use it (as cidr or except); the two /0 nets
    /// hold one extra reference and never go.
    pub(crate) refs: u32,
    /// Sorted ids of the block atoms that contain the net.
    pub(crate) atoms: Vec<u32>,
    /// Address identity of the net (0 until classified).
    pub(crate) identity: u32,
    /// Identity of the peer entry written for the net: `None` when the net
    /// is left out because its nearest enclosing net has the same identity.
    pub(crate) written: Option<u32>,
}

/// The nets in play and the blocks that made them.
#[derive(Debug)]
pub(crate) struct Prefixes {
    pub(crate) nets: BTreeMap<IpNet, Net>,
    /// Prefix length -> number of nets with it, per family (v4, v6).
    lengths: [BTreeMap<u8, u32>; 2],
    /// Blocks in play by (truncated) cidr.
    by_cidr: HashMap<IpNet, Vec<(u32, IpBlock)>>,
    /// Blocks came or went (or the nets were never classified) since
    /// [`Prefixes::take_changed`].
    changed: bool,
}

impl Default for Prefixes {
    fn default() -> Self {
        let mut p = Self {
            nets: BTreeMap::new(),
            lengths: [BTreeMap::new(), BTreeMap::new()],
            by_cidr: HashMap::new(),
            changed: true,
        };
        for whole in ["0.0.0.0/0", "::/0"] {
            p.acquire(whole.parse().expect("valid"));
        }
        p
    }
}

pub(crate) fn family(net: &IpNet) -> usize {
    match net {
        IpNet::V4(_) => 0,
        IpNet::V6(_) => 1,
    }
}

impl Prefixes {
    /// A block atom enters play.
    pub(crate) fn add_block(&mut self, atom: u32, block: &IpBlock) {
        self.changed = true;
        let cidr = block.cidr.trunc();
        self.acquire(cidr);
        for e in &block.except {
            self.acquire(e.trunc());
        }
        self.by_cidr
            .entry(cidr)
            .or_default()
            .push((atom, block.clone()));
    }

    /// A block atom leaves play. Nets nothing uses any more stay (with no
    /// references) until [`Prefixes::drop_unused`], so that their identity
    /// can be released first.
    pub(crate) fn remove_block(&mut self, atom: u32, block: &IpBlock) {
        self.changed = true;
        let cidr = block.cidr.trunc();
        for net in std::iter::once(cidr).chain(block.except.iter().map(IpNet::trunc)) {
            let n = self.nets.get_mut(&net).expect("net of a block in play");
            n.refs -= 1;
            if n.refs == 0 {
                let per_family = &mut self.lengths[family(&net)];
                let count = per_family.get_mut(&net.prefix_len()).expect("counted");
                *count -= 1;
                if *count == 0 {
                    per_family.remove(&net.prefix_len());
                }
            }
        }
        if let Some(list) = self.by_cidr.get_mut(&cidr) {
            list.retain(|(a, _)| *a != atom);
            if list.is_empty() {
                self.by_cidr.remove(&cidr);
            }
        }
    }

    /// Whether the nets changed since the last call.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn acquire(&mut self, net: IpNet) {
        let n = self.nets.entry(net).or_insert_with(|| Net {
            refs: 0,
            atoms: Vec::new(),
            identity: 0,
            written: None,
        });
        if n.refs == 0 {
            *self.lengths[family(&net)]
                .entry(net.prefix_len())
                .or_default() += 1;
        }
        n.refs += 1;
    }

    /// Removes the nets no block uses.
    pub(crate) fn drop_unused(&mut self) {
        self.nets.retain(|_, n| n.refs > 0);
    }

    /// The nets (in play or just dropped) inside any of `cidrs`, sorted.
    pub(crate) fn inside(&self, cidrs: &[IpNet]) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = Vec::new();
        for cidr in cidrs {
            let cidr = cidr.trunc();
            let (first, last) = match cidr {
                IpNet::V4(n) => (
                    IpNet::V4(ipnet::Ipv4Net::new(n.network(), 0).expect("valid")),
                    IpNet::V4(ipnet::Ipv4Net::new(n.broadcast(), 32).expect("valid")),
                ),
                IpNet::V6(n) => (
                    IpNet::V6(ipnet::Ipv6Net::new(n.network(), 0).expect("valid")),
                    IpNet::V6(ipnet::Ipv6Net::new(n.broadcast(), 128).expect("valid")),
                ),
            };
            out.extend(
                self.nets
                    .range(first..=last)
                    .map(|(net, _)| *net)
                    .filter(|net| net.prefix_len() >= cidr.prefix_len()),
            );
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether a net is in play (it has references).
    fn live(&self, net: &IpNet) -> bool {
        self.nets.get(net).is_some_and(|n| n.refs > 0)
    }

    /// The longest net in play containing `net` (`net` itself included).
    pub(crate) fn longest_match(&self, net: IpNet) -> IpNet {
        self.lengths[family(&net)]
            .keys()
            .rev()
            .filter(|&&len| len <= net.prefix_len())
            .map(|&len| IpNet::new(net.network(), len).expect("valid").trunc())
            .find(|candidate| self.live(candidate))
            .expect("/0 is always in play")
    }

    /// The net whose class an address belongs to.
    pub(crate) fn class_net(&self, ip: IpAddr) -> IpNet {
        self.longest_match(IpNet::from(ip))
    }

    /// The nearest net in play strictly enclosing `net` (`None` for /0).
    pub(crate) fn parent(&self, net: &IpNet) -> Option<IpNet> {
        net.supernet().map(|sup| self.longest_match(sup))
    }

    /// The sorted block atoms containing every address of `net`.
    pub(crate) fn atoms_of(&self, net: &IpNet) -> Vec<u32> {
        let mut atoms = Vec::new();
        for &len in self.lengths[family(net)].keys() {
            if len > net.prefix_len() {
                break;
            }
            let sup = IpNet::new(net.network(), len).expect("valid").trunc();
            for (atom, block) in self.by_cidr.get(&sup).into_iter().flatten() {
                // A network contains all of `net` iff it contains `net` itself.
                if !block.except.iter().any(|e| e.contains(net)) {
                    atoms.push(*atom);
                }
            }
        }
        atoms.sort_unstable();
        atoms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build::cidr;

    #[test]
    fn classes_follow_cidrs_and_excepts() {
        let mut p = Prefixes::default();
        p.add_block(1, &cidr("10.0.0.0/8").except("10.1.0.0/16"));
        p.add_block(2, &cidr("10.1.2.0/24"));
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(p.class_net(ip("10.2.0.1")), net("10.0.0.0/8"));
        assert_eq!(p.atoms_of(&net("10.0.0.0/8")), [1]);
        assert_eq!(p.class_net(ip("10.1.0.1")), net("10.1.0.0/16"));
        assert!(p.atoms_of(&net("10.1.0.0/16")).is_empty());
        assert_eq!(p.atoms_of(&net("10.1.2.0/24")), [2]);
        assert_eq!(p.parent(&net("10.1.2.0/24")), Some(net("10.1.0.0/16")));
        assert_eq!(p.class_net(ip("fd00::1")), net("::/0"));

        p.remove_block(1, &cidr("10.0.0.0/8").except("10.1.0.0/16"));
        p.drop_unused();
        assert_eq!(p.class_net(ip("10.2.0.1")), net("0.0.0.0/0"));
        assert_eq!(p.parent(&net("10.1.2.0/24")), Some(net("0.0.0.0/0")));
    }
}
