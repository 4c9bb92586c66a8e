//! Starting the real `precall` binary for a test, and what every test needs around it:
//! a temporary directory, a config builder, free ports, and a small HTTP/1.1 client for
//! the webhook.
//!
//! The child's stderr (its tracing log) is read by a thread into a shared buffer with a
//! condition variable, so a test waits for a log line as an event, with a timeout. On drop
//! the child is killed and its whole log printed to stderr: a failing test shows it.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a started binary may take to print its "listening" lines.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Temporary directories (no `tempfile` crate).

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "precall-it-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("PRECALL_IT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Ports.

/// A UDP port that was free a moment ago (for tools such as SIPp that bind it themselves;
/// our own sockets bind port 0 and keep the socket instead).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port free for both UDP and TCP a moment ago.
pub fn free_port_udp_tcp() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

// ---------------------------------------------------------------------------------------
// Config.

/// One `[[agents]]` entry.
#[derive(Clone, Debug)]
pub struct Agent {
    pub id: String,
    pub api_key: String,
    pub numbers: Vec<String>,
    pub upstream: String,
    pub fallback_wait_ms: u64,
    /// TOML inline-table body for `defaults`, e.g. `customer_name = "there"`.
    pub defaults: String,
    /// `inject.max_bytes`.
    pub inject_max_bytes: usize,
    /// Extra keys of the inline `inject` table, e.g. `mode = "json"` (replaces the mode).
    pub inject_extra: String,
    /// Raw TOML appended to this agent: more keys first (`upstream_timeout_ms = 500`),
    /// then sub-tables such as `[[agents.routes]]`.
    pub extra_toml: String,
}

impl Agent {
    /// An agent serving `number`, sending calls to `upstream` (`sip:127.0.0.1:P;transport=udp`).
    pub fn new(id: &str, number: &str, upstream: &str) -> Agent {
        Agent {
            id: id.to_string(),
            api_key: format!("key-{id}"),
            numbers: vec![number.to_string()],
            upstream: upstream.to_string(),
            fallback_wait_ms: 10_000,
            defaults: r#"customer_name = "there", tier = "standard""#.to_string(),
            inject_max_bytes: 1024,
            inject_extra: String::new(),
            extra_toml: String::new(),
        }
    }

    /// Another `upstream` value, as TOML (a string or a list).
    pub fn upstream_toml(mut self, toml_value: &str) -> Agent {
        self.upstream = format!("\u{0}{toml_value}");
        self
    }

    /// Keys for the inline `inject` table, e.g. `mode = "json"`.
    pub fn inject(mut self, keys: &str) -> Agent {
        self.inject_extra = keys.to_string();
        self
    }

    /// Raw TOML appended after the agent's keys (keys first, then `[[agents.routes]]`).
    pub fn extra(mut self, toml: &str) -> Agent {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    pub fn fallback_ms(mut self, ms: u64) -> Agent {
        self.fallback_wait_ms = ms;
        self
    }

    pub fn defaults(mut self, toml_inline_body: &str) -> Agent {
        self.defaults = toml_inline_body.to_string();
        self
    }
}

/// A whole config for one test: port-0 listeners, loopback trusted.
#[derive(Clone, Debug)]
pub struct Config {
    pub agents: Vec<Agent>,
    pub default_agent: Option<String>,
    pub consume: bool,
    pub max_body_bytes: usize,
    /// `sip.trusted_peers` (whose P-Asserted-Identity is believed); loopback by default.
    pub trusted_peers: Vec<String>,
    /// More `sip.listen` entries after the UDP and TCP ones (`"tls:127.0.0.1:0"`).
    pub extra_listen: Vec<String>,
    /// Raw TOML lines added to `[sip]` (`tls_cert = "..."`).
    pub sip_extra: String,
    /// Raw TOML lines added to `[http]` (`admin_password = "..."`).
    pub http_extra: String,
    /// `[store]` lines replacing `backend = "memory"` and `ttl_secs = 300` (the Redis
    /// tests set backend, url, ttl and timeout here); `consume` is still added.
    pub store: Option<String>,
}

impl Config {
    pub fn new(agents: Vec<Agent>) -> Config {
        Config {
            agents,
            default_agent: None,
            consume: true,
            max_body_bytes: 4096,
            trusted_peers: vec!["127.0.0.0/8".to_string()],
            extra_listen: Vec::new(),
            sip_extra: String::new(),
            http_extra: String::new(),
            store: None,
        }
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let mut listen = vec![
            "\"udp:127.0.0.1:0\"".to_string(),
            "\"tcp:127.0.0.1:0\"".to_string(),
        ];
        listen.extend(self.extra_listen.iter().map(|l| format!("\"{l}\"")));
        writeln!(s, "[sip]\nlisten = [{}]", listen.join(", ")).unwrap();
        if !self.sip_extra.is_empty() {
            writeln!(s, "{}", self.sip_extra).unwrap();
        }
        let peers: Vec<String> = self
            .trusted_peers
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect();
        writeln!(s, "trusted_peers = [{}]", peers.join(", ")).unwrap();
        if let Some(d) = &self.default_agent {
            writeln!(s, "default_agent = \"{d}\"").unwrap();
        }
        writeln!(
            s,
            "\n[http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = {}\n{}\n",
            self.max_body_bytes, self.http_extra
        )
        .unwrap();
        let store = self
            .store
            .as_deref()
            .unwrap_or("backend = \"memory\"\nttl_secs = 300");
        writeln!(s, "[store]\n{store}\nconsume = {}\n", self.consume).unwrap();
        for a in &self.agents {
            let numbers: Vec<String> = a.numbers.iter().map(|n| format!("\"{n}\"")).collect();
            // `upstream_toml` marks a raw TOML value with a leading NUL
            let upstream = match a.upstream.strip_prefix('\u{0}') {
                Some(raw) => raw.to_string(),
                None => format!("\"{}\"", a.upstream),
            };
            let inject = if a.inject_extra.contains("mode") {
                format!(
                    "{}, prefix = \"X-Precall-\", max_bytes = {}",
                    a.inject_extra, a.inject_max_bytes
                )
            } else {
                format!(
                    "mode = \"headers\", prefix = \"X-Precall-\", max_bytes = {}",
                    a.inject_max_bytes
                )
            };
            let (keys, tables) = match a.extra_toml.find("[[") {
                Some(i) => (&a.extra_toml[..i], &a.extra_toml[i..]),
                None => (a.extra_toml.as_str(), ""),
            };
            writeln!(
                s,
                "[[agents]]\nid = \"{}\"\napi_keys = [\"{}\"]\nnumbers = [{}]\nupstream = {}\n\
                 default_region = \"US\"\nfallback_wait_ms = {}\ndefaults = {{ {} }}\n\
                 inject = {{ {} }}\n{}{}",
                a.id,
                a.api_key,
                numbers.join(", "),
                upstream,
                a.fallback_wait_ms,
                a.defaults,
                inject,
                keys,
                tables
            )
            .unwrap();
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// The child's log.

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

/// The captured stderr of a child process, waitable line by line.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl Log {
    /// Reads `stream` line by line on a thread (ANSI colour codes stripped).
    fn capture(stream: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let writer = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(&String::from_utf8_lossy(&buf));
                        let (lock, cv) = &*writer.inner;
                        lock.lock().unwrap().lines.push(line.trim_end().to_string());
                        cv.notify_all();
                    }
                }
            }
            let (lock, cv) = &*writer.inner;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        log
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The first line (from the start of the log) matching `pred`, waiting up to `timeout`
    /// for it to be written. `None` on timeout or when the stream closed without it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut state = lock.lock().unwrap();
        let mut seen = 0;
        loop {
            if let Some(l) = state.lines[seen..].iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            seen = state.lines.len();
            if state.closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits until the stream is closed (the process exited), up to `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut state = lock.lock().unwrap();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
        true
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=value` (or `key="value"`) in a tracing fmt line.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let mut from = 0;
    while let Some(i) = line[from..].find(&pat) {
        let at = from + i;
        // Must be the start of a field, not the tail of another key (`wait_ms` vs `ms`).
        let ok = at == 0 || matches!(line.as_bytes()[at - 1], b' ' | b'{' | b',' | b':');
        let rest = &line[at + pat.len()..];
        if ok {
            let value = if let Some(q) = rest.strip_prefix('"') {
                q.split('"').next().unwrap_or("")
            } else {
                rest.split([' ', '}', ',']).next().unwrap_or("")
            };
            return Some(value.to_string());
        }
        from = at + pat.len();
    }
    None
}

// ---------------------------------------------------------------------------------------
// The binary.

pub fn precall_bin() -> &'static str {
    env!("CARGO_BIN_EXE_precall")
}

/// A running `precall run -c CONFIG`, killed on drop.
pub struct Precall {
    child: Option<Child>,
    pub log: Log,
    /// The SIP/UDP listener.
    pub udp: SocketAddr,
    /// The SIP/TCP listener.
    pub tcp: SocketAddr,
    /// The webhook listener.
    pub http: SocketAddr,
    pub config: Config,
    /// The config file the process was started with (rewrite it, then SIGHUP).
    pub config_path: PathBuf,
    name: String,
    _dir: TempDir,
}

impl Precall {
    /// Writes `config`, starts the binary, waits for the three "listening" lines.
    pub fn start(name: &str, config: &Config) -> Precall {
        Precall::start_with(name, config, &config.to_toml(), &[])
    }

    /// Like [`Precall::start`], with `toml` as the config file (for keys [`Config`] does
    /// not model; `config` still describes the agents) and the binary started through
    /// `wrapper` when not empty (e.g. `["prlimit", "--nofile=64:64", "--"]`).
    pub fn start_with(name: &str, config: &Config, toml: &str, wrapper: &[&str]) -> Precall {
        let dir = TempDir::new(name);
        let path = dir.join("precall.toml");
        std::fs::write(&path, toml).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(precall_bin());
                c
            }
            None => Command::new(precall_bin()),
        };
        let mut child = command
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn precall");
        let log = Log::capture(child.stderr.take().unwrap());
        let mut p = Precall {
            child: Some(child),
            log,
            udp: "0.0.0.0:0".parse().unwrap(),
            tcp: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
            config: config.clone(),
            config_path: path.clone(),
            name: name.to_string(),
            _dir: dir,
        };
        p.udp = p.listening("SIP/UDP");
        p.tcp = p.listening("SIP/TCP");
        p.http = if config.http_extra.contains("tls_cert") {
            p.listening("HTTPS")
        } else {
            p.listening("HTTP")
        };
        p
    }

    /// The address of the `listening for WHAT on ADDR` line (`"SIP/TLS"`), waiting for it.
    pub fn listening(&self, what: &str) -> SocketAddr {
        let prefix = format!("listening for {what} on ");
        let line = self
            .log
            .wait_for(STARTUP_TIMEOUT, |l| l.contains(&prefix))
            .unwrap_or_else(|| {
                panic!(
                    "[{}] no `{prefix}ADDR` line within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.log.text()
                )
            });
        let rest = &line[line.find(&prefix).unwrap() + prefix.len()..];
        let addr = rest
            .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
            .next()
            .unwrap();
        addr.parse()
            .unwrap_or_else(|e| panic!("bad address {addr:?} in {line:?}: {e}"))
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends a signal (`"HUP"`, `"TERM"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit on its own: its stderr closing is the event, then
    /// the exit status is collected.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if !self.log.wait_closed(timeout) {
            return None;
        }
        self.child.as_mut()?.wait().ok()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn api_key(&self, agent: &str) -> String {
        self.config
            .agents
            .iter()
            .find(|a| a.id == agent)
            .map(|a| a.api_key.clone())
            .unwrap_or_default()
    }

    /// `POST /v1/precall` with the agent's key; `fields` are extra JSON members.
    pub fn post_context(
        &self,
        agent: &str,
        phone: &str,
        fields: serde_json::Value,
    ) -> HttpResponse {
        let mut body = serde_json::json!({ "agentId": agent, "phoneNumber": phone });
        if let serde_json::Value::Object(extra) = fields {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        let key = format!("Bearer {}", self.api_key(agent));
        http_request(
            self.http,
            "POST",
            "/v1/precall",
            &[
                ("Authorization", &key),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    /// `POST /v1/precall`, asserting 202.
    pub fn post_ok(
        &self,
        agent: &str,
        phone: &str,
        fields: serde_json::Value,
    ) -> serde_json::Value {
        let r = self.post_context(agent, phone, fields);
        assert_eq!(
            r.status, 202,
            "webhook not accepted: {} {}",
            r.status, r.body
        );
        r.json()
    }

    /// Waits for the per-call summary line of `call_id` (`call_id=... status=...`).
    pub fn wait_call_line(&self, call_id: &str, timeout: Duration) -> Option<String> {
        self.log.wait_for(timeout, |l| {
            log_field(l, "call_id").as_deref() == Some(call_id) && log_field(l, "status").is_some()
        })
    }
}

impl Drop for Precall {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.log.wait_closed(Duration::from_secs(2));
        // eprint!, not a raw stderr handle: the test harness captures it, so the log shows
        // only for a failing test (or with --nocapture).
        let mut out = format!("----- precall log [{}] -----\n", self.name);
        for l in self.log.lines() {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str(&format!("----- end of precall log [{}] -----\n", self.name));
        eprint!("{out}");
    }
}

/// Runs the binary to completion with `args` (for `check` and bad-config `run`), with a
/// timeout; returns the exit status and the combined stdout+stderr.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let mut child = Command::new(precall_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn precall");
    let out = Log::capture(child.stdout.take().unwrap());
    let err = Log::capture(child.stderr.take().unwrap());
    let exited = out.wait_closed(timeout) && err.wait_closed(timeout);
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(exited, "precall {args:?} did not exit within {timeout:?}");
    (status, format!("{}\n{}", out.text(), err.text()))
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1, by hand: the tests need to send exactly the bytes they mean (bad JSON, wrong
// content types, oversized bodies), synchronously.

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.body))
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        writeln!(req, "{n}: {v}\r").unwrap();
    }
    if !body.is_empty() || method == "POST" {
        writeln!(req, "Content-Length: {}\r", body.len()).unwrap();
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // A server may answer (413) and close before reading the whole body: a failed write is
    // not the end of the story, the answer may already be there.
    let _ = stream.write_all(&bytes);
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) => {
                if raw.is_empty() {
                    panic!("HTTP {method} {path}: no response: {e}");
                }
                break;
            }
        }
    }
    parse_http_response(&raw).unwrap_or_else(|| {
        panic!(
            "HTTP {method} {path}: unparseable response {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let head_end = crate::sipmsg::find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    } else if let Some((_, len)) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let len: usize = len.parse().ok()?;
        body.truncate(len);
    }
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = crate::sipmsg::find(data, b"\r\n") {
        let size_txt = String::from_utf8_lossy(&data[..eol]);
        let size =
            usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_plain_and_quoted() {
        let l = "2026-01-01T00:00:00Z  INFO call{call_id=abc@h agent=a caller=+1415}: precall::proxy: call set up status=hit wait_ms=12 upstream=\"200 OK\"";
        assert_eq!(log_field(l, "call_id").as_deref(), Some("abc@h"));
        assert_eq!(log_field(l, "status").as_deref(), Some("hit"));
        assert_eq!(log_field(l, "wait_ms").as_deref(), Some("12"));
        assert_eq!(log_field(l, "ms"), None);
        assert_eq!(log_field(l, "upstream").as_deref(), Some("200 OK"));
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\u{1b}[2mINFO\u{1b}[0m x"), "INFO x");
    }

    #[test]
    fn http_chunked_and_sized() {
        let r =
            parse_http_response(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((r.status, r.body.as_str()), (202, "{}"));
        let r = parse_http_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, "abcde");
    }

    #[test]
    fn config_toml_has_the_contract_keys() {
        let mut c = Config::new(vec![Agent::new(
            "a",
            "+14155550100",
            "sip:127.0.0.1:5070;transport=udp",
        )]);
        c.default_agent = Some("a".into());
        let t = c.to_toml();
        let v: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(
            v["agents"][0]["upstream"].as_str(),
            Some("sip:127.0.0.1:5070;transport=udp")
        );
        assert_eq!(v["sip"]["listen"].as_array().unwrap().len(), 2);
        assert_eq!(v["store"]["consume"].as_bool(), Some(true));
        assert_eq!(
            v["agents"][0]["defaults"]["customer_name"].as_str(),
            Some("there")
        );
    }
}
