//! `#[cached(query = "SELECT …")]`: a `pgcachewatch::query::CachedQuery` behind
//! an `async fn` whose arguments are the statement's parameters. The statement
//! is read at compile time with PostgreSQL's own parser (feature `query`), so
//! what can never be cached (`FOR UPDATE`, `now()`, `random()`,
//! `current_user`, …) is a compile error naming the way out.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{
    Attribute, Block, FnArg, GenericArgument, Pat, PathArguments, ReturnType, Signature, Token,
    Type, Visibility,
};

use crate::options::Options;

/// `async fn f(args) -> R;` (no body: the statement is the body) or with an
/// empty body `{}`.
pub(crate) struct QueryFn {
    attrs: Vec<Attribute>,
    vis: Visibility,
    sig: Signature,
    body: Option<Block>,
}

impl Parse for QueryFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig = input.parse()?;
        let body = if input.peek(Token![;]) {
            input.parse::<Token![;]>()?;
            None
        } else {
            Some(input.parse()?)
        };
        Ok(QueryFn {
            attrs,
            vis,
            sig,
            body,
        })
    }
}

/// Which read the return type asks for.
enum Read {
    One(Type),
    Optional(Type),
    All(Type),
    Shared(Type),
}

fn single_arg(ty: &Type, name: &str) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(t)] => Some(t.clone()),
        _ => None,
    }
}

fn read_of(value: &Type) -> Read {
    if let Some(t) = single_arg(value, "Option") {
        return Read::Optional(t);
    }
    if let Some(t) = single_arg(value, "Vec") {
        return Read::All(t);
    }
    if let Some(Type::Slice(slice)) = single_arg(value, "Arc") {
        return Read::Shared((*slice.elem).clone());
    }
    Read::One(value.clone())
}

/// The options that make no sense with `query` (the statement gives the key,
/// the dependencies and the strategy).
fn check_options(options: &Options) -> syn::Result<()> {
    let not_here = |name: &syn::Ident, why: &str| {
        Err(syn::Error::new_spanned(
            name,
            format!("`{name}` does not go with `query`: {why}"),
        ))
    };
    if let Some(o) = &options.tables {
        return not_here(
            &o.name,
            "the tables are derived from the statement. To declare them yourself \
             (the way out of a refusal), drop `query` and write the body: \
             `#[cached(tables = [...], strategy = …)] async fn f(…) { sqlx::query(…) }`",
        );
    }
    for (name, why) in [
        (
            options.strategy.as_ref().map(|o| &o.name),
            "the strategy is derived from the statement",
        ),
        (
            options.key.as_ref().map(|o| &o.name),
            "the key is the arguments (the statement's parameters)",
        ),
        (
            options.key_type.as_ref().map(|o| &o.name),
            "the key is the arguments (the statement's parameters)",
        ),
        (
            options.cache.as_ref().map(|o| &o.name),
            "the query owns its cache (reach it with `<fn>_query().cache()`)",
        ),
        (
            options.source.as_ref().map(|o| &o.name),
            "attach the query to any source yourself: `<fn>_query().attach(&pool, &source)`",
        ),
        (
            options.ttl.as_ref().map(|o| &o.name),
            "a cached query is kept fresh by events, not by time",
        ),
        (
            options.sql.as_ref().map(|o| &o.name),
            "`query` is the statement",
        ),
    ] {
        if let Some(name) = name {
            return not_here(name, why);
        }
    }
    Ok(())
}

pub(crate) fn expand(options: Options, item: QueryFn) -> syn::Result<TokenStream> {
    check_options(&options)?;
    let Some(query) = &options.query else {
        unreachable!("expand_query is called with `query`")
    };
    let QueryFn {
        attrs,
        vis,
        sig,
        body,
    } = item;
    if let Some(body) = &body {
        if !body.stmts.is_empty() {
            return Err(syn::Error::new_spanned(
                body,
                "a `#[cached(query = …)]` function has no body: the statement is its body \
                 (end the signature with `;`)",
            ));
        }
    }
    if sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            sig.fn_token,
            "`#[cached(query = …)]` goes on an `async fn`",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a `#[cached(query = …)]` function cannot be generic: one cache has one parameter and one row type",
        ));
    }
    let mut names = Vec::new();
    let mut types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new_spanned(
                    r,
                    "`#[cached(query = …)]` caches a statement, not a method: pass its parameters as arguments",
                ))
            }
            FnArg::Typed(t) => match &*t.pat {
                Pat::Ident(p) if p.subpat.is_none() && p.by_ref.is_none() => {
                    if let Type::Reference(_) = &*t.ty {
                        return Err(syn::Error::new_spanned(
                            &t.ty,
                            "a statement's parameter is part of the cache key, so it is owned: \
                             take `String` rather than `&str`, `Vec<T>` rather than `&[T]`",
                        ));
                    }
                    names.push(p.ident.clone());
                    types.push((*t.ty).clone());
                }
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "name each parameter (`id: i64`): patterns are not supported",
                    ))
                }
            },
        }
    }

    // The statement at compile time: PostgreSQL's parser, no server.
    check_statement(&query.value, names.len())?;

    let ReturnType::Type(_, ret) = &sig.output else {
        return Err(syn::Error::new(
            sig.paren_token.span.close(),
            "a `#[cached(query = …)]` function returns `Result<T, E>` (`fetch_one`), \
             `Result<Option<T>, E>` (`fetch_optional`), `Result<Vec<T>, E>` or \
             `Result<Arc<[T]>, E>` (`fetch_all`), with `E: From<CachedQueryError>`",
        ));
    };
    let Some((value, _error)) = result_types(ret) else {
        return Err(syn::Error::new_spanned(
            ret,
            "a `#[cached(query = …)]` function returns `Result<T, E>` (`fetch_one`), \
             `Result<Option<T>, E>` (`fetch_optional`), `Result<Vec<T>, E>` or \
             `Result<Arc<[T]>, E>` (`fetch_all`), with `E: From<CachedQueryError>`",
        ));
    };
    let read = read_of(&value);
    let row = match &read {
        Read::One(t) | Read::Optional(t) | Read::All(t) | Read::Shared(t) => t.clone(),
    };
    let params_ty = quote!((#(#types,)*));
    let params = quote!((#(#names,)*));
    let handle = format_ident!("{}_query", sig.ident);
    let name = match &options.name {
        Some(n) => {
            let n = &n.value;
            quote!(#n)
        }
        None => {
            let n = sig.ident.to_string();
            quote!(#n)
        }
    };
    let capacity = options
        .capacity
        .as_ref()
        .map(|c| {
            let c = &c.value;
            quote!(.capacity(#c))
        })
        .unwrap_or_default();
    let strict = options
        .strict
        .as_ref()
        .map(|s| {
            let s = &s.value;
            quote!(.strict(#s))
        })
        .unwrap_or_default();
    let lit = &query.value;
    let fetch = match &read {
        Read::One(_) => quote!(#handle().fetch_one(#params).await),
        Read::Optional(_) => quote!(#handle().fetch_optional(#params).await),
        Read::All(_) => quote!(#handle().fetch_all(#params).await.map(|rows| rows.to_vec())),
        Read::Shared(_) => quote!(#handle().fetch_all(#params).await),
    };
    let doc = format!(
        "The cached query behind [`{}`]: attach it at start-up \
         (`{handle}().attach(&pool, &source).await?`), read its `explain()`, `stats()`.",
        sig.ident
    );
    let row_check = quote_spanned!(row.span()=>
        let _ = ::pgcachewatch::__private::query_row::<#row>;
    );
    let cfgs = attrs.iter().filter(|a| a.path().is_ident("cfg"));
    Ok(quote! {
        #(#cfgs)*
        #[doc = #doc]
        #vis fn #handle() -> &'static ::pgcachewatch::query::CachedQuery<#params_ty, #row> {
            static QUERY: ::pgcachewatch::__private::LazyLock<
                ::pgcachewatch::query::CachedQuery<#params_ty, #row>,
            > = ::pgcachewatch::__private::LazyLock::new(|| {
                ::pgcachewatch::query::CachedQuery::builder(#lit)
                    .name(#name)
                    #capacity
                    #strict
                    .build()
            });
            &QUERY
        }

        #(#attrs)*
        #vis #sig {
            #row_check
            #fetch.map_err(::pgcachewatch::__private::query_error)
        }
    })
}

/// `T` and `E` of `Result<T, E>`.
fn result_types(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let types: Vec<&Type> = args
        .args
        .iter()
        .filter_map(|a| match a {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        })
        .collect();
    match types.as_slice() {
        [t, e] => Some(((*t).clone(), (*e).clone())),
        _ => None,
    }
}

/// Reads the statement with PostgreSQL's parser: a refusal, or a parameter
/// count that is not the arguments', is a compile error.
#[cfg(feature = "query")]
fn check_statement(sql: &syn::LitStr, arguments: usize) -> syn::Result<()> {
    let analysis = pgcachewatch_query::analyze(&sql.value()).map_err(|e| {
        syn::Error::new_spanned(
            sql,
            format!(
                "{e}\n(for a statement that cannot be cached from its text, declare \
                 what it reads yourself: drop `query`, write the body, and add \
                 `tables = [...]` and a `strategy`)"
            ),
        )
    })?;
    if analysis.param_count() != arguments {
        return Err(syn::Error::new_spanned(
            sql,
            format!(
                "the statement uses {} parameter(s) ($1…$n) but the function takes {arguments}: \
                 each argument is one parameter, in order",
                analysis.param_count(),
            ),
        ));
    }
    Ok(())
}

/// Without the parser there is no query form.
#[cfg(not(feature = "query"))]
fn check_statement(sql: &syn::LitStr, _arguments: usize) -> syn::Result<()> {
    Err(syn::Error::new_spanned(
        sql,
        "`#[cached(query = …)]` needs pgcachewatch's feature `query` (PostgreSQL's own \
         parser reads the statement at compile time)",
    ))
}
