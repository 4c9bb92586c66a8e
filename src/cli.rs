//! The command line (clap): `run`, `check`, `curl`, `send`.
//!
//! `run` is wired in `app`; this module holds the three helper commands an operator uses
//! while setting an agent up: `check` (is the config right, and what did it resolve to),
//! `curl` (Phonely's "Copy cURL": a webhook call to paste elsewhere) and `send` (the
//! "Test" step: post a webhook to the running sidecar and show the headers a call would
//! now get). Errors are `anyhow` here, at the edge; the library below stays typed.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

use crate::config::{AgentConfig, CallerSource, Config, RouteTarget};

#[derive(Debug, Parser)]
#[command(
    name = "precall",
    version,
    about = "SIP-side pre-call webhook sidecar for voice agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "config/precall.toml")]
        config: PathBuf,
        /// Log format: `text` or `json`.
        #[arg(long, default_value = "text")]
        log_format: String,
        /// Write the process id here (for `precall reload` and service managers).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Ask a running precall to re-read its config (sends SIGHUP to the pid in the file).
    Reload {
        #[arg(long, default_value = "/run/precall.pid")]
        pid_file: PathBuf,
    },
    /// Validate a config and print the resolved agents; exit 1 naming each problem.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print a ready-to-paste curl command for an agent's webhook ("Copy cURL").
    Curl {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        phone: Option<String>,
    },
    /// Send a test webhook; print the answer and the headers a call would now receive.
    Send {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        phone: String,
        /// Extra context fields, `key=value` (repeatable).
        #[arg(long = "field", value_name = "KEY=VALUE")]
        fields: Vec<String>,
    },
}

/// The caller number `curl` uses when `--phone` is not given: a fictional US number.
pub const EXAMPLE_PHONE: &str = "+14155550123";

/// How long `send` waits for each webhook answer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// `precall check`: validates the config and prints the resolved agents to stdout.
///
/// # Errors
/// The config does not load: each problem has been printed to stderr, one per line,
/// and the error says how many there were (main exits 1).
pub fn check(path: &Path) -> anyhow::Result<()> {
    match Config::load(path) {
        Ok(config) => {
            let tls_problems = crate::tls::check_files(&config);
            if !tls_problems.is_empty() {
                for problem in &tls_problems {
                    eprintln!("{}: {problem}", path.display());
                }
                bail!("{}: TLS files unusable", path.display());
            }
            print!("{}", describe(path, &config));
            Ok(())
        }
        Err(error) => {
            for problem in &error.problems {
                eprintln!("{}: {problem}", path.display());
            }
            let n = error.problems.len();
            bail!(
                "{}: {n} problem{} found",
                path.display(),
                if n == 1 { "" } else { "s" }
            )
        }
    }
}

/// `precall curl`: prints a ready-to-paste curl command posting a webhook for `agent`.
///
/// # Errors
/// The config does not load, or has no agent `agent`.
pub fn curl(path: &Path, agent: &str, phone: Option<&str>) -> anyhow::Result<()> {
    let config = load(path)?;
    let agent = find_agent(&config, path, agent)?;
    println!(
        "{}",
        curl_command(&config, agent, phone.unwrap_or(EXAMPLE_PHONE))?
    );
    Ok(())
}

/// `precall send`: posts a webhook for `agent` and caller `phone` (plus `fields`, each
/// `key=value`) to the running sidecar at `http.listen`, prints the answer, then asks
/// `/v1/precall/test` for the headers a call would now receive and prints them, one
/// `Name: value` per line.
///
/// A field value is JSON when it reads as a JSON number, boolean, object or array
/// (`score=80`, `vip=true`, `tags=["a"]`); anything else is a string (`name=Ada`).
///
/// # Errors
/// The config does not load, the agent is unknown, a field is not `key=value`, the
/// sidecar cannot be reached, or it answers with a non-2xx status (its error JSON has
/// been printed).
pub async fn send(path: &Path, agent: &str, phone: &str, fields: &[String]) -> anyhow::Result<()> {
    let config = load(path)?;
    let agent = find_agent(&config, path, agent)?;
    let payload = payload(&agent.id, phone, fields)?;
    let key = first_key(agent)?;
    let mut builder = reqwest::Client::builder().timeout(SEND_TIMEOUT);
    if let Some(tls) = &config.http.tls {
        // The sidecar's own certificate may be self-signed: trust it for this request.
        let pem =
            std::fs::read(&tls.cert).with_context(|| format!("reading {}", tls.cert.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{}: not PEM certificates", tls.cert.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().context("cannot build an HTTP client")?;
    let mut out = String::new();
    let secret = agent.webhook_secret.as_ref().map(|s| s.expose());
    let result = exchange(
        &client,
        &webhook_base(&config),
        (key, secret),
        &payload,
        &mut out,
    )
    .await;
    print!("{out}");
    result
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow!("invalid config {}:\n{e}", path.display()))
}

fn find_agent<'a>(config: &'a Config, path: &Path, id: &str) -> anyhow::Result<&'a AgentConfig> {
    config.agent(id).ok_or_else(|| {
        let ids: Vec<&str> = config.agents.iter().map(|a| a.id.as_str()).collect();
        anyhow!(
            "no agent {id:?} in {} (agents: {})",
            path.display(),
            ids.join(", ")
        )
    })
}

fn first_key(agent: &AgentConfig) -> anyhow::Result<&str> {
    agent
        .api_keys
        .first()
        .map(String::as_str)
        .ok_or_else(|| anyhow!("agent {:?} has no api_keys", agent.id))
}

/// What `check` prints for a valid config.
fn describe(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "(none)".to_string()
        } else {
            items.join(", ")
        }
    };
    let sip = &config.sip;
    let _ = writeln!(out, "{}: OK", path.display());
    let _ = writeln!(
        out,
        "sip    listen {}; trusted peers {}; default agent {}; record-route {}",
        join(sip.listen.iter().map(ToString::to_string).collect()),
        join(sip.trusted_peers.iter().map(ToString::to_string).collect()),
        sip.default_agent
            .as_deref()
            .unwrap_or("(none: unknown numbers get 404)"),
        if sip.record_route { "on" } else { "off" },
    );
    let _ = writeln!(
        out,
        "http   listen {}; max body {} bytes; at most {} outgoing calls at once",
        config.http.listen, config.http.max_body_bytes, config.http.client_concurrency
    );
    let _ = writeln!(
        out,
        "store  memory; ttl {} s; {}",
        config.store.ttl.as_secs(),
        if config.store.consume {
            "a context is used by one call"
        } else {
            "a context serves every call until it expires"
        }
    );
    for agent in &config.agents {
        let _ = writeln!(out);
        let _ = writeln!(out, "agent {}", agent.id);
        let rows = [
            ("numbers", join(agent.numbers.clone())),
            (
                "upstream",
                agent
                    .upstreams
                    .iter()
                    .map(|u| format!("{} ({} {})", u.uri, u.transport, u.addr))
                    .collect::<Vec<_>>()
                    .join(", then "),
            ),
            (
                "upstream wait",
                format!(
                    "{} ms for a provisional, then the next upstream",
                    agent.upstream_timeout.as_millis()
                ),
            ),
            (
                "health check",
                agent.health_check.map_or("off".to_string(), |every| {
                    format!("OPTIONS every {} s", every.as_secs())
                }),
            ),
            (
                "lookup",
                agent.lookup.as_ref().map_or("off".to_string(), |lookup| {
                    format!(
                        "POST {} on a miss (timeout {} ms)",
                        lookup.url,
                        lookup.timeout.as_millis()
                    )
                }),
            ),
            (
                "fallback wait",
                format!("{} ms", agent.fallback_wait.as_millis()),
            ),
            ("region", agent.default_region.as_ref().to_string()),
            (
                "caller sources",
                join(
                    agent
                        .caller_sources
                        .iter()
                        .map(|s| match s {
                            CallerSource::Pai => "pai".to_string(),
                            CallerSource::From => "from".to_string(),
                        })
                        .collect(),
                ),
            ),
            ("inject", describe_inject(agent)),
            (
                "defaults",
                Value::Object(agent.defaults.clone()).to_string(),
            ),
            ("api keys", agent.api_keys.len().to_string()),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "  {name:<15} {value}");
        }
        if agent.routes.is_empty() {
            let _ = writeln!(out, "  {:<15} (none)", "routes");
        }
        for (index, route) in agent.routes.iter().enumerate() {
            let label = match &route.name {
                Some(name) => format!("route {index} ({name})"),
                None => format!("route {index}"),
            };
            let target = match &route.target {
                RouteTarget::Upstreams(upstreams) => format!(
                    "upstream {}",
                    upstreams
                        .iter()
                        .map(|u| u.uri.as_str())
                        .collect::<Vec<_>>()
                        .join(", then ")
                ),
                RouteTarget::Agent(id) => format!("hand over to agent {id}"),
                RouteTarget::Stay => "stay".to_string(),
            };
            let set = if route.set.is_empty() {
                String::new()
            } else {
                format!("; set {}", Value::Object(route.set.clone()))
            };
            let _ = writeln!(out, "  {label:<15} when {} → {target}{set}", route.when);
        }
    }
    out
}

/// The `inject` row of `check`: mode, prefix, bound, and where an HTTP delivery goes.
fn describe_inject(agent: &AgentConfig) -> String {
    let inject = &agent.inject;
    let mut text = format!(
        "{}, prefix {}, max {} bytes",
        inject.mode.as_str(),
        inject.prefix,
        inject.max_bytes
    );
    if let (true, Some(url)) = (inject.mode.has_http(), &inject.url) {
        let _ = write!(
            text,
            ", POST {url} before forwarding (timeout {} ms)",
            inject.timeout.as_millis()
        );
    }
    text
}

/// `http://ADDR:PORT`, with an every-interface listen address (`0.0.0.0`, `[::]`)
/// replaced by loopback, which is where a local client reaches it.
/// [`base_url`], `https://` when the webhook is served over TLS.
fn webhook_base(config: &Config) -> String {
    let base = base_url(config.http.listen);
    match &config.http.tls {
        Some(_) => base.replacen("http://", "https://", 1),
        None => base,
    }
}

fn base_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// The curl command line `precall curl` prints.
fn curl_command(config: &Config, agent: &AgentConfig, phone: &str) -> anyhow::Result<String> {
    let mut body = Map::new();
    body.insert("agentId".into(), agent.id.clone().into());
    body.insert("phoneNumber".into(), phone.into());
    body.insert("customer_name".into(), "Ada".into());
    let body = Value::Object(body).to_string();
    let url = shell_quote(&format!("{}/v1/precall", webhook_base(config)));
    let auth = shell_quote(&format!("Authorization: Bearer {}", first_key(agent)?));
    let json = shell_quote("Content-Type: application/json");
    let Some(secret) = &agent.webhook_secret else {
        return Ok(format!(
            "curl -sS -X POST {url} -H {auth} -H {json} -d {}",
            shell_quote(&body)
        ));
    };
    // A signature holds a timestamp, so it is computed when the command runs.
    Ok(format!(
        "body={}; t=$(date +%s); sig=$(printf '%s.%s' \"$t\" \"$body\" | openssl dgst -sha256 -hmac {} -r | cut -d' ' -f1); \
         curl -sS -X POST {url} -H {auth} -H {json} -H \"X-Precall-Signature: t=$t,v1=$sig\" -d \"$body\"",
        shell_quote(&body),
        shell_quote(&String::from_utf8_lossy(secret.expose())),
    ))
}

/// `s` as one POSIX shell word: bare when every character is plainly safe, else in single
/// quotes, each `'` written as `'\''`.
fn shell_quote(s: &str) -> String {
    let is_plain = |b: u8| b.is_ascii_alphanumeric() || b"_-./:=@%+,".contains(&b);
    if !s.is_empty() && s.bytes().all(is_plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The webhook body: `agentId`, `phoneNumber`, then each `key=value` field in order.
fn payload(agent_id: &str, phone: &str, fields: &[String]) -> anyhow::Result<Value> {
    let mut body = Map::new();
    body.insert("agentId".into(), agent_id.into());
    body.insert("phoneNumber".into(), phone.into());
    for field in fields {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| anyhow!("--field {field:?}: expected KEY=VALUE"))?;
        if key.is_empty() {
            bail!("--field {field:?}: the key is empty");
        }
        if key == "agentId" || key == "phoneNumber" {
            bail!("--field {field:?}: set {key} with --agent / --phone");
        }
        body.insert(key.to_string(), field_value(value));
    }
    Ok(Value::Object(body))
}

/// A `--field` value: JSON when it is a JSON number, boolean, object or array; else the
/// text as a string (so `name=null` is the string "null").
fn field_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ (Value::Number(_) | Value::Bool(_) | Value::Object(_) | Value::Array(_))) => {
            value
        }
        _ => Value::String(text.to_string()),
    }
}

/// The two requests of `send`, writing what to show into `out` as it goes (so a failed
/// second step still shows the first).
/// `credentials`: the API key, and the agent's `webhook_secret` when it signs.
async fn exchange(
    client: &reqwest::Client,
    base_url: &str,
    key: (&str, Option<&[u8]>),
    payload: &Value,
    out: &mut String,
) -> anyhow::Result<()> {
    let url = format!("{base_url}/v1/precall");
    let answer = post(client, &url, key, payload).await?;
    let _ = writeln!(out, "POST {url} → {}", answer.status);
    let _ = writeln!(out, "{}", answer.pretty());
    answer.ensure_success(&url)?;

    let url = format!("{base_url}/v1/precall/test");
    let answer = post(client, &url, key, payload).await?;
    answer.ensure_success(&url).inspect_err(|_| {
        let _ = writeln!(out, "POST {url} → {}", answer.status);
        let _ = writeln!(out, "{}", answer.pretty());
    })?;
    let status = answer
        .json
        .as_ref()
        .and_then(|j| j.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let _ = writeln!(out);
    let _ = writeln!(out, "A call now gets these headers (status {status}):");
    let headers = answer
        .json
        .as_ref()
        .and_then(|j| j.get("headers"))
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{url}: the answer has no \"headers\" list: {}", answer.text))?;
    for header in headers {
        let name = header.get("name").and_then(Value::as_str).unwrap_or("?");
        let value = header.get("value").and_then(Value::as_str).unwrap_or("");
        let _ = writeln!(out, "{name}: {value}");
    }
    if let Some(json) = &answer.json {
        out.push_str(&route_lines(json));
    }
    Ok(())
}

/// What `send` prints about routing from a `/v1/precall/test` answer: the matched rule
/// and where the call goes, then each rule that failed on the payload.
fn route_lines(answer: &Value) -> String {
    let mut out = String::new();
    if let Some(route) = answer.get("route").filter(|r| !r.is_null()) {
        let label = route.get("label").and_then(Value::as_str).unwrap_or("?");
        let upstream = route
            .get("upstream")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", then ")
            })
            .unwrap_or_default();
        let _ = match route.get("agent").and_then(Value::as_str) {
            Some(agent) => writeln!(out, "(route {label}: handed over to {agent}, {upstream})"),
            None => writeln!(out, "(route {label}: {upstream})"),
        };
    }
    let errors = answer.get("routeErrors").and_then(Value::as_array);
    for error in errors.into_iter().flatten() {
        let index = error.get("index").map_or(Value::Null, Clone::clone);
        let message = error.get("error").and_then(Value::as_str).unwrap_or("?");
        let _ = writeln!(out, "(route {index} failed, so did not match: {message})");
    }
    out
}

/// An HTTP answer: status, raw text, and the text as JSON when it is JSON.
struct Answer {
    status: reqwest::StatusCode,
    text: String,
    json: Option<Value>,
}

impl Answer {
    fn pretty(&self) -> String {
        self.json
            .as_ref()
            .and_then(|j| serde_json::to_string_pretty(j).ok())
            .unwrap_or_else(|| self.text.clone())
    }

    fn ensure_success(&self, url: &str) -> anyhow::Result<()> {
        if self.status.is_success() {
            return Ok(());
        }
        let reason = self
            .json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(Value::as_str)
            .unwrap_or(self.text.as_str());
        bail!("{url} answered {}: {reason}", self.status)
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    (key, secret): (&str, Option<&[u8]>),
    payload: &Value,
) -> anyhow::Result<Answer> {
    let body = payload.to_string();
    let mut request = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json");
    if let Some(secret) = secret {
        // Signed over the exact bytes sent (README "Webhook signatures").
        let signature = crate::webhook::signature::sign(
            secret,
            crate::webhook::signature::unix_now(),
            body.as_bytes(),
        );
        request = request.header(crate::webhook::signature::HEADER, signature);
    }
    let response = request
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url} (is `precall run` running?)"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("{url}: the answer could not be read"))?;
    let json = serde_json::from_str(&text).ok();
    Ok(Answer { status, text, json })
}

/// `precall reload`: SIGHUP to the pid written by `run --pid-file`.
///
/// # Errors
/// The pid file cannot be read or holds no live process.
pub fn reload(pid_file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?;
    let pid: i32 = text.trim().parse().with_context(|| {
        format!(
            "{}: {:?} is not a process id",
            pid_file.display(),
            text.trim()
        )
    })?;
    anyhow::ensure!(
        pid > 1,
        "{}: {pid} is not a precall process id",
        pid_file.display()
    );
    // SAFETY: kill(2) with a plain pid and signal number has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    if rc != 0 {
        anyhow::bail!("signalling pid {pid}: {}", std::io::Error::last_os_error());
    }
    println!("sent SIGHUP to precall (pid {pid}); its log says whether the new config was taken");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::json;

    const BUNDLED: &str = include_str!("../config/precall.toml");

    fn bundled() -> Config {
        Config::from_toml_str(BUNDLED).unwrap()
    }

    #[test]
    fn check_describes_every_agent() {
        let text = describe(Path::new("config/precall.toml"), &bundled());
        for want in [
            "config/precall.toml: OK",
            "listen udp:127.0.0.1:5060, tcp:127.0.0.1:5060",
            "trusted peers 127.0.0.0/8",
            "default agent support-agent",
            "http   listen 127.0.0.1:8080",
            "store  memory; ttl 300 s",
            "agent support-agent",
            "  numbers         +15550100",
            "  upstream        sip:127.0.0.1:5070;transport=udp (udp 127.0.0.1:5070)",
            "  upstream wait   2000 ms for a provisional, then the next upstream",
            "  health check    off",
            "  lookup          off",
            "  fallback wait   2000 ms",
            "  region          US",
            "  caller sources  pai, from",
            "  inject          headers, prefix X-Precall-, max 1024 bytes",
            "  defaults        {\"customer_name\":\"there\"}",
            "  routes          (none)",
            "at most 256 outgoing calls at once",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        // The keys themselves are secrets: only counted.
        assert!(!text.contains("dev-key-change-me"));
    }

    #[test]
    fn check_describes_routes_lookup_and_delivery() {
        let text = format!(
            "{BUNDLED}\n{}",
            r#"routes = [
  { name = "fraud", when = "risk_score >= 80", upstream = ["sip:127.0.0.1:5090", "sip:127.0.0.1:5091;transport=tcp"], set = { flow = "verification" } },
  { when = "int(budget) >= 5000", agent = "sales" },
  { when = "status == 'fallback'" },
]
[[agents]]
id = "sales"
api_keys = ["k2"]
upstream = "sip:127.0.0.1:5080"
upstream_timeout_ms = 500
health_check_secs = 15
lookup_url = "http://127.0.0.1:9000/lookup"
inject = { mode = "both", url = "http://127.0.0.1:9000/context", timeout_ms = 250 }
"#
        );
        // `routes = [...]` after the bundled agent's last key: that agent's rules.
        let config = Config::from_toml_str(&text).unwrap();
        let text = describe(Path::new("x.toml"), &config);
        for want in [
            "  route 0 (fraud) when risk_score >= 80 → upstream sip:127.0.0.1:5090, then sip:127.0.0.1:5091;transport=tcp; set {\"flow\":\"verification\"}\n",
            "  route 1         when int(budget) >= 5000 → hand over to agent sales\n",
            "  route 2         when status == 'fallback' → stay\n",
            "agent sales\n",
            "  upstream wait   500 ms for a provisional",
            "  health check    OPTIONS every 15 s",
            "  lookup          POST http://127.0.0.1:9000/lookup on a miss (timeout 1000 ms)",
            "  inject          both, prefix X-Precall-, max 1024 bytes, POST http://127.0.0.1:9000/context before forwarding (timeout 250 ms)",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }

    #[test]
    fn check_names_the_agent_and_rule_of_a_broken_expression() {
        let dir = std::env::temp_dir().join(format!("precall-cli-routes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            format!("{BUNDLED}\n[[agents.routes]]\nname = \"fraud\"\nwhen = \"risk_score >=\"\n"),
        )
        .unwrap();
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.ends_with("1 problem found"), "{err}");
        let problems = Config::load(&bad).unwrap_err().problems;
        assert!(
            problems[0].starts_with(
                "agents[0] (\"support-agent\").routes[0] (\"fraud\").when: column 14: "
            ),
            "{problems:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn send_shows_the_route_and_failed_rules() {
        assert_eq!(route_lines(&json!({"route": null, "routeErrors": []})), "");
        let answer = json!({
            "route": {"index": 1, "name": null, "label": "1",
                "upstream": ["sip:127.0.0.1:5080", "sip:127.0.0.1:5081"], "agent": "sales", "set": {}},
            "routeErrors": [{"index": 0, "error": "no field \"risk_score\" in the context"}],
        });
        assert_eq!(
            route_lines(&answer),
            "(route 1: handed over to sales, sip:127.0.0.1:5080, then sip:127.0.0.1:5081)\n\
             (route 0 failed, so did not match: no field \"risk_score\" in the context)\n"
        );
        let answer = json!({"route": {"label": "fraud", "upstream": ["sip:h"], "agent": null}});
        assert_eq!(route_lines(&answer), "(route fraud: sip:h)\n");
    }

    #[test]
    fn check_fails_on_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("precall-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[store]\nttl_secs = 0\n").unwrap();
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.ends_with("2 problems found"), "{err}");
        let good = dir.join("good.toml");
        std::fs::write(&good, BUNDLED).unwrap();
        assert!(check(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn curl_command_is_ready_to_paste() {
        let cfg = bundled();
        let cmd = curl_command(&cfg, &cfg.agents[0], EXAMPLE_PHONE).unwrap();
        assert_eq!(
            cmd,
            "curl -sS -X POST http://127.0.0.1:8080/v1/precall \
             -H 'Authorization: Bearer dev-key-change-me' \
             -H 'Content-Type: application/json' \
             -d '{\"agentId\":\"support-agent\",\"phoneNumber\":\"+14155550123\",\"customer_name\":\"Ada\"}'"
        );
    }

    #[test]
    fn curl_quotes_awkward_values_and_maps_any_address_to_loopback() {
        let text = BUNDLED
            .replace("listen = \"127.0.0.1:8080\"", "listen = \"0.0.0.0:9000\"")
            .replace("dev-key-change-me", "it's-a-key");
        let cfg = Config::from_toml_str(&text).unwrap();
        let cmd = curl_command(&cfg, &cfg.agents[0], "+1 (415) 555-0123' ; rm -rf ~").unwrap();
        assert!(cmd.starts_with("curl -sS -X POST http://127.0.0.1:9000/v1/precall "));
        assert!(
            cmd.contains(r"-H 'Authorization: Bearer it'\''s-a-key'"),
            "{cmd}"
        );
        assert!(
            cmd.contains(r#""phoneNumber":"+1 (415) 555-0123'\'' ; rm -rf ~""#),
            "{cmd}"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("http://h:1/p"), "http://h:1/p");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("`x`"), "'`x`'");
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("127.0.0.1:8080".parse().unwrap()),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("0.0.0.0:8080".parse().unwrap()),
            "http://127.0.0.1:8080"
        );
        assert_eq!(base_url("[::]:8080".parse().unwrap()), "http://[::1]:8080");
        assert_eq!(base_url("[::1]:8080".parse().unwrap()), "http://[::1]:8080");
        assert_eq!(
            base_url("10.0.0.1:80".parse().unwrap()),
            "http://10.0.0.1:80"
        );
    }

    #[test]
    fn fields_are_json_when_they_read_as_json() {
        let fields: Vec<String> = [
            "customer_name=Ada",
            "score=80",
            "ratio=0.5",
            "vip=true",
            "tags=[\"a\",1]",
            "meta={\"k\":\"v\"}",
            "nothing=null",
            "quoted=\"x\"",
            "eq=a=b",
            "empty=",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let body = payload("support-agent", "+14155550123", &fields).unwrap();
        assert_eq!(
            body.to_string(),
            r#"{"agentId":"support-agent","phoneNumber":"+14155550123","customer_name":"Ada","score":80,"ratio":0.5,"vip":true,"tags":["a",1],"meta":{"k":"v"},"nothing":"null","quoted":"\"x\"","eq":"a=b","empty":""}"#
        );
        assert!(payload("a", "1", &["novalue".into()]).is_err());
        assert!(payload("a", "1", &["=x".into()]).is_err());
        assert!(payload("a", "1", &["agentId=b".into()]).is_err());
    }

    #[test]
    fn unknown_agent_lists_the_known_ones() {
        let err = find_agent(&bundled(), Path::new("p.toml"), "nobody").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no agent \"nobody\" in p.toml (agents: support-agent)"
        );
    }

    /// A stand-in for the webhook: checks the key, answers like DESIGN.md's API.
    async fn fake_webhook(test_status: StatusCode) -> String {
        async fn precall(headers: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer good") {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "wrong API key"})),
                );
            }
            let fields = body.as_object().map_or(0, |o| o.len() - 2);
            (
                StatusCode::ACCEPTED,
                Json(json!({"status": "accepted", "agentId": body["agentId"],
                    "phoneNumber": "+14155550123", "fields": fields, "released": 0,
                    "stored": true, "ttlSecs": 300})),
            )
        }
        let test = move |Json(body): Json<Value>| async move {
            if test_status != StatusCode::OK {
                return (test_status, Json(json!({"error": "boom"})));
            }
            (
                StatusCode::OK,
                Json(
                    json!({"agentId": body["agentId"], "phoneNumber": "+14155550123",
                    "status": "hit", "route": null, "headers": [
                        {"name": "X-Precall-customer_name", "value": body["customer_name"]},
                        {"name": "X-Precall-Status", "value": "hit"},
                        {"name": "X-Precall-Wait-Ms", "value": "0"}]}),
                ),
            )
        };
        let app = Router::new()
            .route("/v1/precall", post(precall))
            .route("/v1/precall/test", post(test));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn ada() -> Value {
        payload(
            "support-agent",
            "+1 415 555 0123",
            &["customer_name=Ada".into()],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn send_prints_the_answer_and_the_headers() {
        let base = fake_webhook(StatusCode::OK).await;
        let client = reqwest::Client::new();
        let mut out = String::new();
        exchange(&client, &base, ("good", None), &ada(), &mut out)
            .await
            .unwrap();
        assert!(
            out.starts_with(&format!("POST {base}/v1/precall → 202 Accepted\n{{\n")),
            "{out}"
        );
        assert!(out.contains("\"status\": \"accepted\""), "{out}");
        assert!(
            out.ends_with(
                "A call now gets these headers (status hit):\n\
                 X-Precall-customer_name: Ada\n\
                 X-Precall-Status: hit\n\
                 X-Precall-Wait-Ms: 0\n"
            ),
            "{out}"
        );
    }

    #[tokio::test]
    async fn send_fails_on_non_2xx_and_shows_the_error() {
        let base = fake_webhook(StatusCode::OK).await;
        let client = reqwest::Client::new();
        let mut out = String::new();
        let err = exchange(&client, &base, ("bad", None), &ada(), &mut out)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{base}/v1/precall answered 401 Unauthorized: wrong API key")
        );
        assert!(out.contains("\"error\": \"wrong API key\""), "{out}");
        assert!(!out.contains("/test"), "{out}");

        let base = fake_webhook(StatusCode::UNPROCESSABLE_ENTITY).await;
        let mut out = String::new();
        let err = exchange(&client, &base, ("good", None), &ada(), &mut out)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("answered 422 Unprocessable Entity: boom"),
            "{err}"
        );
        assert!(
            out.contains("202 Accepted") && out.contains("/v1/precall/test → 422"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn send_signs_the_exact_body_for_an_agent_with_a_secret() {
        use crate::webhook::signature;
        // A webhook that answers 202 only to a valid signature of the raw body.
        let check = |headers: HeaderMap, body: axum::body::Bytes| async move {
            let sig = headers
                .get(signature::HEADER)
                .map(|v| v.as_bytes().to_vec());
            match signature::verify(
                b"a-secret-of-16-bytes",
                sig.as_deref(),
                &body,
                signature::unix_now(),
            ) {
                Ok(()) => (StatusCode::ACCEPTED, Json(json!({"status": "accepted"}))),
                Err(e) => (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": e.to_string()})),
                ),
            }
        };
        let app = Router::new().route("/v1/precall", post(check));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/precall");
        let signed = super::post(
            &client,
            &url,
            ("k", Some(b"a-secret-of-16-bytes".as_slice())),
            &ada(),
        )
        .await
        .unwrap();
        assert_eq!(signed.status, StatusCode::ACCEPTED, "{}", signed.text);
        let unsigned = super::post(&client, &url, ("k", None), &ada())
            .await
            .unwrap();
        assert_eq!(unsigned.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn curl_for_a_signing_agent_computes_the_signature_when_run() {
        let mut config = bundled();
        config.agents[0].webhook_secret =
            Some(crate::config::Secret("s3cret-s3cret-s3cret".into()));
        let cmd = curl_command(&config, &config.agents[0], "+14155550123").unwrap();
        assert!(cmd.starts_with("body='{\"agentId\""), "{cmd}");
        assert!(
            cmd.contains("openssl dgst -sha256 -hmac s3cret-s3cret-s3cret"),
            "{cmd}"
        );
        assert!(
            cmd.contains("-H \"X-Precall-Signature: t=$t,v1=$sig\" -d \"$body\""),
            "{cmd}"
        );
    }

    #[tokio::test]
    async fn send_says_when_nothing_listens() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let mut out = String::new();
        let err = exchange(
            &reqwest::Client::new(),
            &base,
            ("k", None),
            &ada(),
            &mut out,
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("is `precall run` running?"),
            "{err}"
        );
    }
}
