//! Envoy bootstraps for the tests and the benchmark, rendered from the shipped
//! `envoy/envoy.yaml`, so that what is tested and benchmarked is what ships.
//!
//! The listener, the connection manager (path normalization, idle timeout), the routes (the
//! economy route on `x-tokenfuse-route: economy`), the filter chain, the clusters and the
//! `stats_config` all come from `envoy/envoy.yaml`. [`render`] changes only what a harness
//! must:
//!
//! - the admin and listener ports (0 by default: Envoy chooses, the harness reads them back);
//! - the ports of clusters `primary` and `economy` (the mock upstreams);
//! - the Wasm module's path (absolute: Envoy runs in a scratch directory), the plugin
//!   `configuration` string and its `failure_policy`;
//! - the routes' `timeout` and the listener's `per_connection_buffer_limit_bytes`;
//! - the circuit breakers of clusters `primary` and `economy`, when the spec sets
//!   [`EnvoySpec::upstream_max_requests`] (the many-streams benchmark holds more requests in
//!   flight than Envoy's default thresholds, 1,024, allow);
//! - the identity edge, the Lua filter in front of the Wasm filter, is dropped unless
//!   [`EnvoySpec::identity_edge`] keeps it. It removes a client's `x-tenant` and
//!   `x-tokenfuse-priority` and sets them from the demo's API keys; the tests play that auth
//!   layer themselves and send `x-tenant` (and the priority header) as it would have set
//!   them, which the edge would remove;
//! - and the spec's knobs: no Wasm filter, another HTTP filter in its place, more clusters,
//!   top-level bootstrap keys replaced.
//!
//! Each field it changes must be where it expects it in the shipped file: a renamed cluster
//! or a moved field fails the rendering with a message naming it, never a test run on a
//! config nobody meant. The result is JSON (which Envoy reads as it reads YAML).
//!
//! The same code renders `make bench`'s bootstraps (`bench/src/render_envoy.rs` compiles it
//! in), hence no panics here: errors are returned, and the callers fail with them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// The shipped bootstrap, relative to the repository root.
pub const SHIPPED: &str = "envoy/envoy.yaml";

/// The listener the harness reads its port back from (by name, from admin `/listeners`).
pub const LISTENER: &str = "tokenfuse_listener";

const HCM: &str = "envoy.filters.network.http_connection_manager";
const WASM_FILTER: &str = "envoy.filters.http.wasm";
const LUA_FILTER: &str = "envoy.filters.http.lua";

/// What to start. Build one with [`EnvoySpec::new`] (or `Default`) and adjust
/// fields with struct update syntax. Everything not named here is as shipped.
///
/// The bench renders from the same struct, given as JSON (field names as keys, missing
/// fields at their defaults); `concurrency`, `log_level` and `extra_args` are options of
/// the Envoy process, not of the bootstrap, and only `Envoy::start` reads them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvoySpec {
    /// The filter's JSON configuration (the plugin `configuration` string).
    pub plugin_config: String,
    /// Port of cluster `primary` on 127.0.0.1.
    pub primary_port: u16,
    /// Port of cluster `economy` on 127.0.0.1 (requests with
    /// `x-tokenfuse-route: economy`).
    pub economy_port: u16,
    /// Port of the listener; 0 (the default): Envoy chooses, `Envoy::start` reads it back.
    pub listener_port: u16,
    /// Port of the admin interface; 0 (the default) as for the listener.
    pub admin_port: u16,
    /// Envoy worker threads (`--concurrency`). Default 2 (one Wasm VM each).
    pub concurrency: u32,
    /// More clusters, as YAML list items written at column 0, e.g.
    /// `"- name: redis\n  type: STATIC\n  ..."`; appended to
    /// `static_resources.clusters`.
    pub extra_clusters_yaml: Option<String>,
    /// Top-level bootstrap YAML written at column 0. Each key replaces the shipped key of
    /// the same name, if any: a `stats_config:` block here replaces the shipped
    /// `stats_config` (e.g. with Istio's).
    pub extra_bootstrap_yaml: Option<String>,
    /// Leave the Wasm filter out entirely (plain proxy; harness checks and
    /// baseline benchmarks).
    pub no_filter: bool,
    /// Keep the identity edge (the shipped Lua filter that sets `x-tenant` and
    /// `x-tokenfuse-priority` from the demo's API keys). Default false: the tests send
    /// those headers themselves, as the auth layer would have set them.
    pub identity_edge: bool,
    /// Use this HTTP filter entry instead of the shipped Wasm filter: one YAML list item
    /// written at column 0 (`- name: …`), in the Wasm filter's place; `{wasm}` in it
    /// becomes the module's path (a YAML double-quoted string). For filter configurations
    /// shaped elsewhere, e.g. as Istio renders an EnvoyFilter's or a WasmPlugin's.
    /// `plugin_config` and `failure_policy` are then unused.
    pub http_filter_yaml: Option<String>,
    /// Use this module instead of the release build (`Envoy::start`: `wasm_path()`).
    pub wasm: Option<PathBuf>,
    /// `failure_policy` of the plugin. Default `FAIL_RELOAD`, as shipped.
    pub failure_policy: String,
    /// The listener's `per_connection_buffer_limit_bytes`. Default 4 MiB, as shipped.
    pub buffer_limit_bytes: u32,
    /// Route timeout in seconds. Default 600, as shipped.
    pub route_timeout_secs: u32,
    /// When set, the circuit breakers of clusters `primary` and `economy` (default priority)
    /// allow this many connections, pending requests and requests at once, instead of
    /// the 10,000 each `envoy/envoy.yaml` ships.
    pub upstream_max_requests: Option<u32>,
    /// `-l` level. Default `$TOKENFUSE_ENVOY_LOG_LEVEL` or `info`.
    pub log_level: String,
    /// More command-line arguments, e.g. `["--component-log-level", "wasm:debug"]`.
    pub extra_args: Vec<String>,
}

impl Default for EnvoySpec {
    fn default() -> Self {
        EnvoySpec {
            plugin_config: r#"{"api":"v1"}"#.to_string(),
            primary_port: 18001,
            economy_port: 18002,
            listener_port: 0,
            admin_port: 0,
            concurrency: 2,
            extra_clusters_yaml: None,
            extra_bootstrap_yaml: None,
            no_filter: false,
            identity_edge: false,
            http_filter_yaml: None,
            wasm: None,
            failure_policy: "FAIL_RELOAD".to_string(),
            buffer_limit_bytes: 4 * 1024 * 1024,
            route_timeout_secs: 600,
            upstream_max_requests: None,
            log_level: std::env::var("TOKENFUSE_ENVOY_LOG_LEVEL")
                .unwrap_or_else(|_| "info".to_string()),
            extra_args: Vec::new(),
        }
    }
}

impl EnvoySpec {
    /// A spec with the given filter configuration and upstream ports; everything
    /// else as in `envoy/envoy.yaml`.
    pub fn new(plugin_config: impl Into<String>, primary_port: u16, economy_port: u16) -> Self {
        EnvoySpec {
            plugin_config: plugin_config.into(),
            primary_port,
            economy_port,
            ..EnvoySpec::default()
        }
    }
}

/// The text of the shipped `envoy/envoy.yaml`.
pub fn shipped() -> Result<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(SHIPPED);
    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The bootstrap for `spec`: the `shipped` bootstrap (the text of `envoy/envoy.yaml`) with
/// what the module documentation lists changed, as JSON.
pub fn render(shipped: &str, spec: &EnvoySpec) -> Result<Value, String> {
    let mut bootstrap = single_document(shipped, SHIPPED)?;
    set(
        &mut bootstrap,
        "/admin/address/socket_address/port_value",
        json!(spec.admin_port),
    )?;

    let listener = named(&mut bootstrap, "/static_resources/listeners", LISTENER)?;
    set(
        listener,
        "/address/socket_address/port_value",
        json!(spec.listener_port),
    )?;
    set(
        listener,
        "/per_connection_buffer_limit_bytes",
        json!(spec.buffer_limit_bytes),
    )?;
    let hcm = at(
        named(listener, "/filter_chains/0/filters", HCM)?,
        "/typed_config",
    )?;
    set_route_timeouts(hcm, spec.route_timeout_secs)?;
    set_http_filters(at(hcm, "/http_filters")?, spec)?;

    for (cluster, port) in [
        ("primary", spec.primary_port),
        ("economy", spec.economy_port),
    ] {
        let cluster = named(&mut bootstrap, "/static_resources/clusters", cluster)?;
        set_cluster_port(cluster, port)?;
        if let Some(max) = spec.upstream_max_requests {
            cluster["circuit_breakers"] = json!({"thresholds": [{
                "priority": "DEFAULT", "max_connections": max,
                "max_pending_requests": max, "max_requests": max}]});
        }
    }
    if let Some(yaml) = &spec.extra_clusters_yaml {
        let Value::Array(more) = single_document(yaml, "extra_clusters_yaml")? else {
            return Err(format!("extra_clusters_yaml is not a YAML list: {yaml}"));
        };
        list(at(&mut bootstrap, "/static_resources/clusters")?)?.extend(more);
    }
    if let Some(yaml) = &spec.extra_bootstrap_yaml {
        let Value::Object(keys) = single_document(yaml, "extra_bootstrap_yaml")? else {
            return Err(format!(
                "extra_bootstrap_yaml is not a YAML mapping: {yaml}"
            ));
        };
        for (key, value) in keys {
            bootstrap[key] = value;
        }
    }
    Ok(bootstrap)
}

/// The identity edge dropped or kept, and the Wasm filter configured, dropped or replaced.
fn set_http_filters(filters: &mut Value, spec: &EnvoySpec) -> Result<(), String> {
    let lua = index_of(filters, LUA_FILTER)?;
    let wasm = index_of(filters, WASM_FILTER)?;
    let items = list(filters)?;
    let mut remove = Vec::new();
    if !spec.identity_edge {
        remove.push(lua);
    }
    if spec.no_filter {
        remove.push(wasm);
    } else if let Some(yaml) = &spec.http_filter_yaml {
        let module = spec.wasm.as_deref().map(module_path).transpose()?;
        let yaml = match module {
            Some(path) => yaml.replace("{wasm}", &json!(path).to_string()),
            None if yaml.contains("{wasm}") => {
                return Err("http_filter_yaml names {wasm} but no module is given".to_string())
            }
            None => yaml.clone(),
        };
        let entry = match single_document(&yaml, "http_filter_yaml")? {
            Value::Array(mut items) if items.len() == 1 => items.remove(0),
            _ => {
                return Err(format!(
                    "http_filter_yaml is not one YAML list item: {yaml}"
                ))
            }
        };
        items[wasm] = entry;
    } else {
        let Some(module) = spec.wasm.as_deref() else {
            return Err("the spec keeps the Wasm filter but names no module".to_string());
        };
        let config = at(&mut items[wasm], "/typed_config/config")?;
        set(
            config,
            "/vm_config/code/local/filename",
            json!(module_path(module)?),
        )?;
        set(config, "/failure_policy", json!(spec.failure_policy))?;
        set(config, "/configuration/value", json!(spec.plugin_config))?;
    }
    // The later one first, so the earlier index stays right.
    remove.sort_unstable_by(|a, b| b.cmp(a));
    for i in remove {
        items.remove(i);
    }
    Ok(())
}

/// Every route's `timeout` (at least one route must have one).
fn set_route_timeouts(hcm: &mut Value, secs: u32) -> Result<(), String> {
    let mut found = 0;
    for host in list(at(hcm, "/route_config/virtual_hosts")?)? {
        for route in list(at(host, "/routes")?)? {
            if route.get("route").is_some() {
                set(route, "/route/timeout", json!(format!("{secs}s")))?;
                found += 1;
            }
        }
    }
    if found == 0 {
        return Err(format!("{SHIPPED}: no route with a timeout"));
    }
    Ok(())
}

/// The port of a cluster's one endpoint (a cluster with more would be half-mocked).
fn set_cluster_port(cluster: &mut Value, port: u16) -> Result<(), String> {
    let groups = list(at(cluster, "/load_assignment/endpoints")?)?;
    match groups.as_mut_slice() {
        [group] if group["lb_endpoints"].as_array().map(Vec::len) == Some(1) => set(
            group,
            "/lb_endpoints/0/endpoint/address/socket_address/port_value",
            json!(port),
        ),
        _ => Err(format!(
            "{SHIPPED}: cluster {} does not have exactly one endpoint",
            cluster["name"]
        )),
    }
}

/// The plugin configuration string of the shipped Wasm filter (the demo's budgets, prices
/// and admin endpoint).
pub fn shipped_plugin_config(shipped: &str) -> Result<String, String> {
    let mut bootstrap = single_document(shipped, SHIPPED)?;
    let listener = named(&mut bootstrap, "/static_resources/listeners", LISTENER)?;
    let hcm = named(listener, "/filter_chains/0/filters", HCM)?;
    let wasm = named(hcm, "/typed_config/http_filters", WASM_FILTER)?;
    at(wasm, "/typed_config/config/configuration/value")?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{SHIPPED}: the plugin configuration is not a string"))
}

/// `path` as the bootstrap names it: absolute (Envoy runs in a scratch directory) and UTF-8.
fn module_path(path: &Path) -> Result<String, String> {
    let absolute = std::path::absolute(path)
        .map_err(|e| format!("cannot make {} absolute: {e}", path.display()))?;
    absolute
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{} is not UTF-8", absolute.display()))
}

/// The value at `pointer` (a JSON pointer), which must exist.
fn at<'v>(v: &'v mut Value, pointer: &str) -> Result<&'v mut Value, String> {
    v.pointer_mut(pointer)
        .ok_or_else(|| format!("{SHIPPED}: no {pointer} where the harness expects it"))
}

/// Replaces the value at `pointer`, which must exist.
fn set(v: &mut Value, pointer: &str, new: Value) -> Result<(), String> {
    *at(v, pointer)? = new;
    Ok(())
}

fn list(v: &mut Value) -> Result<&mut Vec<Value>, String> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(format!("{SHIPPED}: a list expected, found {other}")),
    }
}

/// The index of the one item named `name` in the list `items`.
fn index_of(items: &mut Value, name: &str) -> Result<usize, String> {
    let found: Vec<usize> = list(items)?
        .iter()
        .enumerate()
        .filter(|(_, item)| item["name"] == name)
        .map(|(i, _)| i)
        .collect();
    match found.as_slice() {
        [i] => Ok(*i),
        _ => Err(format!(
            "{SHIPPED}: expected one {name}, found {}",
            found.len()
        )),
    }
}

/// The one item named `name` in the list at `pointer`.
fn named<'v>(v: &'v mut Value, pointer: &str, name: &str) -> Result<&'v mut Value, String> {
    let items = at(v, pointer)?;
    let i = index_of(items, name)?;
    Ok(&mut list(items)?[i])
}

/// The one document of the YAML `text` (named `what` in errors), as JSON.
fn single_document(text: &str, what: &str) -> Result<Value, String> {
    let mut docs = yaml_documents(text).map_err(|e| format!("{what}: {e}"))?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => Err(format!("{what}: {n} YAML documents, expected one")),
    }
}

/// Every document of the YAML `text`, as JSON values.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    docs.iter().map(yaml_to_json).collect()
}

/// A YAML node as JSON: integers and floats as numbers, keys as strings.
pub fn yaml_to_json(y: &Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(s.clone()), Value::Number),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) | Yaml::Real(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => return Err(format!("unsupported YAML key {other:?}")),
                    };
                    Ok((key, yaml_to_json(v)?))
                })
                .collect::<Result<_, String>>()?,
        ),
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => return Err(format!("unsupported YAML node {y:?}")),
    })
}
