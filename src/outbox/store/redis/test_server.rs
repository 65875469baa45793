//! Real `redis-server` / `redis-sentinel` processes for tests: each on a loopback port the
//! test picks, with its own directory and config file, killed when dropped. Shared by the
//! library's tests and `tests/api` (included there by path): std and `tempfile` only.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn binary(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: `scripts/test` installs it (apt-get install redis-server redis-sentinel)");
}

/// One server process.
pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
    sentinel: bool,
    _tmp: tempfile::TempDir,
}

impl RedisServer {
    /// A primary with AOF on, fsynced before each reply (`appendfsync always`: with the
    /// default `everysec` a crash of Redis itself may lose the last second or two of
    /// writes it acknowledged), plus `extra` config lines.
    pub fn start(extra: &[&str]) -> RedisServer {
        RedisServer::start_on(free_port(), extra)
    }

    /// [`start`](Self::start) on a given port.
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let tmp = tempfile::Builder::new()
            .prefix("tagrelay-redis")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut lines = vec![
            format!("port {port}"),
            "bind 127.0.0.1".into(),
            format!("dir {}", dir.display()),
            "appendonly yes".into(),
            "appendfsync always".into(),
            "save \"\"".into(),
            "protected-mode no".into(),
            format!("logfile {}", dir.join("redis.log").display()),
        ];
        lines.extend(extra.iter().map(|l| l.to_string()));
        let conf = dir.join("redis.conf");
        std::fs::write(&conf, lines.join("\n") + "\n").expect("write redis.conf");
        let mut s = RedisServer {
            port,
            dir,
            conf,
            child: None,
            sentinel: false,
            _tmp: tmp,
        };
        s.spawn();
        s
    }

    /// A replica of `primary`.
    pub fn replica_of(primary: &RedisServer, extra: &[&str]) -> RedisServer {
        let mut lines = vec![format!("replicaof 127.0.0.1 {}", primary.port)];
        lines.extend(extra.iter().map(|l| l.to_string()));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        RedisServer::start(&refs)
    }

    /// A sentinel watching `primary` as `master_name` (quorum 1, a failover within seconds).
    pub fn sentinel(primary: &RedisServer, master_name: &str) -> RedisServer {
        let tmp = tempfile::Builder::new()
            .prefix("tagrelay-sentinel")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let lines = [
            format!("port {port}"),
            "bind 127.0.0.1".into(),
            format!("dir {}", dir.display()),
            "protected-mode no".into(),
            format!("logfile {}", dir.join("sentinel.log").display()),
            format!(
                "sentinel monitor {master_name} 127.0.0.1 {} 1",
                primary.port
            ),
            format!("sentinel down-after-milliseconds {master_name} 1000"),
            format!("sentinel failover-timeout {master_name} 10000"),
            format!("sentinel parallel-syncs {master_name} 1"),
        ];
        let conf = dir.join("sentinel.conf");
        std::fs::write(&conf, lines.join("\n") + "\n").expect("write sentinel.conf");
        let mut s = RedisServer {
            port,
            dir,
            conf,
            child: None,
            sentinel: true,
            _tmp: tmp,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = binary(if self.sentinel {
            "redis-sentinel"
        } else {
            "redis-server"
        });
        let child = Command::new(bin)
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.try_cli(&["PING"]).is_some_and(|o| o.trim() == "PONG") {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "redis on port {} exited ({status}) before it was ready; its log:\n{}",
                        self.port,
                        self.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis on port {} not ready in 20 s; its log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        let name = if self.sentinel {
            "sentinel.log"
        } else {
            "redis.log"
        };
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis-cli -p PORT args…` (`None` if it could not connect).
    pub fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(binary("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} on port {} failed", self.port))
    }

    /// A crash: SIGKILL, no shutdown of any kind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, directory and config (a primary reloads its AOF).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
