//! The message a client receives: PGCacheWatch's event JSON.
//!
//! PGCacheWatch's triggers send `{"operation": …, "table": …, "sent_at": …}`
//! (`json_build_object` of `lower(TG_OP)`, `TG_TABLE_NAME`, `NOW()`), its
//! distributor forwards that text unchanged, and `WSEventQueue` parses it into
//! its `Event` model (`channel`, `operation`, `sent_at`, `table`), overwriting
//! `channel` with the channel it connected to. The server sends exactly those
//! four fields.

use chrono::SecondsFormat;
use pgcachewatch_core::Event;

/// The JSON text a PGCacheWatch client receives for `event`:
/// `{"channel", "operation", "sent_at", "table"}`.
///
/// `sent_at` is the trigger's timestamp in PostgreSQL's JSON form
/// (microseconds, `+00:00`); an event without one (a source that does not know
/// when the write happened) carries the time it was received instead, since
/// PGCacheWatch's model requires the field. `table` is the bare table name, as
/// `TG_TABLE_NAME` gives it: PGCacheWatch's payload has no schema.
///
/// ```
/// use pgcachewatch::websocket::event_json;
/// use pgcachewatch::{Event, Operation};
/// let mut event = Event::new("ch_pgcachewatch_table_change", Operation::Update, "public", "users");
/// event.sent_at = Some("2024-05-01T10:00:00.123456Z".parse().unwrap());
/// assert_eq!(
///     event_json(&event),
///     r#"{"channel":"ch_pgcachewatch_table_change","operation":"update","sent_at":"2024-05-01T10:00:00.123456+00:00","table":"users"}"#,
/// );
/// ```
pub fn event_json(event: &Event) -> String {
    let sent_at = event
        .sent_at
        .unwrap_or(event.received_at)
        .to_rfc3339_opts(SecondsFormat::Micros, false);
    serde_json::json!({
        "channel": event.channel,
        "operation": event.operation.as_str(),
        "sent_at": sent_at,
        "table": event.table,
    })
    .to_string()
}
