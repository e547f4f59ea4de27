//! `ttl = "1m30s"`: a duration written as text, read at compile time.

/// Nanoseconds in `text`: one or more `<number><unit>` with units `ms`, `s`,
/// `m`, `h`, `d` (e.g. `"60s"`, `"1m30s"`, `"250ms"`).
pub(crate) fn parse(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty duration".into());
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a number at `{rest}`"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{}` is too large", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos: u64 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => return Err(format!("`{number}` needs a unit: ms, s, m, h or d")),
            other => return Err(format!("unknown unit `{other}`: use ms, s, m, h or d")),
        };
        total = number
            .checked_mul(nanos)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| "the duration is too long".to_string())?;
    }
    if total == 0 {
        return Err("a time-to-live of zero would cache nothing".into());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_units_and_sums() {
        assert_eq!(parse("60s"), Ok(60_000_000_000));
        assert_eq!(parse("250ms"), Ok(250_000_000));
        assert_eq!(parse("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse("2h"), Ok(7_200_000_000_000));
        assert_eq!(parse("1d"), Ok(86_400_000_000_000));
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert!(parse("").is_err());
        assert!(parse("60").unwrap_err().contains("needs a unit"));
        assert!(parse("5 min").is_err());
        assert!(parse("s").is_err());
        assert!(parse("0s").unwrap_err().contains("zero"));
        assert!(parse("99999999999999999999s").is_err());
        assert!(parse("999999999999d").is_err());
    }
}
