//! The report of `tagrelay doctor itp`, as text for people and as one JSON object.

use std::fmt::Write as _;

use serde::Serialize;

use super::evaluate::{cannot_see, HostEvidence, PairReport, Severity, Verdict, APPLIES_TO};

/// Everything one run found. `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The worst verdict of all pairs.
    pub verdict: Verdict,
    pub severity: Severity,
    /// The worst pair's message.
    pub message: String,
    /// The worst pair's fixes, the recommended one first.
    pub fix: Vec<String>,
    /// The evidence: every host looked at, once.
    pub hosts: Vec<HostEvidence>,
    /// One verdict per page host.
    pub pairs: Vec<PairReport>,
    /// The resolver whose answers these are.
    pub resolver: String,
    /// Same-origin mode: the path hits go to on each page host.
    pub path: Option<String>,
    pub applies_to: &'static str,
    pub cannot_see: Vec<String>,
}

impl Report {
    /// Combines per-page verdicts; `pairs` must not be empty. `path` is the same-origin path,
    /// if that is the mode.
    pub fn new(pairs: Vec<PairReport>, resolver: &str, path: Option<&str>) -> Self {
        let worst = pairs
            .iter()
            .max_by_key(|p| p.severity)
            .cloned()
            .expect("at least one pair");
        let mut hosts: Vec<HostEvidence> = Vec::new();
        for h in pairs.iter().flat_map(|p| p.hosts.iter()) {
            match hosts.iter_mut().find(|e| e.host == h.host) {
                Some(e) if e.role != h.role => e.role = "page+tagging",
                Some(_) => {}
                None => hosts.push(h.clone()),
            }
        }
        Report {
            verdict: worst.verdict,
            severity: worst.severity,
            message: worst.message,
            fix: worst.fix,
            hosts,
            pairs,
            resolver: resolver.to_owned(),
            path: path.map(str::to_owned),
            applies_to: APPLIES_TO,
            cannot_see: cannot_see(resolver),
        }
    }

    /// The report for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Will Safari keep the cookies tagrelay sets? (DNS from {})",
            self.resolver
        );
        for p in &self.pairs {
            let _ = writeln!(out);
            let arrow = if p.page_host == p.tagging_host {
                let path = self.path.as_deref().unwrap_or("");
                format!(
                    "page {} → hits to {}{path} (the same host)",
                    p.page_host, p.page_host
                )
            } else {
                format!("page {} → hits to {}", p.page_host, p.tagging_host)
            };
            let _ = writeln!(out, "{arrow}");
            let head = format!("  {} ({}): ", p.verdict, p.severity);
            let _ = writeln!(out, "{head}{}", wrap(&p.message, head.len(), 4));
            let _ = writeln!(out);
            for line in table(&p.hosts) {
                let _ = writeln!(out, "  {line}");
            }
            for v in &p.visitors {
                let pairs: Vec<String> = v
                    .pairs
                    .iter()
                    .map(|a| {
                        format!(
                            "{} ↔ {} {}/{} bits {}",
                            a.page,
                            a.tagging,
                            a.shared_bits,
                            a.required_bits,
                            if a.passes { "ok" } else { "capped" }
                        )
                    })
                    .collect();
                let detail = if pairs.is_empty() {
                    String::new()
                } else {
                    format!(": {}", pairs.join("; "))
                };
                let head = format!("  {} visitors: {}", v.visitors, v.outcome);
                let _ = writeln!(out, "{head}{}", wrap(&detail, head.chars().count(), 4));
            }
            for n in &p.notes {
                let _ = writeln!(out, "  note: {}", wrap(n, 8, 4));
            }
            if !p.fix.is_empty() {
                let _ = writeln!(out);
                let _ = writeln!(out, "  fix:");
                for (i, f) in p.fix.iter().enumerate() {
                    let _ = writeln!(out, "    {}. {}", i + 1, wrap(f, 7, 7));
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", wrap(self.applies_to, 0, 0));
        let _ = writeln!(out, "What this check cannot see:");
        for c in &self.cannot_see {
            let _ = writeln!(out, "  - {}", wrap(c, 4, 4));
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "verdict: {} ({})", self.verdict, self.severity);
        out
    }
}

/// The evidence table: host, CNAME chain, addresses, the ranges Safari compares.
fn table(hosts: &[HostEvidence]) -> Vec<String> {
    let header = ["host", "CNAME chain", "addresses", "/16 and /64"];
    let rows: Vec<[String; 4]> = hosts
        .iter()
        .map(|h| {
            let chain = if !h.looked_up {
                "(not looked up)".to_owned()
            } else if h.cname_chain.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{} ({})",
                    h.cname_chain.join(" → "),
                    h.last_cname_domain.as_deref().unwrap_or("?")
                )
            };
            let addresses: Vec<String> = h
                .ipv4
                .iter()
                .map(ToString::to_string)
                .chain(h.ipv6.iter().map(ToString::to_string))
                .collect();
            let addresses = match (&h.error, addresses.is_empty(), h.looked_up) {
                (Some(e), _, _) => format!("lookup failed: {e}"),
                (None, true, true) => "none".to_owned(),
                (None, true, false) => "-".to_owned(),
                (None, false, _) => addresses.join(", "),
            };
            let mut ranges = h.ipv4_ranges.clone();
            ranges.extend(h.ipv6_ranges.iter().cloned());
            let ranges = if ranges.is_empty() {
                "-".to_owned()
            } else {
                ranges.join(", ")
            };
            [format!("{} ({})", h.host, h.role), chain, addresses, ranges]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c}{}  ", " ".repeat(w - c.chars().count()));
            }
        }
        s
    };
    let mut out = vec![line(header)];
    for r in &rows {
        out.push(line([&r[0], &r[1], &r[2], &r[3]]));
    }
    out
}

/// Folds a sentence that starts at column `start` at 96 columns, indenting continuation lines
/// by `indent`.
fn wrap(text: &str, start: usize, indent: usize) -> String {
    const WIDTH: usize = 96;
    let mut out = String::new();
    let mut col = start;
    for (i, word) in text.split(' ').enumerate() {
        let n = word.chars().count();
        if i > 0 {
            if col + 1 + n > WIDTH {
                out.push('\n');
                out.push_str(&" ".repeat(indent));
                col = indent;
            } else {
                out.push(' ');
                col += 1;
            }
        }
        out.push_str(word);
        col += n;
    }
    out
}
