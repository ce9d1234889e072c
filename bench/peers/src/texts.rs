//! The texts the peers count, generated from a seed (no file, nothing downloaded), so every
//! run and every target counts the same bytes:
//!
//! * `english`: prose of varied vocabulary: common function words (40%), words drawn
//!   uniformly from the English words of `cl100k_base`'s vocabulary (` [a-z]{4,}`, ~20,000;
//!   50%) and made-up words of English syllables, as rare words and names are (10%): most
//!   content words are seen once.
//! * `code`: functions in a C-like syntax with fresh identifiers, numbers and operators.
//! * `cjk`: Chinese, Japanese and Korean characters drawn uniformly (common ideographs,
//!   kana, Hangul syllables) in sentences with full-width punctuation: few pieces recur.
//! * `mixed`: bench/measure.py's `mixed_text` pools (the filter's load-test prompts):
//!   the same few English, code and CJK sentences recurring in a random order.
//! * `zipf`: words from a 5,000-word vocabulary (4,000 of the English words above, 1,000
//!   made-up ones) drawn with Zipf's law (s = 1), as words recur in real prose and agent
//!   transcripts: most pieces are pieces seen before.

/// The kinds of text, in table order.
pub const KINDS: [&str; 5] = ["english", "code", "cjk", "mixed", "zipf"];

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

const ONSETS: [&str; 24] = [
    "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "cl",
    "pr", "st", "sh", "th", "tr", "gr",
];
const VOWELS: [&str; 10] = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io", "y"];
const CODAS: [&str; 14] = [
    "", "", "", "n", "r", "s", "t", "l", "nd", "st", "ck", "ng", "m", "rt",
];
const SUFFIXES: [&str; 10] = ["", "", "", "", "ing", "ed", "ly", "tion", "ment", "ness"];
const FUNCTION_WORDS: [&str; 24] = [
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "with", "was", "on",
    "be", "by", "this", "are", "from", "or", "have", "an", "they", "which",
];

/// A made-up word: the `n`th of its generator (2 or 3 syllables and a suffix).
fn word(rng: &mut Rng) -> String {
    let mut w = String::new();
    for _ in 0..2 + rng.below(2) {
        w.push_str(rng.pick(&ONSETS));
        w.push_str(rng.pick(&VOWELS));
        w.push_str(rng.pick(&CODAS));
    }
    w.push_str(rng.pick(&SUFFIXES));
    w
}

/// Sentences of `next_word` words, capitalised, with commas and full stops.
fn prose(rng: &mut Rng, size: usize, mut next_word: impl FnMut(&mut Rng) -> String) -> String {
    let mut out = String::new();
    while out.len() < size {
        let words = 6 + rng.below(18);
        for i in 0..words {
            let w = next_word(rng);
            if i == 0 {
                let mut chars = w.chars();
                if let Some(first) = chars.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(chars.as_str());
                }
            } else {
                out.push(' ');
                out.push_str(&w);
            }
            if i + 1 < words && rng.below(9) == 0 {
                out.push(',');
            }
        }
        out.push_str(if rng.below(12) == 0 { ".\n\n" } else { ". " });
    }
    out
}

fn english(size: usize, words: &[String]) -> String {
    let mut rng = Rng(1);
    prose(&mut rng, size, |rng| match rng.below(10) {
        0..=3 => rng.pick(&FUNCTION_WORDS).to_string(),
        4..=8 if !words.is_empty() => words[rng.below(words.len())].clone(),
        _ => word(rng),
    })
}

fn zipf(size: usize, words: &[String]) -> String {
    let mut rng = Rng(5);
    let mut vocabulary: Vec<String> = (0..5000)
        .map(|i| {
            if i % 5 == 0 || words.is_empty() {
                word(&mut rng)
            } else {
                words[rng.below(words.len())].clone()
            }
        })
        .collect();
    // Made-up and real words spread over the ranks.
    for i in (1..vocabulary.len()).rev() {
        vocabulary.swap(i, rng.below(i + 1));
    }
    // Cumulative weights 1/k, k = 1..=5000.
    let mut cumulative = Vec::with_capacity(vocabulary.len());
    let mut total = 0.0;
    for k in 1..=vocabulary.len() {
        total += 1.0 / k as f64;
        cumulative.push(total);
    }
    prose(&mut rng, size, |rng| {
        let x = rng.unit() * total;
        let i = cumulative.partition_point(|&c| c < x);
        vocabulary[i.min(vocabulary.len() - 1)].clone()
    })
}

fn code(size: usize) -> String {
    let mut rng = Rng(2);
    let ident = |rng: &mut Rng| {
        let mut s = word(rng);
        if rng.below(2) == 0 {
            s.push('_');
            s.push_str(&word(rng));
        }
        s
    };
    const TYPES: [&str; 6] = ["u64", "i32", "usize", "String", "&str", "Vec<u8>"];
    const OPS: [&str; 8] = [" + ", " - ", " * ", " / ", " % ", " << ", " & ", " ^ "];
    let mut out = String::new();
    while out.len() < size {
        let name = ident(&mut rng);
        let arg = ident(&mut rng);
        let ty = rng.pick(&TYPES);
        out.push_str(&format!("/// Returns the {} of `{arg}`.\n", word(&mut rng)));
        out.push_str(&format!(
            "pub fn {name}({arg}: {ty}, limit: usize) -> Result<{ty}, Error> {{\n"
        ));
        for _ in 0..2 + rng.below(6) {
            let var = ident(&mut rng);
            let n = rng.below(100_000);
            match rng.below(4) {
                0 => out.push_str(&format!(
                    "    let {var} = {arg}.len(){}{n};\n",
                    rng.pick(&OPS)
                )),
                1 => out.push_str(&format!(
                    "    if {var} >= limit {{\n        return Err(Error::TooLong({var}, \"{}\"));\n    }}\n",
                    word(&mut rng)
                )),
                2 => out.push_str(&format!(
                    "    for i in 0..{n} {{ {var}[i] = {arg}[i]{}0x{:x}; }}\n",
                    rng.pick(&OPS),
                    rng.below(65_536)
                )),
                _ => out.push_str(&format!(
                    "    // {} {} {}\n    {var}.push_str(&format!(\"{{}}-{{}}\", {n}, {arg}));\n",
                    word(&mut rng),
                    rng.pick(&FUNCTION_WORDS),
                    word(&mut rng)
                )),
            }
        }
        out.push_str(&format!("    Ok({arg})\n}}\n\n"));
    }
    out
}

fn cjk(size: usize) -> String {
    let mut rng = Rng(3);
    let mut out = String::new();
    while out.len() < size {
        // One script per sentence: ideographs (the 3,500 of U+4E00.. most used lie
        // there), ideographs with kana, or Hangul syllables with spaces.
        let script = rng.below(3);
        let chars = 8 + rng.below(30);
        for i in 0..chars {
            let c = match script {
                0 => 0x4E00 + rng.below(0x1400) as u32,
                1 if rng.below(2) == 0 => 0x3041 + rng.below(0x56) as u32,
                1 => 0x4E00 + rng.below(0x1400) as u32,
                _ => {
                    if i > 0 && rng.below(4) == 0 {
                        out.push(' ');
                    }
                    0xAC00 + rng.below(2000) as u32
                }
            };
            out.extend(char::from_u32(c));
            if i + 1 < chars && rng.below(10) == 0 {
                out.push(if script == 2 { ',' } else { '、' });
            }
        }
        out.push_str(match script {
            2 => ". ",
            _ if rng.below(8) == 0 => "。\n",
            _ => "。",
        });
    }
    out
}

const MIXED_ENGLISH: [&str; 5] = [
    "The quarterly report shows that revenue grew by twelve percent, driven mostly by the \
     new subscription tier and a steady decline in churn among small business customers.",
    "Before you deploy the service, make sure the health checks pass and the configuration \
     has been reviewed by someone who did not write it.",
    "She walked along the river at dusk, counting the lanterns that drifted past, and \
     wondered whether anyone upstream was counting them too.",
    "Please summarise the following document in three bullet points, keeping the tone \
     neutral and avoiding any speculation about future plans.",
    "Latency budgets are easy to state and hard to keep: every layer adds a little, and \
     nobody owns the sum.",
];
const MIXED_CODE: [&str; 5] = [
    "fn fib(n: u64) -> u64 {\n    if n < 2 { return n; }\n    fib(n - 1) + fib(n - 2)\n}\n",
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append((a if a[0] < b[0] else b).pop(0))\n    return out + a + b\n",
    "SELECT tenant, SUM(tokens) AS used FROM usage WHERE ts > now() - interval '1 day' GROUP BY tenant;\n",
    "const res = await fetch(`/v1/chat/completions`, { method: 'POST', body: JSON.stringify(req) });\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\n",
];
const MIXED_CJK: [&str; 4] = [
    "今天天气很好，我们去公园散步吧。请把这份文件翻译成英文，并保持原来的格式。",
    "東京の天気は晴れのち曇り、午後から雨が降るでしょう。会議は三時に始まります。",
    "인공지능 모델은 입력된 텍스트를 토큰 단위로 나누어 처리합니다. 오늘 회의는 취소되었습니다.",
    "机器学习模型的推理成本取决于输入和输出的令牌数量，因此需要对每个租户设置预算。",
];

/// bench/measure.py's `mixed_text`, with this file's generator.
fn mixed(size: usize) -> String {
    let mut rng = Rng(4);
    let mut out = String::new();
    while out.len() < size {
        let kind = rng.unit();
        let pool: &[&str] = if kind < 0.5 {
            &MIXED_ENGLISH
        } else if kind < 0.8 {
            &MIXED_CODE
        } else {
            &MIXED_CJK
        };
        let mut piece = rng.pick(pool).to_string();
        if kind < 0.5 {
            piece = piece.replace("twelve", &(2 + rng.below(98)).to_string());
        }
        piece.push(if rng.unit() < 0.3 { '\n' } else { ' ' });
        out.push_str(&piece);
    }
    out
}

/// The English words of `cl100k_base`'s vocabulary: its tokens of a space and four or more
/// lowercase ASCII letters, in rank order, without the space.
pub fn english_words() -> Result<Vec<String>, String> {
    let bpe = tiktoken_rs::cl100k_base().map_err(|e| e.to_string())?;
    let mut words = Vec::new();
    for rank in 0..100_256u32 {
        let Ok(bytes) = bpe.decode_bytes(&[rank]) else {
            continue;
        };
        if let [b' ', rest @ ..] = &bytes[..] {
            if rest.len() >= 4 && rest.iter().all(u8::is_ascii_lowercase) {
                words.push(String::from_utf8_lossy(rest).into_owned());
            }
        }
    }
    Ok(words)
}

/// About `size` bytes (a little more: whole sentences) of the text of `kind`; `words` are
/// [`english_words`].
pub fn generate(kind: &str, size: usize, words: &[String]) -> Option<String> {
    Some(match kind {
        "english" => english(size, words),
        "code" => code(size),
        "cjk" => cjk(size),
        "mixed" => mixed(size),
        "zipf" => zipf(size, words),
        _ => return None,
    })
}
