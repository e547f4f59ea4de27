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
mod ttl;

use proc_macro::TokenStream;

/// Caches an `async fn` in a `pgcachewatch::Cache` kept fresh by PostgreSQL.
///
/// Documented with examples at its re-export, `pgcachewatch::cached`, whose
/// examples are compiled and run with the facade's tests.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// #[pgcachewatch::cached(capacity = 100)]
/// async fn square(n: u64) -> u64 {
///     n * n
/// }
/// assert_eq!(square(12).await, 144);
/// # });
/// ```
#[proc_macro_attribute]
pub fn cached(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut options = options::Options::default();
    let parser = syn::meta::parser(|meta| options.parse(meta));
    if let Err(e) = syn::parse::Parser::parse(parser, attr) {
        return e.to_compile_error().into();
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
