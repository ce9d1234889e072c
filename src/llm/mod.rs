//! The LLM APIs as the filter sees them: request shapes and their strict one-pass reading,
//! the counting rules for prompts, response streams and usage, and the edits the filter
//! makes to a request body.

pub mod api;
pub mod json;
pub mod prompt;
pub(crate) mod read;
pub mod rewrite;
pub mod sse;
pub mod truncate;
pub mod usage;
