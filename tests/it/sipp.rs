//! SIPp as a child process: the scenarios of `sipp-scenarios/` copied into a temp dir (SIPp
//! writes its default trace files next to the scenario), run with `-m`, a global
//! `-timeout`, and `-trace_msg`/`-trace_logs`/`-trace_err` into that dir, so a failure can
//! show what SIPp saw.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use crate::harness::TempDir;

/// `sipp-scenarios/` in the repository.
pub fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp-scenarios")
}

/// Fails the test with a useful message when `sipp` is not installed.
pub fn require_sipp() {
    match Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(_) => {}
        Err(e) => panic!(
            "sipp is not installed ({e}); run scripts/test.sh, which installs the Debian package sip-tester"
        ),
    }
}

/// What one SIPp run left behind.
#[derive(Debug)]
pub struct SippOutcome {
    /// `None` when it had to be killed.
    pub status: Option<ExitStatus>,
    /// `<log>` actions (`-trace_logs`).
    pub logs: String,
    /// Every message sent and received (`-trace_msg`).
    pub messages: String,
    /// Unexpected messages and errors (`-trace_err`).
    pub errors: String,
    /// The final statistics screen (stdout).
    pub screen: String,
}

impl SippOutcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Everything, for a failure message.
    pub fn report(&self, name: &str) -> String {
        format!(
            "== sipp {name}: exit {:?}\n== errors:\n{}\n== logs:\n{}\n== messages (last 6000 bytes):\n{}\n== screen (last 3000 bytes):\n{}",
            self.status,
            self.errors,
            self.logs,
            tail(&self.messages, 6000),
            tail(&self.screen, 3000)
        )
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A running SIPp.
pub struct Sipp {
    pub name: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl Sipp {
    /// Starts `sipp -sf SCENARIO ARGS...` in `dir` (the scenario and `callers.csv` are
    /// copied there first), local IP 127.0.0.1, stdin off, traces on.
    pub fn spawn(name: &str, scenario: &str, dir: &TempDir, args: &[String]) -> Sipp {
        require_sipp();
        for f in [scenario, "callers.csv"] {
            std::fs::copy(scenario_dir().join(f), dir.join(f))
                .unwrap_or_else(|e| panic!("copy {f}: {e}"));
        }
        let file = |suffix: &str| dir.join(&format!("{name}_{suffix}")).display().to_string();
        let mut cmd = Command::new("sipp");
        cmd.current_dir(dir.path())
            .arg("-sf")
            .arg(scenario)
            .args(["-i", "127.0.0.1", "-nostdin"])
            .args(["-trace_msg", "-message_file", &file("messages.log")])
            .args(["-trace_logs", "-log_file", &file("logs.log")])
            .args(["-trace_err", "-error_file", &file("errors.log")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(file("screen.log")).unwrap())
            .stderr(std::fs::File::create(file("stderr.log")).unwrap());
        let child = cmd.spawn().expect("spawn sipp");
        Sipp {
            name: name.to_string(),
            child: Some(child),
            dir: dir.path().to_path_buf(),
        }
    }

    /// Waits for SIPp to exit (it has its own `-timeout`); kills it after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> SippOutcome {
        let mut child = self.child.take().unwrap();
        let pid = child.id();
        let (tx, rx) = channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait().ok());
            child
        });
        let status = match rx.recv_timeout(timeout) {
            Ok(s) => s,
            Err(_) => {
                // Our own child, by its id.
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                let _ = rx.recv_timeout(Duration::from_secs(5));
                None
            }
        };
        let _ = waiter.join();
        self.outcome(status)
    }

    fn outcome(&self, status: Option<ExitStatus>) -> SippOutcome {
        let read = |suffix: &str| {
            std::fs::read_to_string(self.dir.join(format!("{}_{suffix}", self.name)))
                .unwrap_or_default()
        };
        SippOutcome {
            status,
            logs: read("logs.log"),
            messages: read("messages.log"),
            errors: read("errors.log"),
            screen: format!("{}{}", read("screen.log"), read("stderr.log")),
        }
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `uas.xml` as the agent on a free port and waits until SIPp holds the port.
///
/// SIPp prints nothing when it is ready, and a SIP probe would count as a call against
/// `-m` (SIPp's `-aa` auto-answer creates one), so readiness is "the port is taken": a UDP
/// bind that fails, or a TCP connect that succeeds. Polled, because there is no event to
/// wait on; the child's early exit (a bind error) ends the wait at once.
pub fn start_uas(
    name: &str,
    dir: &TempDir,
    transport: crate::uas::Transport,
    calls: u32,
) -> (Sipp, u16) {
    let port = match transport {
        crate::uas::Transport::Udp => crate::harness::free_udp_port(),
        crate::uas::Transport::Tcp => crate::harness::free_port_udp_tcp(),
    };
    let t = match transport {
        crate::uas::Transport::Udp => "u1",
        crate::uas::Transport::Tcp => "t1",
    };
    let args: Vec<String> = [
        "-p",
        &port.to_string(),
        "-t",
        t,
        "-m",
        &calls.to_string(),
        "-timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sipp = Sipp::spawn(name, "uas.xml", dir, &args);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let bound = match transport {
            crate::uas::Transport::Udp => std::net::UdpSocket::bind(("127.0.0.1", port)).is_err(),
            crate::uas::Transport::Tcp => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        if bound {
            return (sipp, port);
        }
        if let Some(status) = sipp
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let out = sipp.outcome(Some(status));
            panic!("SIPp UAS exited at startup:\n{}", out.report(name));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIPp UAS did not bind port {port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
