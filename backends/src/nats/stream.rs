//! [`StreamSettings`]: the JetStream stream the relay publishes into.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::error::NatsError;
use super::subject;

/// The default stream name.
pub const DEFAULT_STREAM: &str = "PGCACHEWATCH";
/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "pgcachewatch";
/// The default maximum age of a message in the stream.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// The default maximum size of the stream.
pub const DEFAULT_MAX_BYTES: i64 = 1 << 30;
/// The default number of copies of the stream in a NATS cluster.
pub const DEFAULT_REPLICAS: usize = 1;
/// The most copies JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// The stream's name, subjects and limits.
///
/// The stream holds `<prefix>.>`. A consumer that was away for longer than
/// the limits keep messages gets a `Gap` when it comes back; nothing is lost
/// silently.
///
/// ```
/// use std::time::Duration;
/// use pgcachewatch::nats::StreamSettings;
/// let s = StreamSettings::new().max_age(Duration::from_secs(3600)).max_bytes(64 << 20);
/// assert_eq!(s.name(), "PGCACHEWATCH");
/// assert_eq!(s.prefix(), "pgcachewatch");
/// ```
#[derive(Debug, Clone)]
pub struct StreamSettings {
    name: String,
    prefix: String,
    max_age: Duration,
    max_bytes: i64,
    max_messages: i64,
    duplicate_window: Duration,
    memory: bool,
    /// Asked for explicitly; `None`: [`DEFAULT_REPLICAS`] for a stream the
    /// relay creates, and an existing stream keeps its own count.
    replicas: Option<usize>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamSettings {
    /// [`DEFAULT_STREAM`] on [`DEFAULT_PREFIX`], 24 h, 1 GiB, file storage.
    pub fn new() -> Self {
        StreamSettings {
            name: DEFAULT_STREAM.to_owned(),
            prefix: DEFAULT_PREFIX.to_owned(),
            max_age: DEFAULT_MAX_AGE,
            max_bytes: DEFAULT_MAX_BYTES,
            max_messages: -1,
            duplicate_window: Duration::from_secs(120),
            memory: false,
            replicas: None,
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Sets the stream name (builder style).
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the subject prefix (builder style): events go to `<prefix>.<schema>.<table>`.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Messages older than this are discarded.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The stream keeps at most this many bytes.
    pub fn max_bytes(mut self, bytes: i64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The stream keeps at most this many messages (`-1`: no limit, the default).
    pub fn max_messages(mut self, n: i64) -> Self {
        self.max_messages = n;
        self
    }

    /// How long JetStream remembers message ids to drop republished duplicates
    /// (default 2 min): the longest a restarted relay may take to republish.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Keeps the stream in memory instead of on disk (tests, benchmarks).
    pub fn memory(mut self, yes: bool) -> Self {
        self.memory = yes;
        self
    }

    /// How many servers of a NATS cluster keep a copy of the stream (default
    /// [`DEFAULT_REPLICAS`], 1; at most [`MAX_REPLICAS`], 5, and no more than
    /// the cluster has servers). With 3, the stream survives the loss of one
    /// server, and its events are acknowledged once a majority stored them.
    /// A single server takes only 1. The relay sets it when it creates the
    /// stream and updates an existing stream to it. Not set, a stream the
    /// relay creates has 1, and an existing stream keeps its own count (a
    /// relay started without it never reduces a replicated stream to one
    /// copy).
    ///
    /// ```
    /// use pgcachewatch_backends::nats::StreamSettings;
    /// let s = StreamSettings::new().replicas(3);
    /// assert_eq!(s.replica_count(), 3);
    /// assert_eq!(StreamSettings::new().replica_count(), 1);
    /// ```
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = Some(n);
        self
    }

    /// The number of copies a stream the relay creates gets
    /// ([`replicas`](Self::replicas), else [`DEFAULT_REPLICAS`]).
    pub fn replica_count(&self) -> usize {
        self.replicas.unwrap_or(DEFAULT_REPLICAS)
    }

    pub(crate) fn check(&self) -> Result<(), NatsError> {
        subject::check_prefix(&self.prefix).map_err(NatsError::Config)?;
        if self.name.is_empty() || self.name.contains(['.', '*', '>', ' ', '\t', '/', '\\']) {
            return Err(NatsError::Config(format!(
                "stream name {:?} must be non-empty without `.`, `*`, `>`, `/`, `\\` or whitespace",
                self.name
            )));
        }
        if !(1..=MAX_REPLICAS).contains(&self.replica_count()) {
            return Err(NatsError::Config(format!(
                "{} stream replicas: give 1 to {MAX_REPLICAS} (1 for a single server, 3 for a \
                 cluster of three)",
                self.replica_count()
            )));
        }
        Ok(())
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            duplicate_window: self.duplicate_window,
            storage: if self.memory {
                stream::StorageType::Memory
            } else {
                stream::StorageType::File
            },
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replica_count(),
            ..Default::default()
        }
    }

    /// Creates the stream, or checks an existing one (it must capture
    /// `<prefix>.>`) and updates its limits to these.
    ///
    /// # Errors
    ///
    /// [`NatsError::StreamMismatch`] if the stream exists with other subjects;
    /// [`NatsError::JetStream`] if JetStream refuses.
    pub async fn ensure(&self, js: &jetstream::Context) -> Result<stream::Stream, NatsError> {
        self.check()?;
        let wanted = self.config();
        match js.get_stream(&self.name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| NatsError::js("stream info", e))?;
                let have = &info.config;
                if !have.subjects.contains(&wanted.subjects[0]) {
                    return Err(NatsError::StreamMismatch {
                        stream: self.name.clone(),
                        detail: format!(
                            "it holds subjects {:?}, not {:?}: pick another stream name or prefix",
                            have.subjects, wanted.subjects[0]
                        ),
                    });
                }
                if have.deny_delete {
                    tracing::warn!(
                        stream = %self.name,
                        "the stream denies deleting messages: the relay cannot delete its \
                         superseded heartbeats and progress records, which then take room \
                         from events under the stream's limits"
                    );
                }
                let limits_differ = have.max_age != wanted.max_age
                    || have.max_bytes != wanted.max_bytes
                    || have.max_messages != wanted.max_messages
                    || have.duplicate_window != wanted.duplicate_window
                    || self.replicas.is_some_and(|n| have.num_replicas.max(1) != n);
                if limits_differ {
                    let mut update = have.clone();
                    update.max_age = wanted.max_age;
                    update.max_bytes = wanted.max_bytes;
                    update.max_messages = wanted.max_messages;
                    update.duplicate_window = wanted.duplicate_window;
                    if let Some(n) = self.replicas {
                        update.num_replicas = n;
                    }
                    tracing::info!(stream = %self.name, replicas = update.num_replicas, "updating the stream's limits");
                    js.update_stream(update)
                        .await
                        .map_err(|e| NatsError::js("stream update", e))?;
                }
                Ok(existing)
            }
            Err(_) => js
                .get_or_create_stream(wanted)
                .await
                .map_err(|e| NatsError::js("stream create", e)),
        }
    }

    /// The stream, which must exist (consumers never create it).
    pub(crate) async fn open(&self, js: &jetstream::Context) -> Result<stream::Stream, NatsError> {
        self.check()?;
        js.get_stream(&self.name).await.map_err(|e| {
            if is_not_found(&e) {
                NatsError::StreamNotFound {
                    stream: self.name.clone(),
                }
            } else {
                NatsError::js("stream lookup", e)
            }
        })
    }
}

/// Whether JetStream said the stream does not exist.
pub(crate) fn is_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}
