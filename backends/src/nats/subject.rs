//! NATS subjects for tables: a reversible escape of names NATS cannot carry.
//!
//! A subject is `<prefix>.<schema>.<table>`. NATS subjects are dot-separated
//! tokens that must not contain `.`, `*`, `>` or whitespace; table names may
//! contain anything. Each name is escaped byte by byte: ASCII letters, digits,
//! `_` and `-` stay as they are; every other byte (including each byte of a
//! non-ASCII character) becomes `~` and two upper-case hexadecimal digits. The
//! escape is reversible ([`unescape_token`]), and three tokens can never be the
//! output of escaping a name, so they are free for the relay's own use:
//! `~` (the empty name), `~~` (no schema) and `~relay` (control messages).

use std::fmt::Write as _;

/// The token of an event without a schema (PGCacheWatch's payloads have none).
pub const NO_SCHEMA_TOKEN: &str = "~~";

/// The token after the prefix under which the relay publishes its control
/// messages (gap markers, heartbeats, progress): `<prefix>.~relay.<kind>`.
pub const CONTROL_TOKEN: &str = "~relay";

/// Escapes one name into one subject token.
///
/// ```
/// use pgcachewatch::nats::subject::{escape_token, unescape_token};
/// assert_eq!(escape_token("users"), "users");
/// assert_eq!(escape_token("odd.name *>"), "odd~2Ename~20~2A~3E");
/// assert_eq!(escape_token("café"), "caf~C3~A9");
/// assert_eq!(unescape_token(&escape_token("café")).as_deref(), Some("café"));
/// ```
pub fn escape_token(name: &str) -> String {
    if name.is_empty() {
        return "~".to_owned();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "~{b:02X}");
        }
    }
    out
}

/// Reverses [`escape_token`]; `None` if `token` is not the escape of any name.
pub fn unescape_token(token: &str) -> Option<String> {
    if token == "~" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'~' {
            let hex = token.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// The subject of an event on `table` in `schema` (`None`: no schema).
///
/// ```
/// use pgcachewatch::nats::subject::table_subject;
/// assert_eq!(table_subject("pgcw", Some("public"), "users"), "pgcw.public.users");
/// assert_eq!(table_subject("pgcw", None, "users"), "pgcw.~~.users");
/// ```
pub fn table_subject(prefix: &str, schema: Option<&str>, table: &str) -> String {
    let schema = schema.map_or_else(|| NO_SCHEMA_TOKEN.to_owned(), escape_token);
    format!("{prefix}.{schema}.{}", escape_token(table))
}

/// The subject of the relay's control messages of `kind` (`gap`, `heartbeat`).
pub fn control_subject(prefix: &str, kind: &str) -> String {
    format!("{prefix}.{CONTROL_TOKEN}.{kind}")
}

/// The subject of the progress records of the relay over `origin` (its
/// upstream's lasting name; see [`Relay`](super::Relay)):
/// `<prefix>.~relay.progress.<origin, escaped>`. The relay deletes each record
/// once the next one is stored, so the stream keeps the latest per upstream,
/// found by its subject; relays over different upstreams sharing a stream each
/// keep their own.
///
/// ```
/// use pgcachewatch::nats::subject::progress_subject;
/// assert_eq!(progress_subject("pgcw", "pg:1/slot:s"), "pgcw.~relay.progress.pg~3A1~2Fslot~3As");
/// ```
pub fn progress_subject(prefix: &str, origin: &str) -> String {
    format!("{prefix}.{CONTROL_TOKEN}.progress.{}", escape_token(origin))
}

/// Every control subject of a prefix: `<prefix>.~relay.>`.
pub fn control_filter(prefix: &str) -> String {
    format!("{prefix}.{CONTROL_TOKEN}.>")
}

/// Parses an event subject back into `(schema, table)`; `None` for control
/// subjects and anything this module did not produce.
///
/// ```
/// use pgcachewatch::nats::subject::{parse_table_subject, table_subject};
/// let s = table_subject("p", Some("a.b"), "c d");
/// assert_eq!(parse_table_subject("p", &s), Some((Some("a.b".to_owned()), "c d".to_owned())));
/// ```
pub fn parse_table_subject(prefix: &str, subject: &str) -> Option<(Option<String>, String)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (schema, table) = rest.split_once('.')?;
    if schema == CONTROL_TOKEN || table.contains('.') {
        return None;
    }
    let schema = if schema == NO_SCHEMA_TOKEN {
        None
    } else {
        Some(unescape_token(schema)?)
    };
    Some((schema, unescape_token(table)?))
}

/// Checks a subject prefix: one or more valid tokens (`[A-Za-z0-9_-]`, dots between).
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "subject prefix {prefix:?}: expected dot-separated tokens of letters, digits, `_` and `-`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips_every_kind_of_name() {
        for name in [
            "", "users", "a.b", "*", ">", " ", "\t", "~", "~7E", "é", "日本", "x~y", "~relay", "~~",
        ] {
            let t = escape_token(name);
            assert!(
                !t.contains(['.', '*', '>', ' ', '\t']) && t.is_ascii(),
                "{name:?} → {t:?}"
            );
            assert_eq!(unescape_token(&t).as_deref(), Some(name), "{name:?}");
            assert_ne!(t, CONTROL_TOKEN);
            assert_ne!(t, NO_SCHEMA_TOKEN);
        }
        assert_eq!(unescape_token("~relay"), None);
        assert_eq!(unescape_token("~~"), None);
        assert_eq!(unescape_token("a.b"), None);
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("pgcw").is_ok());
        assert!(check_prefix("app.pgcw").is_ok());
        for bad in ["", "a..b", "a.*", "a b", ">"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
