//! The request phase: who is asking (read from the headers), and what the body asks for —
//! parsed, its model resolved, its prompt counted and its output reservation derived.

use crate::budget::plan;
use crate::budget::{identity, Priority};
use crate::filter::Filter;
use crate::host::Host;
use crate::llm::api::{self, ApiKind, RequestBody, RequestError};
use crate::llm::prompt::{count_prompt, ImageCosts, MessageCosts, PromptCount};
use crate::tokenizer::ModelCounting;

/// What the request headers say about who is asking, read in the headers callback: once
/// the headers have gone on (count-and-reject mode), Envoy no longer lets the filter read
/// them.
pub(super) struct Identity {
    /// The stored key per budget, in budget order.
    pub budget_ids: Vec<String>,
    /// The stored key per global budget, in order.
    pub global_ids: Vec<String>,
    pub priority: Priority,
    /// Seed of the deterministic degradation pick (Envoy's `x-request-id`).
    pub request_id: Option<String>,
    /// The `tenant` stat tag, when tenant tagging is on.
    pub tenant_tag: Option<String>,
}

impl Identity {
    /// Read from the request headers.
    pub fn read(host: &dyn Host, filter: &Filter) -> Identity {
        let config = &filter.config;
        Identity {
            budget_ids: config
                .budgets
                .iter()
                .map(|b| identity::of_request(host, &b.key))
                .collect(),
            global_ids: config
                .global_budgets
                .iter()
                .map(|b| identity::of_request(host, &b.key))
                .collect(),
            priority: plan::priority(host, config),
            request_id: host.request_header("x-request-id"),
            tenant_tag: config
                .tenant_tag
                .as_ref()
                .map(|source| filter.tenant_tag(&identity::of_request(host, source))),
        }
    }
}

/// An LLM call whose body is still arriving: what its headers said.
pub(super) struct Pending {
    pub kind: ApiKind,
    pub path: String,
    pub who: Identity,
    /// What the headers said about caching, when the cache is configured.
    pub cache: Option<super::cached::CacheHeaders>,
}

/// A request body read and counted.
pub(super) struct Counted<'b> {
    pub parsed: RequestBody<'b>,
    /// The model that is billed: the Azure deployment on such a path, else the body's.
    pub model: String,
    pub counting: ModelCounting,
    pub prompt: PromptCount,
    /// The most output tokens it can be billed for, over all choices.
    pub max_output: u64,
}

/// Why a body is not counted.
pub(super) enum NotCounted {
    /// It cannot be read.
    Unreadable(RequestError),
    /// The configuration names no tokenizer for its model (a validated one always does).
    NoTokenizer,
}

/// A request body read, not yet counted.
pub(super) struct Read<'b> {
    pub parsed: RequestBody<'b>,
    /// The model that is billed: the Azure deployment on such a path, else the body's.
    pub model: String,
}

/// Parse `body` of the call `pending` announced (cheap: the reader borrows the body).
pub(super) fn read<'b>(pending: &Pending, body: &'b [u8]) -> Result<Read<'b>, NotCounted> {
    let parsed = api::parse_request(pending.kind, body).map_err(NotCounted::Unreadable)?;
    // On an Azure path the deployment is what is served and billed, whatever the body
    // says; elsewhere the body's.
    let model = api::azure_deployment(&pending.path)
        .or_else(|| parsed.model())
        .unwrap_or("unknown")
        .to_string();
    Ok(Read { parsed, model })
}

/// Count a read body: its prompt (the tokenizer's work) and its output reservation.
pub(super) fn count<'b>(filter: &Filter, read: Read<'b>) -> Result<Counted<'b>, NotCounted> {
    let Read { parsed, model } = read;
    let config = &filter.config;
    let counting = config.models.resolve(&model);
    let counter = filter
        .tokenizers
        .counter(counting.encoding)
        .ok_or(NotCounted::NoTokenizer)?;
    let prompt = count_prompt(&parsed, &model, counting, counter, images(filter));
    let max_output = parsed.output_reservation(config.default_max_output_tokens);
    Ok(Counted {
        parsed,
        model,
        counting,
        prompt,
        max_output,
    })
}

impl Counted<'_> {
    /// What each message adds to the prompt (chat-shaped APIs), for a truncation.
    pub fn message_costs(&self, filter: &Filter) -> Option<MessageCosts> {
        let counter = filter.tokenizers.counter(self.counting.encoding)?;
        crate::llm::prompt::message_costs(
            &self.parsed,
            &self.model,
            self.counting,
            counter,
            images(filter),
        )
    }
}

fn images(filter: &Filter) -> ImageCosts {
    ImageCosts {
        low: filter.config.image_tokens_low,
        high: filter.config.image_tokens_high,
    }
}
