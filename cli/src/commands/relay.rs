//! `relay`: publish a source's events to NATS JetStream (the logical-replication
//! source by default, lossless; or the LISTEN source), and/or serve the LISTEN
//! source's events over WebSocket to PGCacheWatch's `WSEventQueue` clients;
//! `relay status`.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use pgcachewatch::nats::report::RelayReport;
use pgcachewatch::nats::wire::WireKind;
use pgcachewatch::nats::{NatsAuth, NatsConnect, Relay, StreamSettings};
use pgcachewatch::postgres::DEFAULT_CHANNEL;
use pgcachewatch::replication::{PgReplicationSource, DEFAULT_PUBLICATION, DEFAULT_SLOT};
use pgcachewatch::websocket::{
    WsServer, WsServerHandle, DEFAULT_CLIENT_BUFFER, DEFAULT_MAX_CONNECTIONS,
};

use super::watch;
use crate::connect::Database;

/// `pgcachewatch relay [OPTIONS]` or `pgcachewatch relay status [OPTIONS]`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct RelayArgs {
    #[command(subcommand)]
    pub(crate) action: Option<RelayAction>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RelayAction {
    /// Show the relay's health and lag, read from its stream (last heartbeat,
    /// stream size, consumers). Exits non-zero if the relay is not healthy.
    Status {
        #[command(flatten)]
        nats: NatsArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where the relay's events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SourceKind {
    /// A logical-replication slot (`pgcachewatch replication setup` first):
    /// lossless; the slot is confirmed only up to what JetStream acknowledged,
    /// so a relay killed at any moment loses nothing and consumers keep their
    /// caches across its restarts.
    Replication,
    /// LISTEN/NOTIFY (`pgcachewatch install` first): every reconnect of the
    /// relay or of its connection is a gap for every consumer.
    Listen,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Where events come from [default: replication; listen with --ws-listen].
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// The replication slot (with --source replication).
    #[arg(long, default_value = DEFAULT_SLOT)]
    slot: String,
    /// The publication (with --source replication).
    #[arg(long, default_value = DEFAULT_PUBLICATION)]
    publication: String,
    /// Channel to listen on (with --source listen); repeat for several.
    #[arg(long = "channel", default_value = DEFAULT_CHANNEL, value_parser = crate::channel_name)]
    channels: Vec<String>,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    ws: WsArgs,
    /// Discard messages older than this (500ms, 10s, 2m, 1h).
    #[arg(long, default_value = "24h", value_parser = crate::duration::parse)]
    max_age: Duration,
    /// Keep at most this many bytes in the stream.
    #[arg(long, default_value_t = 1 << 30)]
    max_bytes: i64,
    /// Keep at most this many messages (-1: no limit).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    max_messages: i64,
    /// Servers of a NATS cluster that keep a copy of the stream (1 to 5): 3 in
    /// a cluster of three, so the stream survives the loss of one server. Set
    /// when the relay creates the stream (1 if not given); an existing stream
    /// is updated to it if given, and keeps its own count if not.
    #[arg(long, value_name = "N")]
    stream_replicas: Option<usize>,
    /// Time to wait for JetStream's acknowledgement of a publish before
    /// publishing it (and what follows) again; bounds the stall when a
    /// cluster node dies with publishes in flight.
    #[arg(long, default_value = "2s", value_parser = crate::duration::parse)]
    ack_timeout: Duration,
    /// Heartbeat interval.
    #[arg(long, default_value = "1s", value_parser = crate::duration::parse)]
    heartbeat: Duration,
    /// Print the relay's status this often.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    report_every: Duration,
}

/// The WebSocket endpoint for PGCacheWatch's `WSEventQueue` (a drop-in for its
/// `pg_event_distributor`).
#[derive(Debug, Args)]
pub(crate) struct WsArgs {
    /// Also serve the events over WebSocket at ws://ADDR/pgpubsub/{channel}, the
    /// protocol of PGCacheWatch's pg_event_distributor (its WSEventQueue connects
    /// unchanged). A non-loopback ADDR (0.0.0.0:8000) needs a token.
    #[arg(long, value_name = "ADDR")]
    ws_listen: Option<std::net::SocketAddr>,
    /// Bearer token clients must send (Authorization: Bearer TOKEN). Prefer
    /// PGCACHEWATCH_WS_TOKEN or --ws-token-env: arguments are visible to `ps`.
    #[arg(
        long,
        env = "PGCACHEWATCH_WS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    ws_token: Option<String>,
    /// Read the bearer token from the environment variable NAME.
    #[arg(long, value_name = "NAME", conflicts_with = "ws_token")]
    ws_token_env: Option<String>,
    /// Channel served at /pgpubsub/CHANNEL; repeat for several. Default: every
    /// --channel. Each must be one of the --channel values.
    #[arg(long = "ws-channel", value_name = "CHANNEL", value_parser = crate::channel_name)]
    ws_channels: Vec<String>,
    /// Messages a WebSocket client may fall behind the newest; a client further
    /// behind is disconnected (close code 1008, with the reason). A transaction
    /// of up to N changes passes every client that reads. One ring of N per
    /// channel with clients, shared by them (about 64 bytes a place).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CLIENT_BUFFER)]
    ws_client_buffer: usize,
    /// Most WebSocket connections open at once: clients, and connections whose
    /// request is still being read. More are refused at once with HTTP 503,
    /// counted in the report and logged; connected clients are not affected.
    /// Keep it below `ulimit -n`.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    ws_max_connections: usize,
    /// Time a WebSocket connection has to send its whole request and be
    /// upgraded (a deadline, not an idle timeout); a connection that takes
    /// longer (half a request, then silence) is closed and counted. Until then
    /// it holds one of --ws-max-connections.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::duration::parse)]
    ws_handshake_timeout: Duration,
    /// Serve WebSocket only: no NATS (needs --ws-listen).
    #[arg(long, requires = "ws_listen")]
    no_nats: bool,
}

impl WsArgs {
    fn token(&self) -> Result<Option<String>> {
        match (&self.ws_token, &self.ws_token_env) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(name)) => std::env::var(name)
                .map(Some)
                .with_context(|| format!("--ws-token-env {name}: the variable is not set")),
            (None, None) => Ok(None),
        }
    }

    /// Starts the WebSocket server if `--ws-listen` was given.
    async fn start(
        &self,
        channels: &[String],
        source: &pgcachewatch::postgres::PgListenerSource,
    ) -> Result<Option<(WsServerHandle, Vec<String>)>> {
        let Some(addr) = self.ws_listen else {
            return Ok(None);
        };
        let served = if self.ws_channels.is_empty() {
            channels.to_vec()
        } else {
            self.ws_channels.clone()
        };
        if let Some(c) = served.iter().find(|c| !channels.contains(c)) {
            anyhow::bail!("--ws-channel {c:?} is not listened to: add --channel {c:?}");
        }
        let mut b = WsServer::builder()
            .listen(addr)
            .channels(served.iter().cloned())
            .client_buffer(self.ws_client_buffer)
            .max_connections(self.ws_max_connections)
            .handshake_timeout(self.ws_handshake_timeout);
        if let Some(token) = self.token()? {
            b = b.token(token);
        }
        let server = b
            .start(source)
            .await
            .context("starting the WebSocket server")?;
        Ok(Some((server, served)))
    }
}

/// Where NATS is, which stream, and the credentials.
#[derive(Debug, Args)]
pub(crate) struct NatsArgs {
    /// NATS server URL(s): several servers of one cluster comma-separated
    /// (nats://a:4222,nats://b:4222); the client moves to another when one goes.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// JetStream stream name.
    #[arg(long, default_value = pgcachewatch::nats::DEFAULT_STREAM)]
    stream: String,
    /// Subject prefix: events go to PREFIX.<schema>.<table>.
    #[arg(long, default_value = pgcachewatch::nats::DEFAULT_PREFIX)]
    prefix: String,
    /// NATS user (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS `.creds` file.
    #[arg(long, env = "NATS_CREDS")]
    nats_creds: Option<std::path::PathBuf>,
    /// NATS nkey seed file.
    #[arg(long)]
    nats_nkey: Option<std::path::PathBuf>,
    /// CA certificate (PEM) to verify the NATS server with; implies TLS.
    #[arg(long)]
    nats_ca: Option<std::path::PathBuf>,
}

impl NatsArgs {
    fn connect(&self) -> Result<NatsConnect> {
        let auth = match (
            &self.nats_user,
            &self.nats_password,
            &self.nats_token,
            &self.nats_creds,
            &self.nats_nkey,
        ) {
            (None, None, None, None, None) => NatsAuth::None,
            (Some(user), Some(password), None, None, None) => NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(token), None, None) => NatsAuth::Token(token.clone()),
            (None, None, None, Some(creds), None) => NatsAuth::CredentialsFile(creds.clone()),
            (None, None, None, None, Some(seed)) => NatsAuth::NKey(
                std::fs::read_to_string(seed)
                    .with_context(|| format!("reading the nkey seed {}", seed.display()))?
                    .trim()
                    .to_owned(),
            ),
            _ => anyhow::bail!(
                "give one kind of NATS credential: --nats-user with --nats-password, --nats-token, --nats-creds or --nats-nkey"
            ),
        };
        let mut c = NatsConnect::new(&self.nats_url)
            .auth(auth)
            .name("pgcachewatch relay");
        if let Some(ca) = &self.nats_ca {
            c = c.root_certificate(ca).require_tls(true);
        }
        Ok(c)
    }

    fn stream(&self) -> StreamSettings {
        StreamSettings::new()
            .stream(&self.stream)
            .subject_prefix(&self.prefix)
    }
}

pub(crate) async fn relay(db: Database<'_>, args: RelayArgs) -> Result<()> {
    match args.action {
        Some(RelayAction::Status { nats, json }) => status(&nats, json).await,
        None => run(db, args.run).await,
    }
}

async fn run(db: Database<'_>, args: RunArgs) -> Result<()> {
    // WSEventQueue clients read NOTIFY channels: --ws-listen means the LISTEN source.
    let source_kind = match (args.source, args.ws.ws_listen.is_some()) {
        (None, false) => SourceKind::Replication,
        (None, true) | (Some(SourceKind::Listen), _) => SourceKind::Listen,
        (Some(SourceKind::Replication), true) => anyhow::bail!(
            "--ws-listen serves PGCacheWatch's WSEventQueue clients, whose events come from \
             NOTIFY channels: use it with --source listen (the replication source has no channels)"
        ),
        (Some(SourceKind::Replication), false) => SourceKind::Replication,
    };
    let mut stream = args
        .nats
        .stream()
        .max_age(args.max_age)
        .max_bytes(args.max_bytes)
        .max_messages(args.max_messages);
    if let Some(n) = args.stream_replicas {
        stream = stream.replicas(n);
    }
    let builder = Relay::builder(args.nats.connect()?)
        .stream(stream)
        .ack_timeout(args.ack_timeout)
        .heartbeat_interval(args.heartbeat);
    let (relay, ws, upstream) = match source_kind {
        SourceKind::Replication => {
            let target = db.target()?;
            // A plain connection first: its errors speak the command line's words.
            let probe = target.connect().await?;
            sqlx::Connection::close(probe).await.ok();
            let source = match db.url {
                Some(url) => PgReplicationSource::builder(url),
                None => PgReplicationSource::builder_with_options(target.options.clone()),
            };
            let start = source
                .slot(&args.slot)
                .publication(&args.publication)
                .connect_durable()
                .await
                .with_context(|| format!("starting replication from slot {:?}", args.slot))?;
            let resumed = start.resumed();
            let (relay, source) = builder.start_durable(start).await?;
            eprintln!(
                "relaying slot {:?} (publication {:?}, {}) at {} to stream {} (subjects {}.>) on {}; Ctrl-C to stop",
                args.slot,
                args.publication,
                if resumed { "resumed" } else { "new: consumers start with a gap" },
                target.describe(),
                args.nats.stream,
                args.nats.prefix,
                args.nats.nats_url
            );
            (Some(relay), None, Upstream::Replication(source))
        }
        SourceKind::Listen => {
            let (source, target) = watch::connect(db, args.channels.clone()).await?;
            // The WebSocket server first: a bad token or address fails before NATS is touched.
            let ws = args.ws.start(&args.channels, &source).await?;
            if let Some((server, served)) = &ws {
                let auth = if args.ws.ws_token.is_some() || args.ws.ws_token_env.is_some() {
                    "bearer token required"
                } else {
                    "no token"
                };
                eprintln!(
                    "serving {served:?} at ws://{}/pgpubsub/{{channel}} ({auth})",
                    server.local_addr()
                );
            }
            let relay = if args.ws.no_nats {
                None
            } else {
                let relay = builder.start(&source).await?;
                eprintln!(
                    "relaying {:?} at {} to stream {} (subjects {}.>) on {}",
                    args.channels,
                    target.describe(),
                    args.nats.stream,
                    args.nats.prefix,
                    args.nats.nats_url
                );
                Some(relay)
            };
            eprintln!("listening at {}; Ctrl-C to stop", target.describe());
            (relay, ws, Upstream::Listen(source))
        }
    };
    let mut every = tokio::time::interval(args.report_every);
    every.tick().await;
    // One Ctrl-C future for the whole loop: a fresh one per turn would miss
    // a Ctrl-C that came while the turn before printed its report.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let result = loop {
        tokio::select! {
            _ = &mut ctrl_c => break Ok(()),
            _ = every.tick() => {
                if let Some(relay) = &relay {
                    eprintln!("{}", report_line(&relay.status(), &args.nats));
                    if relay.is_finished() {
                        break Err(anyhow::anyhow!("the relay stopped: its source ended"));
                    }
                }
                if let Some((server, _)) = &ws {
                    let s = server.stats();
                    eprintln!(
                        "-- websocket: {} clients, {} accepted, {} refused, {} messages, {} disconnected for lag, {} closed on a gap or outage; \
                         {} connections open, {} refused over the limit, {} handshake timeouts",
                        s.clients, s.accepted, s.refused, s.sent, s.lagged, s.closed_by_source,
                        s.connections, s.over_limit, s.handshake_timeouts
                    );
                    if server.is_finished() {
                        break Err(anyhow::anyhow!("the WebSocket server stopped: its source ended"));
                    }
                }
            }
        }
    };
    if let Some(relay) = relay {
        relay.shutdown().await;
    }
    if let Some((server, _)) = ws {
        server.shutdown().await;
    }
    upstream.shutdown().await;
    eprintln!("-- stopped");
    result
}

/// The relay's periodic report: what it relays, or, while NATS does not take
/// its messages, that (the source's health alone would read as all is well
/// while nothing reaches the stream).
fn report_line(s: &pgcachewatch::nats::RelayStatus, nats: &NatsArgs) -> String {
    let source = if s.upstream.is_healthy() {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    let confirmed = s.confirmed.map_or("-".to_owned(), |l| l.to_string());
    let quiet = crate::output::duration(s.last_ack_at.map(|at| at.elapsed()));
    if !s.nats_connected {
        format!(
            "-- NATS UNREACHABLE at {}: nothing stored for {quiet}, {} messages waiting, {} retries \
             (source {source}, confirmed {confirmed})",
            nats.nats_url, s.in_flight, s.retries
        )
    } else if !s.publishing {
        format!(
            "-- JetStream NOT STORING into stream {} at {}: nothing stored for {quiet}, {} messages waiting, \
             {} retries (source {source}, confirmed {confirmed})",
            nats.stream, nats.nats_url, s.in_flight, s.retries
        )
    } else {
        format!(
            "-- source {source}, epoch {}, {} events acknowledged, {} in flight, stream seq {}, confirmed {confirmed}, lag {}, {} retries",
            s.epoch,
            s.events,
            s.in_flight,
            s.last_stream_seq,
            crate::output::duration(s.last_event_lag),
            s.retries
        )
    }
}

/// The relay's source, to shut down after the relay.
enum Upstream {
    Replication(PgReplicationSource),
    Listen(pgcachewatch::postgres::PgListenerSource),
}

impl Upstream {
    async fn shutdown(self) {
        match self {
            Upstream::Replication(s) => s.shutdown().await,
            Upstream::Listen(s) => s.shutdown().await,
        }
    }
}

async fn status(nats: &NatsArgs, json: bool) -> Result<()> {
    let report = RelayReport::read(&nats.connect()?, &nats.stream()).await?;
    let healthy = report.is_healthy(Duration::from_secs(5));
    let (epoch, source_health) = match &report.heartbeat {
        Some(h) => match &h.kind {
            WireKind::Health(health) => (Some(h.epoch.clone()), Some(format!("{health:?}"))),
            _ => (None, None),
        },
        None => (None, None),
    };
    if json {
        let v = serde_json::json!({
            "healthy": healthy,
            "stream": report.stream,
            "messages": report.messages,
            "bytes": report.bytes,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "consumers": report.consumers,
            "epoch": epoch,
            "source_health": source_health,
            "heartbeat_age_ms": report.heartbeat_age.map(|a| a.as_millis() as u64),
        });
        crate::output::print(&format!("{v}\n"))?;
    } else {
        crate::output::print(&format!(
            "relay: {}\n  last heartbeat: {} (epoch {}, source {})\n  stream {}: {} messages, {} bytes, sequences {}..={}, {} consumers\n",
            if healthy { "healthy" } else { "NOT healthy" },
            report.heartbeat_age.map_or("never".to_owned(), |a| format!("{a:.1?} ago")),
            epoch.as_deref().unwrap_or("-"),
            source_health.as_deref().unwrap_or("-"),
            report.stream, report.messages, report.bytes, report.first_seq, report.last_seq, report.consumers,
        ))?;
    }
    if healthy {
        Ok(())
    } else {
        anyhow::bail!("the relay is not healthy (no recent heartbeat, or its source is unhealthy)")
    }
}
