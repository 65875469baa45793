//! GA4 web client: claims `{path_prefix}/g/collect` hits from gtag.js and compatible libraries.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ga4ClientConfig {}

use http::Method;

use crate::clients::{Client, ClientError, HitRequest, Parsed};

#[derive(Debug)]
pub struct Ga4Client {}

impl Ga4Client {
    pub fn from_config(_cfg: &Ga4ClientConfig) -> Result<Self, Vec<String>> {
        Ok(Ga4Client {})
    }
}

impl Client for Ga4Client {
    fn kind(&self) -> &'static str {
        "ga4"
    }
    fn claims(&self, method: &Method, path: &str) -> bool {
        path == "/g/collect" && (method == Method::GET || method == Method::POST)
    }
    fn parse(&self, _req: &HitRequest<'_>) -> Result<Parsed, ClientError> {
        Err(ClientError::BadRequest("GA4 parsing lands with the GA4 client issue".into()))
    }
}
