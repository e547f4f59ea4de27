//! The seam between the source and the replication-protocol client.
//!
//! Everything that touches `pgwire-replication` is in this file: opening a
//! session (connect, authenticate, check the slot and publication, create the
//! slot, IDENTIFY_SYSTEM, START_REPLICATION), receiving [`Wire`] items, and
//! confirming positions. Swapping the client (or writing the protocol on tokio
//! directly) means rewriting this file only: the task sees [`Session`],
//! [`Wire`] and [`OpenError`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgcachewatch_core::{Error, Lsn};
use pgwire_replication::{
    Lsn as WireLsn, PgWireError, Publication, ReplicationClient, ReplicationConfig,
    ReplicationEvent,
};

use super::config::Settings;
use super::pgoutput::{Begin, Commit};

/// One item of the replication stream.
#[derive(Debug)]
pub(crate) enum Wire {
    /// pgoutput `Begin` (the client decodes it itself).
    Begin(Begin),
    /// pgoutput `Commit` (likewise).
    Commit(Commit),
    /// Any other pgoutput message, raw.
    Data(Bytes),
    /// A server keepalive: everything before `wal_end` has been sent.
    KeepAlive { wal_end: Lsn },
}

/// What happened to the slot while opening the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotOutcome {
    /// It existed and was usable.
    Existing,
    /// It did not exist (or was temporary) and was created.
    Created,
    /// It was invalidated (`wal_status = 'lost'`) and was recreated.
    Recreated { detail: String },
    /// It existed, but its confirmed position is beyond everything this
    /// source applied: another consumer advanced it
    /// (`pg_replication_slot_advance`, a second source on the same slot), or it
    /// was dropped and created anew under the same name. The changes in between
    /// are gone.
    Advanced {
        /// What this source had applied.
        applied: Lsn,
        /// Where the slot was.
        slot: Lsn,
    },
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum OpenError {
    /// Connecting, authenticating or a query failed.
    #[error(
        "replication connection to {target} failed: {source}{hint}; check the database URL, \
         that the role may replicate (ALTER ROLE … REPLICATION, or superuser) and that \
         pg_hba.conf allows it"
    )]
    Connect {
        target: String,
        source: PgWireError,
        hint: &'static str,
    },
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is {level:?} on {target}, logical replication needs 'logical': run \
         ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
    )]
    WalLevel { target: String, level: String },
    /// The slot does not exist and may not be created.
    #[error(
        "replication slot {slot:?} does not exist on {target}; create it with \
         `pgcachewatch replication setup --slot {slot} …  --commit`, or let the source \
         create it with .create_slot_if_missing(true)"
    )]
    SlotMissing { target: String, slot: String },
    /// The slot was invalidated and may not be recreated.
    #[error(
        "replication slot {slot:?} on {target} is lost (wal_status = 'lost'): the server \
         removed WAL it still needed (see max_slot_wal_keep_size), so changes were lost; \
         drop and recreate it (`pgcachewatch replication teardown` then `setup`), or let \
         the source do it with .create_slot_if_missing(true)"
    )]
    SlotLost { target: String, slot: String },
    /// The slot belongs to another plugin or database.
    #[error(
        "replication slot {slot:?} on {target} uses plugin {plugin:?} in database \
         {database:?}; this source needs a pgoutput slot in {want:?}: pick another .slot(..)"
    )]
    SlotMismatch {
        target: String,
        slot: String,
        plugin: String,
        database: String,
        want: String,
    },
    /// Another session streams from the slot.
    #[error("replication slot {slot:?} on {target} is in use by backend {pid}")]
    SlotInUse {
        target: String,
        slot: String,
        pid: String,
    },
    /// The publication does not exist.
    #[error(
        "publication {publication:?} does not exist on {target}; create it with \
         `pgcachewatch replication setup --publication {publication} TABLE… --commit`"
    )]
    PublicationMissing { target: String, publication: String },
    /// Opening took longer than the connect timeout.
    #[error("opening the replication session to {target} timed out after {timeout:?}")]
    Timeout { target: String, timeout: Duration },
}

impl OpenError {
    /// Whether retrying may help (at reconnect the source retries anyway).
    pub(crate) fn is_temporary(&self) -> bool {
        match self {
            OpenError::Connect { source, .. } => {
                let text = source.to_string();
                // SQLSTATE class 28: invalid authorization; 3D: no such database;
                // 42: access rule violation. Other server errors may pass.
                let permanent = ["(SQLSTATE 28", "(SQLSTATE 3D", "(SQLSTATE 42"]
                    .iter()
                    .any(|c| text.contains(c));
                source.is_transient() || (source.is_server() && !permanent)
            }
            OpenError::SlotInUse { .. } | OpenError::Timeout { .. } => true,
            _ => false,
        }
    }

    /// Whether the slot's position is gone (dropped or invalidated).
    pub(crate) fn is_slot_gone(&self) -> bool {
        matches!(
            self,
            OpenError::SlotMissing { .. } | OpenError::SlotLost { .. }
        )
    }
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        match e {
            e @ (OpenError::WalLevel { .. }
            | OpenError::SlotMissing { .. }
            | OpenError::SlotLost { .. }
            | OpenError::SlotMismatch { .. }
            | OpenError::PublicationMissing { .. }) => Error::Config(e.to_string()),
            other => Error::Connection {
                temporary: other.is_temporary(),
                source: Box::new(other),
            },
        }
    }
}

/// A started replication session.
pub(crate) struct Session {
    client: ReplicationClient,
    /// The server's WAL flush position when the session opened.
    pub(crate) xlogpos: Lsn,
    /// Where streaming resumes: everything committed before it was confirmed.
    pub(crate) start: Lsn,
    pub(crate) backend_pid: Option<u32>,
    pub(crate) slot: SlotOutcome,
    /// The slot's `confirmed_flush_lsn` when the session opened (0/0 for a new slot).
    pub(crate) slot_confirmed: Lsn,
    /// The cluster's system identifier (IDENTIFY_SYSTEM), as decimal text.
    pub(crate) system_id: String,
}

impl Session {
    /// The next item; `Ok(None)` when the stream ended cleanly.
    pub(crate) async fn recv(&mut self) -> Result<Option<Wire>, Arc<str>> {
        loop {
            let event = self
                .client
                .recv()
                .await
                .map_err(|e| Arc::from(e.to_string()))?;
            let wire = match event {
                None | Some(ReplicationEvent::StoppedAt { .. }) => return Ok(None),
                Some(ReplicationEvent::KeepAlive { wal_end, .. }) => Wire::KeepAlive {
                    wal_end: lsn(wal_end),
                },
                Some(ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                }) => Wire::Begin(Begin {
                    final_lsn: lsn(final_lsn),
                    commit_time: commit_time_micros,
                    xid,
                }),
                Some(ReplicationEvent::Commit {
                    lsn: commit_lsn,
                    end_lsn,
                    commit_time_micros,
                }) => Wire::Commit(Commit {
                    flags: 0,
                    commit_lsn: lsn(commit_lsn),
                    end_lsn: lsn(end_lsn),
                    commit_time: commit_time_micros,
                }),
                Some(ReplicationEvent::XLogData { data, .. }) => Wire::Data(data),
                // Logical decoding messages (pg_logical_emit_message): not changes.
                Some(ReplicationEvent::Message { .. }) => continue,
            };
            return Ok(Some(wire));
        }
    }

    /// Reports `lsn` as flushed and applied; sent within the status interval.
    pub(crate) fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(WireLsn::from_u64(lsn.0));
    }

    /// Ends the stream (CopyDone), waiting at most `timeout`.
    pub(crate) async fn close(mut self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.client.shutdown())
            .await
            .is_err()
        {
            self.client.abort();
        }
    }
}

fn lsn(l: WireLsn) -> Lsn {
    Lsn(l.as_u64())
}

/// What a source knows of its own position when it (re)opens a session.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Known {
    /// The position it confirmed last (`None` at the first connect: the slot's).
    pub(crate) confirmed: Option<Lsn>,
    /// Everything before it was applied (`None` at the first connect: nothing
    /// is known, so the slot's position cannot be checked).
    pub(crate) applied: Option<Lsn>,
}

/// Opens a session within the connect timeout.
pub(crate) async fn open(settings: &Settings, known: Known) -> Result<Session, OpenError> {
    let timeout = settings.builder.connect_timeout;
    match tokio::time::timeout(timeout, open_unbounded(settings, known)).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::Timeout {
            target: settings.describe_target(),
            timeout,
        }),
    }
}

/// `'text'` as an SQL literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn open_unbounded(settings: &Settings, known: Known) -> Result<Session, OpenError> {
    let resume = known.confirmed;
    let b = &settings.builder;
    let target = settings.describe_target();
    let connect_err = |source: PgWireError| {
        let text = source.to_string();
        let hint = if source.is_tls() {
            " (TLS: check sslmode and sslrootcert in the URL — with verify-ca or \
             verify-full the root certificate must have signed the server's)"
        } else if text.contains("all replication slots are in use") {
            " (raise max_replication_slots, or drop an abandoned slot: `pgcachewatch \
             replication status` lists them)"
        } else if text.contains("number of requested standby connections")
            || text.contains("max_wal_senders")
        {
            " (raise max_wal_senders)"
        } else {
            ""
        };
        OpenError::Connect {
            target: target.clone(),
            source,
            hint,
        }
    };
    // The publication name goes double-quoted into publication_names, so its
    // case survives (the client only escapes single quotes).
    let quoted_publication = format!("\"{}\"", b.publication.replace('"', "\"\""));
    let mut config = ReplicationConfig::new(
        settings.host.clone(),
        settings.user.clone(),
        settings.password.clone(),
        settings.database.clone(),
        b.slot.clone(),
        Publication::from(quoted_publication),
    )
    .with_port(settings.port)
    .with_tls(settings.tls.clone())
    .with_status_interval(b.status_interval)
    .with_wakeup_interval(b.status_interval)
    .with_buffer_size(1024)
    .with_application_name(settings.application_name.clone())
    // Key values arrive as text: fix the forms `to_jsonb` is matched against.
    .with_options("-c datestyle=ISO,MDY -c timezone=UTC -c extra_float_digits=1");
    // Start where the slot is (0/0); report `resume` until told more.
    config.start_lsn = WireLsn::ZERO;
    config.ack_lsn = resume.map(|l| WireLsn::from_u64(l.0));
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(connect_err)?;

    let rows = client
        .simple_query(
            "SELECT current_setting('wal_level'), current_database(), pg_backend_pid()::text",
        )
        .await
        .map_err(connect_err)?;
    let row = rows.first().cloned().unwrap_or_default();
    let text = |i: usize| -> String {
        row.get(i)
            .and_then(|c| c.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let (wal_level, database, backend_pid) = (text(0), text(1), text(2).parse::<u32>().ok());
    if wal_level != "logical" {
        return Err(OpenError::WalLevel {
            target,
            level: wal_level,
        });
    }
    let found: Vec<_> = client
        .simple_query(&format!(
            "SELECT 1 FROM pg_publication WHERE pubname = {}",
            literal(&b.publication)
        ))
        .await
        .map_err(connect_err)?;
    if found.is_empty() {
        return Err(OpenError::PublicationMissing {
            target,
            publication: b.publication.clone(),
        });
    }

    let slot = slot_state(&mut client, &b.slot)
        .await
        .map_err(connect_err)?;
    let outcome = match slot {
        Some(s) if s.plugin != "pgoutput" || s.database != database => {
            return Err(OpenError::SlotMismatch {
                target,
                slot: b.slot.clone(),
                plugin: s.plugin,
                database: s.database,
                want: database,
            })
        }
        Some(s) if s.wal_status == "lost" => {
            if !b.create_slot_if_missing {
                return Err(OpenError::SlotLost {
                    target,
                    slot: b.slot.clone(),
                });
            }
            tracing::error!(
                slot = %b.slot,
                "replication slot is lost (wal_status = 'lost'): the server removed WAL it \
                 still needed; recreating it, and emitting a gap"
            );
            client
                .simple_query(&format!("DROP_REPLICATION_SLOT {}", b.slot))
                .await
                .map_err(connect_err)?;
            create_slot(&mut client, &b.slot, b.temporary_slot)
                .await
                .map_err(connect_err)?;
            SlotOutcome::Recreated {
                detail: format!("slot {} was invalidated (wal_status = 'lost')", b.slot),
            }
        }
        Some(s) if !s.active_pid.is_empty() => {
            return Err(OpenError::SlotInUse {
                target,
                slot: b.slot.clone(),
                pid: s.active_pid,
            })
        }
        Some(_) => SlotOutcome::Existing,
        None if b.create_slot_if_missing || b.temporary_slot => {
            create_slot(&mut client, &b.slot, b.temporary_slot)
                .await
                .map_err(connect_err)?;
            SlotOutcome::Created
        }
        None => {
            return Err(OpenError::SlotMissing {
                target,
                slot: b.slot.clone(),
            })
        }
    };
    let confirmed_flush = slot_state(&mut client, &b.slot)
        .await
        .map_err(connect_err)?
        .and_then(|s| s.confirmed_flush.parse::<Lsn>().ok())
        .unwrap_or(Lsn::ZERO);
    // Only this source knows what it applied: a slot that is further along
    // than that was consumed (or replaced) by someone else meanwhile.
    let outcome = match (outcome, known.applied) {
        (SlotOutcome::Existing, Some(applied)) if confirmed_flush > applied => {
            tracing::error!(
                slot = %b.slot,
                %applied,
                slot_position = %confirmed_flush,
                "the replication slot is beyond what this source applied: another consumer \
                 advanced it, or it was dropped and created anew; emitting a gap"
            );
            SlotOutcome::Advanced {
                applied,
                slot: confirmed_flush,
            }
        }
        (outcome, _) => outcome,
    };
    // Never report less than the slot already has.
    let start = confirmed_flush.max(resume.unwrap_or(Lsn::ZERO));
    client.update_applied_lsn(WireLsn::from_u64(start.0));

    let system = client.identify_system().await.map_err(connect_err)?;
    client.start().await.map_err(connect_err)?;
    client.wait_started().await.map_err(connect_err)?;
    Ok(Session {
        client,
        xlogpos: lsn(system.xlogpos),
        start,
        backend_pid,
        slot: outcome,
        slot_confirmed: confirmed_flush,
        system_id: system.system_id,
    })
}

/// A row of `pg_replication_slots`, as text.
struct SlotState {
    plugin: String,
    database: String,
    wal_status: String,
    confirmed_flush: String,
    active_pid: String,
}

async fn slot_state(
    client: &mut ReplicationClient,
    slot: &str,
) -> Result<Option<SlotState>, PgWireError> {
    let rows = client
        .simple_query(&format!(
            "SELECT coalesce(plugin, ''), coalesce(database::text, ''), \
             coalesce(wal_status, ''), coalesce(confirmed_flush_lsn::text, ''), \
             coalesce(active_pid::text, '') \
             FROM pg_replication_slots WHERE slot_name = {}",
            literal(slot)
        ))
        .await?;
    Ok(rows.into_iter().next().map(|row| {
        let text = |i: usize| -> String {
            row.get(i)
                .and_then(|c| c.as_ref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        SlotState {
            plugin: text(0),
            database: text(1),
            wal_status: text(2),
            confirmed_flush: text(3),
            active_pid: text(4),
        }
    }))
}

async fn create_slot(
    client: &mut ReplicationClient,
    slot: &str,
    temporary: bool,
) -> Result<(), PgWireError> {
    let temporary = if temporary { " TEMPORARY" } else { "" };
    tracing::info!(
        slot,
        temporary = !temporary.is_empty(),
        "creating replication slot (pgoutput)"
    );
    client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot}{temporary} LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        ))
        .await?;
    Ok(())
}
