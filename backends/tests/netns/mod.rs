//! A network of separate hosts on one machine, for fault tests: each host a
//! network namespace (the test process's own namespace is one of them), its
//! interface a TUN device, and the wire between them this process — a small
//! IPv4 switch that forwards every packet, and drops it (a partition), drops a
//! share of them at random (loss) or holds them (delay) as the test says, per
//! pair of hosts.
//!
//! Why not veth pairs and `tc netem`: the kernel of the machines this project
//! runs on (CI's included) has no `sch_netem` (nor `prio`, nor the `gact`
//! action), so neither delay nor loss can be put on a veth; a userspace wire
//! needs only `/dev/net/tun`, `ip netns` and root. The hosts' TCP stacks are
//! real and separate: a partition is silence (retransmissions into nothing, a
//! connection half-open until something notices), loss is lost segments
//! (retransmitted by TCP), delay is per packet and in order.
//!
//! Everything made here is removed when the [`Lab`] is dropped, panics
//! included: the processes started in the namespaces are killed, the
//! namespaces deleted; the TUN devices go away with this process's file
//! descriptors, so even a killed test leaves none. A run first removes what a
//! killed run left (namespaces of the names below), holding a lock file so
//! that two runs never share them. `bash backends/tests/netns/run.sh clean`
//! does the same by hand.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Every namespace this module may create: a run removes leftovers of these.
pub const NAMESPACES: &[&str] = &["pgcw_nats", "pgcw_relay", "pgcw_n1", "pgcw_n2", "pgcw_n3"];

/// The hosts' network, 10.213.77.0/24.
pub fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 213, 77, last)
}

/// One host: a name, its namespace (`None`: this process's own), its address.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub name: &'static str,
    pub netns: Option<&'static str>,
    pub ip: Ipv4Addr,
}

/// What the wire does between two hosts (both directions).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// Drop every packet: a partition.
    pub cut: bool,
    /// Drop this share of packets at random (0.05: 5 %).
    pub loss: f64,
    /// Hold every packet this long (each direction), in order.
    pub delay: Duration,
}

/// Packets the wire forwarded, dropped or held.
#[derive(Debug, Default)]
pub struct WireCounters {
    pub forwarded: AtomicU64,
    pub cut: AtomicU64,
    pub lost: AtomicU64,
    pub delayed: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireStats {
    pub forwarded: u64,
    pub cut: u64,
    pub lost: u64,
    pub delayed: u64,
}

impl std::ops::Sub for WireStats {
    type Output = WireStats;
    fn sub(self, o: WireStats) -> WireStats {
        WireStats {
            forwarded: self.forwarded - o.forwarded,
            cut: self.cut - o.cut,
            lost: self.lost - o.lost,
            delayed: self.delayed - o.delayed,
        }
    }
}

/// Why the lab cannot run here.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and TUN devices need CAP_NET_ADMIN)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    let probe = format!(
        "pgcw_probe_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    match Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::piped())
        .output()
    {
        Err(e) => return Some(format!("`ip` (iproute2) cannot be run: {e}")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "`ip netns add` is not permitted: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    None
}

/// Runs `ip` with `args`, panicking with its error output if it fails.
pub fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists() || Path::new("/var/run/netns").join(ns).exists()
}

/// Kills every process in `ns` (all started by a run of this suite) and
/// deletes the namespace.
pub fn remove_netns(ns: &str) {
    if !netns_exists(ns) {
        return;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill with a pid read from `ip netns pids`.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for _ in 0..50 {
        let busy = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if !busy {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

const TUNSETIFF: u64 = 0x4004_54ca;

/// A TUN device named `name` in this process's namespace, non-blocking.
fn open_tun(name: &str) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    assert!(
        name.len() < libc::IFNAMSIZ,
        "interface name too long: {name}"
    );
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

type Rules = HashMap<(usize, usize), Link>;

/// Packets held back: when due, an order among equals, where to, the packet.
type Held = BinaryHeap<Reverse<(Instant, u64, usize, Vec<u8>)>>;

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// The switch: forwards packets between the hosts' TUN devices.
struct Wire {
    fds: Vec<OwnedFd>,
    ips: Vec<Ipv4Addr>,
    rules: Arc<Mutex<Rules>>,
    counters: Arc<WireCounters>,
    stop: Arc<AtomicBool>,
}

impl Wire {
    fn run(self) {
        let mut held: Held = BinaryHeap::new();
        let mut last_due: HashMap<(usize, usize), Instant> = HashMap::new();
        let mut seq = 0u64;
        let mut buf = vec![0u8; 65_536];
        let mut polls: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = held
                .peek()
                .map_or(Duration::from_millis(20), |Reverse((due, ..))| {
                    due.saturating_duration_since(now)
                })
                .min(Duration::from_millis(20));
            // Round up: never spin on a deadline less than a millisecond away.
            let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
            // SAFETY: `polls` is a valid array of pollfd of this length.
            let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
            if n > 0 {
                let rules = self.rules.lock().clone();
                for (from, poll) in polls.iter().enumerate() {
                    if poll.revents & libc::POLLIN == 0 {
                        continue;
                    }
                    for _ in 0..256 {
                        let Some(len) = read_packet(poll.fd, &mut buf) else {
                            break;
                        };
                        self.route(
                            from,
                            &buf[..len],
                            &rules,
                            &mut held,
                            &mut last_due,
                            &mut seq,
                        );
                    }
                }
            }
            let now = Instant::now();
            while held.peek().is_some_and(|Reverse((due, ..))| *due <= now) {
                let Some(Reverse((_, _, to, packet))) = held.pop() else {
                    break;
                };
                self.deliver(to, &packet);
            }
        }
    }

    fn route(
        &self,
        from: usize,
        packet: &[u8],
        rules: &Rules,
        held: &mut Held,
        last_due: &mut HashMap<(usize, usize), Instant>,
        seq: &mut u64,
    ) {
        // IPv4 only (the hosts' IPv6 chatter goes nowhere).
        if packet.len() < 20 || packet[0] >> 4 != 4 {
            return;
        }
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let Some(to) = self.ips.iter().position(|ip| *ip == dst) else {
            return;
        };
        if to == from {
            return;
        }
        let link = rules.get(&pair(from, to)).copied().unwrap_or_default();
        let c = &self.counters;
        if link.cut {
            c.cut.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if link.loss > 0.0 && rand::random::<f64>() < link.loss {
            c.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let direction = (from, to);
        let pending = last_due
            .get(&direction)
            .is_some_and(|due| *due > Instant::now());
        if link.delay.is_zero() && !pending {
            self.deliver(to, packet);
            return;
        }
        // In order within a direction: never before a packet held earlier.
        let mut due = Instant::now() + link.delay;
        if let Some(last) = last_due.get(&direction) {
            due = due.max(*last);
        }
        last_due.insert(direction, due);
        *seq += 1;
        c.delayed.fetch_add(1, Ordering::Relaxed);
        held.push(Reverse((due, *seq, to, packet.to_vec())));
    }

    fn deliver(&self, to: usize, packet: &[u8]) {
        // SAFETY: writes `packet` to an open TUN descriptor.
        let n = unsafe {
            libc::write(
                self.fds[to].as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
            )
        };
        if n >= 0 {
            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn read_packet(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reads into `buf`, within its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then_some(n as usize)
}

/// A process started on a host, killed when dropped. Its output goes to a log.
pub struct Proc {
    pub name: String,
    netns: Option<String>,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display())),
        );
    }

    /// The process id (`ip netns exec` execs the program: it is the program's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks it to stop (SIGINT), then kills it if it has not within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(c) = &mut self.child {
            // SAFETY: signals the child this Proc started and has not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let until = Instant::now() + grace;
            while Instant::now() < until {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// Starts it again with the same command.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines of {}'s log:\n{}",
                self.name,
                self.log_tail(25)
            );
        }
    }
}

/// The hosts, the wire between them, and a directory for logs and stores.
pub struct Lab {
    hosts: Vec<HostSpec>,
    rules: Arc<Mutex<Rules>>,
    counters: Arc<WireCounters>,
    stop: Arc<AtomicBool>,
    wire: Option<JoinHandle<()>>,
    dir: PathBuf,
    keep_dir: bool,
    _lock: File,
}

impl Lab {
    /// Makes the hosts (`netns: None` is this process's namespace) and starts
    /// the wire. Takes the suite's lock first and removes a killed run's leftovers.
    pub fn start(hosts: Vec<HostSpec>) -> Lab {
        let lock = File::create(std::env::temp_dir().join("pgcw_netfaults.lock")).expect("lock");
        // SAFETY: flock on an open descriptor; blocks until the other run is done.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        for ns in NAMESPACES {
            remove_netns(ns);
        }
        let dir = std::env::temp_dir().join(format!(
            "pgcw_netfaults_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("lab dir");
        let stop = Arc::new(AtomicBool::new(false));
        let mut lab = Lab {
            hosts: hosts.clone(),
            rules: Arc::default(),
            counters: Arc::default(),
            stop: stop.clone(),
            wire: None,
            dir,
            keep_dir: false,
            _lock: lock,
        };
        let mut fds = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            let dev = format!("pgcwt{i}_{}", h.name);
            let dev = &dev[..dev.len().min(15)];
            let fd = open_tun(dev).unwrap_or_else(|e| panic!("TUN device {dev}: {e}"));
            let addr = format!("{}/24", h.ip);
            match h.netns {
                Some(ns) => {
                    ip_cmd(&["netns", "add", ns]);
                    ip_cmd(&["link", "set", "dev", dev, "netns", ns]);
                    ip_cmd(&["-n", ns, "link", "set", "lo", "up"]);
                    ip_cmd(&["-n", ns, "addr", "add", &addr, "dev", dev]);
                    ip_cmd(&["-n", ns, "link", "set", dev, "up"]);
                }
                None => {
                    ip_cmd(&["addr", "add", &addr, "dev", dev]);
                    ip_cmd(&["link", "set", dev, "up"]);
                }
            }
            fds.push(fd);
        }
        let wire = Wire {
            fds,
            ips: hosts.iter().map(|h| h.ip).collect(),
            rules: lab.rules.clone(),
            counters: lab.counters.clone(),
            stop,
        };
        lab.wire = Some(
            std::thread::Builder::new()
                .name("netns-wire".into())
                .spawn(move || wire.run())
                .expect("wire thread"),
        );
        lab
    }

    /// The directory for logs and stores (removed on drop unless kept).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the directory (logs) after the lab is gone, e.g. when a test failed.
    pub fn keep_logs(&mut self) {
        self.keep_dir = true;
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    pub fn host(&self, name: &str) -> &HostSpec {
        &self.hosts[self.index(name)]
    }

    /// Sets the wire between `a` and `b` (both directions).
    pub fn link(&self, a: &str, b: &str, link: Link) {
        let key = pair(self.index(a), self.index(b));
        let mut rules = self.rules.lock();
        if link == Link::default() {
            rules.remove(&key);
        } else {
            rules.insert(key, link);
        }
    }

    /// Cuts `a` off from `b`.
    pub fn cut(&self, a: &str, b: &str) {
        self.link(
            a,
            b,
            Link {
                cut: true,
                ..Link::default()
            },
        );
    }

    /// A perfect wire everywhere again.
    pub fn heal_all(&self) {
        self.rules.lock().clear();
    }

    pub fn wire_stats(&self) -> WireStats {
        let c = &self.counters;
        WireStats {
            forwarded: c.forwarded.load(Ordering::Relaxed),
            cut: c.cut.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
        }
    }

    /// A process on `host` (not started yet: [`Lab::start_proc`]).
    pub fn proc(
        &self,
        host: &str,
        name: &str,
        program: impl Into<PathBuf>,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Proc {
        let h = self.host(host);
        Proc {
            name: name.to_owned(),
            netns: h.netns.map(str::to_owned),
            program: program.into(),
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log: self.dir.join(format!("{name}.log")),
            child: None,
        }
    }

    /// Starts a process made by [`Lab::proc`].
    pub fn start_proc(&self, p: &mut Proc) {
        p.spawn();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(wire) = self.wire.take() {
            let _ = wire.join();
        }
        for h in &self.hosts {
            if let Some(ns) = h.netns {
                remove_netns(ns);
            }
        }
        let keep = std::env::var_os("PGCW_NETFAULTS_KEEP_LOGS").is_some();
        if self.keep_dir || keep || std::thread::panicking() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
