//! Truncation: make an oversize conversation fit the per-request cap by dropping its oldest
//! turns.
//!
//! Only chat-shaped APIs can be shortened without changing what is asked: OpenAI Chat
//! Completions and Anthropic Messages. System and developer messages stay (they set the
//! rules), the last message stays (it is the question), and the conversation stays valid:
//! tool results are dropped together with the assistant turn that called them, and an
//! Anthropic conversation still starts with a user turn.
//!
//! The work is linear in the conversation, whatever its shape: each message's cost is
//! counted once ([`MessageCosts`]); a cut is judged by subtracting the costs it drops from
//! the total (counting is additive over messages, so this is exactly the count of the
//! shortened body); the body is then edited once ([`crate::llm::rewrite`]), keeping every
//! other byte as sent. (Recounting
//! and re-serialising per dropped turn, as this once did, took a minute for 16,000 short
//! messages.)

use std::ops::Range;

use crate::llm::api::RequestBody;
use crate::llm::prompt::MessageCosts;

/// How to shorten a request: which messages go, and what it then counts.
#[derive(Debug, PartialEq, Eq)]
pub struct Cut {
    /// Ranges of message indices to drop, ascending (for [`crate::llm::rewrite::Edits`]).
    pub drop: Vec<Range<usize>>,
    /// The prompt count once they are gone.
    pub prompt: u64,
    /// Messages removed.
    pub dropped: usize,
}

/// The cut that makes `parsed` (its messages costing `costs`) fit `max_prompt`. `None`
/// when the API cannot be shortened or even the shortest valid conversation does not fit.
pub fn truncate(parsed: &RequestBody, costs: &MessageCosts, max_prompt: u64) -> Option<Cut> {
    let (roles, anthropic): (Vec<&str>, bool) = match parsed {
        RequestBody::Chat(r) => (r.messages.iter().map(|m| m.role.as_ref()).collect(), false),
        RequestBody::Anthropic(r) => (r.messages.iter().map(|m| m.role.as_ref()).collect(), true),
        _ => return None,
    };
    if roles.len() != costs.messages.len() {
        return None;
    }
    let last = roles.len().checked_sub(1)?;
    let removable = |i: usize| {
        roles
            .get(i)
            .is_some_and(|r| !matches!(*r, "system" | "developer"))
    };
    // Each step drops the oldest removable message and what must leave with it; the
    // messages after a step's end are untouched, so the next step starts there. Dropped
    // messages are the ranges in `cut`, in order.
    let mut cut: Vec<Range<usize>> = Vec::new();
    let mut raw = costs.total();
    let mut next = 0;
    loop {
        let first = (next..last).find(|&i| removable(i))?;
        let mut end = first.checked_add(1)?;
        while end < last {
            let role = roles.get(end).copied().unwrap_or_default();
            // A tool result without the call before it is refused by the API; Anthropic
            // conversations must start with a user turn.
            let goes_too = if anthropic {
                role != "user"
            } else {
                role == "tool"
            };
            if !goes_too {
                break;
            }
            end = end.checked_add(1)?;
        }
        let dropped_cost = costs
            .messages
            .get(first..end)?
            .iter()
            .fold(0i64, |sum, c| sum.saturating_add(*c));
        raw = raw.saturating_sub(dropped_cost);
        cut.push(first..end);
        next = end;
        let prompt = costs.prompt(raw);
        if prompt <= max_prompt {
            let dropped = cut.iter().map(|r| r.len()).sum();
            return Some(Cut {
                drop: cut,
                prompt,
                dropped,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::llm::api::{parse_request, ApiKind};
    use crate::llm::prompt::{count_prompt, message_costs, ImageCosts};
    use crate::llm::rewrite::{apply, Edits};
    use crate::tokenizer::{tests_support::shared, Encoding, ModelMap};

    const IMAGES: ImageCosts = ImageCosts { low: 85, high: 765 };

    fn counter(parsed: &RequestBody) -> u64 {
        let model = parsed.model().unwrap_or("gpt-4o").to_string();
        let m = ModelMap::builtin(Encoding::O200kBase, 1.0).resolve(&model);
        count_prompt(
            parsed,
            &model,
            m,
            shared().counter(m.encoding).unwrap(),
            IMAGES,
        )
        .tokens
    }

    /// A shortened body, its prompt count and how many messages went.
    #[derive(Debug, PartialEq, Eq)]
    struct Truncated {
        body: Vec<u8>,
        prompt: u64,
        dropped: usize,
    }

    fn cut(kind: ApiKind, body: &str, max_prompt: u64) -> Option<Truncated> {
        let parsed = parse_request(kind, body.as_bytes()).unwrap();
        let model = parsed.model().unwrap_or("gpt-4o").to_string();
        let m = ModelMap::builtin(Encoding::O200kBase, 1.0).resolve(&model);
        let costs = message_costs(
            &parsed,
            &model,
            m,
            shared().counter(m.encoding).unwrap(),
            IMAGES,
        )?;
        assert_eq!(costs.prompt(costs.total()), counter(&parsed), "additive");
        let c = truncate(&parsed, &costs, max_prompt)?;
        let edits = Edits {
            drop_messages: c.drop,
            ..Edits::default()
        };
        let body = apply(body.as_bytes(), &parsed, &edits).unwrap().unwrap();
        Some(Truncated {
            body,
            prompt: c.prompt,
            dropped: c.dropped,
        })
    }

    fn role(m: &Value) -> &str {
        m.get("role").and_then(Value::as_str).unwrap_or("")
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

    /// The rule as it was first written: drop one turn, re-serialise, recount, repeat
    /// (quadratic). The linear version must agree with it on every conversation.
    fn reference(kind: ApiKind, body: &[u8], max_prompt: u64) -> Option<(Value, u64, usize)> {
        let mut doc: Value = serde_json::from_slice(body).ok()?;
        let mut dropped = 0;
        loop {
            let messages = doc.get_mut("messages")?.as_array_mut()?;
            let last = messages.len().saturating_sub(1);
            let first =
                (0..last).find(|&i| !matches!(role(&messages[i]), "system" | "developer"))?;
            let mut end = first + 1;
            while end < last {
                let r = role(&messages[end]);
                let goes = match kind {
                    ApiKind::AnthropicMessages => r != "user",
                    _ => r == "tool",
                };
                if !goes {
                    break;
                }
                end += 1;
            }
            messages.drain(first..end);
            dropped += end - first;
            let candidate = serde_json::to_vec(&doc).ok()?;
            let prompt = counter(&parse_request(kind, &candidate).ok()?);
            if prompt <= max_prompt {
                return Some((doc, prompt, dropped));
            }
        }
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
        let t = cut(ApiKind::ChatCompletions, &body, full / 2).unwrap();
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
    fn everything_but_the_dropped_messages_goes_upstream_as_sent() {
        let body = r#"{ "messages" : [ {"role":"user","content":"old question, long enough to matter"} , {"role":"user","content":"hi"} ] , "model":"gpt-4o", "seed": 1e400 }"#;
        let full = counter(&parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap());
        let t = cut(ApiKind::ChatCompletions, body, full - 1).unwrap();
        assert_eq!(
            std::str::from_utf8(&t.body).unwrap(),
            r#"{ "messages" : [{"role":"user","content":"hi"}] , "model":"gpt-4o", "seed": 1e400 }"#
        );
    }

    #[test]
    fn a_request_that_fits_nowhere_is_not_truncated() {
        assert_eq!(cut(ApiKind::ChatCompletions, &chat(3), 5), None);
    }

    #[test]
    fn tool_results_leave_with_their_call() {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "result text that is fairly long"},
            {"role": "user", "content": "and now?"}]}).to_string();
        let full = counter(&parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap());
        let t = cut(ApiKind::ChatCompletions, &body, full - 1).unwrap();
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
        let t = cut(ApiKind::AnthropicMessages, &body, full - 1).unwrap();
        assert_eq!(roles(&t.body), vec!["user"]);
    }

    #[test]
    fn other_apis_cannot_be_truncated() {
        assert_eq!(cut(ApiKind::Completions, r#"{"prompt":"x"}"#, 0), None);
        assert_eq!(cut(ApiKind::Embeddings, r#"{"input":"x"}"#, 0), None);
    }

    #[test]
    fn the_linear_cut_agrees_with_the_recounting_rule_on_mixed_conversations() {
        // A deterministic walk over role sequences and budgets.
        let roles_pool = ["system", "developer", "user", "assistant", "tool"];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for case in 0..300 {
            let kind = if case % 3 == 0 {
                ApiKind::AnthropicMessages
            } else {
                ApiKind::ChatCompletions
            };
            let len = 1 + next(12) as usize;
            let messages: Vec<Value> = (0..len)
                .map(|i| {
                    let r = roles_pool[next(5) as usize];
                    let words = "word ".repeat(next(20) as usize);
                    serde_json::json!({"role": r, "content": format!("{i} {words}")})
                })
                .collect();
            let body =
                serde_json::json!({"model": "gpt-4o", "max_tokens": 5, "messages": messages})
                    .to_string();
            let full = counter(&parse_request(kind, body.as_bytes()).unwrap());
            let max = next(full + 1);
            let ours = cut(kind, &body, max);
            let theirs = reference(kind, body.as_bytes(), max);
            match (ours, theirs) {
                (None, None) => {}
                (Some(t), Some((doc, prompt, dropped))) => {
                    assert_eq!(
                        serde_json::from_slice::<Value>(&t.body).unwrap(),
                        doc,
                        "{body}"
                    );
                    assert_eq!((t.prompt, t.dropped), (prompt, dropped), "{body}");
                }
                (ours, theirs) => panic!("{body} max {max}: {ours:?} vs {theirs:?}"),
            }
        }
    }

    #[test]
    fn sixteen_thousand_short_messages_are_cut_in_one_pass() {
        // Found by attack: 16,000 `{"role":"user","content":"hi"}` took a minute per
        // request when each dropped turn re-serialised and recounted the rest. (Not a
        // timing assertion: the number of body edits and counts is what is bounded.)
        let messages = vec![serde_json::json!({"role": "user", "content": "hi"}); 16_000];
        let body = serde_json::json!({"model": "gpt-4o", "messages": messages}).to_string();
        let t = cut(ApiKind::ChatCompletions, &body, 100).unwrap();
        assert!(t.prompt <= 100);
        assert_eq!(roles(&t.body).len(), 16_000 - t.dropped);
        assert_eq!(
            t.prompt,
            counter(&parse_request(ApiKind::ChatCompletions, &t.body).unwrap())
        );
    }
}
