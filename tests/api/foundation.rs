//! Health, metrics, limits, reload.

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_on_both_listeners() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    for path in ["/healthz", "/healthy"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    let r = app.http.get(app.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.http.get(app.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The admin surface is not on the public listener.
    let r = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_format() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    app.http.get(app.url("/healthz")).send().await.unwrap();
    let r = app.http.get(app.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(
        text.contains("tagrelay_http_requests_total{route=\"health\",status=\"200\"}"),
        "{text}"
    );
    assert!(text.contains("tagrelay_http_request_duration_seconds_bucket"), "{text}");
    assert!(text.contains("tagrelay_build_info{version=\""), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn oversized_body_is_413_with_a_reason() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    let body = "x".repeat(70_000);
    let r = app
        .http
        .post(app.url("/g/collect?v=2&en=page_view&tid=G-1&cid=1.2"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("larger than 65536 bytes"));
    app.stop().await;
}

#[tokio::test]
async fn unclaimed_paths_are_404_with_a_reason() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    let r = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no client claims GET /nope"));
    app.stop().await;
}
