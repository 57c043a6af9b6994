//! Helpers of the `mars-state` binary's tests (`tests/cli.rs`, `tests/cli_servers.rs`): the
//! demo store they all read (built with the library, as an application would), running the
//! built binary, and making its output comparable across runs (checkpoint ids and times
//! replaced by stable names).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use mars_state::{CheckpointPolicy, StateManager};
use serde_json::json;

/// The built binary, with no store, key or passphrase from the caller's environment.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mars-state"));
    for var in [
        "MARS_STATE_URL",
        "MARS_STATE_KEY",
        "MARS_STATE_PASSPHRASE",
        "MARS_STATE_KEY_FILE",
        "MARS_STATE_PASSPHRASE_FILE",
        "MARS_STATE_NEW_KEY",
        "MARS_STATE_NEW_PASSPHRASE",
        "MARS_STATE_NEW_KEY_FILE",
        "MARS_STATE_NEW_PASSPHRASE_FILE",
    ] {
        c.env_remove(var);
    }
    c.env("RUST_LOG", "off");
    c
}

/// Runs `mars-state args...` and returns its output.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("cannot run the mars-state binary")
}

/// Runs `mars-state args...`, which must exit with `code`; returns stdout.
pub fn expect(args: &[&str], code: i32) -> String {
    expect_with(bin().args(args), code)
}

/// Runs `cmd`, which must exit with `code`; returns stdout.
pub fn expect_with(cmd: &mut Command, code: i32) -> String {
    let out = cmd.output().expect("cannot run the mars-state binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?} exited with {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// stderr of `mars-state args...`, which must exit with `code`.
pub fn stderr_of(args: &[&str], code: i32) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    stderr
}

/// The demo store every test reads: four sessions in each status, one with a checkpoint
/// timeline that has a fork (a rollback and a new line of work) and a second branch.
/// Returns the ids of `research-1`'s checkpoints in creation order.
pub async fn build_demo(m: &StateManager) -> Vec<String> {
    let s = "research-1";
    m.set_checkpoint_policy(s, CheckpointPolicy::every_steps(2)).await.unwrap();
    let mut notes = Vec::new();
    for step in 1..=4u64 {
        notes.push(format!("read source {step}"));
        let state =
            json!({"step": step, "plan": "survey", "notes": notes, "budget": 100 - step * 10});
        m.record_step(s, step, &state).await.unwrap();
    }
    let risky = json!({"step": 4, "plan": "delete drafts", "notes": notes, "budget": 60});
    m.checkpoint_before_risky(s, "main", &risky).await.unwrap();
    let at4 = m.list_checkpoints(s).await.unwrap()[1].id.clone();
    // The risky step went wrong: back to step 4, and a new line of work from there.
    m.rollback_to_checkpoint(&at4).await.unwrap();
    for step in 5..=6u64 {
        notes.push(format!("draft section {step}"));
        let state =
            json!({"step": step, "plan": "write", "notes": notes, "budget": 100 - step * 10});
        m.record_step(s, step, &state).await.unwrap();
    }
    m.create_checkpoint(s, "experiment", &json!({"step": 6, "plan": "try a table", "notes": []}))
        .await
        .unwrap();

    m.save_session("triage-7", &json!({"ticket": 7, "step": 2})).await.unwrap();
    m.pause_session("triage-7", &json!({"ticket": 7, "step": 3}), "waiting for approval")
        .await
        .unwrap();
    m.record_step("report-3", 9, &json!({"pages": 9})).await.unwrap();
    m.complete_session("report-3", &json!({"pages": 12, "done": true})).await.unwrap();
    m.save_session("scrape-2", &json!({"urls": 40})).await.unwrap();
    m.fail_session("scrape-2", "site unreachable").await.unwrap();

    m.list_checkpoints(s).await.unwrap().iter().map(|c| c.id.to_string()).collect()
}

/// Builds the demo store in the file store at `dir` (created), gzipped with `gzip`, with
/// `passphrase` if given; the manager is shut down after.
pub async fn demo_file_store(dir: &Path, gzip: bool, passphrase: Option<&str>) -> Vec<String> {
    let mut b = StateManager::builder(mars_state::FileStorageBackend::new(dir).unwrap());
    if gzip {
        b = b.compression(6);
    }
    if let Some(p) = passphrase {
        b = b.encryption_passphrase(p);
    }
    let m = b.start().await.unwrap();
    let ids = build_demo(&m).await;
    m.shutdown().await.unwrap();
    ids
}

/// `text` with checkpoint ids replaced by `<c1>`, `<c2>`... in order of first appearance,
/// and times (`YYYY-MM-DD HH:MM[:SS]`) by `<time>`, so runs compare equal.
pub fn normalise(text: &str) -> String {
    let mut names: HashMap<String, String> = HashMap::new();
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if let Some(len) = id_at(&chars[i..]) {
            let id: String = chars[i..i + len].iter().collect();
            let n = names.len() + 1;
            let name = names.entry(id).or_insert_with(|| format!("<c{n}>")).clone();
            out.push_str(&name);
            i += len;
        } else if let Some(len) = time_at(&chars[i..]) {
            out.push_str("<time>");
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn hex(c: char) -> bool {
    c.is_ascii_digit() || ('a'..='f').contains(&c)
}

/// A checkpoint id (16 hex, `-`, 8 hex) at the start of `s`: its length.
fn id_at(s: &[char]) -> Option<usize> {
    (s.len() >= 25
        && s[..16].iter().all(|c| hex(*c))
        && s[16] == '-'
        && s[17..25].iter().all(|c| hex(*c)))
    .then_some(25)
}

/// A time `YYYY-MM-DD HH:MM` or `YYYY-MM-DD HH:MM:SS` at the start of `s`: its length.
fn time_at(s: &[char]) -> Option<usize> {
    let pat = "dddd-dd-dd dd:dd";
    let fits = |p: &str, s: &[char]| {
        s.len() >= p.len()
            && p.chars().zip(s).all(|(p, c)| if p == 'd' { c.is_ascii_digit() } else { p == *c })
    };
    if !fits(pat, s) {
        return None;
    }
    if fits(":dd", &s[pat.len()..]) { Some(pat.len() + 3) } else { Some(pat.len()) }
}

/// Starts `mars-state watch ARGS...` (with the variables `env`) and waits until it says on
/// stderr that it is watching; returns the child and its stdout lines as they are printed.
pub fn spawn_watch(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = bin()
        .envs(env.iter().copied())
        .arg("watch")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the mars-state binary");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with("watching"), "{first}");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Ends a `watch` with SIGINT, as Ctrl-C would; it must exit 0.
pub fn interrupt_watch(mut child: std::process::Child) {
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(sent.unwrap().success());
    assert_eq!(child.wait().unwrap().code(), Some(0), "watch did not end cleanly on SIGINT");
}
