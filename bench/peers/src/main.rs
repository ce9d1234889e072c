//! `make bench`'s tokenizer peer table: tokenfuse's counter against the public Rust
//! tokenizers that count OpenAI's encodings (tiktoken 4.1, tiktoken-rs 0.12, bpe-openai
//! 0.3, kitoken 0.11, Hugging Face tokenizers 0.22), natively and as wasm32-wasip1 in V8:
//!
//! ```text
//! cargo build --release --manifest-path bench/peers/Cargo.toml --target-dir target/peers
//! target/peers/release/peer_bench --encoding o200k_base
//! cargo build --release --manifest-path bench/peers/Cargo.toml --target-dir target/peers --target wasm32-wasip1
//! node --no-liftoff scripts/wasi-run.mjs target/peers/wasm32-wasip1/release/peer_bench.wasm --encoding o200k_base
//! ```
//!
//! A package of its own (bench/peers, not in the filter's workspace), so that `make test`
//! never compiles the peers. Texts are generated (`texts.rs`); vocabularies come from
//! tiktoken-rs, which embeds them; nothing is read or downloaded at run time.
//!
//! For every text, each peer's count must equal tokenfuse's before it is timed; a peer
//! that disagrees (or fails to build or count) is reported with the reason instead of a
//! figure. Two modes:
//!
//! * `first-seen`: before each timed count the peer forgets every earlier count (see
//!   `peers::flushed`: tokenfuse empties its memos, tiktoken 4.1 is rebuilt, Hugging
//!   Face's cache is cleared, the others keep nothing), untimed. tokenfuse is counted with
//!   its raw counter (`Bpe::count`), below the filter's whole-text count cache, which plays
//!   no part. CPU caches are warm.
//! * `recurring`: the same instance counts the same text again and again (after one
//!   untimed count): every memo is as warm as it gets.
//!
//! Options: `--rounds N` (5), `--passes N` (first-seen counts per round, 4), `--min-ms N`
//! (recurring: shortest timed loop per round, 200), `--size-kb N` (text size, 64),
//! `--encoding o200k_base|cl100k_base` (default both), `--peer NAME`, `--text KIND`
//! (repeatable), `--dump` (print the texts and stop). One JSON object per line, medians over the rounds, MB/s (10^6 bytes).

use std::process::ExitCode;
use std::time::Instant;

use tokenfuse::tokenizer::Encoding;

mod peers;
mod texts;

use peers::{Peer, Vocabulary};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Options {
    rounds: usize,
    passes: usize,
    min_ms: u128,
    size: usize,
    encodings: Vec<Encoding>,
    peers: Vec<String>,
    texts: Vec<String>,
    dump: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        rounds: 5,
        passes: 4,
        min_ms: 200,
        size: 64 * 1024,
        encodings: Vec::new(),
        peers: Vec::new(),
        texts: Vec::new(),
        dump: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{arg}: not a number"))
        };
        match arg.as_str() {
            "--rounds" => o.rounds = number(value()?)?.max(1),
            "--passes" => o.passes = number(value()?)?.max(1),
            "--min-ms" => o.min_ms = number(value()?)? as u128,
            "--size-kb" => o.size = number(value()?)?.max(1) * 1024,
            "--encoding" => o.encodings.push(match value()?.as_str() {
                "o200k_base" => Encoding::O200kBase,
                "cl100k_base" => Encoding::Cl100kBase,
                other => return Err(format!("unknown encoding {other}")),
            }),
            "--peer" => o.peers.push(value()?),
            "--text" => o.texts.push(value()?),
            "--dump" => o.dump = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.encodings.is_empty() {
        o.encodings = vec![Encoding::O200kBase, Encoding::Cl100kBase];
    }
    if o.peers.is_empty() {
        o.peers = peers::NAMES.iter().map(|s| s.to_string()).collect();
    }
    if o.texts.is_empty() {
        o.texts = texts::KINDS.iter().map(|s| s.to_string()).collect();
    }
    Ok(o)
}

/// A JSON string literal.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let o = options()?;
    let target = if cfg!(target_family = "wasm") {
        "wasm32-wasip1"
    } else {
        "native"
    };
    let words = texts::english_words()?;
    let texts: Vec<(String, String)> = o
        .texts
        .iter()
        .map(|k| {
            texts::generate(k, o.size, &words)
                .map(|t| (k.clone(), t))
                .ok_or(format!("unknown text {k}"))
        })
        .collect::<Result<_, _>>()?;
    if o.dump {
        for (_, text) in &texts {
            print!("{text}");
        }
        return Ok(());
    }
    for name in &o.peers {
        println!(
            "{{\"kind\":\"peer_flush\",\"target\":\"{target}\",\"peer\":{},\"flushed\":{}}}",
            quoted(name),
            quoted(peers::flushed(name))
        );
    }
    for &encoding in &o.encodings {
        let vocab = Vocabulary::of(encoding)?;
        let reference = Peer::build("tokenfuse", encoding, &vocab)?;
        let expected: Vec<usize> = texts
            .iter()
            .map(|(_, t)| reference.count(t))
            .collect::<Result<_, _>>()?;
        for name in &o.peers {
            let row = |text: &str, bytes: usize, tokens: usize, mode: &str, figure: String| {
                println!(
                    "{{\"kind\":\"peer\",\"target\":\"{target}\",\"encoding\":\"{encoding}\",\"peer\":{},\"text\":\"{text}\",\"bytes\":{bytes},\"tokens\":{tokens},\"mode\":\"{mode}\",{figure}}}",
                    quoted(name)
                )
            };
            let started = Instant::now();
            let built = Peer::build(name, encoding, &vocab);
            let build_ms = started.elapsed().as_secs_f64() * 1e3;
            let mut peer = match built {
                Ok(p) => p,
                Err(e) => {
                    for (kind, text) in &texts {
                        for mode in ["first-seen", "recurring"] {
                            row(
                                kind,
                                text.len(),
                                0,
                                mode,
                                format!("\"error\":{}", quoted(&format!("does not build: {e}"))),
                            );
                        }
                    }
                    continue;
                }
            };
            println!(
                "{{\"kind\":\"peer_build\",\"target\":\"{target}\",\"encoding\":\"{encoding}\",\"peer\":{},\"build_ms\":{build_ms:.1}}}",
                quoted(name)
            );
            for ((kind, text), &want) in texts.iter().zip(&expected) {
                // The check before timing, on a fresh instance and again warm.
                let mut problem = None;
                for _ in 0..2 {
                    match peer.count(text) {
                        Ok(n) if n == want => {}
                        Ok(n) => problem = Some(format!("counts {n} tokens, tokenfuse {want}")),
                        Err(e) => problem = Some(format!("cannot count: {e}")),
                    }
                }
                if let Some(p) = problem {
                    for mode in ["first-seen", "recurring"] {
                        row(
                            kind,
                            text.len(),
                            want,
                            mode,
                            format!("\"error\":{}", quoted(&p)),
                        );
                    }
                    continue;
                }
                // First seen: a flush (untimed) before each timed count.
                let mut rates = Vec::new();
                for _ in 0..o.rounds {
                    let mut ns = 0u128;
                    for _ in 0..o.passes {
                        peer.flush(|| Peer::build(name, encoding, &vocab))?;
                        let t = Instant::now();
                        std::hint::black_box(peer.count(std::hint::black_box(text))?);
                        ns += t.elapsed().as_nanos();
                    }
                    rates.push((text.len() * o.passes) as f64 * 1e3 / ns.max(1) as f64);
                }
                row(
                    kind,
                    text.len(),
                    want,
                    "first-seen",
                    format!("\"median_mb_s\":{:.2}", median(rates)),
                );
                // Recurring: the same instance, warm.
                let mut rates = Vec::new();
                peer.count(text)?;
                for _ in 0..o.rounds {
                    let start = Instant::now();
                    let mut n = 0usize;
                    loop {
                        std::hint::black_box(peer.count(std::hint::black_box(text))?);
                        n += 1;
                        if start.elapsed().as_millis() >= o.min_ms {
                            break;
                        }
                    }
                    let ns = start.elapsed().as_nanos().max(1);
                    rates.push((text.len() * n) as f64 * 1e3 / ns as f64);
                }
                row(
                    kind,
                    text.len(),
                    want,
                    "recurring",
                    format!("\"median_mb_s\":{:.2}", median(rates)),
                );
            }
        }
    }
    Ok(())
}
