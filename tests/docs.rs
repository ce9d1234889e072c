//! The documentation against the code: `docs/configuration.md` documents exactly the
//! configuration fields the filter accepts, and every relative link in `README.md` and
//! `docs/*.md` reaches an existing file (and heading).
//!
//! The accepted fields are read from `src/config/raw.rs` itself: the fields of its `Raw*` serde
//! structs (each `#[serde(deny_unknown_fields)]`, so they are exactly what a configuration
//! may contain), followed from `RawConfig` through the field types, honouring
//! `#[serde(rename = "…")]`. A field of a list of structs continues as `name[].…`, a map of
//! structs as `name.<key>.…`. The documented fields are the first cells of the tables whose
//! first column is headed `Field`; in both sets any `<…>` placeholder counts as one.

// Test code: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One field of a `Raw*` struct: its name in the JSON document and its Rust type.
#[derive(Debug)]
struct Field {
    name: String,
    ty: String,
}

/// A `Raw*` struct: its `#[serde(…)]` attributes and its fields in order.
#[derive(Debug, Default)]
struct RawStruct {
    serde: Vec<String>,
    fields: Vec<Field>,
}

/// The `Raw*` structs of `source`, by name.
fn raw_structs(source: &str) -> BTreeMap<String, RawStruct> {
    let mut structs = BTreeMap::new();
    // The attributes just above the line being read.
    let mut attrs: Vec<String> = Vec::new();
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.starts_with("#[") {
            attrs.push(t.to_string());
            continue;
        }
        if t.starts_with("///") {
            continue;
        }
        let above = std::mem::take(&mut attrs);
        let Some(name) = struct_name(t).filter(|n| n.starts_with("Raw")) else {
            continue;
        };
        assert!(
            t.ends_with('{'),
            "tests/docs.rs reads `struct {name} {{` on one line: {line:?}"
        );
        let mut raw = RawStruct {
            serde: above
                .iter()
                .filter_map(|a| a.strip_prefix("#[serde(")?.strip_suffix(")]"))
                .map(str::to_string)
                .collect(),
            fields: Vec::new(),
        };
        let mut rename: Option<String> = None;
        let mut pending = String::new();
        for line in lines.by_ref() {
            let t = line.trim();
            if t == "}" {
                break;
            }
            if t.is_empty() || t.starts_with("//") {
                continue;
            }
            if let Some(attr) = t.strip_prefix("#[serde(") {
                rename = serde_field_attr(&name, attr.trim_end_matches(")]")).or(rename);
                continue;
            }
            if t.starts_with("#[") {
                continue;
            }
            // A field, possibly spread over lines: `[pub] name: Type,`.
            pending.push_str(t);
            pending.push(' ');
            if !t.ends_with(',') {
                continue;
            }
            let decl = std::mem::take(&mut pending);
            let decl = decl.trim().trim_end_matches(',');
            let decl = decl
                .strip_prefix("pub(crate) ")
                .or_else(|| decl.strip_prefix("pub(super) "))
                .or_else(|| decl.strip_prefix("pub "))
                .unwrap_or(decl);
            let (ident, ty) = decl
                .split_once(':')
                .unwrap_or_else(|| panic!("{name}: cannot read the field {decl:?}"));
            let ident = ident.trim().trim_start_matches("r#");
            raw.fields.push(Field {
                name: rename.take().unwrap_or_else(|| ident.to_string()),
                ty: ty.trim().to_string(),
            });
        }
        assert!(pending.is_empty(), "{name}: unfinished field {pending:?}");
        assert!(
            structs.insert(name.clone(), raw).is_none(),
            "two structs named {name}"
        );
    }
    structs
}

/// `Name` of a line declaring `struct Name`.
fn struct_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub(super) "))
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let rest = t.strip_prefix("struct ")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The JSON name a field attribute gives (`rename = "match"`), if any. Attributes that
/// change which fields exist in ways this test does not follow (`flatten`, `alias`, …)
/// fail it.
fn serde_field_attr(owner: &str, attr: &str) -> Option<String> {
    let mut renamed = None;
    for part in attr.split(',') {
        let part = part.trim();
        let key = part.split('=').next().unwrap_or(part).trim();
        match key {
            "default" | "deserialize_with" | "with" => {}
            "rename" => {
                let value = part.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
                renamed = Some(value.trim_matches('"').to_string());
            }
            _ => panic!(
                "{owner}: tests/docs.rs does not follow #[serde({attr})]; teach it, so the \
                 documented fields stay the accepted ones"
            ),
        }
    }
    renamed
}

/// Every field path the configuration accepts, struct-valued fields included.
fn accepted_fields() -> BTreeSet<String> {
    let structs = raw_structs(&read(&repo().join("src/config/raw.rs")));
    assert!(
        structs.contains_key("RawConfig"),
        "no RawConfig in src/config/raw.rs"
    );
    for (name, raw) in &structs {
        // Only unknown fields refused make "the fields" a closed set; a struct-level
        // rename_all (or anything else) would change names this test does not follow.
        assert_eq!(
            raw.serde,
            ["deny_unknown_fields"],
            "{name}: tests/docs.rs expects #[serde(deny_unknown_fields)] and nothing else"
        );
    }
    let mut paths = BTreeSet::new();
    let mut reached = BTreeSet::new();
    walk(&structs, "RawConfig", "", &mut paths, &mut reached, 0);
    let unreached: Vec<_> = structs.keys().filter(|s| !reached.contains(*s)).collect();
    assert!(
        unreached.is_empty(),
        "Raw structs not reachable from RawConfig (is the reader of tests/docs.rs wrong?): {unreached:?}"
    );
    assert!(paths.contains("api") && paths.len() > 40, "{paths:?}");
    paths
}

fn walk(
    structs: &BTreeMap<String, RawStruct>,
    name: &str,
    prefix: &str,
    paths: &mut BTreeSet<String>,
    reached: &mut BTreeSet<String>,
    depth: usize,
) {
    assert!(
        depth < 16,
        "Raw structs nest too deep (a cycle?) at {prefix}"
    );
    reached.insert(name.to_string());
    let raw = structs
        .get(name)
        .unwrap_or_else(|| panic!("struct {name} not found in src/config/raw.rs"));
    for field in &raw.fields {
        let path = format!("{prefix}{}", field.name);
        assert!(paths.insert(path.clone()), "field {path} twice");
        if let Some(child) = raw_type_in(&field.ty) {
            let ty = field.ty.strip_prefix("Option<").unwrap_or(&field.ty);
            let nested = if ty.starts_with("Vec<") {
                format!("{path}[].")
            } else if ty.contains("Map<") {
                format!("{path}.<>.")
            } else {
                format!("{path}.")
            };
            walk(structs, &child, &nested, paths, reached, depth + 1);
        }
    }
}

/// The `Raw*` struct a field type refers to (`Option<Vec<RawX>>` → `RawX`).
fn raw_type_in(ty: &str) -> Option<String> {
    let start = ty
        .match_indices("Raw")
        .map(|(i, _)| i)
        .find(|&i| i == 0 || !ty[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))?;
    let name: String = ty[start..]
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    Some(name)
}

/// `prices.<model pattern>.input` → `prices.<>.input`.
fn normalize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut inside = false;
    for c in path.chars() {
        match c {
            '<' => {
                inside = true;
                out.push_str("<>");
            }
            '>' if inside => inside = false,
            _ if inside => {}
            c => out.push(c),
        }
    }
    out
}

/// The first cell of every row of every table in `markdown` whose first header is `Field`.
fn documented_fields(markdown: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut in_fields_table = false;
    let mut header_seen = false;
    for line in markdown.lines() {
        let t = line.trim();
        if !t.starts_with('|') {
            in_fields_table = false;
            header_seen = false;
            continue;
        }
        let first = t
            .trim_start_matches('|')
            .split('|')
            .next()
            .unwrap_or_default()
            .trim();
        if !header_seen {
            header_seen = true;
            in_fields_table = first == "Field";
            continue;
        }
        if !in_fields_table || first.chars().all(|c| matches!(c, '-' | ':' | ' ')) {
            continue;
        }
        let name = first
            .strip_prefix('`')
            .and_then(|f| f.strip_suffix('`'))
            .filter(|f| !f.contains('`'))
            .unwrap_or_else(|| {
                panic!("a Field row must start with one field in backticks: {line:?}")
            });
        fields.push(name.to_string());
    }
    fields
}

#[test]
fn every_configuration_field_is_documented_and_every_documented_field_exists() {
    let accepted: BTreeSet<String> = accepted_fields().iter().map(|p| normalize(p)).collect();
    let doc = read(&repo().join("docs/configuration.md"));
    let listed = documented_fields(&doc);
    let mut documented = BTreeSet::new();
    for field in &listed {
        assert!(
            documented.insert(normalize(field)),
            "docs/configuration.md documents `{field}` twice"
        );
    }
    let undocumented: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md and src/config/raw.rs disagree.\n  accepted by the code, not \
         documented: {undocumented:?}\n  documented, not accepted by the code: {unknown:?}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c.to_lowercase().next().unwrap_or(c)),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file's headings (outside code blocks).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = anchor(&line[hashes..]);
            // Repeated headings get -1, -2, … as on GitHub.
            let mut name = base.clone();
            let mut n = 0;
            while out.contains(&name) {
                n += 1;
                name = format!("{base}-{n}");
            }
            out.insert(name);
        }
    }
    out
}

/// Every `](target)` link target outside code blocks and inline code.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans, which may hold `](` of their own.
        let text: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| s)
            .collect();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            out.push(rest[..end].trim().to_string());
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_readme_and_docs_reaches_a_file() {
    let root = repo();
    let mut pages = vec![root.join("README.md")];
    let docs = std::fs::read_dir(root.join("docs")).expect("docs/ exists");
    for entry in docs {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    assert!(pages.len() > 2, "{pages:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = read(page);
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            checked += 1;
            if !resolved.exists() {
                broken.push(format!("{}: {target} (no such file)", page.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let is_md = resolved.extension().is_some_and(|e| e == "md");
                if is_md && !anchors(&read(&resolved)).contains(fragment) {
                    broken.push(format!("{}: {target} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} links found: is the reader wrong?"
    );
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn the_field_reader_follows_lists_maps_and_renames() {
    let source = r#"
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    api: String,
    #[serde(default)]
    items: Vec<RawItem>,
    prices: BTreeMap<String, RawPrice>,
    inner: Option<RawInner>,
}
struct RawItem {
    #[serde(rename = "match")]
    pattern: String,
}
struct RawPrice {
    input: f64,
}
struct RawInner {
    pub flag: Option<bool>,
}
"#;
    let structs = raw_structs(source);
    let mut paths = BTreeSet::new();
    let mut reached = BTreeSet::new();
    walk(&structs, "RawConfig", "", &mut paths, &mut reached, 0);
    let want: BTreeSet<String> = [
        "api",
        "items",
        "items[].match",
        "prices",
        "prices.<>.input",
        "inner",
        "inner.flag",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths, want);
    assert_eq!(normalize("prices.<model pattern>.input"), "prices.<>.input");
    assert_eq!(
        anchor("Admin, shared data, failure modes"),
        "admin-shared-data-failure-modes"
    );
    assert_eq!(
        anchor("Global budgets: test engine"),
        "global-budgets-test-engine"
    );
}
