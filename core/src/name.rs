//! [`Name`]: the channel, schema and table names an [`Event`](crate::Event)
//! carries, shared rather than copied.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use parking_lot::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A channel, schema or table name: an immutable string that is cheap to clone.
///
/// Every event names its channel and table, and a burst of events names the
/// same few again and again. The names a source parses out of payloads are
/// interned for the life of the process (up to 1 MiB of text in all, then
/// shared by reference count): cloning or dropping one is a copy of two
/// words, with no allocation and no atomic operation. A `Name` made any other
/// way shares its text by reference count.
///
/// A `Name` reads like a `&str`: it dereferences to `str`, compares with
/// `&str`, `str` and `String` either way round, hashes like its text, prints as
/// its text and serializes as a JSON string.
///
/// ```
/// use pgcachewatch::{Event, Name, Operation};
/// let e = Event::new("pgcachewatch", Operation::Update, "public", "users");
/// assert_eq!(e.table, "users");
/// assert!(e.table.starts_with("us"));
/// let owned: String = e.table.to_string();
/// let shared: Name = e.table.clone(); // no copy of the text
/// assert_eq!(shared.as_str(), owned);
/// assert_eq!(Name::from("users"), e.table);
/// ```
#[derive(Clone)]
pub struct Name(Text);

/// Where a name's text lives.
#[derive(Clone)]
enum Text {
    /// Interned: lives as long as the process.
    Interned(&'static str),
    Shared(Arc<str>),
}

impl Name {
    /// A name with the text of `text`.
    pub fn new(text: &str) -> Self {
        Name(Text::Shared(Arc::from(text)))
    }

    /// The name as a string slice.
    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Text::Interned(text) => text,
            Text::Shared(text) => text,
        }
    }

    /// The name with the text `text`, from this thread's recent names (see
    /// [`Names`]): what deserializing a name gives.
    pub(crate) fn recent(text: &str) -> Self {
        thread_local! {
            static RECENT: std::cell::RefCell<Names> = std::cell::RefCell::new(Names::default());
        }
        RECENT
            .try_with(|recent| recent.try_borrow_mut().map(|mut r| r.get(text)).ok())
            .ok()
            .flatten()
            .unwrap_or_else(|| Name::new(text))
    }

    #[cfg(test)]
    fn is_interned(&self) -> bool {
        matches!(self.0, Text::Interned(_))
    }

    /// The interned name with the text `text`: one copy of it for the process,
    /// while the interned names hold less than [`INTERNED_BYTES`] of text; a
    /// shared one after that.
    pub(crate) fn interned(text: &str) -> Self {
        static INTERNED: Mutex<Interned> = Mutex::new(Interned {
            names: None,
            bytes: 0,
        });
        let mut interned = INTERNED.lock();
        let Interned { names, bytes } = &mut *interned;
        let names = names.get_or_insert_with(HashSet::new);
        if let Some(&known) = names.get(text) {
            return Name(Text::Interned(known));
        }
        if *bytes + text.len() > INTERNED_BYTES {
            return Name::new(text);
        }
        // Bounded by INTERNED_BYTES over the life of the process.
        let leaked: &'static str = Box::leak(Box::from(text));
        *bytes += leaked.len();
        names.insert(leaked);
        Name(Text::Interned(leaked))
    }
}

/// The most text the interned names hold, in bytes: names come from payloads,
/// and a stream of ever-new names must not grow the process without bound.
const INTERNED_BYTES: usize = 1 << 20;

/// The interned names and the bytes of text they hold.
struct Interned {
    names: Option<HashSet<&'static str>>,
    bytes: usize,
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Default for Name {
    fn default() -> Self {
        Name::new("")
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Self {
        Name::new(text)
    }
}

impl From<&String> for Name {
    fn from(text: &String) -> Self {
        Name::new(text)
    }
}

impl From<String> for Name {
    fn from(text: String) -> Self {
        Name(Text::Shared(Arc::from(text)))
    }
}

impl From<Box<str>> for Name {
    fn from(text: Box<str>) -> Self {
        Name(Text::Shared(Arc::from(text)))
    }
}

impl From<Arc<str>> for Name {
    fn from(text: Arc<str>) -> Self {
        Name(Text::Shared(text))
    }
}

impl From<&Name> for Name {
    fn from(name: &Name) -> Self {
        name.clone()
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.as_str().to_owned()
    }
}

impl From<Name> for Arc<str> {
    fn from(name: Name) -> Self {
        match name.0 {
            Text::Interned(text) => Arc::from(text),
            Text::Shared(text) => text,
        }
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A stream of payloads (a NATS subscription, an event log) names the
        // same few channels, tables and epochs again and again: each is looked
        // up among this thread's recent names, with no allocation, and copied
        // (interned) only the first time.
        struct NameVisitor;
        impl serde::de::Visitor<'_> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name (a string)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name, E> {
                Ok(Name::recent(v))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// Hands out the [`Name`]s of a stream of payloads: interned ones, remembered
/// here among the last few seen so that the process-wide table is seldom
/// asked. Bounded: it remembers at most [`Names::CAPACITY`] names, replacing
/// the oldest.
#[derive(Debug, Default)]
pub(crate) struct Names {
    recent: Vec<Name>,
    /// Where the next new name goes once `recent` is full.
    next: usize,
}

impl Names {
    /// Names remembered at most; a source sees a few channels and tables.
    pub(crate) const CAPACITY: usize = 32;

    /// The name with the text `text`: a remembered one, or a new one
    /// remembered from now on.
    pub(crate) fn get(&mut self, text: &str) -> Name {
        if let Some(found) = self.recent.iter().find(|n| n.as_str() == text) {
            return found.clone();
        }
        let name = Name::interned(text);
        if self.recent.len() < Self::CAPACITY {
            self.recent.push(name.clone());
        } else {
            self.recent[self.next] = name.clone();
            self.next = (self.next + 1) % Self::CAPACITY;
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_name_compares_hashes_and_serializes_as_its_text() {
        let n = Name::from("users");
        let (text, owned): (&str, String) = ("users", "users".into());
        assert_eq!(n, text);
        assert_eq!(text, n);
        assert_eq!(n, *text);
        assert_eq!(*text, n);
        assert_eq!(n, owned);
        assert_eq!(owned, n);
        assert_ne!(n, "user");
        let set: HashSet<Name> = [n.clone()].into_iter().collect();
        assert!(set.contains("users"));
        assert_eq!(format!("{n} {n:?}"), r#"users "users""#);
        assert_eq!(serde_json::to_string(&n).unwrap(), r#""users""#);
        assert_eq!(serde_json::from_str::<Name>(r#""users""#).unwrap(), n);
        // Escaped text (not borrowable from the input) reads the same.
        assert_eq!(serde_json::from_str::<Name>(r#""us\u0065rs""#).unwrap(), n);
        assert_eq!(String::from(n), "users");
    }

    #[test]
    fn names_share_the_text_of_recent_names_and_stay_bounded() {
        let mut names = Names::default();
        let a = names.get("orders");
        let b = names.get("orders");
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        for i in 0..Names::CAPACITY * 3 {
            let n = names.get(&format!("t{i}"));
            assert_eq!(n, format!("t{i}"));
        }
        assert_eq!(names.recent.len(), Names::CAPACITY);
        // `interning_stops_at_its_bound`, running beside this test in the same
        // process, may have filled the process's table first; then nothing
        // new is interned and the rest does not apply.
        if a.is_interned() {
            // Pushed out by newer names, then asked again: the same interned text.
            let again = names.get("orders");
            assert!(std::ptr::eq(a.as_str(), again.as_str()));
        }
    }

    #[test]
    fn deserialized_names_share_one_text() {
        let a: Name = serde_json::from_str(r#""deserialized_names_share""#).unwrap();
        let b: Name = serde_json::from_slice(br#""deserialized_names_share""#).unwrap();
        assert_eq!(a, "deserialized_names_share");
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
    }

    #[test]
    fn interning_stops_at_its_bound_and_names_stay_correct() {
        // Ever-new names (as a hostile payload stream could send) fill the
        // table up to its bound; after that, names are shared, not interned.
        let chunk = "x".repeat(1000);
        let made: Vec<Name> = (0..(INTERNED_BYTES / 1000 + 10))
            .map(|i| Name::interned(&format!("{chunk}{i}")))
            .collect();
        assert!(made.last().is_some_and(|n| !n.is_interned()));
        assert!(made
            .iter()
            .enumerate()
            .all(|(i, n)| *n == format!("{chunk}{i}")));
        let interned: usize = made
            .iter()
            .filter(|n| n.is_interned())
            .map(|n| n.len())
            .sum();
        assert!(interned <= INTERNED_BYTES);
    }
}
