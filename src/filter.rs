//! The per-VM state every exchange shares: the validated configuration, the tokenizers
//! built for it, and the cap on client-controlled stat tags.
//!
//! Envoy runs one VM per worker thread (plus the main thread), each with its own `Filter`;
//! inside a VM everything is single-threaded, so interior mutability needs no locks.

use std::cell::RefCell;

use rustc_hash::FxHashSet;

use crate::config::Config;
use crate::global::SettleQueue;
use crate::stats::TagLimiter;
use crate::tokens::{TokenizerError, Tokenizers};

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
    /// Per budget, keys whose account this VM has seen in shared data. Accounts are never
    /// removed, so a key found once needs no existence check again.
    known_keys: RefCell<Vec<FxHashSet<String>>>,
}

/// The most keys [`Filter::key_is_known`] remembers per budget and VM (beyond, the account
/// is looked up in shared data again, as before it was seen).
const KNOWN_KEYS_CAP: usize = 100_000;

impl Filter {
    /// Build the tokenizers `config` needs. Slow (tens to hundreds of milliseconds per
    /// encoding): call once per VM, from `on_configure`.
    pub fn new(config: Config) -> Result<Filter, TokenizerError> {
        let tokenizers = Tokenizers::build(&config.encodings())?;
        let model_tags = RefCell::new(TagLimiter::new(config.model_tag_limit));
        let tenant_tags = RefCell::new(TagLimiter::new(config.tenant_tag_limit));
        let config_budgets = config.budgets.len();
        Ok(Filter {
            config,
            tokenizers,
            model_tags,
            tenant_tags,
            settlements: RefCell::new(SettleQueue::default()),
            known_keys: RefCell::new(vec![FxHashSet::default(); config_budgets]),
        })
    }

    /// The `model` tag value for `model`, under the configured cardinality cap.
    pub fn model_tag(&self, model: &str) -> String {
        self.model_tags.borrow_mut().admit(model)
    }

    /// Whether budget `index` is known to have an account for `key` in shared data.
    pub fn key_is_known(&self, index: usize, key: &str) -> bool {
        self.known_keys
            .borrow()
            .get(index)
            .is_some_and(|keys| keys.contains(key))
    }

    /// Remember that budget `index` has an account for `key` in shared data.
    pub fn remember_key(&self, index: usize, key: &str) {
        if let Some(keys) = self.known_keys.borrow_mut().get_mut(index) {
            if keys.len() < KNOWN_KEYS_CAP {
                keys.insert(key.to_string());
            }
        }
    }

    /// The `tenant` tag value for `tenant`, under the configured cardinality cap.
    pub fn tenant_tag(&self, tenant: &str) -> String {
        self.tenant_tags.borrow_mut().admit(tenant)
    }
}
