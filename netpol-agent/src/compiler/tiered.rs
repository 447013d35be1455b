//! The datapath maps of a node while any ClusterNetworkPolicy exists: the
//! tier table ([`super::tiers`]) written as policy entries that carry the
//! final verdict of the tiers and NetworkPolicy together.
//!
//! * **Identities.** One per peer class of the table (`class + 1`: 0 is
//!   [`IDENTITY_ANY`](netpol_common::IDENTITY_ANY)); a pod IP's peer entry
//!   has no distinct `cidr_identity`, so the datapath asks one identity.
//!   Peer entries: every net of the table (both /0 among them) and every
//!   live pod IP; flags as in the NetworkPolicy compile (`PEER_F_HOST` for
//!   this node's addresses, `PEER_F_POD` for pod IPs).
//! * **Policy sets.** One per (ingress subject class, egress subject class)
//!   pair of the local pods. A direction that an Admin or Baseline policy
//!   or an isolating NetworkPolicy judges gets `EP_F_*_ISOLATED` and, per
//!   peer identity, entries covering every protocol and port: TCP, UDP and
//!   SCTP as disjoint port prefixes, every other protocol one any-protocol
//!   entry (prefix 72). Each says allow or deny ([`ACTION_DENY`]) and names
//!   the deciding rule (a CNP rule, the first allowing NetworkPolicy rule,
//!   or 0: NetworkPolicy's default deny, or no tier decided: allow). A
//!   range that an audited policy's Deny rule would have denied and the
//!   tiers allow without it is [`ACTION_AUDIT`] naming that rule: the
//!   datapath passes it and reports `audit` (precomputed here, so the
//!   verdict costs the same lookups). A
//!   direction nothing judges is not isolated: allowed without a lookup.
//!   The verdict costs the same lookups as NetworkPolicy's, whatever the
//!   number of policies.
//! * **Cost.** Each flush with a change builds the table for the local
//!   pods again and the diff against the previous maps is what is written;
//!   with a [`TierCache`] ([`Compiler::compile_tiered_with`]) the decisions
//!   of classes seen before are reused, so a change that makes no new class
//!   evaluates no rule (classing and writing stay linear in the cluster). Rule ids are stable (CNP rules take
//!   theirs from the compiler's rule id allocator); policy set and identity
//!   ids are the table's class numbers and may move between compiles (every
//!   epoch holds a complete state, so this costs writes, not correctness).

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use netpol_common::{
    ACTION_AUDIT, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED,
    PEER_F_HOST, PEER_F_POD, POLICY_PREFIX_ANY_PROTO, PeerValue, PolicyKey, PolicyValue,
};

use super::{
    ClusterRuleInfo, Compiled, Compiler, IdentityInfo, Maps, PolicySetInfo, RuleInfo,
    reference::Decision,
    tiers::{PORTLESS, TierCache, compile_tiers_local_cached},
};
use crate::model::{Action, Cluster};

impl Compiler {
    /// The cluster as held, as a [`Cluster`].
    fn cluster_snapshot(&self) -> Cluster {
        let mut c = Cluster::default();
        for ns in self.namespaces.values() {
            c.upsert_namespace(ns.clone());
        }
        for pref in self.pods.refs() {
            if let Some(p) = self.pods.get(pref) {
                c.upsert_pod(p.clone());
            }
        }
        for p in self.policies.values() {
            c.upsert_policy(p.clone());
        }
        for p in self.cluster_policies.values() {
            c.upsert_cluster_policy(p.clone());
        }
        for n in self.nodes.values() {
            c.upsert_node(n.clone());
        }
        c
    }

    /// The stable id of a CNP rule.
    fn cnp_rule_id(&mut self, policy: &str, direction: u8, index: u32) -> u32 {
        let alloc = &mut self.rule_alloc;
        *self
            .cnp_rule_ids
            .entry((policy.to_string(), direction, index))
            .or_insert_with(|| alloc.next())
    }

    /// The maps for the current state with the tiers (see the module docs),
    /// reusing the decisions of earlier compiles that `cache` holds (see
    /// [`TierCache`]; the compiler keeps one while any CNP exists): a change
    /// that makes no new subject or peer class evaluates no rule. The output
    /// is the same as with an empty cache. `self.out` (the NetworkPolicy
    /// compile, already flushed) gives the endpoints (ids, addresses, flags
    /// other than isolation), the local IPs and the NetworkPolicy rule ids.
    pub(super) fn compile_tiered_with(&mut self, cache: &mut TierCache) -> Compiled {
        let cluster = self.cluster_snapshot();
        let table = compile_tiers_local_cached(&cluster, &self.node, cache);
        let base = &self.out;

        // Rule ids: NetworkPolicy rules keep the NetworkPolicy compile's,
        // CNP rules get stable ones (forgotten when their policy goes).
        let np_ids: HashMap<(String, String, u8, u32), u32> = base
            .rules
            .iter()
            .map(|(id, r)| {
                (
                    (r.namespace.clone(), r.policy.clone(), r.direction, r.index),
                    *id,
                )
            })
            .collect();
        let mut rules = base.rules.clone();
        let cnps: Vec<_> = self.cluster_policies.values().cloned().collect();
        self.cnp_rule_ids.retain(|(name, dir, index), _| {
            cnps.iter()
                .any(|c| &c.name == name && (*index as usize) < c.rules(*dir).len())
        });
        for cnp in &cnps {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for (index, rule) in cnp.rules(dir).iter().enumerate() {
                    let id = self.cnp_rule_id(&cnp.name, dir, index as u32);
                    rules.insert(
                        id,
                        RuleInfo {
                            namespace: String::new(),
                            policy: cnp.name.clone(),
                            direction: dir,
                            index: index as u32,
                            cluster: Some(ClusterRuleInfo {
                                tier: cnp.tier,
                                name: rule.name.clone(),
                                action: rule.action,
                            }),
                        },
                    );
                }
            }
        }
        let cnp_ids: HashMap<(String, u8, u32), u32> = self.cnp_rule_ids.clone();
        let base = &self.out;

        // Endpoints and policy sets.
        let mut maps = Maps::default();
        let mut set_ids: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        let mut policy_sets = BTreeMap::new();
        for (pod, ep) in &base.maps.endpoints {
            let mut ep = *ep;
            ep.flags &= !(EP_F_INGRESS_ISOLATED | EP_F_EGRESS_ISOLATED);
            match (
                table.subject_class(DIR_INGRESS, pod),
                table.subject_class(DIR_EGRESS, pod),
            ) {
                (Some(i), Some(e)) => {
                    let next = set_ids.len() as u32 + 1;
                    let id = *set_ids.entry((i, e)).or_insert(next);
                    ep.policy_id = id;
                    if table.judged(i) {
                        ep.flags |= EP_F_INGRESS_ISOLATED;
                    }
                    if table.judged(e) {
                        ep.flags |= EP_F_EGRESS_ISOLATED;
                    }
                    policy_sets.entry(id).or_insert_with(|| {
                        base.policy_sets
                            .get(&base.maps.endpoints[pod].policy_id)
                            .cloned()
                            .unwrap_or_else(PolicySetInfo::default)
                    });
                }
                // An endpoint the table has no subject for (cannot happen:
                // both take the live pods of this node): fail closed, judged
                // with no entries.
                _ => {
                    ep.policy_id = 0;
                    ep.flags |= EP_F_INGRESS_ISOLATED | EP_F_EGRESS_ISOLATED;
                }
            }
            maps.endpoints.insert(pod.clone(), ep);
        }

        // Peers.
        let mut identities: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
        let host_flags = |ip| {
            if self.node.addresses.contains(&ip) {
                PEER_F_HOST
            } else {
                0
            }
        };
        let put = |maps: &mut Maps, net: IpNet, v: PeerValue| match net {
            IpNet::V4(n) => {
                maps.peers_v4.insert((n.network(), n.prefix_len()), v);
            }
            IpNet::V6(n) => {
                maps.peers_v6.insert((n.network(), n.prefix_len()), v);
            }
        };
        for (net, class) in table.net_classes() {
            let id = class + 1;
            let flags = if net.prefix_len() == net.max_prefix_len() {
                host_flags(net.addr())
            } else {
                0
            };
            put(&mut maps, *net, PeerValue::new(id, flags));
            let info = identities.entry(id).or_default();
            info.address = true;
            info.prefixes.insert(*net);
            if flags & PEER_F_HOST != 0 {
                info.node_addresses.insert(net.addr());
            }
        }
        for (ip, class) in table.ip_classes() {
            let id = class + 1;
            let flags = PEER_F_POD | host_flags(*ip);
            put(&mut maps, IpNet::from(*ip), PeerValue::new(id, flags));
            identities.entry(id).or_default().pod_ips += 1;
        }

        // Policy entries, for the judged directions of the local sets.
        let mut sets_of: BTreeMap<(u8, u32), Vec<u32>> = BTreeMap::new();
        for (&(i, e), &id) in &set_ids {
            if table.judged(i) {
                sets_of.entry((DIR_INGRESS, i)).or_default().push(id);
            }
            if table.judged(e) {
                sets_of.entry((DIR_EGRESS, e)).or_default().push(id);
            }
        }
        for (&(dir, subject, peer, proto), ranges) in &table.entries {
            let Some(sets) = sets_of.get(&(dir, subject)) else {
                continue;
            };
            for r in ranges {
                let value = match (&r.decision, &r.audit) {
                    // Allowed, but an audited policy's Deny rule would have
                    // denied it: the entry names that rule.
                    (d, Some(a)) if d.allowed() => PolicyValue {
                        action: ACTION_AUDIT,
                        rule_id: cnp_ids[&(a.policy.clone(), dir, a.index as u32)],
                    },
                    (d, _) => match d {
                        Decision::Rule {
                            policy,
                            index,
                            action,
                            ..
                        } => {
                            let id = cnp_ids[&(policy.clone(), dir, *index as u32)];
                            if *action == Action::Accept {
                                PolicyValue::allow(id)
                            } else {
                                PolicyValue::deny(id)
                            }
                        }
                        Decision::NetworkPolicy { allowed: true } => {
                            let id = r.np_rule.as_ref().and_then(|(p, index)| {
                                np_ids
                                    .get(&(p.namespace.clone(), p.name.clone(), dir, *index as u32))
                                    .copied()
                            });
                            PolicyValue::allow(id.unwrap_or(0))
                        }
                        Decision::NetworkPolicy { allowed: false } => PolicyValue::deny(0),
                        Decision::Default | Decision::OwnNode => PolicyValue::allow(0),
                    },
                };
                let prefixes: Vec<(u8, u16, u32)> = if proto == PORTLESS {
                    // Port-less protocols: one range, every other protocol.
                    debug_assert_eq!((r.start, r.end), (0, u16::MAX));
                    vec![(0, 0, POLICY_PREFIX_ANY_PROTO)]
                } else {
                    super::ports::port_prefixes(r.start, r.end)
                        .into_iter()
                        .map(|(first, len)| (proto, first, len))
                        .collect()
                };
                for &set in sets {
                    for &(proto, first, len) in &prefixes {
                        maps.policy.insert(
                            (PolicyKey::new(set, peer + 1, dir, proto, first), len),
                            value,
                        );
                    }
                }
            }
        }

        Compiled {
            node: base.node.clone(),
            maps,
            rules,
            policy_sets,
            identities,
            local_ips: base.local_ips.clone(),
        }
    }
}
