//! Identities: who a request is accounted to, in the one form every part of the filter uses.
//!
//! A budget's key comes from a trusted source (a header the auth layer sets, the bearer
//! credential, the route, a constant). What the source gives is client-controlled bytes;
//! [`stored_key`] maps it to the *stored key* the budget keeps its account under, and the
//! admin endpoint and per-key overrides map their identities through the same function, so
//! an identity means the same account wherever it is named.
//!
//! Stored keys live in three disjoint namespaces, so no value a client chooses can equal
//! another identity's stored key (collisions are impossible by construction, not unlikely):
//!
//! - a *plain* value (1–64 of `A–Z a–z 0–9 - . @ :`, not starting with `_`) is stored as it is;
//! - any other value is stored as `_h-` and the first 128 bits of its SHA-256 (hex), and a
//!   bearer credential as `_key-` and the same digest of the credential: a leading `_` is
//!   never plain, and the two prefixes differ;
//! - `_default` (no identity) and `_overflow` (the account identities share while a budget
//!   has no key slot for them) are reserved.
//!
//! Digests are one-way (credentials are never stored or logged) and long enough that two
//! distinct values colliding is out of reach (2^64 work for any pair).

use sha2::{Digest, Sha256};

use crate::budget::KeySource;
use crate::host::Host;

/// The stored key of requests without an identity.
pub const DEFAULT_KEY: &str = "_default";

/// The owner of a budget's overflow account (see [`crate::budget::ledger`]).
pub const OVERFLOW_KEY: &str = "_overflow";

/// Prefix of a hashed header (or route) value.
const HASHED_PREFIX: &str = "_h-";
/// Prefix of a hashed bearer credential.
const CREDENTIAL_PREFIX: &str = "_key-";

/// The identity `source` gives this request, as a stored key.
pub fn of_request(host: &dyn Host, source: &KeySource) -> String {
    match source {
        KeySource::Header(name) => stored_key(host.request_header(name).as_deref()),
        KeySource::BearerHash => match credential(host) {
            Some(secret) => credential_key(&secret),
            None => DEFAULT_KEY.to_string(),
        },
        KeySource::Route => stored_key(host.route_name().as_deref()),
        KeySource::Constant(c) => stored_key(Some(c)),
    }
}

/// The stored key of an identity value (a header value, a route name, a constant, or what
/// an operator names in the admin API): plain values as they are, others hashed, nothing or
/// blank as [`DEFAULT_KEY`].
pub fn stored_key(value: Option<&str>) -> String {
    match value.map(str::trim) {
        None | Some("") => DEFAULT_KEY.to_string(),
        Some(v) if is_plain(v) => v.to_string(),
        Some(v) => format!("{HASHED_PREFIX}{}", digest(v)),
    }
}

/// The stored key of a bearer credential (an API key): never the credential itself.
pub fn credential_key(secret: &str) -> String {
    format!("{CREDENTIAL_PREFIX}{}", digest(secret.trim()))
}

/// The stored key an operator means by `name` for a budget keyed by `source` (the admin
/// API's `key`, a `base_overrides` entry): a stored key as stats and listings show it
/// (`_h-…`, `_key-…`, `_default`, `_overflow`) is taken as it is; anything else is the identity as a
/// request presents it — a header value, a route name, or, for `bearer` budgets, the
/// credential — and is mapped exactly as traffic maps it.
pub fn named(source: &KeySource, name: &str) -> String {
    if name.starts_with('_') && is_stored_form(name) {
        return name.to_string();
    }
    match source {
        KeySource::BearerHash => credential_key(name),
        _ => stored_key(Some(name)),
    }
}

/// Whether `key` has the form of a stored key.
pub fn is_stored_form(key: &str) -> bool {
    let hex = |rest: &str| rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit());
    is_plain(key)
        || key == DEFAULT_KEY
        || key == OVERFLOW_KEY
        || key.strip_prefix(HASHED_PREFIX).is_some_and(hex)
        || key.strip_prefix(CREDENTIAL_PREFIX).is_some_and(hex)
}

fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('_')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'@' | b':'))
}

/// The credential of `authorization: Bearer …`, else of `x-api-key` (Anthropic's header).
fn credential(host: &dyn Host) -> Option<String> {
    if let Some(secret) = host
        .request_header("authorization")
        .as_deref()
        .and_then(bearer_credential)
    {
        return Some(secret.to_string());
    }
    host.request_header("x-api-key")
        .filter(|k| !k.trim().is_empty())
}

/// The credential of an `authorization` value `Bearer <credential>` (the scheme in any
/// case, separated by ASCII spaces or tabs), if the value has that form. Splits only at
/// ASCII characters, so any bytes a client sends are handled without slicing inside a
/// character.
pub fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once([' ', '\t'])?;
    let secret = rest.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty()).then_some(secret)
}

/// The first 128 bits of SHA-256, hex.
fn digest(s: &str) -> String {
    use std::fmt::Write;
    let d = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(32);
    for b in d.iter().take(16) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn with_header(name: &str, value: &str) -> FakeHost {
        let mut h = FakeHost::default();
        h.request_headers.push((name.into(), value.into()));
        h
    }

    #[test]
    fn plain_values_are_kept_and_others_hashed_or_defaulted() {
        assert_eq!(stored_key(None), "_default");
        assert_eq!(stored_key(Some("  ")), "_default");
        assert_eq!(stored_key(Some("acme-corp")), "acme-corp");
        assert_eq!(stored_key(Some(" acme ")), "acme");
        for odd in [
            "_overflow",
            "_default",
            "Acme Corp",
            "a/b\nc",
            &"x".repeat(65),
        ] {
            let k = stored_key(Some(odd));
            assert!(k.starts_with("_h-") && k.len() == 3 + 32, "{odd:?} -> {k}");
            assert!(is_stored_form(&k));
        }
    }

    #[test]
    fn no_client_value_can_equal_a_hashed_or_credential_key() {
        let hashed = stored_key(Some("Acme Corp"));
        let credential = credential_key("sk-live-SECRET");
        // A client sending the stored form itself is hashed again: a leading `_` is never
        // plain, and the old forms (`h-…`, `key-…`) are plain values of their own.
        for chosen in [hashed.as_str(), credential.as_str()] {
            assert_ne!(stored_key(Some(chosen)), chosen);
        }
        let old_form = format!("h-{}", &hashed[3..19]);
        assert_eq!(stored_key(Some(&old_form)), old_form);
        assert_ne!(stored_key(Some(&old_form)), hashed);
        assert_ne!(stored_key(Some("sk-live-SECRET")), credential);
    }

    #[test]
    fn operators_name_identities_as_requests_present_them_or_by_stored_key() {
        let header = KeySource::Header("x-tenant".into());
        let h = with_header("x-tenant", "Acme Corp");
        let traffic = of_request(&h, &header);
        assert_eq!(named(&header, "Acme Corp"), traffic);
        assert_eq!(named(&header, &traffic), traffic);
        assert_eq!(named(&header, "acme"), "acme");
        assert_eq!(named(&header, "_default"), "_default");
        // The account identities without a key slot share; no request has it as its own.
        assert_eq!(named(&header, "_overflow"), "_overflow");
        let h = with_header("x-tenant", "_overflow");
        assert_ne!(of_request(&h, &header), "_overflow");
        let bearer = KeySource::BearerHash;
        let h = with_header("authorization", "Bearer sk-1");
        let traffic = of_request(&h, &bearer);
        assert_eq!(named(&bearer, "sk-1"), traffic);
        assert_eq!(named(&bearer, &traffic), traffic);
    }

    #[test]
    fn bearer_credentials_are_found_without_slicing_inside_a_character() {
        assert_eq!(bearer_credential("Bearer abc"), Some("abc"));
        assert_eq!(bearer_credential("  bEaReR \t abc  "), Some("abc"));
        assert_eq!(bearer_credential("Bearer"), None);
        assert_eq!(bearer_credential("Bearer   "), None);
        assert_eq!(bearer_credential("Basic abc"), None);
        // Found by attack: a multi-byte character where the space would be.
        assert_eq!(bearer_credential("Bearer\u{e9}x"), None);
        assert_eq!(bearer_credential("Bearer\u{a0}key"), None);
        assert_eq!(bearer_credential("\u{e9}\u{e9}\u{e9}\u{e9} x"), None);
        assert_eq!(bearer_credential("Bearer \u{e9}"), Some("\u{e9}"));
    }

    #[test]
    fn every_split_of_every_short_header_is_handled() {
        // Every prefix of a value full of multi-byte characters, at every length.
        let value = "Bé\u{a0}arer\u{1F600} \u{e9}k\u{a0}";
        for (i, _) in value.char_indices() {
            let _ = bearer_credential(&value[..i]);
            let _ = stored_key(Some(&value[i..]));
        }
    }

    #[test]
    fn bearer_budgets_hash_the_credential_or_fall_back_to_x_api_key() {
        let source = KeySource::BearerHash;
        let h = with_header("authorization", "Bearer sk-live-SECRET");
        let id = of_request(&h, &source);
        assert!(id.starts_with("_key-") && !id.contains("SECRET"), "{id}");
        assert_eq!(id, credential_key("sk-live-SECRET"));
        let h = with_header("x-api-key", "sk-live-SECRET");
        assert_eq!(of_request(&h, &source), id);
        let h = with_header("authorization", "Bearer\u{a0}sk-live-SECRET");
        assert_eq!(of_request(&h, &source), "_default");
        assert_eq!(of_request(&FakeHost::default(), &source), "_default");
    }
}
