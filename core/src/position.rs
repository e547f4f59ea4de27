//! [`Lsn`]: a position in PostgreSQL's write-ahead log.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in PostgreSQL's write-ahead log (a `pg_lsn`), written as
/// PostgreSQL writes it: two hexadecimal halves, `16/B374D848`.
///
/// Positions are ordered like commits: a transaction whose commit record lies
/// before another's committed first. A lossless source (the logical-replication
/// source) stamps every event with the commit's position, which is what lets a
/// request wait until the cache reflects its own write (read-your-writes) and
/// lets a restarted consumer resume where it stopped.
///
/// ```
/// use pgcachewatch::Lsn;
/// let lsn: Lsn = "16/B374D848".parse()?;
/// assert_eq!(lsn.as_u64(), 0x16_B374_D848);
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// assert!(lsn < "17/0".parse::<Lsn>()?);
/// # Ok::<_, pgcachewatch::ParseLsnError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which PostgreSQL uses for "none".
    pub const ZERO: Lsn = Lsn(0);

    /// The position as one 64-bit number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A string that is not a `pg_lsn` (`XXX/XXX`, hexadecimal halves of at most 8 digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WAL position (expected two hexadecimal halves like 16/B374D848): {0:?}")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Parsed from the input's text, never copied into a `String` first
        // (`Cow<str>`'s own impl always copies): one per relay message.
        struct LsnVisitor;
        impl serde::de::Visitor<'_> for LsnVisitor {
            type Value = Lsn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a position such as \"16/B374D848\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Lsn, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(LsnVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_from_json_text_and_refuses_other_values() {
        let lsn: Lsn = serde_json::from_str(r#""16/B374D848""#).unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        let escaped: Lsn = serde_json::from_str(r#""16\/B374D848""#).unwrap();
        assert_eq!(escaped, lsn);
        for bad in [r#""16-B374D848""#, "16", "null", r#"["0/1"]"#] {
            let err = serde_json::from_str::<Lsn>(bad).unwrap_err().to_string();
            assert!(!err.is_empty(), "{bad}");
        }
        let err = serde_json::from_str::<Lsn>("7").unwrap_err().to_string();
        assert!(err.contains("a position such as"), "{err}");
    }

    #[test]
    fn round_trips_and_rejects_junk() {
        for s in ["0/0", "0/1", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1/2/3",
            "x/1",
            "123456789/0",
            "+1/0",
            " 1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
        let json = serde_json::to_string(&Lsn(0x1_0000_0002)).unwrap();
        assert_eq!(json, "\"1/2\"");
        assert_eq!(
            serde_json::from_str::<Lsn>(&json).unwrap(),
            Lsn(0x1_0000_0002)
        );
    }
}
