//! Prices: what a model's tokens cost, for budgets counted in USD.
//!
//! Operators give prices in USD per million tokens, as providers publish them; they are
//! held as integer micro-USD per million tokens, and costs are rounded up to the next
//! micro-USD, so a budget is never under-charged by rounding.

use crate::llm::usage::UsageReport;
use crate::tokenizer::{best_match, Pattern};

/// Prices of one model (pattern), in micro-USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

/// Convert a USD amount with at most six decimals to micro-USD. `None` for negative,
/// non-finite or absurd values.
pub fn usd_to_micro(usd: f64) -> Option<u64> {
    if !usd.is_finite() || !(0.0..=1e12).contains(&usd) {
        return None;
    }
    Some((usd * 1_000_000.0).round() as u64)
}

/// `tokens × price_per_million / 1e6`, rounded up, saturating.
fn cost(tokens: u64, micro_per_million: u64) -> u64 {
    // Two u64 multiply within u128: the product never saturates.
    let product = u128::from(tokens).saturating_mul(u128::from(micro_per_million));
    u64::try_from(product.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl Price {
    /// Cost of reserving `prompt` input tokens and up to `max_output` output tokens, before
    /// the provider says how many were cached (all input at the full price).
    pub fn estimate(&self, prompt: u64, max_output: u64) -> u64 {
        cost(prompt, self.input).saturating_add(cost(max_output, self.output))
    }

    /// Cost of what the provider reported (cache reads at the cached-input price).
    pub fn actual(&self, usage: &UsageReport) -> u64 {
        let cached = usage.cached_input.min(usage.input);
        cost(usage.input.saturating_sub(cached), self.input)
            .saturating_add(cost(cached, self.cached_input))
            .saturating_add(cost(usage.output, self.output))
    }
}

/// Model pattern → price.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceList {
    rules: Vec<(Pattern, Price)>,
}

impl PriceList {
    /// A price list from `(pattern, price)` rules.
    pub fn new(rules: Vec<(Pattern, Price)>) -> Self {
        PriceList { rules }
    }

    /// The price of `model`, if any rule matches.
    pub fn get(&self, model: &str) -> Option<Price> {
        best_match(&self.rules, model).copied()
    }

    /// True when some rule matches every model (`*`).
    pub fn has_catch_all(&self) -> bool {
        self.rules
            .iter()
            .any(|(p, _)| *p == Pattern::Prefix(String::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt4o() -> Price {
        Price {
            input: usd_to_micro(2.50).unwrap(),
            cached_input: usd_to_micro(1.25).unwrap(),
            output: usd_to_micro(10.0).unwrap(),
        }
    }

    #[test]
    fn usd_converts_to_integer_micro_dollars() {
        assert_eq!(usd_to_micro(2.5), Some(2_500_000));
        assert_eq!(usd_to_micro(0.075), Some(75_000));
        assert_eq!(usd_to_micro(0.000_001), Some(1));
        assert_eq!(usd_to_micro(-1.0), None);
        assert_eq!(usd_to_micro(f64::NAN), None);
    }

    #[test]
    fn one_million_tokens_cost_the_list_price() {
        let p = gpt4o();
        let u = UsageReport {
            input: 1_000_000,
            output: 1_000_000,
            ..Default::default()
        };
        assert_eq!(p.actual(&u), 12_500_000);
    }

    #[test]
    fn costs_round_up_to_the_next_micro_dollar() {
        // 1 token at $2.50/M is 2.5 micro-USD: charged 3.
        let p = gpt4o();
        assert_eq!(
            p.actual(&UsageReport {
                input: 1,
                ..Default::default()
            }),
            3
        );
        assert_eq!(p.estimate(0, 0), 0);
        // $0.15/M: 7 tokens = 1.05 micro-USD -> 2.
        let mini = Price {
            input: 150_000,
            cached_input: 75_000,
            output: 600_000,
        };
        assert_eq!(mini.estimate(7, 0), 2);
    }

    #[test]
    fn cached_input_is_billed_at_the_cached_price() {
        let p = gpt4o();
        let u = UsageReport {
            input: 1000,
            cached_input: 800,
            output: 100,
            ..Default::default()
        };
        // 200 × 2.5 + 800 × 1.25 + 100 × 10 = 500 + 1000 + 1000 micro-USD.
        assert_eq!(p.actual(&u), 2500);
        // More cached than input (a confused provider) never underflows.
        let odd = UsageReport {
            input: 10,
            cached_input: 50,
            ..Default::default()
        };
        assert_eq!(p.actual(&odd), cost(10, p.cached_input));
    }

    #[test]
    fn estimate_prices_all_input_at_full_rate() {
        assert_eq!(gpt4o().estimate(1000, 100), 2500 + 1000);
    }

    #[test]
    fn huge_counts_saturate() {
        let p = Price {
            input: u64::MAX,
            cached_input: 0,
            output: u64::MAX,
        };
        assert_eq!(p.estimate(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn most_specific_pattern_wins_and_catch_all_is_detected() {
        let list = PriceList::new(vec![
            (
                Pattern::parse("*").unwrap(),
                Price {
                    input: 1,
                    cached_input: 1,
                    output: 1,
                },
            ),
            (Pattern::parse("gpt-4o*").unwrap(), gpt4o()),
            (
                Pattern::parse("gpt-4o-mini*").unwrap(),
                Price {
                    input: 150_000,
                    cached_input: 75_000,
                    output: 600_000,
                },
            ),
        ]);
        assert_eq!(list.get("gpt-4o-2024-08-06"), Some(gpt4o()));
        assert_eq!(list.get("gpt-4o-mini").map(|p| p.input), Some(150_000));
        assert_eq!(list.get("claude-x").map(|p| p.input), Some(1));
        assert!(list.has_catch_all());
        assert!(!PriceList::default().has_catch_all());
    }
}
