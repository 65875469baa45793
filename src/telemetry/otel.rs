//! OpenTelemetry traces over OTLP/HTTP (`[telemetry] otlp_endpoint`): one span per hit and one
//! per delivery attempt, linked to the spans of the hits whose events it carried.
//!
//! The link crosses the outbox: a sampled hit stamps its span's W3C `traceparent` on its
//! events (`Event::traceparent`), which the outbox stores with them, so the delivery of an
//! event read back after a restart still links to the hit that took it.
//!
//! Cost: with no endpoint there is no [`Otel`] and the hit path does nothing more than test
//! an `Option`. With one, a hit that is not sampled costs its ids and the sampling decision;
//! a sampled one fills its attributes, and ending it hands it to the batch processor's own
//! thread through a bounded channel (never blocking; a full queue drops spans), which encodes
//! and sends them. Nothing recorded on a span is personal data or a secret: no IP, user
//! agent, URL query, cookie value, user data or vendor URL path, and no free text from a
//! request or a vendor's answer — only names, counts, statuses and bounded labels.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use serde::Deserialize;

/// `[telemetry]`: where traces go, how many, and whose trace context is continued.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP base URL (`http://otel-collector:4318`); `/v1/traces` is appended, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` does. Empty: no traces.
    pub otlp_endpoint: String,
    /// Share of hits traced when no trusted parent decided (0.0 to 1.0).
    pub sampling_ratio: f64,
    /// Connecting addresses (CIDRs) whose W3C `traceparent` header is continued; from any
    /// other sender a hit starts a trace of its own.
    pub trust_traceparent_from: Vec<IpNet>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: String::new(),
            sampling_ratio: 1.0,
            trust_traceparent_from: Vec::new(),
        }
    }
}

impl TelemetryConfig {
    /// Problems, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            problems.push(format!(
                "telemetry.sampling_ratio: {} is not between 0.0 (no hit traced) and 1.0 (every hit)",
                self.sampling_ratio
            ));
        }
        if !self.otlp_endpoint.is_empty() {
            if let Err(why) = traces_url(&self.otlp_endpoint) {
                problems.push(format!("telemetry.otlp_endpoint: {why}"));
            }
        }
        problems
    }
}

/// The traces URL of an OTLP/HTTP base URL: `http://collector:4318` → `…/v1/traces`.
fn traces_url(base: &str) -> Result<String, String> {
    let uri: http::Uri = base
        .parse()
        .map_err(|e| format!("`{base}` is not a URL ({e}); write the collector's base URL, e.g. \"http://otel-collector:4318\""))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "`{base}` must be an http:// or https:// URL with a host, e.g. \"http://otel-collector:4318\""
        ));
    }
    if uri.query().is_some() {
        return Err(format!(
            "`{base}` has a query; give the base URL (`/v1/traces` is appended)"
        ));
    }
    Ok(format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// The running trace pipeline: a tracer whose spans go to a batch processor thread.
pub struct Otel {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    trusted: Vec<IpNet>,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel")
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

/// Spans a batch export carries at most, and how long the processor waits to fill one.
/// `OTEL_BSP_MAX_QUEUE_SIZE` and `OTEL_BSP_SCHEDULE_DELAY` override these.
const QUEUE_SPANS: usize = 8_192;
const EXPORT_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

impl Otel {
    /// Starts the exporter when `otlp_endpoint` is set; `Ok(None)` when it is not.
    pub fn start(cfg: &TelemetryConfig) -> Result<Option<Arc<Otel>>, String> {
        if cfg.otlp_endpoint.is_empty() {
            return Ok(None);
        }
        let url = traces_url(&cfg.otlp_endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(BlockingHttp::new()?)
            .with_endpoint(url)
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("telemetry.otlp_endpoint: cannot start the exporter: {e}"))?;
        let mut batch = BatchConfigBuilder::default();
        if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
            batch = batch.with_max_queue_size(QUEUE_SPANS);
        }
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            batch = batch.with_scheduled_delay(EXPORT_EVERY);
        }
        metrics::counter!("tagrelay_trace_spans_dropped_total").increment(0);
        let exporter = Reported {
            inner: exporter,
            last_logged: Mutex::new(None),
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch.build())
            .build();
        let mut resource = opentelemetry_sdk::Resource::builder()
            .with_attribute(KeyValue::new("service.version", super::build_info::VERSION));
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("tagrelay");
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling_ratio,
            ))))
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("tagrelay");
        Ok(Some(Arc::new(Otel {
            provider,
            tracer,
            trusted: cfg.trust_traceparent_from.clone(),
        })))
    }

    /// Sends what is queued and stops the exporter's thread. Blocks up to the export
    /// timeout: call it off the async runtime.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
            tracing::warn!(error = %e, "telemetry: traces still queued at shutdown may not have been sent");
        }
    }

    /// The span of one hit, a child of the sender's `traceparent` when the connecting
    /// address is trusted, else the root of a new trace.
    pub fn hit(&self, peer: IpAddr, headers: &http::HeaderMap) -> HitSpan {
        let builder = self.tracer.span_builder("hit").with_kind(SpanKind::Server);
        let trusted = self.trusted.iter().any(|net| net.contains(&peer))
            && headers.contains_key("traceparent");
        let span = if trusted {
            let parent = TraceContextPropagator::new().extract(&Headers(headers));
            self.tracer.build_with_context(builder, &parent)
        } else {
            self.tracer.build_with_context(builder, &Context::new())
        };
        HitSpan { span }
    }

    /// The span of one request to a vendor (`what`: `deliver` or `status_check`), when at
    /// least one of the events it carries came from a sampled hit (`traceparents`, as the
    /// events keep them). It is a child of the first such hit's span and links to each.
    pub fn delivery<'a>(
        &self,
        what: &'static str,
        traceparents: impl IntoIterator<Item = &'a str>,
    ) -> Option<DeliverySpan> {
        let mut links: Vec<Link> = Vec::new();
        for tp in traceparents {
            let Some(sc) = parse_traceparent(tp) else {
                continue;
            };
            if !links.iter().any(|l| l.span_context == sc) {
                links.push(Link::with_context(sc));
            }
        }
        let parent = Context::new().with_remote_span_context(links.first()?.span_context.clone());
        let span = self
            .tracer
            .span_builder(what)
            .with_kind(SpanKind::Client)
            .with_links(links)
            .start_with_context(&self.tracer, &parent);
        span.is_recording().then_some(DeliverySpan { span, what })
    }
}

/// A W3C `traceparent` of a sampled span, as a hit's events keep it.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    let cx = TraceContextPropagator::new().extract(&One(value));
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then_some(sc)
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Array(Array::String(
        items
            .into_iter()
            .map(|s| StringValue::from(s.to_owned()))
            .collect(),
    ))
}

/// One hit's span. Ends (and is queued for export) when dropped.
pub struct HitSpan {
    span: opentelemetry_sdk::trace::Span,
}

/// What a hit made of its events, for its span.
pub struct HitEvent<'a> {
    pub name: &'a str,
    /// The tags that fired for it, in config order.
    pub fired: &'a [Arc<str>],
}

impl HitSpan {
    /// Whether this hit is sampled (then its attributes are worth filling).
    pub fn is_recording(&self) -> bool {
        self.span.is_recording()
    }

    /// The span's W3C `traceparent`, for the hit's events to carry through the outbox;
    /// `None` when the hit is not sampled.
    pub fn traceparent(&self) -> Option<String> {
        let sc = self.span.span_context();
        (self.span.is_recording() && sc.is_sampled()).then(|| {
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            )
        })
    }

    /// The request's method and path (never its query: it carries visitors' ids and pages).
    pub fn record_request(&mut self, method: &http::Method, path: &str) {
        if self.is_recording() {
            self.span.set_attributes([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("url.path", path.to_owned()),
            ]);
        }
    }

    /// The events and what the triggers decided: per event a span event with its name and
    /// the tags that fired; on the span, counts, the tags that fired for some event and those
    /// that fired for none, and the names of the cookies set (never their values).
    pub fn record_events<'a>(
        &mut self,
        events: &[HitEvent<'_>],
        tags: impl Iterator<Item = &'a str>,
        cookies: impl Iterator<Item = (&'a str, &'static str)>,
    ) {
        if !self.is_recording() {
            return;
        }
        let mut fired: Vec<&str> = Vec::new();
        let mut deliveries = 0i64;
        for e in events {
            deliveries += e.fired.len() as i64;
            for t in e.fired {
                if !fired.contains(&&**t) {
                    fired.push(t);
                }
            }
            self.span.add_event(
                "event",
                vec![
                    KeyValue::new("tagrelay.event_name", e.name.to_owned()),
                    KeyValue::new("tagrelay.tags_fired", strings(e.fired.iter().map(|t| &**t))),
                ],
            );
        }
        let not_fired: Vec<&str> = tags.filter(|t| !fired.contains(t)).collect();
        let cookies: Vec<String> = cookies.map(|(name, why)| format!("{name}:{why}")).collect();
        self.span.set_attributes([
            KeyValue::new("tagrelay.events", events.len() as i64),
            KeyValue::new("tagrelay.deliveries", deliveries),
            KeyValue::new("tagrelay.tags_fired", strings(fired)),
            KeyValue::new("tagrelay.tags_not_fired", strings(not_fired)),
            KeyValue::new(
                "tagrelay.cookies_set",
                strings(cookies.iter().map(String::as_str)),
            ),
        ]);
    }

    /// How the hit ended: the client that claimed it, the status, and for a refused hit the
    /// metric's bounded reason (never the error text, which may quote the request).
    pub fn record_outcome(
        &mut self,
        client: Option<&'static str>,
        status: u16,
        refused: Option<&'static str>,
    ) {
        if !self.is_recording() {
            return;
        }
        if let Some(c) = client {
            self.span.set_attribute(KeyValue::new("tagrelay.client", c));
            self.span.update_name(format!("hit {c}"));
        }
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(reason) = refused {
            self.span
                .set_attribute(KeyValue::new("tagrelay.refused", reason));
        }
        if status >= 500 {
            self.span
                .set_status(Status::error(refused.unwrap_or("server error")));
        }
    }
}

/// One delivery attempt's span (only for attempts carrying a sampled hit's event). Ends when
/// dropped.
pub struct DeliverySpan {
    span: opentelemetry_sdk::trace::Span,
    what: &'static str,
}

impl DeliverySpan {
    /// The tag, its type, how many events the request carries, which attempt this is, and
    /// the vendor's host (never the URL's path or query, which can hold keys).
    pub fn record_request(
        &mut self,
        tag: &str,
        tag_type: &'static str,
        events: usize,
        attempt: u32,
        method: &http::Method,
        url: &str,
    ) {
        let host = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default();
        self.span.update_name(format!("{} {tag}", self.what));
        self.span.set_attributes([
            KeyValue::new("tagrelay.tag", tag.to_owned()),
            KeyValue::new("tagrelay.tag_type", tag_type),
            KeyValue::new("tagrelay.events", events as i64),
            KeyValue::new("tagrelay.attempt", i64::from(attempt)),
            KeyValue::new("http.request.method", method.as_str().to_owned()),
            KeyValue::new("server.address", host),
        ]);
    }

    /// The vendor's status (none for a network error or timeout) and the outcome:
    /// `delivered`, `pending`, `retry` (with its bounded reason, e.g. `http_5xx`) or
    /// `rejected`.
    pub fn record_outcome(
        &mut self,
        status: Option<u16>,
        outcome: &'static str,
        reason: Option<&'static str>,
    ) {
        if let Some(s) = status {
            self.span
                .set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        self.span
            .set_attribute(KeyValue::new("tagrelay.outcome", outcome));
        if let Some(r) = reason {
            self.span
                .set_attribute(KeyValue::new("tagrelay.retry_reason", r));
        }
        if matches!(outcome, "retry" | "rejected") {
            self.span
                .set_status(Status::error(reason.unwrap_or(outcome)));
        }
    }
}

/// The exporter, with failures counted (`tagrelay_trace_spans_dropped_total`) and logged at
/// most once a minute: the batch processor would log an ERROR for every failed batch, every
/// second while a collector is down. The spans of a failed export are dropped (the processor
/// does not retry), which is all a trace can lose.
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    last_logged: Mutex<Option<Instant>>,
}

impl<E: SpanExporter> SpanExporter for Reported<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        if let Err(e) = self.inner.export(batch).await {
            metrics::counter!("tagrelay_trace_spans_dropped_total").increment(n);
            let now = Instant::now();
            if let Ok(mut last) = self.last_logged.lock() {
                if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                    *last = Some(now);
                    tracing::warn!(
                        spans = n,
                        error = %e,
                        "telemetry: the collector did not take a batch of trace spans; they are dropped (tagrelay_trace_spans_dropped_total counts them; logged at most once a minute)"
                    );
                }
            }
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Sends the exporter's requests with the project's reqwest (rustls), blocking: the batch
/// processor runs each export on its own thread, away from the async runtimes.
#[derive(Debug)]
struct BlockingHttp(reqwest::blocking::Client);

impl BlockingHttp {
    fn new() -> Result<Self, String> {
        // A blocking client starts (and, dropped, stops) a runtime of its own, which a thread
        // already inside tokio must not do: build it on a thread of its own.
        std::thread::spawn(|| {
            reqwest::blocking::Client::builder()
                .timeout(EXPORT_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
        })
        .join()
        .map_err(|_| "telemetry: building the HTTP client panicked".to_owned())?
        .map(BlockingHttp)
        .map_err(|e| format!("telemetry: cannot build the HTTP client: {e}"))
    }
}

/// The most of a collector's answer read (it says little: a status and maybe a partial
/// success note).
const MAX_ANSWER: u64 = 64 * 1024;

#[async_trait::async_trait]
impl HttpClient for BlockingHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        use std::io::Read;
        let (parts, body) = request.into_parts();
        let resp = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()
            .map_err(|e| e.without_url())?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut answer = Vec::new();
        resp.take(MAX_ANSWER).read_to_end(&mut answer)?;
        let mut out = http::Response::builder()
            .status(status)
            .body(Bytes::from(answer))?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_is_the_base_url_and_v1_traces() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otlp.example.com/otlp/").unwrap(),
            "https://otlp.example.com/otlp/v1/traces"
        );
        for bad in ["collector:4318", "ftp://x/", "http://x/?a=1", "not a url"] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = TelemetryConfig {
            otlp_endpoint: "localhost:4318".into(),
            sampling_ratio: 1.5,
            ..TelemetryConfig::default()
        };
        let p = cfg.validate().join("\n");
        assert!(p.contains("telemetry.sampling_ratio: 1.5"), "{p}");
        assert!(
            p.contains("telemetry.otlp_endpoint: `localhost:4318`"),
            "{p}"
        );
        assert!(TelemetryConfig::default().validate().is_empty());
    }

    #[test]
    fn only_a_sampled_valid_traceparent_links() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote());
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
