//! Quoting identifiers and literals for generated SQL.
//!
//! Every name the installer puts into SQL goes through [`quote_ident`] and every
//! string value through [`quote_literal`], mirroring PostgreSQL's own
//! `quote_ident` / `quote_literal`, so no table, schema, function or channel name
//! can change the meaning of a statement.

use super::error::InstallError;

/// PostgreSQL's `NAMEDATALEN - 1`: longer identifiers are silently truncated by
/// the server, which could make two names collide, so they are rejected instead.
pub(crate) const MAX_IDENT_BYTES: usize = 63;

/// Checks that `name` can be a PostgreSQL identifier (non-empty, at most 63 bytes,
/// no NUL character). `what` names it in the error ("table", "channel", …).
pub(crate) fn check_ident(what: &'static str, name: &str) -> Result<(), InstallError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_IDENT_BYTES {
        "it is longer than 63 bytes (PostgreSQL would truncate it)"
    } else if name.contains('\0') {
        "it contains a NUL character"
    } else {
        return Ok(());
    };
    Err(InstallError::InvalidName {
        what,
        name: name.to_owned(),
        reason: reason.to_owned(),
    })
}

/// `"name"` with embedded double quotes doubled: always quoted, so case, spaces
/// and punctuation survive and keywords are harmless.
pub(crate) fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A string literal that means `value` whatever `standard_conforming_strings` is:
/// quotes doubled, and with backslashes present the `E'…'` form with them doubled
/// (what PostgreSQL's `quote_literal` does).
pub(crate) fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_like_postgres() {
        assert_eq!(quote_ident("users"), r#""users""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_ident("Tab;le x"), r#""Tab;le x""#);
    }

    #[test]
    fn quotes_literals_like_postgres() {
        assert_eq!(quote_literal("chan"), "'chan'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
    }

    #[test]
    fn rejects_names_postgres_would_mangle() {
        assert!(check_ident("table", "").is_err());
        assert!(check_ident("table", &"x".repeat(64)).is_err());
        assert!(check_ident("table", "a\0b").is_err());
        assert!(check_ident("table", &"x".repeat(63)).is_ok());
        // 21 three-byte characters = 63 bytes: fine; 22 = 66: too long.
        assert!(check_ident("table", &"€".repeat(21)).is_ok());
        assert!(check_ident("table", &"€".repeat(22)).is_err());
    }
}
