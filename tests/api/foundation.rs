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
    let r = app
        .http
        .get(app.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
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
    let r = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
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
    assert!(
        text.contains("tagrelay_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("tagrelay_build_info{version=\""), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_callers_id_is_kept() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    let hit = "/g/collect?v=2&en=page_view&tid=G-1&cid=1.2&dl=https%3A%2F%2Fshop.example.com%2F";
    let mut seen = Vec::new();
    for path in [hit, "/healthz", "/nothing-here"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        let id = r
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("no x-request-id on {path} ({})", r.status()))
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "{path}: {id:?} is not a UUID"
        );
        seen.push(id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "request ids repeat: {seen:?}");

    let r = app
        .http
        .get(app.url(hit))
        .header("x-request-id", "lb-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["x-request-id"], "lb-7f3a");

    // The same layer counts hits by route and status. (The recorder is shared by every test
    // in this binary, so only the series are checked, not their counts.)
    let text = app.admin_text("/metrics").await;
    assert!(
        text.contains("tagrelay_http_requests_total{route=\"ga4\",status=\"204\"}")
            && text.contains("tagrelay_http_requests_total{route=\"not_found\",status=\"404\"}"),
        "{text}"
    );
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
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("no client claims GET /nope"));
    app.stop().await;
}
