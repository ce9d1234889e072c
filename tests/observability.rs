//! Observability and mesh assets, checked against a real Envoy (1.40, built `tokenfuse.wasm`):
//!
//! - the Prometheus alert rules (`envoy/prometheus/`), the Grafana dashboard
//!   (`envoy/grafana/`) and the Flagger metric templates (`envoy/canary/`) only use
//!   metric names and labels that a real Envoy shows in `/stats/prometheus` after real
//!   traffic (the shipped `stats_tags`, a budget config that warns, rejects, refuses
//!   oversize requests and reroutes, upstream errors, unreadable bodies, a model name
//!   with dots);
//! - the Istio proxy settings (`envoy/istio/proxy-config.yaml`): the `stats_config` Istio
//!   generates from their `extraStatTags` gives the same labelled series as the shipped
//!   `stats_tags`;
//! - the Envoy configuration inside the Istio manifests loads in `envoy --mode validate`
//!   with the built module (which also runs the filter's own configuration check), and so
//!   does every `envoy/*.yaml`;
//! - a WasmPlugin, as Istio renders it, cannot set `allow_on_headers_stop_iteration`, and
//!   with that rendering Envoy holds tokenfuse's LLM requests unanswered.
//!
//! Istio, Kubernetes and the CRD schemas are not available here: the manifests are parsed
//! and their fields checked against what Istio and Flagger document. `promtool` (Debian
//! package `prometheus`) parses every PromQL query of the dashboard and the templates.
//!
//! `cargo test --test observability -- --nocapture` prints every tokenfuse series found.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use support::envoy::{envoy_binary, repo_root, wasm_path, Envoy, EnvoySpec};
use support::envoy_config::yaml_documents;
use support::mock_upstream::MockUpstream;

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

const ALERTS: &str = "envoy/prometheus/tokenfuse-alerts.yaml";
const DASHBOARD: &str = "envoy/grafana/tokenfuse-dashboard.json";
const FLAGGER: &str = "envoy/canary/flagger-metric-templates.yaml";
const CANARY: &str = "envoy/canary/canary-example.yaml";
const ENVOYFILTER: &str = "envoy/istio/tokenfuse-envoyfilter.yaml";
const WASMPLUGIN: &str = "envoy/istio/tokenfuse-wasmplugin.yaml";
const PROXY_CONFIG: &str = "envoy/istio/proxy-config.yaml";

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    yaml_documents(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_str_docs(text: &str) -> Vec<Value> {
    yaml_documents(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn str_at<'a>(v: &'a Value, pointer: &str, what: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: no string at {pointer} in {v}"))
}

/// The tag names of the shipped `envoy/envoy.yaml`'s `stats_config.stats_tags`, in order.
fn shipped_tag_names() -> Vec<String> {
    let doc = &yaml_docs("envoy/envoy.yaml")[0];
    doc.pointer("/stats_config/stats_tags")
        .and_then(Value::as_array)
        .expect("envoy/envoy.yaml has stats_config.stats_tags")
        .iter()
        .map(|t| {
            let name = str_at(t, "/tag_name", "stats_tags").to_string();
            let regex = str_at(t, "/regex", "stats_tags");
            assert_eq!(
                regex,
                format!(r"({name}=\.=(.+?);\.;)"),
                "envoy/envoy.yaml tag {name} is not in Istio's key=.=value;.; form"
            );
            name
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The Prometheus exposition
// ---------------------------------------------------------------------------------------

/// One series of a scrape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

impl std::fmt::Display for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        write!(f, "{}{{{}}}", self.name, labels.join(","))
    }
}

/// Parses Prometheus' text format (what Envoy's `/stats/prometheus` answers).
fn parse_exposition(text: &str) -> Vec<(Series, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            let mut end = after.len();
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    None => break,
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "bad line: {line}");
                let mut value = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => break,
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key.trim().to_string(), value);
            }
            rest = &after[end..];
        }
        out.push((Series { name, labels }, rest.trim().to_string()));
    }
    out
}

/// What a scrape holds: series by metric name.
#[derive(Debug, Default)]
struct Catalogue {
    series: Vec<(Series, String)>,
}

impl Catalogue {
    fn from_text(text: &str) -> Self {
        Catalogue {
            series: parse_exposition(text),
        }
    }

    fn tokenfuse(&self) -> Vec<&(Series, String)> {
        let mut all: Vec<&(Series, String)> = self
            .series
            .iter()
            .filter(|(s, _)| s.name.starts_with("tokenfuse_"))
            .collect();
        all.sort();
        all
    }

    fn has_metric(&self, name: &str) -> bool {
        self.series.iter().any(|(s, _)| s.name == name)
    }

    fn label_names(&self, metric: &str) -> BTreeSet<String> {
        self.series
            .iter()
            .filter(|(s, _)| s.name == metric)
            .flat_map(|(s, _)| s.labels.keys().cloned())
            .collect()
    }

    fn label_values(&self, metric: &str, label: &str) -> BTreeSet<String> {
        self.series
            .iter()
            .filter(|(s, _)| s.name == metric)
            .filter_map(|(s, _)| s.labels.get(label).cloned())
            .collect()
    }

    fn has(&self, metric: &str, label: &str, value: &str) -> bool {
        self.label_values(metric, label).contains(value)
    }

    /// The series identities (name and labels), for comparing two scrapes.
    fn identities(&self) -> BTreeSet<Series> {
        self.tokenfuse()
            .into_iter()
            .map(|(s, _)| s.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// PromQL references
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Matcher {
    label: String,
    /// `=`, `!=`, `=~`, `!~`, or `?` for "this label is read" (Grafana's `label_values`).
    op: String,
    value: String,
}

#[derive(Debug, Clone)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

/// The metric selectors of a PromQL expression, and the labels its `by`, `without`,
/// `on`, `ignoring`, `group_left` and `group_right` clauses name. Also understands
/// Grafana's `label_values(metric, label)`. Template placeholders (`{{ interval }}`,
/// `$__rate_interval`) may appear in ranges and label values.
#[derive(Debug, Default)]
struct Refs {
    selectors: Vec<Selector>,
    grouping: BTreeSet<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let read_ident = |mut i: usize| {
        let start = i;
        while i < chars.len() && is_ident_char(chars[i]) {
            i += 1;
        }
        (chars[start..i].iter().collect::<String>(), i)
    };
    // A quoted string starting at `i` (the quote); returns its content and the index after.
    let read_string = |mut i: usize| {
        let quote = chars[i];
        i += 1;
        let mut s = String::new();
        while i < chars.len() && chars[i] != quote {
            if chars[i] == '\\' && i + 1 < chars.len() {
                i += 1;
            }
            s.push(chars[i]);
            i += 1;
        }
        (s, i + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = read_string(i).1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '$' {
            // A Grafana variable such as $__rate_interval: not an identifier.
            i += 1;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
        } else if is_ident_start(c) {
            let (ident, next) = read_ident(i);
            i = next;
            let j = skip_ws(i);
            let grouping = [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ];
            if grouping.contains(&ident.as_str()) && j < chars.len() && chars[j] == '(' {
                let close = (j..chars.len()).find(|&k| chars[k] == ')').unwrap();
                let inner: String = chars[j + 1..close].iter().collect();
                refs.grouping.extend(
                    inner
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from),
                );
                i = close + 1;
            } else if ident == "label_values" && j < chars.len() && chars[j] == '(' {
                let close = (j..chars.len()).find(|&k| chars[k] == ')').unwrap();
                let inner: String = chars[j + 1..close].iter().collect();
                let args: Vec<&str> = inner.split(',').map(str::trim).collect();
                assert_eq!(args.len(), 2, "label_values with two arguments: {expr}");
                let (metric, label) = (args[0].to_string(), args[1].to_string());
                let metric = metric.split('{').next().unwrap().trim().to_string();
                refs.selectors.push(Selector {
                    metric,
                    matchers: vec![Matcher {
                        label,
                        op: "?".into(),
                        value: String::new(),
                    }],
                });
                i = close + 1;
            } else if j < chars.len() && chars[j] == '{' {
                // A selector with matchers.
                let mut k = j + 1;
                let mut matchers = Vec::new();
                loop {
                    while k < chars.len() && (chars[k].is_whitespace() || chars[k] == ',') {
                        k += 1;
                    }
                    if k >= chars.len() || chars[k] == '}' {
                        break;
                    }
                    let (label, next) = read_ident(k);
                    k = skip_ws(next);
                    let mut op = String::new();
                    while k < chars.len() && "=!~".contains(chars[k]) {
                        op.push(chars[k]);
                        k += 1;
                    }
                    k = skip_ws(k);
                    let (value, next) = read_string(k);
                    k = next;
                    assert!(
                        ["=", "!=", "=~", "!~"].contains(&op.as_str()) && !label.is_empty(),
                        "cannot read the matchers of {ident} in: {expr}"
                    );
                    matchers.push(Matcher { label, op, value });
                }
                refs.selectors.push(Selector {
                    metric: ident,
                    matchers,
                });
                i = k + 1;
            } else if ident.starts_with("tokenfuse_")
                || ident.starts_with("tokenfuse:")
                || ident.starts_with("envoy_")
            {
                refs.selectors.push(Selector {
                    metric: ident,
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    refs
}

/// `{{ $labels.x }}` (alert annotations) or `{{x}}` (Grafana legends) label references.
fn template_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        let inner = rest[start + 2..start + len].trim();
        let name = inner.strip_prefix("$labels.").unwrap_or(inner);
        if !name.is_empty() && name.chars().all(is_ident_char) {
            out.insert(name.to_string());
        }
        rest = &rest[start + len + 2..];
    }
    out
}

// ---------------------------------------------------------------------------------------
// Checking queries against a scrape
// ---------------------------------------------------------------------------------------

/// Metrics no test traffic can produce on purpose, with the filter's stat name:
/// `tokenfuse_fail_open` counts requests let through when shared data could not be
/// updated (CAS retries ran out under contention, or the host refused a write), which
/// an Envoy on loopback does not do on demand. Their labels are read from the
/// filter's source (`Stat::new("…").tag("…", …)`) instead of the scrape.
const NOT_PRODUCIBLE: &[(&str, &str)] = &[("tokenfuse_fail_open", "fail_open")];

/// The tags the filter writes on stat `stat`, read from `src/`: the catalog names it
/// (`src/stats/catalog.rs`: `pub const NAME: &str = "stat";`), and every
/// `Stat::new(catalog::NAME).tag("x", …)…` chain adds tags. `None` when no such stat is
/// defined.
fn labels_defined_in_source(stat: &str) -> Option<BTreeSet<String>> {
    let catalog = read("src/stats/catalog.rs");
    let constant = catalog.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("pub const ")?;
        let (name, value) = rest.split_once(": &str = ")?;
        (value.trim_end_matches(';').trim_matches('"') == stat).then(|| name.to_string())
    })?;
    let needle = format!("Stat::new(catalog::{constant})");
    let mut found = None;
    let mut dirs = vec![repo_root().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut from = 0;
            while let Some(at) = text[from..].find(&needle) {
                let start = from + at + needle.len();
                let end = text[start..]
                    .find(".name()")
                    .map_or(text.len(), |e| start + e);
                let chain = &text[start..end];
                let labels = found.get_or_insert_with(BTreeSet::new);
                let mut rest = chain;
                while let Some(t) = rest.find(".tag(\"") {
                    let after = &rest[t + 6..];
                    let close = after.find('"').unwrap();
                    labels.insert(after[..close].to_string());
                    rest = &after[close..];
                }
                from = end;
            }
        }
    }
    found
}

struct Check<'a> {
    scrape: &'a Catalogue,
    /// Labels the Prometheus scrape adds (e.g. `namespace`, `pod`), never in Envoy's output.
    target_labels: &'a [&'a str],
    problems: Vec<String>,
    /// (metric, labels) pairs seen, for the report.
    used: BTreeMap<String, BTreeSet<String>>,
    /// Metrics recording rules make, with their labels.
    recorded: BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Check<'a> {
    fn new(scrape: &'a Catalogue, target_labels: &'a [&'a str]) -> Self {
        Check {
            scrape,
            target_labels,
            problems: Vec::new(),
            used: BTreeMap::new(),
            recorded: BTreeMap::new(),
        }
    }

    /// The label names of `metric` and whether the scrape had it (else: from `src/`).
    fn labels_of(&mut self, what: &str, metric: &str) -> Option<(BTreeSet<String>, bool)> {
        if self.scrape.has_metric(metric) {
            return Some((self.scrape.label_names(metric), true));
        }
        if let Some(labels) = self.recorded.get(metric) {
            return Some((labels.clone(), false));
        }
        if let Some((_, stat)) = NOT_PRODUCIBLE.iter().find(|(m, _)| *m == metric) {
            return match labels_defined_in_source(stat) {
                Some(labels) => Some((labels, false)),
                None => {
                    self.problems.push(format!(
                        "{what}: {metric} is not defined in src/ (no Stat::new(\"{stat}\"))"
                    ));
                    None
                }
            };
        }
        self.problems.push(format!(
            "{what}: metric {metric} is not in the scrape (and not a known unproducible one)"
        ));
        None
    }

    /// Checks one expression; `label_refs` are labels its templates (annotations,
    /// legends) read from its result.
    fn expr(&mut self, what: &str, expr: &str, label_refs: &BTreeSet<String>) {
        let refs = promql_refs(expr);
        if refs.selectors.is_empty() {
            self.problems.push(format!("{what}: no metric in {expr:?}"));
        }
        let mut metric_labels: Vec<(String, BTreeSet<String>)> = Vec::new();
        for sel in &refs.selectors {
            let Some((labels, scraped)) = self.labels_of(what, &sel.metric) else {
                continue;
            };
            self.used.entry(sel.metric.clone()).or_default();
            for m in &sel.matchers {
                if self.target_labels.contains(&m.label.as_str()) {
                    continue;
                }
                self.used
                    .get_mut(&sel.metric)
                    .unwrap()
                    .insert(m.label.clone());
                if !labels.contains(&m.label) {
                    self.problems.push(format!(
                        "{what}: {} has no label {:?} (it has {labels:?})",
                        sel.metric, m.label
                    ));
                    continue;
                }
                if !scraped || m.value.contains('$') || m.value.contains("{{") {
                    continue;
                }
                let values = self.scrape.label_values(&sel.metric, &m.label);
                // `=`: that value; `=~` made of plain alternatives: at least one of them.
                let plain_alternatives = m
                    .value
                    .split('|')
                    .all(|alt| alt.chars().all(|c| is_ident_char(c) || c == '-'));
                let missing = match m.op.as_str() {
                    "=" => !values.contains(&m.value),
                    "=~" if plain_alternatives => {
                        !m.value.split('|').any(|alt| values.contains(alt))
                    }
                    _ => false,
                };
                if missing {
                    self.problems.push(format!(
                        "{what}: no {}{{{}{}{:?}}} in the scrape (values: {values:?})",
                        sel.metric, m.label, m.op, m.value
                    ));
                }
            }
            metric_labels.push((sel.metric.clone(), labels));
        }
        // Grouping labels and template references must be on every metric aggregated.
        for label in refs.grouping.iter().chain(label_refs.iter()) {
            if self.target_labels.contains(&label.as_str()) {
                continue;
            }
            for (metric, labels) in &metric_labels {
                self.used.get_mut(metric).unwrap().insert(label.clone());
                if !labels.contains(label) {
                    self.problems.push(format!(
                        "{what}: groups or reads label {label:?}, which {metric} lacks ({labels:?})"
                    ));
                }
            }
        }
    }

    fn finish(self, asset: &str) -> BTreeMap<String, BTreeSet<String>> {
        assert!(
            self.problems.is_empty(),
            "{asset} uses metrics or labels a real Envoy does not show:\n  {}\n\ntokenfuse series in the scrape:\n{}",
            self.problems.join("\n  "),
            self.scrape
                .tokenfuse()
                .iter()
                .map(|(s, v)| format!("  {s} {v}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        println!("{asset} uses (metric: labels):");
        for (metric, labels) in &self.used {
            println!("  {metric}: {labels:?}");
        }
        self.used
    }
}

/// The recording rules of the rules file: (recorded metric, expression), in order.
fn recording_rules() -> Vec<(String, String)> {
    let doc = &yaml_docs(ALERTS)[0];
    let mut out = Vec::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            if let Some(name) = rule["record"].as_str() {
                let expr = rule["expr"].as_str().expect("expr").to_string();
                out.push((name.to_string(), expr));
            }
        }
    }
    out
}

/// A check that knows the recorded metrics of the rules file: each is checked like any
/// expression, and then has the labels of its expression (its `by` labels, else those of
/// its first metric).
fn check_with_recordings(scrape: &Catalogue) -> Check<'_> {
    let mut check = Check::new(scrape, &[]);
    for (name, expr) in recording_rules() {
        check.expr(&format!("record {name}"), &expr, &BTreeSet::new());
        let refs = promql_refs(&expr);
        let labels = if refs.grouping.is_empty() {
            refs.selectors
                .first()
                .and_then(|sel| check.labels_of(&name, &sel.metric))
                .map(|(labels, _)| labels)
                .unwrap_or_default()
        } else {
            refs.grouping.clone()
        };
        check.recorded.insert(name, labels);
    }
    check
}

/// Every expression of the alert rules, with the labels their annotations read.
fn alert_exprs() -> Vec<(String, String, BTreeSet<String>)> {
    let doc = &yaml_docs(ALERTS)[0];
    let mut out = Vec::new();
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let Some(name) = rule["alert"].as_str() else {
                assert!(rule["record"].is_string(), "a rule is an alert or a record");
                continue;
            };
            let expr = rule["expr"].as_str().expect("expr").to_string();
            let mut refs = BTreeSet::new();
            for text in rule["annotations"]
                .as_object()
                .into_iter()
                .flat_map(|a| a.values())
            {
                refs.extend(template_labels(text.as_str().unwrap_or_default()));
            }
            out.push((name.to_string(), expr, refs));
        }
    }
    out
}

/// Every query of the dashboard: panel targets (with their legend's labels) and the
/// template variables' queries.
fn dashboard_exprs() -> Vec<(String, String, BTreeSet<String>)> {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            out.push((
                format!("panel {:?} {}", panel["title"], target["refId"]),
                expr.to_string(),
                template_labels(legend),
            ));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .or_else(|| var["query"].as_str())
                .expect("query variable has a query");
            out.push((
                format!("variable {}", var["name"]),
                q.to_string(),
                BTreeSet::new(),
            ));
        }
    }
    out
}

/// Every MetricTemplate query.
fn flagger_exprs() -> Vec<(String, String, BTreeSet<String>)> {
    yaml_docs(FLAGGER)
        .iter()
        .map(|doc| {
            (
                format!("MetricTemplate {}", str_at(doc, "/metadata/name", FLAGGER)),
                str_at(doc, "/spec/query", FLAGGER).to_string(),
                BTreeSet::new(),
            )
        })
        .collect()
}

/// Labels the Flagger templates take from the Prometheus scrape (pod scrape config),
/// not from Envoy: see the templates' header.
const FLAGGER_TARGET_LABELS: &[&str] = &["namespace", "pod"];

// ---------------------------------------------------------------------------------------
// Real Envoy, real traffic
// ---------------------------------------------------------------------------------------

/// Budgets that produce every decision the assets read: `tenant-tokens` warns `warm`
/// (839 of 1000) and rejects `greedy` (959 tokens: more than priority p1 may ever use);
/// `tenant-daily-usd` reroutes `thrifty` ($0.0005) from gpt-4o to gpt-4o-mini;
/// `request-cap` refuses requests over 5000 tokens as oversize; `tenant-hourly` never
/// refuses (its hour window gives the sizing rules' hourly series). Responses over 1 KiB are
/// not read (a response-stage parse failure). Day windows and per-tenant keys keep every
/// outcome the same whatever the clock.
const SCRAPE_CONFIG: &str = r#"{
  "api": "v1",
  "inject_stream_usage": true,
  "max_response_body_bytes": 1024,
  "budgets": [
    {"name": "tenant-tokens", "key": "header:x-tenant", "window": "day", "base": 1000},
    {"name": "tenant-daily-usd", "key": "header:x-tenant", "window": "day", "unit": "usd",
     "base": 1.0, "action": "reroute", "base_overrides": {"thrifty": 0.0005}},
    {"name": "request-cap", "key": "constant:all", "window": "day", "base": 1000000000,
     "max_request_tokens": 5000},
    {"name": "tenant-hourly", "key": "header:x-tenant", "window": "hour", "base": 1000000}
  ],
  "priority": {"header": "x-tokenfuse-priority"},
  "prices": {
    "*":            {"input": 1.0,  "output": 4.0},
    "gpt-4o*":      {"input": 2.5,  "cached_input": 1.25,  "output": 10.0},
    "gpt-4o-mini*": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
    "gpt-4.1*":     {"input": 2.0,  "cached_input": 0.5,   "output": 8.0}
  },
  "reroute": {"models": {"gpt-4o": "gpt-4o-mini"}},
  "cache": {"ttl_secs": 300, "max_entries": 4}
}"#;

struct Stack {
    _primary: MockUpstream,
    economy: MockUpstream,
    envoy: Envoy,
    scrape: Catalogue,
}

fn chat(model: &str, max_tokens: u64) -> String {
    json!({"model": model, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "Hello!"}]})
    .to_string()
}

/// Sends the traffic every asset's series need, checking each answer.
fn drive_traffic(envoy: &Envoy) {
    let post = |tenant: &str, extra: &[(&str, &str)], body: &str, status: u16| {
        let mut headers = vec![("x-tenant", tenant)];
        headers.extend_from_slice(extra);
        let r = envoy
            .post_json("/v1/chat/completions", &headers, body)
            .unwrap();
        assert_eq!(r.status, status, "tenant {tenant} {extra:?}: {}", r.text());
        r
    };
    // allowed
    post("acme", &[], &chat("gpt-4o", 10), 200);
    // a model name with dots
    post("acme", &[], &chat("gpt-4.1", 10), 200);
    // warned: 9 + 830 of 1000
    let r = post("warm", &[], &chat("gpt-4o", 830), 200);
    assert_eq!(
        r.header("x-tokenfuse-budget-warning"),
        Some("tenant-tokens")
    );
    // rejected: 959 tokens, over p1's 90% ceiling
    let r = post("greedy", &[], &chat("gpt-4o", 950), 429);
    assert_eq!(r.header("x-tokenfuse-budget"), Some("tenant-tokens"));
    // oversize: over request-cap's 5000 tokens
    post("huge", &[], &chat("gpt-4o", 6000), 400);
    // rerouted: thrifty's $0.0005 cannot pay for gpt-4o
    let r = post("thrifty", &[], &chat("gpt-4o", 100), 200);
    assert_eq!(r.header("x-tokenfuse-rerouted-to"), Some("gpt-4o-mini"));
    assert_eq!(r.header("x-mock-upstream"), Some("economy"));
    // an upstream error
    post(
        "acme",
        &[("x-mock-status", "500")],
        &chat("gpt-4o", 10),
        500,
    );
    // an unreadable request body
    post("acme", &[], "{not json", 400);
    // a response too large to read (max_response_body_bytes 1024)
    let long = "a".repeat(2000);
    post(
        "acme",
        &[("x-mock-completion", &long)],
        &chat("gpt-4o", 10),
        200,
    );
    // a response without usage: counted by the filter
    post(
        "acme",
        &[("x-mock-usage", "absent")],
        &chat("gpt-4o", 10),
        200,
    );
    // an SDK's retry (and its tokens per request in the histograms, as every request's)
    post(
        "acme",
        &[("x-stainless-retry-count", "1")],
        &chat("gpt-4o", 10),
        200,
    );
    // a deterministic request, then the same again: a cache miss, then a hit (once the
    // first answer is kept, when Envoy ends its stream)
    let deterministic = json!({"model": "gpt-4o", "temperature": 0, "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hello, cache!"}]})
    .to_string();
    let r = post("cached", &[], &deterministic, 200);
    assert_eq!(r.header("x-tokenfuse-cache"), Some("miss"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = post("cached", &[], &deterministic, 200);
        if r.header("x-tokenfuse-cache") == Some("hit") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cache hit: {:?}",
            r.headers
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // more distinct answers than the cache's four entries: one is evicted
    for i in 0..5 {
        let body = json!({"model": "gpt-4o", "temperature": 0, "max_tokens": 10,
            "messages": [{"role": "user", "content": format!("Hello, cache {i}!")}]})
        .to_string();
        post("flood", &[], &body, 200);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // not an LLM call
    let r = envoy.get("/healthz", &[]).unwrap();
    assert_eq!(r.status, 200);
}

/// Series the traffic above must produce; the scrape is retried until they are there
/// (settlement lands when Envoy ends the stream, a moment after the client's last byte).
const EXPECTED: &[(&str, &str, &str)] = &[
    ("tokenfuse_decisions", "decision", "allowed"),
    ("tokenfuse_decisions", "decision", "warned"),
    ("tokenfuse_decisions", "decision", "rejected"),
    ("tokenfuse_decisions", "decision", "oversize"),
    ("tokenfuse_decisions", "decision", "rerouted"),
    ("tokenfuse_requests", "model", "gpt-4.1"),
    ("tokenfuse_requests", "cluster", "economy"),
    ("tokenfuse_tokens", "source", "counted"),
    ("tokenfuse_tokens", "source", "provider"),
    ("tokenfuse_cost_micro_usd", "model", "gpt-4o-mini"),
    ("tokenfuse_upstream_errors", "status", "5xx"),
    ("tokenfuse_parse_failures", "stage", "request"),
    ("tokenfuse_parse_failures", "stage", "response"),
    ("tokenfuse_passthrough", "reason", "not_llm"),
    ("tokenfuse_budget_used", "budget", "tenant-daily-usd"),
    ("tokenfuse_budget_limit", "budget", "tenant-tokens"),
    ("tokenfuse_budget_remaining", "budget", "request-cap"),
    ("tokenfuse_budget_reset_seconds", "window", "day"),
    ("tokenfuse_budget_base", "budget", "tenant-daily-usd"),
    ("tokenfuse_budget_request_cap", "budget", "request-cap"),
    ("tokenfuse_budget_consumed", "budget", "tenant-tokens"),
    ("tokenfuse_budget_settled", "tenant", "thrifty"),
    ("tokenfuse_retries", "tenant", "acme"),
    ("tokenfuse_tokens_per_request_count", "kind", "completion"),
    ("tokenfuse_budget_consumed", "window", "hour"),
    ("tokenfuse_decisions", "decision", "cache_hit"),
    ("tokenfuse_cache_lookups", "result", "hit"),
    ("tokenfuse_cache_saved_tokens", "kind", "completion"),
    ("tokenfuse_cache_evictions", "reason", "evicted"),
];

/// Series that must also have counted something: values reach Envoy on the filter's tick
/// (every 0.5 s), histograms on Envoy's stats flush (every 5 s).
const NONZERO: &[&str] = &[
    "tokenfuse_budget_consumed",
    "tokenfuse_budget_base",
    "tokenfuse_budget_request_cap",
    "tokenfuse_tokens_per_request_count",
    "tokenfuse_retries",
];

fn scrape_when_complete(envoy: &Envoy) -> Catalogue {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let scrape = Catalogue::from_text(&envoy.prometheus());
        let mut missing: Vec<String> = EXPECTED
            .iter()
            .filter(|(m, l, v)| !scrape.has(m, l, v))
            .map(|(m, l, v)| format!("{m}{{{l}={v:?}}}"))
            .collect();
        missing.extend(
            NONZERO
                .iter()
                .filter(|m| {
                    !scrape
                        .tokenfuse()
                        .iter()
                        .any(|(x, v)| x.name == **m && v.parse::<f64>().is_ok_and(|v| v > 0.0))
                })
                .map(|m| format!("{m} > 0")),
        );
        if missing.is_empty() {
            return scrape;
        }
        if Instant::now() > deadline {
            panic!(
                "after the test traffic, the scrape lacks {missing:?}; tokenfuse series:\n{}",
                scrape
                    .tokenfuse()
                    .iter()
                    .map(|(s, v)| format!("  {s} {v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stack after the test traffic; `stats_config` (top-level YAML) replaces the shipped one.
fn start_stack(stats_config: Option<String>, concurrency: u32) -> Stack {
    let primary = MockUpstream::start("primary").expect("start primary mock");
    let economy = MockUpstream::start("economy").expect("start economy mock");
    let spec = EnvoySpec {
        extra_bootstrap_yaml: stats_config,
        concurrency,
        ..EnvoySpec::new(SCRAPE_CONFIG, primary.port(), economy.port())
    };
    let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("Envoy did not start: {e}"));
    drive_traffic(&envoy);
    let scrape = scrape_when_complete(&envoy);
    Stack {
        _primary: primary,
        economy,
        envoy,
        scrape,
    }
}

/// One Envoy (2 workers, as shipped) with the shipped `stats_tags`, after the test traffic.
fn shipped() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| start_stack(None, 2))
}

// ---------------------------------------------------------------------------------------
// Istio's bootstrap stats settings, reproduced
// ---------------------------------------------------------------------------------------

/// `extraStatTags` and `proxyStatsMatcher.inclusionPrefixes` of both forms in
/// `envoy/istio/proxy-config.yaml` (mesh-wide and per-pod annotation), checked equal.
fn istio_proxy_settings() -> (Vec<String>, Vec<String>) {
    let docs = yaml_docs(PROXY_CONFIG);
    let strings = |v: &Value, what: &str| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("{PROXY_CONFIG}: {what} is a list"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let mesh = docs
        .iter()
        .find(|d| d["kind"] == "IstioOperator")
        .expect("an IstioOperator document");
    assert_eq!(mesh["apiVersion"], "install.istio.io/v1alpha1");
    let mesh_pc = &mesh["spec"]["meshConfig"]["defaultConfig"];
    let deploy = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment document");
    assert_eq!(deploy["apiVersion"], "apps/v1");
    let annotation = str_at(
        deploy,
        "/spec/template/metadata/annotations/proxy.istio.io~1config",
        PROXY_CONFIG,
    );
    let pod_pc = &yaml_str_docs(annotation)[0];
    let tags = strings(&mesh_pc["extraStatTags"], "extraStatTags");
    let prefixes = strings(
        &mesh_pc["proxyStatsMatcher"]["inclusionPrefixes"],
        "inclusionPrefixes",
    );
    assert_eq!(
        strings(&pod_pc["extraStatTags"], "annotation extraStatTags"),
        tags,
        "the annotation and meshConfig name the same tags"
    );
    assert_eq!(
        strings(
            &pod_pc["proxyStatsMatcher"]["inclusionPrefixes"],
            "annotation inclusionPrefixes"
        ),
        prefixes,
        "the annotation and meshConfig include the same prefixes"
    );
    (tags, prefixes)
}

/// The `histogram_bucket_settings` Istio's bootstrap makes of the Deployment's
/// `sidecar.istio.io/statsHistogramBuckets` annotation (prefix → buckets), checked equal to
/// those of the shipped `envoy/envoy.yaml`.
fn istio_histogram_buckets() -> Value {
    let docs = yaml_docs(PROXY_CONFIG);
    let deploy = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment document");
    let annotation = str_at(
        deploy,
        "/spec/template/metadata/annotations/sidecar.istio.io~1statsHistogramBuckets",
        PROXY_CONFIG,
    );
    let by_prefix: Map<String, Value> =
        serde_json::from_str(annotation).expect("the annotation is a JSON object");
    let settings: Vec<Value> = by_prefix
        .into_iter()
        .map(|(prefix, buckets)| json!({"match": {"prefix": prefix}, "buckets": buckets}))
        .collect();
    let shipped = &yaml_docs("envoy/envoy.yaml")[0]["stats_config"]["histogram_bucket_settings"];
    assert_eq!(
        &Value::Array(settings.clone()),
        shipped,
        "the annotation's buckets are envoy/envoy.yaml's"
    );
    Value::Array(settings)
}

/// The `stats_config` an Istio sidecar's bootstrap gets (istio/istio
/// tools/packaging/common/envoy_bootstrap.json, pkg/bootstrap/config.go): Istio's own tag
/// extractors, then `(<tag>=\.=(.*?);\.;)` for each extraStatTag, then Istio's generic
/// extractors; `use_all_default_tags: false`; and an inclusion-only stats matcher made of
/// `reporter=`, the prefixes Istio always requires, the proxy config's prefixes, Istio's
/// required suffixes and regex, `component` and `istio`.
fn istio_stats_config(extra_tags: &[String], inclusion_prefixes: &[String]) -> String {
    let mut tags: Vec<Value> = [
        (
            "cluster_name",
            r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)",
        ),
        ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
        ("response_code", r"_rq(_(\d{3}))$"),
        ("response_code_class", r"_rq(_(\dxx))$"),
        (
            "http_conn_manager_listener_prefix",
            r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "http_conn_manager_prefix",
            r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "listener_address",
            r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        (
            "mongo_prefix",
            r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$",
        ),
    ]
    .iter()
    .map(|(n, r)| json!({"tag_name": n, "regex": r}))
    .collect();
    for tag in extra_tags {
        tags.push(json!({"tag_name": tag, "regex": format!(r"({tag}=\.=(.*?);\.;)")}));
    }
    for (n, r) in [
        ("cache", r"(cache\.(.+?)\.)"),
        ("component", r"(component\.(.+?)\.)"),
        ("tag", r"(tag\.(.+?);\.)"),
        ("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
        ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
        ("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
        ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
    ] {
        tags.push(json!({"tag_name": n, "regex": r}));
    }
    let mut patterns = vec![json!({"prefix": "reporter="})];
    for p in inclusion_prefixes.iter().map(String::as_str).chain([
        "cluster_manager",
        "listener_manager",
        "server",
        "cluster.xds-grpc",
        "wasm",
    ]) {
        patterns.push(json!({ "prefix": p }));
    }
    for s in [
        "rbac.allowed",
        "rbac.denied",
        "shadow_allowed",
        "shadow_denied",
    ] {
        patterns.push(json!({ "suffix": s }));
    }
    patterns.push(json!({"safe_regex": {"regex": r"vhost\.*\.route\.*"}}));
    patterns.push(json!({"prefix": "component"}));
    patterns.push(json!({"prefix": "istio"}));
    let config = json!({
        "use_all_default_tags": false,
        "stats_tags": tags,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
        "histogram_bucket_settings": istio_histogram_buckets(),
    });
    // JSON is YAML: one top-level key for the harness's extra bootstrap YAML.
    format!("stats_config: {config}\n")
}

// ---------------------------------------------------------------------------------------
// envoy --mode validate
// ---------------------------------------------------------------------------------------

fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tokenfuse-observability-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `envoy --mode validate -c <path>` in `cwd`; returns whether Envoy accepted it,
/// and its output.
fn envoy_validate(config: &Path, cwd: &Path) -> (bool, String) {
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "-l", "warning", "-c"])
        .arg(config)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run envoy: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains(" OK"), text)
}

/// Writes `bootstrap` (JSON) and asserts that `envoy --mode validate` accepts it.
fn assert_validates(name: &str, bootstrap: &Value) {
    let dir = scratch_dir(name);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(bootstrap).unwrap()).unwrap();
    let (ok, output) = envoy_validate(&path, &dir);
    assert!(
        ok,
        "envoy --mode validate refused {name} ({}):\n{output}",
        path.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sidecar-like bootstrap: one outbound HTTP listener whose filter chain is
/// `http_filters` + router, a static `llm` cluster, plus `extra` top-level keys.
fn bootstrap_with(http_filters: Vec<Value>, listener_patch: &Value, extra: Value) -> Value {
    let mut filters = http_filters;
    filters.push(json!({"name": "envoy.filters.http.router",
                        "typed_config": {"@type": ROUTER_TYPE}}));
    let mut listener = json!({
        "name": "0.0.0.0_80",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": "outbound_0.0.0.0_80",
                "route_config": {"name": "80", "virtual_hosts": [{
                    "name": "llm.llm.svc.cluster.local:80", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "llm"}}]}]},
                "http_filters": filters
            }
        }]}]
    });
    if let Some(patch) = listener_patch.as_object() {
        for (k, v) in patch {
            listener[k] = v.clone();
        }
    }
    let mut bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [static_cluster("llm", false)]
        }
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        if k == "clusters" {
            let clusters = bootstrap["static_resources"]["clusters"]
                .as_array_mut()
                .unwrap();
            clusters.extend(v.as_array().cloned().unwrap_or_default());
        } else {
            bootstrap[k] = v;
        }
    }
    bootstrap
}

fn static_cluster(name: &str, http2: bool) -> Value {
    let mut c = json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}});
    }
    c
}

/// The EnvoyFilter document and its patches by `applyTo`.
fn envoyfilter() -> (Value, BTreeMap<String, Value>) {
    let docs = yaml_docs(ENVOYFILTER);
    let ef = docs
        .iter()
        .find(|d| d["kind"] == "EnvoyFilter")
        .expect("an EnvoyFilter document")
        .clone();
    let patches = ef["spec"]["configPatches"]
        .as_array()
        .expect("configPatches")
        .iter()
        .map(|p| (p["applyTo"].as_str().unwrap().to_string(), p.clone()))
        .collect();
    (ef, patches)
}

/// The EXTENSION_CONFIG value with its module path pointed at `wasm`.
fn extension_config_filter(wasm: &str) -> Value {
    let (_, patches) = envoyfilter();
    let mut value = patches["EXTENSION_CONFIG"]["patch"]["value"].clone();
    let filename = value
        .pointer_mut("/typed_config/config/vm_config/code/local/filename")
        .expect("the extension config loads a local module");
    assert!(filename.as_str().unwrap().ends_with("/tokenfuse.wasm"));
    *filename = Value::String(wasm.to_string());
    value
}

/// The JSON Istio sends as a WasmPlugin's `configuration` (protojson of a Struct:
/// integral numbers without a fraction).
fn protojson(v: &Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => json!(f as i64),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(protojson).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), protojson(v)))
                .collect::<Map<String, Value>>(),
        ),
        _ => v.clone(),
    }
}

/// The HTTP filter Istio generates for the WasmPlugin (istio/istio pilot/pkg/model,
/// `WasmPluginWrapper.buildPluginConfig`): name `<namespace>.<name>`, root_id =
/// pluginName, no vm_id, the V8 runtime, a `file://` url as a local file (here: `wasm`),
/// `configuration` = the JSON of pluginConfig, failure_policy from failStrategy, and no
/// `allow_on_headers_stop_iteration` unless `allow` says so (Istio never does; the
/// comparison test does).
fn wasmplugin_filter(wasm: &str, allow: Option<bool>) -> Value {
    let docs = yaml_docs(WASMPLUGIN);
    let wp = &docs[0];
    let name = format!(
        "{}.{}",
        str_at(wp, "/metadata/namespace", WASMPLUGIN),
        str_at(wp, "/metadata/name", WASMPLUGIN)
    );
    let url = str_at(wp, "/spec/url", WASMPLUGIN);
    assert!(
        url.starts_with("file://") && url.ends_with("/tokenfuse.wasm"),
        "{url}"
    );
    let policy = match wp["spec"]["failStrategy"].as_str().unwrap_or("FAIL_CLOSE") {
        "FAIL_CLOSE" => "FAIL_CLOSED",
        "FAIL_OPEN" => "FAIL_OPEN",
        "FAIL_RELOAD" => "FAIL_RELOAD",
        other => panic!("failStrategy {other}"),
    };
    let mut config = json!({
        "name": name,
        "root_id": str_at(wp, "/spec/pluginName", WASMPLUGIN),
        "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                      "code": {"local": {"filename": wasm}}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": protojson(&wp["spec"]["pluginConfig"]).to_string()},
        "failure_policy": policy
    });
    if let Some(allow) = allow {
        config["allow_on_headers_stop_iteration"] = json!(allow);
    }
    json!({"name": name, "typed_config": {"@type": WASM_TYPE, "config": config}})
}

/// A filter as the harness's `http_filter_yaml` (module path left to the harness).
fn as_harness_filter(filter: &Value) -> String {
    let marker = "__TOKENFUSE_WASM__";
    let mut f = filter.clone();
    *f.pointer_mut("/typed_config/config/vm_config/code/local/filename")
        .unwrap() = json!(marker);
    format!("- {}", f).replace(&format!("\"{marker}\""), "{wasm}")
}

fn wasm() -> String {
    wasm_path().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------------------

fn promtool() -> String {
    let tool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string());
    let ok = Command::new(&tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        panic!(
            "promtool not found ({tool}): install it with \
             `apt-get install -y --no-install-recommends prometheus` (Debian), \
             or set PROMTOOL=/path/to/promtool"
        );
    }
    tool
}

/// Grafana's and Flagger's placeholders replaced by values, so promtool can parse it.
fn concrete_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$tenant", ".*")
        .replace("$model", ".*")
        .replace("{{ namespace }}", "llm-apps")
        .replace("{{ target }}", "chatbot")
        .replace("{{ interval }}", "10m")
}

// =======================================================================================
// Tests: the scrape
// =======================================================================================

#[test]
fn the_scrape_after_real_traffic_lists_every_tokenfuse_series_with_its_labels() {
    let s = shipped();
    let series = s.scrape.tokenfuse();
    println!(
        "tokenfuse series in /stats/prometheus ({} series, shipped stats_tags):",
        series.len()
    );
    for (serie, value) in &series {
        println!("  {serie} {value}");
    }
    let mut names: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (serie, _) in &series {
        names
            .entry(&serie.name)
            .or_default()
            .extend(serie.labels.keys().cloned());
    }
    println!("metrics and their labels:");
    for (name, labels) in &names {
        println!("  {name}: {labels:?}");
    }
    // No tag was left inside a metric name: every name is a plain identifier.
    for (serie, _) in &series {
        assert!(
            serie.name.chars().all(is_ident_char),
            "a tag was not turned into a label: {serie}"
        );
    }
}

#[test]
fn model_names_with_dots_come_out_intact_as_labels() {
    let s = shipped();
    for metric in [
        "tokenfuse_requests",
        "tokenfuse_tokens",
        "tokenfuse_cost_micro_usd",
    ] {
        assert!(
            s.scrape.has(metric, "model", "gpt-4.1"),
            "{metric} has no model=\"gpt-4.1\": {:?}",
            s.scrape.label_values(metric, "model")
        );
    }
}

#[test]
fn a_rerouted_request_is_labelled_with_the_cheaper_model_and_the_economy_cluster() {
    let s = shipped();
    assert!(s
        .economy
        .requests()
        .iter()
        .any(|r| r.json().is_some_and(|b| b["model"] == "gpt-4o-mini")));
    let served: Vec<_> = s
        .scrape
        .tokenfuse()
        .into_iter()
        .filter(|(x, _)| x.name == "tokenfuse_requests")
        .filter(|(x, _)| x.labels.get("tenant").map(String::as_str) == Some("thrifty"))
        .map(|(x, _)| (x.labels["model"].clone(), x.labels["cluster"].clone()))
        .collect();
    assert_eq!(served, vec![("gpt-4o-mini".into(), "economy".into())]);
}

/// The value of the one series of `metric` whose labels include `labels`.
fn value_of(scrape: &Catalogue, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .tokenfuse()
        .into_iter()
        .filter(|(x, _)| x.name == metric)
        .filter(|(x, _)| {
            labels
                .iter()
                .all(|(k, v)| x.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    found[0]
}

#[test]
fn tokens_per_request_are_histograms_with_the_shipped_token_buckets() {
    let s = shipped();
    let buckets: BTreeSet<String> = s
        .scrape
        .tokenfuse()
        .into_iter()
        .filter(|(x, _)| x.name == "tokenfuse_tokens_per_request_bucket")
        .filter_map(|(x, _)| x.labels.get("le").cloned())
        .collect();
    for le in ["32", "1024", "1048576", "+Inf"] {
        assert!(buckets.contains(le), "no bucket le={le}: {buckets:?}");
    }
    assert!(
        !buckets.contains("0.5"),
        "Envoy's default (millisecond) buckets: {buckets:?}"
    );
    // `warm`'s one request: 9 prompt tokens, and the mock's short completion.
    let warm = |kind: &str, suffix: &str, le: Option<&str>| {
        let mut labels = vec![("tenant", "warm"), ("kind", kind), ("model", "gpt-4o")];
        labels.extend(le.map(|le| ("le", le)));
        value_of(
            &s.scrape,
            &format!("tokenfuse_tokens_per_request_{suffix}"),
            &labels,
        )
    };
    for kind in ["prompt", "completion"] {
        assert_eq!(warm(kind, "count", None), 1.0, "{kind}");
        assert_eq!(warm(kind, "bucket", Some("32")), 1.0, "{kind}");
    }
    // `acme`'s requests that were read: 4 in all (one with dots in its model name).
    let acme_4o = value_of(
        &s.scrape,
        "tokenfuse_tokens_per_request_count",
        &[("tenant", "acme"), ("kind", "prompt"), ("model", "gpt-4o")],
    );
    assert!(acme_4o >= 3.0, "{acme_4o}");
}

#[test]
fn budget_gauges_are_refreshed_without_traffic_and_budget_counters_add_up() {
    let s = shipped();
    let key = [
        ("budget", "tenant-tokens"),
        ("tenant", "acme"),
        ("window", "day"),
    ];
    // The tick keeps every known key's gauges current: with no request at all, the
    // seconds until the window resets go down.
    let first = Catalogue::from_text(&s.envoy.prometheus());
    let before = value_of(&first, "tokenfuse_budget_reset_seconds", &key);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = Catalogue::from_text(&s.envoy.prometheus());
        let after = value_of(&now, "tokenfuse_budget_reset_seconds", &key);
        if after <= before - 2.0 || after > before {
            // Down by the time passed (or up: the day rolled over during the test).
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tokenfuse_budget_reset_seconds stayed at {after} (from {before}) for 20 s"
        );
    }
    assert_eq!(
        value_of(&first, "tokenfuse_budget_base", &key),
        1000.0,
        "tenant-tokens' base"
    );
    assert_eq!(
        value_of(
            &first,
            "tokenfuse_budget_request_cap",
            &[("budget", "request-cap")]
        ),
        5000.0
    );
    // What `warm` was charged for its one request is its use this window (its 830
    // reserved completion tokens settled to what the mock answered).
    let warm = [("budget", "tenant-tokens"), ("tenant", "warm")];
    let consumed = value_of(&first, "tokenfuse_budget_consumed", &warm);
    assert!(consumed > 9.0 && consumed < 839.0, "{consumed}");
    assert_eq!(value_of(&first, "tokenfuse_budget_used", &warm), consumed);
    assert_eq!(value_of(&first, "tokenfuse_budget_settled", &warm), 1.0);
}

#[test]
fn every_metric_and_label_the_alert_rules_use_is_in_a_real_envoy_scrape() {
    let s = shipped();
    let mut check = check_with_recordings(&s.scrape);
    for (alert, expr, refs) in alert_exprs() {
        check.expr(&format!("alert {alert}"), &expr, &refs);
    }
    let used = check.finish(ALERTS);
    // Every alert the issue asks for is there.
    for metric in [
        "tokenfuse_budget_used",
        "tokenfuse_budget_limit",
        "tokenfuse_budget_remaining",
        "tokenfuse_tokens",
        "tokenfuse_cost_micro_usd",
        "tokenfuse_fail_open",
        "tokenfuse_parse_failures",
        "tokenfuse_budget_reset_seconds",
        "tokenfuse_retries",
        "tokenfuse_budget_consumed",
        "tokenfuse_budget_settled",
        "tokenfuse_budget_base",
    ] {
        assert!(used.contains_key(metric), "no rule reads {metric}");
    }
}

#[test]
fn the_fail_open_metric_the_alerts_read_is_one_the_filter_defines_with_a_budget_label() {
    // Not producible on purpose (see NOT_PRODUCIBLE): the alert's metric name and
    // label are checked against the filter's source instead.
    assert_eq!(
        labels_defined_in_source("fail_open"),
        Some(BTreeSet::from(["budget".to_string()]))
    );
    assert!(read(ALERTS).contains("tokenfuse_fail_open"));
}

#[test]
fn every_metric_and_label_the_grafana_dashboard_uses_is_in_a_real_envoy_scrape() {
    let s = shipped();
    let mut check = check_with_recordings(&s.scrape);
    for (what, expr, refs) in dashboard_exprs() {
        check.expr(&what, &expr, &refs);
    }
    let used = check.finish(DASHBOARD);
    for metric in [
        "tokenfuse_cost_micro_usd",
        "tokenfuse_budget_used",
        "tokenfuse_decisions",
    ] {
        assert!(
            used.contains_key(metric),
            "the dashboard does not show {metric}"
        );
    }
    assert!(used["tokenfuse_cost_micro_usd"].contains("tenant"));
    assert!(used["tokenfuse_cost_micro_usd"].contains("model"));
    assert!(used["tokenfuse_decisions"].contains("decision"));
}

#[test]
fn every_tokenfuse_metric_and_label_the_flagger_templates_use_is_in_a_real_envoy_scrape() {
    let s = shipped();
    let mut check = Check::new(&s.scrape, FLAGGER_TARGET_LABELS);
    let exprs = flagger_exprs();
    assert_eq!(exprs.len(), 3, "tokens, cost and rejections per request");
    for (what, expr, refs) in &exprs {
        check.expr(what, expr, refs);
        // Canary and primary are both measured, told apart by the pod name.
        assert!(
            expr.contains(r#"pod=~"{{ target }}-[0-9a-zA-Z]+-[0-9a-zA-Z]+""#),
            "{what}"
        );
        assert!(
            expr.contains(r#"pod=~"{{ target }}-primary-[0-9a-zA-Z]+-[0-9a-zA-Z]+""#),
            "{what}"
        );
        assert!(expr.contains("[{{ interval }}]"), "{what}");
    }
    let used = check.finish(FLAGGER);
    for metric in [
        "tokenfuse_tokens",
        "tokenfuse_cost_micro_usd",
        "tokenfuse_requests",
        "tokenfuse_decisions",
    ] {
        assert!(used.contains_key(metric), "no template reads {metric}");
    }
}

#[test]
fn the_dashboard_and_flagger_queries_parse_in_promtool() {
    let tool = promtool();
    let mut rules = Vec::new();
    for (i, (what, expr, _)) in dashboard_exprs()
        .into_iter()
        .chain(flagger_exprs())
        .enumerate()
    {
        if expr.starts_with("label_values(") {
            continue; // Grafana's own function, not PromQL
        }
        rules.push(json!({
            "record": format!("tokenfuse_check:query_{i}"),
            "expr": concrete_promql(&expr),
            "labels": {"source": what}
        }));
    }
    let dir = scratch_dir("promql");
    let path = dir.join("queries.rules.json");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(
        &path,
        json!({"groups": [{"name": "dashboard-and-flagger", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let out = Command::new(&tool)
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// =======================================================================================
// Tests: Istio
// =======================================================================================

#[test]
fn the_istio_proxy_config_names_every_tag_the_shipped_stats_tags_name() {
    let (tags, prefixes) = istio_proxy_settings();
    let shipped: BTreeSet<String> = shipped_tag_names().into_iter().collect();
    let istio: BTreeSet<String> = tags.iter().cloned().collect();
    assert_eq!(istio, shipped);
    assert_eq!(istio.len(), tags.len(), "no duplicate tags");
    assert!(
        prefixes
            .iter()
            .any(|p| "wasmcustom.tokenfuse_requests".starts_with(p.as_str())),
        "an inclusion prefix must keep wasmcustom.tokenfuse_… stats: {prefixes:?}"
    );
}

#[test]
fn the_stats_config_istio_generates_from_the_proxy_config_gives_the_same_labelled_series() {
    let (tags, prefixes) = istio_proxy_settings();
    let istio = start_stack(Some(istio_stats_config(&tags, &prefixes)), 1);
    let shipped = shipped();
    let a = shipped.scrape.identities();
    let b = istio.scrape.identities();
    assert!(!b.is_empty());
    let only_shipped: Vec<_> = a.difference(&b).map(ToString::to_string).collect();
    let only_istio: Vec<_> = b.difference(&a).map(ToString::to_string).collect();
    assert!(
        only_shipped.is_empty() && only_istio.is_empty(),
        "series differ.\nonly with the shipped stats_tags:\n  {}\nonly with Istio's:\n  {}",
        only_shipped.join("\n  "),
        only_istio.join("\n  ")
    );
}

#[test]
fn istios_always_included_wasm_stats_prefix_alone_keeps_the_tokenfuse_stats() {
    // No proxyStatsMatcher at all: only the prefixes Istio always includes.
    let (tags, _) = istio_proxy_settings();
    let primary = MockUpstream::start("primary").unwrap();
    let spec = EnvoySpec {
        extra_bootstrap_yaml: Some(istio_stats_config(&tags, &[])),
        concurrency: 1,
        ..EnvoySpec::new(SCRAPE_CONFIG, primary.port(), 1)
    };
    let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("Envoy did not start: {e}"));
    let r = envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "acme")],
            &chat("gpt-4o", 10),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let scrape = Catalogue::from_text(&envoy.prometheus());
        if scrape.has("tokenfuse_requests", "tenant", "acme") || Instant::now() > deadline {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        scrape.has("tokenfuse_requests", "tenant", "acme"),
        "tokenfuse_requests missing"
    );
    // The matcher is in force: `server.*` is kept, cluster stats no pattern names are gone.
    assert!(scrape.has_metric("envoy_server_uptime"));
    assert!(
        !scrape.has_metric("envoy_cluster_upstream_rq_total"),
        "the stats matcher did not apply"
    );
}

#[test]
fn the_envoyfilter_extension_config_loads_in_envoy_validate_with_the_built_module() {
    let (_, patches) = envoyfilter();
    let (tags, prefixes) = istio_proxy_settings();
    let stats: Value = yaml_str_docs(&istio_stats_config(&tags, &prefixes))[0].clone();
    let bootstrap = bootstrap_with(
        vec![extension_config_filter(&wasm())],
        &patches["LISTENER"]["patch"]["value"],
        stats,
    );
    assert_eq!(
        bootstrap["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"],
        json!(4194304)
    );
    assert_validates("envoyfilter-extension-config", &bootstrap);
}

#[test]
fn the_envoyfilter_http_filter_patch_with_config_discovery_loads_in_envoy_validate() {
    let (_, patches) = envoyfilter();
    let value = patches["HTTP_FILTER"]["patch"]["value"].clone();
    assert!(value.get("config_discovery").is_some());
    // Istio's sidecars reach istiod over ADS through the xds-grpc cluster, as a node
    // with an id and a cluster.
    let extra = json!({
        "node": {"id": "sidecar~10.0.0.7~chatbot-7d4b9c8f6-x2x9z.llm-apps~llm-apps.svc.cluster.local",
                 "cluster": "chatbot.llm-apps"},
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}},
        "clusters": [static_cluster("xds-grpc", true)]
    });
    let bootstrap = bootstrap_with(vec![value], &Value::Null, extra);
    assert_validates("envoyfilter-http-filter", &bootstrap);
}

#[test]
fn the_envoyfilter_extension_config_serves_real_traffic() {
    let primary = MockUpstream::start("primary").unwrap();
    let economy = MockUpstream::start("economy").unwrap();
    let filter = extension_config_filter("__replaced__");
    let spec = EnvoySpec {
        http_filter_yaml: Some(as_harness_filter(&filter)),
        concurrency: 1,
        ..EnvoySpec::new("{}", primary.port(), economy.port())
    };
    let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("Envoy did not start: {e}"));
    let r = envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "acme")],
            &chat("gpt-4o", 10),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-tokenfuse-prompt-tokens").is_some());
    assert!(r.header("x-ratelimit-limit-tokens").is_some());
}

/// The header name and exact value of the VirtualService's economy route.
fn virtual_service_reroute_match() -> (String, String) {
    let docs = yaml_docs(ENVOYFILTER);
    let vs = docs
        .iter()
        .find(|d| d["kind"] == "VirtualService")
        .expect("a VirtualService document");
    let headers = vs["spec"]["http"][0]["match"][0]["headers"]
        .as_object()
        .expect("the first route matches a header");
    let (name, m) = headers.iter().next().unwrap();
    (name.clone(), m["exact"].as_str().unwrap().to_string())
}

#[test]
fn the_wasmplugin_as_istio_renders_it_loads_in_envoy_validate() {
    let bootstrap = bootstrap_with(
        vec![wasmplugin_filter(&wasm(), None)],
        &Value::Null,
        json!({}),
    );
    assert_validates("wasmplugin", &bootstrap);
}

/// Sends an LLM request on a raw connection and waits up to `wait` for any byte back.
fn answered_within(port: u16, wait: Duration) -> Result<Vec<u8>, std::io::Error> {
    let body = chat("gpt-4o", 10);
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(wait))?;
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nx-tenant: acme\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Until the end of the response head (or of the connection).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(answer)
}

#[test]
fn as_istio_renders_the_wasmplugin_llm_requests_are_counted_and_refused_without_held_headers() {
    let primary = MockUpstream::start("primary").unwrap();
    let spec = EnvoySpec {
        http_filter_yaml: Some(as_harness_filter(&wasmplugin_filter("x", None))),
        concurrency: 1,
        ..EnvoySpec::new("{}", primary.port(), 1)
    };
    let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("Envoy did not start: {e}"));
    // Other requests pass through the filter (which is loaded and counting them).
    let r = envoy.get("/healthz", &[]).unwrap();
    assert_eq!(r.status, 200);
    // An LLM request is answered and counted although the headers were not held.
    let answer = answered_within(envoy.listener_port, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-tokenfuse-prompt-tokens: 9"), "{text}");
    // Over the per-request cap (0.3 of 100000): refused from the body phase, and the body
    // never reaches the upstream (Envoy resets the upstream request it had started).
    let r = envoy
        .post_json(
            "/v1/chat/completions",
            &[("x-tenant", "acme")],
            &chat("gpt-4o", 40_000),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_tokens_exceeded");
    let completed = primary
        .requests()
        .iter()
        .filter(|q| q.path.ends_with("/chat/completions"))
        .count();
    assert_eq!(
        completed, 1,
        "only the admitted request reached the upstream whole"
    );
}

#[test]
fn the_same_rendering_with_allow_on_headers_stop_iteration_answers_llm_requests() {
    let primary = MockUpstream::start("primary").unwrap();
    let spec = EnvoySpec {
        http_filter_yaml: Some(as_harness_filter(&wasmplugin_filter("x", Some(true)))),
        concurrency: 1,
        ..EnvoySpec::new("{}", primary.port(), 1)
    };
    let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("Envoy did not start: {e}"));
    let answer = answered_within(envoy.listener_port, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-tokenfuse-prompt-tokens"), "{text}");
}

#[test]
fn every_shipped_envoy_yaml_passes_envoy_validate() {
    let _ = wasm_path(); // fails with "run make build" when the module is missing
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        // From the repository root: the configs name the module relative to it.
        let (ok, output) = envoy_validate(&path, &repo_root());
        assert!(ok, "envoy --mode validate {}:\n{output}", path.display());
        checked += 1;
    }
    assert!(checked >= 1);
}

// =======================================================================================
// Tests: manifest structure (no CRD schemas here: the fields Istio and Flagger document)
// =======================================================================================

#[test]
fn the_identity_manifest_sets_the_trusted_headers_from_verified_claims() {
    let docs = yaml_docs("envoy/istio/tokenfuse-identity.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["RequestAuthentication", "AuthorizationPolicy"]);
    let rule = &docs[0]["spec"]["jwtRules"][0];
    assert!(rule["issuer"].is_string() && rule["jwksUri"].is_string());
    let headers: Vec<&str> = rule["outputClaimToHeaders"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["header"].as_str())
        .collect();
    assert_eq!(headers, ["x-tenant", "x-tokenfuse-priority"]);
    let policy = &docs[1]["spec"];
    assert_eq!(policy["action"].as_str(), Some("DENY"));
    assert_eq!(
        policy["rules"][0]["from"][0]["source"]["notRequestPrincipals"][0].as_str(),
        Some("*")
    );
}

#[test]
fn the_envoyfilter_manifest_has_the_fields_istio_requires() {
    let (ef, patches) = envoyfilter();
    assert_eq!(ef["apiVersion"], "networking.istio.io/v1alpha3");
    assert!(ef["metadata"]["name"].is_string() && ef["metadata"]["namespace"].is_string());
    let apply_to = [
        "LISTENER",
        "FILTER_CHAIN",
        "NETWORK_FILTER",
        "HTTP_FILTER",
        "ROUTE_CONFIGURATION",
        "VIRTUAL_HOST",
        "HTTP_ROUTE",
        "CLUSTER",
        "EXTENSION_CONFIG",
    ];
    let operations = [
        "MERGE",
        "ADD",
        "REMOVE",
        "INSERT_BEFORE",
        "INSERT_AFTER",
        "INSERT_FIRST",
        "REPLACE",
    ];
    let contexts = ["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"];
    for patch in ef["spec"]["configPatches"].as_array().unwrap() {
        let target = patch["applyTo"].as_str().unwrap();
        assert!(apply_to.contains(&target), "applyTo {target}");
        let op = patch["patch"]["operation"].as_str().unwrap();
        assert!(operations.contains(&op), "operation {op}");
        if let Some(ctx) = patch.pointer("/match/context").and_then(Value::as_str) {
            assert!(contexts.contains(&ctx), "context {ctx}");
        }
        assert!(patch["patch"]["value"].is_object(), "{target} has a value");
    }
    // The ECDS pair: the HTTP filter asks for the extension config by its name.
    let ext = &patches["EXTENSION_CONFIG"]["patch"];
    let http = &patches["HTTP_FILTER"]["patch"];
    assert!(["ADD", "REPLACE"].contains(&ext["operation"].as_str().unwrap()));
    assert_eq!(ext["value"]["name"], http["value"]["name"]);
    assert_eq!(ext["value"]["typed_config"]["@type"], WASM_TYPE);
    assert_eq!(
        http["value"]["config_discovery"]["type_urls"],
        json!([WASM_TYPE])
    );
    assert_eq!(
        patches["HTTP_FILTER"]["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
        "envoy.filters.http.router"
    );
    assert_eq!(http["operation"], "INSERT_BEFORE");
    let config = &ext["value"]["typed_config"]["config"];
    assert_eq!(config["allow_on_headers_stop_iteration"], true);
    assert_eq!(config["failure_policy"], "FAIL_RELOAD");
    // Its workload selector is the label the example workload carries.
    let selector = ef["spec"]["workloadSelector"]["labels"]
        .as_object()
        .unwrap();
    let deploy = yaml_docs(PROXY_CONFIG)
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    for (k, v) in selector {
        assert_eq!(
            &deploy["spec"]["template"]["metadata"]["labels"][k], v,
            "{k}"
        );
    }
    // The VirtualService routes the filter's reroute header (the defaults in docs/configuration.md).
    let (header, value) = virtual_service_reroute_match();
    let plugin: Value =
        serde_json::from_str(config["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        header,
        plugin["reroute"]["header"]
            .as_str()
            .unwrap_or("x-tokenfuse-route")
    );
    assert_eq!(
        value,
        plugin["reroute"]["value"].as_str().unwrap_or("economy")
    );
    let vs = yaml_docs(ENVOYFILTER)
        .into_iter()
        .find(|d| d["kind"] == "VirtualService")
        .unwrap();
    assert!(vs["apiVersion"]
        .as_str()
        .unwrap()
        .starts_with("networking.istio.io/"));
    assert!(vs["spec"]["hosts"]
        .as_array()
        .is_some_and(|h| !h.is_empty()));
}

#[test]
fn the_wasmplugin_manifest_has_the_fields_istio_requires_and_only_count_and_reject_settings() {
    let docs = yaml_docs(WASMPLUGIN);
    assert_eq!(docs.len(), 1);
    let wp = &docs[0];
    assert_eq!(wp["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(wp["kind"], "WasmPlugin");
    let spec = &wp["spec"];
    let url = spec["url"].as_str().expect("url is required");
    assert!(["file://", "oci://", "http://", "https://"]
        .iter()
        .any(|s| url.starts_with(s)));
    assert!(
        spec.get("selector").is_some() != spec.get("targetRefs").is_some(),
        "exactly one of selector and targetRefs"
    );
    assert!(["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"]
        .contains(&spec["failStrategy"].as_str().unwrap()));
    assert!(["HTTP", "UNSPECIFIED_PLUGIN_TYPE"].contains(&spec["type"].as_str().unwrap()));
    // A WasmPlugin cannot set allow_on_headers_stop_iteration.
    assert!(!read(WASMPLUGIN)
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains("allow_on_headers")));
    // Count and reject only: nothing that reroutes or rewrites the request body.
    let config = &spec["pluginConfig"];
    assert!(config.get("reroute").is_none());
    assert!(config.get("inject_stream_usage").is_none());
    for budget in config["budgets"].as_array().unwrap() {
        assert_ne!(budget["action"], "reroute", "{budget}");
        assert!(budget.get("degrade_from").is_none(), "{budget}");
        assert_ne!(budget["oversize"], "truncate", "{budget}");
    }
}

#[test]
fn the_flagger_templates_and_the_canary_example_are_well_formed() {
    let templates = yaml_docs(FLAGGER);
    let mut names = BTreeSet::new();
    for t in &templates {
        assert_eq!(t["apiVersion"], "flagger.app/v1beta1");
        assert_eq!(t["kind"], "MetricTemplate");
        assert_eq!(t["spec"]["provider"]["type"], "prometheus");
        assert!(str_at(t, "/spec/provider/address", FLAGGER).starts_with("http"));
        names.insert((
            str_at(t, "/metadata/name", FLAGGER).to_string(),
            str_at(t, "/metadata/namespace", FLAGGER).to_string(),
        ));
    }
    let canary = &yaml_docs(CANARY)[0];
    assert_eq!(canary["apiVersion"], "flagger.app/v1beta1");
    assert_eq!(canary["kind"], "Canary");
    assert_eq!(canary["spec"]["provider"], "istio");
    let mut referenced = BTreeSet::new();
    for metric in canary["spec"]["analysis"]["metrics"].as_array().unwrap() {
        assert!(metric["thresholdRange"].is_object(), "{metric}");
        if let Some(r) = metric.get("templateRef") {
            let ns =
                r["namespace"]
                    .as_str()
                    .unwrap_or(str_at(canary, "/metadata/namespace", CANARY));
            let key = (r["name"].as_str().unwrap().to_string(), ns.to_string());
            assert!(names.contains(&key), "no MetricTemplate {key:?}");
            assert!(metric["interval"].is_string(), "{metric}");
            referenced.insert(key);
        }
    }
    assert_eq!(referenced, names, "the example uses every template");
}

#[test]
fn the_grafana_dashboard_is_a_well_formed_dashboard() {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().unwrap();
    let ids: BTreeSet<i64> = panels.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        assert!(p["gridPos"].is_object(), "{}", p["title"]);
        if p["type"] != "row" {
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{}",
                p["title"]
            );
        }
    }
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    // Every $variable a query uses is defined (Grafana's own $__ ones aside).
    for (what, expr, _) in dashboard_exprs() {
        for var in expr.split('$').skip(1) {
            let name: String = var.chars().take_while(|c| is_ident_char(*c)).collect();
            if !name.starts_with("__") {
                assert!(
                    vars.contains(name.as_str()),
                    "{what} uses undefined ${name}"
                );
            }
        }
    }
    // Spend per tenant and per model, budget usage, decisions.
    let text = read(DASHBOARD);
    for needle in [
        "sum by (tenant) (rate(tokenfuse_cost_micro_usd",
        "sum by (model) (rate(tokenfuse_cost_micro_usd",
        "tokenfuse_budget_used",
        "sum by (decision) (rate(tokenfuse_decisions",
        // Tokens per request as quantiles, retries, sizing next to the configured base.
        "histogram_quantile(0.95, sum by (le) (rate(tokenfuse_tokens_per_request_bucket",
        "rate(tokenfuse_retries",
        "tokenfuse:budget_base:recommended",
        "tokenfuse:budget_request_cap:recommended",
        "tokenfuse_budget_base",
    ] {
        assert!(text.contains(needle), "the dashboard lacks {needle}");
    }
}

#[test]
fn the_promql_reader_finds_selectors_groupings_and_template_labels() {
    let refs = promql_refs(
        r#"sum by (tenant, model) (rate(tokenfuse_tokens{kind="prompt", pod=~"{{ target }}-x"}[{{ interval }}])) / 1e6
           and on (tenant) sum(tokenfuse_cost_micro_usd offset 1d) or label_values(tokenfuse_requests, api)"#,
    );
    let metrics: Vec<&str> = refs.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "tokenfuse_tokens",
            "tokenfuse_cost_micro_usd",
            "tokenfuse_requests"
        ]
    );
    let m = &refs.selectors[0].matchers;
    assert_eq!(
        (m[0].label.as_str(), m[0].op.as_str(), m[0].value.as_str()),
        ("kind", "=", "prompt")
    );
    assert_eq!((m[1].label.as_str(), m[1].op.as_str()), ("pod", "=~"));
    assert_eq!(
        refs.grouping,
        BTreeSet::from(["tenant".to_string(), "model".to_string()])
    );
    assert_eq!(refs.selectors[2].matchers[0].label, "api");
    assert_eq!(
        template_labels("{{ $labels.budget }} at {{ $value | humanize }} {{tenant}}"),
        BTreeSet::from(["budget".to_string(), "tenant".to_string()])
    );
}

#[test]
fn the_exposition_reader_parses_envoys_prometheus_lines() {
    let parsed = parse_exposition(
        "# TYPE tokenfuse_tokens counter\n\
         tokenfuse_tokens{kind=\"prompt\",model=\"gpt-4.1\",note=\"a\\\"b\"} 42\n\
         envoy_server_uptime 7\n",
    );
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0].0.labels["model"], "gpt-4.1");
    assert_eq!(parsed[0].0.labels["note"], "a\"b");
    assert_eq!(parsed[0].1, "42");
    assert_eq!(parsed[1].0.name, "envoy_server_uptime");
    assert!(parsed[1].0.labels.is_empty());
}

#[test]
fn a_missing_metric_or_label_is_reported() {
    let scrape = Catalogue::from_text("tokenfuse_requests{tenant=\"a\",model=\"m\"} 1\n");
    let mut check = Check::new(&scrape, &["pod"]);
    check.expr(
        "q",
        r#"sum by (cluster) (tokenfuse_requests{pod="x", tenant="b"}) + tokenfuse_nope"#,
        &BTreeSet::new(),
    );
    let problems = check.problems.join("\n");
    assert!(
        problems.contains("tokenfuse_nope is not in the scrape"),
        "{problems}"
    );
    assert!(problems.contains("tenant=\"b\""), "{problems}");
    assert!(problems.contains("\"cluster\""), "{problems}");
    assert!(!problems.contains("\"pod\""), "{problems}");
}
