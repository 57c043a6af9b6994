//! Helpers of `tests/postgres_backend.rs`: the server's URL, schemas and databases of a
//! test's own (dropped by a guard, also when the test fails), admin statements, and the
//! child processes of the migration, termination and crash tests (the crash tests' kill
//! loop and checks are `common::oracle`'s).

#![allow(dead_code)]

mod crash;
mod terminate;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

pub use crash::{CRASH_CHILD_ENV, crash_child, crash_private_cluster, sigkill_client_while_saving};
pub use terminate::terminated_connections_during_saves;

pub use crate::common::bounded;

/// The server the tests use.
pub fn test_url() -> String {
    std::env::var("MARS_STATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A random lower-case name with `prefix`.
pub fn random_name(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    let n = u64::from_le_bytes(bytes);
    format!("{prefix}_{n:016x}")
}

/// Runs `f` with a client of `url` on a runtime of its own, on a thread of its own (so it
/// works from `Drop` and from inside another runtime).
fn on_own_runtime<T: Send + 'static>(
    url: String,
    f: impl FnOnce(
        tokio_postgres::Client,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
    + Send
    + 'static,
) -> T {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url}: {e}"));
            tokio::spawn(conn);
            f(client).await
        })
    })
    .join()
    .unwrap_or_else(|_| panic!("an admin statement failed"))
}

/// Runs `sql` (simple protocol, any number of statements) as the test's admin user.
pub fn admin_sql_sync(sql: &str) {
    let sql = sql.to_owned();
    on_own_runtime(test_url(), move |c| {
        Box::pin(
            async move { c.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) },
        )
    })
}

pub async fn admin_sql(sql: &str) {
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || admin_sql_sync(&sql)).await.unwrap()
}

/// The rows of `sql` (first two columns as text; a missing second column as "").
pub fn admin_query_sync(sql: &str) -> Vec<(String, String)> {
    let sql = sql.to_owned();
    on_own_runtime(test_url(), move |c| {
        Box::pin(async move {
            c.simple_query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                        r.get(0).unwrap_or_default().to_owned(),
                        // A query of one column gives "" here.
                        r.try_get(1).ok().flatten().unwrap_or_default().to_owned(),
                    )),
                    _ => None,
                })
                .collect()
        })
    })
}

/// A schema name of a test's own; the schema (created by the backend) is dropped with the
/// guard.
pub struct Schema(String);

impl Schema {
    pub fn new() -> Self {
        Schema(random_name("mars_test"))
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0);
        // Not while panicking twice: a failed drop must not hide the test's own failure.
        let _ = std::panic::catch_unwind(|| admin_sql_sync(&sql));
    }
}

/// A database of a test's own, dropped (with its connections) with the guard.
pub struct Database(String);

impl Database {
    pub async fn new() -> Self {
        let name = random_name("mars_test_db");
        admin_sql(&format!("CREATE DATABASE \"{name}\"")).await;
        Database(name)
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The test URL with this database.
    pub fn url(&self) -> String {
        let base = test_url();
        let (head, tail) = match base.find('?') {
            Some(i) => base.split_at(i),
            None => (base.as_str(), ""),
        };
        let head = match head.rfind('/') {
            Some(i) if i > "postgres://".len() => &head[..i],
            _ => head,
        };
        format!("{head}/{}{tail}", self.0)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.0);
        let _ = std::panic::catch_unwind(|| admin_sql_sync(&sql));
    }
}

/// Set in a child's environment to the schema it must connect to.
pub const MIGRATE_CHILD_ENV: &str = "MARS_PG_MIGRATE_CHILD";
const START_AT_ENV: &str = "MARS_PG_START_AT_NANOS";

/// Starts this test binary as a child running `test`, connecting to `schema` at `start_at`.
pub fn spawn_migrate_child(test: &str, schema: &str, start_at: SystemTime) -> Child {
    let nanos = start_at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(MIGRATE_CHILD_ENV, schema)
        .env(START_AT_ENV, nanos.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The child: waits for the common start moment, connects (migrating), says so.
pub fn migrate_child(schema: &str) {
    let nanos: u128 = std::env::var(START_AT_ENV).unwrap().parse().unwrap();
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let backend = mars_state::PostgresStorageBackend::options()
            .schema(schema)
            .pool_size(2)
            .connect(&test_url())
            .await
            .unwrap_or_else(|e| panic!("connect failed: {e}"));
        drop(backend);
    });
    println!("connected");
}
