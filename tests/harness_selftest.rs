//! Tests of the test harness itself (`tests/support/`): that the Envoy bootstrap
//! rendered from the shipped `envoy/envoy.yaml` differs from it only where a test must,
//! validates, starts, routes to the right mock upstream, exposes its admin API,
//! is killed when dropped, and that the HTTP client decodes every body framing
//! the other tests rely on. When one of these fails, fix the harness before
//! reading anything into the filter's own tests.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::envoy::{self, wasm_path, Envoy, EnvoySpec};
use support::envoy_config;
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
// The bootstrap: the shipped envoy/envoy.yaml, rendered.
// ---------------------------------------------------------------------------

/// The JSON pointers at which `a` and `b` differ (a list of another length differs whole).
fn differences(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (v, w) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                differences(v, w, &format!("{at}/{k}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{at}/{i}"), out);
            }
        }
        _ if a != b => out.push(at.to_string()),
        _ => {}
    }
}

fn shipped_json() -> Value {
    let shipped = envoy_config::shipped().unwrap();
    envoy_config::yaml_documents(&shipped).unwrap().remove(0)
}

fn rendered(spec: &EnvoySpec) -> Value {
    serde_json::from_str(&envoy::bootstrap(spec)).unwrap()
}

#[test]
fn the_rendered_bootstrap_differs_from_the_shipped_one_only_in_ports_module_and_plugin_config() {
    let spec = EnvoySpec {
        identity_edge: true,
        wasm: Some(wasm_path()),
        ..EnvoySpec::new(r#"{"api":"v1"}"#, 1001, 1002)
    };
    let mut diff = Vec::new();
    differences(&shipped_json(), &rendered(&spec), "", &mut diff);
    // The defaults (failure_policy, buffer limit, route timeouts) are the shipped values.
    let expected = [
        "/port_value",
        "/port_value",
        "/port_value",
        "/port_value",
        "/code/local/filename",
        "/configuration/value",
    ];
    let mut suffixes: Vec<&str> = diff
        .iter()
        .map(|d| {
            expected
                .iter()
                .find(|s| d.ends_with(*s))
                .unwrap_or_else(|| panic!("unexpected difference at {d}; all: {diff:?}"))
        })
        .copied()
        .collect();
    suffixes.sort_unstable();
    let mut want = expected.to_vec();
    want.sort_unstable();
    assert_eq!(suffixes, want, "{diff:?}");
}

#[test]
fn the_identity_edge_is_left_out_unless_asked_for_and_the_wasm_filter_comes_first() {
    let filters = |spec: &EnvoySpec| -> Vec<String> {
        let b = rendered(spec);
        b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    };
    let base = EnvoySpec {
        wasm: Some(wasm_path()),
        ..EnvoySpec::default()
    };
    assert_eq!(
        filters(&base),
        ["envoy.filters.http.wasm", "envoy.filters.http.router"]
    );
    assert_eq!(
        filters(&EnvoySpec {
            identity_edge: true,
            ..base.clone()
        }),
        [
            "envoy.filters.http.lua",
            "envoy.filters.http.wasm",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(
        filters(&EnvoySpec {
            no_filter: true,
            ..base.clone()
        }),
        ["envoy.filters.http.router"]
    );
}

#[test]
fn raised_circuit_breakers_go_on_both_upstream_clusters_and_are_as_shipped_otherwise() {
    let clusters = |spec: &EnvoySpec| -> Vec<(String, Value)> {
        rendered(spec)["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["circuit_breakers"].clone(),
                )
            })
            .collect()
    };
    let base = EnvoySpec {
        wasm: Some(wasm_path()),
        ..EnvoySpec::default()
    };
    // As shipped: 10,000 connections, pending requests and requests on each LLM cluster
    // (Envoy's default 1,024 queues long streams past the 1,024th).
    for (name, breakers) in clusters(&base) {
        if name == "primary" || name == "economy" {
            let t = &breakers["thresholds"][0];
            for field in ["max_connections", "max_pending_requests", "max_requests"] {
                assert_eq!(t[field], 10_000, "{name} {field} as shipped");
            }
        }
    }
    let raised = clusters(&EnvoySpec {
        upstream_max_requests: Some(5000),
        ..base
    });
    for name in ["primary", "economy"] {
        let (_, breakers) = raised.iter().find(|(n, _)| n == name).unwrap();
        let t = &breakers["thresholds"][0];
        assert_eq!(t["priority"], "DEFAULT", "{name}");
        for field in ["max_connections", "max_pending_requests", "max_requests"] {
            assert_eq!(t[field], 5000, "{name} {field}");
        }
    }
}

#[test]
fn a_shipped_file_without_what_the_renderer_changes_is_refused_with_its_name() {
    let shipped = envoy_config::shipped().unwrap();
    let spec = EnvoySpec {
        wasm: Some(wasm_path()),
        ..EnvoySpec::default()
    };
    let renamed = shipped.replace("- name: economy", "- name: cheap");
    let err = envoy_config::render(&renamed, &spec).unwrap_err();
    assert!(err.contains("economy"), "{err}");
    let no_policy = shipped.replace("failure_policy: FAIL_RELOAD", "");
    let err = envoy_config::render(&no_policy, &spec).unwrap_err();
    assert!(err.contains("failure_policy"), "{err}");
}

#[test]
fn every_kind_of_rendered_bootstrap_passes_envoy_validate() {
    let base = EnvoySpec {
        wasm: Some(wasm_path()),
        ..EnvoySpec::default()
    };
    let lua = r#"- name: envoy.filters.http.lua
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
    default_source_code: { inline_string: "function envoy_on_request(h) end" }
"#;
    let specs = [
        ("default", base.clone()),
        (
            "no-filter",
            EnvoySpec {
                no_filter: true,
                ..base.clone()
            },
        ),
        (
            "identity-edge",
            EnvoySpec {
                identity_edge: true,
                ..base.clone()
            },
        ),
        (
            "other-filter",
            EnvoySpec {
                http_filter_yaml: Some(lua.to_string()),
                extra_clusters_yaml: Some(
                    "- name: extra\n  type: STATIC\n  connect_timeout: 1s\n".to_string(),
                ),
                extra_bootstrap_yaml: Some(
                    "stats_config: { use_all_default_tags: false }\n".into(),
                ),
                ..base.clone()
            },
        ),
        (
            "many-streams",
            EnvoySpec {
                upstream_max_requests: Some(100_000),
                route_timeout_secs: 600,
                ..base.clone()
            },
        ),
    ];
    let dir = std::env::temp_dir().join(format!("tokenfuse-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, spec) in specs {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, envoy::bootstrap(&spec)).unwrap();
        let out = Command::new(envoy::envoy_binary())
            .args(["--mode", "validate", "-l", "warning", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {}\n{text}", path.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_the_identity_edge_a_client_sent_tenant_is_replaced_by_the_one_its_api_key_names() {
    // The demo's plugin configuration, with its admin endpoint and token.
    let demo = envoy_config::shipped_plugin_config(&envoy_config::shipped().unwrap()).unwrap();
    let (primary, _economy, envoy) = start(EnvoySpec {
        identity_edge: true,
        ..EnvoySpec::new(demo, 0, 0)
    });
    let r = envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("authorization", "Bearer demo-key-thrifty"),
                ("x-tenant", "acme"),
            ],
            r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = primary.requests();
    assert_eq!(seen[0].header("x-tenant"), Some("thrifty"));
    assert_eq!(
        seen[0].header("authorization"),
        None,
        "the gateway's key stays in Envoy"
    );
    // Charged to thrifty (settled when Envoy ends the stream), not to acme.
    let used = |key: &str| {
        let r = envoy
            .get(
                &format!("/tokenfuse/admin?budget=tenant-minute&key={key}"),
                &[("authorization", "Bearer demo-admin-token-change-me")],
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["budgets"][0]["used"].as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while used("thrifty") == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(used("thrifty") > 0);
    assert_eq!(used("acme"), 0);
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
