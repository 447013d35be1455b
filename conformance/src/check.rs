//! Turning what was observed (probes, test runs, the reference evaluator) into tables of the
//! expected table's shape, comparing, and describing mismatches.

use std::{convert::Infallible, net::IpAddr};

use netpol_agent::{
    compiler::{NodeInfo, reference},
    model::Cluster,
};
use netpol_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use netpol_lab::{Comparison, LabState, Protocol, TableKey, TruthTable};

/// The cells of `expected` that are judged: every cell but the diagonal (a pod to itself goes
/// over the pod's loopback and never crosses the datapath; upstream ignores it too).
pub fn judged(expected: &TruthTable) -> TruthTable {
    shaped(expected, |from, to| expected.get(from, to))
}

/// A table of `expected`'s shape whose judged cells are `cell(from, to)`.
pub fn shaped(
    expected: &TruthTable,
    mut cell: impl FnMut(&str, &str) -> Option<bool>,
) -> TruthTable {
    try_shaped(expected, |from, to| Ok::<_, Infallible>(cell(from, to)))
        .unwrap_or_else(|never| match never {})
}

/// [`shaped`] with a fallible `cell`: the first error ends it.
pub fn try_shaped<E>(
    expected: &TruthTable,
    mut cell: impl FnMut(&str, &str) -> Result<Option<bool>, E>,
) -> Result<TruthTable, E> {
    let mut table = TruthTable::empty(expected.clients(), expected.servers());
    for from in expected.clients() {
        for to in expected.servers() {
            if from != to
                && let Some(connected) = cell(from, to)?
            {
                table.set(from, to, connected);
            }
        }
    }
    Ok(table)
}

/// How many cells of `expected` are judged.
pub fn judged_cells(expected: &TruthTable) -> usize {
    let servers = expected.servers();
    expected
        .clients()
        .iter()
        .map(|c| servers.iter().filter(|s| *s != c).count())
        .sum()
}

/// Compares the judged cells of `expected` with `observed`.
pub fn compare(expected: &TruthTable, observed: &TruthTable) -> Comparison {
    judged(expected).compare(observed)
}

/// The IP protocol number of a protocol.
pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Sctp => PROTO_SCTP,
    }
}

/// Whether a new connection `from -> to` is allowed by the reference evaluator, with the
/// ClusterNetworkPolicy tiers (without any, exactly NetworkPolicy's answer).
pub fn reference_allows(
    cluster: &Cluster,
    nodes: &[NodeInfo],
    from: IpAddr,
    to: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    reference::allowed_with_tiers(cluster, nodes, from, to, proto_number(protocol), port)
}

/// What the reference evaluator says for every judged cell of `expected` under `key`.
pub fn reference_table(
    expected: &TruthTable,
    key: &TableKey,
    cluster: &Cluster,
    nodes: &[NodeInfo],
    lab: &LabState,
) -> TruthTable {
    shaped(expected, |from, to| {
        let (from, to) = (lab.pod_by_key(from)?, lab.pod_by_key(to)?);
        Some(reference_allows(
            cluster,
            nodes,
            from.ip(key.family),
            to.ip(key.family),
            key.protocol,
            key.port,
        ))
    })
}

/// `text`, every line indented by `n` spaces.
pub fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect::<String>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagonal_is_not_judged() {
        let expected: TruthTable = "
            -   x/a x/b
            x/a X   .
            x/b X   .
        "
        .parse()
        .expect("parses");
        let mut observed = TruthTable::empty(expected.clients(), expected.servers());
        observed.set("x/a", "x/b", true).set("x/b", "x/a", false);
        assert!(compare(&expected, &observed).is_match());
        observed.set("x/b", "x/a", true);
        let cmp = compare(&expected, &observed);
        assert_eq!(cmp.mismatches.len(), 1);
        assert_eq!(
            (
                cmp.mismatches[0].from.as_str(),
                cmp.mismatches[0].to.as_str()
            ),
            ("x/b", "x/a")
        );
    }
}
