//! Meta customer-information normalisation and hashing: the shared match-key normaliser
//! (`tags::match_keys`) under Meta's policy. The rules and the decisions per key are there.

use crate::tags::match_keys::{self, Policy};
pub use crate::tags::match_keys::{as_prehashed, sha256_hex, year_of, Hashed, Hex64, Key};

/// Normalises `input` for `key` by Meta's rules and hashes it, or passes an existing SHA-256
/// through.
pub fn normalize_and_hash(key: Key, input: &str, max_year: i32, scratch: &mut String) -> Hashed {
    match_keys::normalize_and_hash(Policy::Meta, key, input, max_year, scratch)
}

/// The normalised, unhashed form by Meta's rules (tests and the debug view).
pub fn normalized(key: Key, input: &str, max_year: i32) -> Option<String> {
    match_keys::normalized(Policy::Meta, key, input, max_year)
}

#[cfg(test)]
pub(crate) fn tables() -> (
    &'static [&'static str],
    match_keys::NameTable,
    match_keys::NameTable,
) {
    match_keys::tables()
}
