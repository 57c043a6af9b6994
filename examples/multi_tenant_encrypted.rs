//! Multi-tenant and encrypted: two principals and an administrator share one encrypted store.
//!
//! One store in a fresh temporary directory ([`FileStorageBackend`]) is opened with
//! `.encryption_passphrase(..)` (every record, the index and the access records are sealed
//! with XChaCha20-Poly1305 under an Argon2id-derived key) and
//! `.access_control(AccessControlLayer::new().admin(ops))`. Handles from
//! [`StateManager::for_principal`] act as `alice`, `bob` and the administrator `ops`. The
//! example shows, checking each point:
//!
//! - each principal's first save of a session makes them its owner;
//! - bob is denied alice's session ([`StateError::AccessDenied`], printed as is);
//! - alice grants bob read access: bob can read but not write; she revokes it: bob is
//!   denied again;
//! - `list_sessions` shows each principal only what they may read (the administrator all);
//! - after a restart a wrong passphrase is refused at start ([`StateError::WrongKey`]), and
//!   with the right one the data and the access rules are all still there;
//! - every byte of every file under the store is searched for the secret markers the states
//!   contain: none is found (and the same search finds them in an unencrypted store).
//!
//! It prints `OK` and exits 0, or prints each failed check and exits 1.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example multi_tenant_encrypted
//! ```
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use mars_state::{Access, ErrorKind, FileStorageBackend, Principal, StateError, StateManager};
use serde_json::json;

const PASSPHRASE: &str = "correct horse battery staple";
const ALICE_SESSION: &str = "alice-research";
const BOB_SESSION: &str = "bob-budget";
/// Strings that appear only inside the states: they must never be found on disk.
const ALICE_MARKER: &str = "PLAINTEXT-MARKER-alice-7c1f";
const BOB_MARKER: &str = "PLAINTEXT-MARKER-bob-93ae";

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Failed checks, collected so one failure hides no other.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("  CHECK FAILED: {what}");
            self.failed.push(what);
        }
    }

    /// Expects `result` to be an access denial; prints it.
    fn denied<T: std::fmt::Debug>(&mut self, result: mars_state::Result<T>, what: &str) {
        match result {
            Err(e @ StateError::AccessDenied { .. }) => println!("  {what}: denied -> {e}"),
            other => self.expect(false, format!("{what}: expected AccessDenied, got {other:?}")),
        }
    }
}

#[cfg(feature = "encryption")]
async fn open(store: &Path, passphrase: &str, ops: &Principal) -> mars_state::Result<StateManager> {
    StateManager::builder(FileStorageBackend::new(store)?)
        .encryption_passphrase(passphrase)
        .access_control(mars_state::AccessControlLayer::new().admin(ops.clone()))
        .start()
        .await
}

/// Without the `encryption` feature (on by default) there is nothing to show.
#[cfg(not(feature = "encryption"))]
async fn open(
    _store: &Path,
    _passphrase: &str,
    _ops: &Principal,
) -> mars_state::Result<StateManager> {
    Err(StateError::Config {
        message: "this example needs the `encryption` feature, which is on by default".into(),
    })
}

fn names(sessions: &[mars_state::SessionInfo]) -> Vec<String> {
    sessions.iter().map(|s| s.session_id.to_string()).collect()
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        println!("FAILED: {e}");
        std::process::exit(1);
    }
}

async fn run() -> AnyResult<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("mars-multi-tenant-").tempdir()?;
    let store = dir.path();
    let (alice_p, bob_p, ops_p) =
        (Principal::new("alice")?, Principal::new("bob")?, Principal::new("ops")?);
    let mut checks = Checks::default();
    println!("mars-state multi-tenant encrypted store demo");
    println!("  store: {} (encrypted with a passphrase; administrator: ops)", store.display());
    println!();

    let manager = open(store, PASSPHRASE, &ops_p).await?;
    let alice = manager.for_principal(alice_p.clone());
    let bob = manager.for_principal(bob_p.clone());
    let ops = manager.for_principal(ops_p.clone());

    // 1. First saves make owners.
    println!("1. each principal's first save makes them the owner");
    let alice_state =
        json!({"topic": "battery chemistry", "notes": [ALICE_MARKER, "lithium iron phosphate"]});
    let alice_checkpoint = json!({"topic": "battery chemistry", "draft": ALICE_MARKER});
    let bob_state = json!({"quarter": "Q3", "budget_eur": 12_500, "memo": BOB_MARKER});
    alice.save_session(ALICE_SESSION, &alice_state).await?;
    alice.create_checkpoint(ALICE_SESSION, "main", &alice_checkpoint).await?;
    bob.save_session(BOB_SESSION, &bob_state).await?;
    for (handle, session, owner) in [(&alice, ALICE_SESSION, &alice_p), (&bob, BOB_SESSION, &bob_p)]
    {
        let record = handle.access_record(session).await?;
        println!(
            "  {session}: owner {}, created at {} ms since the epoch",
            record.as_ref().map_or("none".to_owned(), |r| r.owner.to_string()),
            record.as_ref().map_or(0, |r| r.created_at)
        );
        checks.expect(
            record.is_some_and(|r| &r.owner == owner),
            format!("{session} should be owned by {owner}"),
        );
    }
    println!();

    // 2. Bob may not touch alice's session.
    println!("2. bob is denied alice's session (the typed error, as returned)");
    let err = bob.load_session(ALICE_SESSION).await.err();
    match &err {
        Some(e) => println!("  bob.load_session({ALICE_SESSION:?}) -> Err({e:?})"),
        None => println!("  bob.load_session({ALICE_SESSION:?}) -> Ok (!)"),
    }
    checks.expect(
        err.as_ref().map(StateError::kind) == Some(ErrorKind::AccessDenied),
        "bob must not load alice's session",
    );
    checks.denied(
        bob.save_session(ALICE_SESSION, &json!({"overwritten": true})).await,
        "bob.save_session",
    );
    checks.denied(bob.list_checkpoints(ALICE_SESSION).await, "bob.list_checkpoints");
    checks.denied(bob.delete_session(ALICE_SESSION).await, "bob.delete_session");
    checks.expect(
        alice.load_session(ALICE_SESSION).await? == Some(alice_state.clone()),
        "alice's state must be unchanged by bob's denied requests",
    );
    println!();

    // 3. Read access granted, then revoked.
    println!("3. alice grants bob read access, then revokes it");
    alice.grant_access(ALICE_SESSION, bob_p.clone(), Access::Read).await?;
    let read = bob.load_session(ALICE_SESSION).await;
    println!(
        "  after grant_access(bob, Read): bob.load_session -> {}",
        if read.is_ok() { "Ok (reads it)" } else { "Err" }
    );
    checks.expect(
        matches!(&read, Ok(Some(v)) if *v == alice_state),
        format!("bob should read alice's state: {read:?}"),
    );
    checks.denied(
        bob.save_session(ALICE_SESSION, &json!({"overwritten": true})).await,
        "  bob.save_session (read only)",
    );
    let bob_sees = names(&bob.list_sessions().await?);
    println!("  bob.list_sessions() -> {bob_sees:?}");
    checks.expect(
        bob_sees == [ALICE_SESSION, BOB_SESSION],
        "with read access bob lists both sessions",
    );
    alice.revoke_access(ALICE_SESSION, &bob_p).await?;
    println!("  after revoke_access(bob):");
    checks.denied(bob.load_session(ALICE_SESSION).await, "  bob.load_session");
    println!();

    // 4. Listings per principal.
    println!("4. list_sessions shows each principal what they may read");
    let mut listings = Vec::new();
    for (who, handle) in
        [("alice", &alice), ("bob", &bob), ("ops (admin)", &ops), ("unscoped manager", &manager)]
    {
        let listed = names(&handle.list_sessions().await?);
        println!("  {who:<17} -> {listed:?}");
        listings.push(listed);
    }
    checks.expect(listings[0] == [ALICE_SESSION], "alice lists only her session");
    checks.expect(listings[1] == [BOB_SESSION], "bob lists only his session");
    checks.expect(listings[2] == [ALICE_SESSION, BOB_SESSION], "the administrator lists both");
    checks.expect(listings[3] == [ALICE_SESSION, BOB_SESSION], "the unscoped manager lists both");
    checks.expect(
        ops.load_session(BOB_SESSION).await? == Some(bob_state.clone()),
        "the administrator reads bob's",
    );
    manager.shutdown().await?;
    println!();

    // 5. Restart: the key is checked at start; data and access rules survive.
    println!("5. restart");
    match open(store, "tr0ub4dor&3", &ops_p).await {
        Err(e) => {
            println!("  with a wrong passphrase: {e}");
            checks.expect(
                e.kind() == ErrorKind::WrongKey,
                format!("a wrong passphrase must be WrongKey: {e:?}"),
            );
        }
        Ok(m) => {
            m.shutdown().await?;
            checks.expect(false, "a wrong passphrase opened the store");
        }
    }
    let manager = open(store, PASSPHRASE, &ops_p).await?;
    let alice = manager.for_principal(alice_p.clone());
    let bob = manager.for_principal(bob_p.clone());
    let reread = alice.load_session(ALICE_SESSION).await?;
    println!(
        "  with the right one: alice reads her state back: {}",
        reread == Some(alice_state.clone())
    );
    checks.expect(reread == Some(alice_state.clone()), "alice's state survives the restart");
    checks.denied(bob.load_session(ALICE_SESSION).await, "  bob.load_session after the restart");
    let cps = alice.list_checkpoints(ALICE_SESSION).await?;
    let cp = match cps.first() {
        Some(c) => alice.restore_checkpoint(&c.id).await?.map(|c| c.data),
        None => None,
    };
    checks.expect(cp == Some(alice_checkpoint.clone()), "alice's checkpoint survives the restart");
    manager.shutdown().await?;
    println!();

    // 6. Nothing readable on disk.
    println!("6. what is on disk");
    let files = files_under(store)?;
    let mut total = 0;
    for f in &files {
        let len = std::fs::metadata(f)?.len();
        total += len;
        println!("  {:>6} bytes  {}", len, f.strip_prefix(store)?.display());
    }
    let hits = scan(store, &[ALICE_MARKER, BOB_MARKER])?;
    for h in &hits {
        println!("  FOUND a marker in {h}");
    }
    checks.expect(hits.is_empty(), format!("{} plaintext marker hit(s) on disk", hits.len()));
    checks.expect(!files.is_empty(), "the store has files to scan");
    // The same search on an unencrypted store finds the marker: the scan does work.
    let control_dir = tempfile::Builder::new().prefix("mars-multi-tenant-plain-").tempdir()?;
    let plain = StateManager::start(FileStorageBackend::new(control_dir.path())?).await?;
    plain.save_session(ALICE_SESSION, &alice_state).await?;
    plain.shutdown().await?;
    let control_hits = scan(control_dir.path(), &[ALICE_MARKER])?;
    println!(
        "  control: the same search over an unencrypted store finds {} hit(s)",
        control_hits.len()
    );
    checks.expect(
        !control_hits.is_empty(),
        "the scan should find the marker in an unencrypted store",
    );
    if hits.is_empty() {
        println!(
            "  searched {} files, {total} bytes, for the markers in the states: no plaintext on disk: OK",
            files.len()
        );
    }
    println!();

    if !checks.failed.is_empty() {
        return Err(format!("{} check(s) failed", checks.failed.len()).into());
    }
    println!(
        "OK: two tenants and an administrator shared one encrypted store ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every regular file under `dir`, sorted.
fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where any of `markers` occurs: in a file's bytes or in a path under `dir`.
fn scan(dir: &Path, markers: &[&str]) -> std::io::Result<Vec<String>> {
    let mut hits = Vec::new();
    for f in files_under(dir)? {
        let bytes = std::fs::read(&f)?;
        for m in markers {
            if bytes.windows(m.len()).any(|w| w == m.as_bytes()) {
                hits.push(format!("{} (content: {m})", f.display()));
            }
            if f.to_string_lossy().contains(m) {
                hits.push(format!("{} (name: {m})", f.display()));
            }
        }
    }
    Ok(hits)
}
