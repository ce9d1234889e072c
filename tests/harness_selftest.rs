//! Tests of the test harness itself (`tests/support/`): that a generated Envoy
//! bootstrap starts, routes to the right mock upstream, exposes its admin API,
//! is killed when dropped, and that the HTTP client decodes every body framing
//! the other tests rely on. When one of these fails, fix the harness before
//! reading anything into the filter's own tests.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use support::envoy::{Envoy, EnvoySpec};
use support::http;
use support::mock_upstream::MockUpstream;

/// Two mock upstreams and an Envoy routing to them.
fn start(spec: EnvoySpec) -> (MockUpstream, MockUpstream, Envoy) {
    let primary = MockUpstream::start("primary").expect("start primary mock");
    let economy = MockUpstream::start("economy").expect("start economy mock");
    let spec = EnvoySpec {
        primary_port: primary.port(),
        economy_port: economy.port(),
        ..spec
    };
    let envoy = Envoy::start(spec).unwrap_or_else(|e| panic!("{e}"));
    (primary, economy, envoy)
}

fn assert_routes_by_header(envoy: &Envoy) {
    let resp = envoy.get("/healthz", &[]).expect("GET /healthz");
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(resp.header("x-mock-upstream"), Some("primary"));

    let resp = envoy
        .get("/healthz", &[("x-tokenfuse-route", "economy")])
        .expect("GET /healthz (economy)");
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(resp.header("x-mock-upstream"), Some("economy"));
}

#[test]
fn envoy_without_the_filter_routes_by_the_x_tokenfuse_route_header() {
    let (primary, economy, envoy) = start(EnvoySpec {
        no_filter: true,
        ..EnvoySpec::default()
    });
    assert_routes_by_header(&envoy);
    assert_eq!(primary.requests().len(), 1);
    assert_eq!(economy.requests().len(), 1);
    // The admin API answers and counts the two requests.
    assert_eq!(envoy.admin_get("/ready").trim(), "LIVE");
    assert_eq!(envoy.counter("cluster.primary.upstream_rq_200"), 1);
    assert_eq!(envoy.counter("cluster.economy.upstream_rq_200"), 1);
    assert_eq!(envoy.counter("http.tokenfuse.downstream_rq_2xx"), 2);
    assert_eq!(envoy.stat("no.such.stat"), None);
    assert!(envoy
        .prometheus()
        .contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"primary\"} 1"));
}

#[test]
fn envoy_with_the_built_filter_keeps_clients_off_the_economy_route() {
    let (_primary, economy, envoy) = start(EnvoySpec::default());
    // The routing header is the filter's to set: a client's copy is removed before the
    // route is chosen, on any request.
    for method in ["GET", "POST"] {
        let resp = http::request(
            envoy.listener_port,
            method,
            "/anything",
            &[("x-tokenfuse-route", "economy")],
            b"",
        )
        .expect("request through the filter");
        assert_eq!(resp.header("x-mock-upstream"), Some("primary"), "{method}");
    }
    assert!(economy.requests().is_empty());
    // The filter really is in the chain: Envoy created its VM.
    assert!(
        envoy.stats_text().contains("wasm."),
        "no wasm stats; log:\n{}",
        envoy.log_tail(40)
    );
}

#[test]
fn a_chat_completion_passes_through_envoy_with_the_filter() {
    let (primary, _economy, envoy) = start(EnvoySpec::default());
    let resp = envoy
        .post_json(
            "/v1/chat/completions",
            &[],
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .expect("POST chat completion");
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(resp.json()["model"], "gpt-4o");
    let seen = primary.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].json().unwrap()["messages"][0]["content"], "hi");
}

#[test]
fn a_configuration_the_filter_refuses_makes_envoy_exit() {
    let log = Envoy::start_expect_failure(EnvoySpec::new(r#"{"api":"v0"}"#, 1, 2));
    assert!(
        log.contains("Unable to create Wasm plugin tokenfuse"),
        "log:\n{log}"
    );
}

#[test]
fn dropping_envoy_kills_the_process() {
    let envoy = Envoy::start(EnvoySpec {
        no_filter: true,
        ..EnvoySpec::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let pid = envoy.pid();
    let (admin, listener) = (envoy.admin_port, envoy.listener_port);
    let dir = envoy.dir.clone();
    assert!(envoy.alive());
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(envoy);
    // Killed and reaped: no process, no listening sockets, temp dir removed.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(http::get(admin, "/ready", &[]).is_err());
    assert!(http::get(listener, "/", &[]).is_err());
    assert!(!dir.exists());
}

#[test]
fn two_envoys_run_side_by_side() {
    let spec = || EnvoySpec {
        no_filter: true,
        ..EnvoySpec::default()
    };
    let a = Envoy::start(spec()).unwrap_or_else(|e| panic!("{e}"));
    let b = Envoy::start(spec()).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(a.listener_port, b.listener_port);
    assert_ne!(a.admin_port, b.admin_port);
    assert!(a.alive() && b.alive());
}

// ---------------------------------------------------------------------------
// The HTTP client against a scripted one-shot server.
// ---------------------------------------------------------------------------

/// Serves one connection: reads the request head, writes `response` raw, and
/// closes. Returns the port.
fn one_shot_server(response: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
            line.clear();
        }
        let _ = (&stream).write_all(response);
        thread::sleep(Duration::from_millis(50));
    });
    port
}

#[test]
fn the_client_decodes_content_length_chunked_and_close_delimited_bodies() {
    let port = one_shot_server(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello");
    let r = http::get(port, "/", &[]).unwrap();
    assert_eq!(
        (r.status, r.text().as_str(), r.header("x-a")),
        (200, "hello", Some("b"))
    );

    let port = one_shot_server(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(http::get(port, "/", &[]).unwrap().text(), "hello world");

    let port = one_shot_server(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Nope\r\n\r\nbye");
    let r = http::get(port, "/", &[]).unwrap();
    assert_eq!((r.status, r.text().as_str()), (503, "bye"));
}

#[test]
fn stream_then_abort_stops_reading_after_the_given_number_of_bytes() {
    let port = one_shot_server(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n4\r\nefgh\r\n",
    );
    let got = http::stream_then_abort(port, "/", &[], "{}", 3).unwrap();
    assert!(got.starts_with(b"abc"), "{got:?}");
    assert_eq!(
        http::decode_chunked_prefix(b"5\r\nhello\r\n6\r\n wor"),
        b"hello wor"
    );
}
