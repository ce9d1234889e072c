//! The per-VM state every exchange shares: the validated configuration, the tokenizers
//! built for it, and the cap on client-controlled stat tags.
//!
//! Envoy runs one VM per worker thread (plus the main thread), each with its own `Filter`;
//! inside a VM everything is single-threaded, so interior mutability needs no locks.

use std::cell::RefCell;

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
}

impl Filter {
    /// Build the tokenizers `config` needs. Slow (tens to hundreds of milliseconds per
    /// encoding): call once per VM, from `on_configure`.
    pub fn new(config: Config) -> Result<Filter, TokenizerError> {
        let tokenizers = Tokenizers::build(&config.encodings())?;
        let model_tags = RefCell::new(TagLimiter::new(config.model_tag_limit));
        let tenant_tags = RefCell::new(TagLimiter::new(config.tenant_tag_limit));
        Ok(Filter {
            config,
            tokenizers,
            model_tags,
            tenant_tags,
            settlements: RefCell::new(SettleQueue::default()),
        })
    }

    /// The `model` tag value for `model`, under the configured cardinality cap.
    pub fn model_tag(&self, model: &str) -> String {
        self.model_tags.borrow_mut().admit(model)
    }

    /// The `tenant` tag value for `tenant`, under the configured cardinality cap.
    pub fn tenant_tag(&self, tenant: &str) -> String {
        self.tenant_tags.borrow_mut().admit(tenant)
    }
}
