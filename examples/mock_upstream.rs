//! Standalone mock OpenAI-compatible upstream, for `make run` and manual testing:
//!
//! ```text
//! cargo run --example mock_upstream -- --name primary --port 18001
//! ```
//!
//! Prints `mock upstream <name> listening on 127.0.0.1:<port>` on stdout once the
//! port is bound (scripts can wait for that line), logs one line per request on
//! stderr (`--quiet` turns that off), and serves until killed. The server itself
//! is the integration tests' mock (`tests/support/mock_upstream.rs`); see its
//! module docs for routes and `x-mock-*` control headers.

#[path = "../tests/support/mock_upstream.rs"]
mod mock_upstream;

use std::io::Write;
use std::process::ExitCode;

use mock_upstream::MockUpstream;

const USAGE: &str = "usage: mock_upstream [--name NAME] [--port PORT] [--quiet]\n\
    \x20 --name NAME   upstream name, sent back in x-mock-upstream (default: mock)\n\
    \x20 --port PORT   port on 127.0.0.1 (default: 0 = ephemeral)\n\
    \x20 --quiet       do not log requests on stderr";

struct Args {
    name: String,
    port: u16,
    quiet: bool,
}

/// Parses `--flag value` and `--flag=value`. `Err` carries the message to
/// print; `Ok(None)` means `--help`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        name: "mock".to_owned(),
        port: 0,
        quiet: false,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--name" => parsed.name = value()?,
            "--port" => {
                let raw = value()?;
                parsed.port = raw.parse().map_err(|_| format!("bad port {raw:?}"))?;
            }
            "--quiet" => parsed.quiet = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("mock_upstream: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let server = match MockUpstream::start_on(&args.name, args.port) {
        Ok(server) => server,
        Err(err) => {
            eprintln!(
                "mock_upstream: cannot listen on 127.0.0.1:{}: {err}",
                args.port
            );
            return ExitCode::FAILURE;
        }
    };
    server.set_logging(!args.quiet);
    // Nothing reads the requests of a standalone mock (make run, make bench): keeping
    // them would grow its memory by every body it is sent.
    server.set_recording(false);
    println!(
        "mock upstream {} listening on 127.0.0.1:{}",
        server.name(),
        server.port()
    );
    // stdout may be a pipe a script is waiting on.
    let _ = std::io::stdout().flush();
    server.serve_forever();
    ExitCode::SUCCESS
}
