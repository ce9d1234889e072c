//! The proxy, as the core sees it: the few things an exchange reads from or does to Envoy.
//!
//! The glue implements [`Host`] over proxy-wasm host calls (`wasm_host.rs`); tests implement
//! it with [`fake::FakeHost`], which records everything, so the whole request flow is tested
//! natively without an Envoy.

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// What an exchange needs from the proxy for one HTTP stream.
pub trait Host {
    /// A request header (`:method`, `:path` included).
    fn request_header(&self, name: &str) -> Option<String>;
    /// Set (`Some`) or remove (`None`) a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// The buffered request body, `size` bytes from the start.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replace the first `size` bytes of the buffered request body with `body`.
    fn replace_request_body(&mut self, size: usize, body: &[u8]);
    /// A response header (`:status` included).
    fn response_header(&self, name: &str) -> Option<String>;
    /// Set (`Some`) or remove (`None`) a response header.
    fn set_response_header(&mut self, name: &str, value: Option<&str>);
    /// The current response body chunk, `size` bytes.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Answer the client directly; the request goes no further.
    fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// The upstream cluster the request was routed to, once known.
    fn upstream_cluster(&self) -> Option<String>;
    /// Add `n` (> 0) to the counter `name`, defining it on first use.
    fn counter_add(&mut self, name: &str, n: u64);
    /// Write a log line. Callers never pass prompts, completions or credentials.
    fn log(&self, level: Level, message: &str);
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`Host`] for tests.

    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::{Host, Level};

    /// A local reply the exchange sent.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Reply {
        pub status: u32,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Reply {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Records everything; tests set the request/response side and read the effects.
    #[derive(Debug, Default)]
    pub struct FakeHost {
        pub request_headers: Vec<(String, String)>,
        pub request_body: Vec<u8>,
        pub response_headers: Vec<(String, String)>,
        pub response_chunk: Vec<u8>,
        pub cluster: Option<String>,
        pub reply: Option<Reply>,
        pub counters: BTreeMap<String, u64>,
        pub logs: RefCell<Vec<(Level, String)>>,
    }

    fn get(list: &[(String, String)], name: &str) -> Option<String> {
        list.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn set(list: &mut Vec<(String, String)>, name: &str, value: Option<&str>) {
        list.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            list.push((name.to_string(), v.to_string()));
        }
    }

    impl FakeHost {
        /// A POST to `path` with `body` and a matching content-length.
        pub fn post(path: &str, body: &[u8]) -> Self {
            FakeHost {
                request_headers: vec![
                    (":method".into(), "POST".into()),
                    (":path".into(), path.into()),
                    ("content-type".into(), "application/json".into()),
                    ("content-length".into(), body.len().to_string()),
                ],
                request_body: body.to_vec(),
                cluster: Some("primary".into()),
                ..Default::default()
            }
        }

        pub fn req_header(&self, name: &str) -> Option<String> {
            get(&self.request_headers, name)
        }

        pub fn resp_header(&self, name: &str) -> Option<String> {
            get(&self.response_headers, name)
        }

        /// Counter value by exact name, 0 when never incremented.
        pub fn counter(&self, name: &str) -> u64 {
            self.counters.get(name).copied().unwrap_or(0)
        }

        /// Sum of all counters whose name starts with `prefix` and contains every `parts`.
        pub fn counter_sum(&self, prefix: &str, parts: &[&str]) -> u64 {
            self.counters
                .iter()
                .filter(|(k, _)| k.starts_with(prefix) && parts.iter().all(|p| k.contains(p)))
                .map(|(_, v)| *v)
                .sum()
        }

        pub fn log_text(&self) -> String {
            self.logs
                .borrow()
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        }
    }

    impl Host for FakeHost {
        fn request_header(&self, name: &str) -> Option<String> {
            get(&self.request_headers, name)
        }
        fn set_request_header(&mut self, name: &str, value: Option<&str>) {
            set(&mut self.request_headers, name, value)
        }
        fn request_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.request_body[..size.min(self.request_body.len())].to_vec())
        }
        fn replace_request_body(&mut self, size: usize, body: &[u8]) {
            let size = size.min(self.request_body.len());
            self.request_body.splice(..size, body.iter().copied());
        }
        fn response_header(&self, name: &str) -> Option<String> {
            get(&self.response_headers, name)
        }
        fn set_response_header(&mut self, name: &str, value: Option<&str>) {
            set(&mut self.response_headers, name, value)
        }
        fn response_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.response_chunk[..size.min(self.response_chunk.len())].to_vec())
        }
        fn send_reply(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
            self.reply = Some(Reply {
                status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.to_vec(),
            });
        }
        fn upstream_cluster(&self) -> Option<String> {
            self.cluster.clone()
        }
        fn counter_add(&mut self, name: &str, n: u64) {
            assert!(n > 0, "Envoy rejects counter increments <= 0 ({name})");
            *self.counters.entry(name.to_string()).or_default() += n;
        }
        fn log(&self, level: Level, message: &str) {
            self.logs.borrow_mut().push((level, message.to_string()));
        }
    }
}
