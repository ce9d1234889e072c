//! A real `redis-server` for the integration tests: the counter store behind the
//! global-budget test engine ([`super::rls_engine`]).
//!
//! [`Redis::start`] runs one on a free 127.0.0.1 port in a fresh temp directory, without
//! persistence (`--save '' --appendonly no`), and returns once it answers there (checked
//! with `INFO server`: the answering process must be the one just started).
//! [`Redis::stop`] and [`Redis::start_again`] take it away and bring a new, empty one
//! back on the same port (what "Redis restarted" looks like to the engine). Dropping it
//! kills the process; when a test panics meanwhile, the tail of its log is printed.
//!
//! The binary is `$TOKENFUSE_REDIS_SERVER` or `redis-server` on `PATH`. Missing, the
//! tests fail (never skip) with the command that installs it.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::envoy::spawn_from_keeper;

/// How long [`Redis::start`] waits for the server to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The `redis-server` binary: `$TOKENFUSE_REDIS_SERVER` or `redis-server` on `PATH`.
/// Panics, with the install command, when it does not run.
pub fn redis_server_binary() -> PathBuf {
    let binary = std::env::var_os("TOKENFUSE_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"));
    let runs = Command::new(&binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        panic!(
            "redis-server not found ({}): install it with \
             `apt-get install -y --no-install-recommends redis-server` (Debian/Ubuntu; \
             `make prerequisites` does it as root), or point TOKENFUSE_REDIS_SERVER at one",
            binary.display()
        );
    }
    binary
}

/// A loopback port nobody listens on at this moment (the OS's choice). Another process
/// may take it before the caller binds it, so callers retry.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
}

/// A fresh, unique temp directory named after `what`.
pub(crate) fn fresh_dir(what: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tokenfuse-{what}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", dir.display()));
    dir
}

/// The last `n` lines of the file at `path` (empty if unreadable).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running `redis-server` on 127.0.0.1.
pub struct Redis {
    /// Its port; the same across [`Redis::start_again`].
    pub port: u16,
    /// Its working directory (empty: no persistence) and `redis.log`.
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Redis {
    /// Starts a server on a free port; returns once it answers.
    pub fn start() -> Redis {
        redis_server_binary(); // fails before leaving a directory behind
        let dir = fresh_dir("redis");
        for _ in 0..5 {
            let redis = Redis {
                port: free_port(),
                dir: dir.clone(),
                child: Mutex::new(None),
            };
            if redis.spawn() {
                return redis;
            }
        }
        panic!(
            "redis-server did not start; {} says:\n{}",
            dir.join("redis.log").display(),
            tail(&dir.join("redis.log"), 30)
        );
    }

    /// Spawns the server on `self.port`; true once it answers, false if it exited (the
    /// port was taken) or never answered.
    fn spawn(&self) -> bool {
        let mut command = Command::new(redis_server_binary());
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child =
            spawn_from_keeper(command).unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        let pid = child.id();
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if !self.is_running() {
                *self.child.lock().unwrap() = None;
                return false;
            }
            // PING alone could be answered by another test's server that took the
            // port first; INFO names the process that answers.
            if self.server_pid() == Some(pid) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// `redis://127.0.0.1:PORT`, as `rls-engine --redis` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command and returns the reply: a status, error or integer line as sent
    /// (`+PONG`, `-ERR …`, `:3`), a bulk string's contents, `$-1` for nil (arrays are
    /// not decoded: their first line is returned).
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end().to_string();
        match line.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            Some(len) => {
                let mut body = vec![0u8; len + 2];
                reader.read_exact(&mut body)?;
                body.truncate(len);
                Ok(String::from_utf8_lossy(&body).into_owned())
            }
            None => Ok(line),
        }
    }

    /// The process id of the server answering on the port (`INFO server`).
    pub fn server_pid(&self) -> Option<u32> {
        let info = self.command(&["INFO", "server"]).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server; its counters go with it.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs and starts a new, empty one on the same port.
    pub fn start_again(&self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.spawn() {
            if Instant::now() > deadline {
                panic!(
                    "redis-server did not start again on port {}; log:\n{}",
                    self.port,
                    tail(&self.dir.join("redis.log"), 30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "---- redis-server log tail ({}) ----\n{}\n---- end of redis-server log ----",
                self.dir.join("redis.log").display(),
                tail(&self.dir.join("redis.log"), 20)
            );
        } else if std::env::var_os("TOKENFUSE_KEEP_ENVOY_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
