//! Truncation: make an oversize conversation fit the per-request cap by dropping its oldest
//! turns.
//!
//! Only chat-shaped APIs can be shortened without changing what is asked: OpenAI Chat
//! Completions and Anthropic Messages. System and developer messages stay (they set the
//! rules), the last message stays (it is the question), and the conversation stays valid:
//! tool results are dropped together with the assistant turn that called them, and an
//! Anthropic conversation still starts with a user turn. After every cut the prompt is
//! counted again with the same rules as any request, so the result is exact, not a guess.

use serde_json::Value;

use crate::api::{parse_request, ApiKind, RequestBody};

/// A shortened request.
#[derive(Debug, PartialEq, Eq)]
pub struct Truncated {
    /// The new body.
    pub body: Vec<u8>,
    /// Its prompt count.
    pub prompt: u64,
    /// Messages removed.
    pub dropped: usize,
}

fn role(m: &Value) -> &str {
    m.get("role").and_then(Value::as_str).unwrap_or("")
}

/// Drop the oldest removable turn(s) of `messages` in place; false when nothing is left to
/// drop.
fn drop_oldest(kind: ApiKind, messages: &mut Vec<Value>) -> usize {
    let last = messages.len().saturating_sub(1);
    let Some(first) = (0..last).find(|&i| !matches!(role(&messages[i]), "system" | "developer"))
    else {
        return 0;
    };
    let mut end = first + 1;
    match kind {
        // A tool result without the call before it is refused by the API.
        ApiKind::ChatCompletions => {
            while end < last && role(&messages[end]) == "tool" {
                end += 1;
            }
        }
        // Anthropic conversations must start with a user turn.
        ApiKind::AnthropicMessages => {
            while end < last && role(&messages[end]) != "user" {
                end += 1;
            }
        }
        _ => {}
    }
    messages.drain(first..end);
    end - first
}

/// Shorten `body` until `count(parsed) <= max_prompt`. `None` when the API cannot be
/// shortened or even the shortest valid conversation does not fit.
pub fn truncate(
    kind: ApiKind,
    body: &[u8],
    max_prompt: u64,
    mut count: impl FnMut(&RequestBody) -> u64,
) -> Option<Truncated> {
    if !matches!(kind, ApiKind::ChatCompletions | ApiKind::AnthropicMessages) {
        return None;
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let mut dropped = 0;
    loop {
        let removed = drop_oldest(kind, doc.get_mut("messages")?.as_array_mut()?);
        if removed == 0 {
            return None;
        }
        dropped += removed;
        let candidate = serde_json::to_vec(&doc).ok()?;
        let parsed = parse_request(kind, &candidate).ok()?;
        let prompt = count(&parsed);
        if prompt <= max_prompt {
            return Some(Truncated {
                body: candidate,
                prompt,
                dropped,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{count_prompt, ImageCosts};
    use crate::tokens::{tests_support::shared, Encoding, ModelMap};

    fn counter(parsed: &RequestBody) -> u64 {
        let model = parsed.model().unwrap_or("gpt-4o").to_string();
        let m = ModelMap::builtin(Encoding::O200kBase, 1.0).resolve(&model);
        count_prompt(
            parsed,
            &model,
            m,
            shared().counter(m.encoding).unwrap(),
            ImageCosts { low: 85, high: 765 },
        )
        .tokens
    }

    fn roles(body: &[u8]) -> Vec<String> {
        let v: Value = serde_json::from_slice(body).unwrap();
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| role(m).to_string())
            .collect()
    }

    fn chat(turns: usize) -> String {
        let mut messages = vec![serde_json::json!({"role": "system", "content": "You are terse."})];
        for i in 0..turns {
            messages.push(serde_json::json!({"role": "user", "content": format!("question number {i} about a long topic")}));
            messages.push(serde_json::json!({"role": "assistant", "content": format!("answer number {i} with some detail")}));
        }
        messages.push(serde_json::json!({"role": "user", "content": "the final question"}));
        serde_json::json!({"model": "gpt-4o", "messages": messages}).to_string()
    }

    #[test]
    fn oldest_turns_go_first_and_the_result_fits_exactly_counted() {
        let body = chat(20);
        let full = counter(&parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap());
        let t = truncate(ApiKind::ChatCompletions, body.as_bytes(), full / 2, counter).unwrap();
        assert!(t.prompt <= full / 2);
        assert_eq!(
            t.prompt,
            counter(&parse_request(ApiKind::ChatCompletions, &t.body).unwrap())
        );
        let r = roles(&t.body);
        assert_eq!(r.first().map(String::as_str), Some("system"));
        assert_eq!(r.last().map(String::as_str), Some("user"));
        let v: Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(
            v["messages"].as_array().unwrap().last().unwrap()["content"],
            "the final question"
        );
        // The newest turns survive: the last answer kept is number 19.
        assert!(String::from_utf8_lossy(&t.body).contains("answer number 19"));
        assert!(!String::from_utf8_lossy(&t.body).contains("question number 0 "));
        assert_eq!(t.dropped, 41 - r.len() + 1);
    }

    #[test]
    fn a_request_that_fits_nowhere_is_not_truncated() {
        let body = chat(3);
        assert_eq!(
            truncate(ApiKind::ChatCompletions, body.as_bytes(), 5, counter),
            None
        );
    }

    #[test]
    fn tool_results_leave_with_their_call() {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "result text that is fairly long"},
            {"role": "user", "content": "and now?"}]}).to_string();
        let full = counter(&parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap());
        let t = truncate(ApiKind::ChatCompletions, body.as_bytes(), full - 1, counter).unwrap();
        assert_eq!(roles(&t.body), vec!["user"]);
        assert_eq!(t.dropped, 2);
    }

    #[test]
    fn anthropic_conversations_still_start_with_a_user_turn() {
        let body = serde_json::json!({"model": "claude-x", "max_tokens": 10, "messages": [
            {"role": "user", "content": "first question, quite long indeed"},
            {"role": "assistant", "content": "first answer, also long"},
            {"role": "user", "content": "second"}]})
        .to_string();
        let full = counter(&parse_request(ApiKind::AnthropicMessages, body.as_bytes()).unwrap());
        let t = truncate(
            ApiKind::AnthropicMessages,
            body.as_bytes(),
            full - 1,
            counter,
        )
        .unwrap();
        assert_eq!(roles(&t.body), vec!["user"]);
    }

    #[test]
    fn other_apis_cannot_be_truncated() {
        assert_eq!(
            truncate(ApiKind::Completions, br#"{"prompt":"x"}"#, 0, counter),
            None
        );
        assert_eq!(
            truncate(ApiKind::Embeddings, br#"{"input":"x"}"#, 0, counter),
            None
        );
    }
}
