//! The counters side by side: how each is built, counts, and forgets what it has seen.
//!
//! Every peer counts as `encode_ordinary` does (special-token spellings are ordinary text)
//! and is asked for the number of tokens only, through its cheapest public path.

use std::collections::HashMap;

use tokenfuse::tokenizer::bpe::Bpe;
use tokenfuse::tokenizer::{Encoding, Tokenizers};

/// The peers, in table order.
pub const NAMES: [&str; 6] = [
    "tokenfuse",
    "tiktoken 4.1",
    "tiktoken-rs 0.12",
    "bpe-openai 0.3",
    "kitoken 0.11",
    "tokenizers 0.22",
];

/// What "first-seen" does to a peer before each timed count.
pub fn flushed(name: &str) -> &'static str {
    match name {
        "tokenfuse" => {
            "`Bpe::forget` (its memos of pair merges and of merged pieces emptied, \
                        kept allocated; the raw counter, so no whole-text count cache)"
        }
        "tokenfuse, no piece memo" => "`Bpe::forget` (its memo of pair merges emptied)",
        "tiktoken 4.1" => {
            "a fresh `CoreBpe` (a new owner id: its thread-local piece memo, \
                           kept allocated, holds nothing of it)"
        }
        "tokenizers 0.22" => "`BPE::clear_cache` (its word cache)",
        _ => "nothing: it keeps no memo between counts",
    }
}

/// One built counter.
pub enum Peer {
    /// The filter's counter without the filter's whole-text count cache.
    Tokenfuse(Bpe),
    /// tokenfuse's counter without its memo of merged pieces (`--peer "tokenfuse, no piece
    /// memo"`; not in the table): what the memo adds.
    Unremembered(Bpe),
    Tiktoken4(tiktoken::CoreBpe),
    TiktokenRs(tiktoken_rs::CoreBPE),
    BpeOpenai(&'static bpe_openai::Tokenizer),
    Kitoken(kitoken::Kitoken),
    Tokenizers(tokenizers::Tokenizer),
}

impl Peer {
    /// Build `name` for `encoding`.
    pub fn build(name: &str, encoding: Encoding, vocab: &Vocabulary) -> Result<Peer, String> {
        let o200k = encoding == Encoding::O200kBase;
        Ok(match name {
            "tokenfuse" => Peer::Tokenfuse(tokenfuse_bpe(encoding)?),
            "tokenfuse, no piece memo" => Peer::Unremembered(tokenfuse_bpe(encoding)?),
            "tiktoken 4.1" => Peer::Tiktoken4(if o200k {
                tiktoken::encoding::o200k_base()
            } else {
                tiktoken::encoding::cl100k_base()
            }),
            "tiktoken-rs 0.12" => Peer::TiktokenRs(vocab.tiktoken_rs()?),
            "bpe-openai 0.3" => Peer::BpeOpenai(if o200k {
                bpe_openai::o200k_base()
            } else {
                bpe_openai::cl100k_base()
            }),
            "kitoken 0.11" => Peer::Kitoken(
                kitoken::Kitoken::from_tiktoken_slice(vocab.tiktoken_file().as_bytes())
                    .map_err(|e| e.to_string())?,
            ),
            "tokenizers 0.22" => Peer::Tokenizers(
                vocab
                    .hugging_face_json(encoding)
                    .parse::<tokenizers::Tokenizer>()
                    .map_err(|e| e.to_string())?,
            ),
            _ => return Err(format!("unknown peer {name}")),
        })
    }

    /// Forget what earlier counts left behind (see [`flushed`]). `rebuild` makes a fresh
    /// instance for peers whose memo has no other way out.
    pub fn flush(&mut self, rebuild: impl FnOnce() -> Result<Peer, String>) -> Result<(), String> {
        match self {
            Peer::Tokenfuse(bpe) | Peer::Unremembered(bpe) => bpe.forget(),
            Peer::Tiktoken4(_) => *self = rebuild()?,
            Peer::Tokenizers(t) => {
                if let tokenizers::models::ModelWrapper::BPE(bpe) = t.get_model() {
                    bpe.clear_cache();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Tokens in `text`.
    pub fn count(&self, text: &str) -> Result<usize, String> {
        Ok(match self {
            Peer::Tokenfuse(t) => t.count(text),
            Peer::Unremembered(t) => t.count_unremembered(text),
            Peer::Tiktoken4(t) => t.count(text),
            Peer::TiktokenRs(t) => t.encode_ordinary(text).len(),
            Peer::BpeOpenai(t) => t.count(text),
            Peer::Kitoken(t) => t.encode(text, false).map_err(|e| e.to_string())?.len(),
            Peer::Tokenizers(t) => t.encode_fast(text, false).map_err(|e| e.to_string())?.len(),
        })
    }
}

/// tokenfuse's counter for `encoding`, built as the filter builds it (`Tokenizers::build`
/// checks the embedded tables), used without the filter's count cache.
fn tokenfuse_bpe(encoding: Encoding) -> Result<Bpe, String> {
    Tokenizers::build(&[encoding]).map_err(|e| e.to_string())?;
    Ok(match encoding {
        Encoding::O200kBase => Bpe::o200k_base(),
        Encoding::Cl100kBase => Bpe::cl100k_base(),
    })
}

/// An encoding's ordinary tokens (bytes by rank), read from tiktoken-rs (which embeds
/// them), for the peers that are built from a vocabulary.
pub struct Vocabulary {
    encoding: Encoding,
    tokens: Vec<Vec<u8>>,
}

impl Vocabulary {
    pub fn of(encoding: Encoding) -> Result<Vocabulary, String> {
        let bpe = match encoding {
            Encoding::O200kBase => tiktoken_rs::o200k_base(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base(),
        }
        .map_err(|e| e.to_string())?;
        let size = tokenfuse::tokenizer::bpe::Bpe::o200k_base().vocabulary_size();
        let size = if encoding == Encoding::O200kBase {
            size
        } else {
            tokenfuse::tokenizer::bpe::Bpe::cl100k_base().vocabulary_size()
        };
        let mut tokens = Vec::with_capacity(size);
        for rank in 0..size as u32 {
            tokens.push(bpe.decode_bytes(&[rank]).map_err(|e| e.to_string())?);
        }
        Ok(Vocabulary { encoding, tokens })
    }

    fn tiktoken_rs(&self) -> Result<tiktoken_rs::CoreBPE, String> {
        match self.encoding {
            Encoding::O200kBase => tiktoken_rs::o200k_base(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base(),
        }
        .map_err(|e| e.to_string())
    }

    /// The vocabulary as a `.tiktoken` file: `base64(bytes) rank` per line.
    fn tiktoken_file(&self) -> String {
        use base64::Engine;
        let mut out = String::new();
        for (rank, bytes) in self.tokens.iter().enumerate() {
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
            out.push(' ');
            out.push_str(&rank.to_string());
            out.push('\n');
        }
        out
    }

    /// A Hugging Face `tokenizer.json` for the encoding: byte-level BPE over the same ranks
    /// (token ids are ranks), the merges derived from the ranks (each token of two or more
    /// bytes is the merge of the two parts that merging its bytes with lower-ranked tokens
    /// only leaves), `ignore_merges` (a piece that is a token is that token, as in tiktoken),
    /// and the encoding's pre-tokenizer regex split before the byte-level mapping.
    fn hugging_face_json(&self, encoding: Encoding) -> String {
        let chars = byte_chars();
        let spell = |bytes: &[u8]| -> String { bytes.iter().map(|&b| chars[b as usize]).collect() };
        let ranks: HashMap<&[u8], usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(r, t)| (t.as_slice(), r))
            .collect();
        let mut vocab = serde_json::Map::new();
        let mut merges = Vec::new();
        for (rank, token) in self.tokens.iter().enumerate() {
            vocab.insert(spell(token), rank.into());
            if token.len() < 2 {
                continue;
            }
            // Merge the token's bytes with the tokens ranked below it.
            let mut parts: Vec<&[u8]> = token.chunks(1).collect();
            loop {
                let mut best: Option<(usize, usize)> = None;
                for i in 0..parts.len().saturating_sub(1) {
                    let joined = &token
                        [offset(token, parts[i])..offset(token, parts[i + 1]) + parts[i + 1].len()];
                    if let Some(&r) = ranks.get(joined) {
                        if r < rank && best.is_none_or(|(b, _)| r < b) {
                            best = Some((r, i));
                        }
                    }
                }
                let Some((_, i)) = best else { break };
                let start = offset(token, parts[i]);
                let end = offset(token, parts[i + 1]) + parts[i + 1].len();
                parts[i] = &token[start..end];
                parts.remove(i + 1);
            }
            if let [left, right] = parts[..] {
                merges.push(serde_json::json!([spell(left), spell(right)]));
            }
        }
        let pattern = match encoding {
            Encoding::O200kBase => tiktoken_rs::O200K_BASE_PAT_STR,
            Encoding::Cl100kBase => CL100K_PATTERN,
        };
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": true, "vocab": vocab, "merges": merges
            }
        })
        .to_string()
    }
}

/// tiktoken's `cl100k_base` pattern (as tiktoken-rs 0.12 compiles it).
const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

/// Where `part` (a subslice of `whole`) starts in it.
fn offset(whole: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

/// GPT-2's byte-level alphabet: each byte as the character Hugging Face's `ByteLevel`
/// spells it (printable Latin-1 as itself, the others from U+0100 up in byte order).
fn byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    chars
}
