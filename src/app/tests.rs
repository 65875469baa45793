//! The application over HTTP with faults only a unit test can inject.

use super::*;
use crate::config::{load_str, LoadedConfig, Source};

/// A failed fsync: the hit it was for and every later one get `503`, and `/readyz` fails
/// over HTTP until a restart (nothing written after it could be acknowledged safely).
#[tokio::test]
async fn after_a_failed_fsync_hits_get_503_and_readyz_fails_over_http() {
    let dir = tempfile::tempdir().unwrap();
    // Deliveries go nowhere (bound, not listening): this test is about taking hits.
    let nowhere = tokio::net::TcpSocket::new_v4().unwrap();
    nowhere.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[outbox]
path = "{}"
fsync = "batch"

[[clients]]
type = "ga4"

[[tags]]
name = "hook"
type = "http"
url = "http://{}/hook"
"#,
        dir.path().join("outbox").display(),
        nowhere.local_addr().unwrap()
    );
    let path = dir.path().join("tagrelay.toml");
    std::fs::write(&path, &text).unwrap();
    let loaded = LoadedConfig {
        config: load_str(&text, &path.display().to_string(), false).unwrap(),
        source: Source::File(path),
    };
    let store = crate::outbox::store::embedded::EmbeddedStore::open(&loaded.config.outbox)
        .await
        .unwrap();
    let pipeline = Pipeline::build(&loaded.config).unwrap();
    let app = Application::with_store(loaded, pipeline, store.clone())
        .await
        .unwrap();
    let (public, admin) = (app.public_addr().unwrap(), app.admin_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let hit = |id: &str| {
        http.get(format!(
            "http://{public}/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id={id}"
        ))
        .send()
    };
    let readyz = || http.get(format!("http://{admin}/readyz")).send();

    assert_eq!(readyz().await.unwrap().status(), 200);
    assert_eq!(hit("before").await.unwrap().status(), 204);

    store.fail_next_fsync();
    let r = hit("during").await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "the hit whose fsync failed is not acknowledged"
    );
    assert_eq!(
        r.text().await.unwrap(),
        "event storage failed; this server must be restarted\n"
    );
    let r = readyz().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "not ready\n");
    // The next fsync would succeed, but nothing is acknowledged after a failed one.
    let r = hit("after").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(readyz().await.unwrap().status(), 503);

    let _ = stop.send(());
    running.await.unwrap().unwrap();
    drop(nowhere);
}
