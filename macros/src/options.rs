//! The attribute's options: `#[cached(name = "…", capacity = …, …)]`.

use syn::meta::ParseNestedMeta;
use syn::{Expr, ExprArray, Ident, LitBool, LitStr, Type};

/// One option as written: its name (for errors) and its value.
pub(crate) struct Opt<T> {
    pub(crate) name: Ident,
    pub(crate) value: T,
}

/// `ttl = "60s"` (read at compile time) or `ttl = <Duration expression>`.
pub(crate) enum Ttl {
    Nanos(u64),
    Expr(Expr),
}

#[derive(Default)]
pub(crate) struct Options {
    pub(crate) name: Option<Opt<LitStr>>,
    pub(crate) capacity: Option<Opt<Expr>>,
    pub(crate) ttl: Option<Opt<Ttl>>,
    pub(crate) tables: Option<Opt<ExprArray>>,
    pub(crate) key: Option<Opt<Expr>>,
    pub(crate) key_type: Option<Opt<Type>>,
    pub(crate) cache: Option<Opt<Expr>>,
    pub(crate) strategy: Option<Opt<Expr>>,
    pub(crate) source: Option<Opt<LitStr>>,
    pub(crate) query: Option<Opt<LitStr>>,
    pub(crate) strict: Option<Opt<LitBool>>,
    pub(crate) sql: Option<Opt<LitStr>>,
}

const KNOWN: &str = "`name`, `capacity`, `ttl`, `tables`, `key`, `key_type`, `cache`, `strategy`, \
     `source`, `sql` or `query` (with `strict`)";

fn set<T>(slot: &mut Option<Opt<T>>, name: &Ident, value: T) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new_spanned(
            name,
            format!("`{name}` is given twice"),
        ));
    }
    *slot = Some(Opt {
        name: name.clone(),
        value,
    });
    Ok(())
}

impl Options {
    pub(crate) fn parse(&mut self, meta: ParseNestedMeta<'_>) -> syn::Result<()> {
        let Some(name) = meta.path.get_ident().cloned() else {
            return Err(meta.error(format!("unknown option; expected {KNOWN}")));
        };
        match name.to_string().as_str() {
            "name" => set(&mut self.name, &name, meta.value()?.parse()?),
            "capacity" => set(&mut self.capacity, &name, meta.value()?.parse()?),
            "ttl" => {
                let value: Expr = meta.value()?.parse()?;
                let ttl = match &value {
                    Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(text),
                        ..
                    }) => Ttl::Nanos(crate::ttl::parse(&text.value()).map_err(|e| {
                        syn::Error::new_spanned(
                            text,
                            format!("{e} (write a duration such as \"60s\", \"1m30s\" or \"250ms\", or a `Duration` expression)"),
                        )
                    })?),
                    Expr::Lit(other) => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "write the time-to-live as text with a unit (\"60s\") or as a `Duration` expression",
                        ))
                    }
                    _ => Ttl::Expr(value),
                };
                set(&mut self.ttl, &name, ttl)
            }
            "tables" => {
                let value: Expr = meta.value()?.parse()?;
                let Expr::Array(array) = value else {
                    return Err(syn::Error::new_spanned(
                        value,
                        "expected the tables as a list: `tables = [\"users\", \"public.orders\"]`",
                    ));
                };
                if array.elems.is_empty() {
                    return Err(syn::Error::new_spanned(
                        array,
                        "an empty list of tables: leave `tables` out for an entry that depends on every table",
                    ));
                }
                set(&mut self.tables, &name, array)
            }
            "key" => set(&mut self.key, &name, meta.value()?.parse()?),
            "key_type" => set(&mut self.key_type, &name, meta.value()?.parse()?),
            "cache" => set(&mut self.cache, &name, meta.value()?.parse()?),
            "strategy" => set(&mut self.strategy, &name, meta.value()?.parse()?),
            "source" => set(&mut self.source, &name, meta.value()?.parse()?),
            "query" => set(&mut self.query, &name, meta.value()?.parse()?),
            "strict" => set(&mut self.strict, &name, meta.value()?.parse()?),
            "sql" => set(&mut self.sql, &name, meta.value()?.parse()?),
            _ => Err(syn::Error::new_spanned(
                &name,
                format!("unknown option `{name}`; expected {KNOWN}"),
            )),
        }
    }
}
