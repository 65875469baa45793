//! Captured requests in the wire-format reference's notation, for golden tests of clients and
//! of the pipeline.

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A request parsed from a fixture in the reference's notation: request line (continued on
/// lines indented by two spaces), headers, blank line, body with `<CRLF>` marking CR LF.
pub struct Fixture {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

pub fn load(text: &str) -> Fixture {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap().to_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some(cont) = line.strip_prefix("  ") {
            request_line.push_str(cont);
        } else {
            let (name, value) = line.split_once(": ").unwrap();
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
    }
    let (method, rest) = request_line.split_once(' ').unwrap();
    let target = rest.strip_suffix(" HTTP/1.1").unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Fixture {
        method: method.parse().unwrap(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        body: body
            .trim_end_matches('\n')
            .replace("<CRLF>\n", "\r\n")
            .into_bytes(),
    }
}
