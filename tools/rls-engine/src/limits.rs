//! The limits file: Limitador's own YAML format, read the way limitador-server reads it
//! (`serde_yaml` straight into `Vec<limitador::limit::Limit>`), so one file serves this
//! engine and a real Limitador.
//!
//! The file is a YAML list; each item is one limit:
//!
//! ```yaml
//! - namespace: tokenfuse          # the RateLimitRequest domain
//!   name: tenant-daily            # optional: reported as the limit that tripped
//!   max_value: 10000              # the counter's ceiling (hits_addend units)
//!   seconds: 86400                # window length; it starts at the counter's first hit
//!   conditions:                   # CEL predicates, all must hold; [] = always
//!     - "descriptors[0].budget == 'tenant-daily'"
//!   variables:                    # CEL expressions; one counter per distinct value
//!     - "descriptors[0].key"
//! ```
//!
//! `namespace`, `seconds`, `conditions` and `variables` are required (a blank or `[]`
//! list means none); `name` and `id` are optional. A missing `max_value` is read as 0 —
//! a limit that refuses everything (Limitador's `#[serde(default)]`), so the engine logs
//! every limit it loads. The request's
//! descriptors are bound to CEL as `descriptors`, a list of maps from entry key to entry
//! value, so `descriptors[0].budget` (or `descriptors[0]['budget']` for keys that are not
//! identifiers) is the value of entry `budget` of the first descriptor.
//!
//! Pitfall, from limitador 0.14's `Limit::applies`: a condition that indexes past the
//! request's last descriptor is an evaluation error that limitador `unwrap`s, so the call
//! panics and the caller gets a broken gRPC stream instead of an answer. A missing *key*
//! in an existing descriptor is fine (the condition is false). Guard later descriptors
//! with `size(descriptors) > 1 && …`, or send budgets one per request.

use std::fmt;
use std::path::Path;

use limitador::limit::Limit;

/// Why the limits file cannot be used.
#[derive(Debug)]
pub enum LimitsError {
    /// The file could not be read.
    Read(String, std::io::Error),
    /// The file is not a list of Limitador limits (the message quotes line and column).
    Parse(String, serde_yaml::Error),
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitsError::Read(path, e) => write!(f, "cannot read limits file {path}: {e}"),
            LimitsError::Parse(path, e) => write!(
                f,
                "limits file {path} is not a list of Limitador limits: {e}"
            ),
        }
    }
}

impl std::error::Error for LimitsError {}

/// Parses the text of a limits file; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Limit>, LimitsError> {
    serde_yaml::from_str(text).map_err(|e| LimitsError::Parse(origin.to_string(), e))
}

/// Reads and parses the limits file at `path`.
pub fn load(path: &Path) -> Result<Vec<Limit>, LimitsError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LimitsError::Read(origin.clone(), e))?;
    parse(&text, &origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: &str = r#"
- namespace: tokenfuse
  name: tenant-daily
  max_value: 10000
  seconds: 86400
  conditions:
    - "descriptors[0].budget == 'tenant-daily'"
  variables:
    - "descriptors[0].key"
"#;

    #[test]
    fn a_budget_limit_parses_with_every_field() {
        let limits = parse(BUDGET, "test").unwrap();
        assert_eq!(limits.len(), 1);
        let limit = &limits[0];
        assert_eq!(limit.namespace().as_ref(), "tokenfuse");
        assert_eq!(limit.name(), Some("tenant-daily"));
        assert_eq!(limit.max_value(), 10000);
        assert_eq!(limit.seconds(), 86400);
        assert!(limit
            .conditions()
            .contains("descriptors[0].budget == 'tenant-daily'"));
        assert!(limit.variables().contains("descriptors[0].key"));
    }

    #[test]
    fn empty_lists_are_accepted_and_name_is_optional() {
        let limits = parse(
            "- {namespace: ns, max_value: 1, seconds: 1, conditions: [], variables: []}",
            "test",
        )
        .unwrap();
        assert_eq!(limits[0].name(), None);
        assert!(limits[0].conditions().is_empty());
    }

    #[test]
    fn a_blank_conditions_field_is_read_as_no_conditions() {
        let limits = parse(
            "- namespace: ns\n  max_value: 1\n  seconds: 1\n  conditions:\n  variables:\n",
            "test",
        )
        .unwrap();
        assert!(limits[0].conditions().is_empty());
        assert!(limits[0].variables().is_empty());
    }

    #[test]
    fn a_missing_max_value_is_read_as_zero() {
        // Limitador's own pitfall (`#[serde(default)]`): a misspelt `max_value` makes a
        // limit that refuses everything. The engine logs every limit it loads.
        let limits = parse(
            "- {namespace: ns, seconds: 1, max_vlaue: 10, conditions: [], variables: []}",
            "f",
        )
        .unwrap();
        assert_eq!(limits[0].max_value(), 0);
    }

    #[test]
    fn a_missing_required_field_is_an_error_naming_the_field_and_place() {
        for (yaml, field) in [
            (
                "- {max_value: 1, seconds: 1, conditions: [], variables: []}",
                "namespace",
            ),
            (
                "- {namespace: n, max_value: 1, conditions: [], variables: []}",
                "seconds",
            ),
            (
                "- {namespace: n, max_value: 1, seconds: 1, variables: []}",
                "conditions",
            ),
            (
                "- {namespace: n, max_value: 1, seconds: 1, conditions: []}",
                "variables",
            ),
        ] {
            let err = parse(yaml, "f").unwrap_err().to_string();
            assert!(err.contains(&format!("missing field `{field}`")), "{err}");
            assert!(err.contains("line 1 column 3"), "{err}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_list_is_an_error() {
        let err = parse("namespace: ns\n", "limits.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "limits file limits.yaml is not a list of Limitador limits: \
             invalid type: map, expected a sequence"
        );
    }

    #[test]
    fn a_condition_that_is_not_cel_is_an_error() {
        let err = parse(
            "- {namespace: ns, max_value: 1, seconds: 1, conditions: ['a =='], variables: []}",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a =="), "{err}");
    }

    #[test]
    fn a_missing_file_is_a_read_error() {
        let err = load(Path::new("/nonexistent/limits.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read limits file /nonexistent/limits.yaml"));
    }
}
