//! The short soak (issue 7): `scripts/soak.py` for 45 s against this build's binary, with
//! T1 = 100 ms and a 10 s context TTL so the baseline comes back within seconds of the
//! load stopping. The 10-minute version is `scripts/soak.sh` (release binary). The script
//! asserts the baseline itself (held calls, transactions, waiting calls, contexts, TCP
//! connections at 0; descriptors and RSS back to their level); this test only runs it.

use std::process::Command;

#[test]
fn short_soak_returns_to_baseline() {
    crate::sipp::require_sipp();
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not installed: skipping the soak");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--bin", crate::harness::precall_bin()])
        .args([
            "--seconds",
            "45",
            "--t1-ms",
            "100",
            "--ttl-secs",
            "10",
            "--sample-secs",
            "2",
        ])
        .output()
        .expect("run scripts/soak.py");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the soak failed:\n{text}");
    assert!(text.contains("soak: OK"), "{text}");
}
