//! The per-VM state every exchange shares: the validated configuration, the tokenizers
//! built for it, and the cap on client-controlled stat tags.
//!
//! Envoy runs one VM per worker thread (plus the main thread), each with its own `Filter`;
//! inside a VM everything is single-threaded, so interior mutability needs no locks.

use std::cell::RefCell;

use std::rc::Rc;

use rustc_hash::FxHashMap;

use crate::budget::plan::BudgetKey;
use crate::config::Config;
use crate::global::SettleQueue;
use crate::host::Host;
use crate::stats::{catalog, Stat, TagLimiter};
use crate::tokenizer::{TokenizerError, Tokenizers};

/// Configuration and tokenizers of one VM.
#[derive(Debug)]
pub struct Filter {
    /// The validated plugin configuration.
    pub config: Config,
    /// Tokenizers for exactly the encodings `config` can reach.
    pub tokenizers: Tokenizers,
    model_tags: RefCell<TagLimiter>,
    tenant_tags: RefCell<TagLimiter>,
    /// Global-budget settlements waiting for the root context's next tick.
    pub settlements: RefCell<SettleQueue>,
    /// Per budget, the keys this VM has seen: their gauge names and the slot where their
    /// account was last found.
    known_keys: RefCell<Vec<FxHashMap<String, Rc<BudgetKey>>>>,
}

/// The most keys [`Filter::budget_key`] remembers per budget and VM.
const KNOWN_KEYS_CAP: usize = 100_000;

impl Filter {
    /// Build the tokenizers `config` needs. Slow (tens to hundreds of milliseconds per
    /// encoding): call once per VM, from `on_configure`.
    pub fn new(config: Config) -> Result<Filter, TokenizerError> {
        let tokenizers =
            Tokenizers::build(&config.encodings())?.with_cache(config.count_cache_bytes);
        let model_tags = RefCell::new(TagLimiter::new(config.model_tag_limit));
        let tenant_tags = RefCell::new(TagLimiter::new(config.tenant_tag_limit));
        let config_budgets = config.budgets.len();
        Ok(Filter {
            config,
            tokenizers,
            model_tags,
            tenant_tags,
            settlements: RefCell::new(SettleQueue::default()),
            known_keys: RefCell::new(vec![FxHashMap::default(); config_budgets]),
        })
    }

    /// The `model` tag value for `model`, under the configured cardinality cap.
    pub fn model_tag(&self, model: &str) -> String {
        self.model_tags.borrow_mut().admit(model)
    }

    /// Hand what the count cache did since the last call to `host` as stats: long prompt
    /// texts (and their bytes) counted from the cache or by the tokenizer, and the bytes it
    /// holds. Called from the root context's tick, off the request path.
    pub fn report_count_cache(&self, host: &mut dyn Host) {
        let a = self.tokenizers.take_cache_activity();
        for (source, texts, bytes) in [
            ("cache", a.hits, a.hit_bytes),
            ("tokenizer", a.misses, a.miss_bytes),
        ] {
            if texts > 0 {
                let name = |n: &str| Stat::new(n).tag("source", source);
                host.counter_add(name(catalog::COUNT_CACHE_TEXTS).name(), texts);
                host.counter_add(name(catalog::COUNT_CACHE_TEXT_BYTES).name(), bytes);
            }
        }
        if self.config.count_cache_bytes > 0 {
            host.gauge_set(
                Stat::new(catalog::COUNT_CACHE_BYTES).name(),
                self.tokenizers.cache_used_bytes() as u64,
            );
        }
    }

    /// `key` (a stored key) of budget `index`, as this VM knows it: made once, then shared
    /// by every request of the key (up to [`KNOWN_KEYS_CAP`] keys per budget; beyond, made
    /// afresh per request).
    pub fn budget_key(&self, index: usize, key: &str) -> Rc<BudgetKey> {
        if let Some(known) = self
            .known_keys
            .borrow()
            .get(index)
            .and_then(|keys| keys.get(key))
        {
            return Rc::clone(known);
        }
        let made = Rc::new(match self.config.budgets.get(index) {
            Some(budget) => BudgetKey::new(budget, key, &self.tenant_tag(key)),
            // Callers pass indices of `config.budgets`; a key of no budget has no gauges.
            None => BudgetKey {
                key: key.to_string(),
                slot: Default::default(),
                gauges: None,
            },
        });
        if let Some(keys) = self.known_keys.borrow_mut().get_mut(index) {
            if keys.len() < KNOWN_KEYS_CAP {
                keys.insert(key.to_string(), Rc::clone(&made));
            }
        }
        made
    }

    /// The `tenant` tag value for `tenant`, under the configured cardinality cap.
    pub fn tenant_tag(&self, tenant: &str) -> String {
        self.tenant_tags.borrow_mut().admit(tenant)
    }
}
