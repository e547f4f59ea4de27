//! The fast path: the payloads triggers send, read without serde_json.
//!
//! A trigger's payload is a flat JSON object of known fields whose strings carry
//! no escapes; a burst delivers hundreds of thousands of them, and serde_json's
//! general machinery was most of the listener's cost per event. [`scan`] reads
//! exactly that shape and answers `None` for anything else — an escape, a control
//! character, an unknown, duplicate or missing field, a nested value other than
//! the row keys, trailing text — so that the caller falls back to serde_json.
//! What it accepts, serde_json would read into the same fields: a differential
//! property test and the `parse_payload` fuzz target hold it to that.

use std::borrow::Cow;

use super::{Fields, Keys};
use crate::event::RowKey;

/// Where the last payload's leading `operation`, `schema` and `table` fields
/// ended, and what they held: a payload that starts with the same bytes is read
/// on from there.
///
/// A trigger sends its table's payloads with the same leading fields (its
/// operation, schema and table come first in `json_build_object`'s output);
/// only `sent_at` and `txid` differ. The scanner reads left to right and looks
/// at no byte past the value it is reading, so its state after equal leading
/// bytes is equal: resuming there reads exactly what a full scan would.
#[derive(Debug, Default)]
pub(super) struct Prefix {
    /// The payload's bytes up to the end of the last remembered value.
    bytes: Vec<u8>,
    leading: Leading,
}

/// The scanner's state after a payload's leading fields.
#[derive(Debug, Default, Clone, Copy)]
struct Leading {
    /// Where the last of them ends.
    end: usize,
    /// The fields read (their bits).
    seen: u8,
    operation: Option<Span>,
    schema: Option<Span>,
    table: Option<Span>,
}

/// Where a field's text lies in the payload: start and end.
type Span = (usize, usize);

/// The fields of `payload` if it has the common shape; `None` means "ask
/// serde_json". Resumes after `prefix` when `payload` starts with it, and
/// remembers the new prefix after a full scan that found one (pass `&mut None`
/// to read a payload alone).
pub(super) fn scan<'a>(payload: &'a str, prefix: &mut Option<Prefix>) -> Option<Fields<'a>> {
    let mut s = Scanner {
        text: payload,
        at: 0,
    };
    let span = |text: &str| {
        let start = text.as_ptr() as usize - payload.as_ptr() as usize;
        (start, start + text.len())
    };
    let text = |(start, end): Span| &payload[start..end];
    let mut fields = Fields {
        operation: Cow::Borrowed(""),
        schema: None,
        table: Cow::Borrowed(""),
        sent_at: None,
        keys: Keys::Absent,
        txid: None,
        plain: true,
    };
    let (mut operation, mut table, mut seen) = (None, None, 0u8);
    // Resumed after a remembered prefix: the next step is the separator.
    let mut resumed = false;
    // Where this payload's leading fields end (and what they held), while
    // every field so far is one a prefix remembers.
    let mut found: Option<Leading> = None;
    let mut leading = true;
    match prefix.as_ref() {
        Some(p) if payload.as_bytes().starts_with(&p.bytes) => {
            let l = p.leading;
            s.at = l.end;
            seen = l.seen;
            operation = l.operation.map(text);
            table = l.table.map(text);
            fields.schema = l.schema.map(|sp| Cow::Borrowed(text(sp)));
            resumed = true;
            leading = false;
        }
        _ => {
            s.whitespace();
            s.expect(b'{')?;
        }
    }
    loop {
        if !std::mem::take(&mut resumed) {
            s.whitespace();
            // serde_json skips unknown fields; it reads them too.
            let bit = s.field_name()?;
            s.whitespace();
            s.expect(b':')?;
            s.whitespace();
            if seen & bit != 0 {
                // serde_json rejects a duplicate field; it says so better.
                return None;
            }
            seen |= bit;
            match bit {
                1 => operation = Some(s.string()?),
                2 => fields.schema = s.null_or_string()?.map(Cow::Borrowed),
                4 => table = Some(s.string()?),
                8 => fields.sent_at = s.scalar()?,
                16 => fields.keys = s.keys()?,
                _ => fields.txid = s.scalar()?,
            }
            leading &= bit & (1 | 2 | 4) != 0;
            if leading {
                found = Some(Leading {
                    end: s.at,
                    seen,
                    operation: operation.map(span),
                    schema: fields.schema.as_deref().map(span),
                    table: table.map(span),
                });
            }
        }
        s.whitespace();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.whitespace();
    if s.at != payload.len() {
        return None;
    }
    fields.operation = Cow::Borrowed(operation?);
    fields.table = Cow::Borrowed(table?);
    if let Some(leading) = found {
        let p = prefix.get_or_insert_with(Prefix::default);
        p.bytes.clear();
        p.bytes
            .extend_from_slice(&payload.as_bytes()[..leading.end]);
        p.leading = leading;
    }
    Some(fields)
}

/// The index of the first byte of `bytes` that ends a plain string's text: a
/// quote, a backslash or a control character. Eight bytes at a time: a
/// payload's strings are most of its length.
#[inline]
fn string_end(bytes: &[u8]) -> Option<usize> {
    let n = bytes.len();
    let mut at = 0;
    while at + 8 <= n {
        let found = stops(word_at(bytes, at));
        if found != 0 {
            return Some(at + first_flagged(found));
        }
        at += 8;
    }
    if at == n {
        return None;
    }
    if n < 8 {
        return bytes[at..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .map(|i| at + i);
    }
    // The last eight bytes, overlapping those already read: their flags are
    // masked off (they hold no stop, so they lend no borrow either).
    let seen = 8 - (n - at);
    let found = stops(word_at(bytes, n - 8)) & (u64::MAX << (seen * 8));
    (found != 0).then(|| n - 8 + first_flagged(found))
}

/// The eight bytes of `bytes` from `at`, as one little-endian word.
#[inline]
pub(super) fn word_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The bytes of `w` that stop a plain string, flagged by their high bit. Only
/// the lowest flag is exact (a flagged byte can flag the ones above it through
/// a borrow); bytes of 0x80 and above (UTF-8) are never flagged.
#[inline]
fn stops(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `x` that is zero.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    zero(w ^ (ONES * u64::from(b'"')))
        | zero(w ^ (ONES * u64::from(b'\\')))
        | (w.wrapping_sub(ONES * 0x20) & !w & HIGH)
}

fn first_flagged(found: u64) -> usize {
    (found.trailing_zeros() / 8) as usize
}

/// A cursor over the payload's bytes. Every position it stops at is an ASCII
/// byte, so slicing the `str` there is always on a character boundary.
struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A known field's name, as its bit; `None` for any other name (or one
    /// written with an escape). Compared whole, quotes included, rather than
    /// searched for its end: a payload has one name per field.
    fn field_name(&mut self) -> Option<u8> {
        let rest = self.bytes().get(self.at..)?;
        let (bit, len) = match rest.get(1)? {
            b'o' if rest.starts_with(b"\"operation\"") => (1, 11),
            b's' if rest.starts_with(b"\"schema\"") => (2, 8),
            b's' if rest.starts_with(b"\"sent_at\"") => (8, 9),
            b't' if rest.starts_with(b"\"table\"") => (4, 7),
            b't' if rest.starts_with(b"\"txid\"") => (32, 6),
            b'k' if rest.starts_with(b"\"keys\"") => (16, 6),
            _ => return None,
        };
        self.at += len;
        Some(bit)
    }

    /// A string without escapes or control characters; its text.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let rest = self.bytes().get(start..)?;
        let len = string_end(rest)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        Some(&self.text[start..start + len])
    }

    /// `null` (then `None`) or a plain string.
    fn null_or_string(&mut self) -> Option<Option<&'a str>> {
        if self.literal("null") {
            return Some(None);
        }
        self.string().map(Some)
    }

    /// A scalar JSON value as raw text (`None` inside for `null`): a plain
    /// string (with its quotes), a number, `true` or `false`. Arrays and objects
    /// are left to serde_json.
    fn scalar(&mut self) -> Option<Option<&'a str>> {
        let start = self.at;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'n' => return self.literal("null").then_some(None),
            b't' => {
                if !self.literal("true") {
                    return None;
                }
            }
            b'f' => {
                if !self.literal("false") {
                    return None;
                }
            }
            _ => self.number()?,
        }
        Some(Some(&self.text[start..self.at]))
    }

    /// `keys`: `null`, or an array read as row keys. An array that is not a list
    /// of objects (or not valid JSON) is left to serde_json, which tells the two
    /// apart.
    fn keys(&mut self) -> Option<Keys<'a>> {
        if self.literal("null") {
            return Some(Keys::Absent);
        }
        if self.peek()? != b'[' {
            return None;
        }
        let start = self.at;
        self.skip_nested()?;
        serde_json::from_str::<Vec<RowKey>>(&self.text[start..self.at])
            .ok()
            .map(Keys::Read)
    }

    /// Moves past one array or object, minding strings and their escapes; the
    /// text it spans is checked by the caller's parse.
    fn skip_nested(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            match self.next()? {
                b'[' | b'{' => depth += 1,
                b']' | b'}' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(());
                    }
                }
                b'"' => loop {
                    match self.next()? {
                        b'"' => break,
                        b'\\' => {
                            self.next()?;
                        }
                        _ => {}
                    }
                },
                _ => {}
            }
        }
    }

    fn literal(&mut self, word: &str) -> bool {
        let found = self.bytes()[self.at..].starts_with(word.as_bytes());
        if found {
            self.at += word.len();
        }
        found
    }

    /// JSON's number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }
}
