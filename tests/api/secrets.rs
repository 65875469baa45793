//! Secrets (`${VAR}` values, tokens, API secrets) never reach the real binary's logs, the
//! output of `tagrelay check`, or the outbox tools, even when vendors fail, echo them back,
//! or a reload is refused.

use std::path::Path;
use std::process::Command;

use crate::helpers::{test_config, FakeVendor};
use crate::process::{self, BIN};

/// Every secret the configuration below holds, each only in the environment.
const SECRETS: [(&str, &str); 7] = [
    (
        "TAGRELAY_TEST_META_TOKEN",
        "EAAB-logsecret-meta-token-31415",
    ),
    ("TAGRELAY_TEST_META_APP_SECRET", "logsecret-meta-app-27182"),
    ("TAGRELAY_TEST_GA4_API_SECRET", "logsecret-ga4-api-16180"),
    ("TAGRELAY_TEST_HOOK_TOKEN", "logsecret-hook-bearer-14142"),
    ("TAGRELAY_TEST_HOOK_KEY", "logsecret-hook-urlkey-17320"),
    ("TAGRELAY_TEST_MP_SECRET", "logsecret-mp-client-22360"),
    ("TAGRELAY__ADMIN__TOKEN", "logsecret-admin-token-26457"),
];

fn assert_no_secret(text: &str, what: &str) {
    for (var, secret) in SECRETS {
        // Whole, and any distinctive part of it (a message cut short, a prefix echoed).
        let tail = &secret[secret.len() - 11..];
        assert!(
            !text.contains(secret) && !text.contains(tail),
            "{what} shows the value of {var}:\n{text}"
        );
    }
}

fn tags(meta: &FakeVendor, ga4: &FakeVendor, hook: &FakeVendor, refused: &str) -> String {
    format!(
        r#"
[[clients]]
type = "ga4"

[[clients]]
type = "measurement_protocol"
api_secrets = ["${{TAGRELAY_TEST_MP_SECRET}}"]

[[tags]]
name = "meta"
type = "meta_capi"
endpoint = "{meta}"
pixel_id = "31415"
access_token = "${{TAGRELAY_TEST_META_TOKEN}}"
app_secret = "${{TAGRELAY_TEST_META_APP_SECRET}}"

[[tags]]
name = "ga4"
type = "ga4"
mode = "measurement_protocol"
endpoint = "{ga4}"
measurement_id = "G-LOGS1"
api_secret = "${{TAGRELAY_TEST_GA4_API_SECRET}}"

[[tags]]
name = "hook"
type = "http"
url = "{hook}/hook"
headers = {{ Authorization = "Bearer ${{TAGRELAY_TEST_HOOK_TOKEN}}" }}

[[tags]]
name = "down"
type = "http"
url = "http://{refused}/in?key=${{TAGRELAY_TEST_HOOK_KEY}}"
timeout_ms = 1000
"#,
        meta = meta.url(),
        ga4 = ga4.url(),
        hook = hook.url(),
    )
}

fn run(args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(SECRETS)
        .output()
        .expect("run tagrelay");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_check_or_the_outbox_tools_when_vendors_fail() {
    let (meta, ga4, hook) = (
        FakeVendor::start().await,
        FakeVendor::start().await,
        FakeVendor::start().await,
    );
    let [(_, meta_token), (_, _), (_, ga4_secret), (_, hook_token), _, (_, mp_secret), _] = SECRETS;
    // Vendors that fail and echo what they were sent, as proxies and error pages do.
    meta.respond(&[(
        400,
        &format!(
            r#"{{"error":{{"message":"Invalid OAuth access token - Cannot parse access token {meta_token}","type":"OAuthException","code":190,"fbtrace_id":"AbC"}}}}"#
        ),
    )]);
    ga4.respond(&[
        (503, &format!("overloaded; retry api_secret={ga4_secret}")),
        (400, &format!("bad request: api_secret={ga4_secret}")),
    ]);
    hook.respond(&[
        (
            500,
            &format!("crashed on Authorization: Bearer {hook_token}"),
        ),
        (403, &format!("token {hook_token} is not allowed")),
    ]);
    // A port that refuses connections: network errors name no URL (it holds a key).
    let refused = tokio::net::TcpSocket::new_v4().unwrap();
    refused.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused_addr = refused.local_addr().unwrap().to_string();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tagrelay.toml");
    let good = test_config(dir.path(), &tags(&meta, &ga4, &hook, &refused_addr));
    std::fs::write(&config, &good).unwrap();
    let mut proc = process::start_with(&config, &SECRETS, "debug");

    let http = reqwest::Client::new();
    let r = http
        .get(proc.url(
            "/g/collect?v=2&tid=G-LOGS1&cid=1.2&en=purchase&cu=EUR&epn.value=9&dl=https%3A%2F%2Fshop.example.com%2F",
        ))
        .header("user-agent", "Mozilla/5.0 Test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let mp = serde_json::json!({"client_id": "1.2", "events": [{"name": "refund"}]});
    let r = http
        .post(proc.url(&format!(
            "/mp/collect?measurement_id=G-LOGS1&api_secret={mp_secret}"
        )))
        .json(&mp)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .post(proc.url(&format!(
            "/mp/collect?measurement_id=G-LOGS1&api_secret={mp_secret}x"
        )))
        .json(&mp)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Meta's invalid token is logged as an error; three tags end in dead letters.
    proc.wait_for_line("Meta's error 190", 20, |l| {
        l.contains("\"level\":\"ERROR\"") && l.contains("190")
    })
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (ok, listed) = run(&["outbox", "dead-letters", "--json"], &config);
        assert!(ok, "{listed}");
        let dead: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        let tags: std::collections::BTreeSet<&str> =
            dead.iter().filter_map(|d| d["tag"].as_str()).collect();
        if ["meta", "ga4", "hook"].iter().all(|t| tags.contains(t)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{listed}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The unreachable tag has failed at least once.
    let (_, admin_token) = SECRETS[6];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metrics = http
            .get(proc.admin_url("/metrics"))
            .bearer_auth(admin_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.lines().any(|l| {
            l.starts_with("tagrelay_outbox_retries_total")
                && l.contains("tag=\"down\"")
                && l.contains("reason=\"network\"")
        }) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A reload refused for a bad value that carries a secret: logged, secret-free.
    let bad = good.replace(
        &format!("url = \"http://{refused_addr}/in?key="),
        "url = \"ftp://hooks.example/in?key=",
    );
    std::fs::write(&config, &bad).unwrap();
    proc.signal("HUP");
    proc.wait_for_line("the refused reload", 10, |l| {
        l.contains("new configuration rejected")
    })
    .await;
    let (ok, check_bad) = run(&["check"], &config);
    assert!(!ok, "{check_bad}");
    assert!(check_bad.contains("url"), "{check_bad}");
    // And an unknown key next to a secret-bearing line.
    std::fs::write(
        &config,
        good.replace(
            "pixel_id = \"31415\"",
            "pixel_id = \"31415\"\naccess_tokn = \"${TAGRELAY_TEST_META_TOKEN}\"",
        ),
    )
    .unwrap();
    let (ok, check_typo) = run(&["check"], &config);
    assert!(!ok && check_typo.contains("access_tokn"), "{check_typo}");
    std::fs::write(&config, &good).unwrap();
    proc.signal("HUP");
    proc.wait_for_line("the reload", 10, |l| l.contains("configuration reloaded"))
        .await;
    let (ok, check_good) = run(&["check"], &config);
    assert!(ok, "{check_good}");

    let (ok, listed) = run(&["outbox", "dead-letters", "--json"], &config);
    assert!(ok, "{listed}");
    let (ok, plain) = run(&["outbox", "dead-letters"], &config);
    assert!(ok, "{plain}");
    let (ok, stats) = run(&["outbox", "stats", "--json"], &config);
    assert!(ok, "{stats}");
    // The reasons are there, with the echoed secrets cut out.
    assert!(listed.contains("[redacted]"), "{listed}");
    assert!(listed.contains("190"), "{listed}");

    proc.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = proc.wait_exit(15);
        (status, proc)
    })
    .await
    .unwrap();
    let (status, proc) = status;
    assert!(status.success(), "{status:?}");
    let logs = proc.output();
    // What the logs must have said, so their silence about secrets means something.
    for expected in [
        "tagrelay listening",
        "Meta CAPI",
        "dead-lettered",
        "new configuration rejected",
        "configuration reloaded",
        "tagrelay stopped",
    ] {
        assert!(logs.contains(expected), "logs lack `{expected}`:\n{logs}");
    }
    assert_no_secret(&logs, "the logs");
    assert_no_secret(&check_bad, "`tagrelay check` of a bad file");
    assert_no_secret(&check_typo, "`tagrelay check` of a misspelt key");
    assert_no_secret(&check_good, "`tagrelay check`");
    assert_no_secret(&listed, "`tagrelay outbox dead-letters --json`");
    assert_no_secret(&plain, "`tagrelay outbox dead-letters`");
    assert_no_secret(&stats, "`tagrelay outbox stats --json`");
    drop(refused);
}
