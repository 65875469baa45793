//! What a trace may show of a request: bodies cut to a budget, secret query parameters and
//! cookie values hidden.

/// Truncates text to `max` characters on a char boundary.
pub fn truncate(s: &str, max: usize) -> (String, bool) {
    let cut = crate::text::truncate_chars(s, max);
    (cut.to_owned(), cut.len() < s.len())
}

/// Replaces the values of secret-bearing query parameters (`api_secret`, `access_token`,
/// `appsecret_proof`), whichever way their names are encoded (`api%5Fsecret` too).
pub fn redact_query(q: &str) -> String {
    q.split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _))
                if matches!(
                    &*crate::urlenc::decode(k),
                    "api_secret" | "access_token" | "appsecret_proof"
                ) =>
            {
                format!("{k}=[redacted]")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Shortens cookie values so a trace shows which cookies came, not their full contents.
pub fn shorten_cookie_header(v: &str) -> String {
    v.split(';')
        .map(|pair| {
            let pair = pair.trim();
            match pair.split_once('=') {
                Some((k, val)) if val.chars().count() > 12 => {
                    let head: String = val.chars().take(10).collect();
                    format!("{k}={head}…")
                }
                _ => pair.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}
