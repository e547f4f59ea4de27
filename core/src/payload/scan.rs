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

/// The fields of `payload` if it has the common shape; `None` means "ask serde_json".
pub(super) fn scan(payload: &str) -> Option<Fields<'_>> {
    let mut s = Scanner {
        text: payload,
        at: 0,
    };
    s.whitespace();
    s.expect(b'{')?;
    let (mut operation, mut table) = (None, None);
    let mut fields = Fields {
        operation: Cow::Borrowed(""),
        schema: None,
        table: Cow::Borrowed(""),
        sent_at: None,
        keys: Keys::Absent,
        txid: None,
    };
    let mut seen = 0u8;
    loop {
        s.whitespace();
        let name = s.string()?;
        s.whitespace();
        s.expect(b':')?;
        s.whitespace();
        let bit = match name {
            "operation" => 1,
            "schema" => 2,
            "table" => 4,
            "sent_at" => 8,
            "keys" => 16,
            "txid" => 32,
            // serde_json skips unknown fields; it reads them too.
            _ => return None,
        };
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
    Some(fields)
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

    /// A string without escapes or control characters; its text.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let rest = &self.bytes()[start..];
        let len = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
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
