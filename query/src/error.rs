//! [`QueryError`]: why a query's dependencies could not be derived.

/// The way out of every refusal, repeated in each message so that it is read
/// where the error is read.
pub const WAY_OUT: &str =
    "declare the tables it reads yourself (`tables = [...]`) or cache it by hand";

/// Why a query's dependencies could not be derived (or, with
/// [`ResolveOptions::strict`](crate::ResolveOptions::strict), why they are not
/// row-level).
///
/// A refusal is not a bug: the query cannot be kept fresh from events alone
/// (it locks rows, its result moves with the clock or the session, it reads
/// something that sends no events, or it calls code whose reads are unknown).
/// Each message names the cause and the way out ([`WAY_OUT`]): declare the
/// tables it reads yourself.
///
/// ```
/// use pgcachewatch_query::{analyze, QueryError};
/// let err = analyze("SELECT * FROM users WHERE id = $1 FOR UPDATE").unwrap_err();
/// assert!(matches!(err, QueryError::Locking { .. }));
/// assert!(err.to_string().contains("tables = [...]"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// PostgreSQL's parser rejects the text (or could not read it).
    #[error("PostgreSQL's parser rejects the query: {message}")]
    Parse {
        /// The parser's message.
        message: String,
    },
    /// Not exactly one statement.
    #[error(
        "expected exactly one statement, found {count}: a cached query is one SELECT; \
         {WAY_OUT}"
    )]
    StatementCount {
        /// How many statements the text holds.
        count: usize,
    },
    /// Not a plain `SELECT` (a write, `SELECT … INTO`, a data-modifying CTE, a
    /// utility statement).
    #[error("only a SELECT can be cached, not {statement}; {WAY_OUT}")]
    NotSelect {
        /// What the statement is instead.
        statement: String,
    },
    /// `FOR UPDATE`, `FOR SHARE` and friends: the statement takes row locks,
    /// which a cache hit would skip.
    #[error("`{clause}` locks rows, which a cached result would not; {WAY_OUT}")]
    Locking {
        /// The locking clause, e.g. `FOR UPDATE`.
        clause: String,
    },
    /// A function (or construct) whose result changes without any write:
    /// `now()`, `random()`, `nextval()`, `TABLESAMPLE`, `'now'::timestamptz`, or a
    /// function the server marks volatile.
    #[error(
        "`{function}` changes its result without any write (volatile or time-dependent): \
         no event would tell a cache; {WAY_OUT}"
    )]
    Volatile {
        /// The function or construct.
        function: String,
    },
    /// Depends on the session: the role (`current_user`, privileges: row security
    /// policies read it), settings (`current_setting`), the connection.
    #[error(
        "`{what}` depends on the session (role, settings or connection), so one cached \
         result cannot serve every caller; {WAY_OUT}"
    )]
    SessionDependent {
        /// The function or construct.
        what: String,
    },
    /// A function whose reads are unknown: not built in and not immutable (it
    /// may read tables the query text does not name), or one that reads data
    /// that sends no events (large objects, files, SQL passed as text).
    #[error(
        "function `{function}` may read tables the query does not name (it is not a \
         built-in, and not immutable), or data that sends no events; {WAY_OUT}"
    )]
    UnknownFunctionReads {
        /// The function, as resolved where known.
        function: String,
    },
    /// A relation that produces no events: a materialized view, a foreign table,
    /// a sequence, a system catalog, a temporary table of this connection.
    #[error("{relation} is a {kind}: writes to it produce no events; {WAY_OUT}")]
    NoEvents {
        /// The relation, schema-qualified.
        relation: String,
        /// What it is.
        kind: String,
    },
    /// A relation with row-level security enabled: what a query returns depends on
    /// the role and settings of whoever runs it.
    #[error(
        "{relation} has row-level security enabled: its rows depend on who reads them; \
         {WAY_OUT}"
    )]
    RowSecurity {
        /// The relation, schema-qualified.
        relation: String,
    },
    /// A name that does not resolve on the connection.
    #[error("relation {name} does not exist on this connection (search_path: {search_path})")]
    UnknownRelation {
        /// The name as written in the query.
        name: String,
        /// The connection's `search_path`.
        search_path: String,
    },
    /// [`ResolveOptions::strict`](crate::ResolveOptions::strict): the query is only
    /// table-level.
    #[error("strict: the query is not row-level ({explanation})")]
    NotRowLevel {
        /// [`Dependencies::explain`](crate::Dependencies::explain) of what was derived.
        explanation: String,
    },
    /// The generic plan could not be read.
    #[error("could not read the statement's generic plan: {message}")]
    Plan {
        /// What was wrong with it.
        message: String,
    },
    /// The server refused a probe (the query itself does not prepare, or the
    /// connection failed).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    #[error("the server: {0}")]
    Database(#[from] sqlx::Error),
}

impl QueryError {
    /// Whether this is a refusal: the query is valid but cannot be kept fresh
    /// from events alone (declare its tables yourself). `false` for errors of the
    /// text ([`Parse`](Self::Parse)), the connection, or the strict option.
    ///
    /// ```
    /// use pgcachewatch_query::analyze;
    /// assert!(analyze("SELECT random()").unwrap_err().is_refusal());
    /// assert!(!analyze("SELEC 1").unwrap_err().is_refusal());
    /// ```
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            QueryError::NotSelect { .. }
                | QueryError::Locking { .. }
                | QueryError::Volatile { .. }
                | QueryError::SessionDependent { .. }
                | QueryError::UnknownFunctionReads { .. }
                | QueryError::NoEvents { .. }
                | QueryError::RowSecurity { .. }
        )
    }
}
