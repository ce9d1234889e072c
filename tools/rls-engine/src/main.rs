//! `rls-engine`: serves Limitador (Redis storage) as an Envoy rate limit service.
//!
//! ```text
//! rls-engine --redis redis://127.0.0.1:6379 --limits limits.yaml [--listen 127.0.0.1:0]
//!            [--rate-limit-headers NONE|DRAFT_VERSION_03] [--max-reservation-ttl SECS]
//!            [--max-reservation-fraction F] [--verbose]
//! rls-engine --validate --limits limits.yaml
//! ```
//!
//! Once it accepts connections it prints exactly one line to stdout,
//! `listening on 127.0.0.1:NNNN` (with the port the OS chose for `:0`); everything else
//! goes to stderr. SIGTERM or SIGINT stops it: it stops accepting, lets calls in flight
//! finish (at most [`DRAIN`]) and exits 0. Exit 1: bad arguments, unreadable limits
//! file, Redis unreachable at start, or the address in use. `--validate` only parses the
//! limits file, as limitador-server's `--validate` does. `--max-reservation-ttl` (default
//! 60) and `--max-reservation-fraction` (default 1.0) are Limitador's `ReservationLimits`:
//! the longest a `Reserve` hold lasts, and the most of a limit one hold may take.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use limitador::reservation::ReservationLimits;
use limitador::storage::redis::AsyncRedisStorage;
use limitador::storage::AsyncStorage;
use limitador::AsyncRateLimiterBuilder;
use tokio::signal::unix::{signal, SignalKind};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use rls_engine::limits;
use rls_engine::rls::{Limiter, RateLimitHeaders};
use rls_engine::service::RateLimitService;

/// How long calls in flight may take to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: rls-engine --redis URL --limits FILE [--listen ADDR] \
[--rate-limit-headers NONE|DRAFT_VERSION_03] [--max-reservation-ttl SECS] \
[--max-reservation-fraction F] [--verbose]\n       rls-engine --validate --limits FILE";

/// The command line.
struct Args {
    listen: SocketAddr,
    redis: Option<String>,
    limits: PathBuf,
    headers: RateLimitHeaders,
    reservations: ReservationLimits,
    verbose: bool,
    validate: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut redis = None;
        let mut limits = None;
        let mut headers = RateLimitHeaders::None;
        let mut reservations = ReservationLimits::default();
        let mut verbose = false;
        let mut validate = false;
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--listen" => {
                    let text = value("--listen")?;
                    listen = text
                        .parse()
                        .map_err(|_| format!("--listen {text:?} is not an IP:PORT address"))?;
                }
                "--redis" => redis = Some(value("--redis")?),
                "--limits" => limits = Some(PathBuf::from(value("--limits")?)),
                "--rate-limit-headers" => {
                    let text = value("--rate-limit-headers")?;
                    headers = RateLimitHeaders::parse(&text).ok_or(format!(
                        "--rate-limit-headers {text:?}: expected NONE or DRAFT_VERSION_03"
                    ))?;
                }
                "--max-reservation-ttl" => {
                    let text = value("--max-reservation-ttl")?;
                    let secs: u64 = text.parse().ok().filter(|s| *s > 0).ok_or(format!(
                        "--max-reservation-ttl {text:?}: expected whole seconds, at least 1"
                    ))?;
                    reservations.max_ttl = Duration::from_secs(secs);
                }
                "--max-reservation-fraction" => {
                    let text = value("--max-reservation-fraction")?;
                    reservations.max_fraction = text
                        .parse::<f64>()
                        .ok()
                        .filter(|f| *f > 0.0 && *f <= 1.0)
                        .ok_or(format!(
                            "--max-reservation-fraction {text:?}: expected a number in (0, 1]"
                        ))?;
                }
                "-v" | "--verbose" => verbose = true,
                "--validate" => validate = true,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let limits = limits.ok_or("--limits is required")?;
        if redis.is_none() && !validate {
            return Err("--redis is required".into());
        }
        Ok(Args {
            listen,
            redis,
            limits,
            headers,
            reservations,
            verbose,
            validate,
        })
    }
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("rls-engine: {e}\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    // Two workers: the engine serves tests on a small shared machine.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rls-engine: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rls-engine: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let limits = limits::load(&args.limits).map_err(|e| e.to_string())?;
    for limit in &limits {
        eprintln!(
            "rls-engine: limit {:?} namespace {:?}: max_value {} per {} s, {} condition(s), {} variable(s)",
            limit.name().unwrap_or("-"),
            limit.namespace().as_ref(),
            limit.max_value(),
            limit.seconds(),
            limit.conditions().len(),
            limit.variables().len(),
        );
    }
    if args.validate {
        println!(
            "{}: {} limit(s), valid",
            args.limits.display(),
            limits.len()
        );
        return Ok(());
    }
    let redis = args.redis.unwrap_or_default();
    let storage = AsyncRedisStorage::new(&redis)
        .await
        .map_err(|e| format!("cannot use Redis at {redis}: {e}"))?;
    let limiter = Limiter::Async(
        AsyncRateLimiterBuilder::new(AsyncStorage::with_counter_storage(Box::new(storage)))
            .reservation_limits(args.reservations)
            .build(),
    );
    limiter
        .configure_with(limits)
        .await
        .map_err(|e| format!("cannot apply the limits: {e}"))?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        // One service, so no router: it answers other paths UNIMPLEMENTED itself.
        Server::builder().serve_with_incoming_shutdown(
            RateLimitService::new(limiter, args.headers, args.verbose),
            incoming,
            async {
                let _ = stop_rx.await;
            },
        ),
    );

    // The socket is bound and the server task owns it: connections from now on are
    // accepted (the kernel queues them until the task polls), so the line is true.
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    eprintln!("rls-engine: serving {local}, counters in {redis}");

    let signal_name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        finished = &mut server => {
            return match finished {
                Ok(Ok(())) => Err("the server stopped by itself".into()),
                Ok(Err(e)) => Err(format!("the server failed: {e}")),
                Err(e) => Err(format!("the server task failed: {e}")),
            };
        }
    };
    eprintln!("rls-engine: {signal_name}, stopping");
    let _ = stop_tx.send(());
    // Calls in flight get DRAIN to finish; an idle client connection that ignores
    // GOAWAY must not keep the process alive past that.
    match tokio::time::timeout(DRAIN, server).await {
        Ok(Ok(Ok(()))) => eprintln!("rls-engine: stopped"),
        Ok(Ok(Err(e))) => eprintln!("rls-engine: stopped, the server reported: {e}"),
        Ok(Err(e)) => eprintln!("rls-engine: stopped, the server task failed: {e}"),
        Err(_) => eprintln!("rls-engine: stopped, connections still open after {DRAIN:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn listen_defaults_to_a_loopback_port_the_os_picks() {
        let args = parse(&["--redis", "redis://127.0.0.1:6379", "--limits", "l.yaml"]).unwrap();
        assert_eq!(args.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(args.headers, RateLimitHeaders::None);
        assert_eq!(args.reservations.max_ttl, Duration::from_secs(60));
        assert_eq!(args.reservations.max_fraction, 1.0);
        assert!(!args.verbose && !args.validate);
    }

    #[test]
    fn every_option_is_read() {
        let args = parse(&[
            "--listen",
            "127.0.0.1:8081",
            "--redis",
            "redis://r:1",
            "--limits",
            "l.yaml",
            "--rate-limit-headers",
            "DRAFT_VERSION_03",
            "--max-reservation-ttl",
            "300",
            "--max-reservation-fraction",
            "0.5",
            "-v",
        ])
        .unwrap();
        assert_eq!(args.listen.port(), 8081);
        assert_eq!(args.redis.as_deref(), Some("redis://r:1"));
        assert_eq!(args.limits, PathBuf::from("l.yaml"));
        assert_eq!(args.headers, RateLimitHeaders::DraftVersion03);
        assert_eq!(args.reservations.max_ttl, Duration::from_secs(300));
        assert_eq!(args.reservations.max_fraction, 0.5);
        assert!(args.verbose);
    }

    #[test]
    fn redis_is_required_except_to_validate() {
        assert_eq!(
            parse(&["--limits", "l.yaml"]).err().as_deref(),
            Some("--redis is required")
        );
        assert!(parse(&["--validate", "--limits", "l.yaml"]).is_ok());
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            parse(&["--listen", "localhost:1"]).err().as_deref(),
            Some("--listen \"localhost:1\" is not an IP:PORT address")
        );
        assert_eq!(
            parse(&["--limits"]).err().as_deref(),
            Some("--limits needs a value")
        );
        assert_eq!(
            parse(&["--rate-limit-headers", "ON"]).err().as_deref(),
            Some("--rate-limit-headers \"ON\": expected NONE or DRAFT_VERSION_03")
        );
        assert_eq!(
            parse(&["--max-reservation-ttl", "0"]).err().as_deref(),
            Some("--max-reservation-ttl \"0\": expected whole seconds, at least 1")
        );
        assert_eq!(
            parse(&["--max-reservation-fraction", "2"]).err().as_deref(),
            Some("--max-reservation-fraction \"2\": expected a number in (0, 1]")
        );
        assert_eq!(
            parse(&["--bogus"]).err().as_deref(),
            Some("unknown argument \"--bogus\"")
        );
    }
}
