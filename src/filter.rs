//! The per-VM state every exchange shares: the validated configuration, the tokenizers
//! built for it, the cap on client-controlled stat tags, and the budget keys this VM has
//! seen — whose gauges the root context's tick keeps refreshed ([`Filter::refresh_gauges`]),
//! so a key that goes quiet still shows its window resetting.
//!
//! Envoy runs one VM per worker thread (plus the main thread), each with its own `Filter`;
//! inside a VM everything is single-threaded, so interior mutability needs no locks.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use rustc_hash::FxHashMap;

use crate::budget::ledger::{self, Slot};
use crate::budget::plan::BudgetKey;
use crate::budget::Standing;
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
    /// Bytes of answers this VM's exchanges are copying for the response cache (bounded by
    /// [`CAPTURE_LIMIT`]; see `exchange/cached.rs`).
    pub cache_capture: Rc<Cell<usize>>,
    /// Per budget, the keys this VM has seen: their gauge names and the slot where their
    /// account was last found.
    known_keys: RefCell<Vec<FxHashMap<String, Rc<BudgetKey>>>>,
    /// Per budget, the known keys that have gauges, in the order they were seen: what the
    /// tick refreshes, a few at a time from [`Filter::refresh_cursor`].
    gauged: RefCell<Vec<Vec<Rc<BudgetKey>>>>,
    /// The next (budget, key) the tick refreshes.
    refresh_cursor: Cell<(usize, usize)>,
    /// When the tick last refreshed gauges (ms since the epoch).
    refreshed_at_ms: Cell<i64>,
}

/// The most bytes of answers one VM copies for the response cache at a time: beyond it, an
/// answer in flight is not kept (so many long cacheable streams at once cannot grow a VM).
pub const CAPTURE_LIMIT: usize = 32 << 20;

/// The least time between two gauge refreshes, whatever the tick period.
const GAUGE_REFRESH_MS: i64 = 1000;

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
            cache_capture: Rc::new(Cell::new(0)),
            known_keys: RefCell::new(vec![FxHashMap::default(); config_budgets]),
            gauged: RefCell::new(vec![Vec::new(); config_budgets]),
            refresh_cursor: Cell::new((0, 0)),
            refreshed_at_ms: Cell::new(i64::MIN),
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
                stats: None,
            },
        });
        if let Some(keys) = self.known_keys.borrow_mut().get_mut(index) {
            if keys.len() < KNOWN_KEYS_CAP {
                keys.insert(key.to_string(), Rc::clone(&made));
                if made.stats.is_some() {
                    if let Some(gauged) = self.gauged.borrow_mut().get_mut(index) {
                        gauged.push(Rc::clone(&made));
                    }
                }
            }
        }
        made
    }

    /// Set `key`'s gauges in budget `index` to `standing` at `now_ms`: used, limit and
    /// remaining in the budget's unit, the seconds until its window resets, and the key's
    /// base allowance. Keys beyond
    /// the tenant tag cap have none (an `other` gauge would be meaningless).
    pub fn set_gauges(
        &self,
        host: &mut dyn Host,
        index: usize,
        key: &BudgetKey,
        standing: &Standing,
        now_ms: i64,
    ) {
        let (Some(stats), Some(budget)) = (&key.stats, self.config.budget_for(index, &key.key))
        else {
            return;
        };
        host.gauge_set(&stats.used, standing.used);
        host.gauge_set(&stats.limit, standing.limit);
        host.gauge_set(&stats.remaining, standing.remaining);
        host.gauge_set(
            &stats.reset_seconds,
            budget.window.ms_until_end(now_ms).div_ceil(1000),
        );
        host.gauge_set(&stats.base, budget.base);
        if let Some(cap) = budget.max_request_tokens {
            host.gauge_set(&stats.request_cap, cap);
        }
    }

    /// Refresh the gauges of up to `max` known keys, round robin over every budget, at most
    /// once every [`GAUGE_REFRESH_MS`]: each key costs one shared-data read (a few more
    /// when the key has moved slots). Called from
    /// the root context's tick (off the request path), so a key that has gone quiet has its
    /// gauges follow its window: when the window rolls they drop, and budget alerts resolve.
    pub fn refresh_gauges(&self, host: &mut dyn Host, max: usize) {
        let gauged = self.gauged.borrow();
        let total: usize = gauged.iter().map(Vec::len).sum();
        if total == 0 {
            return;
        }
        let now_ms = host.now_ms();
        if now_ms.saturating_sub(self.refreshed_at_ms.get()) < GAUGE_REFRESH_MS {
            return;
        }
        self.refreshed_at_ms.set(now_ms);
        let (mut budget, mut at) = self.refresh_cursor.get();
        let now = now_ms.div_euclid(1000);
        for _ in 0..max.min(total) {
            // The next (budget, key) that exists, wrapping around once at most: `total`
            // is not zero, so one exists.
            let key = loop {
                match gauged.get(budget) {
                    Some(keys) => match keys.get(at) {
                        Some(key) => break key,
                        None => {
                            budget = budget.saturating_add(1);
                            at = 0;
                        }
                    },
                    None => {
                        budget = 0;
                        at = 0;
                    }
                }
            };
            let Some(b) = self.config.budget_for(budget, &key.key) else {
                break;
            };
            let hinted = match key.slot.get() {
                Some(Slot::Overflow) => ledger::record(host, &b, Slot::Overflow)
                    .map(|r| (Slot::Overflow, b.roll(r.account, now))),
                Some(slot) => ledger::record(host, &b, slot)
                    .filter(|r| r.owner == key.key)
                    .map(|r| (slot, b.roll(r.account, now))),
                None => None,
            };
            // Not where this VM last saw it: reclaimed (nothing left to remember), or
            // placed again by another worker.
            let found = hinted.or_else(|| ledger::find(host, &b, &key.key, now));
            if let Some((slot, _)) = &found {
                key.slot.set(Some(*slot));
            }
            let account = found.map_or_else(|| b.open_account(now), |(_, a)| a);
            self.set_gauges(host, budget, key, &b.standing(&account, now), now_ms);
            at = at.saturating_add(1);
        }
        self.refresh_cursor.set((budget, at));
    }

    /// The `tenant` tag value for `tenant`, under the configured cardinality cap.
    pub fn tenant_tag(&self, tenant: &str) -> String {
        self.tenant_tags.borrow_mut().admit(tenant)
    }
}
