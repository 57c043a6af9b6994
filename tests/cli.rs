//! The `mars-state` binary run against real stores: file (plain, gzipped, encrypted) and,
//! with the `sqlite` feature, SQLite; golden output for `ls`, `log` and `diff`
//! (tests/cli_golden/, compared after ids and times are replaced by stable names), the
//! README's terminal session replayed, and the error cases (missing store, wrong key,
//! unknown session, a key on the command line, a store in use), each with its exit code.
//! `MARS_STATE_BLESS=1 cargo test --test cli` rewrites the golden files from the output.

mod cli_common;

use std::path::{Path, PathBuf};

use cli_common::*;
use mars_state::StateManager;
use serde_json::Value;

const PASSPHRASE: &str = "correct horse battery staple";

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli_golden").join(name)
}

/// `output` (normalised) must equal the golden file `name`.
fn check_golden(name: &str, output: &str) {
    let got = normalise(output);
    let path = golden(name);
    if std::env::var_os("MARS_STATE_BLESS").is_some() {
        put(&path, &got);
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {}: {e} (MARS_STATE_BLESS=1 writes it)", path.display())
    });
    assert_eq!(got, want, "output differs from {}", path.display());
}

/// Writes a test's input file (std::fs::write is kept out of the crate by clippy.toml).
fn put(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    std::fs::File::create(path).unwrap().write_all(bytes.as_ref()).unwrap();
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A demo file store in a new temporary directory: (guard, store path as a string, ids).
async fn demo(gzip: bool, passphrase: Option<&str>) -> (tempfile::TempDir, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state");
    let ids = demo_file_store(&store, gzip, passphrase).await;
    (dir, store.to_str().unwrap().to_owned(), ids)
}

/// Every line of human output fits an 80-column terminal.
fn assert_fits(text: &str) {
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "line over 80 columns: {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_log_and_diff_match_their_golden_output() {
    let (_dir, s, ids) = demo(false, None).await;
    let ls = expect(&["ls", &s], 0);
    check_golden("ls.txt", &ls);
    let log = expect(&["log", &s, "research-1"], 0);
    check_golden("log.txt", &log);
    let diff = expect(&["diff", &s, "research-1", &ids[0], "current"], 0);
    check_golden("diff.txt", &diff);
    for text in [&ls, &log, &diff] {
        assert_fits(text);
    }
    // The same diff with parts of ids and with steps.
    let suffix = &ids[0][17..];
    assert_eq!(expect(&["diff", &s, "research-1", suffix, "current"], 0), diff);
    let by_step = expect(&["diff", &s, "research-1", "step:2", "current"], 0);
    assert_eq!(by_step, diff);
    // No changes between a state and itself.
    let same = expect(&["diff", &s, "research-1", &ids[1], &ids[1]], 0);
    assert!(same.contains("(no changes)"), "{same}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_and_encrypted_stores_read_the_same() {
    let (_plain_dir, plain, _) = demo(false, None).await;
    let (_gz_dir, gz, gz_ids) = demo(true, None).await;
    let (_enc_dir, enc, enc_ids) = demo(true, Some(PASSPHRASE)).await;
    // The golden timeline and diff, whatever the record format.
    check_golden("log.txt", &expect(&["log", &gz, "research-1"], 0));
    check_golden("diff.txt", &expect(&["diff", &gz, "research-1", &gz_ids[0], "current"], 0));
    let with_key = |args: &[&str], code| {
        expect_with(bin().args(args).env("MARS_STATE_PASSPHRASE", PASSPHRASE), code)
    };
    check_golden("log.txt", &with_key(&["log", &enc, "research-1"], 0));
    check_golden("diff.txt", &with_key(&["diff", &enc, "research-1", &enc_ids[0], "current"], 0));
    // Listings agree but for sizes and times.
    let strip = |text: String| {
        let mut v = json(&text);
        for s in v.as_array_mut().unwrap() {
            let o = s.as_object_mut().unwrap();
            o.remove("size_bytes");
            o.remove("updated_at");
            o.remove("status_at");
        }
        v
    };
    let want = strip(expect(&["ls", &plain, "--json"], 0));
    assert_eq!(strip(expect(&["ls", &gz, "--json"], 0)), want);
    assert_eq!(strip(with_key(&["ls", &enc, "--json"], 0)), want);
    // States too.
    let shown = expect(&["show", &plain, "research-1"], 0);
    assert_eq!(expect(&["show", &gz, "research-1"], 0), shown);
    assert_eq!(with_key(&["show", &enc, "research-1"], 0), shown);
    // The passphrase from a file works as well as from the variable.
    let pass_file = _enc_dir.path().join("pass");
    put(&pass_file, format!("{PASSPHRASE}\n"));
    let pf = pass_file.to_str().unwrap();
    assert_eq!(expect(&["show", &enc, "research-1", "--passphrase-file", pf], 0), shown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_prints_states_checkpoints_and_raw_bytes() {
    let (_dir, s, ids) = demo(false, None).await;
    let now = json(&expect(&["show", &s, "research-1"], 0));
    assert_eq!(now["step"], 6);
    assert_eq!(now["plan"], "write");
    let at4 = json(&expect(&["show", &s, "research-1", "--step", "4"], 0));
    assert_eq!(at4["plan"], "delete drafts", "the newest checkpoint at step 4 is the risky one");
    let first = json(&expect(&["show", &s, "research-1", "--at", &ids[0]], 0));
    assert_eq!(first["step"], 2);
    let raw = expect(&["show", &s, "triage-7", "--raw"], 0);
    assert_eq!(json(&raw), serde_json::json!({"ticket": 7, "step": 3}));
    assert!(!raw.ends_with('\n'));
    let doc = json(&expect(&["show", &s, "research-1", "--at", &ids[0], "--json"], 0));
    assert_eq!(doc["checkpoint"], ids[0].as_str());
    assert_eq!(doc["step"], 2);
    assert_eq!(doc["state"]["step"], 2);
    // A step without a checkpoint: not found, naming the nearest steps that have one.
    let err = stderr_of(&["show", &s, "research-1", "--step", "3"], 1);
    assert!(err.contains("no checkpoint at step 3") && err.contains("2, 4"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_the_library_s_data() {
    let (_dir, s, ids) = demo(false, None).await;
    let ls = json(&expect(&["ls", &s, "--json"], 0));
    let names: Vec<&str> =
        ls.as_array().unwrap().iter().map(|v| v["session_id"].as_str().unwrap()).collect();
    assert_eq!(names, ["report-3", "research-1", "scrape-2", "triage-7"]);
    assert_eq!(ls[1]["step"], 6);
    assert_eq!(ls[1]["checkpoint_count"], ids.len());
    let paused = json(&expect(&["ls", &s, "--status", "paused", "--json"], 0));
    assert_eq!(paused.as_array().unwrap().len(), 1);
    assert_eq!(paused[0]["status_reason"], "waiting for approval");
    let log = json(&expect(&["log", &s, "research-1", "--json"], 0));
    let listed: Vec<&str> =
        log.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let diff = json(&expect(&["diff", &s, "research-1", &ids[0], "current", "--json"], 0));
    assert!(diff["changes"].as_array().unwrap().contains(&serde_json::json!(
        {"op": "changed", "path": "/step", "from": 2, "to": 6}
    )));
    let stats = json(&expect(&["stats", &s, "--json"], 0));
    assert_eq!(stats["session_count"], 4);
    assert_eq!(stats["checkpoint_count"], ids.len() + 1);
    assert_eq!(stats["sessions_by_status"]["paused"], 1);
    let vacuum = json(&expect(&["vacuum", &s, "--json"], 0));
    assert_eq!(vacuum["corrupt_records"], serde_json::json!([]));
    let janitor = json(&expect(&["janitor", &s, "--json"], 0));
    assert_eq!(janitor["sessions_removed"], 0);
    assert_fits(&expect(&["stats", &s], 0));
    assert_fits(&expect(&["vacuum", &s], 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_store_and_exit_with_their_code() {
    let (dir, s, _) = demo(false, None).await;
    // Missing store: nothing is created.
    let missing = dir.path().join("nothing-here");
    let m = missing.to_str().unwrap();
    let err = stderr_of(&["ls", m], 3);
    assert!(err.contains("no mars-state store at") && err.contains("nothing-here"), "{err}");
    assert!(!missing.exists(), "a read created the store");
    // An empty directory is no store either, and stays empty.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    stderr_of(&["ls", empty.to_str().unwrap()], 3);
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    // Unknown session and checkpoint.
    let err = stderr_of(&["show", &s, "no-such-run"], 1);
    assert!(err.contains("no session no-such-run") && err.contains(&s), "{err}");
    stderr_of(&["log", &s, "no-such-run"], 1);
    let err = stderr_of(&["show", &s, "research-1", "--at", "ffffffff"], 1);
    assert!(err.contains("no checkpoint \"ffffffff\""), "{err}");
    // Usage errors.
    stderr_of(&["show", &s, "bad/../id"], 2);
    stderr_of(&["ls", &s, "--status", "sleeping"], 2);
    stderr_of(&["frobnicate"], 2);
    // A key on the command line is refused before anything is opened.
    let err = stderr_of(&["ls", &s, "--key", "00112233"], 2);
    assert!(err.contains("refused") && err.contains("--key-file"), "{err}");
    stderr_of(&["ls", &s, "--passphrase", "hunter2"], 2);
    // A key for a plain store is refused (and the store left as it is).
    let err = expect_with(bin().args(["ls", &s]).env("MARS_STATE_PASSPHRASE", "x"), 3);
    assert!(err.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_store_needs_its_key() {
    let (dir, s, _) = demo(false, Some(PASSPHRASE)).await;
    let err = stderr_of(&["ls", &s], 4);
    assert!(err.contains("--key-file") && err.contains("encrypted"), "{err}");
    let out = bin().args(["ls", &s]).env("MARS_STATE_PASSPHRASE", "wrong").output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    // A key file that is neither 64 hex digits nor 32 bytes.
    let bad = dir.path().join("bad.key");
    put(&bad, "not a key");
    let err = stderr_of(&["ls", &s, "--key-file", bad.to_str().unwrap()], 4);
    assert!(err.contains("neither 64 hex digits nor exactly 32 bytes"), "{err}");
    // Two keys at once.
    let out = bin()
        .args(["ls", &s, "--key-file", bad.to_str().unwrap()])
        .env("MARS_STATE_PASSPHRASE", PASSPHRASE)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_use_is_read_beside_its_holder_and_not_written() {
    let (dir, s, _) = demo(false, None).await;
    let holder =
        StateManager::start(mars_state::FileStorageBackend::new(&s).unwrap()).await.unwrap();
    // A save the holder made after it opened the store: read commands see it.
    holder.save_session("live-9", &serde_json::json!({"step": 3})).await.unwrap();
    let ls = json(&expect(&["ls", &s, "--json"], 0));
    assert_eq!(ls.as_array().unwrap().len(), 5, "{ls}");
    assert_eq!(
        json(&expect(&["show", &s, "live-9", "--json"], 0))["state"],
        serde_json::json!({"step": 3})
    );
    expect(&["verify", &s], 0);
    let dump = dir.path().join("held.jsonl");
    expect(&["export", &s, "--out", dump.to_str().unwrap()], 0);
    assert!(std::fs::read_to_string(&dump).unwrap().contains("live-9"));
    // Commands that write name the holder and stop.
    let me = std::process::id();
    for args in
        [vec!["vacuum", &s], vec!["janitor", &s], vec!["import", &s, dump.to_str().unwrap()]]
    {
        let err = stderr_of(&args, 5);
        assert!(err.contains(&format!("in use by process {me}")), "{args:?}: {err}");
        assert!(err.contains("stop that process"), "{err}");
    }
    // The holder was left alone: it still saves, and nothing it had is gone.
    holder.save_session("live-9", &serde_json::json!({"step": 4})).await.unwrap();
    assert_eq!(holder.list_sessions().await.unwrap().len(), 5);
    holder.shutdown().await.unwrap();
    expect(&["vacuum", &s], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_planted_damage_with_exit_code_1() {
    let (_dir, s, _) = demo(false, None).await;
    let clean = json(&expect(&["verify", &s, "--json"], 0));
    assert_eq!(clean["damaged"].as_array().map(Vec::len), Some(0), "{clean}");
    // One byte of one checkpoint record flipped, another session's record cut short.
    let ckpt_dir = Path::new(&s).join("checkpoints/research-1");
    let ckpt = std::fs::read_dir(&ckpt_dir).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    put(&ckpt, &bytes);
    let record = Path::new(&s).join("sessions/triage-7.json");
    let bytes = std::fs::read(&record).unwrap();
    put(&record, &bytes[..bytes.len() / 2]);
    let out = run(&["verify", &s]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 damaged"), "{text}");
    assert!(text.contains("triage-7"), "the cut session record is named: {text}");
    assert!(text.contains("research-1"), "the flipped checkpoint's session is named: {text}");
    assert_fits(&text);
    let report = json(&String::from_utf8_lossy(&run(&["verify", &s, "--json"]).stdout));
    assert_eq!(report["damaged"].as_array().map(Vec::len), Some(2), "{report}");
    // Verify never quarantines or repairs: the damaged files are as planted.
    assert_eq!(std::fs::read(&record).unwrap(), &bytes[..bytes.len() / 2]);
    assert!(!Path::new(&s).join("quarantine").read_dir().is_ok_and(|mut d| d.next().is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_gives_an_equal_store_on_another_key() {
    let (dir, s, _) = demo(true, None).await;
    let first = dir.path().join("first.jsonl.gz");
    expect(&["export", &s, "--out", first.to_str().unwrap()], 0);
    // Into a new encrypted store, twice (the second changes nothing).
    let copy = dir.path().join("copy");
    let copy = copy.to_str().unwrap();
    for _ in 0..2 {
        expect_with(
            bin()
                .args(["import", copy, first.to_str().unwrap()])
                .env("MARS_STATE_PASSPHRASE", PASSPHRASE),
            0,
        );
    }
    let second = dir.path().join("second.jsonl.gz");
    expect_with(
        bin()
            .args(["export", copy, "--out", second.to_str().unwrap()])
            .env("MARS_STATE_PASSPHRASE", PASSPHRASE),
        0,
    );
    assert_eq!(gunzip(&first), gunzip(&second), "the dumps of the two stores differ");
    // Without the key the copy does not open.
    stderr_of(&["ls", copy], 4);
    // A dump that is not one: exit 2, nothing written.
    let bad = dir.path().join("bad.jsonl");
    put(&bad, "{\"not\": \"a dump\"}\n");
    let fresh = dir.path().join("fresh");
    stderr_of(&["import", fresh.to_str().unwrap(), bad.to_str().unwrap()], 2);
    assert!(!fresh.join("sessions").read_dir().is_ok_and(|mut d| d.next().is_some()));
}

fn gunzip(path: &Path) -> String {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_can_come_from_mars_state_url() {
    let (_dir, s, _) = demo(false, None).await;
    let ls = expect(&["ls", &s], 0);
    assert_eq!(expect_with(bin().arg("ls").env("MARS_STATE_URL", &s), 0), ls);
    assert_eq!(expect_with(bin().args(["ls", "-"]).env("MARS_STATE_URL", &s), 0), ls);
    let shown = expect(&["show", &s, "triage-7"], 0);
    assert_eq!(expect_with(bin().args(["show", "triage-7"]).env("MARS_STATE_URL", &s), 0), shown);
    let url = format!("file://{s}");
    assert_eq!(expect(&["ls", &url], 0), ls);
    let err = stderr_of(&["ls"], 2);
    assert!(err.contains("STORE") || err.contains("MARS_STATE_URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_moves_a_store_and_rotate_key_reencrypts_it() {
    let (dir, s, _) = demo(true, None).await;
    let to = dir.path().join("copy");
    let t = to.to_str().unwrap();
    let report = json(&expect(&["copy", "--from", &s, "--to", t, "--json"], 0));
    assert!(report["copied"].as_u64().unwrap() >= 10, "{report}");
    assert_eq!(expect(&["ls", t, "--json"], 0), expect(&["ls", &s, "--json"], 0));
    // A second copy onto a finished one is refused (it holds a store), untouched.
    stderr_of(&["copy", "--from", &s, "--to", t], 3);

    // Key rotation: from one raw key file to another.
    let kdir = tempfile::tempdir().unwrap();
    let store = kdir.path().join("enc");
    let old = kdir.path().join("old.key");
    let new = kdir.path().join("new.key");
    put(&old, "11".repeat(32));
    put(&new, [7u8; 32]);
    let m = StateManager::builder(mars_state::FileStorageBackend::new(&store).unwrap())
        .encryption_key(mars_state::EncryptionKey::from_bytes([0x11; 32]))
        .start()
        .await
        .unwrap();
    build_demo(&m).await;
    m.shutdown().await.unwrap();
    let st = store.to_str().unwrap();
    let (o, n) = (old.to_str().unwrap(), new.to_str().unwrap());
    let before = expect(&["show", st, "research-1", "--key-file", o], 0);
    stderr_of(&["rotate-key", st, "--key-file", o], 2);
    let out = expect(&["rotate-key", st, "--key-file", o, "--new-key-file", n], 0);
    assert!(out.contains("re-encrypted"), "{out}");
    stderr_of(&["show", st, "research-1", "--key-file", o], 4);
    assert_eq!(expect(&["show", st, "research-1", "--key-file", n], 0), before);
    assert_eq!(
        expect_with(
            bin().args(["show", st, "research-1"]).env("MARS_STATE_KEY", "07".repeat(32)),
            0
        ),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_reports_sessions_and_draws_charts() {
    let (dir, s, ids) = demo(false, None).await;
    let svg = dir.path().join("research.svg");
    let r = json(&expect(
        &["analytics", &s, "research-1", "--svg", svg.to_str().unwrap(), "--json"],
        0,
    ));
    assert_eq!(r["checkpoints"], ids.len());
    assert_eq!(r["reasons"]["steps"], 3);
    assert_eq!(r["reasons"]["before-risky"], 1);
    let steps: Vec<u64> =
        r["steps"].as_array().unwrap().iter().map(|p| p[1].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4, 4, 6, 6]);
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.starts_with("<svg") && drawn.matches("<polyline").count() == 2, "{drawn}");
    let store = json(&expect(&["analytics", &s, "--json"], 0));
    assert_eq!(store["sessions"], 4);
    assert_eq!(store["by_status"]["failed"], 1);
    assert_eq!(store["failures"][0], serde_json::json!(["scrape-2", "site unreachable"]));
    let growth = store["growth"].as_array().unwrap();
    assert_eq!(growth.last().unwrap()[1], store["total_bytes"]);
    assert_fits(&expect(&["analytics", &s], 0));
    assert_fits(&expect(&["analytics", &s, "research-1"], 0));
    stderr_of(&["analytics", &s, "no-such-run"], 1);
}

#[test]
fn every_command_s_help_has_an_example() {
    let top = expect(&["--help"], 0);
    assert!(top.contains("Exit codes:"), "{top}");
    for cmd in [
        "ls",
        "show",
        "log",
        "diff",
        "stats",
        "vacuum",
        "janitor",
        "watch",
        "copy",
        "rotate-key",
        "analytics",
    ] {
        let help = expect(&[cmd, "--help"], 0);
        assert!(help.contains("Example"), "`{cmd} --help` has no example:\n{help}");
    }
}

/// The README's "Command-line tool" session: each `$ mars-state ...` line of its console
/// block is run in a directory holding the demo store as `./state`, and its output must be
/// the lines under it (ids and times normalised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_session_is_the_tool_s_real_output() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start =
        readme.find("<!-- cli-session -->").expect("README has no <!-- cli-session --> block");
    let block = &readme[start..];
    let block = &block[block.find("```console\n").unwrap() + 11..];
    let block = &block[..block.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    demo_file_store(&dir.path().join("state"), false, None).await;
    let mut commands: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            commands.push((cmd.to_owned(), String::new()));
        } else if let Some((_, out)) = commands.last_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(commands.len() >= 3, "the README session has too few commands");
    for (cmd, want) in commands {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        assert_eq!(words[0], "mars-state", "{cmd}");
        let out = bin().args(&words[1..]).current_dir(dir.path()).output().unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(normalise(&got), normalise(&want), "README output of `{cmd}` is not the tool's");
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stores_read_like_file_stores() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let m = StateManager::builder(mars_state::SqliteStorageBackend::open(&db).unwrap())
        .compression(6)
        .start()
        .await
        .unwrap();
    let ids = build_demo(&m).await;
    m.shutdown().await.unwrap();
    let url = format!("sqlite://{}", db.display());
    check_golden("log.txt", &expect(&["log", &url, "research-1"], 0));
    check_golden("diff.txt", &expect(&["diff", &url, "research-1", &ids[0], "current"], 0));
    let ls = json(&expect(&["ls", &url, "--json"], 0));
    assert_eq!(ls.as_array().unwrap().len(), 4);
    // Missing database: exit code 3, nothing created.
    let missing = dir.path().join("missing.db");
    stderr_of(&["ls", &format!("sqlite://{}", missing.display())], 3);
    assert!(!missing.exists());
    // To a file store and back.
    let files = dir.path().join("files");
    expect(&["copy", "--from", &url, "--to", files.to_str().unwrap()], 0);
    check_golden("log.txt", &expect(&["log", files.to_str().unwrap(), "research-1"], 0));
    // Held by a manager: named.
    let holder =
        StateManager::start(mars_state::SqliteStorageBackend::open(&db).unwrap()).await.unwrap();
    let err = stderr_of(&["vacuum", &url], 5);
    assert!(err.contains("in use by"), "{err}");
    holder.shutdown().await.unwrap();
}

/// Runs `watch URL --json --interval 100` beside `holder`, which holds the store and keeps
/// it: after each change the holder makes, the next line the tool prints must be the event
/// that change causes, and nothing else. Ends the tool with SIGINT (exit 0); the holder
/// still writes afterwards.
async fn watch_beside_holder(url: &str, holder: &StateManager, env: &[(&str, &str)]) {
    use std::time::Duration;
    let (child, rx) = spawn_watch(&[url, "--json", "--interval", "100"], env);
    let next_any = || -> Value {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("no event within 30 s");
        let v = json(&line);
        assert_eq!(v["session_id"], "live-1", "{v}");
        v
    };
    let next = |session: &str, event: &str| -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no `{event}` of {session} within 30 s: {e}"));
        let v = json(&line);
        assert_eq!((v["session_id"].as_str(), v["event"].as_str()), (Some(session), Some(event)));
        assert!(v["at"].as_u64().is_some_and(|at| at > 0), "{v}");
        v
    };
    holder.save_session("live-1", &serde_json::json!({"step": 1})).await.unwrap();
    next("live-1", "saved");
    let id = holder.create_checkpoint("live-1", "main", &serde_json::json!({"step": 1})).await;
    let checkpointed = next("live-1", "checkpointed");
    assert_eq!(checkpointed["checkpoint"], id.unwrap().as_str());
    assert_eq!(checkpointed["reason"], "manual");
    let state = serde_json::json!({"step": 1});
    let pause = holder.pause_session("live-1", &state, "waiting for a human").await.unwrap();
    // Pausing saves (with the status), then takes the pause checkpoint: one look sees the
    // checkpoint, then the pause; a look that falls between the two writes sees the pause
    // first and the checkpoint in the next look.
    next("live-1", "saved");
    let (a, b) = (next_any(), next_any());
    let mut pair = [&a, &b].map(|v| v["event"].as_str().unwrap().to_owned());
    pair.sort();
    assert_eq!(pair, ["checkpointed", "paused"], "{a} {b}");
    let (checkpoint, paused) = if a["event"] == "paused" { (&b, &a) } else { (&a, &b) };
    assert_eq!(checkpoint["reason"], "pause");
    assert_eq!(checkpoint["checkpoint"], pause.as_str());
    assert_eq!(paused["reason"], "waiting for a human");
    holder.resume_session("live-1").await.unwrap();
    next("live-1", "saved");
    next("live-1", "resumed");
    holder.complete_session("live-1", &serde_json::json!({"step": 2})).await.unwrap();
    next("live-1", "saved");
    next("live-1", "completed");
    assert!(holder.delete_session("research-1").await.unwrap());
    next("research-1", "deleted");
    // Nothing more was printed: the store is unchanged since the last look.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "an event no change caused");
    interrupt_watch(child);
    holder.save_session("live-1", &serde_json::json!({"step": 3})).await.unwrap();
    assert_eq!(holder.list_sessions().await.unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_file_store_its_application_holds() {
    let (_dir, s, _) = demo(false, None).await;
    let holder =
        StateManager::start(mars_state::FileStorageBackend::new(&s).unwrap()).await.unwrap();
    watch_beside_holder(&s, &holder, &[]).await;
    holder.shutdown().await.unwrap();
    // Gzipped and encrypted: each look opens the store with the passphrase.
    let (_dir, s, _) = demo(true, Some(PASSPHRASE)).await;
    let holder = StateManager::builder(mars_state::FileStorageBackend::new(&s).unwrap())
        .encryption_passphrase(PASSPHRASE)
        .start()
        .await
        .unwrap();
    watch_beside_holder(&s, &holder, &[("MARS_STATE_PASSPHRASE", PASSPHRASE)]).await;
    holder.shutdown().await.unwrap();
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_an_sqlite_store_its_application_holds() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let open = || mars_state::SqliteStorageBackend::open(&db).unwrap();
    let m = StateManager::start(open()).await.unwrap();
    build_demo(&m).await;
    m.shutdown().await.unwrap();
    let holder = StateManager::start(open()).await.unwrap();
    watch_beside_holder(&format!("sqlite://{}", db.display()), &holder, &[]).await;
    holder.shutdown().await.unwrap();
}
