//! `tagrelay doctor itp`: the arguments, their defaults from the config, and the exit code.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::evaluate::{evaluate, Severity, Tagging};
use super::facts::HostFacts;
use super::monitor::host_of;
use super::render::Report;
use super::resolve::{collect, ItpResolver};

/// Exit code when the verdict reaches `--fail-on`.
pub const EXIT_FAILED: u8 = 1;
/// Exit code when the check could not run (bad arguments, unreadable config, no resolver).
pub const EXIT_UNUSABLE: u8 = 2;

#[derive(Debug, Clone, Args)]
pub struct ItpArgs {
    /// A page URL visitors load (repeat for each host, e.g. the apex and www). Default: the
    /// origins of [server] allowed_origins
    #[arg(long = "site", value_name = "URL")]
    pub sites: Vec<String>,
    /// The URL (or host) the browser sends hits to, in subdomain mode (e.g.
    /// https://sgtm.example.com)
    #[arg(long, value_name = "URL", conflicts_with = "path")]
    pub tagging: Option<String>,
    /// Same-origin mode: hits go to this path of each site (e.g. /t). Default: [server]
    /// path_prefix when set
    #[arg(long, value_name = "/PREFIX")]
    pub path: Option<String>,
    /// `system` (/etc/resolv.conf) or a DNS server: IP or IP:port
    #[arg(long, default_value = "system", value_name = "system|IP[:PORT]")]
    pub resolver: String,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
    /// Lowest severity that makes the exit code 1
    #[arg(long, value_enum, default_value_t = FailOn::Capped)]
    pub fail_on: FailOn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    /// Warnings fail too (ok-cname-in-site, intermittent)
    Warn,
    /// Only capped cookies and errors fail
    Capped,
}

/// What to check, once flags and config defaults are combined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub sites: Vec<String>,
    /// `None` = same-origin (path mode).
    pub tagging: Option<String>,
    /// The path of same-origin mode, for the report.
    pub path: Option<String>,
    pub resolver: ItpResolver,
}

/// What the config in force says, for the flags left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDefaults {
    /// Where it came from, for messages.
    pub source: String,
    pub allowed_origins: Vec<String>,
    pub path_prefix: String,
}

/// Runs the command; prints the report (or what stopped it) and returns the exit code.
/// `defaults` loads the config's defaults, asked only when a flag is left out.
pub fn run(args: &ItpArgs, defaults: impl FnOnce() -> Result<ConfigDefaults, String>) -> ExitCode {
    let plan = match plan(args, defaults) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tagrelay doctor itp: {e}");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tagrelay doctor itp: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let report = match rt.block_on(check(&plan)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tagrelay doctor itp: {e}");
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("tagrelay doctor itp: {e}");
                return ExitCode::from(EXIT_UNUSABLE);
            }
        }
    } else {
        print!("{}", report.text());
    }
    let threshold = match args.fail_on {
        FailOn::Warn => Severity::Warn,
        FailOn::Capped => Severity::Capped,
    };
    if report.severity >= threshold {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Resolves every host once and judges each site against the tagging host.
pub async fn check(plan: &Plan) -> Result<Report, String> {
    let resolver = plan.resolver.build()?;
    let mut hosts: Vec<&str> = plan.sites.iter().map(String::as_str).collect();
    if let Some(t) = &plan.tagging {
        if !hosts.contains(&t.as_str()) {
            hosts.push(t);
        }
    }
    let facts: Vec<HostFacts> =
        futures_util::future::join_all(hosts.iter().map(|h| collect(h, &resolver))).await;
    let find = |h: &str| facts.iter().find(|f| f.host == h).expect("collected");
    let pairs = plan
        .sites
        .iter()
        .map(|s| {
            let tagging = match &plan.tagging {
                None => Tagging::SameOrigin,
                Some(t) => Tagging::Host(find(t)),
            };
            evaluate(find(s), tagging)
        })
        .collect();
    Ok(Report::new(
        pairs,
        &plan.resolver.describe(),
        plan.path.as_deref(),
    ))
}

/// Flags first; what they leave out comes from the config (`allowed_origins`, `path_prefix`).
pub fn plan(
    args: &ItpArgs,
    defaults: impl FnOnce() -> Result<ConfigDefaults, String>,
) -> Result<Plan, String> {
    let resolver: ItpResolver = args.resolver.parse()?;
    let need_config = args.sites.is_empty() || (args.tagging.is_none() && args.path.is_none());
    let config = if need_config { Some(defaults()?) } else { None };
    let sites: Vec<String> = if args.sites.is_empty() {
        let c = config.as_ref().expect("loaded when needed");
        if c.allowed_origins.is_empty() {
            return Err(format!(
                "which site? pass --site URL (the page visitors load, e.g. --site https://www.example.com), or list the origins in [server] allowed_origins of {}",
                c.source
            ));
        }
        c.allowed_origins.clone()
    } else {
        args.sites.clone()
    };
    let mut hosts = Vec::new();
    for s in &sites {
        let h = host_of(s).ok_or_else(|| {
            format!("`{s}` is not a page URL or host (e.g. https://www.example.com)")
        })?;
        if !hosts.iter().any(|x: &String| x == &*h) {
            hosts.push(h.into_owned());
        }
    }
    let mut path = None;
    let tagging = match (&args.tagging, &args.path) {
        (Some(t), _) => Some(
            host_of(t)
                .ok_or_else(|| {
                    format!("--tagging `{t}` is not a URL or host (e.g. https://sgtm.example.com)")
                })?
                .into_owned(),
        ),
        (None, Some(p)) => {
            if !p.starts_with('/') {
                return Err(format!(
                    "--path `{p}` must be a path such as /t (hits then go to https://SITE/t)"
                ));
            }
            path = Some(p.trim_end_matches('/').to_owned());
            None
        }
        (None, None) => {
            let c = config.as_ref().expect("loaded when needed");
            if c.path_prefix.is_empty() {
                return Err(format!(
                    "where do hits go? pass --tagging URL (e.g. --tagging https://sgtm.example.com) or --path /PREFIX for a path on the site itself; {} sets no [server] path_prefix to default to",
                    c.source
                ));
            }
            path = Some(c.path_prefix.clone());
            None
        }
    };
    Ok(Plan {
        sites: hosts,
        tagging,
        path,
        resolver,
    })
}
