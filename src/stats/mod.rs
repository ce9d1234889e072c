//! Stat names: what tokenfuse counts, and how tags ride inside Envoy metric names.
//!
//! A proxy-wasm metric is a flat name; Envoy turns parts of it into Prometheus labels with
//! the `stats_tags` regexes of the bootstrap (see `envoy/envoy.yaml`). Tags are written in
//! Istio's form, `name.key=.=value;.;`, because values such as `gpt-4.1` contain dots that a
//! dot-separated form would split. Values are sanitised to a safe alphabet and length, and
//! the number of distinct `model` values per VM is capped (further ones are tagged
//! `other`), because model names come from clients and every distinct value is a series.

pub mod catalog;

use rustc_hash::FxHashSet;

/// Every metric name starts with this.
pub const PREFIX: &str = "tokenfuse_";

/// Longest tag value kept.
const MAX_VALUE_LEN: usize = 64;

/// A metric name with its tags, built in a fixed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    name: String,
}

impl Stat {
    /// A metric `tokenfuse_<name>`.
    pub fn new(name: &str) -> Stat {
        // Room for a few tags, so building a name takes one allocation.
        let mut full =
            String::with_capacity(PREFIX.len().saturating_add(name.len()).saturating_add(96));
        full.push_str(PREFIX);
        full.push_str(name);
        Stat { name: full }
    }

    /// Append tag `key` with `value` (sanitised).
    pub fn tag(mut self, key: &str, value: &str) -> Stat {
        // `name.k1=.=v1;.;k2=.=v2;.;`: one dot after the base name, none between tags.
        if !self.name.ends_with(";.;") {
            self.name.push('.');
        }
        self.name.push_str(key);
        self.name.push_str("=.=");
        sanitize_into(&mut self.name, value);
        self.name.push_str(";.;");
        self
    }

    /// The full metric name to define in Envoy.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Add `n` to counter `stat`: nothing for 0 (Envoy rejects increments of zero).
pub fn add(host: &mut dyn crate::host::Host, stat: &Stat, n: u64) {
    if n > 0 {
        host.counter_add(stat.name(), n);
    }
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '@' | '+' | '-')
}

/// Keep `[A-Za-z0-9._:/@+-]`, replace anything else with `_`, cap the length; an empty value
/// becomes `unknown`. `;` and `=` never survive, so a value cannot forge the tag framing.
pub fn sanitize(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(MAX_VALUE_LEN));
    sanitize_into(&mut out, value);
    out
}

/// [`sanitize`], appended to `out`.
fn sanitize_into(out: &mut String, value: &str) {
    // Almost every value (tag values the filter chose, names already sanitised) is clean:
    // copy it as it is.
    if !value.is_empty()
        && value.len() <= MAX_VALUE_LEN
        && value.bytes().all(|b| allowed(char::from(b)))
    {
        out.push_str(value);
        return;
    }
    let start = out.len();
    out.extend(
        value
            .chars()
            .take(MAX_VALUE_LEN)
            .map(|c| if allowed(c) { c } else { '_' }),
    );
    if out.len() == start {
        out.push_str("unknown");
    }
}

/// Caps the distinct values of a client-controlled tag.
#[derive(Debug)]
pub struct TagLimiter {
    seen: FxHashSet<String>,
    limit: usize,
}

impl TagLimiter {
    /// Allow at most `limit` distinct values.
    pub fn new(limit: usize) -> Self {
        TagLimiter {
            seen: FxHashSet::default(),
            limit,
        }
    }

    /// The value to tag with: `value` (sanitised) while under the cap or already seen,
    /// `other` beyond it.
    pub fn admit(&mut self, value: &str) -> String {
        let clean = sanitize(value);
        if self.seen.contains(&clean) {
            return clean;
        }
        if self.seen.len() < self.limit {
            self.seen.insert(clean.clone());
            return clean;
        }
        "other".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_tags_in_istio_form() {
        let s = Stat::new("tokens")
            .tag("kind", "prompt")
            .tag("model", "gpt-4.1");
        assert_eq!(
            s.name(),
            "tokenfuse_tokens.kind=.=prompt;.;model=.=gpt-4.1;.;"
        );
    }

    #[test]
    fn values_cannot_forge_tag_framing() {
        assert_eq!(sanitize("a;.;b=.=c"), "a_._b_._c");
        assert_eq!(sanitize("llama 3 {x}"), "llama_3__x_");
        assert_eq!(sanitize(""), "unknown");
        assert_eq!(sanitize(&"x".repeat(500)).len(), 64);
        assert_eq!(sanitize("org/model@v1:2+b"), "org/model@v1:2+b");
    }

    #[test]
    fn limiter_tags_values_beyond_the_cap_as_other() {
        let mut l = TagLimiter::new(2);
        assert_eq!(l.admit("a"), "a");
        assert_eq!(l.admit("b"), "b");
        assert_eq!(l.admit("c"), "other");
        assert_eq!(l.admit("a"), "a");
    }
}
