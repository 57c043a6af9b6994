//! The `StorageBackend` conformance suite (`mars_state::testing::conformance`), one test per
//! contract clause, over the five configurations the crate ships: the memory backend, the
//! file backend with its write-ahead log (the default) and writing record files directly,
//! and the encryption wrapper over the memory and over the file backend.
//!
//! It uses the suite only through the public `mars_state::testing` module and
//! `mars_state::conformance_tests!`, as a crate with its own backend would, and runs it
//! over the kit's own `Faulty` wrapper too, whose idle rules must forward every call.

use mars_state::middleware::crypto::EncryptionLayer;
use mars_state::{EncryptionKey, FileStorageBackend, MemoryStorageBackend};

/// A fresh temporary directory for a file backend, kept alive beside it.
fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

fn layer() -> EncryptionLayer {
    EncryptionLayer::new(EncryptionKey::from_bytes([7; 32]))
}

mars_state::conformance_tests! {
    memory => MemoryStorageBackend::new(),
    file_log => {
        let dir = dir();
        (FileStorageBackend::new(dir.path()).unwrap(), dir)
    },
    file_direct => {
        let dir = dir();
        (FileStorageBackend::options().write_ahead_log(false).open(dir.path()).unwrap(), dir)
    },
    encrypted_memory => layer().wrap(MemoryStorageBackend::new()).await.unwrap(),
    encrypted_file => {
        let dir = dir();
        (layer().wrap(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap(), dir)
    },
    // The test kit's own wrapper, with rules that never fire: it forwards every call.
    faulty_idle => {
        use mars_state::testing::{FaultSwitch, Faulty, Hold, Method};
        Faulty::new(MemoryStorageBackend::new())
            .controlled_by(FaultSwitch::off())
            .fail(Method::Put, std::io::ErrorKind::Other, |_| true)
            .hold(Method::Get, &Hold::new(), |_| true)
            .hold_after(Method::Put, &Hold::new(), |_| true)
    },
}

/// `run_all` runs every clause in one go (the memory backend, as a smoke test of it).
#[tokio::test]
async fn run_all_over_memory() {
    mars_state::testing::conformance::run_all(|| async { MemoryStorageBackend::new() }).await;
    assert!(mars_state::testing::conformance::CLAUSES.len() >= 17);
}

/// The suite catches a backend that acknowledges puts without storing them.
#[tokio::test]
#[should_panic(expected = "assertion")]
async fn the_suite_catches_lost_puts() {
    use mars_state::testing::{Faulty, Method};
    let lossy = Faulty::new(MemoryStorageBackend::new()).lose(Method::Put, |_| true);
    mars_state::testing::conformance::put_then_get_round_trips(&lossy).await;
}

/// The suite catches a backend whose reads fail, naming the call.
#[tokio::test]
#[should_panic(expected = "get sessions/nobody.json failed")]
async fn the_suite_catches_failing_reads() {
    use mars_state::testing::{Faulty, Method};
    let failing = Faulty::new(MemoryStorageBackend::new()).fail(
        Method::Get,
        std::io::ErrorKind::Other,
        |_| true,
    );
    mars_state::testing::conformance::get_missing_is_none(&failing).await;
}
