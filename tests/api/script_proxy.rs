//! `type = "script_proxy"`: vendor scripts served first-party from a fake upstream on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::helpers::spawn_app;

const ETAG_V1: &str = "\"v1\"";

/// A script host that counts full and conditional fetches and can be told to fail, stall, or
/// hold its answers until released.
#[derive(Clone, Default)]
struct Upstream {
    addr: Option<SocketAddr>,
    seen: Arc<Mutex<Vec<(Uri, HeaderMap)>>>,
    full: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    /// While true, answers wait (after the request is counted in `seen`).
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            addr: Some(listener.local_addr().unwrap()),
            hold: Arc::new(tokio::sync::watch::Sender::new(false)),
            ..Upstream::default()
        };
        let router = axum::Router::new().fallback(serve).with_state(up.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        up
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr.unwrap())
    }

    fn seen(&self) -> Vec<(Uri, HeaderMap)> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait(&self, what: &str, pred: impl Fn(&Upstream) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pred(self) {
            assert!(Instant::now() < deadline, "upstream never saw {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn serve(State(up): State<Upstream>, uri: Uri, headers: HeaderMap) -> Response {
    up.seen.lock().unwrap().push((uri.clone(), headers.clone()));
    let _ = up.hold.subscribe().wait_for(|held| !*held).await;
    let delay = up.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if up.fail.load(Ordering::SeqCst) {
        up.failed.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
    }
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v == ETAG_V1)
    {
        up.not_modified.fetch_add(1, Ordering::SeqCst);
        return StatusCode::NOT_MODIFIED.into_response();
    }
    up.full.fetch_add(1, Ordering::SeqCst);
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    let body = format!("/* script {} */", uri.path_and_query().unwrap());
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=UTF-8"),
            (header::ETAG, ETAG_V1),
        ],
        if gzip { format!("GZ{body}") } else { body },
    )
        .into_response();
    if gzip {
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
    }
    r
}

fn proxy_toml(path: &str, upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[clients]]
type = "script_proxy"
path = "{path}"
upstream = "{upstream}"
allowed_query = ["id", "l"]
allowed_upstream_hosts = ["127.0.0.1"]
{extra}
"#
    )
}

fn cache_header(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-tagrelay-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn first_request_misses_then_hits_without_refetching_even_across_a_reload() {
    let up = Upstream::start().await;
    let app = spawn_app(&format!(
        "[[clients]]\ntype = \"ga4\"\n{}",
        proxy_toml("/lib/gt.js", &up.url("/gtag/js"), "")
    ))
    .await;
    let url = app.url("/lib/gt.js?id=G-TEST1");

    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_header(&r), "MISS");
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/javascript; charset=UTF-8");
    assert_eq!(h["vary"], "Accept-Encoding");
    assert!(h.get("content-encoding").is_none());
    let cc = h["cache-control"].to_str().unwrap();
    let max_age: u64 = cc
        .strip_prefix("public, max-age=")
        .unwrap_or_else(|| panic!("{cc}"))
        .parse()
        .unwrap();
    assert!((3590..=3600).contains(&max_age), "{cc}");
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert!(
        etag.starts_with('"') && etag.len() > 10 && etag != ETAG_V1,
        "{etag}"
    );
    assert_eq!(r.text().await.unwrap(), "/* script /gtag/js?id=G-TEST1 */");
    assert_eq!(up.full.load(Ordering::SeqCst), 1);

    for _ in 0..3 {
        let r = app.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(cache_header(&r), "HIT");
        assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
        assert_eq!(r.text().await.unwrap(), "/* script /gtag/js?id=G-TEST1 */");
    }
    let r = app.http.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_header(&r), "HIT");
    assert_eq!(
        r.headers()["content-length"],
        "/* script /gtag/js?id=G-TEST1 */"
            .len()
            .to_string()
            .as_str()
    );
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    app.state.reload().expect("same config reloads");
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(cache_header(&r), "HIT", "the cache outlives the reload");
    assert_eq!(up.full.load(Ordering::SeqCst), 1);
    assert_eq!(up.seen().len(), 1);

    // The hit path still works next to the proxy.
    let r = app
        .http
        .get(app.url("/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    app.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_cold_requests_make_one_upstream_fetch() {
    let up = Upstream::start().await;
    up.delay_ms.store(300, Ordering::SeqCst);
    let app = spawn_app(&proxy_toml("/s.js", &up.url("/gtm.js"), "")).await;
    let url = app.url("/s.js?id=GTM-1");
    let requests = (0..50).map(|_| {
        let (http, url) = (app.http.clone(), url.clone());
        async move {
            let r = http.get(&url).send().await.unwrap();
            let cache = cache_header(&r);
            (r.status(), cache, r.text().await.unwrap())
        }
    });
    let results = futures_util::future::join_all(requests).await;
    for (status, _, body) in &results {
        assert_eq!(*status, 200);
        assert_eq!(body, "/* script /gtm.js?id=GTM-1 */");
    }
    let misses = results.iter().filter(|(_, c, _)| c == "MISS").count();
    assert_eq!(misses, 1, "{results:?}");
    assert_eq!(up.full.load(Ordering::SeqCst), 1);
    assert_eq!(up.seen().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn stale_is_served_at_once_and_revalidated_in_the_background_with_if_none_match() {
    let up = Upstream::start().await;
    // The upstream's timeout is long: a proxy that waited for the upstream would hang here.
    let app = spawn_app(&proxy_toml(
        "/s.js",
        &up.url("/gtag/js"),
        "cache_ttl_secs = 1\ntimeout_ms = 600000",
    ))
    .await;
    let url = app.url("/s.js?id=G-1");
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(cache_header(&r), "MISS");
    let etag = r.headers()["etag"].clone();
    tokio::time::sleep(Duration::from_millis(1100)).await; // past cache_ttl_secs

    // The upstream holds its answer to the revalidation until the stale copy has been served.
    up.hold.send_replace(true);
    let r = tokio::time::timeout(Duration::from_secs(60), app.http.get(&url).send())
        .await
        .expect("stale must not wait for the upstream")
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_header(&r), "STALE");
    assert_eq!(r.headers()["cache-control"], "public, max-age=60");
    assert_eq!(r.headers()["etag"], etag);
    assert_eq!(r.text().await.unwrap(), "/* script /gtag/js?id=G-1 */");
    up.wait("the revalidation", |u| u.seen().len() == 2).await;
    assert_eq!(
        up.not_modified.load(Ordering::SeqCst),
        0,
        "served before the upstream answered"
    );
    up.hold.send_replace(false);

    up.wait("the 304", |u| u.not_modified.load(Ordering::SeqCst) == 1)
        .await;
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].1[header::IF_NONE_MATCH], ETAG_V1);
    assert_eq!(seen[1].0.query(), Some("id=G-1"));
    assert_eq!(up.full.load(Ordering::SeqCst), 1);

    // Stale until the proxy has stored the 304's refresh (no new fetch meanwhile), then a hit.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = app.http.get(&url).send().await.unwrap();
        if cache_header(&r) != "STALE" {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the 304 never refreshed the entry"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(cache_header(&r), "HIT", "the 304 refreshed the entry");
    assert_eq!(r.headers()["etag"], etag);
    assert_eq!(up.seen().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn upstream_failures_serve_stale_within_the_window_else_502() {
    let up = Upstream::start().await;
    // Bound but not listening: connections are refused, and the port stays ours.
    let closed_socket = tokio::net::TcpSocket::new_v4().unwrap();
    closed_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = closed_socket.local_addr().unwrap();
    let app = spawn_app(&format!(
        "{}{}{}",
        proxy_toml("/a.js", &up.url("/a.js"), "cache_ttl_secs = 1"),
        proxy_toml(
            "/b.js",
            &up.url("/b.js"),
            "cache_ttl_secs = 1\nstale_if_error_secs = 0"
        ),
        proxy_toml(
            "/c.js",
            &format!("http://{closed}/c.js"),
            "timeout_ms = 1000"
        ),
    ))
    .await;
    for path in ["/a.js", "/b.js"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(cache_header(&r), "MISS", "{path}");
    }
    up.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let r = app.http.get(app.url("/a.js")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_header(&r), "STALE");
    assert_eq!(r.text().await.unwrap(), "/* script /a.js */");
    up.wait("the failed revalidation", |u| {
        u.failed.load(Ordering::SeqCst) == 1
    })
    .await;
    // Until a request starts the next revalidation (which the proxy does only once the failed
    // one has been recorded), every answer is the stale copy.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.http.get(app.url("/a.js")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(cache_header(&r), "STALE", "still served after the failure");
        assert_eq!(r.text().await.unwrap(), "/* script /a.js */");
        if up
            .seen()
            .iter()
            .filter(|(u, _)| u.path() == "/a.js")
            .count()
            == 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no revalidation after the failed one"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.wait("the second failed revalidation", |u| {
        u.failed.load(Ordering::SeqCst) == 2
    })
    .await;

    // Past stale_if_error: the request waits for the upstream and gets its failure.
    let r = app.http.get(app.url("/b.js")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let text = r.text().await.unwrap();
    assert!(text.contains("upstream answered 500"), "{text}");

    // Cold and the upstream down: nothing to fall back on.
    let r = app.http.get(app.url("/a.js?id=new")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("upstream answered 500"));
    let r = app.http.get(app.url("/c.js")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(text.contains("cannot connect to upstream"), "{text}");

    // Back up: the cold key is fetched (the failure was not cached).
    up.fail.store(false, Ordering::SeqCst);
    let r = app.http.get(app.url("/a.js?id=new")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_header(&r), "MISS");
    app.stop().await;
    drop(closed_socket);
}

#[tokio::test]
async fn only_configured_paths_and_parameters_and_no_browser_identity_go_upstream() {
    let up = Upstream::start().await;
    let app = spawn_app(&proxy_toml("/lib/gt.js", &up.url("/gtag/js"), "")).await;

    for path in ["/lib/other.js", "/lib/gt.jsx", "/gtag/js?id=G-1"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = app.http.post(app.url("/lib/gt.js")).send().await.unwrap();
    assert_eq!(r.status(), 404, "only GET and HEAD are served");
    assert!(up.seen().is_empty());

    let r = app
        .http
        .get(app.url(
            "/lib/gt.js?uid=secret&id=G-1&gclid=abc&l=dataLayer&url=http%3A%2F%2Fevil.example",
        ))
        .header("cookie", "FPID=visitor; _ga=GA1.1.1.2; session=s3cr3t")
        .header("authorization", "Bearer x")
        .header("referer", "https://www.example.com/private?email=a@b.c")
        .header("user-agent", "Mozilla/5.0 Test")
        .header("x-forwarded-for", "198.51.100.7")
        .header("accept-language", "de-DE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_none());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let (uri, headers) = &seen[0];
    assert_eq!(uri.path(), "/gtag/js");
    assert_eq!(uri.query(), Some("id=G-1&l=dataLayer"));
    for h in [
        "cookie",
        "authorization",
        "referer",
        "x-forwarded-for",
        "accept-language",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(headers.get(h).is_none(), "{h} leaked upstream: {headers:?}");
    }
    assert_eq!(
        headers["user-agent"],
        format!("tagrelay/{}", env!("CARGO_PKG_VERSION")).as_str()
    );
    assert_eq!(headers["accept-encoding"], "identity");
    app.stop().await;
}

#[tokio::test]
async fn our_etag_gets_304_and_encodings_are_cached_apart() {
    let up = Upstream::start().await;
    let app = spawn_app(&proxy_toml("/s.js", &up.url("/gtag/js"), "")).await;
    let url = app.url("/s.js?id=G-1");
    let r = app.http.get(&url).send().await.unwrap();
    let etag = r.headers()["etag"].clone();

    let r = app
        .http
        .get(&url)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag);
    assert_eq!(r.headers()["vary"], "Accept-Encoding");
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .starts_with("public, max-age="));
    assert!(r.bytes().await.unwrap().is_empty());
    let r = app
        .http
        .get(&url)
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A gzip-accepting browser gets the upstream's gzip bytes, from their own cache entry.
    let r = app
        .http
        .get(&url)
        .header("accept-encoding", "gzip, deflate, br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_header(&r), "MISS");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz_etag = r.headers()["etag"].clone();
    assert_ne!(gz_etag, etag);
    assert_eq!(r.text().await.unwrap(), "GZ/* script /gtag/js?id=G-1 */");
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].1["accept-encoding"], "br, gzip");
    let r = app
        .http
        .get(&url)
        .header("accept-encoding", "br, gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(cache_header(&r), "HIT");
    assert_eq!(r.headers()["etag"], gz_etag);
    assert_eq!(up.full.load(Ordering::SeqCst), 2);
    app.stop().await;
}
