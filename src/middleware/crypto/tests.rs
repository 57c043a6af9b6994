//! Unit tests of the encryption layer, mostly over the memory backend: round trips and the
//! storage contract, every kind of tampering, wrong keys and passphrases, rotation, torn and
//! compacted logs, damaged metadata, and that neither plaintext nor key material shows.

use super::keyring::{CryptoMeta, SALT_LEN};
use super::seal::{FRAME_HEADER, FRAME_MAX_PLAIN, TAG_LEN};
use super::*;
use crate::MemoryStorageBackend;

type Enc = Encrypted<MemoryStorageBackend>;

const MARKER: &[u8] = b"PLAINTEXT-MARKER-7f3a";

fn k(s: &str) -> StorageKey {
    StorageKey::new(s).unwrap()
}

fn key(n: u8) -> EncryptionKey {
    EncryptionKey::from_bytes([n; 32])
}

/// Cheap Argon2id costs so passphrase tests run fast in debug builds.
fn fast() -> KdfParams {
    KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 }
}

async fn open(mem: &MemoryStorageBackend, current: impl Into<KeySource>) -> Result<Enc> {
    EncryptionLayer::new(current).kdf_params(fast()).wrap(mem.clone()).await
}

async fn open_with(
    mem: &MemoryStorageBackend,
    current: impl Into<KeySource>,
    previous: Vec<KeySource>,
) -> Result<Enc> {
    let mut layer = EncryptionLayer::new(current).kdf_params(fast());
    for p in previous {
        layer = layer.previous_key(p);
    }
    layer.wrap(mem.clone()).await
}

fn record(n: usize) -> Vec<u8> {
    let mut v = format!(r#"{{"mars_state":1,"n":{n},"secret":""#).into_bytes();
    v.extend_from_slice(MARKER);
    v.extend_from_slice(b"\"}\n");
    v
}

#[track_caller]
fn assert_corrupt<T: fmt::Debug>(r: Result<T>, what: &str) {
    assert!(matches!(r, Err(StateError::Corrupt { .. })), "{what}: expected Corrupt, got {r:?}");
}

#[track_caller]
fn assert_wrong_key<T: fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(e @ StateError::WrongKey { .. }) => e.to_string(),
        other => panic!("expected WrongKey, got {other:?}"),
    }
}

async fn all_stored(mem: &MemoryStorageBackend) -> Vec<(StorageKey, Vec<u8>)> {
    let mut out = Vec::new();
    for prefix in ["sessions", "checkpoints", "metadata", "quarantine"] {
        for meta in mem.list(&k(prefix)).await.unwrap() {
            let bytes = mem.get(&meta.key).await.unwrap().unwrap();
            out.push((meta.key, bytes));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn round_trip_and_contract() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let s1 = k("sessions/s1.json");
    let c1 = k("checkpoints/s1/c1.json.gz");
    assert_eq!(enc.get(&s1).await.unwrap(), None);
    enc.put(&s1, record(1)).await.unwrap();
    enc.put(&c1, Vec::new()).await.unwrap();
    assert_eq!(enc.get(&s1).await.unwrap(), Some(record(1)));
    assert_eq!(enc.get(&c1).await.unwrap(), Some(Vec::new()));
    // Stored with exactly the documented overhead; list reports what get returns.
    assert_eq!(
        mem.get(&s1).await.unwrap().unwrap().len(),
        record(1).len() + super::seal::SEAL_OVERHEAD
    );
    let listed = enc.list(&k("sessions")).await.unwrap();
    assert_eq!(listed, [ObjectMeta { key: s1.clone(), size: record(1).len() as u64 }]);
    assert_eq!(enc.list(&k("checkpoints/s1")).await.unwrap()[0].size, 0);
    // Overwrite, delete.
    enc.put(&s1, record(2)).await.unwrap();
    assert_eq!(enc.get(&s1).await.unwrap(), Some(record(2)));
    assert!(enc.delete(&s1).await.unwrap());
    assert!(!enc.delete(&s1).await.unwrap());
    assert_eq!(enc.get(&s1).await.unwrap(), None);
    assert_eq!(enc.sweep().await.unwrap(), SweepReport::default());
    // Plaintext pass-through keys are stored as they are.
    let store_meta = k("metadata/store.json");
    enc.put(&store_meta, br#"{"mars_state":1}"#.to_vec()).await.unwrap();
    assert_eq!(mem.get(&store_meta).await.unwrap().as_deref(), Some(&br#"{"mars_state":1}"#[..]));
    let pending = k("metadata/pending/s1");
    enc.put(&pending, Vec::new()).await.unwrap();
    assert_eq!(mem.get(&pending).await.unwrap(), Some(Vec::new()));
    assert_eq!(enc.list(&k("metadata/pending")).await.unwrap()[0].size, 0);
    // Appending to something that is not a log is refused rather than half-supported.
    assert!(matches!(
        enc.append(&k("sessions/s2.json"), b"x".to_vec()).await,
        Err(StateError::Config { .. })
    ));
}

#[tokio::test]
async fn crypto_metadata_is_plaintext_and_reserved() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, Passphrase::new("correct horse battery staple")).await.unwrap();
    let meta_key = k(CRYPTO_META);
    let raw = mem.get(&meta_key).await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["mars_state_crypto"], 1);
    assert_eq!(v["kdf"]["algorithm"], "argon2id");
    assert_eq!(v["kdf"]["salt"].as_str().unwrap().len(), 2 * SALT_LEN);
    assert_eq!(v["kdf"]["m_cost_kib"], 64);
    assert_eq!(v["keys"][0]["id"], 1);
    assert!(!contains(&raw, b"correct horse"));
    // Readable through the wrapper, but not writable.
    assert_eq!(enc.get(&meta_key).await.unwrap(), Some(raw.clone()));
    for r in [
        enc.put(&meta_key, b"{}".to_vec()).await,
        enc.append(&meta_key, b"{}".to_vec()).await,
        enc.delete(&meta_key).await.map(|_| ()),
    ] {
        assert!(matches!(r, Err(StateError::Config { .. })), "{r:?}");
    }
    assert_eq!(mem.get(&meta_key).await.unwrap(), Some(raw));
    // Two stores get different salts.
    let other = MemoryStorageBackend::new();
    open(&other, Passphrase::new("x")).await.unwrap();
    let v2: serde_json::Value =
        serde_json::from_slice(&other.get(&meta_key).await.unwrap().unwrap()).unwrap();
    assert_ne!(v["kdf"]["salt"], v2["kdf"]["salt"]);
}

#[tokio::test]
async fn default_kdf_costs_are_owasp() {
    assert_eq!(KdfParams::default(), KdfParams { m_cost_kib: 19456, t_cost: 2, p_cost: 1 });
    let mem = MemoryStorageBackend::new();
    // A raw key needs no derivation, so the default costs are cheap to record here.
    Encrypted::open(mem.clone(), key(1).into(), Vec::new()).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&mem.get(&k(CRYPTO_META)).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        (v["kdf"]["m_cost_kib"].as_u64(), v["kdf"]["t_cost"].as_u64()),
        (Some(19456), Some(2))
    );
}

#[tokio::test]
async fn wrong_key_is_reported_once_at_open() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, EncryptionKey::from_bytes([0xab; 32])).await.unwrap();
    enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
    let msg = assert_wrong_key(open(&mem, EncryptionKey::from_bytes([0xcd; 32])).await);
    assert!(msg.contains("encryption key"), "{msg}");
    assert!(!msg.contains("171") && !msg.contains("ab, ab") && !msg.contains("205"), "{msg}");
    // The right key still opens it and reads the record.
    let enc = open(&mem, EncryptionKey::from_bytes([0xab; 32])).await.unwrap();
    assert_eq!(enc.get(&k("sessions/s1.json")).await.unwrap(), Some(record(1)));
}

#[tokio::test]
async fn passphrases_wrong_rejected_right_reopens() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, Passphrase::new("open sesame")).await.unwrap();
    enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
    enc.append(&k("metadata/index.log"), record(2)).await.unwrap();
    drop(enc);
    let msg = assert_wrong_key(open(&mem, Passphrase::new("open sesame!")).await);
    assert!(msg.contains("passphrase") && !msg.contains("sesame"), "{msg}");
    // A raw key is not the passphrase either.
    assert_wrong_key(open(&mem, key(0)).await);
    let enc = open(&mem, Passphrase::new("open sesame")).await.unwrap();
    assert_eq!(enc.get(&k("sessions/s1.json")).await.unwrap(), Some(record(1)));
    assert_eq!(enc.get(&k("metadata/index.log")).await.unwrap(), Some(record(2)));
    // The costs recorded at creation are used, whatever the layer asks for now.
    let layer = EncryptionLayer::new(Passphrase::new("open sesame")).kdf_params(KdfParams {
        m_cost_kib: 128,
        t_cost: 2,
        p_cost: 1,
    });
    layer.wrap(mem.clone()).await.unwrap();
    // An empty passphrase is a configuration error, not a weak key.
    let fresh = MemoryStorageBackend::new();
    assert!(matches!(open(&fresh, Passphrase::new("")).await, Err(StateError::Config { .. })));
    assert_eq!(fresh.get(&k(CRYPTO_META)).await.unwrap(), None);
}

#[tokio::test]
async fn every_flipped_bit_is_corrupt() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let s1 = k("sessions/s1.json");
    enc.put(&s1, record(1)).await.unwrap();
    let good = mem.get(&s1).await.unwrap().unwrap();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        mem.put(&s1, bad).await.unwrap();
        assert_corrupt(enc.get(&s1).await, &format!("bit {bit}"));
    }
}

#[tokio::test]
async fn every_truncation_and_extension_is_corrupt() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let s1 = k("sessions/s1.json");
    enc.put(&s1, record(1)).await.unwrap();
    let good = mem.get(&s1).await.unwrap().unwrap();
    for len in 0..good.len() {
        mem.put(&s1, good[..len].to_vec()).await.unwrap();
        assert_corrupt(enc.get(&s1).await, &format!("truncated to {len}"));
    }
    let mut longer = good.clone();
    longer.push(0);
    mem.put(&s1, longer).await.unwrap();
    assert_corrupt(enc.get(&s1).await, "extended");
}

#[tokio::test]
async fn records_moved_between_keys_are_corrupt() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let (a, b) = (k("sessions/a.json"), k("sessions/b.json"));
    let cp = k("checkpoints/a/c1.json");
    enc.put(&a, record(1)).await.unwrap();
    enc.put(&b, record(2)).await.unwrap();
    let raw_a = mem.get(&a).await.unwrap().unwrap();
    for target in [&b, &cp] {
        mem.put(target, raw_a.clone()).await.unwrap();
        assert_corrupt(enc.get(target).await, &format!("a copied to {target}"));
    }
    // A record planted as a log, a log planted as a record, a key-check record planted
    // as a record.
    let log = k("metadata/index.log");
    mem.put(&log, raw_a.clone()).await.unwrap();
    assert_corrupt(enc.get(&log).await, "record as log");
    enc.put(&log, record(3)).await.unwrap();
    mem.put(&a, mem.get(&log).await.unwrap().unwrap()).await.unwrap();
    assert_corrupt(enc.get(&a).await, "log as record");
    let meta = CryptoMeta::parse(&mem.get(&k(CRYPTO_META)).await.unwrap().unwrap()).unwrap();
    mem.put(&a, meta.checks().unwrap()[0].1.clone()).await.unwrap();
    assert_corrupt(enc.get(&a).await, "key check as record");
    // The same log frames under another log's name.
    let other_log = k("metadata/other.log");
    mem.put(&other_log, mem.get(&log).await.unwrap().unwrap()).await.unwrap();
    assert_corrupt(enc.get(&other_log).await, "log under another name");
}

#[tokio::test]
async fn planted_plaintext_is_refused() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let s1 = k("sessions/s1.json");
    mem.put(&s1, record(1)).await.unwrap();
    match enc.get(&s1).await {
        Err(StateError::Corrupt { key, reason }) => {
            assert_eq!(key, "sessions/s1.json");
            assert!(reason.contains("not encrypted"), "{reason}");
            assert!(!reason.contains("PLAINTEXT"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Gzip bytes, and an empty file, are refused too.
    mem.put(&s1, vec![0x1f, 0x8b, 8, 0]).await.unwrap();
    assert_corrupt(enc.get(&s1).await, "gzip");
    mem.put(&s1, Vec::new()).await.unwrap();
    assert_corrupt(enc.get(&s1).await, "empty");
    // A plaintext journal.
    let log = k("metadata/index.log");
    mem.put(&log, b"1a2b3c4d {\"op\":\"saved\"}\n".to_vec()).await.unwrap();
    assert_corrupt(enc.get(&log).await, "plaintext journal");
    // Plaintext appended after encrypted frames.
    enc.put(&log, record(1)).await.unwrap();
    mem.append(&log, b"1a2b3c4d {\"op\":\"saved\"}\n".to_vec()).await.unwrap();
    assert_corrupt(enc.get(&log).await, "plaintext after frames");
}

#[tokio::test]
async fn log_frames_torn_tail_and_compaction() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let log = k("metadata/index.log");
    let lines: Vec<Vec<u8>> = (0..3).map(|i| format!("line {i}\n").into_bytes()).collect();
    enc.append(&log, Vec::new()).await.unwrap();
    assert_eq!(enc.get(&log).await.unwrap(), Some(Vec::new()), "an empty append creates the log");
    for l in &lines {
        enc.append(&log, l.clone()).await.unwrap();
    }
    assert_eq!(enc.get(&log).await.unwrap(), Some(lines.concat()));
    let good = mem.get(&log).await.unwrap().unwrap();
    let frame_ends: Vec<usize> = (1..=3)
        .map(|n| lines[..n].iter().map(|l| FRAME_HEADER + l.len() + TAG_LEN).sum())
        .collect();
    assert_eq!(*frame_ends.last().unwrap(), good.len());

    // A crash may cut the log anywhere: every cut reads as the complete frames before it.
    for len in 0..good.len() {
        mem.put(&log, good[..len].to_vec()).await.unwrap();
        let complete = frame_ends.iter().filter(|e| **e <= len).count();
        assert_eq!(enc.get(&log).await.unwrap(), Some(lines[..complete].concat()), "cut at {len}");
    }
    // ... or extend it with zeros.
    let mut zeros = good.clone();
    zeros.extend([0; 100]);
    mem.put(&log, zeros).await.unwrap();
    assert_eq!(enc.get(&log).await.unwrap(), Some(lines.concat()));

    // After a torn tail was read, the next append cuts it first, so it never ends up in
    // the middle of the log.
    mem.put(&log, good[..frame_ends[1] + 30].to_vec()).await.unwrap();
    assert_eq!(enc.get(&log).await.unwrap(), Some(lines[..2].concat()));
    enc.append(&log, b"line 3\n".to_vec()).await.unwrap();
    let mut want = lines[..2].concat();
    want.extend(b"line 3\n");
    assert_eq!(enc.get(&log).await.unwrap(), Some(want.clone()));

    // Compaction rewrites the log with put, in the same framed format; appends continue.
    enc.put(&log, b"snapshot\n".to_vec()).await.unwrap();
    enc.append(&log, b"after\n".to_vec()).await.unwrap();
    assert_eq!(enc.get(&log).await.unwrap(), Some(b"snapshot\nafter\n".to_vec()));
    enc.put(&log, Vec::new()).await.unwrap();
    assert_eq!(enc.get(&log).await.unwrap(), Some(Vec::new()));

    // A large put is split into frames of at most 1 MiB and reads back whole.
    let big: Vec<u8> = (0..FRAME_MAX_PLAIN * 2 + 10).map(|i| (i % 251) as u8).collect();
    enc.put(&log, big.clone()).await.unwrap();
    let stored = mem.get(&log).await.unwrap().unwrap();
    assert_eq!(stored.len(), big.len() + 3 * (FRAME_HEADER + TAG_LEN));
    assert_eq!(enc.get(&log).await.unwrap(), Some(big));
}

#[tokio::test]
async fn every_flipped_bit_in_a_log_is_corrupt() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let log = k("metadata/index.log");
    enc.append(&log, b"one\n".to_vec()).await.unwrap();
    enc.append(&log, b"two\n".to_vec()).await.unwrap();
    let good = mem.get(&log).await.unwrap().unwrap();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        mem.put(&log, bad).await.unwrap();
        assert_corrupt(enc.get(&log).await, &format!("log bit {bit}"));
    }
}

#[tokio::test]
async fn rotation_keeps_old_records_readable() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let (a, b) = (k("sessions/a.json"), k("sessions/b.json"));
    let log = k("metadata/index.log");
    enc.put(&a, record(1)).await.unwrap();
    enc.append(&log, b"one\n".to_vec()).await.unwrap();
    assert_eq!(enc.current_key_id(), 1);

    assert_eq!(enc.rotate_to(key(2).into()).await.unwrap(), 2);
    assert_eq!(enc.current_key_id(), 2);
    assert_eq!(enc.key_ids(), [1, 2]);
    assert_eq!(enc.recorded_key_ids().await, [1, 2]);
    enc.put(&b, record(2)).await.unwrap();
    enc.append(&log, b"two\n".to_vec()).await.unwrap();
    assert_eq!(enc.key_id_of(&mem.get(&a).await.unwrap().unwrap()), Some(1));
    assert_eq!(enc.key_id_of(&mem.get(&b).await.unwrap().unwrap()), Some(2));
    assert_eq!(enc.key_id_of(&mem.get(&log).await.unwrap().unwrap()), None, "mixed log");
    assert_eq!(enc.get(&a).await.unwrap(), Some(record(1)));
    assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
    assert_eq!(enc.get(&log).await.unwrap(), Some(b"one\ntwo\n".to_vec()));
    // Rotating to a key already on record reuses its id.
    assert_eq!(enc.rotate_to(key(2).into()).await.unwrap(), 2);
    assert_eq!(enc.recorded_key_ids().await, [1, 2]);
    drop(enc);

    // New key plus the previous one: both readable, writes use the new one.
    let enc = open_with(&mem, key(2), vec![key(1).into()]).await.unwrap();
    assert_eq!((enc.current_key_id(), enc.key_ids()), (2, vec![1, 2]));
    assert_eq!(enc.get(&a).await.unwrap(), Some(record(1)));
    assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
    drop(enc);

    // Only the new key: the old record is a clear WrongKey naming the key id.
    let enc = open(&mem, key(2)).await.unwrap();
    let msg = assert_wrong_key(enc.get(&a).await);
    assert!(msg.contains("key id 1"), "{msg}");
    assert_wrong_key(enc.get(&log).await);
    assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
    drop(enc);
    // The old key alone still opens the store (it is still on record).
    assert_eq!(open(&mem, key(1)).await.unwrap().current_key_id(), 1);

    // Re-encrypt everything, then retire the old key.
    let enc = open_with(&mem, key(2), vec![key(1).into()]).await.unwrap();
    for kk in [&a, &b, &log] {
        let v = enc.get(kk).await.unwrap().unwrap();
        enc.put(kk, v).await.unwrap();
        assert_eq!(enc.key_id_of(&mem.get(kk).await.unwrap().unwrap()), Some(2));
    }
    enc.retire_keys_except_current().await.unwrap();
    assert_eq!(enc.recorded_key_ids().await, [2]);
    assert_eq!(enc.key_ids(), [2]);
    assert_eq!(enc.get(&a).await.unwrap(), Some(record(1)));
    drop(enc);
    assert_wrong_key(open(&mem, key(1)).await);
    // A stale previous key in the configuration is ignored, not fatal.
    let enc = open_with(&mem, key(2), vec![key(1).into()]).await.unwrap();
    assert_eq!(enc.key_ids(), [2]);
    assert_eq!(enc.get(&log).await.unwrap(), Some(b"one\ntwo\n".to_vec()));
    // Ids are never reused, even after retiring, and passphrases rotate in too.
    assert_eq!(enc.rotate_to(Passphrase::new("next").into()).await.unwrap(), 3);
    enc.put(&a, record(3)).await.unwrap();
    drop(enc);
    let enc = open_with(&mem, Passphrase::new("next"), vec![key(2).into()]).await.unwrap();
    assert_eq!(enc.get(&a).await.unwrap(), Some(record(3)));
    assert_eq!(enc.get(&b).await.unwrap(), Some(record(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_while_in_use() {
    let mem = MemoryStorageBackend::new();
    let enc = Arc::new(open(&mem, key(1)).await.unwrap());
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let enc = enc.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let kk = k(&format!("sessions/w{w}-{i}.json"));
                    enc.put(&kk, record(i)).await.unwrap();
                    assert_eq!(enc.get(&kk).await.unwrap(), Some(record(i)));
                }
            })
        })
        .collect();
    for n in 2..6 {
        enc.rotate_to(key(n).into()).await.unwrap();
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let reopened = open_with(&mem, key(5), (1..5).map(|n| key(n).into()).collect()).await.unwrap();
    for w in 0..8 {
        for i in 0..50 {
            assert_eq!(
                reopened.get(&k(&format!("sessions/w{w}-{i}.json"))).await.unwrap(),
                Some(record(i))
            );
        }
    }
}

#[tokio::test]
async fn no_plaintext_anywhere_in_the_store() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, Passphrase::new("PLAINTEXT-MARKER-7f3a")).await.unwrap();
    enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
    enc.put(&k("checkpoints/s1/c1.json"), record(2)).await.unwrap();
    enc.put(&k("quarantine/1-sessions~s1.json"), record(3)).await.unwrap();
    enc.append(&k("metadata/index.log"), record(4)).await.unwrap();
    enc.append(&k("metadata/index.log"), record(5)).await.unwrap();
    enc.rotate_to(Passphrase::new("PLAINTEXT-MARKER-7f3a two").into()).await.unwrap();
    enc.put(&k("sessions/s2.json"), record(6)).await.unwrap();
    enc.put(&k("metadata/other.log"), record(7)).await.unwrap();
    let stored = all_stored(&mem).await;
    assert!(stored.len() >= 7, "{stored:?}");
    for (key, bytes) in &stored {
        assert!(!contains(bytes, MARKER), "{key} holds plaintext");
        assert!(!contains(bytes, b"secret"), "{key} holds plaintext");
    }
}

#[tokio::test]
async fn key_material_is_redacted() {
    let raw = EncryptionKey::from_bytes([0xab; 32]);
    assert_eq!(format!("{raw:?}"), "EncryptionKey([redacted])");
    let pass = Passphrase::new("hunter2");
    assert_eq!(format!("{pass:?}"), "Passphrase([redacted])");
    let layer = EncryptionLayer::new(raw.clone()).previous_key(pass.clone());
    let dbg = format!("{layer:?} {:?} {:?}", KeySource::from(raw.clone()), KeySource::from(pass));
    assert!(!dbg.contains("hunter2") && !dbg.contains("171") && !dbg.contains("ab"), "{dbg}");
    let enc = layer.wrap(MemoryStorageBackend::new()).await.unwrap();
    let dbg = format!("{enc:?}");
    assert!(dbg.contains("current_key_id: 1") && !dbg.contains("171"), "{dbg}");
    // A wrong-length key names only its length.
    let err = EncryptionKey::try_from_slice(&[0xab; 31]).unwrap_err().to_string();
    assert!(err.contains("31") && !err.contains("171") && !err.contains("ab, "), "{err}");
    assert!(EncryptionKey::generate().is_ok());
}

#[tokio::test]
async fn key_id_of_stored_bytes() {
    let mem = MemoryStorageBackend::new();
    let enc = open(&mem, key(1)).await.unwrap();
    let s1 = k("sessions/s1.json");
    enc.put(&s1, record(1)).await.unwrap();
    assert_eq!(enc.key_id_of(&mem.get(&s1).await.unwrap().unwrap()), Some(1));
    enc.append(&k("metadata/index.log"), b"x".to_vec()).await.unwrap();
    assert_eq!(enc.key_id_of(&mem.get(&k("metadata/index.log")).await.unwrap().unwrap()), Some(1));
    assert_eq!(enc.key_id_of(&record(1)), None);
    assert_eq!(enc.key_id_of(b""), None);
    assert_eq!(enc.key_id_of(b"MSE1"), None);
}

#[tokio::test]
async fn damaged_metadata_is_reported() {
    let mem = MemoryStorageBackend::new();
    open(&mem, key(1)).await.unwrap();
    let meta_key = k(CRYPTO_META);
    let good: serde_json::Value =
        serde_json::from_slice(&mem.get(&meta_key).await.unwrap().unwrap()).unwrap();
    let put = |v: serde_json::Value| {
        let mem = mem.clone();
        let meta_key = meta_key.clone();
        async move { mem.put(&meta_key, serde_json::to_vec(&v).unwrap()).await.unwrap() }
    };
    put(serde_json::json!("garbage")).await;
    assert_corrupt(open(&mem, key(1)).await, "garbage");
    let mut v = good.clone();
    v["keys"] = serde_json::json!([]);
    put(v).await;
    assert_corrupt(open(&mem, key(1)).await, "no keys");
    let mut v = good.clone();
    v["keys"][0]["check"] = serde_json::json!("zz");
    put(v).await;
    assert_corrupt(open(&mem, key(1)).await, "bad hex");
    let mut v = good.clone();
    v["kdf"]["m_cost_kib"] = serde_json::json!(u32::MAX);
    put(v).await;
    assert_corrupt(open(&mem, key(1)).await, "huge costs");
    let mut v = good.clone();
    v["mars_state_crypto"] = serde_json::json!(2);
    put(v).await;
    assert!(matches!(open(&mem, key(1)).await, Err(StateError::Config { .. })));
    // A check record relabelled with another id does not open.
    let mut v = good.clone();
    v["keys"][0]["id"] = serde_json::json!(2);
    v["next_key_id"] = serde_json::json!(3);
    put(v).await;
    assert_wrong_key(open(&mem, key(1)).await);
    put(good).await;
    open(&mem, key(1)).await.unwrap();
}

#[tokio::test]
async fn no_plaintext_in_any_file_of_a_file_store() {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() { walk(&path, out) } else { out.push(path) }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = EncryptionLayer::new(Passphrase::new("file store pass")).kdf_params(fast());
    let enc = layer.wrap(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
    enc.put(&k("sessions/s1.json"), record(1)).await.unwrap();
    enc.put(&k("checkpoints/s1/c1.json"), record(2)).await.unwrap();
    enc.append(&k("metadata/index.log"), record(3)).await.unwrap();
    enc.append(&k("metadata/index.log"), record(4)).await.unwrap();
    assert_eq!(
        enc.get(&k("metadata/index.log")).await.unwrap(),
        Some([record(3), record(4)].concat())
    );
    drop(enc);
    let mut files = Vec::new();
    walk(dir.path(), &mut files);
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !contains(&bytes, MARKER) && !contains(&bytes, b"file store pass"),
            "{} holds plaintext",
            f.display()
        );
    }
    assert_wrong_key(Encrypted::open_path(dir.path(), Passphrase::new("wrong")).await);
    let enc = layer.wrap(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
    assert_eq!(enc.get(&k("sessions/s1.json")).await.unwrap(), Some(record(1)));
}

#[tokio::test]
async fn new_store_records_only_the_current_key() {
    let mem = MemoryStorageBackend::new();
    let enc = open_with(&mem, key(1), vec![key(2).into()]).await.unwrap();
    assert_eq!(enc.key_ids(), [1]);
    assert_eq!(enc.recorded_key_ids().await, [1]);
    assert_wrong_key(open(&mem, key(2)).await);
}
