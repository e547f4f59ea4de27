//! [`Name`]: the channel, schema and table names an [`Event`](crate::Event)
//! carries, shared rather than copied.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A channel, schema or table name: an immutable string that is cheap to clone.
///
/// Every event names its channel and table, and a burst of events names the
/// same few again and again. Sources give the events of one table one shared
/// `Name` (a reference count, no copy of the text), so an event costs no
/// allocation for its names.
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
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    /// A name with the text of `text`.
    pub fn new(text: &str) -> Self {
        Name(Arc::from(text))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
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
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
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
        Name(Arc::from(text))
    }
}

impl From<Box<str>> for Name {
    fn from(text: Box<str>) -> Self {
        Name(Arc::from(text))
    }
}

impl From<Arc<str>> for Name {
    fn from(text: Arc<str>) -> Self {
        Name(text)
    }
}

impl From<&Name> for Name {
    fn from(name: &Name) -> Self {
        name.clone()
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0.as_ref().to_owned()
    }
}

impl From<Name> for Arc<str> {
    fn from(name: Name) -> Self {
        name.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Name::from)
    }
}

/// Hands out one shared [`Name`] per distinct text among the last few seen, so
/// that the events of a burst share their names. Bounded: it remembers at most
/// [`Names::CAPACITY`] names, replacing the oldest.
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
        let name = Name::new(text);
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
        assert_eq!(String::from(n), "users");
    }

    #[test]
    fn names_share_the_text_of_recent_names_and_stay_bounded() {
        let mut names = Names::default();
        let a = names.get("orders");
        let b = names.get("orders");
        assert!(Arc::ptr_eq(&a.0, &b.0), "the same text is shared");
        for i in 0..Names::CAPACITY * 3 {
            let n = names.get(&format!("t{i}"));
            assert_eq!(n, format!("t{i}"));
        }
        assert_eq!(names.recent.len(), Names::CAPACITY);
        // Pushed out by newer names, then made afresh with the same text.
        let again = names.get("orders");
        assert!(again == "orders" && !Arc::ptr_eq(&a.0, &again.0));
    }
}
