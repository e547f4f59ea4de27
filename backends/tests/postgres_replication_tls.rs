//! TLS on the replication connection, from the URL's `sslmode` and
//! `sslrootcert`, against the test server (`ssl = on`, a certificate signed by
//! `PGCW_TEST_SSLROOTCERT`, default Debian's self-signed "snakeoil" one): `require` and `verify-ca` stream over TLS (checked in
//! `pg_stat_ssl`), `disable` does not, and a root that did not sign the server's
//! certificate is a clear, permanent error.
#![cfg(feature = "replication")]

#[path = "support/replication.rs"]
mod support;

use std::path::Path;

use pgcachewatch_backends::replication::PgReplicationSource;
use pgcachewatch_core::Error;
use pgcachewatch_testkit::env::database_url;
use support::Fixture;

fn url_with(params: &str) -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

async fn streams_over_tls(f: &Fixture, params: &str) -> bool {
    let slot = f.slot();
    let source = PgReplicationSource::builder(url_with(params))
        .slot(&slot)
        .publication(&f.publication)
        .create_slot_if_missing(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{params}: {e}"));
    let pid = source.stats().backend_pid.expect("a walsender pid");
    let tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = $1")
        .bind(i32::try_from(pid).unwrap())
        .fetch_one(&f.db)
        .await
        .unwrap();
    source.shutdown().await;
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_and_sslrootcert_are_honoured() {
    let server_cert = pgcachewatch_testkit::env::server_root_cert();
    if !Path::new(&server_cert).exists() {
        eprintln!("skipped: no {server_cert}");
        return;
    }
    let f = Fixture::new("pgcw_rtls").await;
    assert!(streams_over_tls(&f, "sslmode=require").await);
    assert!(streams_over_tls(&f, &format!("sslmode=verify-ca&sslrootcert={server_cert}")).await);
    assert!(!streams_over_tls(&f, "sslmode=disable").await);

    // A root that did not sign the server's certificate: the system's bundle of
    // public CAs.
    let wrong = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !wrong.exists() {
        eprintln!("wrong-root check skipped: no CA bundle");
        f.cleanup().await;
        return;
    }
    let err = PgReplicationSource::builder(url_with(&format!(
        "sslmode=verify-ca&sslrootcert={}",
        wrong.display()
    )))
    .slot(f.slot())
    .publication(&f.publication)
    .create_slot_if_missing(true)
    .connect()
    .await
    .expect_err("a wrong root certificate must fail");
    assert!(
        matches!(
            err,
            Error::Connection {
                temporary: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().to_lowercase().contains("tls"), "{err}");
    f.cleanup().await;
}
