//! The results of a run: one cell per (case, column), the expected-failures file that turns
//! known failures into `xfail`, the side-by-side table and `results.json`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::enforcer::{Column, Enforcer, parse_via, via_name};

/// What became of one case in one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every check held.
    Pass,
    /// A check did not hold (or the case could not run).
    Fail,
    /// Failed, as the expected-failures file (or, for `none`, the case's denials) says it must.
    Xfail,
    /// Listed as an expected failure, but passed: the list is out of date.
    Xpass,
    /// Nothing of the case could be checked in this column.
    Unsupported,
    /// The run stopped before the case.
    NotRun,
}

impl Verdict {
    pub const ALL: [Verdict; 6] = [
        Verdict::Pass,
        Verdict::Fail,
        Verdict::Xfail,
        Verdict::Xpass,
        Verdict::Unsupported,
        Verdict::NotRun,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Xfail => "xfail",
            Verdict::Xpass => "XPASS",
            Verdict::Unsupported => "unsupported",
            Verdict::NotRun => "not run",
        }
    }

    /// Whether it fails the run.
    pub fn is_bad(self) -> bool {
        matches!(self, Verdict::Fail | Verdict::Xpass | Verdict::NotRun)
    }
}

/// One cell of the table.
#[derive(Debug, Clone)]
pub struct Cell {
    pub verdict: Verdict,
    /// Why it is xfail, XPASS or unsupported.
    pub reason: Option<String>,
    /// One line per failed check.
    pub failures: Vec<String>,
    /// Checks of this column that were not made, and why (a `pass` with some is `pass*`).
    pub skipped: Vec<String>,
    /// Checks that do not apply to this column, and why.
    pub notes: Vec<String>,
    pub seconds: f64,
}

impl Cell {
    pub fn new(verdict: Verdict, reason: Option<String>) -> Cell {
        Cell {
            verdict,
            reason,
            failures: Vec::new(),
            skipped: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        }
    }

    /// The table's word: `pass*` when some checks were skipped.
    pub fn label(&self) -> String {
        if self.verdict == Verdict::Pass && !self.skipped.is_empty() {
            "pass*".to_owned()
        } else {
            self.verdict.word().to_owned()
        }
    }
}

/// One column's results, a cell per case (in case order).
#[derive(Debug)]
pub struct ColumnResult {
    pub column: Column,
    /// Why nothing could run in this column (the enforcer is unsupported here).
    pub unsupported: Option<String>,
    /// Why the column stopped early or could not start.
    pub error: Option<String>,
    pub cells: Vec<Cell>,
    pub seconds: f64,
}

/// The expected-failures file: which cases fail in which columns, and why.
#[derive(Debug, Default)]
pub struct ExpectedFailures {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    enforcers: Vec<Enforcer>,
    vias: Vec<netpol_lab::Via>,
    cases: BTreeSet<String>,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    enforcer: OneOrMany,
    via: OneOrMany,
    reason: String,
    cases: Vec<String>,
}

impl ExpectedFailures {
    /// Reads the file (a YAML list of `{enforcer, via, reason, cases}`); a missing file is an
    /// empty list. Every case it names must exist in `known` and appear once per column.
    pub fn load(path: &Path, known: &BTreeSet<String>) -> Result<ExpectedFailures> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ExpectedFailures::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Self::parse(&text, known).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str, known: &BTreeSet<String>) -> Result<ExpectedFailures> {
        let docs: Option<Vec<EntryDoc>> = serde_yaml::from_str(text)?;
        let mut entries = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, doc) in docs.unwrap_or_default().into_iter().enumerate() {
            let enforcers = doc
                .enforcer
                .items()
                .into_iter()
                .map(str::parse)
                .collect::<Result<Vec<Enforcer>, String>>()
                .map_err(|e| anyhow::anyhow!("[{i}].enforcer: {e}"))?;
            let vias = doc
                .via
                .items()
                .into_iter()
                .map(parse_via)
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| anyhow::anyhow!("[{i}].via: {e}"))?;
            if doc.reason.trim().is_empty() {
                bail!("[{i}].reason: say why these cases fail");
            }
            for case in &doc.cases {
                if !known.contains(case) {
                    bail!("[{i}].cases: no case is named {case:?}");
                }
                for e in &enforcers {
                    for v in &vias {
                        if !seen.insert((*e, via_name(*v), case.clone())) {
                            bail!(
                                "[{i}].cases: {case} is listed twice for {e}/{}",
                                via_name(*v)
                            );
                        }
                    }
                }
            }
            entries.push(Entry {
                enforcers,
                vias,
                cases: doc.cases.into_iter().collect(),
                reason: doc.reason.trim().to_owned(),
            });
        }
        Ok(ExpectedFailures { entries })
    }

    /// Why `case` is expected to fail in `column`, if it is.
    pub fn reason(&self, column: Column, case: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| {
                e.enforcers.contains(&column.enforcer)
                    && e.vias.contains(&column.via)
                    && e.cases.contains(case)
            })
            .map(|e| e.reason.as_str())
    }
}

/// Everything a run found.
pub struct Report<'a> {
    /// Case names and the upstream tests they mirror, in run order.
    pub cases: Vec<(&'a str, Option<&'a str>)>,
    pub columns: Vec<ColumnResult>,
    /// Disagreements between the case files and the reference evaluator (case, summary).
    pub disagreements: Vec<(String, String)>,
    pub lab: String,
    pub proxy_mode: Option<String>,
    pub seconds: f64,
}

impl Report<'_> {
    /// Cells that fail the run.
    pub fn bad(&self) -> usize {
        self.columns
            .iter()
            .flat_map(|c| &c.cells)
            .filter(|c| c.verdict.is_bad())
            .count()
    }

    /// The side-by-side table: a row per case, a column per (enforcer, via), totals below.
    pub fn table(&self) -> String {
        let name_width = self
            .cases
            .iter()
            .map(|(n, _)| n.len())
            .chain(["totals".len()])
            .max()
            .unwrap_or(0);
        let widths: Vec<usize> = self
            .columns
            .iter()
            .map(|c| {
                c.column
                    .enforcer
                    .name()
                    .len()
                    .max(via_name(c.column.via).len() + "via ".len())
                    .max("unsupported".len())
            })
            .collect();
        let mut out = String::new();
        let row = |out: &mut String, first: &str, cells: Vec<String>| {
            let mut line = format!("{first:<name_width$}");
            for (cell, w) in cells.iter().zip(&widths) {
                let _ = write!(line, "  {cell:<w$}");
            }
            let _ = writeln!(out, "{}", line.trim_end());
        };
        row(
            &mut out,
            "",
            self.columns
                .iter()
                .map(|c| c.column.enforcer.name().to_owned())
                .collect(),
        );
        row(
            &mut out,
            "case",
            self.columns
                .iter()
                .map(|c| format!("via {}", via_name(c.column.via)))
                .collect(),
        );
        let rule = "-".repeat(name_width + widths.iter().map(|w| w + 2).sum::<usize>());
        let _ = writeln!(out, "{rule}");
        for (i, (name, _)) in self.cases.iter().enumerate() {
            row(
                &mut out,
                name,
                self.columns.iter().map(|c| c.cells[i].label()).collect(),
            );
        }
        let _ = writeln!(out, "{rule}");
        for verdict in Verdict::ALL {
            let counts: Vec<usize> = self
                .columns
                .iter()
                .map(|c| c.cells.iter().filter(|x| x.verdict == verdict).count())
                .collect();
            if verdict != Verdict::Pass && counts.iter().all(|n| *n == 0) {
                continue;
            }
            row(
                &mut out,
                verdict.word(),
                counts.iter().map(usize::to_string).collect(),
            );
        }
        row(
            &mut out,
            "seconds",
            self.columns
                .iter()
                .map(|c| format!("{:.0}", c.seconds))
                .collect(),
        );
        out
    }

    /// What the table's marks mean, and the reasons behind unsupported columns and cells.
    pub fn notes(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "pass: every check held; pass*: what could be checked held, some checks were not \
             made here (see results.json); FAIL: a check did not hold; xfail: failed as \
             expected; XPASS: listed as an expected failure but passed; unsupported: nothing \
             could be checked here"
        );
        for c in &self.columns {
            if let Some(reason) = &c.unsupported {
                let _ = writeln!(out, "{}: {reason}", c.column);
            }
            if let Some(error) = &c.error {
                let _ = writeln!(out, "{}: {}", c.column, first_line(error));
            }
            for verdict in [Verdict::Xfail, Verdict::Xpass, Verdict::Unsupported] {
                let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
                for x in &c.cells {
                    // Cells whose reason is the column's are told once, above.
                    if x.verdict == verdict
                        && let Some(r) = x.reason.as_deref()
                        && c.unsupported.as_deref() != Some(r)
                    {
                        *reasons.entry(r).or_default() += 1;
                    }
                }
                for (r, n) in reasons {
                    let _ = writeln!(out, "{}: {n} {}: {r}", c.column, verdict.word());
                }
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let columns: Vec<Value> = self
            .columns
            .iter()
            .map(|c| {
                let totals: serde_json::Map<String, Value> = Verdict::ALL
                    .iter()
                    .map(|v| {
                        (
                            v.word().to_lowercase().replace(' ', "_"),
                            json!(c.cells.iter().filter(|x| x.verdict == *v).count()),
                        )
                    })
                    .collect();
                json!({
                    "name": c.column.to_string(),
                    "enforcer": c.column.enforcer.name(),
                    "via": via_name(c.column.via),
                    "unsupported": c.unsupported,
                    "error": c.error,
                    "seconds": round(c.seconds),
                    "totals": totals,
                })
            })
            .collect();
        let cases: Vec<Value> = self
            .cases
            .iter()
            .enumerate()
            .map(|(i, (name, upstream))| {
                let cells: serde_json::Map<String, Value> = self
                    .columns
                    .iter()
                    .map(|c| {
                        let cell = &c.cells[i];
                        (
                            c.column.to_string(),
                            json!({
                                "result": cell.label(),
                                "reason": cell.reason,
                                "failures": cell.failures,
                                "skipped": cell.skipped,
                                "notes": cell.notes,
                                "seconds": round(cell.seconds),
                            }),
                        )
                    })
                    .collect();
                json!({ "name": name, "upstream": upstream, "cells": cells })
            })
            .collect();
        json!({
            "lab": self.lab,
            "proxy_mode": self.proxy_mode,
            "seconds": round(self.seconds),
            "passed": self.bad() == 0 && self.disagreements.is_empty(),
            "columns": columns,
            "cases": cases,
            "reference_disagreements": self
                .disagreements
                .iter()
                .map(|(case, summary)| json!({ "case": case, "summary": summary }))
                .collect::<Vec<_>>(),
        })
    }
}

fn round(seconds: f64) -> f64 {
    (seconds * 10.0).round() / 10.0
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use netpol_lab::Via;

    use super::*;

    fn known() -> BTreeSet<String> {
        ["a", "b", "c"].into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn expected_failures_name_columns_and_cases() {
        let text = "
- enforcer: [netpol, netpol-kube]
  via: service
  reason: egress is judged before DNAT
  cases: [a, b]
- enforcer: kube-network-policies
  via: [pod, service]
  reason: something else
  cases: [c]
";
        let x = ExpectedFailures::parse(text, &known()).expect("parses");
        let col = |enforcer, via| Column { enforcer, via };
        assert_eq!(
            x.reason(col(Enforcer::NetpolKube, Via::Service), "a"),
            Some("egress is judged before DNAT")
        );
        assert_eq!(x.reason(col(Enforcer::NetpolKube, Via::Pod), "a"), None);
        assert_eq!(x.reason(col(Enforcer::Netpol, Via::Service), "c"), None);
        assert_eq!(
            x.reason(col(Enforcer::KubeNetworkPolicies, Via::Pod), "c"),
            Some("something else")
        );
    }

    #[test]
    fn expected_failures_must_name_real_cases_once() {
        let unknown = "- {enforcer: netpol, via: pod, reason: r, cases: [zzz]}";
        let err = ExpectedFailures::parse(unknown, &known()).unwrap_err();
        assert!(err.to_string().contains("zzz"), "{err}");
        let twice = "
- {enforcer: netpol, via: pod, reason: r, cases: [a]}
- {enforcer: [netpol, none], via: pod, reason: r, cases: [a]}
";
        let err = ExpectedFailures::parse(twice, &known()).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let bad = "- {enforcer: calico, via: pod, reason: r, cases: [a]}";
        assert!(ExpectedFailures::parse(bad, &known()).is_err());
    }

    #[test]
    fn the_table_has_a_row_per_case_and_totals() {
        let column = |enforcer, via, verdicts: &[Verdict]| ColumnResult {
            column: Column { enforcer, via },
            unsupported: None,
            error: None,
            cells: verdicts.iter().map(|v| Cell::new(*v, None)).collect(),
            seconds: 12.0,
        };
        let report = Report {
            cases: vec![("first", None), ("second", None)],
            columns: vec![
                column(
                    Enforcer::NetpolKube,
                    Via::Pod,
                    &[Verdict::Pass, Verdict::Pass],
                ),
                column(
                    Enforcer::NetpolKube,
                    Via::Service,
                    &[Verdict::Pass, Verdict::Xfail],
                ),
            ],
            disagreements: Vec::new(),
            lab: "t".into(),
            proxy_mode: None,
            seconds: 1.0,
        };
        let table = report.table();
        assert!(table.contains("netpol-kube"), "{table}");
        assert!(table.contains("second"), "{table}");
        assert!(table.contains("xfail"), "{table}");
        let pass_row = table
            .lines()
            .find(|l| l.starts_with("pass"))
            .expect("totals");
        assert_eq!(
            pass_row.split_whitespace().collect::<Vec<_>>(),
            ["pass", "2", "1"]
        );
        assert_eq!(report.bad(), 0);
        assert_eq!(report.json()["columns"][1]["totals"]["xfail"], 1);
    }
}
