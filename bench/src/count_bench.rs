//! Tokenizer micro-benchmark for `make bench` (bench/run.py): how long building each
//! encoding takes (part of a Wasm VM's start) and how fast it counts text, natively and
//! compiled to `wasm32-wasip1` under V8, for two counters on the same text: the filter's
//! (`tokenfuse::tokenizer`, tables compiled in) and tiktoken-rs (`CoreBPE::encode_ordinary`,
//! the reference it replaced):
//!
//! ```text
//! cargo run --release --example count_bench -- results/prompt-128k.txt
//! cargo build --release --example count_bench --target wasm32-wasip1
//! node scripts/wasi-run.mjs target/wasm32-wasip1/release/examples/count_bench.wasm results/prompt-128k.txt
//! ```
//!
//! Arguments: text files to count (relative to the current directory, which is the only
//! directory the WASI runner opens). Options: `--rounds N` (default 5), `--min-ms N`
//! (shortest timed counting loop, default 300), `--counter tokenfuse|tiktoken-rs` (default:
//! both), `--encoding o200k_base|cl100k_base` (default: both), `--iterations N` (count each
//! file exactly N times per round instead of for `--min-ms`: for callgrind, where the
//! instructions of one count are the difference of two runs), `--thrash-kb N` (write N KiB
//! of memory before every count, untimed, so each count starts with the caches as cold as
//! after Envoy's own work between requests). Prints one JSON object per line: `{"kind":"build",...}` per counter and encoding
//! and `{"kind":"count",...}` per counter, encoding and file, with medians over the rounds
//! and the token count (the same for both counters, or the filter is wrong). A benchmark,
//! not a test: it asserts nothing.

use std::process::ExitCode;
use std::time::Instant;

use tokenfuse::tokenizer::{Encoding, Tokenizers};

#[path = "support/bench.rs"]
mod bench;
use bench::{median, Thrash};

/// A built counter of either kind.
enum Counter {
    Tokenfuse(Tokenizers, Encoding),
    Tiktoken(tiktoken_rs::CoreBPE),
}

impl Counter {
    fn build(name: &str, encoding: Encoding) -> Result<Counter, String> {
        match (name, encoding) {
            ("tokenfuse", _) => Tokenizers::build(&[encoding])
                .map(|t| Counter::Tokenfuse(t, encoding))
                .map_err(|e| e.to_string()),
            (_, Encoding::O200kBase) => tiktoken_rs::o200k_base()
                .map(Counter::Tiktoken)
                .map_err(|e| e.to_string()),
            (_, Encoding::Cl100kBase) => tiktoken_rs::cl100k_base()
                .map(Counter::Tiktoken)
                .map_err(|e| e.to_string()),
        }
    }

    fn count(&self, text: &str) -> u64 {
        match self {
            Counter::Tokenfuse(t, encoding) => t.counter(*encoding).map_or(0, |c| c.count(text)),
            Counter::Tiktoken(bpe) => bpe.encode_ordinary(text).len() as u64,
        }
    }
}

fn main() -> ExitCode {
    let target = if cfg!(target_family = "wasm") {
        "wasm32-wasip1"
    } else {
        "native"
    };
    let mut rounds = 5usize;
    let mut min_ms = 300u128;
    let mut counters = vec!["tokenfuse", "tiktoken-rs"];
    let mut encodings = vec![Encoding::O200kBase, Encoding::Cl100kBase];
    let mut iterations = 0u64;
    let mut thrash_kb = 0usize;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |a: Option<String>| a.and_then(|v| v.parse::<u64>().ok());
        match arg.as_str() {
            "--rounds" => match value(args.next()) {
                Some(n) if n > 0 => rounds = n as usize,
                _ => {
                    eprintln!("count_bench: --rounds needs a positive number");
                    return ExitCode::from(2);
                }
            },
            "--min-ms" => match value(args.next()) {
                Some(n) => min_ms = u128::from(n),
                None => {
                    eprintln!("count_bench: --min-ms needs a number");
                    return ExitCode::from(2);
                }
            },
            "--iterations" => match value(args.next()) {
                Some(n) => iterations = n,
                None => {
                    eprintln!("count_bench: --iterations needs a number");
                    return ExitCode::from(2);
                }
            },
            "--thrash-kb" => match value(args.next()) {
                Some(n) => thrash_kb = n as usize,
                None => {
                    eprintln!("count_bench: --thrash-kb needs a number");
                    return ExitCode::from(2);
                }
            },
            "--counter" => match args.next().as_deref() {
                Some("tokenfuse") => counters = vec!["tokenfuse"],
                Some("tiktoken-rs") => counters = vec!["tiktoken-rs"],
                _ => {
                    eprintln!("count_bench: --counter is tokenfuse or tiktoken-rs");
                    return ExitCode::from(2);
                }
            },
            "--encoding" => match args.next().as_deref() {
                Some("o200k_base") => encodings = vec![Encoding::O200kBase],
                Some("cl100k_base") => encodings = vec![Encoding::Cl100kBase],
                _ => {
                    eprintln!("count_bench: --encoding is o200k_base or cl100k_base");
                    return ExitCode::from(2);
                }
            },
            _ => files.push(arg),
        }
    }
    let mut texts = Vec::new();
    for path in &files {
        match std::fs::read_to_string(path) {
            Ok(text) => texts.push((path.clone(), text)),
            Err(err) => {
                eprintln!("count_bench: cannot read {path}: {err}");
                return ExitCode::from(2);
            }
        }
    }

    for name in counters {
        for &encoding in &encodings {
            let mut build_ms = Vec::new();
            let mut counter = None;
            for _ in 0..rounds {
                let start = Instant::now();
                let built = Counter::build(name, encoding);
                build_ms.push(start.elapsed().as_secs_f64() * 1e3);
                match built {
                    Ok(c) => counter = Some(c),
                    Err(err) => {
                        eprintln!("count_bench: {name} {encoding}: {err}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            println!(
                "{{\"kind\":\"build\",\"counter\":\"{name}\",\"target\":\"{target}\",\"encoding\":\"{encoding}\",\"rounds\":{rounds},\"median_ms\":{:.4},\"min_ms\":{:.4}}}",
                median(build_ms.clone()),
                build_ms.iter().copied().fold(f64::INFINITY, f64::min),
            );
            let Some(counter) = counter else {
                continue;
            };
            for (path, text) in &texts {
                // Warm-up (lets V8 tier the hot code up before timing).
                let tokens = counter.count(text);
                let mut rates = Vec::new();
                let mut thrash = Thrash::new(thrash_kb);
                for _ in 0..rounds {
                    let start = Instant::now();
                    let mut thrash_ns = 0u128;
                    let mut bytes = 0usize;
                    let mut n = 0u64;
                    loop {
                        thrash_ns += thrash.evict();
                        std::hint::black_box(counter.count(std::hint::black_box(text)));
                        bytes += text.len();
                        n += 1;
                        if (iterations > 0 && n >= iterations)
                            || (iterations == 0 && start.elapsed().as_millis() >= min_ms)
                        {
                            break;
                        }
                    }
                    let spent_ns = start.elapsed().as_nanos().saturating_sub(thrash_ns).max(1);
                    rates.push(bytes as f64 * 1e3 / spent_ns as f64);
                }
                println!(
                    "{{\"kind\":\"count\",\"counter\":\"{name}\",\"target\":\"{target}\",\"encoding\":\"{encoding}\",\"file\":\"{path}\",\"bytes\":{},\"tokens\":{tokens},\"rounds\":{rounds},\"thrash_kb\":{thrash_kb},\"median_mb_s\":{:.3}}}",
                    text.len(),
                    median(rates),
                );
            }
        }
    }
    ExitCode::SUCCESS
}
