//! Hand-written pre-tokenizers: the pieces tiktoken's regex splits text into before BPE,
//! found without a regex engine.
//!
//! The patterns (from tiktoken-rs 0.12.1) and their alternatives, tried in order at each
//! position; the first that matches wins, whatever its length (fancy-regex's leftmost-first
//! backtracking semantics):
//!
//! ```text
//! o200k_base                                         cl100k_base
//! A1 P?[U]*[W]+C?                                    B1 '(?i:[sdmt]|ll|ve|re)
//! A2 P?[U]+[W]*C?                                    B2 P?+\p{L}++
//! A3 \p{N}{1,3}                                      B3 \p{N}{1,3}+
//! A4  ?[^\s\p{L}\p{N}]+[\r\n/]*                      B4  ?[^\s\p{L}\p{N}]++[\r\n]*+
//! A5 \s*[\r\n]+                                      B5 \s++$
//! A6 \s+(?!\S)                                       B6 \s*[\r\n]
//! A7 \s+                                             B7 \s+(?!\S)
//!                                                    B8 \s
//! P = [^\r\n\p{L}\p{N}]   U = [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]   W = [\p{Ll}\p{Lm}\p{Lo}\p{M}]
//! C = (?i:'s|'t|'re|'ve|'m|'ll|'d)
//! ```
//!
//! What backtracking makes of them, as implemented below:
//!
//! * A1: the optional `P` is taken first, dropped only if the rest then fails. `[U]*` is
//!   greedy, so `[W]+` starts at the *last* position of the `U` run (or just after it)
//!   holding a `W` character; U and W overlap (Lm, Lo and marks are in both). Nothing after
//!   `[W]+` can fail, so it runs to the end of the `W` run. A mark (in `P` and in `U`/`W`)
//!   at the start can therefore end up alone when only the `P`-less path succeeds.
//! * A5 and B6: the greedy `\s*` gives back characters until a `\r`/`\n` follows, so the
//!   piece ends after the *last* `\r`/`\n` of the whitespace run.
//! * A6 and B7: a whitespace run followed by a non-space character gives back its last
//!   character (which then starts the next piece, e.g. `" world"`); a run of one such
//!   character does not match, and the next alternative takes it alone. At the end of the
//!   text the lookahead succeeds and the whole run matches.
//! * The possessive quantifiers of cl100k change nothing here: every possessive part is
//!   followed by something that cannot match what it would give back.
//!
//! Every position starts a match (each character is a letter, mark, number, white space or
//! in `[^\s\p{L}\p{N}]`), so the pieces tile the text. Unicode classes: `classes.rs`.

use super::classes::{
    class_at, decode, folded_letter, is_other, is_prefix, LETTER, LOWER, NEWLINE, NUMBER, SPACE,
    UPPER,
};

/// The end of the piece of `b` (a `str`'s bytes) starting at `p < b.len()`, for o200k_base.
pub(super) fn o200k_piece_end(b: &[u8], p: usize) -> usize {
    let (f0, l0) = class_at(b, p);
    if is_prefix(f0) || f0 & (UPPER | LOWER) != 0 {
        if let Some(end) = o200k_lower_word(b, p, f0, l0) {
            return end;
        }
        if let Some(end) = o200k_upper_word(b, p, f0, l0) {
            return end;
        }
    }
    if f0 & NUMBER != 0 {
        return up_to_three_numbers(b, p + l0);
    }
    if let Some(end) = punctuation(b, p, true) {
        return end;
    }
    if f0 & SPACE != 0 {
        let run = space_run(b, p);
        if let Some(nl) = run.last_newline {
            return nl + 1; // A5
        }
        if run.end == b.len() {
            return run.end; // A6 at the end of the text
        }
        if run.last_start > p {
            return run.last_start; // A6: the last character goes to the next piece
        }
        return run.end; // A7: a single character before a non-space
    }
    // Unreachable: every character matches one of the alternatives above.
    p + l0
}

/// The end of the piece of `b` starting at `p < b.len()`, for cl100k_base.
pub(super) fn cl100k_piece_end(b: &[u8], p: usize) -> usize {
    if b[p] == b'\'' {
        let end = contraction(b, p);
        if end > p {
            return end; // B1
        }
    }
    let (f0, l0) = class_at(b, p);
    if is_prefix(f0) {
        let q = p + l0;
        if q < b.len() && class_at(b, q).0 & LETTER != 0 {
            return run_of(b, q, LETTER); // B2 with its prefix
        }
    } else if f0 & LETTER != 0 {
        return run_of(b, p, LETTER); // B2
    }
    if f0 & NUMBER != 0 {
        return up_to_three_numbers(b, p + l0); // B3
    }
    if let Some(end) = punctuation(b, p, false) {
        return end; // B4
    }
    if f0 & SPACE != 0 {
        let run = space_run(b, p);
        if run.end == b.len() {
            return run.end; // B5
        }
        if let Some(nl) = run.last_newline {
            return nl + 1; // B6
        }
        if run.last_start > p {
            return run.last_start; // B7
        }
        return p + l0; // B8
    }
    p + l0
}

/// A1 `P?[U]*[W]+C?` at `p`, whose character has class `f0` and length `l0`.
#[inline]
fn o200k_lower_word(b: &[u8], p: usize, f0: u8, l0: usize) -> Option<usize> {
    if is_prefix(f0) {
        if let Some(end) = upper_then_lower(b, p + l0) {
            return Some(end);
        }
    }
    if f0 & (UPPER | LOWER) != 0 {
        return upper_then_lower(b, p);
    }
    None
}

/// `[U]*[W]+C?` at `q`.
#[inline]
fn upper_then_lower(b: &[u8], q: usize) -> Option<usize> {
    let mut i = q;
    // Start and length of the last character of the U run that is also in W.
    let mut last_lower: Option<(usize, usize)> = None;
    while i < b.len() {
        let (f, l) = class_at(b, i);
        if f & UPPER == 0 {
            if f & LOWER != 0 {
                // [U]* took the whole run and [W]+ starts right after it.
                return Some(contraction(b, run_of(b, i, LOWER)));
            }
            break;
        }
        if f & LOWER != 0 {
            last_lower = Some((i, l));
        }
        i += l;
    }
    // [U]* gives back up to the last W character of its run; [W]+ is that character alone
    // (the one after it is not in W).
    let (at, len) = last_lower?;
    Some(contraction(b, at + len))
}

/// A2 `P?[U]+[W]*C?` at `p`.
#[inline]
fn o200k_upper_word(b: &[u8], p: usize, f0: u8, l0: usize) -> Option<usize> {
    let q = p + l0;
    if is_prefix(f0) && q < b.len() && class_at(b, q).0 & UPPER != 0 {
        return Some(contraction(b, run_of(b, run_of(b, q, UPPER), LOWER)));
    }
    if f0 & UPPER != 0 {
        return Some(contraction(b, run_of(b, run_of(b, p, UPPER), LOWER)));
    }
    None
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `i`: the end of the contraction, or `i` when there is
/// none (the same set as cl100k's `'(?i:[sdmt]|ll|ve|re)`).
#[inline]
fn contraction(b: &[u8], i: usize) -> usize {
    if b.get(i) != Some(&b'\'') || i + 1 >= b.len() {
        return i;
    }
    let (c1, l1) = decode(b, i + 1);
    let after = i + 1 + l1;
    let second = |want: u8| after < b.len() && folded_letter(decode(b, after).0) == want;
    match folded_letter(c1) {
        b's' | b't' | b'm' | b'd' => after,
        b'r' | b'v' if second(b'e') => after + decode(b, after).1,
        b'l' if second(b'l') => after + decode(b, after).1,
        _ => i,
    }
}

/// A3/B3 after the first number character (ending at `i`): up to two more.
#[inline]
fn up_to_three_numbers(b: &[u8], mut i: usize) -> usize {
    for _ in 0..2 {
        if i >= b.len() {
            break;
        }
        let (f, l) = class_at(b, i);
        if f & NUMBER == 0 {
            break;
        }
        i += l;
    }
    i
}

/// A4 ` ?[^\s\p{L}\p{N}]+[\r\n/]*` (`slash`) or B4 ` ?[^\s\p{L}\p{N}]+[\r\n]*` at `p`.
#[inline]
fn punctuation(b: &[u8], p: usize, slash: bool) -> Option<usize> {
    // A space is not in the class, so ` ?` can only be taken.
    let q = if b[p] == b' ' { p + 1 } else { p };
    if q >= b.len() {
        return None;
    }
    let (f, l) = class_at(b, q);
    if !is_other(f) {
        return None;
    }
    let mut i = q + l;
    while i < b.len() {
        let (f, l) = class_at(b, i);
        if !is_other(f) {
            break;
        }
        i += l;
    }
    while i < b.len() && (b[i] == b'\r' || b[i] == b'\n' || (slash && b[i] == b'/')) {
        i += 1;
    }
    Some(i)
}

/// A maximal run of white space.
struct SpaceRun {
    /// Where it ends (exclusive).
    end: usize,
    /// Where its last character starts.
    last_start: usize,
    /// Where its last `\r` or `\n` is.
    last_newline: Option<usize>,
}

#[inline]
fn space_run(b: &[u8], p: usize) -> SpaceRun {
    let mut run = SpaceRun {
        end: p,
        last_start: p,
        last_newline: None,
    };
    while run.end < b.len() {
        let (f, l) = class_at(b, run.end);
        if f & SPACE == 0 {
            break;
        }
        if f & NEWLINE != 0 {
            run.last_newline = Some(run.end);
        }
        run.last_start = run.end;
        run.end += l;
    }
    run
}

/// The end of the run of characters with a class in `mask` starting at `i`.
#[inline(always)]
fn run_of(b: &[u8], mut i: usize, mask: u8) -> usize {
    while i < b.len() {
        let (f, l) = class_at(b, i);
        if f & mask == 0 {
            break;
        }
        i += l;
    }
    i
}

/// The pieces of `text` (for tests and diagnostics; the tokenizer walks them in place).
#[cfg(test)]
pub(super) fn pieces(text: &str, end_of: fn(&[u8], usize) -> usize) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut p = 0;
    while p < b.len() {
        let e = end_of(b, p);
        out.push(&text[p..e]);
        p = e;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k(text: &str) -> Vec<&str> {
        pieces(text, o200k_piece_end)
    }

    fn cl100k(text: &str) -> Vec<&str> {
        pieces(text, cl100k_piece_end)
    }

    #[test]
    fn a_space_before_a_word_joins_the_word() {
        assert_eq!(o200k("hello  world"), ["hello", " ", " world"]);
        assert_eq!(cl100k("hello  world"), ["hello", " ", " world"]);
    }

    #[test]
    fn trailing_white_space_stays_whole() {
        assert_eq!(o200k("hi  "), ["hi", "  "]);
        assert_eq!(cl100k("hi \n "), ["hi", " \n "]);
        assert_eq!(o200k("hi \n "), ["hi", " \n", " "]);
    }

    #[test]
    fn white_space_ends_after_its_last_newline() {
        assert_eq!(o200k("a \n \n  b"), ["a", " \n \n", " ", " b"]);
        assert_eq!(cl100k("a \n \n  b"), ["a", " \n \n", " ", " b"]);
    }

    #[test]
    fn contractions_follow_their_encoding() {
        assert_eq!(o200k("don't"), ["don't"]);
        assert_eq!(cl100k("don't"), ["don", "'t"]);
        assert_eq!(o200k("WE'LL"), ["WE'LL"]);
        assert_eq!(cl100k("WE'LL"), ["WE", "'LL"]);
        assert_eq!(o200k("it\u{2019}s"), ["it", "\u{2019}s"]);
    }

    #[test]
    fn o200k_splits_camel_case_and_cl100k_does_not() {
        assert_eq!(o200k("HelloWorld"), ["Hello", "World"]);
        assert_eq!(cl100k("HelloWorld"), ["HelloWorld"]);
    }

    #[test]
    fn numbers_come_in_threes() {
        assert_eq!(o200k("1234567"), ["123", "456", "7"]);
        assert_eq!(cl100k(" 12345"), [" ", "123", "45"]);
    }

    #[test]
    fn punctuation_takes_following_newlines_and_o200k_slashes() {
        assert_eq!(o200k(" !!\n/x"), [" !!\n/", "x"]);
        assert_eq!(cl100k(" !!\n/x"), [" !!\n", "/x"]);
    }

    #[test]
    fn a_leading_mark_before_capitals_stands_alone_in_o200k() {
        // A1 fails with the mark as prefix (no lower-case letter follows), then succeeds
        // with the mark as its only [W] character.
        assert_eq!(o200k("\u{301}AB"), ["\u{301}", "AB"]);
        assert_eq!(cl100k("\u{301}AB"), ["\u{301}AB"]);
    }
}
