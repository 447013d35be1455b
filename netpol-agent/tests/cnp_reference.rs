//! The reference evaluator with the ClusterNetworkPolicy tiers, on the
//! upstream conformance world (sigs.k8s.io/network-policy-api
//! `conformance/base/manifests.yaml`: four houses, two pods each, with the
//! named ports `web` = TCP 80 and `dns` = UDP 53, and a host-networked pod
//! in the forbidden forest). Each test names the upstream scenario
//! (`ShortName` and `t.Run` text) it mirrors; the policies are the
//! upstream ones (`conformance/base/{admin,baseline}_tier/*.yaml`), written
//! with the fixture builders.

use std::net::IpAddr;

use netpol_agent::{
    compiler::{
        NodeInfo,
        reference::{AuditRule, Decision, allowed_with_tiers, decide, decide_audited},
    },
    model::{Action, Cluster, LabelSelector, Tier, build::*},
};
use netpol_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

const HOUSES: [(&str, &str, [&str; 2]); 4] = [
    ("gryffindor", "harry-potter", ["10.0.1.1", "10.0.1.2"]),
    ("slytherin", "draco-malfoy", ["10.0.2.1", "10.0.2.2"]),
    ("hufflepuff", "cedric-diggory", ["10.0.3.1", "10.0.3.2"]),
    ("ravenclaw", "luna-lovegood", ["10.0.4.1", "10.0.4.2"]),
];
const NODE_IP: &str = "192.168.0.1";
const OTHER_NODE_IP: &str = "192.168.0.2";

fn ns_name(house: &str) -> String {
    format!("network-policy-conformance-{house}")
}

/// The conformance world without policies.
fn hogwarts() -> Cluster {
    let mut c = cluster()
        .node(
            node("n1")
                .label("kubernetes.io/os", "linux")
                .address(NODE_IP),
        )
        .node(
            node("n2")
                .label("kubernetes.io/os", "windows")
                .address(OTHER_NODE_IP),
        )
        .namespace(
            namespace(&ns_name("forbidden-forrest"))
                .label("conformance-house", "forbidden-forrest"),
        )
        .pod(
            pod(&ns_name("forbidden-forrest"), "centaur-1")
                .labels([("conformance-house", "forbidden-forrest")])
                .host_network()
                .node("n1")
                .ip(NODE_IP),
        );
    for (house, who, ips) in HOUSES {
        let ns = ns_name(house);
        c = c.namespace(namespace(&ns).label("conformance-house", house));
        for (i, ip) in ips.iter().enumerate() {
            c = c.pod(
                pod(&ns, &format!("{who}-{i}"))
                    .labels([("conformance-house", house)])
                    .node("n1")
                    .ip(ip)
                    .named_port("web", Protocol::Tcp, 80)
                    .named_port("dns", Protocol::Udp, 53),
            );
        }
    }
    c
}

/// The address of `<who>-<i>` (e.g. `ip("harry-potter", 0)`).
fn ip(who: &str, i: usize) -> IpAddr {
    let (_, _, ips) = HOUSES
        .iter()
        .find(|(_, w, _)| *w == who)
        .unwrap_or_else(|| panic!("no pod {who}"));
    ips[i].parse().unwrap()
}

/// Selects the house's namespace by its `kubernetes.io/metadata.name`.
fn house(h: &str) -> LabelSelector {
    all().label("kubernetes.io/metadata.name", &ns_name(h))
}

/// Selects by the `conformance-house` label (namespaces and pods have it).
fn house_label(h: &str) -> LabelSelector {
    labels([("conformance-house", h)])
}

/// The node of the pods; its own address is exempt (kubelet probes).
fn local_node() -> Vec<NodeInfo> {
    vec![NodeInfo::new("n1", ["172.31.0.1"])]
}

fn poke(c: &Cluster, from: IpAddr, to: IpAddr, proto: u8, port: u16) -> bool {
    allowed_with_tiers(c, &local_node(), from, to, proto, port)
}

/// `ingress-tcp` (admin_tier/standard-ingress-tcp-rules.yaml), with its
/// rules in `order` (indexes into the upstream list).
fn ingress_tcp(order: [usize; 7]) -> Cluster {
    let rules = [
        accept()
            .named("allow-from-ravenclaw-everything")
            .peer(peer_namespaces(house("ravenclaw"))),
        deny()
            .named("deny-from-ravenclaw-everything")
            .peer(peer_namespaces(house("ravenclaw"))),
        pass()
            .named("pass-from-ravenclaw-everything")
            .peer(peer_namespaces(house("ravenclaw"))),
        deny()
            .named("deny-from-slytherin-at-port-80")
            .peer(peer_namespaces(house("slytherin")))
            .port(dport(Protocol::Tcp, 80)),
        pass()
            .named("pass-from-slytherin-at-port-80")
            .peer(peer_namespaces(house("slytherin")))
            .port(dport(Protocol::Tcp, 80)),
        accept()
            .named("allow-from-hufflepuff-at-port-80")
            .peer(peer_namespaces(house("hufflepuff")))
            .port(dport(Protocol::Tcp, 80)),
        deny()
            .named("deny-from-hufflepuff-everything-else")
            .peer(peer_namespaces(house("hufflepuff"))),
    ];
    let mut p = admin("ingress-tcp")
        .priority(3)
        .subject(in_namespaces(house("gryffindor")));
    for i in order {
        p = p.ingress(rules[i].clone());
    }
    hogwarts().cluster_policy(p)
}

const UPSTREAM_ORDER: [usize; 7] = [0, 1, 2, 3, 4, 5, 6];

#[test]
fn cnp_admin_tier_ingress_tcp_allow_respects_rule_order() {
    // CNPAdminTierIngressTCP: "Should support an 'allow-ingress' policy for
    // TCP protocol; ensure rule ordering is respected"
    let c = ingress_tcp(UPSTREAM_ORDER);
    let harry = ip("harry-potter", 0);
    assert!(poke(&c, ip("luna-lovegood", 0), harry, PROTO_TCP, 80));
    assert!(poke(&c, ip("luna-lovegood", 1), harry, PROTO_TCP, 8080));
    let (_, ingress) = decide(
        &c,
        &local_node(),
        ip("luna-lovegood", 0),
        harry,
        PROTO_TCP,
        80,
    );
    assert_eq!(
        ingress,
        Decision::Rule {
            tier: Tier::Admin,
            policy: "ingress-tcp".into(),
            index: 0,
            name: "allow-from-ravenclaw-everything".into(),
            action: Action::Accept,
        },
        "the first rule decides, and is named"
    );
}

#[test]
fn cnp_admin_tier_ingress_tcp_allow_at_the_specified_port() {
    // CNPAdminTierIngressTCP: "Should support an 'allow-ingress' policy for
    // TCP protocol at the specified port"
    let c = ingress_tcp(UPSTREAM_ORDER);
    let harry = ip("harry-potter", 1);
    assert!(poke(&c, ip("cedric-diggory", 0), harry, PROTO_TCP, 80));
    assert!(!poke(&c, ip("cedric-diggory", 1), harry, PROTO_TCP, 8080));
}

#[test]
fn cnp_admin_tier_ingress_tcp_deny_respects_rule_order() {
    // CNPAdminTierIngressTCP: "Should support an 'deny-ingress' policy for
    // TCP protocol; ensure rule ordering is respected" (rules 0 and 1 swapped)
    let c = ingress_tcp([1, 0, 2, 3, 4, 5, 6]);
    let harry = ip("harry-potter", 1);
    assert!(!poke(&c, ip("luna-lovegood", 0), harry, PROTO_TCP, 80));
    assert!(!poke(&c, ip("luna-lovegood", 1), harry, PROTO_TCP, 8080));
}

#[test]
fn cnp_admin_tier_ingress_tcp_deny_at_the_specified_port() {
    // CNPAdminTierIngressTCP: "Should support a 'deny-ingress' policy for TCP
    // protocol at the specified port"
    let c = ingress_tcp(UPSTREAM_ORDER);
    let harry = ip("harry-potter", 0);
    assert!(!poke(&c, ip("draco-malfoy", 0), harry, PROTO_TCP, 80));
    assert!(poke(&c, ip("draco-malfoy", 1), harry, PROTO_TCP, 8080));
    // Same port, other protocol: the tcp entry does not match.
    assert!(poke(&c, ip("draco-malfoy", 1), harry, PROTO_UDP, 80));
}

#[test]
fn cnp_admin_tier_ingress_tcp_pass_respects_rule_order() {
    // CNPAdminTierIngressTCP: "Should support an 'pass-ingress' policy for
    // TCP protocol; ensure rule ordering is respected" (rules 0 and 2
    // swapped): nothing below Admin selects harry-potter, so allowed.
    let c = ingress_tcp([2, 1, 0, 3, 4, 5, 6]);
    let harry = ip("harry-potter", 0);
    assert!(poke(&c, ip("luna-lovegood", 0), harry, PROTO_TCP, 80));
    assert!(poke(&c, ip("luna-lovegood", 1), harry, PROTO_TCP, 8080));
    let (_, ingress) = decide(
        &c,
        &local_node(),
        ip("luna-lovegood", 0),
        harry,
        PROTO_TCP,
        80,
    );
    assert_eq!(ingress, Decision::Default, "passed, not accepted");
}

#[test]
fn cnp_admin_tier_ingress_tcp_pass_at_the_specified_port() {
    // CNPAdminTierIngressTCP: "Should support a 'pass-ingress' policy for TCP
    // protocol at the specified port" (rules 3 and 4 swapped)
    let c = ingress_tcp([0, 1, 2, 4, 3, 5, 6]);
    let harry = ip("harry-potter", 0);
    assert!(poke(&c, ip("draco-malfoy", 0), harry, PROTO_TCP, 80));
    assert!(poke(&c, ip("draco-malfoy", 1), harry, PROTO_TCP, 8080));
}

#[test]
fn cnp_admin_tier_ingress_sctp_and_udp_are_their_own_protocols() {
    // CNPAdminTierIngressSCTP / CNPAdminTierIngressUDP: "... at the
    // specified port" (the same policy with sctp 9003 / udp 53 entries)
    let c = hogwarts().cluster_policy(
        admin("ingress-sctp")
            .priority(3)
            .subject(in_namespaces(house("gryffindor")))
            .ingress(
                deny()
                    .peer(peer_namespaces(house("slytherin")))
                    .port(dport(Protocol::Sctp, 9003))
                    .port(dport(Protocol::Udp, 53)),
            ),
    );
    let (draco, harry) = (ip("draco-malfoy", 0), ip("harry-potter", 0));
    assert!(!poke(&c, draco, harry, PROTO_SCTP, 9003));
    assert!(!poke(&c, draco, harry, PROTO_UDP, 53));
    assert!(poke(&c, draco, harry, PROTO_SCTP, 9005));
    assert!(poke(&c, draco, harry, PROTO_TCP, 9003));
    assert!(poke(&c, draco, harry, PROTO_ICMP, 0), "ICMP has no port");
}

/// `priority-50-example`, `old-priority-60-new-priority-40-example` and the
/// baseline `default` (admin_tier/standard-priority-field.yaml).
fn priority_field(pass_priority: u32) -> Cluster {
    let gryffindor = pods_of(house_label("gryffindor"), house_label("gryffindor"));
    let slytherin = peer_pods(house_label("slytherin"), house_label("slytherin"));
    hogwarts()
        .cluster_policy(
            admin("priority-50-example")
                .priority(50)
                .subject(gryffindor.clone())
                .ingress(deny().peer(slytherin.clone()))
                .egress(deny().peer(slytherin.clone())),
        )
        .cluster_policy(
            admin("old-priority-60-new-priority-40-example")
                .priority(pass_priority)
                .subject(gryffindor.clone())
                .ingress(pass().peer(slytherin.clone()))
                .egress(pass().peer(slytherin.clone())),
        )
        .cluster_policy(
            baseline("default")
                .priority(10)
                .subject(gryffindor)
                .ingress(accept().peer(slytherin.clone()))
                .egress(accept().peer(slytherin)),
        )
}

#[test]
fn cnp_admin_tier_priority_field_lower_value_wins() {
    // CNPAdminTierPriorityField: "Should Deny traffic from slytherin to
    // gryffindor respecting admin CNP" and "... to slytherin from gryffindor"
    let c = priority_field(60);
    for i in 0..2 {
        let (draco, harry) = (ip("draco-malfoy", i), ip("harry-potter", i));
        assert!(!poke(&c, draco, harry, PROTO_TCP, 80), "ingress denied");
        assert!(!poke(&c, harry, draco, PROTO_TCP, 80), "egress denied");
    }
}

#[test]
fn cnp_admin_tier_priority_field_pass_goes_to_baseline() {
    // CNPAdminTierPriorityField: "Should respect admin CNP priority field;
    // thus passing both ingress and egress traffic over to baseline CNP"
    let c = priority_field(40);
    let (draco, harry) = (ip("draco-malfoy", 0), ip("harry-potter", 0));
    assert!(poke(&c, draco, harry, PROTO_TCP, 80));
    assert!(poke(&c, harry, draco, PROTO_TCP, 8080));
    let (egress, _) = decide(&c, &local_node(), harry, draco, PROTO_TCP, 80);
    assert!(
        matches!(&egress, Decision::Rule { tier: Tier::Baseline, policy, .. } if policy == "default"),
        "{egress:?}"
    );
}

/// `pass-example`, the NetworkPolicy and the baseline `default`
/// (api_integration/standard-anp-np-banp.yaml).
fn integration(admin_action: fn() -> netpol_agent::model::CnpRule, with_np: bool) -> Cluster {
    let mut c = hogwarts()
        .cluster_policy(
            admin("pass-example")
                .priority(10)
                .subject(in_namespaces(house_label("gryffindor")))
                .ingress(admin_action().peer(peer_namespaces(house_label("slytherin"))))
                .egress(admin_action().peer(peer_namespaces(house_label("slytherin")))),
        )
        .cluster_policy(
            baseline("default")
                .priority(10)
                .subject(in_namespaces(house_label("gryffindor")))
                .ingress(deny().peer(peer_namespaces(house_label("slytherin"))))
                .egress(deny().peer(peer_namespaces(house_label("slytherin")))),
        );
    if with_np {
        c = c.policy(
            policy(
                &ns_name("gryffindor"),
                "allow-gress-from-to-slytherin-to-gryffindor",
            )
            .ingress(allow().from(namespaces(house_label("slytherin"))))
            .egress(allow().to(namespaces(house_label("slytherin")))),
        );
    }
    c
}

#[test]
fn cnp_admin_tier_integration_admin_deny_overrides_network_policy() {
    // CNPAdminTierIntegration: "Should Deny traffic from slytherin to
    // gryffindor respecting admin CNP" / "... to slytherin from gryffindor"
    let c = integration(deny, true);
    let (draco, harry) = (ip("draco-malfoy", 0), ip("harry-potter", 0));
    assert!(!poke(&c, draco, harry, PROTO_TCP, 80));
    assert!(!poke(&c, harry, draco, PROTO_TCP, 80));
}

#[test]
fn cnp_admin_tier_integration_pass_respects_network_policy() {
    // CNPAdminTierIntegration: "Should support a 'pass-ingress' policy for
    // admin CNP and respect the match for network policy" (and pass-egress)
    let c = integration(pass, true);
    let (draco, harry) = (ip("draco-malfoy", 0), ip("harry-potter", 0));
    assert!(poke(&c, draco, harry, PROTO_TCP, 80), "NP allows slytherin");
    assert!(poke(&c, harry, draco, PROTO_UDP, 53));
    let (egress, ingress) = decide(&c, &local_node(), draco, harry, PROTO_TCP, 80);
    assert_eq!(egress, Decision::Default, "draco is not a subject");
    assert_eq!(ingress, Decision::NetworkPolicy { allowed: true });
    // The NetworkPolicy isolates harry: ravenclaw is not allowed, and the
    // baseline is never reached for an isolated pod.
    assert!(!poke(&c, ip("luna-lovegood", 0), harry, PROTO_TCP, 80));
}

#[test]
fn cnp_admin_tier_integration_pass_respects_baseline() {
    // CNPAdminTierIntegration: "Should support a 'pass-ingress' policy for
    // admin CNP and respect the match for baseline cluster network policy"
    // (and pass-egress): the NetworkPolicy is deleted, baseline denies.
    let c = integration(pass, false);
    let (draco, harry) = (ip("draco-malfoy", 0), ip("harry-potter", 0));
    assert!(!poke(&c, draco, harry, PROTO_TCP, 80));
    assert!(!poke(&c, harry, draco, PROTO_TCP, 80));
    // Other houses: nothing matches, allowed.
    assert!(poke(&c, ip("luna-lovegood", 0), harry, PROTO_TCP, 80));
}

#[test]
fn cnp_baseline_tier_pass_goes_to_the_default_allow() {
    // Pass in the Baseline tier (upstream ClusterNetworkPolicyRuleActionPass:
    // "continues processing in the next tier"): after Baseline comes the
    // default, allow; the later Deny in the same tier is skipped.
    let c = hogwarts()
        .cluster_policy(
            baseline("b1")
                .priority(1)
                .subject(in_namespaces(house_label("gryffindor")))
                .ingress(pass().peer(peer_namespaces(house_label("slytherin")))),
        )
        .cluster_policy(
            baseline("b2")
                .priority(2)
                .subject(in_namespaces(house_label("gryffindor")))
                .ingress(deny().peer(peer_namespaces(all()))),
        );
    let harry = ip("harry-potter", 0);
    assert!(poke(&c, ip("draco-malfoy", 0), harry, PROTO_TCP, 80));
    assert!(!poke(&c, ip("luna-lovegood", 0), harry, PROTO_TCP, 80));
}

/// `node-and-cidr-as-peers-example` (admin_tier/experimental-egress-selector-rules.yaml),
/// with host network ports 34345 (TCP) and 34347 (UDP).
fn node_and_cidr_peers() -> Cluster {
    hogwarts().cluster_policy(
        admin("node-and-cidr-as-peers-example")
            .priority(75)
            .subject(pods_of(
                house_label("gryffindor"),
                house_label("gryffindor"),
            ))
            .egress(
                accept()
                    .peer(peer_nodes(labels([("kubernetes.io/os", "linux")])))
                    .port(dport(Protocol::Tcp, 34345)),
            )
            .egress(
                pass()
                    .peer(peer_nodes(labels([("kubernetes.io/os", "linux")])))
                    .port(dport(Protocol::Udp, 34347)),
            )
            .egress(
                deny()
                    .peer(peer_pods(
                        house_label("slytherin"),
                        house_label("slytherin"),
                    ))
                    .peer(peer_nodes(labels([("kubernetes.io/os", "linux")])))
                    .peer(networks(["0.0.0.0/0", "::/0"])),
            ),
    )
}

#[test]
fn cnp_admin_tier_egress_node_peers() {
    // CNPAdminTierEgressNodePeers: "Should support an 'allow-egress' rule
    // policy for egress-node-peer", "a 'pass-egress' ...", "a 'deny-egress'
    // ...": centaur-1 is host-networked, so it is its node's address.
    let c = node_and_cidr_peers();
    let (harry, centaur) = (ip("harry-potter", 1), NODE_IP.parse().unwrap());
    assert!(poke(&c, harry, centaur, PROTO_TCP, 34345), "accepted");
    assert!(poke(&c, harry, centaur, PROTO_UDP, 34347), "passed");
    assert!(!poke(&c, harry, centaur, PROTO_TCP, 34346), "denied");
    // A node the selector does not match is still caught by 0.0.0.0/0.
    let windows: IpAddr = OTHER_NODE_IP.parse().unwrap();
    assert!(!poke(&c, harry, windows, PROTO_TCP, 34345));
}

#[test]
fn cnp_admin_tier_egress_inline_cidr_peers_match_pod_ips() {
    // CNPAdminTierEgressInlineCIDRPeers: "Should support a 'deny-egress' rule
    // policy for egress-cidr-peer": networks match pod IPs too.
    let c = node_and_cidr_peers();
    let harry = ip("harry-potter", 0);
    assert!(!poke(&c, harry, ip("luna-lovegood", 0), PROTO_TCP, 80));
    assert!(!poke(&c, harry, "8.8.8.8".parse().unwrap(), PROTO_UDP, 53));
    // "Should support an 'allow-egress' rule policy for egress-cidr-peer":
    // an earlier Accept of a CIDR lets it through.
    let c = hogwarts().cluster_policy(
        admin("cidr")
            .priority(1)
            .subject(in_namespaces(house_label("gryffindor")))
            .egress(accept().peer(networks(["10.0.4.0/24"])))
            .egress(deny().peer(networks(["0.0.0.0/0"]))),
    );
    assert!(poke(&c, harry, ip("luna-lovegood", 0), PROTO_TCP, 80));
    assert!(!poke(&c, harry, ip("cedric-diggory", 0), PROTO_TCP, 80));
}

#[test]
fn cnp_named_ports_resolve_on_the_destination_pod() {
    // CNPAdminTierEgressNamedPort / CNPAdminTierIngressNamedPort: "Should
    // support an 'allow-egress' policy for named port" (web = TCP 80)
    let c = hogwarts().cluster_policy(
        admin("named")
            .priority(1)
            .subject(in_namespaces(house_label("gryffindor")))
            .egress(
                accept()
                    .peer(peer_namespaces(house_label("hufflepuff")))
                    .port(named_dport("web")),
            )
            .egress(deny().peer(peer_namespaces(house_label("hufflepuff"))))
            .ingress(
                accept()
                    .peer(peer_namespaces(house_label("hufflepuff")))
                    .port(named_dport("dns")),
            )
            .ingress(deny().peer(peer_namespaces(house_label("hufflepuff")))),
    );
    let (harry, cedric) = (ip("harry-potter", 0), ip("cedric-diggory", 1));
    assert!(poke(&c, harry, cedric, PROTO_TCP, 80));
    assert!(!poke(&c, harry, cedric, PROTO_TCP, 8080));
    assert!(!poke(&c, harry, cedric, PROTO_UDP, 80), "web is TCP");
    assert!(poke(&c, cedric, harry, PROTO_UDP, 53));
    assert!(!poke(&c, cedric, harry, PROTO_TCP, 53), "dns is UDP");
}

#[test]
fn host_network_pods_are_never_subjects() {
    // Upstream ClusterNetworkPolicySubject: "host-networked pods are not
    // included in subject selection".
    let c = hogwarts().cluster_policy(
        admin("deny-everything")
            .priority(0)
            .subject(in_namespaces(all()))
            .egress(deny().peer(networks(["0.0.0.0/0"]))),
    );
    let centaur: IpAddr = NODE_IP.parse().unwrap();
    assert!(poke(
        &c,
        centaur,
        "8.8.8.8".parse().unwrap(),
        PROTO_TCP,
        443
    ));
    assert!(!poke(
        &c,
        ip("harry-potter", 0),
        "8.8.8.8".parse().unwrap(),
        PROTO_TCP,
        443
    ));
}

#[test]
fn own_node_traffic_stays_allowed() {
    // Kubelet probes, as for NetworkPolicy: the tiers do not judge them.
    let c = hogwarts().cluster_policy(
        admin("deny-everything")
            .priority(0)
            .subject(in_namespaces(all()))
            .ingress(deny().peer(netpol_agent::model::CnpPeer::Everything)),
    );
    let harry = ip("harry-potter", 0);
    assert!(poke(
        &c,
        "172.31.0.1".parse().unwrap(),
        harry,
        PROTO_TCP,
        8080
    ));
    assert!(!poke(&c, ip("draco-malfoy", 0), harry, PROTO_TCP, 8080));
}

// ---------------------------------------------------------------------------
// Audited policies (`netpol.dev/audit: "true"` on the ClusterNetworkPolicy):
// not upstream; the semantics are netpol's (`compiler::reference` docs).
// ---------------------------------------------------------------------------

/// `ingress-tcp` with the given rule order, audited.
fn audited_ingress_tcp(order: [usize; 7]) -> Cluster {
    let mut c = ingress_tcp(order);
    let p = c
        .cluster_policies
        .get_mut("ingress-tcp")
        .expect("ingress-tcp");
    p.audit = true;
    c
}

fn audit_rule(policy: &str, index: usize, name: &str, tier: Tier) -> Option<AuditRule> {
    Some(AuditRule {
        tier,
        policy: policy.into(),
        index,
        name: name.into(),
    })
}

#[test]
fn an_audited_deny_steps_aside_for_the_next_rule_and_names_itself() {
    // Deny from ravenclaw first, then Accept from ravenclaw: audited, the
    // Accept decides, and the Deny is the audit rule.
    let c = audited_ingress_tcp([1, 0, 2, 3, 4, 5, 6]);
    let (luna, harry) = (ip("luna-lovegood", 0), ip("harry-potter", 0));
    let (_, ingress) = decide_audited(&c, &local_node(), luna, harry, PROTO_TCP, 80);
    assert_eq!(
        ingress,
        (
            Decision::Rule {
                tier: Tier::Admin,
                policy: "ingress-tcp".into(),
                index: 1,
                name: "allow-from-ravenclaw-everything".into(),
                action: Action::Accept,
            },
            audit_rule(
                "ingress-tcp",
                0,
                "deny-from-ravenclaw-everything",
                Tier::Admin
            )
        )
    );
    // The same policy enforced: the Deny decides, nothing is audited.
    let enforced = ingress_tcp([1, 0, 2, 3, 4, 5, 6]);
    let (_, ingress) = decide_audited(&enforced, &local_node(), luna, harry, PROTO_TCP, 80);
    assert!(matches!(
        ingress,
        (
            Decision::Rule {
                action: Action::Deny,
                index: 0,
                ..
            },
            None
        )
    ));
}

#[test]
fn an_audited_deny_with_nothing_after_it_leaves_the_default() {
    // Slytherin at 80: deny (audited), then Pass (enforced): no tier
    // decides, nothing isolates: allowed by default, audited by the deny.
    let c = audited_ingress_tcp([3, 4, 0, 1, 2, 5, 6]);
    let (draco, harry) = (ip("draco-malfoy", 0), ip("harry-potter", 0));
    let (_, ingress) = decide_audited(&c, &local_node(), draco, harry, PROTO_TCP, 80);
    assert_eq!(
        ingress,
        (
            Decision::Default,
            audit_rule(
                "ingress-tcp",
                0,
                "deny-from-slytherin-at-port-80",
                Tier::Admin
            )
        )
    );
    assert!(poke(&c, draco, harry, PROTO_TCP, 80));
    // Another port: the rule does not match, nothing to audit.
    let (_, ingress) = decide_audited(&c, &local_node(), draco, harry, PROTO_TCP, 81);
    assert_eq!(ingress, (Decision::Default, None));
}

#[test]
fn a_flow_denied_anyway_is_denied_and_not_audited() {
    // Hufflepuff on 81: its only matching rule is a Deny; audited, a
    // Baseline Deny below decides: denied, and no audit rule (the report
    // names the Baseline rule).
    let c = audited_ingress_tcp([0, 1, 2, 3, 4, 5, 6]).cluster_policy(
        baseline("floor")
            .subject(in_namespaces(house("gryffindor")))
            .ingress(
                deny()
                    .named("no-hufflepuff")
                    .peer(peer_namespaces(house("hufflepuff"))),
            ),
    );
    let (cedric, harry) = (ip("cedric-diggory", 0), ip("harry-potter", 0));
    let (_, ingress) = decide_audited(&c, &local_node(), cedric, harry, PROTO_TCP, 81);
    assert!(
        matches!(
            &ingress,
            (Decision::Rule { tier: Tier::Baseline, policy, action: Action::Deny, .. }, None)
                if policy == "floor"
        ),
        "{ingress:?}"
    );
    assert!(!poke(&c, cedric, harry, PROTO_TCP, 81));
    // Its Accept on 80 is enforced as usual (audit only touches Deny).
    assert!(poke(&c, cedric, harry, PROTO_TCP, 80));
}
