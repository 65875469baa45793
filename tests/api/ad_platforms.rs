//! Google Ads (Data Manager API) and TikTok Events API tags end to end: GA4 hits into the real
//! server, a fake Google token endpoint, a fake Data Manager and a fake TikTok on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, FakeVendor, Received, TestApp};

pub const ACCESS_TOKEN: &str = "ya29.test-access-token";
const REFRESH_TOKEN: &str = "1//test-refresh-token";
const TIKTOK_TOKEN: &str = "tt-access-token-xyz";

/// A stand-in for Google's token endpoint: hands out `ACCESS_TOKEN` for a refresh-token grant.
pub async fn token_server() -> FakeVendor {
    let fake = FakeVendor::start().await;
    fake.respond(&[(
        200,
        &json!({"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"})
            .to_string(),
    )]);
    fake
}

/// An authorized-user credentials file whose `token_uri` is the fake token endpoint.
pub fn credentials_file(dir: &std::path::Path, token: &FakeVendor) -> String {
    let path = dir.join("google-credentials.json");
    std::fs::write(
        &path,
        json!({
            "type": "authorized_user",
            "client_id": "1234.apps.googleusercontent.com",
            "client_secret": "test-client-secret",
            "refresh_token": REFRESH_TOKEN,
            "token_uri": format!("{}/token", token.url()),
        })
        .to_string(),
    )
    .unwrap();
    path.display().to_string()
}

/// A stand-in for the Data Manager API: `events:ingest` answers a request id unless the body
/// holds `refuse_containing` (then Google's fast-fail 400); `requestStatus:retrieve` answers
/// `PROCESSING` once, then `PARTIAL_SUCCESS` (an invalid gclid) for requests holding
/// `fail_containing`, `SUCCESS` for the others.
#[derive(Clone)]
pub struct FakeDataManager {
    pub addr: SocketAddr,
    state: Arc<DmState>,
}

#[derive(Default)]
struct DmState {
    received: Mutex<Vec<Received>>,
    /// request id → (final status, polls so far)
    requests: Mutex<HashMap<String, (&'static str, u32)>>,
    refuse_containing: Mutex<Option<String>>,
    fail_containing: Mutex<Option<String>>,
}

impl FakeDataManager {
    pub async fn start() -> FakeDataManager {
        let state = Arc::new(DmState::default());
        let app = axum::Router::new()
            .route("/v1/events:ingest", axum::routing::post(ingest))
            .route("/v1/requestStatus:retrieve", axum::routing::get(status))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeDataManager { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn refuse_containing(&self, needle: &str) {
        *self.state.refuse_containing.lock().unwrap() = Some(needle.into());
    }

    pub fn fail_containing(&self, needle: &str) {
        *self.state.fail_containing.lock().unwrap() = Some(needle.into());
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, secs: u64, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let got = self.received();
            if pred(&got) {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "fake Data Manager did not get what was expected in {secs}s; got {got:#?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

fn record(state: &DmState, method: &str, uri: String, headers: &HeaderMap, body: &Bytes) {
    state.received.lock().unwrap().push(Received {
        method: method.parse().unwrap(),
        uri: uri.parse().unwrap(),
        headers: headers.clone(),
        body: body.clone(),
        at: std::time::Instant::now(),
        // This fake's answers depend on the request; no test here reads them back.
        status: 0,
    });
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {ACCESS_TOKEN}"))
}

async fn ingest(
    State(state): State<Arc<DmState>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    record(&state, "POST", "/v1/events:ingest".into(), &headers, &body);
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#,
        )
            .into_response();
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    if let Some(n) = state.refuse_containing.lock().unwrap().as_deref() {
        if text.contains(n) {
            let err = json!({"error": {
                "code": 400,
                "message": "There was a problem with the request.",
                "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                    {"field": "events.events[0].currency", "description": "The currency code is not supported."}
                ]}]
            }});
            return (StatusCode::BAD_REQUEST, err.to_string()).into_response();
        }
    }
    let fails = state
        .fail_containing
        .lock()
        .unwrap()
        .as_deref()
        .is_some_and(|n| text.contains(n));
    let mut requests = state.requests.lock().unwrap();
    let id = format!("req-{}", requests.len() + 1);
    requests.insert(
        id.clone(),
        (if fails { "PARTIAL_SUCCESS" } else { "SUCCESS" }, 0),
    );
    axum::Json(json!({"requestId": id})).into_response()
}

async fn status(
    State(state): State<Arc<DmState>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let id = q.get("requestId").cloned().unwrap_or_default();
    record(
        &state,
        "GET",
        format!("/v1/requestStatus:retrieve?requestId={id}"),
        &headers,
        &Bytes::new(),
    );
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut requests = state.requests.lock().unwrap();
    let Some((final_status, polls)) = requests.get_mut(&id) else {
        return (StatusCode::BAD_REQUEST, r#"{"error":{"status":"INVALID_ARGUMENT","details":[{"reason":"INVALID_REQUEST_ID"}]}}"#).into_response();
    };
    *polls += 1;
    let (state_now, errors) = match (*polls, *final_status) {
        (1, _) => ("PROCESSING", json!([])),
        (_, "PARTIAL_SUCCESS") => (
            "PARTIAL_SUCCESS",
            json!([{"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_INVALID_GCLID"}]),
        ),
        (_, s) => (s, json!([])),
    };
    axum::Json(json!({"requestStatusPerDestination": [{
        "destination": {"operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"}, "productDestinationId": "987654321"},
        "requestStatus": state_now,
        "errorInfo": {"errorCounts": errors},
        "eventsIngestionStatus": {"recordCount": "1"}
    }]}))
    .into_response()
}

pub fn tags_config(
    creds: &str,
    dm: &FakeDataManager,
    tiktok: &FakeVendor,
    extra_google: &str,
) -> String {
    format!(
        r#"
[[clients]]
type = "ga4"

[[tags]]
name = "google_ads"
type = "google_ads"
credentials_file = "{creds}"
operating_account_id = "1234567890"
conversion_action_id = "987654321"
endpoint = "{dm}"
status_poll_interval_ms = 20
{extra_google}
[tags.trigger]
events = ["purchase"]

[[tags]]
name = "tiktok"
type = "tiktok"
pixel_code = "C4TESTPIXEL"
access_token = "{TIKTOK_TOKEN}"
endpoint = "{tt}"
[tags.trigger]
events = ["purchase"]
"#,
        dm = dm.url(),
        tt = tiktok.url(),
    )
}

/// A GA4 hit; returns the `name=value` pairs of its Set-Cookie headers.
async fn ga4(app: &TestApp, query: &str, cookie: &str) -> Vec<(String, String)> {
    let mut req = app
        .http
        .get(app.url(&format!("/g/collect?v=2&tid=G-ADS1&cid=11.22&{query}")));
    if !cookie.is_empty() {
        req = req.header("cookie", cookie);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 204);
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| {
            let (nv, _) = v.to_str().ok()?.split_once(';')?;
            let (n, v) = nv.split_once('=')?;
            Some((n.to_owned(), v.to_owned()))
        })
        .collect()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn a_purchase_after_a_gclid_landing_reaches_google_ads_and_tiktok() {
    let token = token_server().await;
    let dm = FakeDataManager::start().await;
    let tiktok = FakeVendor::start().await;
    tiktok.respond(&[(
        200,
        r#"{"code":0,"message":"OK","request_id":"tt-1","data":{}}"#,
    )]);
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(creds_dir.path(), &token);
    let app = spawn_app(&tags_config(&creds, &dm, &tiktok, "")).await;

    // The landing page view carries the click ids; tagrelay answers with their cookies.
    let landing = "https://shop.example.com/landing?utm_source=ads&gclid=Cj0KCQiA-GCLID_1&ttclid=E.C.P.TTCLID-1";
    let set = ga4(&app, &format!("en=page_view&dl={}", enc(landing)), "").await;
    let cookie = |name: &str| set.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let gcl_aw = cookie("_gcl_aw").expect("_gcl_aw set");
    assert!(
        gcl_aw.starts_with("GCL.") && gcl_aw.ends_with(".Cj0KCQiA-GCLID_1"),
        "{gcl_aw}"
    );
    assert_eq!(cookie("ttclid").as_deref(), Some("E.C.P.TTCLID-1"));

    // Later in the session: a purchase on a page without click ids, the browser sending the
    // cookies it got (and the `_ttp` TikTok's pixel set).
    let jar: Vec<String> = set
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .chain(["_ttp=01K5Y2QHK3PRN35DHHJTBYE973_.tt.1".to_string()])
        .collect();
    let thanks = "https://shop.example.com/checkout/thanks";
    ga4(
        &app,
        &format!(
            "en=purchase&dl={}&uid=User-42&cu=EUR&epn.value=59.9&ep.transaction_id=T-1001&ep.event_id=ev-purchase-1",
            enc(thanks)
        ),
        &jar.join("; "),
    )
    .await;

    // Google: token from the file's token_uri, then ingest with the bearer, then the status.
    let got = dm
        .wait_for(10, |r| {
            r.iter()
                .any(|x| x.uri.path() == "/v1/requestStatus:retrieve")
        })
        .await;
    let ingest = got
        .iter()
        .find(|r| r.uri.path() == "/v1/events:ingest")
        .unwrap();
    assert_eq!(
        ingest.headers["authorization"],
        format!("Bearer {ACCESS_TOKEN}").as_str()
    );
    let body = ingest.json();
    assert_eq!(body["destinations"][0]["productDestinationId"], "987654321");
    assert_eq!(
        body["destinations"][0]["operatingAccount"]["accountId"],
        "1234567890"
    );
    let ev = &body["events"][0];
    assert_eq!(
        ev["adIdentifiers"],
        json!({"gclid": "Cj0KCQiA-GCLID_1"}),
        "{body}"
    );
    assert_eq!(ev["transactionId"], "T-1001", "the dedup key");
    assert_eq!(ev["conversionValue"], 59.9);
    assert_eq!(ev["currency"], "EUR");
    assert_eq!(ev["eventSource"], "WEB");
    assert_eq!(
        body["events"].as_array().unwrap().len(),
        1,
        "only the purchase"
    );
    let form = token.received()[0].body_text();
    assert!(form.contains("grant_type=refresh_token"), "{form}");
    assert!(
        form.contains("refresh_token=1%2F%2Ftest-refresh-token"),
        "{form}"
    );

    // TikTok: the click id and browser id from the cookies, the hashed user id, the event id
    // the pixel has (dedup).
    let got = tiktok.wait_for(10, |r| !r.is_empty()).await;
    assert_eq!(got[0].uri.path(), "/open_api/v1.3/event/track/");
    assert_eq!(got[0].headers["access-token"], TIKTOK_TOKEN);
    let body = got[0].json();
    assert_eq!(body["event_source"], "web");
    assert_eq!(body["event_source_id"], "C4TESTPIXEL");
    let d = &body["data"][0];
    assert_eq!(d["event"], "CompletePayment");
    assert_eq!(d["event_id"], "ev-purchase-1");
    assert_eq!(d["user"]["ttclid"], "E.C.P.TTCLID-1");
    assert_eq!(d["user"]["ttp"], "01K5Y2QHK3PRN35DHHJTBYE973_.tt.1");
    assert_eq!(
        d["user"]["external_id"],
        sha256("User-42"),
        "case kept, hashed"
    );
    assert_eq!(d["page"]["url"], thanks);
    assert_eq!(d["properties"]["order_id"], "T-1001");
    assert_eq!(d["properties"]["value"], 59.9);

    // Both delivered: nothing dead-lettered.
    assert!(crate::helpers::dead_letters(&app.config_path()).is_empty());
    // The access token never shows in the debug view's API or metrics.
    let metrics = app.admin_text("/metrics").await;
    assert!(!metrics.contains(ACCESS_TOKEN));
    app.stop().await;
}

#[tokio::test]
async fn google_failures_and_a_tiktok_error_code_end_as_dead_letters_with_the_vendors_reasons() {
    let token = token_server().await;
    let dm = FakeDataManager::start().await;
    // Processed later and partly refused: one event alone in its request is pinned.
    dm.fail_containing("T-BADCLICK");
    // Refused at once (fast-fail): the whole request, with Google's field violation.
    dm.refuse_containing("T-BADCURRENCY");
    let tiktok = FakeVendor::start().await;
    tiktok.respond(&[(
        200,
        r#"{"code":40002,"message":"Invalid value for event_source_id","request_id":"tt-9"}"#,
    )]);
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(creds_dir.path(), &token);
    let app = spawn_app(&tags_config(&creds, &dm, &tiktok, "batch_max = 1")).await;

    for (tx, id) in [
        ("T-GOOD", "ev-good"),
        ("T-BADCLICK", "ev-badclick"),
        ("T-BADCURRENCY", "ev-badcur"),
    ] {
        let page = "https://shop.example.com/thanks?gclid=Cj0-click";
        ga4(
            &app,
            &format!(
                "en=purchase&dl={}&cu=EUR&epn.value=10&ep.transaction_id={tx}&ep.event_id={id}",
                enc(page)
            ),
            "",
        )
        .await;
    }
    // 3 TikTok events, each refused with code 40002; 2 Google events refused.
    let dead = app.wait_for_dead_letters(5).await;
    let reason = |tag: &str, id: &str| -> String {
        dead.iter()
            .find(|d| d["tag"] == tag && d["event_id"] == id)
            .unwrap_or_else(|| panic!("no dead letter for {tag}/{id} in {dead:#?}"))["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let r = reason("google_ads", "ev-badclick");
    assert!(r.contains("PROCESSING_ERROR_REASON_INVALID_GCLID"), "{r}");
    let r = reason("google_ads", "ev-badcur");
    assert!(
        r.contains("INVALID_ARGUMENT") && r.contains("currency code is not supported"),
        "{r}"
    );
    assert!(
        dead.iter()
            .all(|d| !(d["tag"] == "google_ads" && d["event_id"] == "ev-good")),
        "{dead:#?}"
    );
    for id in ["ev-good", "ev-badclick", "ev-badcur"] {
        let r = reason("tiktok", id);
        assert!(
            r.contains("TikTok code 40002: Invalid value for event_source_id"),
            "{r}"
        );
        assert!(!r.contains(TIKTOK_TOKEN));
    }
    // The good Google request's status was checked and found SUCCESS.
    let polls = dm
        .received()
        .iter()
        .filter(|r| r.uri.path() == "/v1/requestStatus:retrieve")
        .count();
    assert!(
        polls >= 4,
        "two accepted requests, each PROCESSING then final: {polls}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_debug_view_shows_the_ingest_its_status_checks_and_the_click_cookies_without_secrets() {
    let token = token_server().await;
    let dm = FakeDataManager::start().await;
    let tiktok = FakeVendor::start().await;
    tiktok.respond(&[(200, r#"{"code":0,"message":"OK"}"#)]);
    let creds_dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(creds_dir.path(), &token);
    let app = spawn_app(&format!(
        "[admin]\ntrace_sampling = \"all\"\n{}",
        tags_config(&creds, &dm, &tiktok, "")
    ))
    .await;
    let page = "https://shop.example.com/thanks?gclid=Cj0-debug&ttclid=E.C.P.debug";
    ga4(
        &app,
        &format!("en=purchase&dl={}&ep.transaction_id=T-DBG", enc(page)),
        "",
    )
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let trace = loop {
        let all: Value = app
            .http
            .get(app.admin_url("/debug/api/traces?limit=10"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let t = all["traces"][0].clone();
        let state = |tag: &str| {
            t["tags"]
                .as_array()
                .and_then(|tags| tags.iter().find(|x| x["tag"] == tag))
                .map(|x| x["outcome"]["state"].clone())
        };
        if state("google_ads") == Some("delivered".into())
            && state("tiktok") == Some("delivered".into())
        {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered: {all}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let text = trace.to_string();
    for secret in [
        ACCESS_TOKEN,
        REFRESH_TOKEN,
        TIKTOK_TOKEN,
        "test-client-secret",
    ] {
        assert!(!text.contains(secret), "the trace leaks {secret}: {text}");
    }
    // The click cookies with their reason.
    let cookies = trace["cookies"].as_array().unwrap();
    let gcl = cookies.iter().find(|c| c["name"] == "_gcl_aw").unwrap();
    assert_eq!(gcl["reason"], "new");
    assert!(cookies
        .iter()
        .any(|c| c["name"] == "ttclid" && c["reason"] == "new"));
    // Google: the ingest (accepted, pending), a status check still processing, the final one.
    let google = trace["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["tag"] == "google_ads")
        .unwrap();
    let attempts = google["attempts"].as_array().unwrap();
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.len(), 3, "{attempts:#?}");
    assert!(outcomes[0].starts_with("pending: accepted"), "{outcomes:?}");
    assert!(outcomes[1].contains("PROCESSING"), "{outcomes:?}");
    assert_eq!(outcomes[2], "delivered");
    let ingest = &attempts[0];
    assert!(ingest["request"]["url"]
        .as_str()
        .unwrap()
        .ends_with("/v1/events:ingest"));
    assert!(ingest["response_body"]
        .as_str()
        .unwrap()
        .contains("requestId"));
    let headers = ingest["request"]["headers"].to_string();
    assert!(headers.contains("Bearer [redacted]"), "{headers}");
    assert!(attempts[2]["request"]["url"]
        .as_str()
        .unwrap()
        .contains("/v1/requestStatus:retrieve?requestId=req-1"));
    app.stop().await;
}
