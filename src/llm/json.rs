//! A strict, zero-copy JSON reader for request bodies: the filter walks a body once and takes
//! only the fields counting needs, borrowing strings from the body where they hold no escape.
//!
//! It accepts exactly the JSON serde_json accepts (RFC 8259: no comments, no trailing commas,
//! no leading zeros, no control characters or lone surrogates in strings, nothing after the
//! top-level value) and nests at most 127 levels, as serde_json does, so a hostile body can
//! neither overflow the stack nor pass here and fail at the provider. Input is a `&str`: the
//! caller has checked UTF-8 already (with a position for the error).
//!
//! A reader is a cursor. The caller asks for the value it expects next ([`Reader::string`],
//! [`Reader::object`], …); a value of another type is a shape error naming what was expected,
//! a malformed one a syntax error, both with the byte offset where they were found. Values
//! the caller does not want are skipped with [`Reader::skip`], which still checks their
//! syntax.
//!
//! One file of some 850 lines on purpose: the reader is one cursor whose methods share its
//! position, depth and pending-colon state; split apart, the invariants that keep a hostile
//! body from mis-stepping it (one advance per byte read, a depth check per container)
//! would no longer be read in one place.

use std::borrow::Cow;
use std::ops::Range;

/// Deepest nesting of arrays and objects (serde_json's limit: its 128th level fails).
const MAX_DEPTH: u32 = 127;

/// Why a body could not be read, and the byte offset where that was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub at: usize,
    pub kind: ErrorKind,
}

/// The two ways a body fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not JSON.
    Syntax(&'static str),
    /// JSON, but not the shape asked for. Never quotes a value from the body.
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The JSON type of the next value, for shape errors and for values of several types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Object => "an object",
            Kind::Array => "an array",
            Kind::String => "a string",
            Kind::Number => "a number",
            Kind::Bool => "a boolean",
            Kind::Null => "null",
        }
    }
}

/// A cursor over one JSON document.
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
    depth: u32,
    /// A member's key was read and its `:` not yet: the next value read takes it first.
    /// (So the caller can judge a key — refuse a duplicate — before the rest, as serde.)
    colon: bool,
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a str) -> Reader<'a> {
        Reader {
            text,
            pos: 0,
            depth: 0,
            colon: false,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// The bytes from the current position on (none past the end).
    fn rest(&self) -> &'a [u8] {
        self.bytes().get(self.pos..).unwrap_or_default()
    }

    /// Moves past `n` bytes just found. Positions never exceed the text's length, so the
    /// sum cannot saturate; saturating keeps a bug here from becoming a panic.
    #[inline]
    fn advance(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n);
    }

    /// `text[start..end]`, for offsets found at ASCII bytes or the end (so at character
    /// boundaries): a range that is not (a bug here, never input) is a syntax error rather
    /// than a panic.
    fn text_at(&self, start: usize, end: usize) -> Result<&'a str> {
        match self.text.get(start..end) {
            Some(text) => Ok(text),
            None => self.syntax("invalid text"),
        }
    }

    fn syntax<T>(&self, what: &'static str) -> Result<T> {
        Err(Error {
            at: self.pos,
            kind: ErrorKind::Syntax(what),
        })
    }

    /// A syntax error at the current position.
    pub fn syntax_error<T>(&self, what: &'static str) -> Result<T> {
        self.syntax(what)
    }

    /// A shape error at the current position.
    pub fn shape<T>(&self, detail: String) -> Result<T> {
        Err(Error {
            at: self.pos,
            kind: ErrorKind::Shape(detail),
        })
    }

    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.pos) {
            self.advance(1);
        }
    }

    /// The type of the next value (white space skipped).
    pub fn peek(&mut self) -> Result<Kind> {
        self.skip_space();
        if self.colon {
            if self.bytes().get(self.pos) != Some(&b':') {
                return self.syntax("expected `:`");
            }
            self.colon = false;
            self.advance(1);
            self.skip_space();
        }
        match self.bytes().get(self.pos) {
            Some(b'{') => Ok(Kind::Object),
            Some(b'[') => Ok(Kind::Array),
            Some(b'"') => Ok(Kind::String),
            Some(b'-' | b'0'..=b'9') => Ok(Kind::Number),
            Some(b't' | b'f') => Ok(Kind::Bool),
            Some(b'n') => Ok(Kind::Null),
            Some(_) => self.syntax("expected a value"),
            None => self.syntax("unexpected end of the body"),
        }
    }

    /// A shape error: the next value is not `expected`. As in serde_json, a scalar is read
    /// first (to name it), so a malformed one is a syntax error instead.
    pub fn wrong_type<T>(&mut self, expected: &str) -> Result<T> {
        let found = self.peek()?;
        let start = self.pos;
        match found {
            Kind::String => {
                self.string_body()?;
            }
            Kind::Number => {
                let text = self.number_text()?;
                if text.parse::<f64>().map_or(true, f64::is_infinite) {
                    self.pos = start;
                    return self.syntax("number out of range");
                }
            }
            Kind::Bool => {
                self.bool()?;
            }
            Kind::Null => self.literal("null")?,
            Kind::Object | Kind::Array => {}
        }
        self.pos = start;
        self.shape(format!(
            "a field has the wrong type, expected {expected}, found {}",
            found.name()
        ))
    }

    /// The whole document is one value: nothing but white space may follow it.
    pub fn end(&mut self) -> Result<()> {
        self.skip_space();
        if self.pos < self.text.len() {
            return self.syntax("trailing characters after the JSON value");
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static str) -> Result<()> {
        if self.rest().starts_with(word.as_bytes()) {
            self.advance(word.len());
            Ok(())
        } else {
            self.syntax("invalid literal")
        }
    }

    /// `null` is taken and `None` returned; any other value is left for `read`.
    pub fn optional<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        if self.peek()? == Kind::Null {
            self.literal("null")?;
            return Ok(None);
        }
        read(self).map(Some)
    }

    pub fn bool(&mut self) -> Result<bool> {
        match self.peek()? {
            Kind::Bool if self.bytes().get(self.pos) == Some(&b't') => {
                self.literal("true").map(|_| true)
            }
            Kind::Bool => self.literal("false").map(|_| false),
            _ => self.wrong_type("a boolean"),
        }
    }

    /// The next number's text, checked against JSON's grammar.
    fn number_text(&mut self) -> Result<&'a str> {
        let b = self.bytes();
        let start = self.pos;
        // Each step moves past bytes just found in `b`, so no index exceeds its length and
        // no sum saturates.
        let digits = |i: usize| {
            let run = b.get(i..).unwrap_or_default();
            i.saturating_add(run.iter().take_while(|c| c.is_ascii_digit()).count())
        };
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i = i.saturating_add(1);
        }
        match b.get(i) {
            Some(b'0') => {
                i = i.saturating_add(1);
                // No leading zeros: `01` is not a number (nor `0` followed by `1`).
                if let Some(b'0'..=b'9') = b.get(i) {
                    self.pos = i;
                    return self.syntax("invalid number");
                }
            }
            Some(b'1'..=b'9') => i = digits(i),
            _ => {
                self.pos = i;
                return self.syntax("invalid number");
            }
        }
        if b.get(i) == Some(&b'.') {
            i = i.saturating_add(1);
            if !matches!(b.get(i), Some(b'0'..=b'9')) {
                self.pos = i;
                return self.syntax("invalid number");
            }
            i = digits(i);
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i = i.saturating_add(1);
            if let Some(b'+' | b'-') = b.get(i) {
                i = i.saturating_add(1);
            }
            if !matches!(b.get(i), Some(b'0'..=b'9')) {
                self.pos = i;
                return self.syntax("invalid number");
            }
            i = digits(i);
        }
        self.pos = i;
        self.text_at(start, i)
    }

    /// An integer in `i64`. As serde_json reads an `i64` field: a fraction, an exponent or a
    /// value beyond `i64` is a shape error, unless the number is beyond even `f64` (a syntax
    /// error, "number out of range").
    pub fn i64(&mut self) -> Result<i64> {
        if self.peek()? != Kind::Number {
            return self.wrong_type("an integer");
        }
        let start = self.pos;
        let text = self.number_text()?;
        // `-0` is no integer to serde_json (it keeps the sign as a float `-0.0`).
        if let Ok(v) = text.parse::<i64>().map_err(drop).and_then(|v| match text {
            "-0" => Err(()),
            _ => Ok(v),
        }) {
            return Ok(v);
        }
        self.pos = start;
        if text.parse::<f64>().map_or(true, f64::is_infinite) {
            return self.syntax("number out of range");
        }
        self.shape(
            "a field has the wrong type, expected an integer in 64 bits, found another number"
                .into(),
        )
    }

    /// An integer in `u64` (a token count), under the same rules as [`Reader::i64`].
    pub fn u64(&mut self) -> Result<u64> {
        if self.peek()? != Kind::Number {
            return self.wrong_type("an unsigned integer");
        }
        let start = self.pos;
        let text = self.number_text()?;
        if text != "-0" {
            if let Ok(v) = text.parse::<u64>() {
                return Ok(v);
            }
        }
        self.pos = start;
        if text.parse::<f64>().map_or(true, f64::is_infinite) {
            return self.syntax("number out of range");
        }
        self.shape(
            "a field has the wrong type, expected an unsigned integer, found another number".into(),
        )
    }

    /// An integer in `u32` (a token id).
    pub fn u32(&mut self) -> Result<u32> {
        let start = self.pos;
        let v = self.i64()?;
        u32::try_from(v).or_else(|_| {
            self.pos = start;
            self.shape("a field has a value out of range, expected a token id (u32)".into())
        })
    }

    /// A string, borrowed from the body unless it holds escapes.
    pub fn string(&mut self) -> Result<Cow<'a, str>> {
        if self.peek()? != Kind::String {
            return self.wrong_type("a string");
        }
        self.string_body()
    }

    /// The string whose opening quote is at `pos`.
    fn string_body(&mut self) -> Result<Cow<'a, str>> {
        self.advance(1);
        let start = self.pos;
        let end = self.plain_run(start);
        self.pos = end;
        match self.bytes().get(end) {
            Some(b'"') => {
                let text = self.text_at(start, end)?;
                self.advance(1);
                Ok(Cow::Borrowed(text))
            }
            Some(b'\\') => {
                let text = self.text_at(start, end)?;
                let mut out = String::with_capacity(text.len().saturating_add(16));
                out.push_str(text);
                self.escaped_rest(&mut out)?;
                Ok(Cow::Owned(out))
            }
            Some(_) => self.syntax("control character in a string"),
            None => self.syntax("unterminated string"),
        }
    }

    /// The first index at or after `from` holding `"`, `\` or a control character (or the
    /// end). Eight bytes at a time: this is where the reader spends its time.
    fn plain_run(&self, from: usize) -> usize {
        let run = self.bytes().get(from..).unwrap_or_default();
        let mut rest = run;
        while let Some((word, more)) = rest.split_first_chunk() {
            if stop_in_word(word) {
                break;
            }
            rest = more;
        }
        while let [c, more @ ..] = rest {
            if *c == b'"' || *c == b'\\' || *c < 0x20 {
                break;
            }
            rest = more;
        }
        // `rest` is a suffix of `run`, the text from `from`: the difference is the number of
        // plain bytes, and the sum an offset within the text (it cannot saturate).
        from.saturating_add(run.len().saturating_sub(rest.len()))
    }

    /// The rest of a string from a backslash at `pos`, decoded into `out`.
    fn escaped_rest(&mut self, out: &mut String) -> Result<()> {
        loop {
            match self.bytes().get(self.pos) {
                Some(b'"') => {
                    self.advance(1);
                    return Ok(());
                }
                Some(b'\\') => {
                    self.advance(1);
                    let c = match self.bytes().get(self.pos) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.advance(1);
                            let c = self.unicode_escape()?;
                            out.push(c);
                            continue;
                        }
                        Some(_) => return self.syntax("invalid escape"),
                        None => return self.syntax("unterminated string"),
                    };
                    out.push(c);
                    self.advance(1);
                }
                Some(_) => {
                    let start = self.pos;
                    let end = self.plain_run(start);
                    if end == start {
                        return self.syntax("control character in a string");
                    }
                    out.push_str(self.text_at(start, end)?);
                    self.pos = end;
                }
                None => return self.syntax("unterminated string"),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let digits = match self.rest().get(..4) {
            Some(d) => d,
            None => return self.syntax("invalid \\u escape"),
        };
        let mut v = 0u32;
        for &d in digits {
            // Exactly JSON's hex digits: 0-9, a-f, A-F.
            let Some(n) = char::from(d).to_digit(16) else {
                return self.syntax("invalid \\u escape");
            };
            v = v << 4 | n;
        }
        self.advance(4);
        Ok(v)
    }

    /// `\u` escapes after the `u`: a character, or a surrogate pair as two escapes.
    fn unicode_escape(&mut self) -> Result<char> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                if !self.rest().starts_with(b"\\u") {
                    return self.syntax("lone surrogate in a \\u escape");
                }
                self.advance(2);
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return self.syntax("lone surrogate in a \\u escape");
                }
                // The low ten bits of each half (the ranges just matched), above U+FFFF: at
                // most 0xF_FFFF + 0x1_0000 = U+10FFFF, so the sum never saturates.
                (((first & 0x3FF) << 10) | (second & 0x3FF)).saturating_add(0x1_0000)
            }
            0xDC00..=0xDFFF => return self.syntax("lone surrogate in a \\u escape"),
            c => c,
        };
        match char::from_u32(code) {
            Some(c) => Ok(c),
            None => self.syntax("invalid \\u escape"),
        }
    }

    fn enter(&mut self) -> Result<()> {
        // At most MAX_DEPTH + 1: the reader refuses to go deeper.
        self.depth = self.depth.saturating_add(1);
        if self.depth > MAX_DEPTH {
            return self.syntax("nested too deeply");
        }
        self.advance(1);
        Ok(())
    }

    /// Closes the container [`Reader::enter`] opened (so `depth` is at least 1).
    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.advance(1);
    }

    /// An object: `member` is called with each key (escapes decoded) and must read or skip
    /// the value (the `:` between them is taken when it does). `expected` names the object
    /// in a shape error.
    pub fn object(
        &mut self,
        expected: &str,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Result<()>,
    ) -> Result<()> {
        if self.peek()? != Kind::Object {
            return self.wrong_type(expected);
        }
        self.enter()?;
        self.skip_space();
        if self.bytes().get(self.pos) == Some(&b'}') {
            self.leave();
            return Ok(());
        }
        loop {
            self.skip_space();
            if self.bytes().get(self.pos) != Some(&b'"') {
                return self.syntax("expected a key");
            }
            let key = self.string_body()?;
            self.colon = true;
            member(self, key)?;
            if self.colon {
                // The member read nothing (a caller's bug): never walk on out of step.
                return self.syntax("expected a value");
            }
            self.skip_space();
            match self.bytes().get(self.pos) {
                Some(b',') => self.advance(1),
                Some(b'}') => {
                    self.leave();
                    return Ok(());
                }
                Some(_) => return self.syntax("expected `,` or `}`"),
                None => return self.syntax("unexpected end of the body"),
            }
        }
    }

    /// An object whose known members are `names`: `read` is called with the index of each
    /// one found and must read its value; a second one of a name is refused (`duplicate
    /// field`) before its value is read; other members are skipped. Returns which names
    /// were found, one bit each (at most 64 names).
    pub fn fields(
        &mut self,
        expected: &str,
        names: &[&str],
        mut read: impl FnMut(&mut Self, usize) -> Result<()>,
    ) -> Result<u64> {
        let mut seen = 0u64;
        self.object(expected, |r, key| {
            match names.iter().position(|n| *n == key) {
                Some(i) => {
                    if seen & (1 << i) != 0 {
                        let name = names.get(i).copied().unwrap_or_default();
                        return r.shape(format!("duplicate field `{name}`"));
                    }
                    seen |= 1 << i;
                    read(r, i)
                }
                None => r.skip(),
            }
        })?;
        Ok(seen)
    }

    /// Refuse the object just read by [`Reader::fields`] if it lacks `names[i]`.
    pub fn require(&self, seen: u64, names: &[&str], i: usize) -> Result<()> {
        if seen & (1 << i) == 0 {
            let name = names.get(i).copied().unwrap_or_default();
            return self.shape(format!("missing field `{name}`"));
        }
        Ok(())
    }

    /// An array: `element` is called for each element and must read or skip it.
    pub fn array(
        &mut self,
        expected: &str,
        mut element: impl FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        if self.peek()? != Kind::Array {
            return self.wrong_type(expected);
        }
        self.enter()?;
        self.skip_space();
        if self.bytes().get(self.pos) == Some(&b']') {
            self.leave();
            return Ok(());
        }
        loop {
            element(self)?;
            self.skip_space();
            match self.bytes().get(self.pos) {
                Some(b',') => self.advance(1),
                Some(b']') => {
                    self.leave();
                    return Ok(());
                }
                Some(_) => return self.syntax("expected `,` or `]`"),
                None => return self.syntax("unexpected end of the body"),
            }
        }
    }

    /// Any value, checked and passed over. As serde_json skips a value: its syntax is
    /// checked, escapes only for their form (four hex digits after `\u`), and its nesting
    /// has no limit (a loop, not recursion, so no depth can exhaust the stack).
    pub fn skip(&mut self) -> Result<()> {
        // One bit per open container: set for an object. `depth` is the number open; it
        // grows by one per byte of the body at most, so it cannot reach `usize::MAX`, and
        // it shrinks only where it is above zero.
        let mut open: Vec<u64> = Vec::new();
        let mut depth = 0usize;
        let in_object = |open: &[u64], depth: usize| {
            depth.checked_sub(1).is_some_and(|top| {
                open.get(top / 64)
                    .is_some_and(|bits| bits & (1 << (top % 64)) != 0)
            })
        };
        loop {
            // A value.
            match self.peek()? {
                kind @ (Kind::Object | Kind::Array) => {
                    self.advance(1);
                    if depth % 64 == 0 && open.len() == depth / 64 {
                        open.push(0);
                    }
                    let bit = 1u64 << (depth % 64);
                    if let Some(bits) = open.get_mut(depth / 64) {
                        if kind == Kind::Object {
                            *bits |= bit;
                        } else {
                            *bits &= !bit;
                        }
                    }
                    depth = depth.saturating_add(1);
                    self.skip_space();
                    match (kind, self.bytes().get(self.pos)) {
                        (Kind::Object, Some(b'}')) | (Kind::Array, Some(b']')) => {
                            self.advance(1);
                            depth = depth.saturating_sub(1);
                        }
                        (Kind::Object, _) => {
                            self.skip_key()?;
                            continue;
                        }
                        _ => continue,
                    }
                }
                Kind::String => self.skip_string()?,
                Kind::Number => {
                    self.number_text()?;
                }
                Kind::Bool => {
                    self.bool()?;
                }
                Kind::Null => self.literal("null")?,
            }
            // After a value: the next member or element, or the end of containers.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                let object = in_object(&open, depth);
                self.skip_space();
                match self.bytes().get(self.pos) {
                    Some(b',') => {
                        self.advance(1);
                        if object {
                            self.skip_key()?;
                        }
                        break;
                    }
                    Some(b'}') if object => {
                        self.advance(1);
                        depth = depth.saturating_sub(1);
                    }
                    Some(b']') if !object => {
                        self.advance(1);
                        depth = depth.saturating_sub(1);
                    }
                    Some(_) if object => return self.syntax("expected `,` or `}`"),
                    Some(_) => return self.syntax("expected `,` or `]`"),
                    None => return self.syntax("unexpected end of the body"),
                }
            }
        }
    }

    /// A key of a skipped object and its `:`.
    fn skip_key(&mut self) -> Result<()> {
        self.skip_space();
        if self.bytes().get(self.pos) != Some(&b'"') {
            return self.syntax("expected a key");
        }
        self.skip_string()?;
        self.skip_space();
        if self.bytes().get(self.pos) != Some(&b':') {
            return self.syntax("expected `:`");
        }
        self.advance(1);
        Ok(())
    }

    /// A string whose opening quote is at `pos`, passed over.
    fn skip_string(&mut self) -> Result<()> {
        self.advance(1);
        loop {
            let end = self.plain_run(self.pos);
            self.pos = end;
            match self.bytes().get(end) {
                Some(b'"') => {
                    self.advance(1);
                    return Ok(());
                }
                Some(b'\\') => {
                    self.advance(1);
                    match self.bytes().get(self.pos) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.advance(1)
                        }
                        Some(b'u') => {
                            self.advance(1);
                            self.hex4()?;
                        }
                        Some(_) => return self.syntax("invalid escape"),
                        None => return self.syntax("unterminated string"),
                    }
                }
                Some(_) => return self.syntax("control character in a string"),
                None => return self.syntax("unterminated string"),
            }
        }
    }

    /// The next value, checked and passed over as [`Reader::skip`] does; returns where its
    /// text is in the document.
    pub fn skip_span(&mut self) -> Result<Range<usize>> {
        self.peek()?;
        let start = self.pos;
        self.skip()?;
        Ok(start..self.pos)
    }

    /// The next value's text, checked as a value that will be decoded (for the few fields
    /// read as a `serde_json::Value`): its strings' escapes must decode, and its nesting
    /// counts toward the document's limit, as when serde_json decodes it in place.
    pub fn raw(&mut self) -> Result<&'a str> {
        self.peek()?;
        let start = self.pos;
        self.check_decoded()?;
        self.text_at(start, self.pos)
    }

    fn check_decoded(&mut self) -> Result<()> {
        match self.peek()? {
            Kind::Object => self.object("an object", |r, _| r.check_decoded()),
            Kind::Array => self.array("an array", |r| r.check_decoded()),
            Kind::String => self.string().map(|_| ()),
            _ => self.skip(),
        }
    }
}

/// Whether a word of eight bytes holds `"`, `\` or a control character.
#[inline]
fn stop_in_word(word: &[u8; 8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let v = u64::from_le_bytes(*word);
    // Zero bytes of v ^ '"', v ^ '\\', and bytes below 0x20 (v - 0x20 borrows).
    let quote = v ^ (ONES * u64::from(b'"'));
    let slash = v ^ (ONES * u64::from(b'\\'));
    let hit = (quote.wrapping_sub(ONES) & !quote)
        | (slash.wrapping_sub(ONES) & !slash)
        | (v.wrapping_sub(ONES * 0x20) & !v);
    hit & HIGHS != 0
}

/// The members of the object that `text` is: each key (escapes decoded) and where its
/// value is in `text`. The document is checked as [`Reader::skip`] checks a value.
pub fn members(text: &str) -> Result<Vec<(Cow<'_, str>, Range<usize>)>> {
    let mut r = Reader::new(text);
    let mut out = Vec::new();
    r.object("an object", |r, key| {
        out.push((key, r.skip_span()?));
        Ok(())
    })?;
    r.end()?;
    Ok(out)
}

/// Where each element of the array at `range` of `text` is in `text`.
pub fn elements(text: &str, range: Range<usize>) -> Result<Vec<Range<usize>>> {
    let offset = range.start;
    let inner = text.get(range).ok_or(Error {
        at: offset,
        kind: ErrorKind::Syntax("expected an array"),
    })?;
    let mut r = Reader::new(inner);
    let mut out = Vec::new();
    r.array("an array", |r| {
        let span = r.skip_span()?;
        // Offsets within `inner`, a part of `text`: no sum exceeds `text.len()`.
        out.push(offset.saturating_add(span.start)..offset.saturating_add(span.end));
        Ok(())
    })?;
    Ok(out)
}

/// `bytes` as text for a [`Reader`], with invalid UTF-8 replaced (U+FFFD) as
/// `String::from_utf8_lossy` does. Valid input (what providers send) is borrowed after the
/// standard library's fast validator; only broken input pays for the lossy decoding, whose
/// byte-by-byte walk is several times slower on long text.
pub fn lossy_text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// The 1-based line and column (in bytes) of offset `at` in `text`.
pub fn line_column(text: &[u8], at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    // Counts and offsets within `before`: below `usize::MAX`, so no sum saturates, and the
    // line starts at or before its end.
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i.saturating_add(1));
    (
        before
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            .saturating_add(1),
        before.len().saturating_sub(line_start).saturating_add(1),
    )
}

/// Deterministic mutations of JSON texts, for the tests that compare a reader of this crate
/// with the serde reading it replaced.
#[cfg(test)]
pub(crate) struct Mutator {
    state: u64,
}

#[cfg(test)]
impl Mutator {
    /// A mutator seeded with `seed` (xorshift: a failure names a reproducible text).
    pub(crate) fn new(seed: u64) -> Mutator {
        Mutator { state: seed | 1 }
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % n.max(1) as u64) as usize
    }

    /// `base` with 1 to `edits` edits: a few bytes deleted, the text cut short, or one of
    /// `fragments` inserted (the most likely).
    pub(crate) fn mutate(&mut self, base: &[u8], fragments: &[&str], edits: usize) -> Vec<u8> {
        let mut text = base.to_vec();
        for _ in 0..1 + self.below(edits) {
            let at = self.below(text.len() + 1);
            match self.below(5) {
                0 => {
                    let end = (at + 1 + self.below(12)).min(text.len());
                    text.drain(at.min(end)..end);
                }
                1 => text.truncate(at),
                _ => {
                    let f = fragments[self.below(fragments.len())];
                    text.splice(at..at, f.bytes());
                }
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_text_is_from_utf8_lossy_and_borrows_valid_text() {
        let cases: [&[u8]; 6] = [
            b"",
            b"{\"usage\":1}",
            "data: 你好".as_bytes(),
            b"\xff",
            b"ab\xe4\xb8cd",
            b"\xed\xa0\x80 surrogate",
        ];
        for bytes in cases {
            let text = lossy_text(bytes);
            assert_eq!(text, String::from_utf8_lossy(bytes), "{bytes:?}");
            assert_eq!(
                matches!(text, Cow::Borrowed(_)),
                std::str::from_utf8(bytes).is_ok()
            );
        }
    }

    fn skip_all(text: &str) -> Result<()> {
        let mut r = Reader::new(text);
        r.skip()?;
        r.end()
    }

    fn decode_all(text: &str) -> Result<()> {
        let mut r = Reader::new(text);
        r.raw()?;
        r.end()
    }

    /// What serde_json says of the same text, skipped (as an unknown field).
    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    /// What serde_json says of the same text, decoded.
    fn serde_decodes(text: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(text).is_ok()
    }

    #[test]
    fn accepts_and_refuses_what_serde_json_does() {
        let cases = [
            "{}",
            "[]",
            " { \"a\" : [1, -2.5e+3, 0, -0, 1E9, true, false, null, \"x\"] } ",
            "\"\\u00e9\\ud83d\\ude00\\n\\/\"",
            "0",
            "-0.0e-0",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "[1 2]",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00x\"",
            "\"\\ud800\\u0041\"",
            "\"\\u12\"",
            "\"tab\there\"",
            "\"new\nline\"",
            "\"unterminated",
            "tru",
            "nul",
            "[1] x",
            "[1]\n\t ",
            "",
            "  ",
            "/* c */ 1",
            "{\"a\":{\"b\":[{},[],{\"c\":[1,{\"d\":null}]}]},\"e\":\"\\u0041\"}",
            "{\"a\":{\"b\":[{},[],{\"c\":[1,{\"d\":null}]]},\"e\":1}",
            "{\"a\":{\"b\" 1}}",
            "[{\"a\":1,}]",
            "{\"\\ud800\":1}",
        ];
        for text in cases {
            assert_eq!(skip_all(text).is_ok(), serde_accepts(text), "skip {text:?}");
            assert_eq!(
                decode_all(text).is_ok(),
                serde_decodes(text),
                "decode {text:?}"
            );
        }
    }

    #[test]
    fn nesting_is_unlimited_when_skipped_and_stops_where_serde_json_stops_when_decoded() {
        for depth in [1, 100, 126, 127, 128, 129, 5000, 200_000] {
            for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
                let text = format!("{}0{}", open.repeat(depth), close.repeat(depth));
                assert_eq!(
                    skip_all(&text).is_ok(),
                    serde_accepts(&text),
                    "skip {depth}"
                );
                if depth < 1000 {
                    assert_eq!(
                        decode_all(&text).is_ok(),
                        serde_decodes(&text),
                        "decode {depth}"
                    );
                }
            }
        }
    }

    #[test]
    fn strings_borrow_unless_escaped_and_decode_like_serde() {
        for text in [
            r#""plain text, no escapes""#,
            r#""a\"b\\c\/d\b\f\n\r\t""#,
            r#""\u00e9t\u00E9 \ud83d\ude00 end""#,
            "\"long enough to take the eight-byte path twice over \\u0041\"",
            "\"é中文 mixed with escapes \\\" after\"",
        ] {
            let mut r = Reader::new(text);
            let ours = r.string().unwrap();
            let theirs: String = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs);
            assert_eq!(matches!(ours, Cow::Borrowed(_)), !text.contains('\\'));
        }
    }

    #[test]
    fn objects_hand_over_decoded_keys_in_order() {
        let mut r = Reader::new(r#"{"a":1,"b\u0063":[true],"d":{"e":null}}"#);
        let mut keys = Vec::new();
        r.object("an object", |r, k| {
            keys.push(k.into_owned());
            r.skip()
        })
        .unwrap();
        r.end().unwrap();
        assert_eq!(keys, ["a", "bc", "d"]);
    }

    #[test]
    fn integers_are_checked_like_serde_reads_an_i64() {
        let read = |t: &str| Reader::new(t).i64();
        assert_eq!(read("42").unwrap(), 42);
        assert_eq!(read("-9223372036854775808").unwrap(), i64::MIN);
        for shape in ["9223372036854775808", "1.0", "1e3", "-0", "\"5\"", "true"] {
            let e = read(shape).unwrap_err();
            assert!(matches!(e.kind, ErrorKind::Shape(_)), "{shape}: {e:?}");
        }
        assert!(matches!(read("01").unwrap_err().kind, ErrorKind::Syntax(_)));
        assert!(matches!(read("-").unwrap_err().kind, ErrorKind::Syntax(_)));
        assert!(Reader::new("4294967296").u32().is_err());
        assert_eq!(Reader::new("4294967295").u32().unwrap(), u32::MAX);
    }

    #[test]
    fn shape_errors_name_types_never_values() {
        let mut r = Reader::new(r#""my secret prompt""#);
        let e = r.array("an array of messages", |r| r.skip()).unwrap_err();
        let ErrorKind::Shape(detail) = e.kind else {
            panic!("{e:?}")
        };
        assert!(detail.contains("an array of messages"), "{detail}");
        assert!(!detail.contains("secret"), "{detail}");
    }

    #[test]
    fn positions_are_lines_and_byte_columns() {
        let text = b"{\n  \"a\": x}";
        let e = skip_all(std::str::from_utf8(text).unwrap()).unwrap_err();
        assert_eq!(line_column(text, e.at), (2, 8));
    }
}
