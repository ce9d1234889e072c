//! `scripts/run.sh`, the demo behind `make run`: on the ports it is given (free ones,
//! chosen here, so it runs beside anything else on the machine) it starts the mocks and
//! Envoy, answers through the filter, and stops all of them on SIGTERM; a port already
//! in use stops it before anything starts, with a message naming the variable to change.
//!
//! run.sh writes into `RUN_DIR` (a temp dir here, not the checkout's `.run`, which a
//! developer's own `make run` may be using). It needs the mock_upstream example, which
//! `cargo test` builds, and Envoy and the .wasm as the other Envoy tests do.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::envoy::{envoy_binary, repo_root, wasm_path};
use support::http;

/// The mock_upstream example next to this test binary (`target/<profile>/examples/`).
fn mock_upstream_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir.join("examples/mock_upstream");
    if !path.is_file() {
        panic!(
            "{} is missing: `cargo test` (without --test) builds the examples, \
             or run `cargo build --example mock_upstream`",
            path.display()
        );
    }
    path
}

/// `n` ports that were free a moment ago (bound to port 0, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "tokenfuse-run-{tag}-{}-{nanos}",
        std::process::id()
    ));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running scripts/run.sh, in its own process group. Dropping it (also on a panic)
/// sends SIGTERM to the group, then SIGKILL if anything is left, so no Envoy or mock
/// outlives the test.
struct RunScript {
    child: Child,
    dir: PathBuf,
    ports: Ports,
}

#[derive(Clone, Copy, Debug)]
struct Ports {
    listener: u16,
    admin: u16,
    primary: u16,
    economy: u16,
}

impl RunScript {
    fn spawn(ports: Ports, tag: &str) -> RunScript {
        let dir = temp_dir(tag);
        let stdout = fs::File::create(dir.join("stdout")).unwrap();
        let stderr = fs::File::create(dir.join("stderr")).unwrap();
        let child = Command::new("bash")
            .arg(repo_root().join("scripts/run.sh"))
            .env("ENVOY", envoy_binary())
            .env("MOCK_UPSTREAM", mock_upstream_binary())
            .env("RUN_DIR", dir.join("run"))
            .env("PORT", ports.listener.to_string())
            .env("ADMIN_PORT", ports.admin.to_string())
            .env("PRIMARY_PORT", ports.primary.to_string())
            .env("ECONOMY_PORT", ports.economy.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap();
        RunScript { child, dir, ports }
    }

    fn stdout(&self) -> String {
        fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}\nenvoy.log tail:\n{}",
            self.stdout(),
            self.stderr(),
            fs::read_to_string(self.dir.join("run/envoy.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Waits for the "demo is up" banner: Ok(()) once printed, Err(status) if the
    /// script exited first.
    fn wait_up(&mut self, timeout: Duration) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains("tokenfuse demo is up") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            if Instant::now() > deadline {
                panic!("run.sh not up after {timeout:?}\n{}", self.output());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn signal_group(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for RunScript {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() || group_alive(self.child.id()) {
            self.signal_group("TERM");
            let _ = self.wait_exit(Duration::from_secs(10));
            if group_alive(self.child.id()) {
                self.signal_group("KILL");
            }
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- run.sh ({}) ----\n{}",
                self.dir.display(),
                self.output()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// True while any process of process group `pgid` exists.
fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .arg("-0")
        .arg("--")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

const CHAT: &str =
    r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"Hello!"}]}"#;

#[test]
fn run_sh_serves_the_demo_on_the_given_ports_and_stops_everything() {
    // Panics, naming the make target, when the module is missing.
    wasm_path();
    // Free ports can be taken between choosing and binding them: then try new ones.
    let mut attempt = 0;
    let mut run = loop {
        attempt += 1;
        let p = free_ports(4);
        let ports = Ports {
            listener: p[0],
            admin: p[1],
            primary: p[2],
            economy: p[3],
        };
        let mut run = RunScript::spawn(ports, "up");
        match run.wait_up(Duration::from_secs(60)) {
            Ok(()) => break run,
            Err(status) if attempt < 3 && run.output().contains("in use") => {
                eprintln!("run.sh lost a port race ({status}), retrying");
            }
            Err(status) => panic!("run.sh exited ({status}) before the demo was up"),
        }
    };
    let ports = run.ports;
    let banner = run.stdout();
    assert!(
        banner.contains(&format!("http://127.0.0.1:{}", ports.listener))
            && banner.contains(&format!("http://127.0.0.1:{}", ports.admin)),
        "banner names the ports:\n{banner}"
    );

    let resp = http::post_json(
        ports.listener,
        "/v1/chat/completions",
        &[("authorization", "Bearer demo-key-acme")],
        CHAT,
    )
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-mock-upstream"), Some("primary"));
    assert!(
        resp.header("x-tokenfuse-prompt-tokens").is_some(),
        "the filter counted: {:?}",
        resp.headers
    );
    // The demo budget reroutes tenant thrifty (the demo key's tenant, set by the
    // identity edge) to the economy mock once its $0.0005 is spent: at the latest on its
    // second request. A client naming the tenant itself is not believed.
    let r = http::post_json(
        ports.listener,
        "/v1/chat/completions",
        &[("x-tenant", "thrifty"), ("x-tokenfuse-priority", "p0")],
        CHAT,
    )
    .unwrap();
    assert_eq!(r.header("x-mock-upstream"), Some("primary"));
    let economy = (0..3).any(|_| {
        let r = http::post_json(
            ports.listener,
            "/v1/chat/completions",
            &[("authorization", "Bearer demo-key-thrifty")],
            CHAT,
        )
        .unwrap();
        r.header("x-mock-upstream") == Some("economy")
    });
    assert!(economy, "thrifty reached the economy mock");
    let ready = http::get(ports.admin, "/ready", &[]).unwrap();
    assert_eq!(ready.text().trim(), "LIVE");

    // SIGTERM to the script (as Ctrl-C's SIGINT): it stops the mocks and Envoy, exits 0.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(run.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = run
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("run.sh still running 30 s after SIGTERM"));
    assert!(exit.success(), "run.sh exit status {exit}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while group_alive(run.child.id()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !group_alive(run.child.id()),
        "Envoy or a mock outlived run.sh"
    );
    for port in [ports.listener, ports.admin, ports.primary, ports.economy] {
        assert!(!accepts(port), "port {port} still accepts connections");
    }
}

#[test]
fn run_sh_refuses_a_port_in_use_naming_its_variable() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let p = free_ports(3);
    let ports = Ports {
        listener: p[0],
        admin: taken_port,
        primary: p[1],
        economy: p[2],
    };
    let mut run = RunScript::spawn(ports, "taken");
    let status = run
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("run.sh did not stop\n{}", run.output()));
    assert!(!status.success());
    let stderr = run.stderr();
    assert!(
        stderr.contains(&format!(
            "port {taken_port} (Envoy admin) is already in use"
        )) && stderr.contains("ADMIN_PORT="),
        "{}",
        run.output()
    );
    assert!(
        !run.stdout().contains("listening on"),
        "nothing was started:\n{}",
        run.output()
    );
}
