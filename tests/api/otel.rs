//! OpenTelemetry traces, received by a fake OTLP/HTTP collector on loopback that decodes what
//! the exporter sent (protobuf): a span per hit, continuing a trusted sender's trace; a span
//! per delivery attempt linked to the hits' spans, also after a restart (the trace context
//! is stored with the events); the sampling ratio; and nothing personal or secret in them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::helpers::{spawn_app, test_config, FakeVendor};
use crate::process;

/// A collector that keeps every export request it gets at `/v1/traces`.
#[derive(Clone)]
struct Collector {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = Collector {
            addr: listener.local_addr().unwrap(),
            bodies: Arc::default(),
        };
        let kept = c.bodies.clone();
        let router = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let kept = kept.clone();
                async move {
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    kept.lock().unwrap().push(body);
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        c
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| ExportTraceServiceRequest::decode(b.clone()).expect("OTLP protobuf"))
            .collect()
    }

    fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect()
    }

    /// Everything received, as text (protobuf keeps strings as they are).
    fn raw(&self) -> String {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the collector did not get {what} in 15 s: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Any> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
    match attr(s, key) {
        Some(Any::StringValue(v)) => Some(v),
        _ => None,
    }
}

fn int_attr(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key) {
        Some(Any::IntValue(v)) => Some(*v),
        _ => None,
    }
}

fn strs_attr(s: &Span, key: &str) -> Vec<String> {
    match attr(s, key) {
        Some(Any::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(|v| match &v.value {
                Some(Any::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// (trace id, span id) of a span, in hex.
fn id(s: &Span) -> (String, String) {
    (hex(&s.trace_id), hex(&s.span_id))
}

fn links(s: &Span) -> Vec<(String, String)> {
    s.links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect()
}

/// The spans of hits taken by the GA4 client.
fn hits(spans: &[Span]) -> Vec<&Span> {
    spans.iter().filter(|s| s.name == "hit ga4").collect()
}

fn deliveries<'a>(spans: &'a [Span], outcome: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.name == "deliver hook" && str_attr(s, "tagrelay.outcome") == Some(outcome))
        .collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Values that must never reach a trace: the visitor's data and the tag's secrets.
const PRIVATE: [&str; 10] = [
    "jane@example.org",
    "203.0.113.77",
    "user-4242",
    "987654",
    "5555551",
    "PersonalAgent",
    "111.222",
    "shop.example.com",
    "otel-secret-url-key-8080",
    "otel-secret-bearer-9090",
];

fn config(
    dir: &std::path::Path,
    collector: &Collector,
    vendor: &FakeVendor,
    trust: &str,
) -> String {
    test_config(
        dir,
        &format!(
            r#"
[telemetry]
otlp_endpoint = "{collector}"
trust_traceparent_from = ["{trust}"]

[[clients]]
type = "ga4"

[[tags]]
name = "hook"
type = "http"
url = "{vendor}/hook?key=${{TAGRELAY_TEST_OTEL_KEY}}"
headers = {{ Authorization = "Bearer ${{TAGRELAY_TEST_OTEL_TOKEN}}" }}

[[tags]]
name = "purchases"
type = "http"
url = "{vendor}/purchases"
[tags.trigger]
events = ["purchase"]
"#,
            collector = collector.url(),
            vendor = vendor.url(),
        ),
    )
}

const SECRETS: [(&str, &str); 2] = [
    ("TAGRELAY_TEST_OTEL_KEY", "otel-secret-url-key-8080"),
    ("TAGRELAY_TEST_OTEL_TOKEN", "otel-secret-bearer-9090"),
];

async fn send_hit(http: &reqwest::Client, url: String, traceparent: Option<&str>) {
    let mut r = http
        .get(url)
        .header("x-forwarded-for", "203.0.113.77")
        .header("user-agent", "Mozilla/5.0 (PersonalAgent 1.0)")
        .header(
            "cookie",
            "_ga=GA1.1.987654.321000; _fbp=fb.1.1700000000000.5555551",
        );
    if let Some(tp) = traceparent {
        r = r.header("traceparent", tp);
    }
    assert_eq!(r.send().await.unwrap().status(), 204);
}

fn hit_url(proc: &process::Proc, id: &str) -> String {
    proc.url(&format!(
        "/g/collect?v=2&tid=G-TEST1&cid=111.222&uid=user-4242&en=page_view&ep.event_id={id}\
         &dl=https%3A%2F%2Fshop.example.com%2Fcheckout%3Femail%3Djane%40example.org"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_and_their_deliveries_are_traced_and_linked_across_a_restart_with_nothing_private() {
    let (collector, vendor) = (Collector::start().await, FakeVendor::start().await);
    vendor.respond(&[(503, "busy")]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tagrelay.toml");
    let http = reqwest::Client::new();

    // First run: the vendor is down, so the events wait in the outbox.
    std::fs::write(
        &path,
        config(dir.path(), &collector, &vendor, "127.0.0.0/8"),
    )
    .unwrap();
    let mut proc = process::start_with(&path, &SECRETS, "info");
    let parent = format!("00-{TRACE}-{PARENT}-01");
    send_hit(&http, hit_url(&proc, "ev-a"), Some(&parent)).await;
    send_hit(&http, hit_url(&proc, "ev-b"), None).await;
    let spans = collector
        .wait_for("two hits and a failed delivery of each", |s| {
            hits(s).len() == 2 && {
                let linked: Vec<_> = deliveries(s, "retry")
                    .iter()
                    .flat_map(|d| links(d))
                    .collect();
                hits(s).iter().all(|h| linked.contains(&id(h)))
            }
        })
        .await;
    let first_hits: Vec<Span> = hits(&spans).into_iter().cloned().collect();
    // A trusted sender's trace is continued; without a traceparent a hit starts its own.
    let a = first_hits
        .iter()
        .find(|h| hex(&h.trace_id) == TRACE)
        .expect("the hit with the trusted traceparent continues its trace");
    assert_eq!(hex(&a.parent_span_id), PARENT);
    let b = first_hits.iter().find(|h| h.span_id != a.span_id).unwrap();
    assert_ne!(hex(&b.trace_id), TRACE);
    assert!(b.parent_span_id.is_empty());
    // What the hit was: client, events, what fired, the cookies set (names only), the status.
    assert_eq!(str_attr(a, "tagrelay.client"), Some("ga4"));
    assert_eq!(str_attr(a, "url.path"), Some("/g/collect"));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(204));
    assert_eq!(int_attr(a, "tagrelay.events"), Some(1));
    assert_eq!(strs_attr(a, "tagrelay.tags_fired"), ["hook"]);
    assert_eq!(strs_attr(a, "tagrelay.tags_not_fired"), ["purchases"]);
    let cookies = strs_attr(a, "tagrelay.cookies_set");
    assert!(cookies.iter().any(|c| c.starts_with("_ga:")), "{cookies:?}");
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.events[0].name, "event");
    let retry = deliveries(&spans, "retry")
        .into_iter()
        .find(|d| links(d).contains(&id(a)))
        .unwrap();
    assert_eq!(str_attr(retry, "tagrelay.retry_reason"), Some("http_5xx"));
    assert_eq!(int_attr(retry, "http.response.status_code"), Some(503));
    assert_eq!(str_attr(retry, "tagrelay.tag"), Some("hook"));
    assert_eq!(str_attr(retry, "server.address"), Some("127.0.0.1"));
    // It belongs to the hit's trace (a child of its span) as well as linking to it.
    assert_eq!(hex(&retry.trace_id), TRACE);
    assert_eq!(retry.parent_span_id, a.span_id);
    proc.signal("TERM");
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(20))
        .await
        .unwrap();
    assert!(status.success());

    // Second run, on the same outbox, trusting another network: the events of the first
    // run are delivered, and their deliveries link to the first run's hit spans.
    vendor.respond(&[(200, "{}")]);
    std::fs::write(&path, config(dir.path(), &collector, &vendor, "10.0.0.0/8")).unwrap();
    let mut proc = process::start_with(&path, &SECRETS, "info");
    send_hit(&http, hit_url(&proc, "ev-c"), Some(&parent)).await;
    let spans = collector
        .wait_for("the delivery of every hit's event", |s| {
            let linked: Vec<_> = deliveries(s, "delivered")
                .iter()
                .flat_map(|d| links(d))
                .collect();
            hits(s).len() == 3 && hits(s).iter().all(|h| linked.contains(&id(h)))
        })
        .await;
    let c = hits(&spans)
        .into_iter()
        .find(|h| !first_hits.iter().any(|f| f.span_id == h.span_id))
        .unwrap();
    assert_ne!(
        hex(&c.trace_id),
        TRACE,
        "an untrusted sender's trace is not continued"
    );
    assert!(c.parent_span_id.is_empty());
    proc.signal("TERM");
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(20))
        .await
        .unwrap();
    assert!(status.success());

    let resource = &collector.requests()[0].resource_spans[0].resource;
    let service = resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref()?.value.clone());
    assert_eq!(service, Some(Any::StringValue("tagrelay".into())));
    let raw = collector.raw();
    for private in PRIVATE {
        assert!(!raw.contains(private), "a trace carries `{private}`");
    }
}

/// `sampling_ratio = 0`: hits are not traced unless a trusted sender's sampled trace
/// continues, and deliveries only for traced hits' events.
#[tokio::test]
async fn the_sampling_ratio_decides_unless_a_trusted_sender_did() {
    let (collector, vendor) = (Collector::start().await, FakeVendor::start().await);
    let app = spawn_app(&format!(
        r#"
[telemetry]
otlp_endpoint = "{}"
sampling_ratio = 0.0
trust_traceparent_from = ["127.0.0.0/8"]

[[clients]]
type = "ga4"

[[tags]]
name = "hook"
type = "http"
url = "{}/hook"
"#,
        collector.url(),
        vendor.url()
    ))
    .await;
    let hit = |id: &str, tp: Option<String>| {
        let mut r = app.http.get(app.url(&format!(
            "/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id={id}"
        )));
        if let Some(tp) = tp {
            r = r.header("traceparent", tp);
        }
        r.send()
    };
    assert_eq!(hit("plain", None).await.unwrap().status(), 204);
    let unsampled = format!("00-{TRACE}-{PARENT}-00");
    assert_eq!(
        hit("unsampled", Some(unsampled)).await.unwrap().status(),
        204
    );
    let sampled = format!("00-{TRACE}-{PARENT}-01");
    assert_eq!(hit("sampled", Some(sampled)).await.unwrap().status(), 204);
    vendor.wait_for(10, |r| r.len() == 3).await;
    app.wait_until_drained().await;
    // Stopping sends what is queued.
    app.stop().await;
    let spans = collector.spans();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "hit ga4").count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "deliver hook").count(),
        1,
        "{names:?}"
    );
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == TRACE),
        "{spans:#?}"
    );
}

/// A collector that refuses the exports: the spans are dropped and counted, and said once
/// (WARN) rather than as an ERROR for every batch while it is down.
#[tokio::test]
async fn a_collector_that_refuses_costs_the_spans_not_the_log() {
    let collector = FakeVendor::start().await;
    collector.respond(&[(503, "overloaded")]);
    let dir = tempfile::tempdir().unwrap();
    let path = process::write_config(
        dir.path(),
        &format!(
            "[telemetry]\notlp_endpoint = \"{}\"\n[[clients]]\ntype = \"ga4\"\n",
            collector.url()
        ),
    );
    let proc = process::start(&path);
    let http = reqwest::Client::new();
    for round in 0..3 {
        let url = proc.url(&format!(
            "/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view&ep.event_id=r{round}"
        ));
        assert_eq!(http.get(url).send().await.unwrap().status(), 204);
        // Each round's span goes in an export of its own.
        collector.wait_for(15, |r| r.len() > round).await;
    }
    let dropped = || async {
        let text = http
            .get(proc.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("tagrelay_trace_spans_dropped_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while dropped().await.unwrap_or(0.0) < 3.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            dropped().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = proc.output();
    let warned: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("did not take a batch of trace spans"))
        .collect();
    assert_eq!(warned.len(), 1, "{out}");
    assert!(warned[0].contains("\"level\":\"WARN\""), "{}", warned[0]);
    assert!(!out.contains("\"level\":\"ERROR\""), "{out}");
    assert!(
        collector.received()[0].uri.path() == "/v1/traces",
        "{:?}",
        collector.received()[0].uri
    );
}
