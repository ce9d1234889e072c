//! The Envoy bootstraps of `make bench` (bench/run.py), rendered from the shipped
//! `envoy/envoy.yaml` by the integration tests' renderer (`tests/support/envoy_config.rs`,
//! compiled in here), so that what is benchmarked is what ships and is tested.
//!
//! ```text
//! cargo run --release --example render_envoy -- '{"listener_port":10000,"admin_port":9901,
//!     "primary_port":18001,"economy_port":18001,"wasm":"target/wasm32-wasip1/release/tokenfuse.wasm",
//!     "plugin_config":"{\"api\":\"v1\"}"}' > envoy.json
//! ```
//!
//! The one argument is the spec as JSON: the fields of `EnvoySpec` (`listener_port`,
//! `admin_port`, `primary_port`, `economy_port`, `wasm`, `plugin_config`, `failure_policy`,
//! `no_filter`, `identity_edge`, `http_filter_yaml`, …), each missing one at the tests'
//! default. Prints the bootstrap (JSON) on stdout; a spec or a shipped file it cannot
//! render is an error on stderr and exit status 1.

#[path = "../../tests/support/envoy_config.rs"]
#[allow(dead_code)] // the tests' helpers (the shipped plugin configuration, YAML reading)
mod envoy_config;

use std::process::ExitCode;

use envoy_config::EnvoySpec;

const USAGE: &str = "usage: render_envoy SPEC_JSON  (the fields of EnvoySpec, see \
                     tests/support/envoy_config.rs)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [spec] = args.as_slice() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let spec: EnvoySpec = match serde_json::from_str(spec) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("render_envoy: the spec: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match envoy_config::shipped().and_then(|shipped| envoy_config::render(&shipped, &spec)) {
        Ok(bootstrap) => {
            println!("{bootstrap:#}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("render_envoy: {e}");
            ExitCode::FAILURE
        }
    }
}
