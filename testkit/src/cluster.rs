//! A throw-away PostgreSQL cluster of a test's own: [`OwnPostgres`].
//!
//! Tests that need server settings nobody else should see (a synchronous
//! standby that never connects, a restart, a fault) start their own cluster
//! instead of reconfiguring the shared one: `initdb` in a temporary directory,
//! a free port on 127.0.0.1, trust authentication, `wal_level = logical`, and
//! the settings the test asks for. Dropping it stops the server (immediate
//! shutdown) and removes the directory.
//!
//! The binaries are found through `PG_BINDIR`, then `pg_config --bindir`, then
//! `/usr/lib/postgresql/*/bin`. Run as root (as CI does), the cluster belongs
//! to the `postgres` user (`initdb` refuses root) and its commands run through
//! `runuser`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a throw-away cluster could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL's server binaries (initdb, pg_ctl) were not found: install PostgreSQL \
         (Debian: apt-get install postgresql) or set PG_BINDIR"
    )]
    NoBinaries,
    /// A command failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command that failed.
        command: String,
        /// Its exit status and error output.
        detail: String,
    },
    /// A file or directory could not be made.
    #[error("preparing the cluster directory failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A PostgreSQL cluster of this process's own, stopped and removed on drop.
///
/// ```no_run
/// use pgcachewatch::testkit::cluster::OwnPostgres;
/// let pg = OwnPostgres::start(&["synchronous_standby_names = 'nobody'"]).unwrap();
/// println!("{}", pg.url("postgres"));
/// ```
pub struct OwnPostgres {
    port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    as_postgres: bool,
}

impl fmt::Debug for OwnPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnPostgres")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish()
    }
}

/// Where `initdb` and `pg_ctl` are, if anywhere.
pub fn server_bindir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|dir| dir.join("initdb").exists());
    if from_pg_config.is_some() {
        return from_pg_config;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl OwnPostgres {
    /// Initializes and starts a cluster with `settings` (lines of
    /// `postgresql.conf`, e.g. `"synchronous_standby_names = 'x'"`) on top of
    /// `wal_level = logical`, `fsync = off` and trust authentication.
    pub fn start(settings: &[&str]) -> Result<OwnPostgres, ClusterError> {
        let bindir = server_bindir().ok_or(ClusterError::NoBinaries)?;
        let dir = std::env::temp_dir().join(crate::env::unique_name("pgcw_cluster"));
        std::fs::create_dir_all(&dir)?;
        let as_postgres = is_root();
        let me = OwnPostgres {
            port: crate::env::free_local_port()?,
            dir,
            bindir,
            as_postgres,
        };
        if as_postgres {
            me.run("chown", &["postgres:", &me.dir.to_string_lossy()], false)?;
        }
        let data = me.data_dir();
        me.run(
            &me.bin("initdb"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            true,
        )?;
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             fsync = off\nfull_page_writes = off\n",
            me.port,
            me.dir.display()
        );
        for line in settings {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)?;
        me.pg_ctl(&["start", "-w", "-t", "60", "-l", &me.log_path()])?;
        Ok(me)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The cluster's directory: its data, its log and its socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Leaves the server running and its directory in place (dropping no
    /// longer stops and removes them), and returns the shell command that
    /// does it later.
    pub fn keep(self) -> String {
        let me = std::mem::ManuallyDrop::new(self);
        let runuser = if me.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{runuser}{} -D {} stop -m fast && rm -rf {}",
            me.bin("pg_ctl"),
            me.data_dir().display(),
            me.dir.display()
        )
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server (fast shutdown) and starts it again, settings kept.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&[
            "restart",
            "-w",
            "-m",
            "fast",
            "-t",
            "60",
            "-l",
            &self.log_path(),
        ])
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> String {
        self.dir.join("server.log").to_string_lossy().into_owned()
    }

    fn bin(&self, name: &str) -> String {
        self.bindir.join(name).to_string_lossy().into_owned()
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), ClusterError> {
        let data = self.data_dir().to_string_lossy().into_owned();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run(&self.bin("pg_ctl"), &all, true)
    }

    /// Runs `program` (as `postgres` when `as_owner` and we are root).
    fn run(&self, program: &str, args: &[&str], as_owner: bool) -> Result<(), ClusterError> {
        let mut command = if as_owner && self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let output = command
            .args(args)
            .current_dir(Path::new("/"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ClusterError::Command {
                command: program.to_owned(),
                detail: e.to_string(),
            })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command {
                command: format!("{program} {}", args.join(" ")),
                detail: format!(
                    "{}: {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim(),
                    String::from_utf8_lossy(&output.stdout).trim()
                ),
            })
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
