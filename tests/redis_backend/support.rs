//! Private `redis-server`s for the Redis tests: each on a free port, in a temporary
//! directory, with the AOF fsynced before every reply and `KEYS`/`SCAN` disabled; killed and
//! removed by its guard.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every awaited operation of a test finishes within this, or the test fails.
pub const LIMIT: Duration = Duration::from_secs(60);

pub async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("{what} took over {LIMIT:?}"))
}

/// A prefix no other test (or run) uses.
pub fn random_prefix() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    format!("t-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private `redis-server` child process; SIGKILLed and its directory removed on drop.
pub struct Server {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Server {
    /// Starts a durable server (appendonly yes, appendfsync always), or panics saying why.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts a durable server with `extra` arguments after the usual ones.
    pub fn start_with(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Server { child: None, port: 0, dir, extra };
        // A port can be taken between our probe and the server's bind: try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start a private redis-server; its log: {:?}", server.log());
    }

    /// Spawns the server on `self.port` and `self.dir`; true once it answers PING.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "no", "--logfile", "redis.log"])
            // Any use of the keyspace-wide listing commands fails.
            .args(["--rename-command", "KEYS", "", "--rename-command", "SCAN", ""])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server (is it on PATH?): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// SIGKILLs the server (no shutdown, no final fsync) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (it loads its AOF).
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "the private redis-server did not restart; see {:?}", self.log());
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        assert!(ok.unwrap().success(), "kill -{signal} {pid} failed");
    }

    /// A plain connection for the test's own commands.
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Closes every normal client connection but `admin` (`CLIENT KILL TYPE normal` skips its
/// caller); returns how many it closed.
pub async fn kill_clients(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let kill = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").to_owned();
    kill.query_async(admin).await.unwrap()
}

/// Whether a server on `port` answers PING (and has loaded its data).
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// Removes every key under `prefix:` on the server at `url` (test cleanup; SCAN is fine
/// here, on a server whose SCAN is enabled). Returns how many there were.
pub async fn remove_prefix(url: &str, prefix: &str) -> usize {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
            removed += n;
        }
        if next == 0 {
            return removed;
        }
        cursor = next;
    }
}
