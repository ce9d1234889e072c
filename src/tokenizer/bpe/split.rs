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
//!
//! # Which pieces are final
//!
//! Streamed text is counted as it arrives (`Bpe::count_settled`, `tokenizer/streamed.rs`):
//! the pieces of the text so far, `B`, except the last two, are counted and let go. That
//! is exact because every piece but the last two is a piece of `B + X` for any `X`:
//!
//! * Matching at `p` reads only `B[p..]` (no look-behind; `$` is the end of the text), so
//!   the pieces from a position that is a boundary of both texts agree as long as each
//!   match is decided without looking at the end of `B`: a match that never asks "is
//!   there a character at `|B|`?" reads the same characters in `B + X` and ends at the
//!   same place.
//! * Lemma: if the match of a piece asks about `|B|`, the piece after it (if any) is the
//!   last. Each way a match reads past its own end: (1) one character to end a run, or
//!   the space of `\s+(?!\S)` and `A7`'s test, or the third digit of `\p{N}{1,3}`: asking
//!   about `|B|` there means the piece ends at `|B|`. (2) A1 giving back the end of an
//!   upper-case run (after its last `U`∩`W` character): it read the run to its end, so
//!   asking about `|B|` means the run reaches `|B|`; the rest of the run (upper-case
//!   letters only, none in `W`) is then one A2 piece to `|B|`. (3) A5 ending after the
//!   last newline of a white-space run it read to its end: the rest of the run (no
//!   newline) reaching `|B|` is one A6 piece (cl100k's B6 is reached only when B5 `\s++$`
//!   failed, so its run does not reach `|B|`). (4) A contraction test after a word
//!   (`'` then one or two letters): asking about `|B|` leaves `'` or `'` and one letter
//!   at the end, one A1/A2 (`P?` letters), A4 or B2/B4 piece to `|B|`. (5) A1/A2 tried
//!   with the prefix `P` and failing: they read one character, or an upper-case run whose
//!   reaching `|B|` makes the piece that matches instead (A1 without the prefix, which is
//!   case 2, or A2 with it) reach `|B|` or leave one A2 piece to it. The cl100k
//!   contraction B1 at `'` reads at most two letters and falls to B2/B4, which then run
//!   to `|B|`.
//! * So the third piece from the end, and every one before it, is decided without the
//!   end of `B`, and its boundaries stand whatever follows; each piece's tokens depend on
//!   the piece alone. The tests check this at every split point of the corpus and on
//!   every short string over an alphabet of one character per class; `fuzz/`'s `bpe_diff`
//!   on random chunkings.
//!
//! Most pieces of real prompts are ASCII: a word with an optional space or punctuation
//! before it, a few digits, a punctuation run. [`o200k_piece_end`] and [`cl100k_piece_end`]
//! first try an ASCII fast path that decides such pieces from a 256-entry byte class table
//! (ASCII letters are in U or in W, never both, so A1/A2 reduce to an upper-case run and a
//! lower-case run, scanned 8 bytes at a time); the moment it meets a byte of a longer
//! character, which could extend the piece, it gives up and the general path above decides
//! from scratch. The tests check the two against each other at every character boundary of
//! the corpus, and the whole against fancy-regex.
//!
//! Bytes are read with `get` (a position past the end reads as the end of a run), but the
//! position arithmetic is plain, allowed for this module: it runs once or more per byte of
//! every counted text (the tokenizer's speed is a published target), and every sum is a
//! position in the text plus a character's length (1 to 4), a couple of bytes, or the
//! length of a run just scanned in the text, so it never exceeds the text's length by more
//! than 4; a `str` is at most `isize::MAX` bytes, so no sum comes near `usize::MAX`. There
//! are no subtractions. The eight-byte letter test adds at most 0x1f to bytes of at most
//! 0x7f, so no carry leaves its byte. The tests compare every piece with fancy-regex's on
//! megabytes of text, and `fuzz/` drives the tokenizer with arbitrary input.
#![allow(clippy::arithmetic_side_effects)]

use super::classes::{
    byte_class, class_at, decode, folded_letter, is_other, is_prefix, LETTER, LOWER, NEWLINE,
    NON_ASCII, NUMBER, SPACE, UPPER,
};

/// The end of the piece of `b` (a `str`'s bytes) starting at `p < b.len()`, for o200k_base.
#[inline(always)]
pub(super) fn o200k_piece_end(b: &[u8], p: usize) -> usize {
    match o200k_ascii(b, p) {
        Some(end) => end,
        None => o200k_general(b, p),
    }
}

/// The end of the piece of `b` (a `str`'s bytes) starting at `p < b.len()`, for
/// cl100k_base.
#[inline(always)]
pub(super) fn cl100k_piece_end(b: &[u8], p: usize) -> usize {
    match cl100k_ascii(b, p) {
        Some(end) => end,
        None => cl100k_general(b, p),
    }
}

/// The o200k piece at `p` if deciding it takes only ASCII characters: a word of ASCII
/// letters (after an optional ASCII prefix character), up to three ASCII digits, or ASCII
/// punctuation; each class test one table lookup per byte. `None` when a character of more
/// bytes (which could extend the piece) or anything else comes first: the general path
/// decides.
#[inline(always)]
fn o200k_ascii(b: &[u8], p: usize) -> Option<usize> {
    let c0 = byte_class(*b.get(p)?);
    if c0 & LETTER != 0 {
        return ascii_word(b, p); // A1/A2 without a prefix
    }
    if c0 & NUMBER != 0 {
        return ascii_digits(b, p); // A3
    }
    if c0 & (NON_ASCII | NEWLINE) != 0 {
        return None;
    }
    // An ASCII character in P = [^\r\n\p{L}\p{N}]: white space, punctuation, a control.
    let c1 = byte_class(*b.get(p + 1)?);
    if c1 & LETTER != 0 {
        return ascii_word(b, p + 1); // A1/A2 with the prefix
    }
    ascii_punctuation(b, p, c0, c1, true) // A4
}

/// The cl100k piece at `p` if deciding it takes only ASCII characters (see
/// [`o200k_ascii`]); an apostrophe (B1) goes to the general path.
#[inline(always)]
fn cl100k_ascii(b: &[u8], p: usize) -> Option<usize> {
    let c0 = byte_class(*b.get(p)?);
    if c0 & LETTER != 0 {
        return ascii_letters(b, p); // B2 without a prefix
    }
    if c0 & NUMBER != 0 {
        return ascii_digits(b, p); // B3
    }
    if c0 & (NON_ASCII | NEWLINE) != 0 || b.get(p) == Some(&b'\'') {
        return None;
    }
    let c1 = byte_class(*b.get(p + 1)?);
    if c1 & LETTER != 0 {
        return ascii_letters(b, p + 1); // B2 with the prefix
    }
    ascii_punctuation(b, p, c0, c1, false) // B4
}

/// `[U]*[W]+C?` or `[U]+[W]*C?` at `q` over ASCII letters (which are in U or in W, never in
/// both): the upper-case run, the lower-case run, a contraction.
#[inline(always)]
fn ascii_word(b: &[u8], q: usize) -> Option<usize> {
    let mut i = q;
    while b.get(i).is_some_and(|&c| byte_class(c) & UPPER != 0) {
        i += 1;
    }
    i = lower_run(b, i);
    if b.get(i).is_some_and(|&c| byte_class(c) & NON_ASCII != 0) {
        return None; // a longer character could still be a letter of the word
    }
    Some(contraction(b, i))
}

/// The end of the run of ASCII lower-case letters at `i`, eight bytes at a time where the
/// text has them (most words end within the first eight).
#[inline(always)]
fn lower_run(b: &[u8], i: usize) -> usize {
    letter_run_with(b, i, 0, LOWER)
}

/// The end of the run of ASCII letters of either case at `i` (see [`lower_run`]).
#[inline(always)]
fn letter_run(b: &[u8], i: usize) -> usize {
    letter_run_with(b, i, 0x20, LETTER)
}

/// The end of the run at `i` of ASCII bytes that are lower-case letters once OR-ed with
/// `fold` (0x20 folds upper case onto lower case, and no other byte onto a letter), and
/// after the last full 8 bytes of ASCII bytes whose class has `class`.
#[inline(always)]
fn letter_run_with(b: &[u8], mut i: usize, fold: u8, class: u8) -> usize {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const EACH: u64 = 0x0101_0101_0101_0101;
    while let Some(&[b0, b1, b2, b3, b4, b5, b6, b7]) = b.get(i..i + 8) {
        let x = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
        let y = (x & LOW7) | (u64::from(fold) * EACH);
        // High bit of each byte: at least b'a' (y + 0x1f carries into bit 7), at least
        // b'{' (y + 5 does), an ASCII byte at all; no carry crosses a byte (y <= 0x7f).
        let from_a = y + 0x1f * EACH;
        let past_z = y + 0x05 * EACH;
        let lower = from_a & !past_z & !x & HIGH;
        let stop = !lower & HIGH;
        if stop != 0 {
            return i + (stop.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b.get(i).is_some_and(|&c| byte_class(c) & class != 0) {
        i += 1;
    }
    i
}

/// `\p{L}++` at `q` over ASCII letters.
#[inline(always)]
fn ascii_letters(b: &[u8], q: usize) -> Option<usize> {
    let i = letter_run(b, q);
    if b.get(i).is_some_and(|&c| byte_class(c) & NON_ASCII != 0) {
        return None;
    }
    Some(i)
}

/// `\p{N}{1,3}` at `p` (an ASCII digit) over ASCII digits.
#[inline(always)]
fn ascii_digits(b: &[u8], p: usize) -> Option<usize> {
    let mut i = p + 1;
    while i < p + 3 {
        let Some(&byte) = b.get(i) else {
            break;
        };
        let c = byte_class(byte);
        if c & NON_ASCII != 0 {
            return None; // could be a number character
        }
        if c & NUMBER == 0 {
            break;
        }
        i += 1;
    }
    Some(i)
}

/// A4 ` ?[^\s\p{L}\p{N}]+[\r\n/]*` (`slash`) or B4 ` ?[^\s\p{L}\p{N}]+[\r\n]*` at `p`,
/// whose ASCII character (class `c0`, in P and not a letter) is followed by one of class
/// `c1` that is not a letter, over ASCII characters.
#[inline(always)]
fn ascii_punctuation(b: &[u8], p: usize, c0: u8, c1: u8, slash: bool) -> Option<usize> {
    let other = |c: u8| c & (SPACE | LETTER | NUMBER | NON_ASCII) == 0;
    let mut i = if other(c0) {
        p + 1
    } else if b.get(p) == Some(&b' ') && other(c1) {
        p + 2
    } else {
        return None; // white space: the general path's runs
    };
    while let Some(&byte) = b.get(i) {
        let c = byte_class(byte);
        if c & NON_ASCII != 0 {
            return None; // could be punctuation too
        }
        if !other(c) {
            break;
        }
        i += 1;
    }
    while b
        .get(i)
        .is_some_and(|&c| c == b'\r' || c == b'\n' || (slash && c == b'/'))
    {
        i += 1;
    }
    Some(i)
}

/// The o200k piece at `p`, any characters.
#[inline(never)]
fn o200k_general(b: &[u8], p: usize) -> usize {
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

/// The cl100k piece at `p`, any characters.
#[inline(never)]
fn cl100k_general(b: &[u8], p: usize) -> usize {
    if b.get(p) == Some(&b'\'') {
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
#[inline(always)]
fn contraction(b: &[u8], i: usize) -> usize {
    if b.get(i) != Some(&b'\'') {
        return i;
    }
    contraction_after_apostrophe(b, i)
}

/// [`contraction`] at an apostrophe.
#[inline(never)]
fn contraction_after_apostrophe(b: &[u8], i: usize) -> usize {
    if i + 1 >= b.len() {
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
    let q = if b.get(p) == Some(&b' ') { p + 1 } else { p };
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
    while b
        .get(i)
        .is_some_and(|&c| c == b'\r' || c == b'\n' || (slash && c == b'/'))
    {
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
pub(super) mod tests {
    use super::*;

    /// Where an ASCII fast path answers, at every character boundary of `text`, it gives
    /// the general path's answer.
    pub(in crate::tokenizer::bpe) fn assert_fast_paths_agree(text: &str) {
        let b = text.as_bytes();
        for (p, _) in text.char_indices() {
            if let Some(end) = o200k_ascii(b, p) {
                assert_eq!(end, o200k_general(b, p), "o200k at {p} of {text:?}");
            }
            if let Some(end) = cl100k_ascii(b, p) {
                assert_eq!(end, cl100k_general(b, p), "cl100k at {p} of {text:?}");
            }
        }
    }

    #[test]
    fn letter_runs_end_at_the_first_other_byte() {
        for byte in 0..=255u8 {
            for at in 0..12 {
                let mut text = vec![b'q'; 12];
                text[at] = byte;
                let want = if byte.is_ascii_lowercase() { 12 } else { at };
                assert_eq!(lower_run(&text, 0), want, "{byte:#x} at {at}");
                assert_eq!(lower_run(&text, at.min(3)), want.max(at.min(3)));
                let want = if byte.is_ascii_alphabetic() { 12 } else { at };
                assert_eq!(letter_run(&text, 0), want, "{byte:#x} at {at}");
                if at > 0 {
                    text[0] = b'Q';
                    assert_eq!(letter_run(&text, 0), want, "{byte:#x} at {at}");
                }
            }
        }
    }

    #[test]
    fn ascii_fast_paths_agree_with_the_general_ones_on_edge_cases() {
        for text in [
            "hello world",
            "Hello World",
            "HTTPServer",
            "iPhone",
            "don't",
            "DON'T",
            "it's",
            "it'ſ",
            "x'll",
            "a  b",
            " (req)",
            "(req",
            "!!\n/x",
            " !!\n\r/",
            "a!b",
            "123456",
            "12\u{663}",
            "1\u{bd}",
            "caf\u{e9}",
            "ABC\u{e9}",
            " \u{4e2d}",
            "!\u{ff0c}",
            "\tword",
            "\x0bword",
            "x",
            " ",
            "!",
            "a\n",
            "'s",
            "''",
            "A'",
            "é",
            "_x",
            "x_y",
        ] {
            assert_fast_paths_agree(text);
        }
    }

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
