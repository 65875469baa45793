//! OAuth2 access tokens for the Data Manager API from a Google credentials file: a
//! service-account key (`"type": "service_account"`) or an authorized-user refresh token
//! (`"type": "authorized_user"`, what `gcloud auth application-default login` writes). Either
//! way the file's `token_uri` is where tokens come from, so tests point it at loopback.
//!
//! Service accounts go through `gcp_auth` (JWT-bearer grant signed with the key, tokens cached
//! until 20 s before expiry). Neither `gcp_auth` (0.12) nor `yup-oauth2` (12) reads an
//! authorized-user file from a given path with its `token_uri` (both post to a fixed Google
//! URL; `yup-oauth2` also logs the refresh token at debug level), so that grant — one form POST
//! (RFC 6749 §6) — is made here with reqwest, cached the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gcp_auth::TokenProvider;
use serde::Deserialize;

use crate::secret::Secret;
use crate::tags::Credential;

/// The Data Manager API's OAuth scope.
pub const SCOPE: &str = "https://www.googleapis.com/auth/datamanager";
/// Google's token endpoint, for authorized-user files without a `token_uri`.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// A cached token is renewed this long before it expires, so no request leaves with one that
/// lapses in flight.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// A loaded credentials file.
pub struct GoogleCredential {
    kind: Kind,
    /// Secrets of the file that could appear in an error text (refresh token, client secret).
    secrets: Vec<String>,
}

enum Kind {
    ServiceAccount {
        account: Box<gcp_auth::CustomServiceAccount>,
        email: String,
    },
    AuthorizedUser(RefreshGrant),
}

impl std::fmt::Debug for GoogleCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::ServiceAccount { email, .. } => f
                .debug_struct("GoogleCredential::ServiceAccount")
                .field("client_email", email)
                .finish_non_exhaustive(),
            Kind::AuthorizedUser(g) => f
                .debug_struct("GoogleCredential::AuthorizedUser")
                .field("client_id", &g.client_id)
                .field("token_uri", &g.token_uri)
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Deserialize)]
struct FileHead {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct AuthorizedUserFile {
    client_id: String,
    client_secret: String,
    refresh_token: String,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Deserialize)]
struct ServiceAccountHead {
    client_email: String,
    token_uri: String,
}

impl GoogleCredential {
    /// Reads and checks a credentials file (no network). Errors say what is wrong with the
    /// file, never what it holds.
    pub fn load(path: &str) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
        Self::from_json(&text).map_err(|e| format!("`{path}`: {e}"))
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let head: FileHead = serde_json::from_str(text).map_err(|e| {
            // Position only: serde_json quotes values in some messages, and these are secrets.
            format!(
                "is not a JSON credentials file (error at line {} column {})",
                e.line(),
                e.column()
            )
        })?;
        match head.kind.as_deref() {
            Some("service_account") => {
                let sa: ServiceAccountHead = serde_json::from_str(text).map_err(|_| {
                    "a service-account key needs client_email, private_key and token_uri \
                     (download a new JSON key in the Cloud console)"
                        .to_string()
                })?;
                check_uri(&sa.token_uri)?;
                let account = gcp_auth::CustomServiceAccount::from_json(text)
                    .map_err(|e| format!("the service-account key cannot be used: {e}"))?;
                Ok(GoogleCredential {
                    kind: Kind::ServiceAccount {
                        account: Box::new(account),
                        email: sa.client_email,
                    },
                    secrets: Vec::new(),
                })
            }
            Some("authorized_user") => {
                let f: AuthorizedUserFile = serde_json::from_str(text).map_err(|_| {
                    "an authorized-user file needs client_id, client_secret and refresh_token \
                     (run `gcloud auth application-default login --scopes=…/auth/datamanager`)"
                        .to_string()
                })?;
                let token_uri = f.token_uri.unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
                check_uri(&token_uri)?;
                if f.refresh_token.trim().is_empty() || f.client_secret.trim().is_empty() {
                    return Err("refresh_token or client_secret is empty".into());
                }
                let http = reqwest::Client::builder()
                    .user_agent(concat!("tagrelay/", env!("CARGO_PKG_VERSION")))
                    .timeout(Duration::from_secs(30))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
                let secrets = vec![f.refresh_token.clone(), f.client_secret.clone()];
                Ok(GoogleCredential {
                    kind: Kind::AuthorizedUser(RefreshGrant {
                        client_id: f.client_id,
                        client_secret: Secret::new(f.client_secret),
                        refresh_token: Secret::new(f.refresh_token),
                        token_uri,
                        http,
                        cached: tokio::sync::Mutex::new(None),
                    }),
                    secrets,
                })
            }
            Some(other) => Err(format!(
                "type `{other}` is not supported; use a service-account key (\"service_account\") \
                 or an authorized-user file (\"authorized_user\")"
            )),
            None => {
                Err("has no `type`; use a service-account key or an authorized-user file".into())
            }
        }
    }

    /// Secrets of the file, for redaction.
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }
}

fn check_uri(uri: &str) -> Result<(), String> {
    if uri.starts_with("https://") || uri.starts_with("http://") {
        Ok(())
    } else {
        Err(format!("token_uri `{uri}` is not an http(s) URL"))
    }
}

#[async_trait::async_trait]
impl Credential for GoogleCredential {
    async fn authorization(&self) -> Result<Secret, String> {
        let token = match &self.kind {
            Kind::ServiceAccount { account, .. } => account
                .token(&[SCOPE])
                .await
                .map(|t| t.as_str().to_owned())
                .map_err(|e| format!("no access token for the service account: {e}"))?,
            Kind::AuthorizedUser(grant) => grant.token().await?,
        };
        Ok(Secret::new(format!("Bearer {token}")))
    }
}

/// The refresh-token grant with a cached access token.
struct RefreshGrant {
    client_id: String,
    client_secret: Secret,
    refresh_token: Secret,
    token_uri: String,
    http: reqwest::Client,
    /// The current token and when to renew it. The lock is held across a refresh, so
    /// concurrent deliveries wait for one fetch instead of each making their own.
    cached: tokio::sync::Mutex<Option<(Arc<str>, Instant)>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl RefreshGrant {
    async fn token(&self) -> Result<String, String> {
        let mut cached = self.cached.lock().await;
        if let Some((token, renew_at)) = cached.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(token.to_string());
            }
        }
        let resp = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.expose()),
                ("refresh_token", self.refresh_token.expose()),
            ])
            .send()
            .await
            .map_err(|e| {
                format!(
                    "token request to {} failed: {}",
                    self.token_uri,
                    e.without_url()
                )
            })?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if !status.is_success() {
            // OAuth error bodies (`{"error":"invalid_grant",…}`) carry no secret; cut anyway.
            let text = String::from_utf8_lossy(&body);
            let text = crate::text::truncate_chars(text.trim(), 300)
                .replace(self.refresh_token.expose(), "[redacted]")
                .replace(self.client_secret.expose(), "[redacted]");
            return Err(format!(
                "the token endpoint answered HTTP {}: {text} (is the refresh token revoked? \
                 create a new credentials file)",
                status.as_u16()
            ));
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| "the token endpoint's answer has no access_token".to_string())?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        let renew_at = Instant::now() + lifetime.saturating_sub(RENEW_BEFORE);
        let token: Arc<str> = answer.access_token.into();
        *cached = Some((token.clone(), renew_at));
        Ok(token.to_string())
    }
}
