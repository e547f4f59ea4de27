//! What the CLI's test files share: running the binary until it says it is ready.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Spawns `cmd` and waits (up to `patience` per line) until a line of its
/// stderr contains `ready`; returns the child, the rest of stderr's lines to
/// come, and that line. `None` (the child killed) if it exits, reports an
/// error (a line starting with `error`) or goes quiet first.
pub fn spawn_ready(
    cmd: &mut Command,
    ready: &str,
    patience: Duration,
) -> Option<(Child, mpsc::Receiver<String>, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(patience) {
            Ok(line) if line.contains(ready) => return Some((child, rx, line)),
            Ok(line) if !line.starts_with("error") => {}
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}
