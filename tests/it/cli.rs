//! The binary's command line around `run`: a bad config fails before anything is bound,
//! naming the key.

use std::time::Duration;

use crate::harness::{run_to_exit, Agent, Config, TempDir};

#[test]
fn bad_config_exits_nonzero_naming_the_key() {
    let dir = TempDir::new("bad-config");
    let mut toml = Config::new(vec![Agent::new(
        "a",
        "+14155550100",
        "sip:127.0.0.1:5070;transport=udp",
    )])
    .to_toml();
    toml = toml.replace("fallback_wait_ms = 10000", "fallback_wait_ms = \"soon\"");
    let path = dir.join("bad.toml");
    std::fs::write(&path, &toml).unwrap();
    let p = path.to_str().unwrap();
    for args in [vec!["run", "-c", p], vec!["check", "-c", p]] {
        let (status, out) = run_to_exit(&args, Duration::from_secs(20));
        assert!(!status.success(), "{args:?} accepted a bad config:\n{out}");
        assert_eq!(
            status.code(),
            Some(1),
            "{args:?}: exit 1 on a bad config:\n{out}"
        );
        assert!(
            out.contains("fallback_wait_ms"),
            "{args:?}: the error names the key:\n{out}"
        );
        assert!(
            !out.contains("listening for"),
            "{args:?}: nothing bound:\n{out}"
        );
    }

    let bad_upstream = Config::new(vec![Agent::new("a", "+14155550100", "http://nope")]).to_toml();
    std::fs::write(&path, bad_upstream).unwrap();
    let (status, out) = run_to_exit(&["run", "-c", p], Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("upstream"), "the error names the key:\n{out}");

    let (status, out) = run_to_exit(
        &["run", "-c", dir.join("missing.toml").to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(
        !status.success(),
        "a missing config file is an error:\n{out}"
    );
}

#[test]
fn check_accepts_a_good_config() {
    let dir = TempDir::new("good-config");
    let path = dir.join("good.toml");
    std::fs::write(
        &path,
        Config::new(vec![Agent::new(
            "a",
            "+14155550100",
            "sip:127.0.0.1:5070;transport=udp",
        )])
        .to_toml(),
    )
    .unwrap();
    let (status, out) = run_to_exit(
        &["check", "-c", path.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(status.success(), "{out}");
    assert!(
        out.contains("a"),
        "check prints the resolved agents:\n{out}"
    );
    assert!(
        out.contains("+14155550100"),
        "check prints the agent's numbers:\n{out}"
    );
}

#[test]
fn every_bundled_config_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/config/precall.toml")];
    for entry in std::fs::read_dir(format!("{root}/config/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path.to_string_lossy().into_owned());
        }
    }
    assert!(files.len() >= 2, "the examples are there: {files:?}");
    for file in &files {
        let (status, out) = run_to_exit(&["check", "-c", file], Duration::from_secs(20));
        assert!(status.success(), "{file} does not pass check:\n{out}");
        assert!(out.contains("agent "), "{file}: prints the agents:\n{out}");
    }
}
