//! The pieces most integration tests share: a real Envoy with the filter between the two
//! mock upstreams, reading stats the way a user of the shipped config does, and the
//! filter's own counting rules run natively for expected values.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokenfuse::llm::api::{parse_request, ApiKind};
use tokenfuse::llm::prompt::{count_prompt, ImageCosts};
use tokenfuse::tokenizer::{Encoding, ModelMap, Tokenizers};

use super::envoy::{Envoy, EnvoySpec};
use super::mock_upstream::MockUpstream;

/// Envoy with the filter, and the `primary` and `economy` upstreams it routes to.
pub struct Stack {
    pub primary: MockUpstream,
    pub economy: MockUpstream,
    pub envoy: Envoy,
}

impl Stack {
    /// Start a stack whose filter runs `config` (in the shipped bootstrap, so with the
    /// shipped `stats_tags`: tests read labels exactly as a user of that config would).
    pub fn start(config: &str) -> Stack {
        Stack::start_with(config, |spec| spec)
    }

    /// As [`Stack::start`], with the Envoy spec adjusted by `adjust`.
    pub fn start_with(config: &str, adjust: impl FnOnce(EnvoySpec) -> EnvoySpec) -> Stack {
        let primary = MockUpstream::start("primary").expect("start primary mock");
        let economy = MockUpstream::start("economy").expect("start economy mock");
        let spec = adjust(EnvoySpec::new(config, primary.port(), economy.port()));
        let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("Envoy did not start: {e}"));
        Stack {
            primary,
            economy,
            envoy,
        }
    }
}

/// Sum of the filter's counters whose name contains every one of `parts` (tag fragments
/// such as `model=.=gpt-4o;`), polled until it reaches `at_least` or 5 s pass: stats land
/// when Envoy ends a stream, a moment after the client has read the last byte.
pub fn counter_sum(envoy: &Envoy, parts: &[&str], at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let total: u64 = envoy
            .stats_text()
            .lines()
            .filter(|l| {
                l.starts_with("wasmcustom.tokenfuse_") && parts.iter().all(|p| l.contains(p))
            })
            .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
            .sum();
        if total >= at_least || Instant::now() > deadline {
            return total;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both tokenizers, built once per test binary.
pub fn tokenizers() -> &'static Tokenizers {
    static T: OnceLock<Tokenizers> = OnceLock::new();
    T.get_or_init(|| Tokenizers::build(&[Encoding::O200kBase, Encoding::Cl100kBase]).unwrap())
}

/// The filter's counting rules, run natively on a request `body` (built-in model map,
/// o200k_base fallback, default image costs).
pub fn native_count(kind: ApiKind, body: &[u8]) -> u64 {
    let parsed = parse_request(kind, body).unwrap();
    let model = parsed.model().unwrap_or("unknown").to_string();
    let resolved = ModelMap::builtin(Encoding::O200kBase, 1.0).resolve(&model);
    let counter = tokenizers().counter(resolved.encoding).unwrap();
    count_prompt(
        &parsed,
        &model,
        resolved,
        counter,
        ImageCosts { low: 85, high: 765 },
    )
    .tokens
}

/// Tokens of `text` in `encoding`.
pub fn text_tokens(encoding: Encoding, text: &str) -> u64 {
    tokenizers().counter(encoding).unwrap().count(text)
}

/// The budget key a `bearer` budget stores for `secret` (as the filter maps it).
pub fn bearer_key(secret: &str) -> String {
    tokenfuse::budget::identity::credential_key(secret)
}
