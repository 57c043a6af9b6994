//! `terminated_connections_during_saves`: the backend's connections are killed with
//! `pg_terminate_backend` every few milliseconds while four tasks put and append. Every call
//! must return `Ok` or a typed error (`Unavailable`: nothing committed; `Timeout`: outcome
//! unknown); afterwards every acknowledged put is there, every put answered `Unavailable` is
//! not, and no append is there twice. An append is acknowledged once queued: all acked
//! appends are there unless one reported that the log lost its tail.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mars_state::{ErrorKind, PostgresStorageBackend, StorageBackend, StorageKey};

use super::{Schema, admin_sql, bounded, random_name, test_url};

const TASKS: usize = 4;
const ROUNDS: usize = 100;

/// `url` with `name=value` added to its query parameters.
fn with_param(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{name}={value}")
}

#[derive(Default)]
struct Outcome {
    /// Acked puts of distinct keys, and the last acked value of each task's rolling key.
    acked_puts: Vec<(StorageKey, Vec<u8>)>,
    rolling: BTreeMap<usize, usize>,
    rolling_acks: usize,
    acked_appends: Vec<String>,
    /// Writes answered `Unavailable`: nothing may have been committed.
    refused_puts: Vec<StorageKey>,
    refused_appends: Vec<String>,
    unknown_appends: Vec<String>,
    errors: BTreeMap<String, usize>,
}

pub async fn terminated_connections_during_saves() {
    let schema = Schema::new();
    let app = random_name("mars_term");
    let url = with_param(&test_url(), "application_name", &app);
    let backend = PostgresStorageBackend::options()
        .schema(schema.name())
        .pool_size(8)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"));
    let log = StorageKey::new("metadata/term.log").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        let sql = format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'"
        );
        tokio::spawn(async move {
            let mut kills = 0;
            while !stop.load(Ordering::Relaxed) {
                admin_sql(&sql).await;
                kills += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            kills
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (b, log) = (backend.clone(), log.clone());
        tasks.spawn(async move {
            let mut out = Outcome::default();
            let mut errors: BTreeMap<String, usize> = BTreeMap::new();
            for i in 0..ROUNDS {
                let key = StorageKey::new(format!("sessions/t{t}/k{i}.json")).unwrap();
                let value = format!("{t}:{i}:{}", "v".repeat(i % 7 * 100)).into_bytes();
                match b.put(&key, value.clone()).await {
                    Ok(()) => out.acked_puts.push((key, value)),
                    Err(e) => {
                        check(&e);
                        *errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                        if e.kind() == ErrorKind::Unavailable {
                            out.refused_puts.push(key);
                        }
                    }
                }
                let rolling = StorageKey::new(format!("sessions/t{t}.json")).unwrap();
                match b.put(&rolling, i.to_string().into_bytes()).await {
                    Ok(()) => {
                        out.rolling.insert(t, i);
                        out.rolling_acks += 1;
                    }
                    Err(e) => {
                        check(&e);
                        *errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                    }
                }
                let line = format!("t{t}-{i}");
                match b.append(&log, format!("{line};").into_bytes()).await {
                    Ok(()) => out.acked_appends.push(line),
                    Err(e) => {
                        check(&e);
                        *errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                        if e.kind() == ErrorKind::Unavailable {
                            if out.refused_appends.is_empty() {
                                println!("first failed append: {e}");
                            }
                            out.refused_appends.push(line);
                        } else {
                            out.unknown_appends.push(line);
                        }
                    }
                }
            }
            out.errors = errors;
            out
        });
    }
    let mut all = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        let out = done.unwrap();
        all.acked_puts.extend(out.acked_puts);
        all.rolling.extend(out.rolling);
        all.rolling_acks += out.rolling_acks;
        all.acked_appends.extend(out.acked_appends);
        all.refused_puts.extend(out.refused_puts);
        all.refused_appends.extend(out.refused_appends);
        all.unknown_appends.extend(out.unknown_appends);
        for (k, n) in out.errors {
            *all.errors.entry(k).or_default() += n;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let kills = killer.await.unwrap();
    // The contract lets a log lose a tail; the backend reports a lost batch to the next
    // append of that log. The tasks' last batch has no next append of theirs: this one asks
    // (a loss is then reported, as to any caller; the sentinel itself is never checked).
    if let Err(e) = bounded("append", backend.append(&log, b"sentinel;".to_vec())).await {
        check(&e);
        println!("the sentinel append after the run: {e}");
        if e.kind() == ErrorKind::Unavailable {
            all.refused_appends.push("sentinel".to_owned());
        } else {
            all.unknown_appends.push("sentinel".to_owned());
        }
    }

    // Every acked put is there; every refused one is not.
    for (key, value) in &all.acked_puts {
        let got = bounded("get", backend.get(key)).await.unwrap();
        assert_eq!(got.as_ref(), Some(value), "acked put of {key} lost");
    }
    for key in &all.refused_puts {
        let got = bounded("get", backend.get(key)).await.unwrap();
        assert_eq!(got, None, "a put answered Unavailable (nothing committed) is there: {key}");
    }
    for (t, i) in &all.rolling {
        let key = StorageKey::new(format!("sessions/t{t}.json")).unwrap();
        let got = bounded("get", backend.get(&key)).await.unwrap().unwrap();
        let stored: usize = String::from_utf8(got).unwrap().parse().unwrap();
        assert!(stored >= *i, "task {t}: stored {stored}, older than the acked {i}");
    }
    // The log: each acked append once, no append twice, no refused append at all.
    let bytes = bounded("get", backend.get(&log)).await.unwrap().unwrap_or_default();
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.split(';').filter(|l| !l.is_empty()).collect();
    let mut seen = HashSet::new();
    for line in &lines {
        assert!(seen.insert(*line), "append {line} is in the log twice");
    }
    // An append is acknowledged once queued; only if one failed for good (the log is then
    // refused further appends, so some append here reported an error) may a tail be lost.
    if all.refused_appends.is_empty() && all.unknown_appends.is_empty() {
        for line in &all.acked_appends {
            assert!(seen.contains(line.as_str()), "acked append {line} lost");
        }
    }
    for line in &all.refused_appends {
        assert!(!seen.contains(line.as_str()), "an append answered Unavailable is there: {line}");
    }
    let writes = TASKS * ROUNDS * 3;
    println!(
        "{kills} terminate rounds; {writes} writes: {} puts and {} appends acked, errors {:?}; \
         {} appends of unknown outcome ({} of them landed); all acked writes present, none twice",
        all.acked_puts.len() + all.rolling_acks,
        all.acked_appends.len(),
        all.errors,
        all.unknown_appends.len(),
        all.unknown_appends.iter().filter(|l| seen.contains(l.as_str())).count(),
    );
    assert!(kills > 5, "the connections were terminated only {kills} times");
    drop(backend);
}

fn check(e: &mars_state::StateError) {
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "an untyped failure: {e:?}"
    );
}
