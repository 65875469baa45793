//! Loopback servers for `bench/run`.
//!
//! - `bench_servers vendor ADDR`: a fast fake GA4 + Graph API. Counts GA4 events on
//!   `/g/collect` (one per non-empty body line, or one for an empty body: a lone event rides
//!   in the URL) and Meta events on `…/events` (the length of the `data` array), answers
//!   `204` / `200 {"events_received":N}`, and reports `GET /count` as JSON.
//! - `bench_servers baseline ADDR`: the baseline the benchmark compares tagrelay with: reads
//!   the request body and answers `204`, nothing else.
//!
//! Both print `listening on ADDR` once bound (`ADDR` may use port 0).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

#[derive(Default)]
struct Counts {
    ga4_events: AtomicU64,
    ga4_requests: AtomicU64,
    meta_events: AtomicU64,
    meta_requests: AtomicU64,
    other_requests: AtomicU64,
}

/// Only the length of `data` matters; the events themselves are skipped unparsed.
#[derive(serde::Deserialize)]
struct MetaBody {
    data: Vec<serde::de::IgnoredAny>,
}

async fn vendor(State(c): State<Arc<Counts>>, uri: Uri, body: Bytes) -> Response {
    let path = uri.path();
    if path.ends_with("/g/collect") {
        let lines = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
            .count() as u64;
        c.ga4_events.fetch_add(lines.max(1), Ordering::Relaxed);
        c.ga4_requests.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NO_CONTENT.into_response();
    }
    if path.ends_with("/events") {
        return match serde_json::from_slice::<MetaBody>(&body) {
            Ok(b) => {
                let n = b.data.len() as u64;
                c.meta_events.fetch_add(n, Ordering::Relaxed);
                c.meta_requests.fetch_add(1, Ordering::Relaxed);
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    format!(r#"{{"events_received":{n}}}"#),
                )
                    .into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("bad body: {e}\n")).into_response(),
        };
    }
    c.other_requests.fetch_add(1, Ordering::Relaxed);
    StatusCode::NOT_FOUND.into_response()
}

async fn count(State(c): State<Arc<Counts>>) -> Response {
    let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!(
            r#"{{"ga4_events":{},"ga4_requests":{},"meta_events":{},"meta_requests":{},"other_requests":{}}}"#,
            v(&c.ga4_events),
            v(&c.ga4_requests),
            v(&c.meta_events),
            v(&c.meta_requests),
            v(&c.other_requests)
        ),
    )
        .into_response()
}

/// Reading the body keeps the work per request comparable with a real endpoint.
async fn baseline(_body: Bytes) -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn serve(router: Router, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, router).await
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr) = match args.as_slice() {
        [m, a] => (m.as_str(), a.as_str()),
        _ => {
            eprintln!("usage: bench_servers vendor|baseline ADDR (e.g. 127.0.0.1:0)");
            return std::process::ExitCode::from(2);
        }
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address `{addr}`: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let router = match mode {
        "vendor" => {
            let counts = Arc::new(Counts::default());
            Router::new()
                .route("/count", get(count))
                .fallback(vendor)
                .with_state(counts)
        }
        "baseline" => Router::new().fallback(baseline),
        other => {
            eprintln!("unknown mode `{other}`: use vendor or baseline");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(router, addr)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
