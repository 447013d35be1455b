//! Truth tables in the style of the Kubernetes e2e netpol tests (`reachability.go`): a header row
//! of server pods, one row per client pod, `.` connected and `X` blocked (tab-separated when
//! rendered; any whitespace separates when parsed):
//!
//! ```text
//! -    x/a  x/b
//! x/a  .    X
//! x/b  .    .
//! ```
//!
//! Tables can be built in code ([`TruthTable::new`], [`TruthTable::set`], ...) or parsed from
//! that text ([`str::parse`]), and compared: [`TruthTable::compare`] lists every cell where the
//! observed table differs from the expected one.

use std::{collections::BTreeMap, fmt, str::FromStr};

/// Cell text for a connected pair.
pub const CONNECTED: char = '.';
/// Cell text for a blocked pair.
pub const BLOCKED: char = 'X';
/// Cell text for a pair that was not probed.
pub const UNKNOWN: char = '?';

/// Which client pods reach which server pods (pods named `namespace/name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthTable {
    clients: Vec<String>,
    servers: Vec<String>,
    cells: BTreeMap<(String, String), bool>,
}

impl TruthTable {
    /// A table with every cell set to `connected`.
    pub fn new<C, S>(clients: &[C], servers: &[S], connected: bool) -> Self
    where
        C: AsRef<str>,
        S: AsRef<str>,
    {
        let clients: Vec<String> = clients.iter().map(|c| c.as_ref().to_owned()).collect();
        let servers: Vec<String> = servers.iter().map(|s| s.as_ref().to_owned()).collect();
        let cells = clients
            .iter()
            .flat_map(|c| {
                servers
                    .iter()
                    .map(move |s| ((c.clone(), s.clone()), connected))
            })
            .collect();
        TruthTable {
            clients,
            servers,
            cells,
        }
    }

    /// A table with no cell set (rendered `?`), to be filled with [`TruthTable::set`].
    pub fn empty<C, S>(clients: &[C], servers: &[S]) -> Self
    where
        C: AsRef<str>,
        S: AsRef<str>,
    {
        let mut table = Self::new(clients, servers, false);
        table.cells.clear();
        table
    }

    /// Client pods (rows), in order.
    pub fn clients(&self) -> &[String] {
        &self.clients
    }

    /// Server pods (columns), in order.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Whether `from` reaches `to`; `None` if the cell is not set.
    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.cells.get(&(from.to_owned(), to.to_owned())).copied()
    }

    /// Sets one cell. Pods that are not yet rows/columns are added.
    pub fn set(&mut self, from: &str, to: &str, connected: bool) -> &mut Self {
        if !self.clients.iter().any(|c| c == from) {
            self.clients.push(from.to_owned());
        }
        if !self.servers.iter().any(|s| s == to) {
            self.servers.push(to.to_owned());
        }
        self.cells
            .insert((from.to_owned(), to.to_owned()), connected);
        self
    }

    /// Sets every cell of a row: what `from` reaches.
    pub fn set_from(&mut self, from: &str, connected: bool) -> &mut Self {
        for to in self.servers.clone() {
            self.set(from, &to, connected);
        }
        self
    }

    /// Sets every cell of a column: who reaches `to`.
    pub fn set_to(&mut self, to: &str, connected: bool) -> &mut Self {
        for from in self.clients.clone() {
            self.set(&from, to, connected);
        }
        self
    }

    /// Sets every cell.
    pub fn set_all(&mut self, connected: bool) -> &mut Self {
        for from in self.clients.clone() {
            self.set_from(&from, connected);
        }
        self
    }

    /// Number of connected cells.
    pub fn connected_count(&self) -> usize {
        self.cells.values().filter(|&&c| c).count()
    }

    /// The table as text: tab-separated, header row of servers, `.`/`X`/`?` cells.
    pub fn render(&self) -> String {
        self.render_with(|from, to| match self.get(from, to) {
            Some(true) => CONNECTED,
            Some(false) => BLOCKED,
            None => UNKNOWN,
        })
    }

    fn render_with(&self, cell: impl Fn(&str, &str) -> char) -> String {
        let mut out = String::from("-");
        for server in &self.servers {
            out.push('\t');
            out.push_str(server);
        }
        out.push('\n');
        for client in &self.clients {
            out.push_str(client);
            for server in &self.servers {
                out.push('\t');
                out.push(cell(client, server));
            }
            out.push('\n');
        }
        out
    }

    /// Compares `self` (expected) with `actual` (observed), cell by cell over the union of both
    /// tables' pods.
    pub fn compare(&self, actual: &TruthTable) -> Comparison {
        let mut clients = self.clients.clone();
        clients.extend(
            actual
                .clients
                .iter()
                .filter(|c| !self.clients.contains(c))
                .cloned(),
        );
        let mut servers = self.servers.clone();
        servers.extend(
            actual
                .servers
                .iter()
                .filter(|s| !self.servers.contains(s))
                .cloned(),
        );
        let mut mismatches = Vec::new();
        for from in &clients {
            for to in &servers {
                let (expected, observed) = (self.get(from, to), actual.get(from, to));
                if expected != observed {
                    mismatches.push(Mismatch {
                        from: from.clone(),
                        to: to.clone(),
                        expected,
                        actual: observed,
                    });
                }
            }
        }
        Comparison {
            expected: self.clone(),
            actual: actual.clone(),
            clients,
            servers,
            mismatches,
        }
    }
}

impl fmt::Display for TruthTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// A table text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("truth table line {line}: {message}")]
pub struct ParseTableError {
    pub line: usize,
    pub message: String,
}

impl FromStr for TruthTable {
    type Err = ParseTableError;

    /// Parses the rendered form. Cells and names are separated by any whitespace; blank lines
    /// are skipped; the first non-blank line is the header and must start with `-`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let err = |line, message: String| ParseTableError { line, message };
        let (line, header) = lines
            .next()
            .ok_or_else(|| err(1, "no header row".to_owned()))?;
        let mut header = header.split_whitespace();
        if header.next() != Some("-") {
            return Err(err(line, "the header row must start with '-'".to_owned()));
        }
        let servers: Vec<&str> = header.collect();
        let mut table = TruthTable::empty::<&str, &str>(&[], &servers);
        for (line, row) in lines {
            let mut fields = row.split_whitespace();
            let client = fields.next().expect("non-blank line has a field");
            let cells: Vec<&str> = fields.collect();
            if cells.len() != servers.len() {
                return Err(err(
                    line,
                    format!("{} cells for {} servers", cells.len(), servers.len()),
                ));
            }
            table.clients.push(client.to_owned());
            for (server, cell) in servers.iter().zip(cells) {
                let connected = match cell {
                    "." => true,
                    "X" | "x" => false,
                    "?" => continue,
                    other => return Err(err(line, format!("bad cell {other:?} (use . or X)"))),
                };
                table.set(client, server, connected);
            }
        }
        Ok(table)
    }
}

/// A cell where the observed table differs from the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub from: String,
    pub to: String,
    pub expected: Option<bool>,
    pub actual: Option<bool>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |c: Option<bool>| match c {
            Some(true) => "connected",
            Some(false) => "blocked",
            None => "not probed",
        };
        write!(
            f,
            "{} -> {}: expected {}, observed {}",
            self.from,
            self.to,
            word(self.expected),
            word(self.actual)
        )
    }
}

/// The result of [`TruthTable::compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    pub expected: TruthTable,
    pub actual: TruthTable,
    clients: Vec<String>,
    servers: Vec<String>,
    pub mismatches: Vec<Mismatch>,
}

impl Comparison {
    /// True when every cell is as expected.
    pub fn is_match(&self) -> bool {
        self.mismatches.is_empty()
    }

    /// Expected, observed, and a comparison grid (`.` as expected, `X` mismatch), then one line
    /// per mismatch: what upstream e2e prints when a reachability check fails.
    pub fn render(&self) -> String {
        let grid = TruthTable {
            clients: self.clients.clone(),
            servers: self.servers.clone(),
            cells: BTreeMap::new(),
        };
        let diff = grid.render_with(|from, to| {
            let mismatch = self.mismatches.iter().any(|m| m.from == from && m.to == to);
            if mismatch { BLOCKED } else { CONNECTED }
        });
        let mut out = format!(
            "expected:\n{}\nobserved:\n{}\ncomparison ({} of {} cells wrong):\n{}",
            self.expected.render(),
            self.actual.render(),
            self.mismatches.len(),
            self.clients.len() * self.servers.len(),
            diff
        );
        for mismatch in &self.mismatches {
            out.push_str(&format!("{mismatch}\n"));
        }
        out
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: [&str; 3] = ["x/a", "x/b", "y/a"];

    #[test]
    fn renders_like_upstream() {
        let mut table = TruthTable::new(&PODS, &PODS, true);
        table.set("x/a", "x/b", false).set_to("y/a", false);
        assert_eq!(
            table.render(),
            "-\tx/a\tx/b\ty/a\n\
             x/a\t.\tX\tX\n\
             x/b\t.\t.\tX\n\
             y/a\t.\t.\tX\n"
        );
        assert_eq!(table.connected_count(), 5);
    }

    #[test]
    fn unset_cells_render_as_question_marks() {
        let mut table = TruthTable::empty(&PODS[..2], &PODS[..1]);
        table.set("x/a", "x/a", true);
        assert_eq!(table.render(), "-\tx/a\nx/a\t.\nx/b\t?\n");
    }

    #[test]
    fn parse_round_trips() {
        let mut table = TruthTable::new(&PODS, &PODS, false);
        table.set_from("x/b", true);
        let parsed: TruthTable = table.render().parse().expect("parses");
        assert_eq!(parsed, table);
        let spaced: TruthTable = "
            -   x/a x/b y/a
            x/a X   X   X
            x/b .   .   .
            y/a X   X   X
        "
        .parse()
        .expect("parses");
        assert_eq!(spaced, table);
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = "-\tx/a\nx/a\t.\t.\n".parse::<TruthTable>().unwrap_err();
        assert_eq!(e.line, 2);
        let e = "x/a\t.\n".parse::<TruthTable>().unwrap_err();
        assert_eq!(e.line, 1);
        let e = "-\tx/a\nx/a\tY\n".parse::<TruthTable>().unwrap_err();
        assert!(e.message.contains("bad cell"), "{e}");
    }

    #[test]
    fn compare_lists_mismatches() {
        let expected = TruthTable::new(&PODS, &PODS, true);
        let mut actual = expected.clone();
        assert!(expected.compare(&actual).is_match());
        actual.set("y/a", "x/a", false);
        let cmp = expected.compare(&actual);
        assert!(!cmp.is_match());
        assert_eq!(
            cmp.mismatches,
            vec![Mismatch {
                from: "y/a".into(),
                to: "x/a".into(),
                expected: Some(true),
                actual: Some(false)
            }]
        );
        let text = cmp.render();
        assert!(
            text.contains("comparison (1 of 9 cells wrong):\n-\tx/a\tx/b\ty/a\n"),
            "{text}"
        );
        assert!(text.contains("y/a\tX\t.\t.\n"), "{text}");
        assert!(
            text.contains("y/a -> x/a: expected connected, observed blocked"),
            "{text}"
        );
    }

    #[test]
    fn compare_covers_pods_missing_on_one_side() {
        let expected = TruthTable::new(&PODS[..1], &PODS[..1], true);
        let actual = TruthTable::new(&PODS[..2], &PODS[..1], true);
        let cmp = expected.compare(&actual);
        assert_eq!(cmp.mismatches.len(), 1);
        assert_eq!(cmp.mismatches[0].expected, None);
        assert!(
            cmp.render()
                .contains("expected not probed, observed connected")
        );
    }
}
