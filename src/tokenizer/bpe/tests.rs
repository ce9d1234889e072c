//! Equivalence with the reference: tiktoken-rs's `CoreBPE::encode_ordinary` (the counter
//! this crate replaced at run time), token for token, for both encodings, on a generated
//! deterministic corpus; plus the Unicode classes, code point by code point, against
//! fancy-regex (tiktoken's regex engine).
//!
//! The corpus (`corpus`): prose in many scripts, this repository's own files, every
//! sequence of one or two "atoms" (short strings chosen for the pre-tokenizers' edge cases:
//! contractions in all cases, `'` vs `’`, digits, marks, emoji with ZWJ and skin tones, every
//! kind of white space, punctuation before newlines and `/`, …) and of three from a subset,
//! long runs (pieces of hundreds of bytes, which take the heap merge), seeded random
//! strings (code points drawn from every Unicode general category and every plane; random
//! mixes of atoms, words and code points; random runs over small alphabets aimed at one
//! part of the patterns each, or at merges that start from whole characters next to
//! characters of other scripts). Each string is encoded on its own (start and end of text
//! matter to the patterns). `full_corpus_encodes_like_tiktoken` runs natively: 255,381
//! strings, 6.3 MB per encoding when this was written (it prints the exact figures; the
//! repository files in it change); about 20 s in a test build. `make wasm-test` runs
//! `reduced_corpus_encodes_like_tiktoken` compiled to wasm32-wasip1 in V8: 37,712 strings,
//! 0.71 MB per encoding.
//!
//! The faster paths are also checked against the plainer ones they replace: the
//! pre-tokenizers' ASCII fast paths against their general paths at every character
//! boundary of the reduced corpus, merges from whole characters against a plain merge from
//! bytes for every character that may start whole, the scan merge against the heap merge,
//! and the rank tables against their own contents (every token found from its bytes at
//! every offset, none found from near misses).

use std::collections::HashMap;
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use super::{hash, joins, merge, pieces, split, table, Bpe};

// ---------------------------------------------------------------------------------------
// The reference
// ---------------------------------------------------------------------------------------

fn reference_o200k() -> &'static CoreBPE {
    static R: OnceLock<CoreBPE> = OnceLock::new();
    R.get_or_init(|| tiktoken_rs::o200k_base().unwrap())
}

fn reference_cl100k() -> &'static CoreBPE {
    static R: OnceLock<CoreBPE> = OnceLock::new();
    R.get_or_init(|| tiktoken_rs::cl100k_base().unwrap())
}

/// tiktoken-rs 0.12.1's cl100k_base pattern (not exported by the crate).
const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

fn pattern_o200k() -> &'static fancy_regex::Regex {
    static R: OnceLock<fancy_regex::Regex> = OnceLock::new();
    R.get_or_init(|| fancy_regex::Regex::new(tiktoken_rs::O200K_BASE_PAT_STR).unwrap())
}

fn pattern_cl100k() -> &'static fancy_regex::Regex {
    static R: OnceLock<fancy_regex::Regex> = OnceLock::new();
    R.get_or_init(|| fancy_regex::Regex::new(CL100K_PATTERN).unwrap())
}

struct Pair {
    name: &'static str,
    ours: Bpe,
    reference: &'static CoreBPE,
    pattern: &'static fancy_regex::Regex,
    piece_end: fn(&[u8], usize) -> usize,
}

fn pairs() -> [Pair; 2] {
    [
        Pair {
            name: "o200k_base",
            ours: Bpe::o200k_base(),
            reference: reference_o200k(),
            pattern: pattern_o200k(),
            piece_end: split::o200k_piece_end,
        },
        Pair {
            name: "cl100k_base",
            ours: Bpe::cl100k_base(),
            reference: reference_cl100k(),
            pattern: pattern_cl100k(),
            piece_end: split::cl100k_piece_end,
        },
    ]
}

impl Pair {
    /// None if `text` encodes (and counts) exactly as tiktoken-rs does it; else a report.
    fn mismatch(&self, text: &str) -> Option<String> {
        let want = self.reference.encode_ordinary(text);
        let got = self.ours.encode(text);
        let count = self.ours.count(text);
        if got == want && count == want.len() {
            return None;
        }
        let want_pieces: Vec<&str> = self
            .pattern
            .find_iter(text)
            .map(|m| m.unwrap().as_str())
            .collect();
        let got_pieces = split::pieces(text, self.piece_end);
        let detail = if want_pieces != got_pieces {
            let at = want_pieces
                .iter()
                .zip(&got_pieces)
                .position(|(a, b)| a != b)
                .unwrap_or(want_pieces.len().min(got_pieces.len()));
            format!(
                "pieces differ at #{at}: regex {:?}, ours {:?}",
                want_pieces.get(at.saturating_sub(1)..(at + 2).min(want_pieces.len())),
                got_pieces.get(at.saturating_sub(1)..(at + 2).min(got_pieces.len())),
            )
        } else {
            format!("same pieces, tokens differ: tiktoken {want:?}, ours {got:?}, count {count}")
        };
        let shown: String = text.chars().take(200).collect();
        Some(format!("{}: {shown:?}: {detail}", self.name))
    }
}

/// Encodes every string of `corpus` with both encodings; panics listing the first
/// mismatches. Returns (strings, bytes, tokens) per encoding for the report.
fn assert_equivalent(corpus: &[String]) -> Vec<(&'static str, usize, usize, usize)> {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for pair in pairs() {
        let mut bytes = 0;
        let mut tokens = 0;
        for text in corpus {
            bytes += text.len();
            tokens += pair.ours.count(text);
            if let Some(m) = pair.mismatch(text) {
                if failures.len() < 20 {
                    failures.push(m);
                }
            }
        }
        report.push((pair.name, corpus.len(), bytes, tokens));
    }
    assert!(
        failures.is_empty(),
        "{} mismatch(es) with tiktoken-rs (first {}):\n{}",
        failures.len(),
        failures.len(),
        failures.join("\n")
    );
    report
}

// ---------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------

/// splitmix64: small, seeded, the same on every target.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Prose in many scripts and registers.
const PROSE: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock somewhere; we'll see—won't we?",
    "I'm sure they've said you'd be here, but I'LL check: DON'T, SHE'S, WE'RE, THEY'VE, I'D, I'M.",
    "Mixed: It'S, we'Ll, they'Re, you'Ve, I'M, she'D — and curly: it’s, we’ll, they’re.",
    "  Indented text\twith tabs\tand  double  spaces.  \n\nNew paragraph.\r\nWindows line.\rOld Mac line.",
    "CamelCaseIdentifiers likeThisOne and HTTPServerError, XMLHttpRequest, iPhone, eBay, McDonald's.",
    "今天天气很好，我们去公园散步吧。请把这份文件翻译成英文，并保持原来的格式。",
    "東京の天気は晴れのち曇り、午後から雨が降るでしょう。カタカナとひらがな、漢字。ｶﾀｶﾅ（半角）",
    "인공지능 모델은 입력된 텍스트를 토큰 단위로 나누어 처리합니다. 오늘 회의는 취소되었습니다.",
    "مرحبا بالعالم! هذه جملة باللغة العربية مع أرقام ١٢٣٤٥ وعلامات التشكيل: مَرْحَبًا.",
    "שלום עולם! זהו משפט בעברית עם ניקוד: שָׁלוֹם, ומספרים 2024.",
    "नमस्ते दुनिया! यह हिंदी में एक वाक्य है, अंक १२३४५ के साथ। क्षत्रिय, द्वार।",
    "สวัสดีชาวโลก นี่คือประโยคภาษาไทยที่ไม่มีช่องว่างระหว่างคำ ๑๒๓",
    "Ελληνικά: Γειά σου Κόσμε! Русский: Привет, мир! Українська: Привіт, світе! Ǆemal ǅemal ǆemal.",
    "Tiếng Việt: Xin chào thế giới! Türkçe: İstanbul'da ılık bir gün. Deutsch: Straße, GRÜẞE.",
    "Emoji: 😀😃😄 👍🏽👍🏿 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇺🇸🇯🇵 #️⃣ 1️⃣ 🧑🏻‍💻 — and text after.",
    "Combining: e\u{301}te\u{301}, n\u{303}, a\u{30a}, Z\u{335}\u{321}\u{31b}a\u{336}l\u{337}g\u{338}o\u{334}, \u{301}\u{302}\u{303}alone.",
    "Math: ∀x∈ℝ, x²≥0; ∑ᵢ aᵢ = ½; 3×4=12; π≈3.14159; ∞ ≠ ∅. Roman: Ⅻ, ⅷ. Circled: ①②③.",
    "Digits: 1 12 123 1234 12345 123456 1234567 12345678 123456789 1234567890 3.14159 1e10 0xFF.",
    "Full-width: ＡＢＣ ａｂｃ １２３ ！？ Ideographic space:\u{3000}here. NBSP:\u{a0}here\u{a0}\u{a0}there.",
    "Paths: /usr/local/bin, C:\\Windows\\System32, https://example.com/a/b?c=d&e=f#g, ../../etc/passwd",
    "Punctuation!!!\n...\n???\r\n---/// ***\n/**/ //\n;;\n\n\n(){}[]<>\n«quotes» „quotes“ ‘single’ ‹angle›",
    "Unicode spaces:\u{2000}\u{2001}\u{2002}\u{2003}\u{2009}\u{200a}\u{202f}\u{205f}end\u{2028}line\u{2029}para\u{85}nel\u{b}vt\u{c}ff",
    "Zero width: a\u{200b}b\u{200c}c\u{200d}d\u{feff}e\u{ad}f\u{2060}g; bidi: \u{202e}reversed\u{202c} \u{200f}",
    "<|endoftext|> <|fim_prefix|> <|endofprompt|> special tokens are ordinary text here <|im_start|>",
];

/// Short strings that stress the patterns, combined with each other.
const ATOMS: &[&str] = &[
    " ",
    "  ",
    "\t",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    " \n",
    "\u{a0}",
    "\u{3000}",
    "\u{2028}",
    "\u{85}",
    "\u{b}",
    "\u{c}",
    "\u{2009}",
    "a",
    "z",
    "A",
    "Z",
    "ab",
    "AB",
    "Ab",
    "aB",
    "hello",
    "World",
    "HTTP",
    "'",
    "’",
    "'s",
    "'S",
    "'t",
    "'T",
    "'re",
    "'RE",
    "'Re",
    "'ve",
    "'VE",
    "'m",
    "'M",
    "'ll",
    "'LL",
    "'Ll",
    "'lL",
    "'d",
    "'D",
    "'ſ",
    "'x",
    "'r",
    "'v",
    "'l",
    "’s",
    "''",
    "0",
    "1",
    "12",
    "123",
    "1234",
    "٣",
    "١٢٣٤",
    "४२",
    "½",
    "²",
    "Ⅻ",
    "!",
    "!!",
    "?",
    ".",
    ",",
    "...",
    "/",
    "//",
    "-",
    "_",
    "$",
    "#",
    "@",
    "(",
    ")",
    "\"",
    "é",
    "e\u{301}",
    "\u{301}",
    "\u{301}\u{302}",
    "\u{20dd}",
    "\u{903}",
    "ǅ",
    "ǈ",
    "ʰ",
    "ˇ",
    "々",
    "中",
    "文字",
    "ー",
    "ｱ",
    "한",
    "ب",
    "ש",
    "क्ष",
    "ก",
    "ß",
    "İ",
    "ı",
    "Σ",
    "ς",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "\u{200d}",
    "\u{fe0f}",
    "🏽",
    "\u{e0067}",
    "\u{0}",
    "\u{7}",
    "\u{7f}",
    "\u{9f}",
    "\u{e000}",
    "\u{f0000}",
    "\u{378}",
    "\u{ffff}",
    "€",
    "©",
    "\u{10ffff}",
    "\u{1d400}",
    "\u{20000}",
];

/// A subset of [`ATOMS`] for sequences of three.
const ATOMS3: &[&str] = &[
    " ", "  ", "\t", "\n", "\r\n", "\u{a0}", "\u{3000}", "\u{85}", "a", "A", "Ab", "aB", "'", "'s",
    "'S", "'ll", "'Re", "’", "1", "1234", "½", "!", "/", ".", "\u{301}", "ǅ", "ʰ", "中", "😀",
    "\u{200d}", "\u{0}", "\u{378}", "ß",
];

/// Code points of every general category (Cs cannot occur in a `str`).
const CATEGORIES: &[(&str, &[u32])] = &[
    (
        "Lu",
        &[
            0x41, 0x5a, 0xc0, 0x391, 0x410, 0x1e00, 0xff21, 0x1d400, 0x10400,
        ],
    ),
    (
        "Ll",
        &[
            0x61, 0x7a, 0xdf, 0x3b1, 0x430, 0x1e01, 0xff41, 0x1d41a, 0x10428,
        ],
    ),
    ("Lt", &[0x1c5, 0x1c8, 0x1cb, 0x1f2, 0x1f88, 0x1fbc]),
    (
        "Lm",
        &[0x2b0, 0x2c6, 0x3005, 0x3031, 0xff70, 0x16f93, 0x1e137],
    ),
    (
        "Lo",
        &[
            0xaa, 0x5d0, 0x627, 0x905, 0xe01, 0x4e00, 0xac00, 0x3042, 0x20000, 0x30000,
        ],
    ),
    (
        "Mn",
        &[
            0x300, 0x301, 0x36f, 0x64b, 0x93c, 0xe31, 0x20d0, 0xfe0f, 0x1d167, 0xe0100,
        ],
    ),
    ("Mc", &[0x903, 0x93e, 0x9bf, 0xb3e, 0x1d165]),
    ("Me", &[0x488, 0x489, 0x20dd, 0x20de, 0xa670]),
    (
        "Nd",
        &[
            0x30, 0x39, 0x660, 0x6f0, 0x966, 0xe50, 0xff10, 0x1d7ce, 0x1fbf0,
        ],
    ),
    ("Nl", &[0x16ee, 0x2160, 0x216b, 0x3007, 0x10140, 0x12400]),
    (
        "No",
        &[0xb2, 0xb9, 0xbc, 0xbd, 0x2070, 0x2460, 0x3251, 0x1f100],
    ),
    ("Pc", &[0x5f, 0x203f, 0x2040, 0xfe33, 0xff3f]),
    ("Pd", &[0x2d, 0x58a, 0x2010, 0x2014, 0x301c, 0xfe58]),
    ("Ps", &[0x28, 0x5b, 0x7b, 0x2045, 0x3008, 0xff08]),
    ("Pe", &[0x29, 0x5d, 0x7d, 0x2046, 0x3009, 0xff09]),
    ("Pi", &[0xab, 0x2018, 0x201c, 0x2039, 0x2e02]),
    ("Pf", &[0xbb, 0x2019, 0x201d, 0x203a, 0x2e03]),
    (
        "Po",
        &[
            0x21, 0x22, 0x27, 0x2e, 0x2f, 0xa1, 0x37e, 0x3002, 0xff01, 0x1f10d,
        ],
    ),
    (
        "Sm",
        &[0x2b, 0x3c, 0x7c, 0xac, 0xd7, 0x2200, 0x221e, 0x1d6c1],
    ),
    ("Sc", &[0x24, 0xa2, 0xa3, 0x20ac, 0x20bf, 0xffe5]),
    ("Sk", &[0x5e, 0x60, 0xa8, 0xaf, 0x2c2, 0x1f3fb, 0x1f3ff]),
    (
        "So",
        &[0xa6, 0xa9, 0xae, 0x2122, 0x2600, 0x1f600, 0x1f44d, 0x1f1fa],
    ),
    (
        "Zs",
        &[
            0x20, 0xa0, 0x1680, 0x2000, 0x2007, 0x200a, 0x202f, 0x205f, 0x3000,
        ],
    ),
    ("Zl", &[0x2028]),
    ("Zp", &[0x2029]),
    (
        "Cc",
        &[0x0, 0x7, 0x9, 0xa, 0xb, 0xc, 0xd, 0x1b, 0x7f, 0x85, 0x9f],
    ),
    (
        "Cf",
        &[
            0xad, 0x600, 0x200b, 0x200c, 0x200d, 0x200e, 0x2060, 0xfeff, 0xe0001, 0xe007f,
        ],
    ),
    ("Co", &[0xe000, 0xf8ff, 0xf0000, 0x10fffd]),
    (
        "Cn",
        &[
            0x378, 0x5ff, 0xfdd0, 0xfffe, 0xffff, 0x2fffe, 0xeffff, 0x10ffff,
        ],
    ),
];

/// Words for the random mixes.
const WORDS: &[&str] = &[
    "the",
    "token",
    "budget",
    "Envoy",
    "don't",
    "WON'T",
    "you're",
    "I'd",
    "naïve",
    "café",
    "Straße",
    "ΑΘΗΝΑ",
    "мир",
    "世界",
    "こんにちは",
    "안녕",
    "مرحبا",
    "שלום",
    "नमस्ते",
    "สวัสดี",
    "fn",
    "let",
    "x_1",
    "foo.bar",
    "a/b/c",
    "<div>",
    "{\"k\":1}",
    "12345",
    "3.14",
    "#!",
    "--",
    "=>",
];

fn cp_char(cp: u32) -> char {
    char::from_u32(cp).unwrap_or('\u{fffd}')
}

/// A code point anywhere in Unicode (any plane, surrogates excluded), or from a category.
fn random_char(rng: &mut Rng) -> char {
    match rng.below(10) {
        0..=2 => cp_char(rng.below(0x80) as u32),
        3 => cp_char(0x80 + rng.below(0x780) as u32),
        4 | 5 => {
            let cp = rng.below(0x1_0000) as u32;
            if (0xd800..0xe000).contains(&cp) {
                ' '
            } else {
                cp_char(cp)
            }
        }
        6 => cp_char(0x1_0000 + rng.below(0x10_0000) as u32), // planes 1-16
        _ => {
            let (_, cps) = rng.pick(CATEGORIES);
            cp_char(*rng.pick(cps))
        }
    }
}

fn random_mix(rng: &mut Rng, parts: usize) -> String {
    let mut s = String::new();
    for _ in 0..parts {
        match rng.below(6) {
            0 | 1 => s.push_str(rng.pick::<&str>(ATOMS)),
            2 => s.push_str(rng.pick::<&str>(WORDS)),
            3 => s.push(random_char(rng)),
            4 => s.push(' '),
            _ => {
                let (_, cps) = rng.pick(CATEGORIES);
                s.push(cp_char(*rng.pick(cps)));
            }
        }
    }
    s
}

/// Pieces of hundreds of bytes: merged by the heap path.
fn long_runs() -> Vec<String> {
    let mut out = Vec::new();
    for n in [65, 99, 100, 101, 128, 200, 333, 1000] {
        out.push("a".repeat(n));
        out.push(" ".repeat(n));
        out.push("!".repeat(n));
        out.push("中".repeat(n / 3 + 1));
        out.push("ab".repeat(n / 2));
        out.push("\n ".repeat(n / 2) + "x");
        out.push("\u{301}".repeat(n / 2));
        out.push("😀".repeat(n / 4 + 1));
        out.push("1".repeat(n));
        out.push("=-".repeat(n / 2));
    }
    let mut rng = Rng(7);
    for len in [80, 150, 400, 1500] {
        let alphabets: [&[u8]; 4] = [b"abcdefghijklmnopqrstuvwxyz", b"etaoin", b"ACGT", b"xq"];
        for alphabet in alphabets {
            let s: String = (0..len).map(|_| char::from(*rng.pick(alphabet))).collect();
            out.push(s.clone());
            out.push(format!(" {s}"));
            out.push(s.to_uppercase());
        }
        let han: String = (0..len / 3)
            .map(|_| cp_char(0x4e00 + rng.below(0x5000) as u32))
            .collect();
        out.push(han);
        let hangul: String = (0..len / 3)
            .map(|_| cp_char(0xac00 + rng.below(11172) as u32))
            .collect();
        out.push(hangul);
        let thai: String = (0..len / 3)
            .map(|_| cp_char(0xe01 + rng.below(0x2e) as u32))
            .collect();
        out.push(thai);
        let bytes: String = (0..len / 2)
            .map(|_| cp_char(0x80 + rng.below(0x80) as u32))
            .collect();
        out.push(bytes);
    }
    for n in 1..=40 {
        out.push("9".repeat(n));
        out.push(format!("x{}y", "7".repeat(n)));
        out.push(format!(" {}", "٣".repeat(n)));
    }
    out
}

/// Small alphabets whose random strings exercise one part of the patterns hard: white-space
/// runs (lookahead, last newline), letters of every case class with marks and contractions
/// (o200k's overlapping upper/lower classes), punctuation with newlines and slashes, digits;
/// and letters of several scripts side by side (merges from whole characters).
const FOCUSED: &[&[&str]] = &[
    &[
        " ", "\t", "\r", "\n", "\u{a0}", "\u{3000}", "\u{2028}", "\u{85}", "\u{b}", "\u{c}",
        "\u{2009}", "a", "!", "1",
    ],
    &[
        "a", "A", "\u{1c5}", "\u{2b0}", "\u{301}", "\u{4e2d}", "'", "s", "S", "l", "L", "e", "R",
        "\u{17f}", " ", "\u{2019}",
    ],
    &[
        "!", ".", "/", "\n", "\r", " ", "-", "*", "\u{301}", "a", "\u{200d}", "1",
    ],
    &[
        "1", "\u{663}", "\u{bd}", "\u{2160}", " ", "a", ".", "\u{ff11}",
    ],
    // Letters of several scripts side by side: merges that start from whole characters
    // (merge.rs) next to neighbours of every lead-byte group.
    &[
        "\u{4e2d}",
        "\u{6587}",
        "\u{7684}",
        "\u{306e}",
        "\u{30ab}",
        "\u{d55c}",
        "\u{ad6d}",
        "\u{3002}",
        "\u{ff0c}",
        "\u{e9}",
        "\u{436}",
        "\u{915}",
        "\u{e01}",
        "\u{1f600}",
        "\u{20000}",
        " ",
        "a",
        "'",
        "s",
    ],
];

/// This repository's text files (code, configuration, prose).
const REPO_FILES: &[&str] = &[
    include_str!("../../../README.md"),
    include_str!("../../../Makefile"),
    include_str!("../../../Cargo.toml"),
    include_str!("../../../build.rs"),
    include_str!("../../../envoy/envoy-global.yaml"),
    include_str!("../../../scripts/wasi-run.mjs"),
    include_str!("../../../scripts/fuzz.sh"),
    include_str!("../../../envoy/envoy.yaml"),
    include_str!("../mod.rs"),
    include_str!("../../exchange/mod.rs"),
    include_str!("../../config/mod.rs"),
    include_str!("../../llm/sse.rs"),
    include_str!("split.rs"),
    include_str!("tests.rs"),
];

/// The corpus. `scale` 1 is the reduced one; the full corpus uses a larger scale (more
/// random strings, longer mixes, sequences of three atoms).
fn corpus(scale: usize) -> Vec<String> {
    let mut out: Vec<String> = PROSE.iter().map(|s| s.to_string()).collect();
    out.push(PROSE.join(" "));
    out.push(PROSE.join("\n"));
    out.extend(
        REPO_FILES
            .iter()
            .take(if scale > 1 { REPO_FILES.len() } else { 2 })
            .map(|s| s.to_string()),
    );
    for a in ATOMS {
        out.push(a.to_string());
        for b in ATOMS {
            out.push(format!("{a}{b}"));
        }
    }
    if scale > 1 {
        for a in ATOMS3 {
            for b in ATOMS3 {
                for c in ATOMS3 {
                    out.push(format!("{a}{b}{c}"));
                }
            }
        }
    }
    out.extend(long_runs());
    for (_, cps) in CATEGORIES {
        for &cp in *cps {
            let c = cp_char(cp);
            for context in ["", " ", "a", "A", "1", "!", "\n", "  ", "'s"] {
                out.push(format!("{c}{context}"));
                out.push(format!("{context}{c}"));
                out.push(format!("{context}{c}{c}{context}"));
            }
        }
    }
    let mut rng = Rng(0x70_6b_6e_66_75_73_65); // "tokfuse"
    for _ in 0..2000 * scale {
        let len = 1 + rng.below(40);
        out.push((0..len).map(|_| random_char(&mut rng)).collect());
    }
    for _ in 0..2000 * scale {
        let parts = 1 + rng.below(30);
        out.push(random_mix(&mut rng, parts));
    }
    for _ in 0..20 * scale {
        let parts = 500 + rng.below(3000);
        out.push(random_mix(&mut rng, parts));
    }
    for alphabet in FOCUSED {
        for _ in 0..2500 * scale {
            let len = 1 + rng.below(14);
            out.push((0..len).map(|_| *rng.pick(alphabet)).collect());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(not(target_family = "wasm"))]
#[test]
fn full_corpus_encodes_like_tiktoken() {
    let corpus = corpus(12);
    for (name, strings, bytes, tokens) in assert_equivalent(&corpus) {
        println!(
            "{name}: {strings} strings, {bytes} bytes, {tokens} tokens: identical to tiktoken-rs"
        );
    }
}

/// The pre-tokenizers' ASCII fast paths agree with their general paths at every character
/// boundary of the reduced corpus.
#[test]
fn ascii_fast_paths_agree_with_the_general_ones_on_the_corpus() {
    for text in corpus(1) {
        split::tests::assert_fast_paths_agree(&text);
    }
}

#[test]
fn reduced_corpus_encodes_like_tiktoken() {
    let corpus = corpus(1);
    for (name, strings, bytes, tokens) in assert_equivalent(&corpus) {
        println!(
            "{name}: {strings} strings, {bytes} bytes, {tokens} tokens: identical to tiktoken-rs"
        );
    }
}

#[test]
fn cookbook_strings_have_tiktokens_token_ids() {
    // The cookbook's examples; the ids are whatever tiktoken-rs says, token for token.
    for pair in pairs() {
        for text in [
            "tiktoken is great!",
            "antidisestablishmentarianism",
            "2 + 2 = 4",
            "お誕生日おめでとう",
        ] {
            assert_eq!(
                pair.ours.encode(text),
                pair.reference.encode_ordinary(text),
                "{text}"
            );
        }
    }
}

/// Every code point, alone and between letters, classified like fancy-regex does it.
#[cfg(not(target_family = "wasm"))]
#[test]
fn every_code_point_has_the_regex_engines_classes() {
    use super::classes;
    let checks: [(&str, u8); 6] = [
        (r"\p{L}", classes::LETTER),
        (r"\p{N}", classes::NUMBER),
        (r"\s", classes::SPACE),
        (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", classes::UPPER),
        (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", classes::LOWER),
        (r"[\r\n]", classes::NEWLINE),
    ];
    // All scalar values in one string; fancy-regex finds every match of the class, which
    // must be exactly the code points carrying the bit.
    let all: String = (0..=0x10_ffffu32).filter_map(char::from_u32).collect();
    for (pattern, bit) in checks {
        let re = fancy_regex::Regex::new(pattern).unwrap();
        let mut matched = vec![false; 0x11_0000];
        for m in re.find_iter(&all) {
            let c = m.unwrap().as_str().chars().next().unwrap();
            matched[c as usize] = true;
        }
        for c in all.chars() {
            assert_eq!(
                matched[c as usize],
                classes::class_of(c as u32) & bit != 0,
                "{pattern} on U+{:04X}",
                c as u32
            );
        }
    }
    for letter in ['s', 't', 'r', 'e', 'v', 'm', 'l', 'd'] {
        let re = fancy_regex::Regex::new(&format!("(?i:{letter})")).unwrap();
        for c in all.chars() {
            let folds = classes::folded_letter(c as u32) == letter as u8;
            assert_eq!(
                re.is_match(&c.to_string()).unwrap(),
                folds,
                "(?i:{letter}) on U+{:04X}",
                c as u32
            );
        }
    }
}

#[test]
fn scan_and_heap_merges_agree() {
    let mut rng = Rng(42);
    let mut scratch = merge::Scratch::new();
    let alphabets: [&[u8]; 5] = [
        b"ab",
        b"etaoinshr",
        "中文字".as_bytes(),
        b" \n!",
        b"\xe4\xb8\x80\xff",
    ];
    for vocab in [&table::O200K_BASE, &table::CL100K_BASE] {
        let joins = joins::Joins::new();
        for _ in 0..400 {
            let len = 2 + rng.below(merge::SMALL - 1);
            let alphabet = *rng.pick(&alphabets);
            let piece: Vec<u8> = (0..len).map(|_| *rng.pick(alphabet)).collect();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let na = merge::merge_small(
                vocab,
                &joins,
                &piece,
                merge::Start::Bytes,
                &mut scratch,
                &mut |t| a.push(t),
            );
            let nb = merge::merge_large(
                vocab,
                &joins,
                &piece,
                merge::Start::Bytes,
                &mut scratch,
                &mut |t| b.push(t),
            );
            assert_eq!((na, &a), (nb, &b), "{piece:?}");
        }
    }
}

/// tiktoken's `byte_pair_merge`, as plainly as it can be written: the ranks `piece` merges
/// into, starting from single bytes.
fn plain_merge(ranks: &HashMap<Vec<u8>, u32>, piece: &[u8]) -> Vec<u32> {
    let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
    loop {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..parts.len().saturating_sub(1) {
            let joined = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
            if let Some(&r) = ranks.get(&joined) {
                if best.is_none_or(|(b, _)| r < b) {
                    best = Some((r, i));
                }
            }
        }
        let Some((_, i)) = best else {
            return parts.iter().map(|p| ranks[p]).collect();
        };
        let right = parts.remove(i + 1);
        parts[i].extend_from_slice(&right);
    }
}

/// A merge that starts from whole characters (the vocabulary's `chars` table, where the
/// neighbours allow it) gives the tokens tiktoken's merge from single bytes gives: every
/// character of the table alone, doubled, after and before characters of every lead-byte
/// group, between two of them; and random runs of table characters and such neighbours,
/// short (the scan path) and long (the heap path).
#[test]
fn merges_from_whole_characters_give_the_tokens_of_merges_from_bytes() {
    const NEIGHBOURS: &[&str] = &[
        " ",
        "a",
        "Z",
        "1",
        "'",
        ".",
        "\n",
        "\u{e9}",
        "\u{436}",
        "\u{df}",
        "\u{639}",
        "\u{5e9}",
        "\u{915}",
        "\u{e01}",
        "\u{2014}",
        "\u{201c}",
        "\u{2026}",
        "\u{20ac}",
        "\u{306e}",
        "\u{30ab}",
        "\u{3002}",
        "\u{3001}",
        "\u{4e2d}",
        "\u{7684}",
        "\u{6587}",
        "\u{56fd}",
        "\u{d55c}",
        "\u{ad6d}",
        "\u{c5b4}",
        "\u{ff0c}",
        "\u{ff01}",
        "\u{ff71}",
        "\u{e000}",
        "\u{1f600}",
        "\u{20000}",
        "\u{1f3fd}",
    ];
    let step = if cfg!(target_family = "wasm") { 7 } else { 1 };
    let mut rng = Rng(0x63_68_61_72_73); // "chars"
    let mut scratch = merge::Scratch::new();
    for vocab in [&table::O200K_BASE, &table::CL100K_BASE] {
        let joins = joins::Joins::new();
        let ranks: HashMap<Vec<u8>, u32> = vocab
            .entries()
            .into_iter()
            .map(|(bytes, info)| (bytes, info & hash::RANK_MASK))
            .collect();
        let chars: Vec<String> = vocab
            .char_entries()
            .into_iter()
            .map(|(bytes, _, _)| String::from_utf8(bytes).unwrap())
            .collect();
        assert!(chars.len() > 1000);
        let mut check = |text: &str| {
            let piece = text.as_bytes();
            if piece.len() < 2 {
                return;
            }
            let mut whole = Vec::new();
            let n = merge::merge(
                vocab,
                &joins,
                piece,
                merge::Start::Chars,
                &mut scratch,
                &mut |t| whole.push(t),
            );
            assert_eq!(n, whole.len());
            assert_eq!(whole, plain_merge(&ranks, piece), "{text:?}");
        };
        for c in chars.iter().step_by(step) {
            check(c);
            check(&format!("{c}{c}"));
            for n in NEIGHBOURS {
                check(&format!("{n}{c}"));
                check(&format!("{c}{n}"));
                check(&format!("{n}{c}{}", rng.pick(NEIGHBOURS)));
                check(&format!("{}{c}{n}", rng.pick(&chars)));
            }
        }
        for _ in 0..20_000 / step {
            let longest = if rng.below(4) == 0 { 60 } else { 16 };
            let len = 1 + rng.below(longest);
            let text: String = (0..len)
                .map(|_| match rng.below(3) {
                    0 => *rng.pick(NEIGHBOURS),
                    _ => rng.pick(&chars).as_str(),
                })
                .collect();
            check(&text);
        }
    }
}

/// Text like the peer bench's `cjk` (ideographs, kana and Hangul drawn uniformly, with
/// full-width punctuation and spaces) encodes like tiktoken: almost every pair of
/// neighbouring characters, and of characters put together from their bytes, is ruled out
/// by the vocabulary's filter (`Vocab::may_be_token`), and the few that are tokens must
/// still merge.
#[test]
fn uniformly_drawn_cjk_encodes_like_tiktoken() {
    let mut rng = Rng(0x63_6a_6b); // "cjk"
    let strings = if cfg!(target_family = "wasm") {
        200
    } else {
        2_000
    };
    let corpus: Vec<String> = (0..strings)
        .map(|_| {
            let script = rng.below(3);
            let chars = 2 + rng.below(60);
            let mut s = String::new();
            for i in 0..chars {
                let cp = match script {
                    0 => 0x4e00 + rng.below(0x1400) as u32,
                    1 if rng.below(2) == 0 => 0x3041 + rng.below(0x56) as u32,
                    1 => 0x4e00 + rng.below(0x1400) as u32,
                    _ => {
                        if i > 0 && rng.below(4) == 0 {
                            s.push(' ');
                        }
                        0xac00 + rng.below(2000) as u32
                    }
                };
                s.push(cp_char(cp));
                if rng.below(10) == 0 {
                    s.push(*rng.pick(&['、', '，', '。', ',']));
                }
            }
            s
        })
        .collect();
    assert_equivalent(&corpus);
    // The tokens of two characters, the filter's purpose, each on its own and inside runs.
    for pair in pairs() {
        let twos: Vec<String> = table_entries_of_two_characters(&pair);
        assert!(twos.len() > 100, "{}: {}", pair.name, twos.len());
        let mut runs = Vec::new();
        for (i, t) in twos.iter().enumerate() {
            runs.push(t.clone());
            runs.push(format!("{t}{}", twos[(i * 7 + 3) % twos.len()]));
            runs.push(format!("中{t}的"));
        }
        for text in &runs {
            if let Some(m) = pair.mismatch(text) {
                panic!("{m}");
            }
        }
    }
}

/// The tokens of an encoding that are two characters of 2 to 4 bytes each, 5 to 8 bytes in
/// all (those `Vocab::may_be_token` filters).
fn table_entries_of_two_characters(pair: &Pair) -> Vec<String> {
    let vocab = if pair.name == "o200k_base" {
        &table::O200K_BASE
    } else {
        &table::CL100K_BASE
    };
    vocab
        .entries()
        .into_iter()
        .filter(|(b, _)| (5..=8).contains(&b.len()))
        .filter_map(|(b, _)| String::from_utf8(b).ok())
        .filter(|s| s.chars().count() == 2 && s.chars().all(|c| c.len_utf8() > 1))
        .collect()
}

/// fancy-regex gives up after a million backtracking steps, and tiktoken-rs 0.12.1 unwraps
/// its error: it panics on a run of 999,999 or more white-space characters without a newline
/// (`\s*[\r\n]+` backtracks through the whole run; cl100k's `\s++$` takes such a run first
/// when it ends the text; compiled to wasm the engine reports a stack overflow instead). The
/// shipped Envoy config accepts 4 MiB bodies: in Envoy the tiktoken-rs module answered such a
/// prompt with 503, and every later request too (its VM dead). This counter has no such
/// limit; the pieces are the ones the pattern defines, and each is merged as usual.
#[cfg(not(target_family = "wasm"))]
#[test]
fn white_space_runs_past_the_regex_backtrack_limit_are_counted() {
    let run = " ".repeat(999_999);
    let text = format!("{run} x");
    for pair in pairs() {
        assert_eq!(split::pieces(&text, pair.piece_end), [run.as_str(), " x"]);
        let tokens = pair.ours.encode(&text);
        assert!(
            tokens.len() > run.len() / 128,
            "the longest tokens are 128 bytes"
        );
        let reference = std::panic::catch_unwind(|| pair.reference.encode_ordinary(&text));
        if let Ok(want) = reference {
            // If a later tiktoken-rs copes, it must agree.
            assert_eq!(tokens, want);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Streamed text: which pieces are final (`split.rs`, "Which pieces are final")
// ---------------------------------------------------------------------------------------

/// At every character boundary `k` of `text`, the pieces of `text[..k]` but the last two
/// are pieces of `text` (what `Bpe::count_settled` counts and lets go can no longer
/// change), and `count_settled` counts exactly them. `from_start`: split `text[..k]` from
/// its start at every `k` (quadratic, for short texts); otherwise from the boundary the
/// previous `k` settled, which is how a stream is scanned (matching at `p` reads only
/// `text[p..]`), linear.
fn assert_settled_pieces_stand(pair: &Pair, text: &str, from_start: bool) {
    let whole = split::pieces(text, pair.piece_end);
    // Byte offset where each piece of the whole text starts -> its index.
    let mut starts = HashMap::new();
    let mut at = 0;
    for (i, piece) in whole.iter().enumerate() {
        starts.insert(at, i);
        at += piece.len();
    }
    let mut from = 0; // a boundary of `whole`, settled at an earlier k
    for (k, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
        let base = if from_start { 0 } else { from };
        let head = &text[base..k];
        let pieces = split::pieces(head, pair.piece_end);
        let settled = pieces.len().saturating_sub(2);
        let first = starts[&base];
        assert_eq!(
            &pieces[..settled],
            &whole[first..first + settled],
            "{}: {:?} then {:?}",
            pair.name,
            &text[..k],
            &text[k..]
        );
        let (tokens, tail) = pair.ours.count_settled(head);
        let want: usize = pieces[..settled].iter().map(|p| pair.ours.count(p)).sum();
        let want_tail: usize = pieces[..settled].iter().map(|p| p.len()).sum();
        assert_eq!((tokens, tail), (want, want_tail), "{}: {head:?}", pair.name);
        from = base + tail;
    }
}

#[test]
fn settled_pieces_stand_whatever_follows_at_every_split_of_the_corpus() {
    // The full corpus natively, the reduced one in V8.
    let corpus = corpus(if cfg!(target_family = "wasm") { 1 } else { 12 });
    for pair in pairs() {
        for text in &corpus {
            assert_settled_pieces_stand(&pair, text, text.len() <= 256);
        }
    }
}

/// Every string of up to four characters over an alphabet of one character of each kind
/// the patterns tell apart (upper, lower, title case, modifier and other letters, a mark,
/// digits and other numbers, white space of each kind, punctuation, `/`, `'` and the
/// letters of contractions), and of five over a smaller one, split at every boundary.
#[test]
fn settled_pieces_stand_on_every_short_string_of_every_class() {
    const WIDE: &[char] = &[
        'a', 'A', '\u{1c5}', '\u{2b0}', '\u{4e2d}', '\u{301}', '1', '\u{bd}', ' ', '\n', '\r',
        '\t', '\u{a0}', '!', '/', '\'', '\u{2019}', 's', 'l', 'L', 'e', 'r',
    ];
    const NARROW: &[char] = &[
        'a', 'A', '\u{4e2d}', '\u{301}', '1', ' ', '\n', '!', '\'', 'l',
    ];
    // Compiled to wasm the unit tests run in V8 (`make wasm-test`), slower: length 3 and 4.
    let (wide, narrow) = if cfg!(target_family = "wasm") {
        (3, 4)
    } else {
        (4, 5)
    };
    let pairs = pairs();
    let mut text = String::new();
    for (alphabet, len) in [(WIDE, wide), (NARROW, narrow)] {
        let n = alphabet.len();
        for mut code in 0..n.pow(len) {
            text.clear();
            for _ in 0..len {
                text.push(alphabet[code % n]);
                code /= n;
            }
            for pair in &pairs {
                assert_settled_pieces_stand(pair, &text, true);
            }
        }
    }
}

/// The corpus streamed through `StreamedText`: one character at a time with a scan after
/// each, and in random chunks at the batching's own pace; both count like the whole text.
#[test]
fn streamed_text_counts_like_the_whole_text_on_the_corpus() {
    use crate::tokenizer::streamed::StreamedText;
    use crate::tokenizer::tests_support::shared;
    use crate::tokenizer::Encoding;
    let corpus = corpus(1);
    let mut rng = Rng(0x73_74_72_65_61_6d); // "stream"
    for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
        let counter = shared().counter(encoding).unwrap();
        for text in &corpus {
            let whole = counter.count(text);
            let mut eager = StreamedText::new();
            let mut buf = [0u8; 4];
            for c in text.chars() {
                eager.push(c.encode_utf8(&mut buf), counter);
                eager.settle(counter);
            }
            eager.cut(counter);
            assert_eq!(eager.counted(), whole, "{encoding} char by char: {text:?}");
            for _ in 0..3 {
                let mut batched = StreamedText::new();
                let mut rest = text.as_str();
                while !rest.is_empty() {
                    let mut at = 1 + rng.below(rest.len().min(64));
                    while !rest.is_char_boundary(at) {
                        at += 1;
                    }
                    let (chunk, more) = rest.split_at(at);
                    batched.push(chunk, counter);
                    rest = more;
                }
                batched.cut(counter);
                assert_eq!(batched.counted(), whole, "{encoding} in chunks: {text:?}");
            }
        }
    }
}

/// The memo of merged pieces answers exactly: the reduced corpus counted forward and then
/// backward, with one memo that fills, collides and evicts along the way (far more
/// distinct pieces than slots), counts as every piece merged afresh does.
#[test]
fn remembered_pieces_count_as_merged_ones_on_the_corpus() {
    let corpus = corpus(1);
    for pair in pairs() {
        for text in corpus.iter().chain(corpus.iter().rev()) {
            assert_eq!(
                pair.ours.count(text),
                pair.ours.count_unremembered(text),
                "{}: {text:?}",
                pair.name
            );
        }
        assert_eq!(
            pair.ours.memo_bytes(),
            pieces::SLOTS * pieces::SLOT_BYTES,
            "{}: the memo is its fixed size",
            pair.name
        );
    }
}

/// Pieces at the memo's length limit and just past it (one run of letters: one piece,
/// merged) count as tiktoken-rs counts them, first merged and then remembered.
#[test]
fn pieces_at_the_memo_limit_count_like_tiktoken() {
    let mut rng = Rng(21);
    for pair in pairs() {
        for len in pieces::MAX_PIECE - 2..=pieces::MAX_PIECE + 2 {
            for _ in 0..20 {
                let text: String = (0..len)
                    .map(|_| char::from(b'a' + rng.below(26) as u8))
                    .collect();
                let want = pair.reference.encode_ordinary(&text).len();
                assert_eq!(pair.ours.count(&text), want, "{}: {text}", pair.name);
                assert_eq!(pair.ours.count(&text), want, "{}: {text} again", pair.name);
            }
        }
    }
}
