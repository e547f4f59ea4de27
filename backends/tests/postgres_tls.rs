//! TLS to the real local PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), which runs with `ssl = on` and a
//! certificate signed by `PGCW_TEST_SSLROOTCERT` (default: the self-signed
//! "snakeoil" certificate `/etc/ssl/certs/ssl-cert-snakeoil.pem` it serves):
//! `sslmode=require` and `sslmode=verify-ca` connect (and really use TLS), a
//! root certificate that did not sign the server's is a clear, permanent error.
#![cfg(all(
    feature = "postgres",
    any(feature = "tls-rustls", feature = "tls-native-tls")
))]

use std::path::Path;

use pgcachewatch_backends::postgres::install::status;
use pgcachewatch_backends::postgres::PgListenerSource;
use pgcachewatch_core::Error;
use pgcachewatch_testkit::env::{database_url, unique_name as unique};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// The root certificate of the test server's (`PGCW_TEST_SSLROOTCERT`, else Debian's snakeoil).
fn server_cert() -> String {
    pgcachewatch_testkit::env::server_root_cert()
}

/// The test database's URL with `params` appended.
fn url_with(params: &str) -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// Whether the listener's backend (by pid) talks TLS, from `pg_stat_ssl`.
async fn uses_tls(db: &PgPool, pid: u32) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = $1")
        .bind(i32::try_from(pid).unwrap())
        .fetch_one(db)
        .await
        .unwrap()
}

async fn admin() -> PgPool {
    PgPool::connect(&database_url())
        .await
        .expect("PostgreSQL must be running at DATABASE_URL")
}

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    let db = admin().await;
    let source = PgListenerSource::builder(url_with("sslmode=require"))
        .channel(unique("pgcw_tls_req"))
        .connect()
        .await
        .expect("sslmode=require connects to a server with ssl = on");
    let pid = source.stats().backend_pid.unwrap();
    assert!(
        uses_tls(&db, pid).await,
        "the listener's connection is not TLS"
    );
    source.shutdown().await;

    // The installer and status (any pool) honour it too.
    let tls_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url_with("sslmode=require"))
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&tls_pool)
        .await
        .unwrap();
    assert!(uses_tls(&db, u32::try_from(pid).unwrap()).await);
    status(&tls_pool).await.unwrap();
}

#[tokio::test]
async fn sslmode_verify_ca_with_the_servers_root_certificate_connects() {
    let server_cert = server_cert();
    assert!(Path::new(&server_cert).exists(), "{server_cert} is missing");
    let db = admin().await;
    let url = url_with(&format!("sslmode=verify-ca&sslrootcert={server_cert}"));
    let source = PgListenerSource::builder(&url)
        .channel(unique("pgcw_tls_ca"))
        .connect()
        .await
        .expect("verify-ca with the server's own certificate as root connects");
    let pid = source.stats().backend_pid.unwrap();
    assert!(uses_tls(&db, pid).await);
    source.shutdown().await;

    // From a pool with the same options: the listener inherits the TLS settings.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let source = PgListenerSource::from_pool(&pool)
        .channel(unique("pgcw_tls_pool"))
        .connect()
        .await
        .unwrap();
    assert!(uses_tls(&db, source.stats().backend_pid.unwrap()).await);
    source.shutdown().await;
}

#[tokio::test]
// native-tls (OpenSSL) always trusts the system's CA directory as well as
// sslrootcert, and Debian links the snakeoil certificate into /etc/ssl/certs, so
// no root file can make it fail here. sqlx picks native-tls when both TLS
// features are on (`--all-features`); `.ci/test` runs this file again with
// rustls alone.
#[cfg_attr(
    feature = "tls-native-tls",
    ignore = "with native-tls the system CA directory (holding the snakeoil cert) is trusted too; .ci/test runs this with tls-rustls alone"
)]
async fn a_wrong_root_certificate_is_a_clear_permanent_error() {
    // A root file that did not sign the server's certificate: the system's CA
    // bundle (public CAs only), or, failing that, a certificate of our own.
    let wrong = wrong_root_certificate();
    let url = url_with(&format!(
        "sslmode=verify-ca&sslrootcert={}",
        wrong.display()
    ));
    let err = PgListenerSource::builder(&url)
        .channel(unique("pgcw_tls_bad"))
        .connect()
        .await
        .expect_err("an untrusted server certificate must not connect");
    match &err {
        Error::Connection { temporary, .. } => assert!(!temporary, "retrying cannot help: {err}"),
        other => panic!("expected a connection error, got {other:?}"),
    }
    let text = err.to_string();
    let full = format!("{text} {:?}", std::error::Error::source(&err));
    assert!(full.contains("TLS"), "{full}");
    assert!(full.contains("sslmode=verify-ca"), "{full}");
    assert!(full.contains("sslrootcert"), "{full}");
    assert!(full.to_lowercase().contains("certificate"), "{full}");
}

/// Another CA: the system bundle, else a fresh self-signed certificate made with
/// the `openssl` command.
fn wrong_root_certificate() -> std::path::PathBuf {
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        return bundle.to_path_buf();
    }
    let dir = std::env::temp_dir().join(unique("pgcw_tls_wrong"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not-the-server",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("neither a CA bundle nor the openssl command is available")
        .status
        .success();
    assert!(ok, "openssl could not make a certificate");
    cert
}
