//! Consent Mode signals carried by `/g/collect` (`gcs`, `gcd`, `npa`), decoded into
//! per-signal states. The browser protocol is not published by Google; the readings below
//! follow reverse-engineered sources (wire-formats §1.2, §7.17) and stay conservative:
//! anything we cannot read with certainty is `Unknown`, never `Granted`.

use crate::event::{Consent, ConsentState};

/// Fills the four signal states from the raw strings already stored in `consent`.
///
/// Precedence: `gcd` (Consent Mode v2) wins wherever its letter is definite, `gcs` fills
/// `ad_storage`/`analytics_storage` otherwise, and `npa=1` marks `ad_personalization` denied
/// when nothing else decided it (non-personalised ads requested).
pub fn decode_consent(consent: &mut Consent) {
    let [gcs_ad, gcs_analytics] = consent
        .gcs
        .as_deref()
        .map_or([ConsentState::Unknown; 2], decode_gcs);
    let [ad, analytics, user_data, personalization] = consent
        .gcd
        .as_deref()
        .map_or([ConsentState::Unknown; 4], decode_gcd);

    consent.ad_storage = definite_or(ad, gcs_ad);
    consent.analytics_storage = definite_or(analytics, gcs_analytics);
    consent.ad_user_data = user_data;
    consent.ad_personalization = personalization;
    if consent.ad_personalization.is_unknown() && consent.npa.as_deref() == Some("1") {
        consent.ad_personalization = ConsentState::Denied;
    }
}

fn definite_or(primary: ConsentState, fallback: ConsentState) -> ConsentState {
    if primary.is_unknown() {
        fallback
    } else {
        primary
    }
}

/// `gcs` = `G1` + ad_storage digit + analytics_storage digit (`1` granted, `0` denied).
///
/// Sources disagree whether the `1` after `G` is a version or a "functional" signal (§7.17);
/// both readings put ad_storage and analytics_storage in the last two positions of the
/// four-character form, so that is the only form we decode.
pub fn decode_gcs(gcs: &str) -> [ConsentState; 2] {
    match gcs.as_bytes() {
        [b'G', b'1', ad, analytics] => [gcs_digit(*ad), gcs_digit(*analytics)],
        _ => [ConsentState::Unknown; 2],
    }
}

fn gcs_digit(b: u8) -> ConsentState {
    match b {
        b'1' => ConsentState::Granted,
        b'0' => ConsentState::Denied,
        _ => ConsentState::Unknown,
    }
}

/// `gcd` = a two-digit prefix (`13` in current captures, `11` in 2024 write-ups; both start
/// with `1`), then one letter each for ad_storage, analytics_storage, ad_user_data,
/// ad_personalization, the letters separated by single digits (e.g. `13t3t3t2t5l1`; what
/// follows the fourth letter is not a consent signal we model).
///
/// Letters: `l` not set; `p` (denied by default) and `q`/`m`/`u` (denied by update) are
/// denied; `t` (granted by default) and `r`/`e`/`n`/`v` (granted by update) are granted.
/// Any other letter (captures show e.g. `Z`) is unknown. A string that does not have this
/// shape yields all-unknown rather than a guess from misaligned positions.
pub fn decode_gcd(gcd: &str) -> [ConsentState; 4] {
    let unknown = [ConsentState::Unknown; 4];
    let rest = match gcd.as_bytes() {
        [b'1', d, rest @ ..] if d.is_ascii_digit() => rest,
        _ => return unknown,
    };
    // Positions 0, 2, 4, 6 hold the four letters; 1, 3, 5 the separating digits.
    let Some(&[a, d1, b, d2, c, d3, e]) = rest.get(..7).and_then(|s| <&[u8; 7]>::try_from(s).ok())
    else {
        return unknown;
    };
    let letters = [a, b, c, e];
    if !letters.iter().all(u8::is_ascii_alphabetic) || ![d1, d2, d3].iter().all(u8::is_ascii_digit)
    {
        return unknown;
    }
    letters.map(gcd_letter)
}

fn gcd_letter(b: u8) -> ConsentState {
    match b {
        b'p' | b'q' | b'm' | b'u' => ConsentState::Denied,
        b't' | b'r' | b'e' | b'n' | b'v' => ConsentState::Granted,
        _ => ConsentState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConsentState::{Denied as D, Granted as G, Unknown as U};

    #[test]
    fn gcs_forms() {
        assert_eq!(decode_gcs("G111"), [G, G]);
        assert_eq!(decode_gcs("G100"), [D, D]);
        assert_eq!(decode_gcs("G101"), [D, G]);
        assert_eq!(decode_gcs("G110"), [G, D]);
        assert_eq!(decode_gcs("G1--"), [U, U]);
        for bad in ["", "G1", "G11", "G1111", "X111", "G211"] {
            assert_eq!(decode_gcs(bad), [U, U], "{bad}");
        }
    }

    #[test]
    fn gcd_forms() {
        assert_eq!(decode_gcd("13t3t3t2t5l1"), [G, G, G, G]);
        assert_eq!(decode_gcd("13p3t3p2p5l1"), [D, G, D, D]);
        assert_eq!(decode_gcd("13l3l3l3l1l1"), [U, U, U, U]);
        assert_eq!(decode_gcd("13q3r3m2e5l1"), [D, G, D, G]);
        assert_eq!(decode_gcd("13u3n3v2Z5l1"), [D, G, G, U]);
        // Exactly the four letters with separators is enough.
        assert_eq!(decode_gcd("13t3p3t3p"), [G, D, G, D]);
        assert_eq!(decode_gcd("11p1t1p1t5"), [D, G, D, G]);
        for bad in [
            "",
            "13",
            "13t3t3t",
            "23t3t3t3t5l1",
            "1xt3t3t3t5l1",
            "13tt3t3t5l1",
            "13t3t3t3",
            "13é3t3t3t",
        ] {
            assert_eq!(decode_gcd(bad), [U, U, U, U], "{bad}");
        }
    }

    #[test]
    fn gcd_wins_where_definite_and_npa_fills_personalization() {
        let mut c = Consent {
            gcs: Some("G111".into()),
            gcd: Some("13p3l3t2l5l1".into()),
            npa: Some("1".into()),
            ..Default::default()
        };
        decode_consent(&mut c);
        assert_eq!(
            [
                c.ad_storage,
                c.analytics_storage,
                c.ad_user_data,
                c.ad_personalization
            ],
            [D, G, G, D]
        );

        let mut c = Consent {
            gcs: Some("G100".into()),
            npa: Some("0".into()),
            ..Default::default()
        };
        decode_consent(&mut c);
        assert_eq!(
            [
                c.ad_storage,
                c.analytics_storage,
                c.ad_user_data,
                c.ad_personalization
            ],
            [D, D, U, U]
        );
    }
}
