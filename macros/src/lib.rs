//! # pgcachewatch-macros
//!
//! The `#[cached]` attribute, used as `#[pgcachewatch::cached]` (the facade crate
//! re-exports it behind its default feature `macros`). Depend on `pgcachewatch`,
//! not on this crate: the code the attribute writes names items through
//! `::pgcachewatch::…`.
//!
//! The attribute is documented, with examples, where users meet it: the facade's
//! `pgcachewatch::cached`. In short:
//!
//! * `#[cached(...)] async fn f(args) -> Result<T, E>` (or `-> T`) reads through a
//!   `pgcachewatch::Cache`: single-flight, generation-stamped, errors not cached.
//!   It is `Cache::try_get_with_tagged` with the function body as the loader;
//!   nothing of the cache is reimplemented here.
//! * Keyed by all arguments, or by `key = <expr>` over them (`key_type = <Type>`
//!   when the key's type cannot be read off the arguments).
//! * Either the attribute creates the cache (`name`, `capacity`, `ttl`, `tables`,
//!   `strategy`, `source`), reachable as `f_cache()`, or `cache = <expr>` names
//!   one you own.
//!
//! The code generated for the second form, for example, is only this:
//!
//! ```text
//! async fn f(pool: &PgPool, id: i64) -> Result<String, Arc<sqlx::Error>> {
//!     let key = Clone::clone(&id);
//!     ::pgcachewatch::__private::result(&USERS, key, &["users"], move || async move {
//!         let out: Result<String, Arc<sqlx::Error>> = async move { /* the body */ }.await;
//!         out
//!     }).await
//! }
//! ```

#![warn(missing_docs, unreachable_pub)]

mod expand;
mod options;
mod query;
mod ttl;

use proc_macro::TokenStream;

/// Caches an `async fn` in a `pgcachewatch::Cache` kept fresh by PostgreSQL:
/// the counterpart of PGCacheWatch's `@decorators.cache(strategy=…)`.
///
/// ```
/// use pgcachewatch::memory::InMemorySource;
/// use pgcachewatch::strategies::Greedy;
/// use pgcachewatch::{cached, Event, Operation};
///
/// #[cached(capacity = 1_000, ttl = "5m", strategy = Greedy::with_predicate(|e: &Event| e.table == "users"))]
/// async fn greeting(id: u32) -> String {
///     format!("hello, user {id}") // a SELECT, in life
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let (source, events) = InMemorySource::pair(); // a PgListenerSource, in life
/// let attached = cached::attach(source);          // at start-up, once
/// assert_eq!(greeting(7).await, "hello, user 7"); // runs the body
/// assert_eq!(greeting_cache().get(&7).as_deref(), Some("hello, user 7"));
/// events.publish(Event::new("pgcachewatch", Operation::Update, "public", "users"));
/// attached.sync().await;
/// assert_eq!(greeting_cache().get(&7), None);     // dropped by the strategy
/// # });
/// ```
///
/// # What it does
///
/// The function's body becomes the loader of
/// `Cache::try_get_with_tagged`, so every call has `get_or_load`'s guarantees:
/// concurrent calls with one key run the body once (single-flight); a load that
/// began before an invalidation is returned to its callers but not stored
/// (generations); an error is shared by the callers of that load and never
/// cached; while the source is unhealthy, calls bypass the cache.
///
/// * **Returns** `Result<T, E>` (a type whose last segment is `Result`, so
///   `io::Result<T>` too): `T` is cached, `E` is not. `E` must be
///   `Clone + std::error::Error + Send + Sync + 'static`, since every waiter gets
///   it: return an error that is not `Clone` as `Arc<E>`
///   (`-> Result<User, Arc<sqlx::Error>>`; `?` converts `sqlx::Error` into it).
///   Any other return type is cached as it is (`Option<T>` included: `None` is
///   cached too).
/// * **Key**: every argument (one argument: its type; several: a tuple), each
///   cloned, so they must be `Clone + Hash + Eq + Send + Sync + 'static` —
///   references are refused. `key = id` (an argument), `key = (a, b)` (a tuple of
///   arguments) or `key = <any expression over the arguments>` with
///   `key_type = <its type>` leaves the others out (a `&PgPool`, say).
///
/// # The cache: made by the attribute, or yours
///
/// By default the attribute makes the cache, on first use, and a function next to
/// yours reaches it: for `async fn user_name(…)`, `fn user_name_cache() ->
/// &'static Cache<K, V>` (same visibility), to read its `stats()`, `invalidate` a
/// key by hand, or attach it to a `Dispatcher` yourself. Options:
///
/// | option | default | |
/// |---|---|---|
/// | `name = "users"` | the function's name | the cache's name in logs and stats |
/// | `capacity = 10_000` | 10 000 | most entries held |
/// | `ttl = "60s"` | none | time-to-live: text with units `ms`, `s`, `m`, `h`, `d` (`"1m30s"`), checked at compile time, or a `Duration` expression |
/// | `tables = ["users", "public.orders"]` | every table | the entries depend only on these tables (`try_get_with_tagged`): other tables' invalidations keep them |
/// | `strategy = <expr>` | none | the strategy that feeds the cache from the source attached at start-up (below) |
/// | `source = "name"` | `"default"` | which source: the one attached with `cached::attach_as("name", …)` |
///
/// `cache = <expr>` reads through a cache of your own instead, such as a
/// `static USERS: LazyLock<Cache<K, V>>`: you build, configure and attach it
/// (the options above that configure the made cache are then an error;
/// `tables` and `key` still apply). Use this form in an `impl` block (the made
/// cache's handle is a sibling free function).
///
/// ```
/// use std::sync::LazyLock;
/// use pgcachewatch::{cached, Cache};
///
/// static LENGTHS: LazyLock<Cache<String, usize>> = LazyLock::new(|| Cache::new(100));
///
/// #[cached(cache = LENGTHS, key = word)]
/// async fn length(log: &str, word: String) -> usize {
///     let _ = log; // not part of the key
///     word.len()
/// }
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// assert_eq!(length("a", "four".into()).await, 4);
/// assert_eq!(LENGTHS.get(&"four".to_string()), Some(4));
/// # });
/// ```
///
/// # Declaring the strategy, attaching the source
///
/// With `strategy = …` the cache registers itself (on first use) with
/// `pgcachewatch::cached`, the process-wide list of declared caches. At start-up,
/// `pgcachewatch::cached::attach(source)` (or `attach_as("name", source)`)
/// gives every declared cache of that source name a dispatcher of its own on
/// the source, with a strategy made by evaluating the `strategy` expression —
/// those used so far at once, the others on first use. Keep the returned
/// `AttachedCaches`: dropping it stops the dispatchers (the caches then bypass).
///
/// **A made cache is unhealthy until a dispatcher is attached**
/// (`CacheBuilder::unhealthy_until_attached`): a call before `attach` — or
/// for a cache without `strategy`, before you attach it yourself — runs the
/// body and stores nothing, since nothing would ever invalidate what it stored.
///
/// # The query form: `#[cached(query = "SELECT …")]` (feature `query`)
///
/// The statement is the function: no body, the arguments are `$1…$n` (and the
/// key), the return type picks the read, and the dependencies and the strategy
/// come from the statement (a `pgcachewatch::query::CachedQuery`: row-level
/// where provably sound, table-level on every table it reads otherwise).
///
/// ```text
/// #[cached(query = "SELECT id, name FROM users WHERE id = $1")]
/// async fn user(id: i64) -> Result<Option<User>, CachedQueryError>;   // fetch_optional
/// // -> Result<User, E> (fetch_one), Result<Vec<User>, E> or Result<Arc<[User]>, E> (fetch_all),
/// //    E: From<CachedQueryError>; the row: sqlx::FromRow + Clone (a tuple will do)
///
/// user_query().attach(&pool, &source).await?; // any EventSource: LISTEN, replication, NATS
/// println!("{}", user_query().explain().unwrap()); // row-level on public.users(id) from $1
/// ```
///
/// The statement is read at compile time with PostgreSQL's own parser (no
/// server): what can never be cached — `FOR UPDATE`/`FOR SHARE`, `now()`,
/// `random()`, `nextval()`, `current_user`, `current_setting()`, a write — is a
/// compile error that names the way out (drop `query`, write the body, declare
/// `tables = [...]` and a `strategy`); so is a parameter count that does not
/// match the arguments. Names, views, keys and user functions are checked at
/// attach, on the server. Options: `name`, `capacity`, `strict = true` (attach
/// fails unless row-level); the others belong to the hand-written form.
///
/// # Auditing a hand-written rule: `sql = "SELECT …"` (feature `query`)
///
/// A function with `tables = [...]` whose statement is known — given as `sql =
/// "…"`, or a string literal passed to `sqlx::query`, `query_as`,
/// `query_scalar` (or their `_with` forms, or the `query!` macros) in its body —
/// has the tables that statement reads compared with the declared ones when its
/// cache is made (by name; a cache given with `cache = …`: at its first miss):
/// each table it reads that the declaration leaves out (so that nothing
/// invalidates it) is a `tracing` warning and an entry of
/// `pgcachewatch::query::audit::findings()`. At start-up,
/// `pgcachewatch::query::audit::check_on(&pool)` redoes every comparison on
/// the server (views expanded to their base tables, names through the
/// `search_path`). Without the feature, `sql` is accepted and not audited.
///
/// # Not supported
///
/// `self` receivers (one cache serves every caller: results would be shared
/// between instances — pass what the result depends on as arguments), generic
/// functions (one cache has one key and one value type), non-`async` functions;
/// each is a compile error pointing at the offending token.
///
/// ```compile_fail
/// #[pgcachewatch::cached]
/// fn not_async(id: u32) -> u32 { id }
/// ```
#[proc_macro_attribute]
pub fn cached(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut options = options::Options::default();
    let parser = syn::meta::parser(|meta| options.parse(meta));
    if let Err(e) = syn::parse::Parser::parse(parser, attr) {
        return e.to_compile_error().into();
    }
    if options.query.is_some() {
        return match syn::parse::<query::QueryFn>(item) {
            Ok(item) => match query::expand(options, item) {
                Ok(tokens) => tokens.into(),
                Err(e) => e.to_compile_error().into(),
            },
            Err(e) => syn::Error::new(
                e.span(),
                "`#[cached(query = …)]` goes on an `async fn` signature: \
                 `async fn user(id: i64) -> Result<Option<User>, CachedQueryError>;`",
            )
            .to_compile_error()
            .into(),
        };
    }
    if let Some(strict) = &options.strict {
        return syn::Error::new_spanned(&strict.name, "`strict` goes with `query`")
            .to_compile_error()
            .into();
    }
    let item = match syn::parse::<syn::ItemFn>(item) {
        Ok(item) => item,
        Err(e) => {
            return syn::Error::new(
                e.span(),
                "`#[cached]` goes on an `async fn` (a free function or an associated function)",
            )
            .to_compile_error()
            .into()
        }
    };
    match expand::expand(options, item) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}
