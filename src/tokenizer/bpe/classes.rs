//! Character classes of the pre-tokenizer patterns, per code point, from the table
//! `build.rs` generated with the Unicode data of the regex engine tiktoken uses.
//!
//! [`class_at`] decodes the character at a byte offset of a `str` and returns its class
//! bits and its UTF-8 length. ASCII is one table lookup, and so is a character whose lead
//! byte starts only characters of one class (CJK ideographs, most Hangul syllables); other
//! code points go through a two-level table (block index, then the block).

include!(concat!(env!("OUT_DIR"), "/classes.rs"));

const BLOCK_MASK: u32 = (1 << BLOCK_SHIFT) - 1;

/// `[^\r\n\p{L}\p{N}]`: the optional character before a letter run.
#[inline(always)]
pub(super) fn is_prefix(flags: u8) -> bool {
    flags & (LETTER | NUMBER | NEWLINE) == 0
}

/// `[^\s\p{L}\p{N}]`: punctuation, symbols, marks in cl100k, controls, unassigned, ….
#[inline(always)]
pub(super) fn is_other(flags: u8) -> bool {
    flags & (SPACE | LETTER | NUMBER) == 0
}

/// The class bits of byte `b` taken as a character of its own: an ASCII character's, or
/// [`NON_ASCII`] for a byte of a longer character.
#[inline(always)]
pub(super) fn byte_class(b: u8) -> u8 {
    // A table of 256 read at a byte: always there (the fallback, which sends the ASCII
    // fast paths to the general one, is compiled away).
    BYTE_CLASS.get(usize::from(b)).copied().unwrap_or(NON_ASCII)
}

/// The class bits of code point `cp`.
#[inline]
pub(super) fn class_of(cp: u32) -> u8 {
    if cp < 128 {
        return BYTE_CLASS.get(cp as usize).copied().unwrap_or(0);
    }
    let block = BLOCK_INDEX
        .get((cp >> BLOCK_SHIFT) as usize)
        .copied()
        .unwrap_or(0);
    BLOCKS
        .get(((block as usize) << BLOCK_SHIFT) | (cp & BLOCK_MASK) as usize)
        .copied()
        .unwrap_or(0)
}

/// The code point starting at byte `i` of `b` (valid UTF-8, `i` on a character boundary,
/// `i < b.len()`) and its length in bytes; `(0, 1)` past the end.
#[inline(always)]
pub(super) fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let Some((&b0, after)) = b.get(i..).and_then(<[u8]>::split_first) else {
        return (0, 1);
    };
    if b0 < 0x80 {
        return (u32::from(b0), 1);
    }
    // The k-th continuation byte (from 0) is `after[k]`.
    let cont = |k: usize| u32::from(after.get(k).copied().unwrap_or(0x80) & 0x3f);
    if b0 < 0xe0 {
        ((u32::from(b0 & 0x1f) << 6) | cont(0), 2)
    } else if b0 < 0xf0 {
        ((u32::from(b0 & 0x0f) << 12) | (cont(0) << 6) | cont(1), 3)
    } else {
        (
            (u32::from(b0 & 0x07) << 18) | (cont(0) << 12) | (cont(1) << 6) | cont(2),
            4,
        )
    }
}

/// Class bits and byte length of the character at byte `i` (see [`decode`]); past the end,
/// a class-less character of one byte (callers never ask there).
#[inline(always)]
pub(super) fn class_at(b: &[u8], i: usize) -> (u8, usize) {
    let Some(&b0) = b.get(i) else {
        return (0, 1);
    };
    if b0 < 0x80 {
        return (byte_class(b0), 1);
    }
    // A table of 256 read at a byte (0, not uniform, is never used).
    let lead = LEAD_CLASS.get(usize::from(b0)).copied().unwrap_or(0);
    if lead & UNIFORM != 0 {
        // Only lead bytes (C2-F4) are marked UNIFORM, so the length is 2 to 4.
        return (lead & !UNIFORM, super::hash::utf8_len(b0));
    }
    let (cp, len) = decode(b, i);
    (class_of(cp), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reads_every_utf8_length() {
        let s = "a\u{e9}\u{4e2d}\u{1f600}";
        let b = s.as_bytes();
        assert_eq!(decode(b, 0), (0x61, 1));
        assert_eq!(decode(b, 1), (0xe9, 2));
        assert_eq!(decode(b, 3), (0x4e2d, 3));
        assert_eq!(decode(b, 6), (0x1f600, 4));
    }

    #[test]
    fn sample_characters_have_the_expected_classes() {
        assert_eq!(class_of('a' as u32), LETTER | LOWER);
        assert_eq!(class_of('A' as u32), LETTER | UPPER);
        assert_eq!(class_of('\u{1c5}' as u32), LETTER | UPPER); // ǅ, titlecase
        assert_eq!(class_of('\u{2b0}' as u32), LETTER | UPPER | LOWER); // ʰ, modifier
        assert_eq!(class_of('\u{4e2d}' as u32), LETTER | UPPER | LOWER); // 中, other letter
        assert_eq!(class_of('\u{301}' as u32), UPPER | LOWER); // combining acute: a mark
        assert_eq!(class_of('7' as u32), NUMBER);
        assert_eq!(class_of('\u{bd}' as u32), NUMBER); // ½
        assert_eq!(class_of('\n' as u32), SPACE | NEWLINE);
        assert_eq!(class_of('\u{85}' as u32), SPACE); // NEL: white space, not [\r\n]
        assert_eq!(class_of('\u{3000}' as u32), SPACE);
        assert_eq!(class_of('\u{200d}' as u32), 0); // ZWJ: format, not white space
        assert_eq!(class_of('!' as u32), 0);
        assert_eq!(class_of(0x10_ffff), 0);
    }

    #[test]
    fn every_character_is_classed_alike_from_its_bytes_and_its_code_point() {
        let mut buf = [0u8; 4];
        for c in (0..=0x10_ffffu32).filter_map(char::from_u32) {
            let bytes = c.encode_utf8(&mut buf).as_bytes();
            assert_eq!(
                class_at(bytes, 0),
                (class_of(c as u32), bytes.len()),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn contraction_letters_fold_like_the_regex_engine() {
        assert_eq!(folded_letter('s' as u32), b's');
        assert_eq!(folded_letter('S' as u32), b's');
        assert_eq!(folded_letter(0x17f), b's'); // ſ, LATIN SMALL LETTER LONG S
        assert_eq!(folded_letter('L' as u32), b'l');
        assert_eq!(folded_letter('k' as u32), 0);
        assert_eq!(folded_letter('\'' as u32), 0);
    }
}
