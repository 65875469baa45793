use std::sync::{Arc, Mutex};

use ::http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use super::mapping::Rfc3339;
use super::*;
use crate::event::{ConsentState, Event};

/// 2025-12-05T05:36:40Z
const NOW: i64 = 1_764_913_000_000;
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64)";
const REFRESH: &str = "1//refresh-token-secret";
const CLIENT_SECRET: &str = "client-secret-value";

fn authorized_user_file(dir: &std::path::Path, token_uri: &str) -> String {
    let path = dir.join("creds.json");
    std::fs::write(
        &path,
        json!({
            "type": "authorized_user",
            "client_id": "123.apps.googleusercontent.com",
            "client_secret": CLIENT_SECRET,
            "refresh_token": REFRESH,
            "token_uri": token_uri,
        })
        .to_string(),
    )
    .unwrap();
    path.display().to_string()
}

fn cfg(credentials_file: &str) -> GoogleAdsTagConfig {
    GoogleAdsTagConfig {
        name: "gads".into(),
        trigger: Default::default(),
        credentials_file: EnvString::plain(credentials_file),
        operating_account_id: "1234567890".into(),
        conversion_action_id: "987654321".into(),
        login_account_id: None,
        endpoint: "https://datamanager.googleapis.com".into(),
        validate_only: false,
        send_ip_address: true,
        batch_max: 2000,
        timeout_ms: 10_000,
        status_poll_interval_ms: 10_000,
        status_poll_max_ms: 60_000,
    }
}

fn tag_with(edit: impl FnOnce(&mut GoogleAdsTagConfig)) -> (GoogleAdsTag, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = authorized_user_file(dir.path(), "http://127.0.0.1:9/token");
    let mut c = cfg(&path);
    edit(&mut c);
    match GoogleAdsTag::from_config(&c) {
        Ok(t) => (t, dir),
        Err(p) => panic!("config rejected: {p:?}"),
    }
}

fn purchase() -> Event {
    let mut e = Event {
        event_name: "purchase".into(),
        event_id: "ev-1".into(),
        timestamp_ms: NOW - 10_500,
        source: "ga4".into(),
        user_agent: Some(UA.into()),
        ip_override: Some("203.0.113.7".into()),
        currency: Some("eur".into()),
        value: Some(49.9),
        transaction_id: Some("ORD-10023".into()),
        ..Default::default()
    };
    e.identity.gclid = Some("Cj0KCQiA-gclid".into());
    e.identity.wbraid = Some("ignored-when-gclid".into());
    e.user_data.email_address = Some("Jane.Doe+shop@Gmail.com".into());
    e.user_data.phone_number = Some("+1 415 555 0100".into());
    let a = &mut e.user_data.address;
    a.first_name = Some("Jane".into());
    a.last_name = Some("O'Doe".into());
    a.country = Some("us".into());
    a.postal_code = Some("94025".into());
    e.consent.ad_user_data = ConsentState::Granted;
    e.consent.ad_personalization = ConsentState::Denied;
    e
}

fn h(s: &str) -> String {
    crate::tags::match_keys::sha256_hex(s).as_str().to_owned()
}

#[test]
fn purchase_golden_request() {
    let (t, _dir) = tag_with(|c| c.login_account_id = Some("1112223333".into()));
    let enc = t.encode(&[purchase()], NOW);
    assert_eq!(enc.requests.len(), 1, "{enc:?}");
    let (req, idx) = &enc.requests[0];
    assert_eq!(idx, &vec![0]);
    assert_eq!(req.method, Method::POST);
    assert_eq!(
        req.url,
        "https://datamanager.googleapis.com/v1/events:ingest"
    );
    // No Authorization here: the dispatcher adds it from the tag's credential.
    assert_eq!(
        req.headers,
        vec![("content-type".to_string(), "application/json".to_string())]
    );
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(
        body,
        json!({
            "destinations": [{
                "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
                "productDestinationId": "987654321",
                "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "1112223333"}
            }],
            "encoding": "HEX",
            "events": [{
                "transactionId": "ORD-10023",
                "eventTimestamp": "2025-12-05T05:36:29.500Z",
                "userData": {"userIdentifiers": [
                    // gmail: `+shop` and the dots dropped (sha256sum of janedoe@gmail.com).
                    {"emailAddress": "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"},
                    {"phoneNumber": "40d3f4e02db27d66cf4cfdda506c2c945f115a7955cc8491dda98ce5beabcda0"},
                    {"address": {
                        "givenName": "81f8f6dde88365f3928796ec7aa53f72820b06db8664f5fe76a7eb13e24546a2",
                        "familyName": h("odoe"),
                        "regionCode": "US",
                        "postalCode": "94025"
                    }}
                ]},
                "consent": {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_DENIED"},
                "adIdentifiers": {"gclid": "Cj0KCQiA-gclid"},
                "currency": "EUR",
                "conversionValue": 49.9,
                "eventSource": "WEB",
                "eventDeviceInfo": {"userAgent": UA, "ipAddress": "203.0.113.7"}
            }]
        })
    );
}

#[test]
fn events_google_would_refuse_are_refused_here_with_the_cause() {
    let (t, _dir) = tag_with(|c| c.send_ip_address = false);
    let mut bare = purchase();
    bare.identity = Default::default();
    bare.user_data = Default::default();
    let mut no_currency = purchase();
    no_currency.currency = None;
    let mut wbraid_only = purchase();
    wbraid_only.identity.gclid = None;
    let enc = t.encode(&[bare, no_currency, wbraid_only], NOW);
    assert_eq!(enc.rejected.len(), 2, "{enc:?}");
    assert!(enc.rejected[0].1.contains("NO_IDENTIFIERS_PROVIDED"));
    assert!(enc.rejected[1].1.contains("currency is missing"));
    let body: Value = serde_json::from_slice(&enc.requests[0].0.body).unwrap();
    assert_eq!(
        body["events"][0]["adIdentifiers"],
        json!({"wbraid": "ignored-when-gclid"})
    );
    assert_eq!(
        body["events"][0]["eventDeviceInfo"],
        json!({"userAgent": UA})
    );
}

#[test]
fn validate_only_and_batches() {
    let (t, _dir) = tag_with(|c| {
        c.validate_only = true;
        c.batch_max = 2;
    });
    let events = [purchase(), purchase(), purchase()];
    let enc = t.encode(&events, NOW);
    assert_eq!(enc.requests.len(), 2);
    let body: Value = serde_json::from_slice(&enc.requests[0].0.body).unwrap();
    assert_eq!(body["validateOnly"], true);
    assert_eq!(body["events"].as_array().unwrap().len(), 2);
    // A dry run has no processing status to wait for.
    assert!(t.status_check(br#"{"requestId":"r-1"}"#).is_none());
}

#[test]
fn accepted_requests_are_followed_by_a_status_check() {
    let (t, _dir) = tag_with(|_| {});
    assert_eq!(
        t.classify(
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"requestId":"r 1/2"}"#
        ),
        Outcome::Delivered
    );
    let check = t.status_check(br#"{"requestId":"r 1/2"}"#).unwrap();
    assert_eq!(check.request.method, Method::GET);
    assert_eq!(
        check.request.url,
        "https://datamanager.googleapis.com/v1/requestStatus:retrieve?requestId=r%201%2F2"
    );
    assert_eq!(check.interval, Duration::from_secs(10));
    assert_eq!(check.max_wait, Duration::from_secs(60));
    assert!(t.status_check(b"{}").is_none());

    let status = |state: &str, counts: Value| {
        json!({"requestStatusPerDestination": [{
            "destination": {},
            "requestStatus": state,
            "errorInfo": {"errorCounts": counts},
            "eventsIngestionStatus": {"recordCount": "2"}
        }]})
        .to_string()
    };
    let classify =
        |body: String, events: usize| t.classify_status(StatusCode::OK, body.as_bytes(), events);
    assert!(matches!(
        classify(status("PROCESSING", json!([])), 2),
        StatusOutcome::Pending(_)
    ));
    assert_eq!(
        classify(status("SUCCESS", json!([])), 2),
        StatusOutcome::Final(Outcome::Delivered)
    );
    let too_old = json!([{"recordCount": "2", "reason": "PROCESSING_ERROR_REASON_EVENT_TOO_OLD"}]);
    assert_eq!(
        classify(status("FAILED", too_old.clone()), 2),
        StatusOutcome::Final(Outcome::Rejected {
            reason:
                "Google Data Manager processing FAILED: PROCESSING_ERROR_REASON_EVENT_TOO_OLD ×2"
                    .into()
        })
    );
    let internal = json!([{"recordCount": 1, "reason": "PROCESSING_ERROR_REASON_INTERNAL_ERROR"}]);
    assert!(matches!(
        classify(status("FAILED", internal), 1),
        StatusOutcome::Final(Outcome::Retry { .. })
    ));
    // Partial: pinned on the event only when it was alone in the request.
    let one = json!([{"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_INVALID_GCLID"}]);
    assert_eq!(
        classify(status("PARTIAL_SUCCESS", one.clone()), 1),
        StatusOutcome::Final(Outcome::Rejected {
            reason:
                "Google Data Manager processing failed: PROCESSING_ERROR_REASON_INVALID_GCLID ×1"
                    .into()
        })
    );
    assert_eq!(
        classify(status("PARTIAL_SUCCESS", one), 2),
        StatusOutcome::Final(Outcome::Delivered)
    );
    assert!(matches!(
        classify("not json".into(), 1),
        StatusOutcome::Pending(_)
    ));
}

#[test]
fn synchronous_errors_carry_googles_reason() {
    let (t, _dir) = tag_with(|_| {});
    let body = json!({"error": {
        "code": 400,
        "message": "There was a problem with the request.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT", "domain": "datamanager.googleapis.com"},
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                {"field": "events.events[0].currency", "description": "The currency code is not supported."}
            ]}
        ]
    }})
    .to_string();
    assert_eq!(
        t.classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), body.as_bytes()),
        Outcome::Rejected {
            reason:
                "Google Data Manager INVALID_ARGUMENT (HTTP 400): There was a problem with the \
                     request. [reason INVALID_ARGUMENT] [events.events[0].currency: The currency \
                     code is not supported.]"
                    .into()
        }
    );
    let mut h = HeaderMap::new();
    h.insert(::http::header::RETRY_AFTER, "30".parse().unwrap());
    assert!(matches!(
        t.classify(StatusCode::TOO_MANY_REQUESTS, &h, br#"{"error":{"status":"RESOURCE_EXHAUSTED"}}"#),
        Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(30)
    ));
    assert!(matches!(
        t.classify(StatusCode::UNAUTHORIZED, &HeaderMap::new(), b""),
        Outcome::Retry { .. }
    ));
    assert!(matches!(
        t.classify(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            br#"{"error":{"status":"PERMISSION_DENIED"}}"#
        ),
        Outcome::Rejected { .. }
    ));
}

#[test]
fn rfc3339_golden() {
    assert_eq!(Rfc3339(0).to_string(), "1970-01-01T00:00:00.000Z");
    assert_eq!(Rfc3339(NOW).to_string(), "2025-12-05T05:36:40.000Z");
    assert_eq!(
        Rfc3339(951_782_400_123).to_string(),
        "2000-02-29T00:00:00.123Z"
    );
    assert_eq!(
        Rfc3339(1_735_689_599_999).to_string(),
        "2024-12-31T23:59:59.999Z"
    );
}

#[test]
fn build_errors_name_the_key_and_never_quote_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir.path().join("missing.json").display().to_string());
    c.operating_account_id = "123-456-7890".into();
    c.conversion_action_id = "AW-1/abc".into();
    c.endpoint = "datamanager".into();
    c.batch_max = 2001;
    let err = GoogleAdsTag::from_config(&c).unwrap_err().join("\n");
    for key in [
        "operating_account_id:",
        "conversion_action_id:",
        "endpoint:",
        "batch_max:",
        "credentials_file: cannot read",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
    // A file that is not JSON, or of another type: said so, content never quoted.
    let path = dir.path().join("bad.json");
    std::fs::write(
        &path,
        format!("{{\"type\": \"authorized_user\", \"refresh_token\": 5, \"x\": \"{REFRESH}\"}}"),
    )
    .unwrap();
    let err = GoogleAdsTag::from_config(&cfg(&path.display().to_string()))
        .unwrap_err()
        .join("\n");
    assert!(
        err.contains("needs client_id, client_secret and refresh_token"),
        "{err}"
    );
    assert!(!err.contains(REFRESH), "{err}");
    std::fs::write(&path, "{\"type\": \"external_account\"}").unwrap();
    let err = GoogleAdsTag::from_config(&cfg(&path.display().to_string()))
        .unwrap_err()
        .join("\n");
    assert!(err.contains("`external_account` is not supported"), "{err}");
    let sa = include_str!("../../../tests/fixtures/google-service-account.json").replace(
        "-----BEGIN PRIVATE KEY-----\\nMII",
        "-----BEGIN PRIVATE KEY-----\\nXXX",
    );
    std::fs::write(&path, sa).unwrap();
    let err = GoogleAdsTag::from_config(&cfg(&path.display().to_string()))
        .unwrap_err()
        .join("\n");
    assert!(
        err.contains("token_uri") || err.contains("cannot be used"),
        "{err}"
    );
}

/// A token endpoint on loopback that records the forms it gets.
async fn token_server(answer: Value) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(move |body: String| {
            let log = log.clone();
            let answer = answer.clone();
            async move {
                log.lock().unwrap().push(body);
                axum::Json(answer)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/token"), seen)
}

#[tokio::test]
async fn authorized_user_tokens_come_from_the_files_token_uri_and_are_cached() {
    let (uri, seen) =
        token_server(json!({"access_token": "ya29.user-token", "expires_in": 3599})).await;
    let dir = tempfile::tempdir().unwrap();
    let cred = GoogleCredential::load(&authorized_user_file(dir.path(), &uri)).unwrap();
    for _ in 0..3 {
        let auth = cred.authorization().await.unwrap();
        assert_eq!(auth.expose(), "Bearer ya29.user-token");
    }
    let forms = seen.lock().unwrap().clone();
    assert_eq!(forms.len(), 1, "one fetch, then the cache: {forms:?}");
    let form: std::collections::HashMap<String, String> = crate::urlenc::pairs(&forms[0])
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["refresh_token"], REFRESH);
    assert_eq!(form["client_secret"], CLIENT_SECRET);
    assert!(!format!("{cred:?}").contains(REFRESH));
}

#[tokio::test]
async fn service_account_tokens_come_from_the_keys_token_uri() {
    let (uri, seen) =
        token_server(json!({"access_token": "ya29.sa-token", "expires_in": 3599})).await;
    let key = include_str!("../../../tests/fixtures/google-service-account.json")
        .replace("TOKEN_URI", &uri);
    let cred = GoogleCredential::from_json(&key).unwrap();
    assert_eq!(
        cred.authorization().await.unwrap().expose(),
        "Bearer ya29.sa-token"
    );
    let forms = seen.lock().unwrap().clone();
    assert_eq!(forms.len(), 1);
    let form: std::collections::HashMap<String, String> = crate::urlenc::pairs(&forms[0])
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    // The JWT asks for the Data Manager scope, addressed to the key's token_uri.
    let claims = form["assertion"].split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims.trim_end_matches('='))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["scope"], credentials::SCOPE);
    assert_eq!(claims["aud"], uri);
    assert!(!format!("{cred:?}").contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_refused_refresh_says_what_to_do_without_the_secret() {
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(|| async {
            (
                StatusCode::BAD_REQUEST,
                format!(r#"{{"error":"invalid_grant","error_description":"{REFRESH} expired"}}"#),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let cred = GoogleCredential::load(&authorized_user_file(
        dir.path(),
        &format!("http://{addr}/token"),
    ))
    .unwrap();
    let err = cred.authorization().await.unwrap_err();
    assert!(
        err.contains("HTTP 400") && err.contains("invalid_grant"),
        "{err}"
    );
    assert!(!err.contains(REFRESH), "{err}");
}

#[test]
fn secrets_of_the_file_are_redacted() {
    let (t, _dir) = tag_with(|_| {});
    assert_eq!(
        t.redact(&format!("x {REFRESH} y {CLIENT_SECRET}")),
        "x [redacted] y [redacted]"
    );
}

#[test]
fn a_click_id_in_the_page_url_counts_when_no_cookie_was_kept() {
    // Clients that set no cookies (Measurement Protocol, data client) never meet the keeper.
    let (t, _dir) = tag_with(|_| {});
    let mut e = purchase();
    e.identity = Default::default();
    e.user_data = Default::default();
    e.page_location = Some("https://shop.example.com/thanks?x=1&gbraid=0AAAA-gb".into());
    let enc = t.encode(&[e.clone()], NOW);
    let body: Value = serde_json::from_slice(&enc.requests[0].0.body).unwrap();
    assert_eq!(
        body["events"][0]["adIdentifiers"],
        json!({"gbraid": "0AAAA-gb"})
    );
    e.page_location = Some("https://shop.example.com/thanks?gclid=bad%20id".into());
    let enc = t.encode(&[e], NOW);
    assert!(
        enc.rejected[0].1.contains("NO_IDENTIFIERS_PROVIDED"),
        "{enc:?}"
    );
}
