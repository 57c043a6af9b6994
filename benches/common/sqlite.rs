//! SQLite's own engine as a yardstick (issue 15): what a durable 1 KB write costs when
//! SQLite does nothing but commit it, with the settings of the SQLite backend and of
//! LangGraph's `SqliteSaver` (WAL, `synchronous=FULL`: one fsync of the WAL per commit).

use std::path::Path;

use rusqlite::{Connection, params};

/// Commits to reach past the WAL's automatic checkpoint (1,000 pages, its default) before
/// timing, so that the timed commits write into WAL blocks that already exist, as a
/// long-running SQLite does.
const WARM_UP_COMMITS: u64 = 1_100;

/// A database of one table, `kv (key TEXT PRIMARY KEY, value BLOB)`, and the value its
/// upserts write.
pub struct Upserts {
    conn: Connection,
    value: Vec<u8>,
}

impl Upserts {
    /// Creates the database at `path` (WAL, `synchronous=FULL`) and warms it up, untimed:
    /// 1,100 upserts with `synchronous=OFF`, then one with `FULL`, whose fsync makes the
    /// WAL's blocks durable, then an fsync of the database file. `value` is the bytes each
    /// upsert writes (its first 8 replaced by a counter).
    pub fn open(path: &Path, value: &[u8]) -> Upserts {
        assert!(value.len() >= 8, "the value carries an 8-byte counter");
        let conn = Connection::open(path).unwrap();
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).unwrap();
        assert!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
        conn.execute_batch("CREATE TABLE kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL)")
            .unwrap();
        let mut upserts = Upserts { conn, value: value.to_vec() };
        upserts.conn.pragma_update(None, "synchronous", "OFF").unwrap();
        for i in 0..WARM_UP_COMMITS {
            upserts.upsert(u64::MAX - i);
        }
        upserts.conn.pragma_update(None, "synchronous", "FULL").unwrap();
        let level: i64 =
            upserts.conn.pragma_query_value(None, "synchronous", |row| row.get(0)).unwrap();
        assert_eq!(level, 2, "synchronous=FULL");
        upserts.upsert(u64::MAX - WARM_UP_COMMITS);
        // The database file's pages written by the warm-up's checkpoint, durable too.
        std::fs::File::open(path).unwrap().sync_all().unwrap();
        upserts
    }

    /// One upsert of the key `one` in a transaction of its own (autocommit), the value's
    /// first 8 bytes replaced by `i`: SQLite skips writing a row whose bytes did not
    /// change, so every call must write new ones (callers pass a different `i` each time).
    pub fn upsert(&mut self, i: u64) {
        self.value[..8].copy_from_slice(&i.to_le_bytes());
        let mut statement = self
            .conn
            .prepare_cached(
                "INSERT INTO kv (key, value) VALUES ('one', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .unwrap();
        assert_eq!(statement.execute(params![self.value]).unwrap(), 1);
    }
}
