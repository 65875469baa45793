//! Match keys (customer information) normalised and SHA-256 hashed, with one policy per
//! platform: the platforms agree on SHA-256 lowercase hex and on passing already-hashed values
//! through, and disagree on the forms before hashing (ad-platforms §8).
//!
//! - [`Policy::Meta`]: Meta's documented target forms (wire-formats §3.4, §7). The reference
//!   shows the two official SDKs and Meta's capi-param-builder disagree; we follow the target
//!   forms, which the param builder implements most closely. Decisions per key are commented at
//!   each normaliser.
//! - [`Policy::Google`]: Google's enhanced-conversions rules (ad-platforms §1.3, Data Manager
//!   `user_data.proto`): gmail/googlemail addresses lose a `+tag` and their dots, phones are
//!   E.164 with `+`, names are lowercase without punctuation, and the address parts Google takes
//!   in clear (country, postal code) come out unhashed in Google's form.
//! - [`Policy::TikTok`]: TikTok's own server template (ad-platforms §2.3): email trimmed and
//!   lowercased, phone E.164 with `+` (the `+` rule is [obs] in the reference), `external_id`
//!   trimmed with its case kept.
//!
//! A value that cannot be brought into the target form is dropped by the caller (and counted),
//! never sent raw and never hashed in a wrong form that merely looks valid. A key a policy has
//! no form for (Google's gender, say) is never normalised under that policy.

use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

/// The match keys tagrelay fills, in Meta's short names (Snap and Pinterest use the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Em,
    Ph,
    Fn,
    Ln,
    Db,
    Ge,
    Ct,
    St,
    Zp,
    Country,
    ExternalId,
}

impl Key {
    /// The key's name on the wire (also the metrics label).
    pub fn name(self) -> &'static str {
        match self {
            Key::Em => "em",
            Key::Ph => "ph",
            Key::Fn => "fn",
            Key::Ln => "ln",
            Key::Db => "db",
            Key::Ge => "ge",
            Key::Ct => "ct",
            Key::St => "st",
            Key::Zp => "zp",
            Key::Country => "country",
            Key::ExternalId => "external_id",
        }
    }
}

/// Whose rules a value is normalised by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Meta,
    Google,
    TikTok,
}

/// A SHA-256 digest as 64 lowercase hex characters, kept inline so hashing a field does not
/// allocate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hex64([u8; 64]);

impl Hex64 {
    pub fn as_str(&self) -> &str {
        // Only ever filled with ASCII hex digits, so this cannot fail; fall back to "" anyway
        // rather than panic.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for Hex64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Hex64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// SHA-256 of the UTF-8 bytes, lowercase hex.
pub fn sha256_hex(s: &str) -> Hex64 {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(s.as_bytes());
    let mut out = [0u8; 64];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    Hex64(out)
}

/// A value that already is a SHA-256 hex digest (any case, surrounding whitespace ignored).
///
/// Only SHA-256 is passed through; the SDKs also pass 32-hex (MD5-looking) strings, but Meta
/// documents SHA-256 only and a 32-hex *user id* (a dash-less UUID) is common, so such values
/// are normalised and hashed like any other.
pub fn as_prehashed(s: &str) -> Option<Hex64> {
    let t = s.trim().as_bytes();
    if t.len() != 64 || !t.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 64];
    for (o, b) in out.iter_mut().zip(t) {
        *o = b.to_ascii_lowercase();
    }
    Some(Hex64(out))
}

/// Outcome of normalising one input value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashed {
    /// Nothing to send (empty input); not an error.
    Absent,
    /// The value could not be normalised; the caller drops it and counts it.
    Invalid,
    Value(Hex64),
}

/// Normalises `input` for `key` by `policy` and hashes it, or passes an existing SHA-256
/// through. `scratch` is reused between calls to keep this allocation-free in the steady state.
pub fn normalize_and_hash(
    policy: Policy,
    key: Key,
    input: &str,
    max_year: i32,
    scratch: &mut String,
) -> Hashed {
    if input.trim().is_empty() {
        return Hashed::Absent;
    }
    if let Some(h) = as_prehashed(input) {
        return Hashed::Value(h);
    }
    scratch.clear();
    if normalize_into(policy, key, input, max_year, scratch) {
        Hashed::Value(sha256_hex(scratch))
    } else {
        Hashed::Invalid
    }
}

/// Writes the normalised (pre-hash) form of `input` for `key` by `policy` into `out`; false
/// when the input cannot be normalised or the policy has no form for the key. `out` must be
/// empty.
pub fn normalize_into(
    policy: Policy,
    key: Key,
    input: &str,
    max_year: i32,
    out: &mut String,
) -> bool {
    let s = input.trim();
    let ok = match policy {
        Policy::Meta => meta(key, s, max_year, out),
        Policy::Google => google(key, s, out),
        Policy::TikTok => tiktok(key, s, out),
    };
    ok && !out.is_empty()
}

/// The normalised, unhashed form (tests, the debug view, and the keys Google takes in clear).
pub fn normalized(policy: Policy, key: Key, input: &str, max_year: i32) -> Option<String> {
    let mut out = String::new();
    normalize_into(policy, key, input, max_year, &mut out).then_some(out)
}

fn meta(key: Key, s: &str, max_year: i32, out: &mut String) -> bool {
    match key {
        Key::Em => email(s, out),
        Key::Ph => phone(s, out),
        // Names and city: Meta asks for lowercase without punctuation or spaces, UTF-8 allowed.
        // We keep every Unicode letter (so `Saint-Étienne` → `saintétienne`, like both SDKs, not
        // the param builder's `sainttienne`) and drop punctuation as the param builder and
        // Meta's docs do (`Mary-Jane` → `maryjane`, `O'Brien` → `obrien`; the SDKs keep `-`/`'`).
        // Digits are dropped for cities too (`New York 10` → `newyork`, as both SDKs do): they
        // are district numbers, not part of the city's name.
        Key::Fn | Key::Ln | Key::Ct => letters_lower(s, out),
        Key::St => state(s, out),
        Key::Zp => zip(s, out),
        Key::Country => country(s, out),
        Key::Db => date_of_birth(s, max_year, out),
        Key::Ge => gender(s, out),
        Key::ExternalId => external_id(s, out),
    }
}

/// Google: email, phone and names are hashed; country and postal code go in clear
/// (`AddressInfo.region_code` / `postal_code`). Keys Google's conversion APIs do not take
/// (`Db`, `Ge`, `Ct`, `St`, `ExternalId`) have no form.
fn google(key: Key, s: &str, out: &mut String) -> bool {
    match key {
        Key::Em => google_email(s, out),
        Key::Ph => e164_plus(s, out),
        Key::Fn | Key::Ln => name_without_punctuation(s, out),
        Key::Country => {
            // ISO 3166-1 alpha-2 in upper case, as Google's own Data Manager formatter writes it.
            let ok = country(s, out);
            out.make_ascii_uppercase();
            ok
        }
        // Taken in clear and only trimmed by Google's own formatter: `SW1A 1AA` stays as is.
        Key::Zp => {
            out.push_str(s);
            !s.is_empty()
        }
        Key::Db | Key::Ge | Key::Ct | Key::St | Key::ExternalId => false,
    }
}

/// TikTok: the keys its Events API hashes for web events (`email`, `phone`, `external_id`).
fn tiktok(key: Key, s: &str, out: &mut String) -> bool {
    match key {
        Key::Em => email(s, out),
        Key::Ph => e164_plus(s, out),
        // TikTok's own template hashes the id with its case kept (Stape lowercases it; the
        // reference recommends the vendor's form): `User123` and `user123` are two people.
        Key::ExternalId => {
            out.push_str(s);
            true
        }
        _ => false,
    }
}

/// Google's email form: trimmed, lowercased, no whitespace inside, exactly one `@` with
/// something on both sides; for `gmail.com` and `googlemail.com` only, a `+tag` and then every
/// `.` of the local part are removed (ad-platforms §1.3, Google's Data Manager formatter).
fn google_email(s: &str, out: &mut String) -> bool {
    if s.chars().any(char::is_whitespace) {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return false;
    }
    let domain_lower = domain.to_lowercase();
    if domain_lower == "gmail.com" || domain_lower == "googlemail.com" {
        let base = local.split('+').next().unwrap_or_default();
        for c in base.chars().filter(|c| *c != '.') {
            out.extend(c.to_lowercase());
        }
        if out.is_empty() {
            return false;
        }
    } else {
        push_lower(local, out);
    }
    out.push('@');
    out.push_str(&domain_lower);
    true
}

/// E.164 with the leading `+` (Google, TikTok): Meta's digit rules (international prefix,
/// trunk `(0)`, national numbers refused), then `+`.
fn e164_plus(s: &str, out: &mut String) -> bool {
    if !phone(s, out) {
        return false;
    }
    out.insert(0, '+');
    true
}

/// Lowercase with punctuation and symbols removed; letters and digits of any script kept, runs
/// of whitespace inside kept as one space (`Mary-Jane` → `maryjane`, `Anne Marie` →
/// `anne marie`). Google asks for "all lowercase, no punctuation, no leading or trailing
/// whitespace" and says nothing about inner spaces, so they stay.
fn name_without_punctuation(s: &str, out: &mut String) -> bool {
    let mut space = false;
    for c in s.chars() {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.extend(c.to_lowercase());
        } else if c.is_whitespace() {
            space = true;
        }
    }
    true
}

/// Trimmed and lowercased, must look like `x@y.z`. No provider-specific rules (Meta, unlike
/// Google, does not remove gmail dots).
fn email(s: &str, out: &mut String) -> bool {
    if s.chars().any(char::is_whitespace) {
        return false;
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    let domain_ok = match domain.rsplit_once('.') {
        Some((host, tld)) => !host.is_empty() && !tld.is_empty() && !host.contains('@'),
        None => false,
    };
    if local.is_empty() || !domain_ok {
        return false;
    }
    push_lower(s, out);
    true
}

/// Digits only, with the country code, no `+` or international `00` prefix.
///
/// Decisions beyond the SDKs (§7.9): a `(0)` trunk marker after an international prefix is
/// removed (`+44 (0)20 …` → `4420…`, the SDKs wrongly keep the 0); a number that still starts
/// with `0` after removing `00` is a national number whose country code we do not know — the SDKs
/// silently strip the 0 and hash a wrong number, we drop it. Letters (extensions, `tel:`) are
/// rejected rather than guessed around. Length is checked against E.164 (7–15 digits).
fn phone(s: &str, out: &mut String) -> bool {
    let intl_prefix = s.starts_with('+') || s.starts_with("00");
    let mut trunk_skipped = false;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if intl_prefix && !trunk_skipped && rest.starts_with("(0)") {
            trunk_skipped = true;
            rest = &rest[3..];
            continue;
        }
        match c {
            '0'..='9' => out.push(c),
            '+' if out.is_empty() => {}
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
            _ => return false,
        }
        rest = &rest[c.len_utf8()..];
    }
    if out.starts_with("00") {
        out.drain(..2);
    }
    if out.starts_with('0') {
        return false;
    }
    (7..=15).contains(&out.len())
}

fn letters_lower(s: &str, out: &mut String) -> bool {
    for c in s.chars().filter(|c| c.is_alphabetic()) {
        out.extend(c.to_lowercase());
    }
    true
}

fn push_lower(s: &str, out: &mut String) {
    for c in s.chars() {
        out.extend(c.to_lowercase());
    }
}

/// Two-letter lowercase code. US states, DC, US territories and Canadian provinces given by name
/// are mapped to their code (the SDKs hash `california` as-is, which never matches). Other
/// regions: Meta asks for the lowercase name without punctuation or spaces, so a name we do not
/// know is sent in that form (the param builder's "truncate to 2 letters" would turn
/// `Bavaria` into `ba`, a different region).
fn state(s: &str, out: &mut String) -> bool {
    letters_lower(s, out);
    if out.chars().count() <= 2 {
        return out.len() == 2 && out.is_ascii();
    }
    if let Some(code) = REGION_NAMES
        .iter()
        .find(|(name, _)| *name == out.as_str())
        .map(|(_, code)| *code)
    {
        out.clear();
        out.push_str(code);
    }
    true
}

/// Lowercase, no spaces or dashes; US ZIP+4 (`94025-1234`) keeps the first 5 digits as Meta asks.
/// Other dashed codes (Portugal `1000-001`, Poland `00-950`) keep all their characters without the
/// dash (Python's "text before the first dash" would lose half of them).
fn zip(s: &str, out: &mut String) -> bool {
    let b = s.as_bytes();
    let zip_plus4 = b.len() == 10
        && b[5] == b'-'
        && b[..5].iter().all(u8::is_ascii_digit)
        && b[6..].iter().all(u8::is_ascii_digit);
    let s = if zip_plus4 { &s[..5] } else { s };
    for c in s.chars() {
        match c {
            'a'..='z' | '0'..='9' => out.push(c),
            'A'..='Z' => out.push(c.to_ascii_lowercase()),
            ' ' | '-' | '\u{a0}' => {}
            _ => return false,
        }
    }
    out.len() >= 2
}

/// ISO 3166-1 alpha-2, lowercase. Names and alpha-3 codes of common countries are mapped (the
/// SDKs reject them); anything else that is not a valid alpha-2 code is dropped.
fn country(s: &str, out: &mut String) -> bool {
    letters_lower(s, out);
    if out.len() == 2 && out.is_ascii() {
        if out == "uk" {
            out.clear();
            out.push_str("gb");
            return true;
        }
        return ISO_ALPHA2.binary_search(&out.as_str()).is_ok();
    }
    match COUNTRY_NAMES.iter().find(|(name, _)| *name == out.as_str()) {
        Some((_, code)) => {
            out.clear();
            out.push_str(code);
            true
        }
        None => false,
    }
}

/// `YYYYMMDD`. Accepted inputs: `YYYYMMDD`, `YYYY-MM-DD` (any of `-` `/` `.` or space as
/// separator), and `D/M/YYYY` or `M/D/YYYY` **only when unambiguous** (one part > 12, or both
/// equal). `02/03/1990` could be either and is dropped rather than hashed as a wrong date. The
/// year must lie in 1900..=`max_year` (the current year) and the date must exist.
fn date_of_birth(s: &str, max_year: i32, out: &mut String) -> bool {
    let mut parts = [0u32; 3];
    let mut lens = [0usize; 3];
    let mut n = 0usize;
    // An ISO timestamp (`1990-02-14T00:00:00Z`) carries the date before the `T`.
    let s = s.split_once('T').map_or(s, |(date, _)| date);
    for part in s.split(['-', '/', '.', ' ']).filter(|p| !p.is_empty()) {
        if n == 3 || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let Ok(v) = part.parse::<u32>() else {
            return false;
        };
        parts[n] = v;
        lens[n] = part.len();
        n += 1;
    }
    let (y, m, d) = match (n, lens) {
        (1, [8, _, _]) => (parts[0] / 10_000, parts[0] / 100 % 100, parts[0] % 100),
        (3, [4, 1..=2, 1..=2]) => (parts[0], parts[1], parts[2]),
        (3, [1..=2, 1..=2, 4]) => {
            let (a, b, y) = (parts[0], parts[1], parts[2]);
            if a > 12 || a == b {
                (y, b, a)
            } else if b > 12 {
                (y, a, b)
            } else {
                return false;
            }
        }
        _ => return false,
    };
    let Ok(year) = i32::try_from(y) else {
        return false;
    };
    if !(1900..=max_year).contains(&year) || !(1..=12).contains(&m) {
        return false;
    }
    if d < 1 || d > days_in_month(year, m) {
        return false;
    }
    use std::fmt::Write as _;
    write!(out, "{y:04}{m:02}{d:02}").is_ok()
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The calendar year of a unix-milliseconds instant (UTC), for the date-of-birth upper bound.
pub fn year_of(unix_ms: i64) -> i32 {
    // Howard Hinnant's civil-from-days, year part only.
    let days = unix_ms.div_euclid(86_400_000) + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400 + i64::from(mp >= 10);
    i32::try_from(year).unwrap_or(i32::MAX)
}

/// `f` or `m`. Meta's enum has only these two; other values are dropped.
fn gender(s: &str, out: &mut String) -> bool {
    letters_lower(s, out);
    let code = match out.as_str() {
        "f" | "female" | "woman" | "women" | "girl" | "feminine" | "fem" | "lady" | "w"
        | "weiblich" | "femme" | "femenino" | "mujer" => "f",
        "m" | "male" | "man" | "men" | "boy" | "masculine" | "gentleman" | "mannlich"
        | "männlich" | "homme" | "masculino" | "hombre" => "m",
        _ => return false,
    };
    out.clear();
    out.push_str(code);
    true
}

/// Trimmed, lowercased, whitespace removed, then hashed (§7.8). The SDKs send `external_id`
/// raw; Meta's param builder and Stape hash it in this form, and Meta's browser pixel hashes its
/// `external_id` too, so this is the form that matches the pixel and other channels.
fn external_id(s: &str, out: &mut String) -> bool {
    for c in s.chars().filter(|c| !c.is_whitespace()) {
        out.extend(c.to_lowercase());
    }
    true
}

/// Region names (letters only, lowercase) → code. US states, DC and territories (ANSI/USPS),
/// Canadian provinces and territories.
static REGION_NAMES: &[(&str, &str)] = &[
    ("alabama", "al"),
    ("alaska", "ak"),
    ("arizona", "az"),
    ("arkansas", "ar"),
    ("california", "ca"),
    ("colorado", "co"),
    ("connecticut", "ct"),
    ("delaware", "de"),
    ("districtofcolumbia", "dc"),
    ("washingtondc", "dc"),
    ("florida", "fl"),
    ("georgia", "ga"),
    ("hawaii", "hi"),
    ("idaho", "id"),
    ("illinois", "il"),
    ("indiana", "in"),
    ("iowa", "ia"),
    ("kansas", "ks"),
    ("kentucky", "ky"),
    ("louisiana", "la"),
    ("maine", "me"),
    ("maryland", "md"),
    ("massachusetts", "ma"),
    ("michigan", "mi"),
    ("minnesota", "mn"),
    ("mississippi", "ms"),
    ("missouri", "mo"),
    ("montana", "mt"),
    ("nebraska", "ne"),
    ("nevada", "nv"),
    ("newhampshire", "nh"),
    ("newjersey", "nj"),
    ("newmexico", "nm"),
    ("newyork", "ny"),
    ("northcarolina", "nc"),
    ("northdakota", "nd"),
    ("ohio", "oh"),
    ("oklahoma", "ok"),
    ("oregon", "or"),
    ("pennsylvania", "pa"),
    ("rhodeisland", "ri"),
    ("southcarolina", "sc"),
    ("southdakota", "sd"),
    ("tennessee", "tn"),
    ("texas", "tx"),
    ("utah", "ut"),
    ("vermont", "vt"),
    ("virginia", "va"),
    ("washington", "wa"),
    ("westvirginia", "wv"),
    ("wisconsin", "wi"),
    ("wyoming", "wy"),
    ("americansamoa", "as"),
    ("guam", "gu"),
    ("northernmarianaislands", "mp"),
    ("puertorico", "pr"),
    ("usvirginislands", "vi"),
    ("alberta", "ab"),
    ("britishcolumbia", "bc"),
    ("manitoba", "mb"),
    ("newbrunswick", "nb"),
    ("newfoundlandandlabrador", "nl"),
    ("novascotia", "ns"),
    ("northwestterritories", "nt"),
    ("nunavut", "nu"),
    ("ontario", "on"),
    ("princeedwardisland", "pe"),
    ("quebec", "qc"),
    ("québec", "qc"),
    ("saskatchewan", "sk"),
    ("yukon", "yt"),
];

/// Country names, common native names and alpha-3 codes (letters only, lowercase) → alpha-2.
static COUNTRY_NAMES: &[(&str, &str)] = &[
    ("unitedstates", "us"),
    ("unitedstatesofamerica", "us"),
    ("usa", "us"),
    ("america", "us"),
    ("unitedkingdom", "gb"),
    ("greatbritain", "gb"),
    ("britain", "gb"),
    ("england", "gb"),
    ("scotland", "gb"),
    ("wales", "gb"),
    ("northernireland", "gb"),
    ("gbr", "gb"),
    ("germany", "de"),
    ("deutschland", "de"),
    ("deu", "de"),
    ("france", "fr"),
    ("fra", "fr"),
    ("spain", "es"),
    ("españa", "es"),
    ("espana", "es"),
    ("esp", "es"),
    ("italy", "it"),
    ("italia", "it"),
    ("ita", "it"),
    ("netherlands", "nl"),
    ("thenetherlands", "nl"),
    ("holland", "nl"),
    ("nederland", "nl"),
    ("nld", "nl"),
    ("belgium", "be"),
    ("belgique", "be"),
    ("belgië", "be"),
    ("austria", "at"),
    ("österreich", "at"),
    ("switzerland", "ch"),
    ("schweiz", "ch"),
    ("suisse", "ch"),
    ("che", "ch"),
    ("ireland", "ie"),
    ("portugal", "pt"),
    ("poland", "pl"),
    ("polska", "pl"),
    ("sweden", "se"),
    ("sverige", "se"),
    ("norway", "no"),
    ("norge", "no"),
    ("denmark", "dk"),
    ("danmark", "dk"),
    ("finland", "fi"),
    ("suomi", "fi"),
    ("czechia", "cz"),
    ("czechrepublic", "cz"),
    ("greece", "gr"),
    ("hungary", "hu"),
    ("romania", "ro"),
    ("bulgaria", "bg"),
    ("croatia", "hr"),
    ("ukraine", "ua"),
    ("turkey", "tr"),
    ("türkiye", "tr"),
    ("turkiye", "tr"),
    ("russia", "ru"),
    ("russianfederation", "ru"),
    ("canada", "ca"),
    ("can", "ca"),
    ("mexico", "mx"),
    ("méxico", "mx"),
    ("mex", "mx"),
    ("brazil", "br"),
    ("brasil", "br"),
    ("bra", "br"),
    ("argentina", "ar"),
    ("chile", "cl"),
    ("colombia", "co"),
    ("peru", "pe"),
    ("australia", "au"),
    ("aus", "au"),
    ("newzealand", "nz"),
    ("japan", "jp"),
    ("jpn", "jp"),
    ("china", "cn"),
    ("chn", "cn"),
    ("india", "in"),
    ("ind", "in"),
    ("southkorea", "kr"),
    ("korea", "kr"),
    ("republicofkorea", "kr"),
    ("singapore", "sg"),
    ("hongkong", "hk"),
    ("taiwan", "tw"),
    ("indonesia", "id"),
    ("malaysia", "my"),
    ("philippines", "ph"),
    ("thailand", "th"),
    ("vietnam", "vn"),
    ("israel", "il"),
    ("unitedarabemirates", "ae"),
    ("uae", "ae"),
    ("saudiarabia", "sa"),
    ("egypt", "eg"),
    ("southafrica", "za"),
    ("nigeria", "ng"),
    ("kenya", "ke"),
    ("morocco", "ma"),
];

/// Every ISO 3166-1 alpha-2 code, lowercase, sorted (binary searched).
static ISO_ALPHA2: &[&str] = &[
    "ad", "ae", "af", "ag", "ai", "al", "am", "ao", "aq", "ar", "as", "at", "au", "aw", "ax", "az",
    "ba", "bb", "bd", "be", "bf", "bg", "bh", "bi", "bj", "bl", "bm", "bn", "bo", "bq", "br", "bs",
    "bt", "bv", "bw", "by", "bz", "ca", "cc", "cd", "cf", "cg", "ch", "ci", "ck", "cl", "cm", "cn",
    "co", "cr", "cu", "cv", "cw", "cx", "cy", "cz", "de", "dj", "dk", "dm", "do", "dz", "ec", "ee",
    "eg", "eh", "er", "es", "et", "fi", "fj", "fk", "fm", "fo", "fr", "ga", "gb", "gd", "ge", "gf",
    "gg", "gh", "gi", "gl", "gm", "gn", "gp", "gq", "gr", "gs", "gt", "gu", "gw", "gy", "hk", "hm",
    "hn", "hr", "ht", "hu", "id", "ie", "il", "im", "in", "io", "iq", "ir", "is", "it", "je", "jm",
    "jo", "jp", "ke", "kg", "kh", "ki", "km", "kn", "kp", "kr", "kw", "ky", "kz", "la", "lb", "lc",
    "li", "lk", "lr", "ls", "lt", "lu", "lv", "ly", "ma", "mc", "md", "me", "mf", "mg", "mh", "mk",
    "ml", "mm", "mn", "mo", "mp", "mq", "mr", "ms", "mt", "mu", "mv", "mw", "mx", "my", "mz", "na",
    "nc", "ne", "nf", "ng", "ni", "nl", "no", "np", "nr", "nu", "nz", "om", "pa", "pe", "pf", "pg",
    "ph", "pk", "pl", "pm", "pn", "pr", "ps", "pt", "pw", "py", "qa", "re", "ro", "rs", "ru", "rw",
    "sa", "sb", "sc", "sd", "se", "sg", "sh", "si", "sj", "sk", "sl", "sm", "sn", "so", "sr", "ss",
    "st", "sv", "sx", "sy", "sz", "tc", "td", "tf", "tg", "th", "tj", "tk", "tl", "tm", "tn", "to",
    "tr", "tt", "tv", "tw", "tz", "ua", "ug", "um", "us", "uy", "uz", "va", "vc", "ve", "vg", "vi",
    "vn", "vu", "wf", "ws", "ye", "yt", "za", "zm", "zw",
];

/// A name → code lookup table.
#[cfg(test)]
pub(crate) type NameTable = &'static [(&'static str, &'static str)];

#[cfg(test)]
pub(crate) fn tables() -> (&'static [&'static str], NameTable, NameTable) {
    (ISO_ALPHA2, COUNTRY_NAMES, REGION_NAMES)
}

#[cfg(test)]
mod tests;
