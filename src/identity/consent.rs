//! Consent gating of identifier storage.

use crate::event::{Consent, ConsentState, Event};
use crate::identity::config::{ConsentDefault, CookiesConfig};

/// Whether the storage signal picked by `signal` permits reading and writing stored
/// identifiers for this request.
///
/// Cookies are per response but consent is per event, so a batch is allowed only when every
/// event allows it: one denied event in the batch is enough to hold the cookie back. `Unknown`
/// resolves to `consent_default`. Without `require_consent` storage is always allowed.
pub(crate) fn storage_allowed(
    config: &CookiesConfig,
    events: &[Event],
    signal: fn(&Consent) -> ConsentState,
) -> bool {
    if !config.require_consent {
        return true;
    }
    let default_granted = config.consent_default == ConsentDefault::Granted;
    let granted = |state: ConsentState| match state {
        ConsentState::Granted => true,
        ConsentState::Denied => false,
        ConsentState::Unknown => default_granted,
    };
    if events.is_empty() {
        return default_granted;
    }
    events.iter().all(|e| granted(signal(&e.consent)))
}
