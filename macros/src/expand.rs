//! Checks the function and writes the cached version of it.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Expr, FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::options::{Options, Ttl};

/// What the function returns.
enum Output {
    /// `Result<T, E>`: errors are shared with the waiters and not cached.
    Result {
        value: Type,
        /// `E` when written out (for a check with a readable error).
        error: Option<Box<Type>>,
    },
    /// A plain `T`: always cached.
    Plain(Type),
}

fn output(item: &ItemFn) -> syn::Result<Output> {
    let ReturnType::Type(_, ty) = &item.sig.output else {
        return Err(syn::Error::new(
            item.sig.paren_token.span.close(),
            "a `#[cached]` function must return the value to cache: `-> T`, or `-> Result<T, E>` (errors are not cached)",
        ));
    };
    if let Type::Path(path) = &**ty {
        if let Some(last) = path.path.segments.last() {
            if last.ident == "Result" && path.qself.is_none() {
                let args: Vec<&Type> = match &last.arguments {
                    PathArguments::AngleBracketed(a) => a
                        .args
                        .iter()
                        .filter_map(|a| match a {
                            GenericArgument::Type(t) => Some(t),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                return Ok(match args.as_slice() {
                    [value, error] => Output::Result {
                        value: (*value).clone(),
                        error: Some(Box::new((*error).clone())),
                    },
                    // An alias such as `io::Result<T>`: read the types through a trait.
                    _ => Output::Result {
                        value: syn::parse_quote!(
                            <#ty as ::pgcachewatch::__private::IsResult>::Ok
                        ),
                        error: None,
                    },
                });
            }
        }
    }
    Ok(Output::Plain((**ty).clone()))
}

/// An argument: its name and type.
struct Arg<'a> {
    name: &'a Ident,
    ty: &'a Type,
}

fn args(item: &ItemFn) -> syn::Result<Vec<Option<Arg<'_>>>> {
    let mut out = Vec::new();
    for input in &item.sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                return Err(syn::Error::new_spanned(
                    receiver,
                    "`#[cached]` caches a function, not a method: one cache serves every caller, \
                     so a `self` receiver would share results between instances. Write a \
                     free function and pass what the result depends on as arguments",
                ))
            }
            FnArg::Typed(typed) => match &*typed.pat {
                Pat::Ident(p) if p.subpat.is_none() && p.by_ref.is_none() => out.push(Some(Arg {
                    name: &p.ident,
                    ty: &typed.ty,
                })),
                _ => out.push(None),
            },
        }
    }
    Ok(out)
}

/// A type that cannot be (part of) a key, with why.
fn unkeyable(ty: &Type) -> Option<&'static str> {
    match ty {
        Type::Reference(_) => Some("is a reference"),
        Type::Ptr(_) => Some("is a raw pointer"),
        Type::ImplTrait(_) => Some("is an `impl Trait`"),
        Type::Paren(p) => unkeyable(&p.elem),
        Type::Group(g) => unkeyable(&g.elem),
        _ => None,
    }
}

/// The key: its value (evaluated before the body runs) and, when it can be
/// told, its type.
struct Key {
    expr: TokenStream,
    ty: Option<Type>,
}

fn clone_of(name: &Ident) -> TokenStream {
    quote!(::core::clone::Clone::clone(&#name))
}

fn keyed_arg<'a>(args: &'a [Option<Arg<'a>>], expr: &Expr) -> Option<&'a Arg<'a>> {
    let Expr::Path(path) = expr else { return None };
    let ident = path.path.get_ident()?;
    if path.qself.is_some() {
        return None;
    }
    args.iter().flatten().find(|a| a.name == ident)
}

fn key(options: &Options, args: &[Option<Arg<'_>>], item: &ItemFn) -> syn::Result<Key> {
    let explicit_ty = options.key_type.as_ref().map(|o| o.value.clone());
    if let Some(key) = &options.key {
        let expr = &key.value;
        // An argument, or a tuple of arguments: cloned, typed from the signature.
        let parts: Option<Vec<&Arg<'_>>> = match expr {
            Expr::Tuple(t) => t.elems.iter().map(|e| keyed_arg(args, e)).collect(),
            Expr::Paren(p) => keyed_arg(args, &p.expr).map(|a| vec![a]),
            e => keyed_arg(args, e).map(|a| vec![a]),
        };
        let tuple = matches!(expr, Expr::Tuple(_));
        if let Some(parts) = parts {
            for a in &parts {
                if let Some(why) = unkeyable(a.ty) {
                    return Err(syn::Error::new_spanned(
                        a.ty,
                        format!(
                            "`{}` {why}, so it cannot be a cache key: a key is owned \
                             (`Clone + Hash + Eq + Send + Sync + 'static`); take it by value, \
                             or key by an expression with `key_type = …`",
                            a.name
                        ),
                    ));
                }
            }
            let values = parts.iter().map(|a| clone_of(a.name));
            let types = parts.iter().map(|a| a.ty);
            let (expr, ty) = if tuple {
                (quote!((#(#values,)*)), syn::parse_quote!((#(#types,)*)))
            } else {
                (quote!(#(#values)*), parts[0].ty.clone())
            };
            return Ok(Key {
                expr,
                ty: Some(explicit_ty.unwrap_or(ty)),
            });
        }
        if explicit_ty.is_none() && options.cache.is_none() {
            return Err(syn::Error::new_spanned(
                expr,
                "the key's type cannot be read off this expression: add `key_type = <Type>` \
                 (not needed for an argument, a tuple of arguments, or with `cache = …`)",
            ));
        }
        return Ok(Key {
            expr: expr.to_token_stream(),
            ty: explicit_ty,
        });
    }
    if let Some(kt) = &options.key_type {
        return Err(syn::Error::new_spanned(
            &kt.name,
            "`key_type` goes with `key = <expression>`: without `key`, the key is every argument",
        ));
    }
    // Every argument is the key.
    let mut parts = Vec::new();
    for (input, arg) in item.sig.inputs.iter().zip(args) {
        let Some(arg) = arg else {
            let FnArg::Typed(typed) = input else { continue };
            return Err(syn::Error::new_spanned(
                &typed.pat,
                "an argument of a `#[cached]` function without `key = …` is part of the key: \
                 give it a name (`x: T`), or name the key with `key = …`",
            ));
        };
        if let Some(why) = unkeyable(arg.ty) {
            return Err(syn::Error::new_spanned(
                arg.ty,
                format!(
                    "`{}` {why}, so it cannot be part of the cache key (all arguments are, by \
                     default): name the key with `key = …` to leave it out (e.g. `key = id`), \
                     or take it by value",
                    arg.name
                ),
            ));
        }
        parts.push(arg);
    }
    let values: Vec<TokenStream> = parts.iter().map(|a| clone_of(a.name)).collect();
    let types: Vec<&Type> = parts.iter().map(|a| a.ty).collect();
    Ok(match (values.as_slice(), types.as_slice()) {
        ([value], [ty]) => Key {
            expr: value.clone(),
            ty: Some((*ty).clone()),
        },
        _ => Key {
            expr: quote!((#(#values,)*)),
            ty: Some(syn::parse_quote!((#(#types,)*))),
        },
    })
}

fn check_signature(item: &ItemFn) -> syn::Result<()> {
    let sig = &item.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            sig.fn_token,
            "`#[cached]` goes on an `async fn` (its body is the loader, run once for all concurrent callers)",
        ));
    }
    if let Some(param) = sig
        .generics
        .params
        .iter()
        .find(|p| !matches!(p, syn::GenericParam::Lifetime(_)))
    {
        return Err(syn::Error::new_spanned(
            param,
            "a `#[cached]` function cannot be generic: its one cache has one key and one value type",
        ));
    }
    if let Some(clause) = &sig.generics.where_clause {
        return Err(syn::Error::new_spanned(
            clause,
            "a `#[cached]` function cannot have a `where` clause",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new_spanned(
            v,
            "variadic arguments cannot be cached",
        ));
    }
    Ok(())
}

/// Options that configure the cache the attribute creates: errors with `cache = …`.
fn check_options(options: &Options) -> syn::Result<()> {
    if let Some(cache) = &options.cache {
        let owned = [
            options.name.as_ref().map(|o| &o.name),
            options.capacity.as_ref().map(|o| &o.name),
            options.ttl.as_ref().map(|o| &o.name),
            options.strategy.as_ref().map(|o| &o.name),
            options.source.as_ref().map(|o| &o.name),
        ];
        if let Some(name) = owned.into_iter().flatten().next() {
            return Err(syn::Error::new_spanned(
                name,
                format!(
                    "`{name}` configures the cache the attribute creates, but `{}` names a cache \
                     you own: configure and attach that cache where you build it",
                    cache.name
                ),
            ));
        }
    }
    if let (Some(source), None) = (&options.source, &options.strategy) {
        return Err(syn::Error::new_spanned(
            &source.name,
            "`source` says which source feeds the cache through its `strategy`: add `strategy = …`",
        ));
    }
    Ok(())
}

pub(crate) fn expand(options: Options, item: ItemFn) -> syn::Result<TokenStream> {
    check_options(&options)?;
    check_signature(&item)?;
    let output = output(&item)?;
    let args = args(&item)?;
    let key = key(&options, &args, &item)?;

    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = &item;
    let ret: Type = match &sig.output {
        ReturnType::Type(_, ret) => (**ret).clone(),
        ReturnType::Default => syn::parse_quote!(()),
    };
    let key_var = Ident::new("__pgcachewatch_key", Span::mixed_site());
    let out_var = Ident::new("__pgcachewatch_out", Span::mixed_site());
    let cache_var = Ident::new("__pgcachewatch_cache", Span::mixed_site());
    let hit_var = Ident::new("__pgcachewatch_hit", Span::mixed_site());
    let tables = match &options.tables {
        Some(t) => {
            let elems = t.value.elems.iter();
            quote!(&[#(#elems),*])
        }
        None => quote!(&[] as &[&str]),
    };
    let (load, checks, value_ty) = match &output {
        Output::Result { value, error } => {
            let check = match error {
                Some(e) => {
                    quote_spanned!(e.span()=> let _ = ::pgcachewatch::__private::shared_error::<#e>;)
                }
                None => {
                    quote_spanned!(ret.span()=> let _ = ::pgcachewatch::__private::shared_error::<
                    <#ret as ::pgcachewatch::__private::IsResult>::Err,
                >;)
                }
            };
            (quote!(result), Some(check), value.clone())
        }
        Output::Plain(value) => (quote!(plain), None, value.clone()),
    };
    let key_expr = &key.expr;
    let key_binding = match &key.ty {
        Some(ty) => {
            let check = quote_spanned!(ty.span()=> let _ = ::pgcachewatch::__private::key::<#ty>;);
            quote!(#check let #key_var: #ty = #key_expr;)
        }
        None => quote!(let #key_var = #key_expr;),
    };

    let audit = audit(&options, &item)?;
    let mut handle = TokenStream::new();
    let mut audit_on_miss = TokenStream::new();
    let cache_ref = if let Some(cache) = &options.cache {
        let cache = &cache.value;
        if !audit.is_empty() {
            // A cache of one's own is made elsewhere: the rule is registered by
            // the first miss.
            audit_on_miss = quote! {
                static AUDITED: ::std::sync::Once = ::std::sync::Once::new();
                AUDITED.call_once(|| { #audit });
            };
        }
        quote!({
            let #cache_var: &::pgcachewatch::Cache<_, _> = &#cache;
            #cache_var
        })
    } else {
        let Some(key_ty) = key.ty.as_ref() else {
            return Err(syn::Error::new_spanned(
                &sig.ident,
                "the key's type is unknown: add `key_type = <Type>`",
            ));
        };
        let name_lit = match &options.name {
            Some(n) => n.value.clone(),
            None => syn::LitStr::new(&sig.ident.to_string(), sig.ident.span()),
        };
        let capacity = match &options.capacity {
            Some(c) => {
                let c = &c.value;
                quote!(.capacity(#c))
            }
            None => quote!(),
        };
        let ttl = match &options.ttl {
            Some(t) => match &t.value {
                Ttl::Nanos(n) => quote!(.time_to_live(::core::time::Duration::from_nanos(#n))),
                Ttl::Expr(e) => quote!(.time_to_live(#e)),
            },
            None => quote!(),
        };
        let register = match &options.strategy {
            Some(s) => {
                let strategy = &s.value;
                let source = match &options.source {
                    Some(src) => src.value.to_token_stream(),
                    None => quote!(::pgcachewatch::cached::DEFAULT_SOURCE),
                };
                quote!(::pgcachewatch::cached::register(#source, &#cache_var, || #strategy);)
            }
            None => quote!(),
        };
        let static_var = Ident::new("CACHE", Span::mixed_site());
        let handle_name = format_ident!("{}_cache", sig.ident);
        let fn_name = &sig.ident;
        let cfgs = attrs.iter().filter(|a| a.path().is_ident("cfg"));
        let attach_doc = if options.strategy.is_some() {
            "It is fed by the `strategy` declared with the function once a source is attached \
             (`pgcachewatch::cached::attach`); until then every call runs the function."
        } else {
            "Attach it to a dispatcher (`Dispatcher::attach(strategy, cache.clone())`); until \
             then every call runs the function."
        };
        let doc = format!(
            "The cache of [`{fn_name}`], created by `#[cached]` on first use. {attach_doc}"
        );
        handle = quote! {
            #(#cfgs)*
            #[doc = #doc]
            #vis fn #handle_name() -> &'static ::pgcachewatch::Cache<#key_ty, #value_ty> {
                static #static_var: ::pgcachewatch::__private::LazyLock<
                    ::pgcachewatch::Cache<#key_ty, #value_ty>,
                > = ::pgcachewatch::__private::LazyLock::new(|| {
                    let #cache_var = ::pgcachewatch::Cache::builder()
                        .name(#name_lit)
                        #capacity
                        #ttl
                        .unhealthy_until_attached()
                        .build();
                    #register
                    #audit
                    #cache_var
                });
                &#static_var
            }
        };
        quote!(#handle_name())
    };

    let value_check =
        quote_spanned!(value_ty.span()=> let _ = ::pgcachewatch::__private::value::<#value_ty>;);
    let hit_value = match &output {
        Output::Result { .. } => {
            quote!(<#ret as ::pgcachewatch::__private::IsResult>::from_ok(#hit_var))
        }
        Output::Plain(_) => quote!(#hit_var),
    };
    // A hit returns before the load's future is built: that future (with the
    // function's body inside) is large, and is boxed so that this function's
    // own future stays small — a hit costs what `Cache::get` costs.
    Ok(quote! {
        #(#attrs)*
        #vis #sig {
            #checks
            #value_check
            #key_binding
            let #cache_var = #cache_ref;
            if let ::core::option::Option::Some(#hit_var) =
                ::pgcachewatch::__private::hit(#cache_var, &#key_var)
            {
                return #hit_value;
            }
            #audit_on_miss
            ::std::boxed::Box::pin(::pgcachewatch::__private::#load(#cache_var, #key_var, #tables, move || async move {
                let #out_var: #ret = async move #block.await;
                #out_var
            }))
            .await
        }

        #handle
    })
}

/// The audit of a hand-written rule (feature `query`): with `tables = [...]` and
/// the SQL known (`sql = "…"`, or string literals given to `sqlx::query*` in the
/// body), the registration that compares them when the cache is made.
fn audit(options: &Options, item: &ItemFn) -> syn::Result<TokenStream> {
    let Some(tables) = &options.tables else {
        if let Some(sql) = &options.sql {
            return Err(syn::Error::new_spanned(
                &sql.name,
                "`sql` is audited against `tables = [...]`: declare the tables too (or use \
                 `query = \"…\"`, whose dependencies come from the statement)",
            ));
        }
        return Ok(TokenStream::new());
    };
    let statements: Vec<syn::LitStr> = match &options.sql {
        Some(sql) => vec![sql.value.clone()],
        None => {
            let mut found = Vec::new();
            sql_literals(item.block.to_token_stream(), &mut found);
            found
        }
    };
    if statements.is_empty() {
        return Ok(TokenStream::new());
    }
    #[cfg(feature = "query")]
    if let Some(sql) = &options.sql {
        if let Err(e) = pgcachewatch_query::analyze(&sql.value.value()) {
            if !e.is_refusal() {
                return Err(syn::Error::new_spanned(&sql.value, e.to_string()));
            }
        }
    }
    if cfg!(not(feature = "query")) {
        return Ok(TokenStream::new());
    }
    let name = match &options.name {
        Some(n) => n.value.value(),
        None => item.sig.ident.to_string(),
    };
    let declared = tables.value.elems.iter();
    let declared = quote!(&[#(#declared),*]);
    Ok(quote! {
        #(::pgcachewatch::__private::audit_rule(#name, #statements, #declared);)*
    })
}

/// The functions of sqlx whose first argument is the statement.
const SQLX_QUERIES: &[&str] = &[
    "query",
    "query_as",
    "query_scalar",
    "query_with",
    "query_as_with",
    "query_scalar_with",
    "query_unchecked",
    "query_as_unchecked",
    "query_scalar_unchecked",
];

/// String literals given first to `query(…)`, `query_as::<…>(…)`,
/// `query_scalar!(…)` and friends, anywhere in `tokens`.
fn sql_literals(tokens: TokenStream, out: &mut Vec<syn::LitStr>) {
    use proc_macro2::{Delimiter, TokenTree};
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            TokenTree::Group(g) => sql_literals(g.stream(), out),
            TokenTree::Ident(ident) if SQLX_QUERIES.contains(&ident.to_string().as_str()) => {
                let mut j = i + 1;
                if matches!(tokens.get(j), Some(TokenTree::Punct(p)) if p.as_char() == '!') {
                    j += 1;
                }
                // A turbofish: `::<…>`.
                if matches!(tokens.get(j), Some(TokenTree::Punct(p)) if p.as_char() == ':')
                    && matches!(tokens.get(j + 2), Some(TokenTree::Punct(p)) if p.as_char() == '<')
                {
                    let mut depth = 0usize;
                    j += 2;
                    while let Some(t) = tokens.get(j) {
                        if let TokenTree::Punct(p) = t {
                            match p.as_char() {
                                '<' => depth += 1,
                                '>' => depth = depth.saturating_sub(1),
                                _ => {}
                            }
                        }
                        j += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
                if let Some(TokenTree::Group(g)) = tokens.get(j) {
                    if g.delimiter() == Delimiter::Parenthesis {
                        if let Some(TokenTree::Literal(lit)) = g.stream().into_iter().next() {
                            if let Ok(sql) = syn::parse_str::<syn::LitStr>(&lit.to_string()) {
                                if !out.iter().any(|s| s.value() == sql.value()) {
                                    out.push(syn::LitStr::new(&sql.value(), lit.span()));
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
}
