//! Golden tables per platform: input → normalised form → hash. Inputs and target forms are the
//! examples the reference carries from each vendor (ad-platforms §1.3, §2.3, §8; wire-formats
//! §3.4); hashes were computed with `sha256sum` over the normalised form.

use super::*;

const YEAR: i32 = 2026;

fn check(policy: Policy, rows: &[(Key, &str, Option<&str>)]) {
    for (key, input, want) in rows {
        assert_eq!(
            normalized(policy, *key, input, YEAR).as_deref(),
            *want,
            "{policy:?} {key:?} {input:?}"
        );
    }
}

fn hash(policy: Policy, key: Key, input: &str) -> Hashed {
    normalize_and_hash(policy, key, input, YEAR, &mut String::new())
}

fn hex(h: Hashed) -> String {
    match h {
        Hashed::Value(v) => v.as_str().to_owned(),
        other => panic!("not hashed: {other:?}"),
    }
}

#[test]
fn google_forms() {
    check(
        Policy::Google,
        &[
            // gmail / googlemail: `+tag` dropped, then every dot of the local part.
            (
                Key::Em,
                " Jane.Doe+shop@Gmail.com ",
                Some("janedoe@gmail.com"),
            ),
            (
                Key::Em,
                "j.a.n.e.doe@googlemail.com",
                Some("janedoe@googlemail.com"),
            ),
            // Other domains keep dots and tags; only case and surrounding space change.
            (
                Key::Em,
                "Jane.Doe+news@Example.com",
                Some("jane.doe+news@example.com"),
            ),
            (Key::Em, "jane doe@example.com", None),
            (Key::Em, "+tag@gmail.com", None),
            (Key::Em, "nodomain@", None),
            (Key::Em, "a@b@c", None),
            // E.164 with the `+`.
            (Key::Ph, "+1 (415) 555-0100", Some("+14155550100")),
            (Key::Ph, "0044 20 7946 0958", Some("+442079460958")),
            (Key::Ph, "+44 (0)20 7946 0958", Some("+442079460958")),
            (Key::Ph, "07946 095812", None),
            // Names: lowercase, punctuation gone, inner space kept.
            (Key::Fn, "  Mary-Jane ", Some("maryjane")),
            (Key::Ln, "O'Brien", Some("obrien")),
            (Key::Fn, "Anne   Marie", Some("anne marie")),
            (Key::Fn, "Raphaël", Some("raphaël")),
            // In clear: country alpha-2 upper case, postal code trimmed only.
            (Key::Country, "us", Some("US")),
            (Key::Country, "United Kingdom", Some("GB")),
            (Key::Country, "Atlantis", None),
            (Key::Zp, " SW1A 1AA ", Some("SW1A 1AA")),
            // Keys Google's conversion APIs do not take.
            (Key::Ge, "female", None),
            (Key::ExternalId, "u-1", None),
        ],
    );
    assert_eq!(
        hex(hash(Policy::Google, Key::Em, "Jane.Doe@gmail.com")),
        "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"
    );
    assert_eq!(
        hex(hash(Policy::Google, Key::Em, "JANEDOE@googlemail.com")),
        "338abf9ef1c8793cadc7bcf51ed595338eb727ed9e06ce3d91d566d60b975937"
    );
    assert_eq!(
        hex(hash(Policy::Google, Key::Em, "jane.doe@example.com")),
        "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"
    );
    // Google's phone hash includes the `+` (not reusable for Meta, whose form has none).
    assert_eq!(
        hex(hash(Policy::Google, Key::Ph, "+1 415 555 0100")),
        "40d3f4e02db27d66cf4cfdda506c2c945f115a7955cc8491dda98ce5beabcda0"
    );
    assert_eq!(
        hex(hash(Policy::Google, Key::Fn, "Jane")),
        "81f8f6dde88365f3928796ec7aa53f72820b06db8664f5fe76a7eb13e24546a2"
    );
}

#[test]
fn tiktok_forms() {
    check(
        Policy::TikTok,
        &[
            (
                Key::Em,
                "  John.Doe@Example.COM ",
                Some("john.doe@example.com"),
            ),
            // No gmail rule at TikTok.
            (
                Key::Em,
                "Jane.Doe+x@gmail.com",
                Some("jane.doe+x@gmail.com"),
            ),
            (Key::Ph, "+1 (213) 373-4253", Some("+12133734253")),
            (Key::ExternalId, "  User123 ", Some("User123")),
            (Key::Fn, "Jane", None),
        ],
    );
    assert_eq!(
        hex(hash(Policy::TikTok, Key::Ph, "+1 213 373 4253")),
        "9f7ec22d72092cd3c0b58726ed9c2d91b92e51a3f29837508fb2948bb22dd2fd"
    );
    assert_eq!(
        hex(hash(Policy::TikTok, Key::Em, "John.Doe@Example.com")),
        "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"
    );
    // Case kept: TikTok's template hashes `User123`, not `user123`.
    assert_eq!(
        hex(hash(Policy::TikTok, Key::ExternalId, "User123")),
        "a61a8adf60038792a2cb88e670b20540a9d6c2ca204ab754fc768950e79e7d36"
    );
}

#[test]
fn meta_forms_are_unchanged() {
    // The verified rows of wire-formats §3.4 (Meta's own tests live with the Meta tag).
    check(
        Policy::Meta,
        &[
            (
                Key::Em,
                "  John.Doe@Example.COM ",
                Some("john.doe@example.com"),
            ),
            (
                Key::Em,
                "Jane.Doe+x@gmail.com",
                Some("jane.doe+x@gmail.com"),
            ),
            (Key::Ph, "+1 (650) 555-1212", Some("16505551212")),
            (Key::Fn, "  Mary-Jane ", Some("maryjane")),
            (Key::ExternalId, " User 123 ", Some("user123")),
        ],
    );
    assert_eq!(
        hex(hash(Policy::Meta, Key::Em, "John.Doe@Example.COM")),
        "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"
    );
}

#[test]
fn prehashed_values_pass_through_under_every_policy() {
    let digest = "836F82DB99121B3481011F16B49DFA5FBC714A0D1B1B9F784A1EBBBF5B39577F";
    for policy in [Policy::Meta, Policy::Google, Policy::TikTok] {
        for key in [Key::Em, Key::Ph, Key::ExternalId] {
            assert_eq!(
                hex(hash(policy, key, digest)),
                digest.to_ascii_lowercase(),
                "{policy:?} {key:?}"
            );
        }
        assert_eq!(hash(policy, Key::Em, "  "), Hashed::Absent);
        assert_eq!(hash(policy, Key::Em, "not an email"), Hashed::Invalid);
    }
}
