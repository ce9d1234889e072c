//! Tokenizer micro-benchmark for `make bench` (bench/run.py): how long building each
//! encoding takes (the bulk of a Wasm VM's start) and how fast `tokenfuse::tokens` counts
//! text, natively and compiled to `wasm32-wasip1` under V8:
//!
//! ```text
//! cargo run --release --example count_bench -- results/prompt-128k.txt
//! cargo build --release --example count_bench --target wasm32-wasip1
//! node scripts/wasi-run.mjs target/wasm32-wasip1/release/examples/count_bench.wasm results/prompt-128k.txt
//! ```
//!
//! Arguments: text files to count (relative to the current directory, which is the only
//! directory the WASI runner opens). Options: `--rounds N` (default 5), `--min-ms N`
//! (shortest timed counting loop, default 300). Prints one JSON object per line:
//! `{"kind":"build",...}` per encoding and `{"kind":"count",...}` per encoding and file,
//! with medians over the rounds. A benchmark, not a test: it asserts nothing.

use std::process::ExitCode;
use std::time::Instant;

use tokenfuse::tokens::{Encoding, Tokenizers};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
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

    let encodings = [Encoding::O200kBase, Encoding::Cl100kBase];
    for encoding in encodings {
        let mut build_ms = Vec::new();
        for _ in 0..rounds {
            let start = Instant::now();
            let built = Tokenizers::build(&[encoding]);
            build_ms.push(start.elapsed().as_secs_f64() * 1e3);
            if let Err(err) = built {
                eprintln!("count_bench: {err}");
                return ExitCode::FAILURE;
            }
        }
        println!(
            "{{\"kind\":\"build\",\"target\":\"{target}\",\"encoding\":\"{encoding}\",\"rounds\":{rounds},\"median_ms\":{:.3},\"min_ms\":{:.3}}}",
            median(build_ms.clone()),
            build_ms.iter().copied().fold(f64::INFINITY, f64::min),
        );
    }

    let tokenizers = match Tokenizers::build(&encodings) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("count_bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    for encoding in encodings {
        let Some(counter) = tokenizers.counter(encoding) else {
            continue;
        };
        for (path, text) in &texts {
            // Warm-up (lets V8 tier the hot code up before timing).
            let tokens = counter.count(text);
            let mut rates = Vec::new();
            for _ in 0..rounds {
                let start = Instant::now();
                let mut bytes = 0usize;
                loop {
                    std::hint::black_box(counter.count(std::hint::black_box(text)));
                    bytes += text.len();
                    if start.elapsed().as_millis() >= min_ms {
                        break;
                    }
                }
                rates.push(bytes as f64 / 1e6 / start.elapsed().as_secs_f64());
            }
            println!(
                "{{\"kind\":\"count\",\"target\":\"{target}\",\"encoding\":\"{encoding}\",\"file\":\"{path}\",\"bytes\":{},\"tokens\":{tokens},\"rounds\":{rounds},\"median_mb_s\":{:.3}}}",
                text.len(),
                median(rates),
            );
        }
    }
    ExitCode::SUCCESS
}
