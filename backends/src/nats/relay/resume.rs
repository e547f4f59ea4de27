//! Where a relay over a lossless upstream starts: its epoch continued, or a new
//! one, decided from what the stream holds of that upstream.
// Only a relay over a replication slot continues an epoch; without the
// `replication` feature (nats alone) the deciding half is unused.
#![cfg_attr(not(feature = "replication"), allow(dead_code))]

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use pgcachewatch_core::{GapReason, Lsn};

use crate::nats::subject;
use crate::nats::wire::{WireKind, WireMessage};

/// Where a restarted relay over a lossless upstream goes on: the epoch of the
/// upstream's last progress record in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resume {
    pub(crate) epoch: String,
}

/// How the relay's task begins.
#[derive(Debug, Clone)]
pub(crate) enum Begin {
    /// A new epoch, its gap marker first (with this reason). Over a durable
    /// upstream, `covered` is where the upstream resumes: the marker covers
    /// every change before it, and a `progress` message right after the marker
    /// says so (a later relay finds the epoch's position even if nothing else
    /// was published in it).
    New {
        reason: GapReason,
        covered: Option<Lsn>,
    },
    /// The stream's epoch for this upstream, continued: nothing was lost.
    Continue(Resume),
}

/// The last progress record the stream holds from a relay over one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// Its epoch.
    pub(crate) resume: Resume,
    /// Up to where it says everything is stored. A relay publishes a record
    /// only once every event up to it was acknowledged, and confirms a
    /// position upstream only once a record of it is stored. An event's
    /// position would not do: an event before it may have failed and never
    /// been stored.
    pub(crate) position: Option<Lsn>,
}

/// Whether `epoch` is one of `origin`'s (`<origin>/<random>`).
pub(crate) fn of_origin(epoch: &str, origin: &str) -> bool {
    epoch
        .strip_prefix(origin)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// How a relay over `origin` begins, given what the stream holds from it
/// (`found`), whether the slot resumed, and the slot's confirmed position when
/// the source opened it.
///
/// The epoch continues only if the stream holds everything the slot will not
/// replay: its last record for this upstream is at or beyond the slot's
/// position. A slot further along was consumed by someone else, or advanced,
/// or recreated, while no relay watched: the changes in between were never
/// published, so a new epoch (a gap for every consumer).
pub(crate) fn decide(origin: &str, resumed: bool, slot: Lsn, found: Option<Found>) -> Begin {
    let covered = (slot > Lsn::ZERO).then_some(slot);
    let new = |detail: String| {
        tracing::info!(%origin, %slot, %detail, "relay starts a new epoch");
        Begin::New {
            reason: GapReason::Injected {
                detail: detail.into(),
            },
            covered,
        }
    };
    if !resumed {
        return new("relay started on a new replication slot".to_owned());
    }
    match found {
        None => new("relay started; the stream holds nothing of this slot".to_owned()),
        Some(Found { position: None, .. }) => {
            new("relay started; the stream holds no position of this slot's last epoch".to_owned())
        }
        Some(Found {
            position: Some(position),
            ..
        }) if position < slot => new(format!(
            "relay started; the slot is at {slot}, beyond the stream's last record from it \
             ({position}): the changes in between are gone"
        )),
        Some(Found { resume, .. }) => Begin::Continue(resume),
    }
}

/// The last progress record of the relay over `origin` in `stream`: the
/// latest message on its progress subject (each record replaces the one
/// before, so it is the only one). `None` when there is none, it is not of
/// one of `origin`'s epochs, or the stream cannot be read (then a new epoch
/// starts: never wrong, only costly).
pub(crate) async fn find_last(stream: &Stream, prefix: &str, origin: &str) -> Option<Found> {
    let raw = match stream
        .get_last_raw_message_by_subject(&subject::progress_subject(prefix, origin))
        .await
    {
        Ok(raw) => raw,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the relay's last progress record: starting a new epoch");
            return None;
        }
    };
    let msg = WireMessage::from_json(&raw.payload).ok()?;
    found_in(&msg, origin)
}

/// What a progress record of `origin` says (`None` if `msg` is not one).
pub(crate) fn found_in(msg: &WireMessage, origin: &str) -> Option<Found> {
    match msg.kind {
        WireKind::Progress(lsn) if of_origin(&msg.epoch, origin) => Some(Found {
            resume: Resume {
                epoch: msg.epoch.to_string(),
            },
            position: Some(lsn),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(position: Option<u64>) -> Option<Found> {
        Some(Found {
            resume: Resume {
                epoch: "slot:s/1".into(),
            },
            position: position.map(Lsn),
        })
    }

    #[test]
    fn continues_only_when_the_stream_holds_what_the_slot_will_not_replay() {
        let cont = |b: &Begin| matches!(b, Begin::Continue(r) if r.epoch == "slot:s/1");
        assert!(cont(&decide("slot:s", true, Lsn(100), found(Some(100)))));
        assert!(cont(&decide("slot:s", true, Lsn(100), found(Some(150)))));
        assert!(!cont(&decide("slot:s", true, Lsn(100), found(Some(99)))));
        assert!(!cont(&decide("slot:s", true, Lsn(100), found(None))));
        assert!(!cont(&decide("slot:s", true, Lsn(100), None)));
        assert!(!cont(&decide("slot:s", false, Lsn(100), found(Some(150)))));
    }

    #[test]
    fn an_origin_owns_its_epochs_only() {
        assert!(of_origin("slot:s/00ff", "slot:s"));
        assert!(!of_origin("slot:s2/00ff", "slot:s"));
        assert!(!of_origin("slot:s", "slot:s"));
    }
}
