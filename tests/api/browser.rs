//! Real-browser harness: Debian's Chromium driven through ChromeDriver (fantoccini), with
//! `*.example.test` mapped to 127.0.0.1 so pages and tagrelay get real first-party hostnames.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use fantoccini::{Client, ClientBuilder};

pub struct Browser {
    pub client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

/// ChromeDriver and, when dropped, every process it started: killing ChromeDriver alone
/// would leave Chromium running after the tests. (It stays in the test run's process group,
/// so Ctrl-C still reaches it.)
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let mut pids = Vec::new();
        descendants(self.0.id(), &mut pids);
        for pid in pids {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every process below `pid`, from Linux's `/proc/<pid>/task/<tid>/children`.
fn descendants(pid: u32, out: &mut Vec<u32>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            out.push(child);
            descendants(child, out);
        }
    }
}

/// Starts ChromeDriver on a port it picks itself (`--port=0`) and reads that port from the
/// line it prints ("… started successfully on port N."): no port is chosen here and then
/// perhaps taken by another test before ChromeDriver binds it.
fn start_driver(chromedriver: &Path) -> (Driver, u16) {
    let mut child = Command::new(chromedriver)
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let stdout = child.stdout.take().expect("stdout");
    let driver = Driver(child);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let port = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            other => panic!("ChromeDriver exited before saying its port: {other:?}"),
        };
        if let Some(rest) = line.split("started successfully on port ").nth(1) {
            break rest
                .trim_end_matches('.')
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("no port in {line:?}"));
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (driver, port)
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

impl Browser {
    pub async fn start() -> Browser {
        let chromium = which("chromium").expect(
            "Chromium is needed for the real-browser tests: run scripts/test (it installs Debian's chromium and chromium-driver)",
        );
        let chromedriver = which("chromedriver").expect(
            "ChromeDriver is needed for the real-browser tests: run scripts/test (it installs Debian's chromium-driver)",
        );
        let (driver, port) = start_driver(&chromedriver);
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                    "--host-resolver-rules=MAP *.example.test 127.0.0.1",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        });
        let caps = caps.as_object().cloned().expect("object");
        let url = format!("http://127.0.0.1:{port}");
        let mut last_err = String::new();
        for _ in 0..100 {
            // ChromeDriver speaks plain HTTP on loopback: no TLS stack needed.
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        _driver: driver,
                        _profile: profile,
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not start a Chromium session: {last_err}");
    }

    /// Evaluates JS and returns its JSON value.
    pub async fn eval(&self, js: &str) -> serde_json::Value {
        self.client.execute(js, vec![]).await.expect("script runs")
    }

    /// Polls a JS expression until it is truthy (panics after `secs`).
    pub async fn wait_js(&self, secs: u64, js: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.eval(&format!("return ({js});")).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for `{js}`"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

/// A tiny static web site on loopback: `(path, content type, body)`.
pub async fn site(pages: Vec<(&'static str, &'static str, String)>) -> SocketAddr {
    let mut router = axum::Router::new();
    for (path, ctype, body) in pages {
        router = router.route(
            path,
            axum::routing::get(move || {
                let body = body.clone();
                async move { ([(header::CONTENT_TYPE, ctype)], body).into_response() }
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// An npm package file installed by scripts/test into tests/browser/node_modules.
pub fn npm_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser/node_modules")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}): run scripts/test, which installs the browser tests' npm packages",
            path.display()
        )
    })
}
