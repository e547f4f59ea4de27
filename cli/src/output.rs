//! Writing to stdout without panicking when the reader goes away (`| head`).

use std::io::Write as _;

use anyhow::Result;

/// Writes `text` to stdout and flushes it.
pub(crate) fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Whether `error` is stdout's reader having gone away: not worth a message.
pub(crate) fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The error and its causes on one line, skipping causes whose text the message
/// already shows (sqlx and thiserror errors often repeat their source).
pub(crate) fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// `rows` as an aligned block: the labels padded to the longest, each row
/// indented by two spaces.
pub(crate) fn aligned(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("  {k:<width$}  {v}\n"))
        .collect()
}

/// A duration for people: `850 µs`, `12.4 ms`, `3.2 s`; `-` for none.
pub(crate) fn duration(d: Option<std::time::Duration>) -> String {
    match d {
        None => "-".to_owned(),
        Some(d) if d < std::time::Duration::from_millis(1) => format!("{} µs", d.as_micros()),
        Some(d) if d < std::time::Duration::from_secs(1) => {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        }
        Some(d) => format!("{:.1} s", d.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn aligned_pads_labels_and_durations_have_units() {
        let block = aligned(&[("events", "5".into()), ("reconnects", "0".into())]);
        assert_eq!(block, "  events      5\n  reconnects  0\n");
        assert_eq!(duration(None), "-");
        assert_eq!(duration(Some(Duration::from_micros(850))), "850 µs");
        assert_eq!(duration(Some(Duration::from_micros(12_400))), "12.4 ms");
        assert_eq!(duration(Some(Duration::from_millis(3_200))), "3.2 s");
    }
}
