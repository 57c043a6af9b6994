//! `StateManager::export_store` / `import_store`: a file store dumped, imported into
//! SQLite (gzipped, another key) and dumped again gives a byte-identical dump; importing
//! twice changes nothing; chosen sessions; bad dumps are refused with their line number and
//! leave the target untouched.

use mars_state::{
    EncryptionKey, ErrorKind, ExportOptions, FileStorageBackend, MemoryStorageBackend, StateManager,
};
use serde_json::{Value, json};

async fn filled(dir: &std::path::Path) -> StateManager {
    let m = StateManager::builder(FileStorageBackend::new(dir).unwrap())
        .encryption_key(EncryptionKey::from_bytes([9; 32]))
        .start()
        .await
        .unwrap();
    for i in 0..4 {
        let s = format!("run-{i}");
        m.save_session(&s, &json!({ "step": 0, "z": 1, "a": [1, 2.5, "x"] })).await.unwrap();
        let a = m.create_checkpoint(&s, "main", &json!({ "step": 1 })).await.unwrap();
        m.record_step(&s, 2, &json!({ "step": 2 })).await.unwrap();
        m.create_checkpoint(&s, "main", &json!({ "step": 2 })).await.unwrap();
        m.rollback_to_checkpoint(&a).await.unwrap();
        m.create_checkpoint(&s, "alt", &json!({ "step": 3 })).await.unwrap();
    }
    m.pause_session("run-1", &json!({ "paused": true }), "waiting for a person").await.unwrap();
    m
}

async fn dump(m: &StateManager, options: &ExportOptions) -> Vec<u8> {
    let mut out = Vec::new();
    m.export_store(&mut out, options).await.unwrap();
    out
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_to_dump_to_sqlite_to_dump_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let from = filled(dir.path()).await;
    let first = dump(&from, &ExportOptions::new()).await;
    let text = String::from_utf8(first.clone()).unwrap();
    assert!(text.starts_with("{\"mars_state_dump\":1,"), "{text}");
    assert_eq!(text.lines().count(), 1 + 4 + 4 * 3 + 1, "{text}");

    let db = dir.path().join("copy.db");
    let to = StateManager::builder(mars_state::SqliteStorageBackend::open(&db).unwrap())
        .compression(9)
        .encryption_key(EncryptionKey::from_bytes([4; 32]))
        .start()
        .await
        .unwrap();
    let report = to.import_store(&first[..]).await.unwrap();
    assert_eq!((report.session_records, report.checkpoints), (4, 13));
    let second = dump(&to, &ExportOptions::new()).await;
    assert_eq!(String::from_utf8(second).unwrap(), text);
    // The imported store works as a store: the paused session and its timeline.
    let s: Option<Value> = to.load_session("run-1").await.unwrap();
    assert_eq!(s, Some(json!({ "paused": true })));
    assert_eq!(to.list_checkpoints("run-3").await.unwrap().len(), 3);
    // Gzipped, the same dump once unzipped.
    let gz = dump(&to, &ExportOptions::new().gzip(true)).await;
    assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    let mut unzipped = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut unzipped)
        .unwrap();
    assert_eq!(unzipped, text);
    to.shutdown().await.unwrap();
    from.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let from = filled(dir.path()).await;
    let first = dump(&from, &ExportOptions::new()).await;
    let to = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    to.import_store(&first[..]).await.unwrap();
    let stats = to.get_storage_stats().await.unwrap();
    let gz = dump(&from, &ExportOptions::new().gzip(true)).await;
    // The second import, from the gzipped dump: recognised by itself.
    to.import_store(&gz[..]).await.unwrap();
    let again = to.get_storage_stats().await.unwrap();
    assert_eq!(
        (again.session_count, again.checkpoint_count),
        (stats.session_count, stats.checkpoint_count)
    );
    assert_eq!(again.checkpoint_count, 13);
    assert_eq!(dump(&to, &ExportOptions::new()).await, first);
    from.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_sessions_only() {
    let dir = tempfile::tempdir().unwrap();
    let from = filled(dir.path()).await;
    let out = dump(&from, &ExportOptions::new().session("run-2").session("run-0")).await;
    let text = String::from_utf8(out).unwrap();
    let sessions: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["session"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sessions, ["run-0", "run-0", "run-0", "run-0", "run-2", "run-2", "run-2", "run-2"]);
    let mut sink = Vec::new();
    let e = from.export_store(&mut sink, &ExportOptions::new().session("nope")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(sink.is_empty(), "nothing written before the check");
    from.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_dumps_are_refused_with_their_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let from = filled(dir.path()).await;
    let good = String::from_utf8(dump(&from, &ExportOptions::new()).await).unwrap();
    from.shutdown().await.unwrap();
    let lines: Vec<&str> = good.lines().collect();

    let cases: Vec<(String, &str)> = vec![
        (good.replacen("\"mars_state_dump\":1", "\"mars_state_dump\":7", 1), "version 7"),
        (good.lines().skip(1).collect::<Vec<_>>().join("\n"), "line 1"),
        (format!("{}\n{}\n{{not json\n", lines[0], lines[1]), "line 3"),
        (format!("{}\n{}\n{}\n", lines[0], lines[1], &lines[2][..lines[2].len() - 9]), "line 3"),
        (
            format!(
                "{}\n{}\n{}\n",
                lines[0],
                lines[1],
                lines[2].replace("\"type\":\"checkpoint\"", "\"type\":\"secret-thing\"")
            ),
            "line 3",
        ),
        (String::new(), "empty"),
    ];
    for (input, says) in cases {
        let to = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
        let e = to.import_store(input.as_bytes()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains(says), "{e} should say {says}");
        assert!(!e.to_string().contains("secret-thing"), "values are redacted: {e}");
        assert!(to.list_sessions().await.unwrap().is_empty(), "nothing imported");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_move_byte_for_byte() {
    // Key order and numbers no f64 holds survive the dump and the import as they were.
    let exact =
        r#"{"zeta":1,"alpha":18446744073709551615123,"f":0.1000000000000000055511151231257827}"#;
    let raw = serde_json::value::RawValue::from_string(exact.to_owned()).unwrap();
    let from = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    from.save_session("s", &raw).await.unwrap();
    let first = dump(&from, &ExportOptions::new()).await;
    let text = String::from_utf8(first.clone()).unwrap();
    assert!(text.contains(&format!("\"state\":{exact}}}")), "{text}");
    let to = StateManager::start(MemoryStorageBackend::new()).await.unwrap();
    to.import_store(&first[..]).await.unwrap();
    assert_eq!(dump(&to, &ExportOptions::new()).await, first);
}
