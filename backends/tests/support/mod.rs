//! Shared by the NATS tests: a relay + source pair on a fresh stream, and a
//! private nats-server for tests that restart it or need authentication.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgcachewatch_backends::nats::{NatsConnect, StreamSettings};
use pgcachewatch_testkit::env::unique_name;

/// A stream of its own (in memory), so tests never see each other's messages.
pub fn fresh_stream() -> StreamSettings {
    let name = unique_name("pgcwt");
    StreamSettings::new()
        .stream(name.to_uppercase())
        .subject_prefix(name)
        .memory(true)
}

/// Deletes a test's stream (best effort).
pub async fn delete_stream(url: &str, stream: &StreamSettings) {
    if let Ok(client) = NatsConnect::new(url).connect().await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(stream.name()).await;
    }
}

/// A nats-server of this test's own, on a free port, with a temporary store.
pub struct OwnNats {
    pub port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn nats_server_binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        for p in [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ] {
            if std::path::Path::new(p).exists() {
                return p.to_owned();
            }
        }
        "nats-server".to_owned()
    })
}

impl OwnNats {
    /// Starts one with JetStream and `extra` arguments (`--user`, `--auth`, …).
    pub async fn start(extra: &[&str]) -> OwnNats {
        let dir = std::env::temp_dir().join(unique_name("pgcw_nats"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut me = OwnNats {
            port: free_port(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
        };
        me.spawn().await;
        me
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (see .ci/ensure-nats)");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("own nats-server did not start on port {}", self.port);
    }

    /// Kills the server (the store stays) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
