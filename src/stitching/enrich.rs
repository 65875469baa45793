//! What a backend order event takes from the browsing session it was joined to, or, when none
//! matched, what it makes of the order alone. Pure.

use sha2::{Digest, Sha256};

use super::{Found, SessionSnapshot};
use crate::event::{Event, Identity, StitchStatus};

/// Joins `e` to the session `found` by the order field `field`: the session's client and
/// session ids (GA4 attributes the order to the visit), `_fbp`/`_fbc`, click ids, IP,
/// User-Agent, page and consent (a `website` tag takes it like the visitor's own hit, and
/// the visitor's consent decides where it goes). What the session did not keep (consent)
/// stays as the order has it.
pub fn stitched(e: &mut Event, found: &Found, field: &str) {
    let s = &found.snapshot;
    if let Some(cid) = &s.client_id {
        e.client_id = Some(cid.clone());
    }
    if e.ga.measurement_id.is_none() {
        e.ga.measurement_id.clone_from(&s.measurement_id);
    }
    if s.session_id.is_some() {
        e.ga.session_id.clone_from(&s.session_id);
        e.ga.session_number = s.session_number;
    }
    fill_identity(&mut e.identity, &s.identity);
    take(&mut e.ip_override, &s.ip);
    take(&mut e.user_agent, &s.user_agent);
    take(&mut e.page_location, &s.page_location);
    take(&mut e.page_referrer, &s.page_referrer);
    if s.language.is_some() {
        e.language.clone_from(&s.language);
    }
    if !s.consent.is_empty() {
        e.consent = s.consent.clone();
    }
    if e.client_id.is_none() {
        e.client_id = Some(derived_client_id(e).into());
    }
    if let Some(st) = e.stitch.as_deref_mut() {
        st.status = StitchStatus::Stitched;
        st.key = Some(field.into());
        st.matched_event = Some(s.event_name.clone());
        st.recorded_ms = Some(s.recorded_ms);
    }
}

/// No session matched: the order goes out with what it carries (the platform's browser IP,
/// User-Agent and landing page, when it has them; a `_fbc` and click ids from that landing
/// page's query), a client id derived from the order so its refund lands on the same GA4
/// user, and marked `unstitched`.
pub fn unstitched(e: &mut Event) {
    if let Some(url) = e.page_location.clone() {
        let id = &mut e.identity;
        if id.fbc.is_none() {
            if let Some(click) = crate::identity::fbclid_from_url(&url) {
                let index = crate::event::url_host(&url)
                    .and_then(crate::identity::registrable_domain)
                    .map(|d| crate::identity::subdomain_index(&d))
                    .unwrap_or(1);
                id.fbc = Some(crate::identity::mint_fbc(index, e.timestamp_ms, &click));
            }
        }
        for (slot, param) in [
            (&mut id.gclid, "gclid"),
            (&mut id.gbraid, "gbraid"),
            (&mut id.wbraid, "wbraid"),
            (&mut id.ttclid, "ttclid"),
            (&mut id.msclkid, "msclkid"),
        ] {
            if slot.is_none() {
                *slot = crate::identity::click_id_in_url(&url, param);
            }
        }
    }
    if e.client_id.is_none() {
        e.client_id = Some(derived_client_id(e).into());
    }
    if let Some(st) = e.stitch.as_deref_mut() {
        st.status = StitchStatus::Unstitched;
    }
}

/// A GA-shaped client id (`<10 digits>.<10 digits>`) derived from the order's platform and
/// transaction id: the same for the purchase and every refund of an unstitched order, and
/// never a real visitor's.
pub fn derived_client_id(e: &Event) -> String {
    let seed = format!(
        "tagrelay-order:{}:{}",
        e.source,
        e.transaction_id.as_deref().unwrap_or(&e.event_id)
    );
    let d = Sha256::digest(seed.as_bytes());
    let part = |b: &[u8]| {
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        1_000_000_000 + n % 1_000_000_000
    };
    format!("{}.{}", part(&d[0..4]), part(&d[4..8]))
}

/// Takes the session's value when it kept one (a value the consent held back stays as the
/// order has it).
fn take(slot: &mut Option<String>, from: &Option<String>) {
    if from.is_some() {
        slot.clone_from(from);
    }
}

fn fill_identity(to: &mut Identity, from: &Identity) {
    let pairs = [
        (&mut to.fbp, &from.fbp),
        (&mut to.fbc, &from.fbc),
        (&mut to.gclid, &from.gclid),
        (&mut to.gbraid, &from.gbraid),
        (&mut to.wbraid, &from.wbraid),
        (&mut to.ttclid, &from.ttclid),
        (&mut to.ttp, &from.ttp),
        (&mut to.sccid, &from.sccid),
        (&mut to.epik, &from.epik),
        (&mut to.li_fat_id, &from.li_fat_id),
        (&mut to.msclkid, &from.msclkid),
    ];
    for (slot, v) in pairs {
        // The session's own identifiers win: the order's landing page is older than the
        // click that led to the checkout.
        if v.is_some() {
            slot.clone_from(v);
        }
    }
    if from.ga_client_id.is_some() {
        to.ga_client_id.clone_from(&from.ga_client_id);
    }
}

/// The snapshot an order event leaves for its own later events (a refund finds the purchase's
/// session by the transaction id): what the event now carries.
pub fn snapshot_of(e: &Event) -> SessionSnapshot {
    SessionSnapshot {
        recorded_ms: e.timestamp_ms,
        event_name: e.event_name.as_str().into(),
        client_id: e.client_id.clone(),
        measurement_id: e.ga.measurement_id.clone(),
        session_id: e.ga.session_id.clone(),
        session_number: e.ga.session_number,
        identity: Identity {
            debug_marker: None,
            ..e.identity.clone()
        },
        ip: e.ip_override.clone(),
        user_agent: e.user_agent.clone(),
        page_location: e.page_location.clone(),
        page_referrer: e.page_referrer.clone(),
        language: e.language.clone(),
        consent: e.consent.clone(),
    }
}
