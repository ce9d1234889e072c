//! Processes for the engine's black-box tests: a real `redis-server` on a free loopback
//! port ([`Redis`]) and the built `rls-engine` binary ([`Engine`]), both killed on drop.
//!
//! `redis-server` is `$TOKENFUSE_REDIS_SERVER` or the one on `PATH`; when missing, the
//! tests fail with the command that installs it (they never skip). Each process logs to a
//! file in its own temp directory; a test that fails while one is alive prints its tail.
#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a process may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh, unique temp directory.
fn fresh_dir(what: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir =
        std::env::temp_dir().join(format!("rls-engine-test-{what}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port nobody listens on right now (the OS's pick; another process could
/// take it before ours binds, hence the callers' retries).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends `signal` (e.g. `TERM`) to `child` with `kill(1)`.
fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {} failed", child.id());
}

/// Waits up to `timeout` for `child` to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- Redis

/// The `redis-server` binary. Panics, saying how to install it, when there is none.
pub fn redis_server_binary() -> PathBuf {
    let name = std::env::var_os("TOKENFUSE_REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
    let found = Command::new(&name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        panic!(
            "redis-server not found ({}): install it with `apt-get install -y --no-install-recommends redis-server` \
             (Debian/Ubuntu) or set TOKENFUSE_REDIS_SERVER to its path",
            PathBuf::from(&name).display()
        );
    }
    PathBuf::from(name)
}

/// A `redis-server` on 127.0.0.1, without persistence, in a temp directory.
pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> Redis {
        redis_server_binary(); // fails before leaving a directory behind
        let dir = fresh_dir("redis");
        for _ in 0..5 {
            let port = free_port();
            let mut redis = Redis {
                port,
                dir: dir.clone(),
                child: None,
            };
            if redis.spawn() {
                return redis;
            }
        }
        panic!(
            "redis-server did not start; log:\n{}",
            tail(&dir.join("redis.log"), 30)
        );
    }

    /// Spawns on `self.port`; true once PING answers.
    fn spawn(&mut self) -> bool {
        let log = self.dir.join("redis.log");
        let child = Command::new(redis_server_binary())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false; // e.g. the port was taken meanwhile
            }
            // PING alone could be answered by another test's server that took the
            // port first; INFO names the process that answers.
            if self.server_pid() == Some(pid) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `redis://127.0.0.1:PORT`.
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

    /// Kills the server (its data goes with it: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new, empty server on the same port.
    pub fn start_again(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on {}",
                self.port
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "---- redis log ----\n{}",
                tail(&self.dir.join("redis.log"), 20)
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------- Engine

/// A running `rls-engine` (this package's binary).
pub struct Engine {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    redis_url: String,
    extra_args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Engine {
    /// Starts the engine on a port of its choosing with `limits_yaml` as its limits file.
    pub fn start(redis_url: &str, limits_yaml: &str) -> Engine {
        Engine::start_with(redis_url, limits_yaml, &[])
    }

    /// As [`Engine::start`], with more command-line arguments.
    pub fn start_with(redis_url: &str, limits_yaml: &str, extra_args: &[&str]) -> Engine {
        let dir = fresh_dir("engine");
        fs::write(dir.join("limits.yaml"), limits_yaml).unwrap();
        let mut engine = Engine {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            redis_url: redis_url.to_string(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            starts: 0,
        };
        engine
            .spawn("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("{e}"));
        engine
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("engine-{}.log", self.starts))
    }

    /// Spawns the binary on `listen` and reads its `listening on` line.
    fn spawn(&mut self, listen: &str) -> Result<(), String> {
        self.starts += 1;
        let log = fs::File::create(self.log_path()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_rls-engine"))
            .args(["--listen", listen, "--redis", &self.redis_url, "--verbose"])
            .arg("--limits")
            .arg(self.dir.join("limits.yaml"))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start rls-engine: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok());
        match addr {
            Some(addr) => {
                self.addr = addr;
                self.child = Some(child);
                Ok(())
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "rls-engine did not report its address (stdout {line:?}); log:\n{}",
                    tail(&self.log_path(), 30)
                ))
            }
        }
    }

    /// SIGTERM, then waits for the exit; returns the status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("engine is running");
        signal(&child, "TERM");
        wait_exit(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("rls-engine still running 10 s after SIGTERM")
        })
    }

    /// Starts the engine again on the same address (after [`Engine::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop the engine first");
        let listen = self.addr.to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(&listen) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart on {listen}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("---- rls-engine log ----\n{}", tail(&self.log_path(), 30));
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
