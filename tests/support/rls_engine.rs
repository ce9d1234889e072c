//! The global-budget test engine (`tools/rls-engine`: Limitador with Redis storage behind
//! Envoy's `RateLimitService` gRPC API) as a process for the integration tests.
//!
//! [`RlsEngine::start`] writes the limits (Limitador's YAML, see [`budget_limit_yaml`])
//! into a fresh temp directory, starts the engine on a port of its choosing against a
//! [`Redis`], and returns once the engine has printed `listening on 127.0.0.1:PORT`.
//! [`RlsEngine::stop`] (SIGTERM) or [`RlsEngine::kill`] (SIGKILL) take it away mid-test;
//! [`RlsEngine::start_again`] brings it back on the *same* port, so an Envoy cluster
//! pointing at it ([`RlsEngine::envoy_cluster_yaml`]) reaches it again. Counters live in
//! Redis and survive restarts. Dropping it kills the process; when a test panics
//! meanwhile, the tail of its log is printed.
//!
//! The binary is `$TOKENFUSE_RLS_ENGINE` or `<repo>/target/rls-engine/debug/rls-engine`
//! (what `make rls-engine` builds). Missing, the tests fail (never skip) saying how to
//! build it.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::envoy::{repo_root, spawn_from_keeper};
use super::redis::{fresh_dir, tail, Redis};

/// How long a start may take until `listening on …`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The rate limit domain the filter sends by default (the limits' `namespace`).
pub const DOMAIN: &str = "tokenfuse";

/// The engine binary: `$TOKENFUSE_RLS_ENGINE` or the debug build under `target/`.
/// Panics, saying how to build it, when it is missing.
pub fn rls_engine_binary() -> PathBuf {
    let path = std::env::var_os("TOKENFUSE_RLS_ENGINE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/rls-engine/debug/rls-engine"));
    if !path.is_file() {
        panic!(
            "rls-engine not found at {}: run `make rls-engine` (cargo build --manifest-path \
             tools/rls-engine/Cargo.toml --target-dir target/rls-engine), or point \
             TOKENFUSE_RLS_ENGINE at the binary",
            path.display()
        );
    }
    path
}

/// One Limitador limit for a global budget as the filter describes it: a descriptor
/// `[("budget", name), ("key", <tenant/identity>)]`, first in the request, namespace
/// [`DOMAIN`]; one counter per key, `max_value` per `seconds` (the window starts at a
/// key's first charge). The same YAML works for a real Limitador.
pub fn budget_limit_yaml(name: &str, max_value: u64, seconds: u64) -> String {
    format!(
        "- namespace: {DOMAIN}\n  name: {name}\n  max_value: {max_value}\n  seconds: {seconds}\n  \
         conditions:\n    - \"descriptors[0].budget == '{name}'\"\n  variables:\n    - \
         \"descriptors[0].key\"\n"
    )
}

/// A running (or stopped, between [`RlsEngine::stop`] and [`RlsEngine::start_again`])
/// rls-engine.
pub struct RlsEngine {
    /// The port, chosen at the first start and kept across restarts.
    pub port: u16,
    /// Holds `limits.yaml` and one `engine-N.log` per start.
    pub dir: PathBuf,
    redis_url: String,
    extra_args: Vec<String>,
    starts: AtomicU32,
    child: Mutex<Option<Child>>,
}

impl RlsEngine {
    /// Starts the engine against `redis` with `limits_yaml` as its limits file.
    pub fn start(redis: &Redis, limits_yaml: &str) -> RlsEngine {
        RlsEngine::start_with(&redis.url(), limits_yaml, &[])
    }

    /// As [`RlsEngine::start`], with a Redis URL and more arguments (e.g.
    /// `["--rate-limit-headers", "DRAFT_VERSION_03"]`; `--verbose` is always on).
    pub fn start_with(redis_url: &str, limits_yaml: &str, extra_args: &[&str]) -> RlsEngine {
        rls_engine_binary(); // fails before leaving a directory behind
        let dir = fresh_dir("rls-engine");
        fs::write(dir.join("limits.yaml"), limits_yaml)
            .unwrap_or_else(|e| panic!("cannot write the limits file: {e}"));
        let mut engine = RlsEngine {
            port: 0,
            dir,
            redis_url: redis_url.to_string(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            starts: AtomicU32::new(0),
            child: Mutex::new(None),
        };
        let addr = engine
            .spawn("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("rls-engine did not start: {e}"));
        engine.port = addr.port();
        engine
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The log of the current (or last) run: limits loaded, one line per call (counts and
    /// verdicts), storage errors, signals.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .join(format!("engine-{}.log", self.starts.load(Ordering::SeqCst)))
    }

    /// Spawns the binary on `listen`, reads its `listening on` line, returns the address.
    fn spawn(&self, listen: &str) -> Result<SocketAddr, String> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        let log = fs::File::create(self.log_path())
            .unwrap_or_else(|e| panic!("cannot create the engine log: {e}"));
        let mut command = Command::new(rls_engine_binary());
        command
            .args(["--listen", listen, "--redis", &self.redis_url, "--verbose"])
            .arg("--limits")
            .arg(self.dir.join("limits.yaml"))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child =
            spawn_from_keeper(command).map_err(|e| format!("cannot run rls-engine: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        match line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        {
            Some(addr) => {
                *self.child.lock().unwrap() = Some(child);
                Ok(addr)
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "no `listening on` line (stdout {line:?}); {} says:\n{}",
                    self.log_path().display(),
                    tail(&self.log_path(), 30)
                ))
            }
        }
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the engine gracefully (SIGTERM) and returns its exit status (0 when it
    /// stopped as designed). Panics if it is not running or outlives 10 s.
    pub fn stop(&self) -> ExitStatus {
        let mut child = self
            .child
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| panic!("rls-engine is not running"));
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            let _ = child.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "rls-engine still running 10 s after SIGTERM; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the engine at once (SIGKILL): no goodbye to open connections.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the engine again on the same port, with the same limits and Redis (after
    /// [`RlsEngine::stop`] or [`RlsEngine::kill`]). Retries while the port is still held.
    pub fn start_again(&self) {
        if self.is_running() {
            panic!("rls-engine is still running; stop or kill it first");
        }
        let listen = self.addr().to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(&listen) {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("rls-engine did not start again on {listen}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// True when the port speaks HTTP/2 the way a gRPC server does: it answers the
    /// client connection preface with a SETTINGS frame.
    pub fn answers_http2(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        // The preface, then an empty SETTINGS frame (length 0, type 4, flags 0, stream 0).
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        if stream.write_all(&hello).is_err() {
            return false;
        }
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).is_ok() && header[3] == 4
    }

    /// A STATIC Envoy cluster `name` that reaches this engine over HTTP/2 (gRPC), as a
    /// YAML list item for `EnvoySpec::extra_clusters_yaml`.
    pub fn envoy_cluster_yaml(&self, name: &str) -> String {
        grpc_cluster_yaml(name, self.port)
    }
}

/// A STATIC Envoy cluster `name` speaking HTTP/2 (gRPC) to `127.0.0.1:port`, as a YAML list
/// item for `EnvoySpec::extra_clusters_yaml`.
pub fn grpc_cluster_yaml(name: &str, port: u16) -> String {
    format!(
        r#"- name: {name}
  type: STATIC
  connect_timeout: 1s
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config:
        http2_protocol_options: {{}}
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#
    )
}

impl Drop for RlsEngine {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "---- rls-engine log tail ({}) ----\n{}\n---- end of rls-engine log ----",
                self.log_path().display(),
                tail(&self.log_path(), 30)
            );
        } else if std::env::var_os("TOKENFUSE_KEEP_ENVOY_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
