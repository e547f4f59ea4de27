//! Whatever arrives on the channel, parsing returns a value or an error, never a panic;
//! and everything pgcachewatch's trigger can send parses back to what was sent.

use chrono::{TimeZone, Utc};
use pgcachewatch_core::{parse_payload, Operation};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("insert"),
            Just("UPDATE"),
            Just("delete"),
            Just("truncate"),
            Just("upsert")
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("operation".to_string()),
                    Just("table".to_string()),
                    Just("schema".to_string()),
                    Just("sent_at".to_string()),
                    Just("keys".to_string()),
                    Just("txid".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(payload in ".{0,200}") {
        let _ = parse_payload("ch", &payload, Utc::now());
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        let _ = parse_payload("ch", &value.to_string(), Utc::now());
    }

    #[test]
    fn trigger_payloads_round_trip(
        op in prop_oneof![Just(Operation::Insert), Just(Operation::Update), Just(Operation::Delete), Just(Operation::Truncate)],
        schema in "[a-zA-Z_ ;\"']{1,12}",
        table in "[a-zA-Z_ ;\"']{1,12}",
        micros in 0i64..4_000_000_000_000_000,
        txid in any::<i64>(),
        ids in proptest::option::of(proptest::collection::vec(any::<i64>(), 0..5)),
    ) {
        let sent_at = Utc.timestamp_micros(micros).single().expect("in range");
        let mut payload = serde_json::json!({
            "operation": op.as_str(), "schema": schema, "table": table,
            "sent_at": sent_at.to_rfc3339(), "txid": txid,
        });
        if let Some(ids) = &ids {
            payload["keys"] = ids.iter().map(|id| serde_json::json!({"id": id})).collect();
        }
        let e = parse_payload("ch", &payload.to_string(), Utc::now()).expect("our own payload parses");
        prop_assert_eq!(e.operation, op);
        prop_assert_eq!(e.schema.as_deref(), Some(schema.as_str()));
        prop_assert_eq!(&e.table, &table);
        prop_assert_eq!(e.sent_at, Some(sent_at));
        prop_assert_eq!(e.txid, Some(txid));
        prop_assert_eq!(e.keys.map(|k| k.len()), ids.map(|i| i.len()));
    }
}
