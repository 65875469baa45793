//! The operations kit in `deploy/`, each piece checked by its own ecosystem's tool — promtool
//! for the alert rules and a real scrape, the Kubernetes schemas for the manifests, the
//! compose spec for the compose file — and against a running tagrelay: every metric the
//! dashboard and the alerts query must be one tagrelay exports. `scripts/test` installs the
//! tools when missing.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{spawn_app, FakeVendor};
use crate::process::BIN;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metrics the dashboard or the alerts query that tagrelay does not export yet, and why.
/// Anything else they name must be in a scrape of a running tagrelay.
const PENDING: &[(&str, &str)] = &[(
    "tagrelay_hits_dropped_total",
    "bot filtering is being added (alert TagrelayBotHitsSurge)",
)];

/// Series Prometheus makes itself rather than scraping them.
const FROM_PROMETHEUS: &[&str] = &["up"];

fn deploy(path: &str) -> PathBuf {
    Path::new(ROOT).join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tool `scripts/test` installs: Python tools in `target/ops-tools` (pip), the rest on PATH.
fn tool(name: &str) -> PathBuf {
    let local = Path::new(ROOT).join("target/ops-tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: scripts/test installs it"))
}

/// Runs `cmd` and returns its stdout and stderr, failing the test with both if it fails.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// `tagrelay check` on a config file, with these variables set (as a deployment would).
fn tagrelay_check(config: &Path, env: &[(&str, &str)]) {
    run_ok(
        Command::new(BIN)
            .args(["check", "--config"])
            .arg(config)
            .envs(env.iter().copied()),
    );
}

/// The metric names a PromQL expression reads: identifiers that are not functions, keywords,
/// label names or Grafana variables.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    // Strings, label matchers, ranges, offsets and the label lists of
    // by/without/on/ignoring/group_*.
    let strip = [
        r#""(?:[^"\\]|\\.)*""#,
        r"\{[^}]*\}",
        r"\[[^\]]*\]",
        r"\boffset\s+-?[0-9a-z]+",
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
    ];
    let mut text = expr.to_owned();
    for re in strip {
        text = regex::Regex::new(re)
            .unwrap()
            .replace_all(&text, " ")
            .into_owned();
    }
    let keywords = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    ];
    regex::Regex::new(r"\$?[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?")
        .unwrap()
        .find_iter(&text)
        .map(|m| m.as_str())
        .filter(|t| !t.starts_with('$') && !t.ends_with('('))
        .filter(|t| !keywords.contains(&t.to_ascii_lowercase().as_str()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn promql_names_are_told_from_functions_labels_and_variables() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.99, sum by (job, le) (rate(tagrelay_x_seconds_bucket{job=~"$job", route!~"a|b"}[$__rate_interval]))) / on (job) group_left up offset 5m > bool 0"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["tagrelay_x_seconds_bucket".to_owned(), "up".to_owned()])
    );
}

/// Every PromQL expression of the dashboard.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&read(&deploy("grafana/tagrelay.json"))).unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&dash["panels"]];
    while let Some(v) = stack.pop() {
        for p in v.as_array().into_iter().flatten() {
            stack.push(&p["panels"]);
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("every target has an expr");
                exprs.push((
                    p["title"].as_str().unwrap_or("?").to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(metric{…}, label)
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(m, _)| m.to_owned())
                .unwrap_or_else(|| q.to_owned());
            exprs.push((format!("variable {}", v["name"]), inner));
        }
    }
    exprs
}

/// Every alert of alerts.yml: (name, expression, rule).
fn alert_rules() -> Vec<(String, String, Value)> {
    let rules = yaml(&deploy("prometheus/alerts.yml"));
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().expect("only alerting rules").to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
                r.clone(),
            )
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy("prometheus");
    let promtool = tool("promtool");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert is unit-tested firing, says what happened, and has a runbook line.
    let tests = yaml(&dir.join("alerts_test.yml"));
    let fired: BTreeSet<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap().iter())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .map(|a| a["alertname"].as_str().unwrap())
        .collect();
    let readme = read(&Path::new(ROOT).join("README.md"));
    let runbook = readme
        .split_once("### Alerts and their runbook")
        .expect("README has the alerts' runbook")
        .1;
    let runbook = runbook.split("\n## ").next().unwrap();
    let rules = alert_rules();
    assert!(rules.len() >= 10, "{} alerts", rules.len());
    for (name, _, rule) in &rules {
        assert!(fired.contains(name.as_str()), "no test fires {name}");
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        assert!(
            ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        assert!(
            runbook.contains(&format!("| `{name}` |")),
            "README's runbook has no line for {name}"
        );
    }
}

#[test]
fn the_trial_prometheus_config_passes_promtool() {
    // As the compose file lays it out: the rules beside it, the token where its secret is
    // mounted (here a temp file, since promtool checks that it exists).
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token-of-enough-characters").unwrap();
    let config = read(&deploy("prometheus/prometheus.yml"));
    let mounted = "/run/secrets/tagrelay_admin_token";
    assert!(config.contains(mounted), "the scrape sends the token");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        config.replace(mounted, &token.display().to_string()),
    )
    .unwrap();
    std::fs::copy(
        deploy("prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let out = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "config", "prometheus.yml"])
            .current_dir(dir.path()),
    );
    assert!(
        out.contains("SUCCESS") && out.contains("rules found"),
        "{out}"
    );
}

/// Files under `dir`, recursively, with one of `exts`.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let manifests: Vec<PathBuf> = files(&deploy("kubernetes"), &["yaml", "yml"])
        .into_iter()
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    assert!(manifests.len() >= 4, "{manifests:?}");
    // --strict: a misspelt field is an error, not ignored.
    let out = run_ok(
        Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.37.0"])
            .args(&manifests),
    );
    for m in &manifests {
        let name = m.strip_prefix(ROOT).unwrap().display().to_string();
        assert!(
            out.lines()
                .any(|l| l.starts_with("INFO") && l.contains("passed") && l.contains(&name[1..])),
            "{name} was not validated:\n{out}"
        );
    }
}

/// The resource of `kind` among a variant's manifests.
fn resource<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The manifests a kustomization (and the bases it names) lists, and its generated
/// ConfigMaps' files.
fn kustomize(dir: &Path, docs: &mut Vec<Value>, generated: &mut Vec<(String, PathBuf)>) {
    let k = yaml(&dir.join("kustomization.yaml"));
    let listed: Vec<&str> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for r in &listed {
        let p = dir.join(r);
        if p.is_dir() {
            kustomize(&p, docs, generated);
        } else {
            docs.push(yaml(&p));
        }
    }
    // No manifest beside a kustomization is left out of it by mistake.
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is not in {dir:?}'s resources"
            );
        }
    }
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        for f in g["files"].as_array().unwrap() {
            generated.push((
                g["name"].as_str().unwrap().to_owned(),
                dir.join(f.as_str().unwrap()),
            ));
        }
    }
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// A variant's manifests, its workload and its config, once the checks every variant must
/// pass have passed.
struct Variant {
    docs: Vec<Value>,
    workload: Value,
    config: toml::Value,
}

/// What every variant must be: its config valid with exactly the variables its pod gets,
/// the public port alone in the Service, probes, non-root and read-only, a clean stop that
/// fits the grace period, reloads in place, resources set.
fn check_variant(variant: &str, workload_kind: &str) -> Variant {
    let dir = deploy(&format!("kubernetes/{variant}"));
    let (mut docs, mut generated) = (Vec::new(), Vec::new());
    kustomize(&dir, &mut docs, &mut generated);
    let sts = resource(&docs, workload_kind).clone();
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];

    // The config: from the ConfigMap the kustomization generates, valid with exactly the
    // variables the pod gets (so every ${VAR} it names comes from the Secret).
    let [(cm_name, toml_path)] = generated.as_slice() else {
        panic!("one generated config: {generated:?}")
    };
    let config_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm_name.as_str())
        .expect("the pod mounts the generated ConfigMap");
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => {
                    assert_eq!(e["valueFrom"]["secretKeyRef"]["name"], "tagrelay-secrets");
                    if name.ends_with("_URL") {
                        "rediss://user:a-secret-value@redis.example.internal:6380/0".to_owned()
                    } else {
                        "a-secret-value-long-enough".to_owned()
                    }
                }
            };
            (name, value)
        })
        .collect();
    let config_file = env
        .iter()
        .find(|(k, _)| k == "TAGRELAY_CONFIG")
        .expect("TAGRELAY_CONFIG names the mounted file")
        .1
        .clone();
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .unwrap();
    assert_eq!(
        format!(
            "{}/{}",
            mount["mountPath"].as_str().unwrap(),
            toml_path.file_name().unwrap().to_str().unwrap()
        ),
        config_file
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(toml_path)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: toml::Value = toml::from_str(&read(toml_path)).unwrap();
    let server = &config["server"];

    // Ports: the public one in the Service, probed by the kubelet; the admin one reachable
    // by Prometheus (not loopback, token set) and in no Service.
    let ports = c["ports"].as_array().unwrap();
    let port = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("http"), port_of(server["listen"].as_str().unwrap()));
    let admin = server["admin_listen"].as_str().unwrap();
    assert!(admin.starts_with("0.0.0.0:"), "{admin}");
    assert_eq!(port("admin"), port_of(admin));
    assert!(config["admin"]["token"].as_str().unwrap().starts_with("${"));
    let svc = resource(&docs, "Service");
    let svc_ports = svc["spec"]["ports"].as_array().unwrap();
    assert_eq!(svc_ports.len(), 1, "the public port only");
    assert_eq!(svc_ports[0]["targetPort"], "http");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&sts["spec"]["template"]["metadata"]["labels"][k], v);
    }
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{probe}");
    }

    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["runAsNonRoot"], true);
    let csc = &c["securityContext"];
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    assert_eq!(
        pod["serviceAccountName"],
        resource(&docs, "ServiceAccount")["metadata"]["name"]
    );

    // A clean stop fits in the grace period: the delay that keeps serving while the pod
    // leaves the endpoints (instead of a preStop hook: the image has no shell to sleep in),
    // then the shutdown.
    assert!(
        c["lifecycle"]["preStop"].is_null(),
        "no preStop hook: the image has no shell"
    );
    let grace_ms = pod["terminationGracePeriodSeconds"].as_u64().unwrap() * 1000;
    let shutdown_ms = server["shutdown_timeout_ms"].as_integer().unwrap() as u64;
    let delay_ms = server["shutdown_delay_ms"].as_integer().unwrap() as u64;
    assert!(delay_ms >= 1000, "{delay_ms} ms of delay");
    assert!(
        grace_ms > delay_ms + shutdown_ms,
        "{grace_ms} ms grace, {delay_ms} ms delay, {shutdown_ms} ms shutdown"
    );

    // Config changes are reloaded, not rolled: the ConfigMap keeps its name (so the
    // kubelet updates the mounted file in place) and tagrelay watches the file.
    let k = yaml(&dir.join("kustomization.yaml"));
    assert_eq!(
        k["configMapGenerator"][0]["options"]["disableNameSuffixHash"],
        true
    );
    assert!(server["config_watch_interval_ms"].as_integer().unwrap() > 0);

    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][kind][r].is_string(), "resources.{kind}.{r}");
        }
    }
    Variant {
        docs,
        workload: sts,
        config,
    }
}

#[test]
fn the_embedded_variant_is_wired_as_the_issue_asks() {
    let Variant {
        workload: sts,
        config,
        ..
    } = check_variant("embedded", "StatefulSet");
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // The outbox on the claimed volume, owned by the image's user; nothing else writable.
    let outbox = config["outbox"]["path"].as_str().unwrap();
    let claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let data = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claim)
        .expect("the claimed volume is mounted");
    assert!(
        outbox.starts_with(data["mountPath"].as_str().unwrap()),
        "{outbox}"
    );
    assert_eq!(sts["spec"]["replicas"], 1);
    // The volume's files belong to the image's user, whatever the storage class makes them.
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
}

#[test]
fn the_redis_variant_runs_stateless_replicas_that_scale_and_drain_one_at_a_time() {
    let Variant {
        docs,
        workload: deployment,
        config,
    } = check_variant("redis", "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // The outbox in Redis, its address a secret; nothing on a volume of the pod's own.
    assert_eq!(config["outbox"]["backend"].as_str(), Some("redis"));
    let url = config["outbox"]["redis"]["url"].as_str().unwrap();
    assert!(url.starts_with("${") && url.ends_with('}'), "{url}");
    let var = &url[2..url.len() - 1];
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == var && e["valueFrom"]["secretKeyRef"]["key"] == var),
        "{var} comes from the Secret"
    );
    assert!(pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["persistentVolumeClaim"].is_null()));
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    // A rolling update never takes a replica away before its successor is ready.
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    // The autoscaler drives this Deployment, on CPU (which needs a CPU request), never
    // below two replicas.
    let hpa = resource(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    // Voluntary disruptions take one replica at a time, and the budget selects these pods.
    let pdb = resource(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&deployment["spec"]["template"]["metadata"]["labels"][k], v);
    }
}

#[test]
fn the_kubernetes_scrape_config_finds_the_admin_port_and_sends_the_token() {
    // Debian's promtool is built without Kubernetes discovery, so this one is checked here.
    let scrape = yaml(&deploy("prometheus/kubernetes-scrape.yml"));
    let job = &scrape["scrape_configs"][0];
    assert_eq!(
        job["job_name"], "tagrelay",
        "alerts.yml's TagrelayDown reads it"
    );
    assert_eq!(job["authorization"]["type"], "Bearer");
    assert!(job["authorization"]["credentials_file"].is_string());
    let keeps: Vec<(&str, &str)> = job["relabel_configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| {
            (
                r["source_labels"][0].as_str().unwrap(),
                r["regex"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(keeps.contains(&("__meta_kubernetes_pod_container_port_name", "admin")));
    assert!(keeps.contains(&(
        "__meta_kubernetes_pod_label_app_kubernetes_io_name",
        "tagrelay"
    )));
}

#[test]
fn the_compose_file_matches_the_compose_spec_and_its_files_exist() {
    let compose = deploy("compose.yaml");
    run_ok(
        Command::new(tool("check-jsonschema"))
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(&compose),
    );
    let doc = yaml(&compose);
    let base = deploy("");
    let tagrelay = &doc["services"]["tagrelay"];
    assert!(base
        .join(tagrelay["build"]["context"].as_str().unwrap())
        .join(tagrelay["build"]["dockerfile"].as_str().unwrap())
        .is_file());
    for (name, svc) in doc["services"].as_object().unwrap() {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    base.join(source).exists(),
                    "{name}: {source} does not exist"
                );
            }
        }
        for p in svc["ports"].as_array().into_iter().flatten() {
            assert!(
                p.as_str().unwrap().starts_with("127.0.0.1:"),
                "{name} publishes {p} beyond loopback"
            );
        }
    }
    // The config it mounts over the image's is valid with the variable it is given.
    let mounted = tagrelay["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .find(|v| v.contains(":/etc/tagrelay/tagrelay.toml"))
        .expect("a config replaces the image's");
    let env = tagrelay["environment"].as_object().unwrap();
    assert!(env.contains_key("TAGRELAY_ADMIN_TOKEN"));
    tagrelay_check(
        &base.join(mounted.split(':').next().unwrap()),
        &[("TAGRELAY_ADMIN_TOKEN", "a-token-of-enough-characters")],
    );
    // Traces go to the trial's Jaeger, by its service name, on the OTLP/HTTP port.
    let toml_path = base.join(mounted.split(':').next().unwrap());
    let config: toml::Value = toml::from_str(&read(&toml_path)).unwrap();
    let endpoint = config["telemetry"]["otlp_endpoint"].as_str().unwrap();
    let host = endpoint
        .strip_prefix("http://")
        .and_then(|h| h.strip_suffix(":4318"))
        .unwrap_or_else(|| panic!("{endpoint}"));
    assert!(doc["services"][host]["image"]
        .as_str()
        .unwrap()
        .starts_with("jaegertracing/"));
    // Grafana gets the dashboard where its provisioning looks.
    let provider = yaml(&deploy("grafana/provisioning/dashboards/tagrelay.yml"));
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(doc["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v
            .as_str()
            .unwrap()
            .starts_with(&format!("./grafana/tagrelay.json:{path}/"))));
}

#[test]
fn the_scale_out_compose_file_runs_two_replicas_on_one_redis_that_keeps_events() {
    let compose = deploy("compose.redis.yaml");
    run_ok(
        Command::new(tool("check-jsonschema"))
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(&compose),
    );
    let doc = yaml(&compose);
    let base = deploy("");
    let services = doc["services"].as_object().unwrap();
    let replicas: Vec<&String> = services
        .keys()
        .filter(|k| k.starts_with("tagrelay"))
        .collect();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    // Redis keeps what it acknowledged and never evicts a queue.
    let redis = services["redis"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(redis.contains("--appendonly yes"), "{redis}");
    assert!(redis.contains("--maxmemory-policy noeviction"), "{redis}");
    let mut configs = BTreeSet::new();
    for name in replicas {
        let svc = &services[name.as_str()];
        assert_eq!(
            svc["depends_on"]["redis"]["condition"], "service_healthy",
            "{name} waits for Redis"
        );
        for p in svc["ports"].as_array().unwrap() {
            assert!(p.as_str().unwrap().starts_with("127.0.0.1:"), "{name}: {p}");
        }
        let vols: Vec<&str> = svc["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            vols.len(),
            1,
            "{name} is stateless: only its config: {vols:?}"
        );
        let mounted = vols[0].split(':').next().unwrap();
        assert!(vols[0].ends_with(":/etc/tagrelay/tagrelay.toml:ro"));
        assert!(base.join(mounted).is_file());
        configs.insert(mounted.to_owned());
    }
    assert_eq!(configs.len(), 1, "both replicas run one config");
    let config = base.join(configs.first().unwrap());
    tagrelay_check(
        &config,
        &[("TAGRELAY_ADMIN_TOKEN", "a-token-of-enough-characters")],
    );
    let text = read(&config);
    assert!(text.contains("backend = \"redis\"") && text.contains("redis://redis:6379"));
}

#[test]
fn the_image_keeps_its_defaults_in_a_config_file_that_a_mounted_one_replaces() {
    let dockerfile = read(&Path::new(ROOT).join("Dockerfile"));
    // Joined continuation lines, so an ENV spread over several lines is one.
    let joined = dockerfile.replace("\\\n", " ");
    let env: Vec<&str> = joined
        .lines()
        .filter(|l| l.trim_start().starts_with("ENV "))
        .collect();
    assert!(
        env.iter().all(|l| !l.contains("TAGRELAY__")),
        "the environment would override a mounted config: {env:?}"
    );
    let config = env
        .iter()
        .find_map(|l| l.split("TAGRELAY_CONFIG=").nth(1))
        .expect("TAGRELAY_CONFIG is set")
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        joined.contains(&format!("COPY deploy/container/tagrelay.toml {config}")),
        "the image's config is deploy/container/tagrelay.toml at {config}"
    );
    tagrelay_check(&deploy("container/tagrelay.toml"), &[]);
    // The health check follows whatever config is in force.
    let healthcheck = joined
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .unwrap();
    assert!(
        healthcheck.contains("\"healthcheck\"]") && !healthcheck.contains("--url"),
        "{healthcheck}"
    );
}

/// Names of the samples in a Prometheus text scrape.
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_scrape_after_traffic_passes_promtool_and_has_every_metric_the_dashboard_and_alerts_read()
{
    // Three vendors, so that every outcome is counted: one accepts, one fails (retries), one
    // rejects (dead letters).
    let (ok, failing, refusing) = (
        FakeVendor::start().await,
        FakeVendor::start().await,
        FakeVendor::start().await,
    );
    failing.respond(&[(503, "busy")]);
    refusing.respond(&[(400, "bad event")]);
    let app = spawn_app(&format!(
        r#"
[[clients]]
type = "ga4"
[[tags]]
name = "ok"
type = "http"
url = "{}/ok"
[[tags]]
name = "failing"
type = "http"
url = "{}/failing"
[[tags]]
name = "refusing"
type = "http"
url = "{}/refusing"
"#,
        ok.url(),
        failing.url(),
        refusing.url()
    ))
    .await;
    for i in 0..5 {
        let r = app
            .http
            .get(app.url(&format!(
                "/g/collect?v=2&tid=G-TEST1&cid=1.{i}&en=page_view&dl=https%3A%2F%2Fshop.example.com%2F"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    // A hit its client refuses (hits_rejected).
    let r = app
        .http
        .get(app.url("/g/collect?v=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    ok.wait_for(10, |got| {
        got.iter()
            .map(|r| r.body_text().matches("page_view").count())
            .sum::<usize>()
            >= 5
    })
    .await;
    app.wait_for_dead_letters(1).await;
    failing.wait_for(10, |got| got.len() >= 2).await;

    // Wait for the counters of those outcomes (they are recorded after the vendor answers).
    let wanted = [
        "tagrelay_outbox_delivered_total",
        "tagrelay_outbox_retries_total",
        "tagrelay_outbox_dead_lettered_total",
        "tagrelay_hits_rejected_total",
        "tagrelay_outbox_pending",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = app.admin_text("/metrics").await;
        let names = scraped_names(&text);
        if wanted.iter().all(|w| names.contains(*w)) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 10 s the scrape lacks some of {wanted:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    app.stop().await;

    // promtool's linter: a HELP line per metric, types and names by the conventions.
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\nscrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("tagrelay_ready 1"), "{text}");
    let commit = tagrelay::telemetry::build_info::COMMIT;
    assert!(
        text.contains(&format!("commit=\"{commit}\"")),
        "tagrelay_build_info names the commit: {text}"
    );

    // What the dashboard and the alerts read is what tagrelay exports.
    let exported = scraped_names(&text);
    let pending: BTreeSet<&str> = PENDING.iter().map(|(n, _)| *n).collect();
    let mut read = Vec::new();
    for (panel, expr) in dashboard_exprs() {
        read.push((format!("dashboard panel {panel:?}"), expr));
    }
    for (alert, expr, _) in alert_rules() {
        read.push((format!("alert {alert}"), expr));
    }
    let mut used = BTreeSet::new();
    for (what, expr) in &read {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{what}: no metric in {expr}");
        for n in names {
            assert!(
                exported.contains(&n)
                    || pending.contains(n.as_str())
                    || FROM_PROMETHEUS.contains(&n.as_str()),
                "{what} reads {n}, which tagrelay does not export:\n{expr}"
            );
            used.insert(n);
        }
    }
    for (n, why) in PENDING {
        assert!(
            used.contains(*n),
            "{n} is listed as pending ({why}) but nothing reads it"
        );
    }
}

/// The value of the sample `name{labels…}` in a scrape, whatever the labels' order.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        (n == name && all).then(|| value.parse().ok()).flatten()
    })
}

/// Before any hit: every configured client's and tag's counters, for each outcome, at 0 —
/// an alert's `increase` then sees the first count, and dashboards list every tag — and the
/// process metrics the dashboard's RSS and CPU panels read. The real binary, so that the
/// scrape holds this process's counts only.
#[tokio::test]
async fn every_outcome_is_exported_at_zero_from_the_start_with_process_metrics() {
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::process::write_config(
        dir.path(),
        &format!(
            "[[clients]]\ntype = \"ga4\"\n[[clients]]\ntype = \"data\"\n\
             [[tags]]\nname = \"one\"\ntype = \"http\"\nurl = \"{0}/one\"\n\
             [[tags]]\nname = \"two\"\ntype = \"http\"\nurl = \"{0}/two\"\n",
            vendor.url()
        ),
    );
    let proc = crate::process::start(&path);
    // The dispatchers register their tags' counters as they start: wait for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = reqwest::get(proc.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let started = ["one", "two"]
            .iter()
            .all(|t| sample(&text, "tagrelay_outbox_delivered_total", &[("tag", t)]).is_some());
        if started {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(
            sample(&text, name, labels),
            Some(0.0),
            "{name}{labels:?} at 0:\n{text}"
        );
    };
    for tag in ["one", "two"] {
        zero("tagrelay_outbox_enqueued_total", &[("tag", tag)]);
        zero("tagrelay_outbox_delivered_total", &[("tag", tag)]);
        for reason in tagrelay::outbox::delivery::retry::RETRY_REASONS {
            zero(
                "tagrelay_outbox_retries_total",
                &[("tag", tag), ("reason", reason)],
            );
        }
        for reason in tagrelay::outbox::delivery::DEAD_LETTER_REASONS {
            zero(
                "tagrelay_outbox_dead_lettered_total",
                &[("tag", tag), ("reason", reason)],
            );
        }
    }
    for client in ["ga4", "data"] {
        zero("tagrelay_events_total", &[("client", client)]);
        for reason in tagrelay::ingress::REFUSED_REASONS {
            zero(
                "tagrelay_hits_rejected_total",
                &[("client", client), ("reason", reason)],
            );
        }
    }
    zero("tagrelay_outbox_fsync_failures_total", &[]);
    zero("tagrelay_outbox_rejected_full_total", &[]);
    let rss = sample(&text, "process_resident_memory_bytes", &[]).expect("RSS");
    assert!(rss > 1e6, "{rss}");
    assert!(sample(&text, "process_cpu_seconds_total", &[]).is_some());
    assert!(text.contains("# HELP process_resident_memory_bytes"));
}

#[tokio::test]
async fn readiness_is_answered_on_the_public_listener() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ready");
    app.stop().await;
}

#[tokio::test]
async fn public_readiness_fails_while_the_outbox_takes_no_hits() {
    use tower::ServiceExt;
    struct Stopped;
    #[async_trait::async_trait]
    impl tagrelay::outbox::Outbox for Stopped {
        async fn enqueue(
            &self,
            _: Vec<tagrelay::outbox::NewEvent>,
        ) -> Result<(), tagrelay::outbox::EnqueueError> {
            Err(tagrelay::outbox::EnqueueError::Failed(
                "fsync failed".into(),
            ))
        }
        fn is_open(&self) -> bool {
            false
        }
    }
    let config =
        tagrelay::config::load_str("[[clients]]\ntype = \"ga4\"\n", "t.toml", false).unwrap();
    let pipeline = tagrelay::pipeline::Pipeline::build(&config).unwrap();
    let state = tagrelay::AppState::new(
        pipeline,
        std::sync::Arc::new(Stopped),
        tagrelay::config::Source::Embedded,
    );
    let r = tagrelay::app(state)
        .oneshot(
            axum::http::Request::get("/readyz")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn healthcheck_probes_the_public_address_of_the_config() {
    let app = spawn_app("[[clients]]\ntype = \"ga4\"\n").await;
    let dir = tempfile::tempdir().unwrap();
    let probe = |listen: String| {
        let path = dir
            .path()
            .join(format!("probe-{}.toml", listen.replace([':', '.'], "-")));
        std::fs::write(&path, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
        // Off the runtime: the server under test answers on it.
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["healthcheck", "--config"])
                .arg(&path)
                .env_remove("TAGRELAY__SERVER__LISTEN")
                .output()
                .unwrap()
        })
    };
    // The wildcard address the server binds is probed on loopback.
    let out = probe(format!("0.0.0.0:{}", app.addr.port())).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A port nothing listens on: unhealthy, naming the URL it tried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = probe(format!("127.0.0.1:{closed}")).await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("http://127.0.0.1:{closed}/healthz")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}

#[test]
fn version_names_the_commit() {
    let out = run_ok(Command::new(BIN).arg("--version"));
    let re = regex::Regex::new(r"^tagrelay (\d+\.\d+\.\d+) \(([0-9a-f]{7,}|unknown)\)\n$").unwrap();
    let caps = re.captures(&out).unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(&caps[1], env!("CARGO_PKG_VERSION"));
    // In a git checkout, the commit checked out.
    if let Ok(git) = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(ROOT)
        .output()
    {
        if git.status.success() {
            assert_eq!(&caps[2], String::from_utf8_lossy(&git.stdout).trim());
        }
    }
}

#[tokio::test]
async fn dead_letters_are_listed_with_readable_times() {
    let vendor = FakeVendor::start().await;
    vendor.respond(&[(400, "bad event")]);
    let app = spawn_app(&format!(
        "[[clients]]\ntype = \"ga4\"\n[[tags]]\nname = \"hook\"\ntype = \"http\"\nurl = \"{}/hook\"\n",
        vendor.url()
    ))
    .await;
    let r = app
        .http
        .get(app.url("/g/collect?v=2&tid=G-TEST1&cid=1.2&en=page_view"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let list = app.wait_for_dead_letters(1).await;
    let d = &list[0];
    let stamp = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$").unwrap();
    // JSON keeps the milliseconds and adds the readable times.
    assert!(d["dead_at_ms"].is_i64(), "{d}");
    let dead_at = d["dead_at"].as_str().unwrap();
    assert!(stamp.is_match(dead_at), "{dead_at}");
    assert!(
        stamp.is_match(d["first_enqueued_at"].as_str().unwrap()),
        "{d}"
    );
    let out = run_ok(
        Command::new(BIN)
            .args(["outbox", "dead-letters", "--config"])
            .arg(app.config_path()),
    );
    assert!(out.contains(&format!("dead_at={dead_at}")), "{out}");
    assert!(!out.contains("dead_at_ms"), "{out}");
    app.stop().await;
}
