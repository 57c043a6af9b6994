//! Several nodes on one shared store, in one process: managers over clones of one
//! `MemoryStorageBackend` (shared: it keeps leases and checks fences like the PostgreSQL and
//! Redis backends), each with its own node id. What the leases promise a user: a session is
//! written by one node at a time, other nodes read what it wrote and are told who owns it,
//! a clean shutdown or passivation hands it over at once, a node that stops (here: frozen,
//! every call of its backend held, as a SIGSTOPped process) is taken over after its lease
//! runs out and its late writes are refused, and recovery on the new owner says the run
//! was cut off. The same behaviours run over PostgreSQL and Redis in
//! `tests/postgres_backend.rs` and `tests/redis_backend.rs` where those features are on.

mod common;
mod nodes_common;

nodes_common::node_tests!(memory, || async {
    let store = std::sync::Arc::new(mars_state::MemoryStorageBackend::new());
    (store as std::sync::Arc<dyn mars_state::StorageBackend>, ())
});
