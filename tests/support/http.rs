//! A deliberately small HTTP/1.1 client for the integration tests, built on
//! `std::net::TcpStream` only.
//!
//! Every request is sent with `Connection: close` and an explicit
//! `Content-Length`, so one request uses one connection and the response body
//! ends at the latest when the server closes it. Response bodies framed by
//! `Content-Length`, by `Transfer-Encoding: chunked` (Envoy's usual framing for
//! streamed SSE responses) or by the end of the connection are all decoded.
//!
//! Every socket gets [`READ_TIMEOUT`] for reads and writes, so a request that
//! hangs (for example a filter that pauses and never resumes) fails its test
//! with a `TimedOut`/`WouldBlock` error instead of hanging the whole suite.
//!
//! [`stream_then_abort`] plays a client that goes away in the middle of a
//! streamed response.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// Read/write timeout on every socket opened by this module.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields in arrival order; names are lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The decoded body (chunked framing removed).
    pub body: Vec<u8>,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name` (case-insensitive), in arrival order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as text (invalid UTF-8 replaced by U+FFFD).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the status and body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(e) => panic!(
                "response body is not JSON ({e}); status {}, body: {}",
                self.status,
                self.text()
            ),
        }
    }
}

/// Opens a connection to `127.0.0.1:port` with the module's timeouts set.
fn connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Serialises a request. `Host`, `Connection: close` and `Content-Length` are
/// added unless the caller passed them (or passed `Transfer-Encoding`, in which
/// case the caller frames the body itself).
fn encode_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str("Host: localhost\r\n");
    }
    if !has("connection") {
        head.push_str("Connection: close\r\n");
    }
    if !has("content-length") && !has("transfer-encoding") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads a status line and header block. Interim `1xx` responses are skipped.
fn read_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response status line",
            ));
        }
        // "HTTP/1.1 200 OK"
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {line:?}"),
                )
            })?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside the response headers",
                ));
            }
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        if (100..200).contains(&status) && status != 101 {
            continue; // 100 Continue and friends: the real response follows
        }
        return Ok((status, headers));
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    find_header(headers, "transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false)
}

/// Reads one chunked-encoded body to its terminating zero-size chunk.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        if reader.read_line(&mut size_line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunked body",
            ));
        }
        let size_hex = size_line.trim().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size line {size_line:?}"),
            )
        })?;
        if size == 0 {
            // Trailers (if any) up to the empty line.
            loop {
                let mut t = String::new();
                if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

/// Reads the body that follows a response head.
fn read_body(
    reader: &mut impl BufRead,
    method: &str,
    status: u16,
    headers: &[(String, String)],
) -> io::Result<Vec<u8>> {
    if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
        return Ok(Vec::new());
    }
    if is_chunked(headers) {
        return read_chunked(reader);
    }
    if let Some(len) = find_header(headers, "content-length") {
        let len: usize = len.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad content-length {len:?}"),
            )
        })?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    reader.read_to_end(&mut body)?;
    Ok(body)
}

/// Sends one request to `127.0.0.1:port` and reads the whole response.
///
/// `headers` are sent as given (after `Host`, `Connection: close` and
/// `Content-Length`, which are added unless present).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut stream = connect(port)?;
    stream.write_all(&encode_request(method, path, headers, body))?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader)?;
    let body = read_body(&mut reader, method, status, &headers)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET path` with the given headers.
pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    request(port, "GET", path, headers, b"")
}

/// `POST path` with a JSON body; adds `Content-Type: application/json` unless
/// the caller set a content type.
pub fn post_json(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Response> {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        all.push(("content-type", "application/json"));
    }
    request(port, "POST", path, &all, body.as_bytes())
}

/// Decodes as much of a (possibly incomplete) chunked body as has arrived.
pub fn decode_chunked_prefix(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = raw[pos..].windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let line = String::from_utf8_lossy(&raw[pos..pos + eol]);
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return out;
        };
        if size == 0 {
            return out;
        }
        let data_start = pos + eol + 2;
        let available = raw.len().saturating_sub(data_start).min(size);
        out.extend_from_slice(&raw[data_start..data_start + available]);
        if available < size || raw.len() < data_start + size + 2 {
            return out;
        }
        pos = data_start + size + 2;
    }
}

/// Sends a request, reads the response head and then body bytes until at least
/// `abort_after_bytes` decoded body bytes have arrived, and then closes the
/// connection without reading the rest: a client that gives up mid-stream.
///
/// Returns the decoded body bytes received before the abort (possibly a little
/// more than `abort_after_bytes`: reads are not split). If the response ends
/// before that many bytes, the whole body is returned. A non-2xx status is not an
/// error here; check the returned bytes.
pub fn stream_then_abort(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    abort_after_bytes: usize,
) -> io::Result<Vec<u8>> {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        all.push(("content-type", "application/json"));
    }
    let stream = connect(port)?;
    (&stream).write_all(&encode_request("POST", path, &all, body.as_bytes()))?;
    let mut reader = BufReader::new(&stream);
    let (_status, resp_headers) = read_head(&mut reader)?;
    let chunked = is_chunked(&resp_headers);
    let limit = find_header(&resp_headers, "content-length").and_then(|v| v.parse::<usize>().ok());

    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let decoded = loop {
        let decoded = if chunked {
            decode_chunked_prefix(&raw)
        } else {
            raw.clone()
        };
        let complete = limit.is_some_and(|l| decoded.len() >= l);
        if decoded.len() >= abort_after_bytes || complete {
            break decoded;
        }
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break decoded; // the server finished first
        }
        raw.extend_from_slice(&buf[..n]);
    };
    // Walk away: close both directions. Envoy sees the downstream disconnect
    // and resets the stream towards the upstream.
    let _ = stream.shutdown(Shutdown::Both);
    Ok(decoded)
}
