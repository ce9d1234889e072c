//! Shared by the targets: the tokenizers (built once per process, both encodings) and the
//! model map the filter uses by default.

use std::sync::OnceLock;

use tokenfuse::llm::api::ApiKind;
use tokenfuse::tokenizer::{Encoding, ModelMap, TextCounter, Tokenizers};

/// Every API the filter reads.
#[allow(dead_code)]
pub const KINDS: [ApiKind; 5] = [
    ApiKind::ChatCompletions,
    ApiKind::Completions,
    ApiKind::Responses,
    ApiKind::Embeddings,
    ApiKind::AnthropicMessages,
];

pub fn tokenizers() -> &'static Tokenizers {
    static T: OnceLock<Tokenizers> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizers::build(&[Encoding::O200kBase, Encoding::Cl100kBase])
            .expect("both encodings build")
    })
}

/// The built-in map; models it does not know fall back to o200k_base × 1.25, so the
/// estimate path (safety factor) is exercised too.
#[allow(dead_code)]
pub fn models() -> &'static ModelMap {
    static M: OnceLock<ModelMap> = OnceLock::new();
    M.get_or_init(|| ModelMap::builtin(Encoding::O200kBase, 1.25))
}

pub fn counter(encoding: Encoding) -> TextCounter<'static> {
    tokenizers()
        .counter(encoding)
        .expect("both encodings were built")
}
