//! GA4's collection limits and reserved names, shared by the Measurement Protocol client (which
//! validates what comes in) and the GA4 tag (which must never send what GA4 would reject).

pub const MAX_EVENTS: usize = 25;
pub const MAX_PARAMS: usize = 25;
pub const MAX_USER_PROPERTIES: usize = 25;
pub const MAX_ITEMS: usize = 200;
/// Sources disagree (10 on the MP sending-events page, 27 in the events reference and the GA4
/// collection limits); 27 is what GA4 actually collects, so nothing GA4 keeps is dropped.
pub const MAX_ITEM_CUSTOM_PARAMS: usize = 27;
pub const MAX_NAME_LEN: usize = 40;
pub const MAX_USER_PROPERTY_NAME_LEN: usize = 24;
pub const MAX_USER_PROPERTY_VALUE_LEN: usize = 36;
pub const MAX_PARAM_VALUE_LEN: usize = 100;
/// Page fields have longer limits than the 100-character parameter limit.
pub const MAX_PAGE_LOCATION_LEN: usize = 1000;
pub const MAX_PAGE_REFERRER_LEN: usize = 420;
pub const MAX_PAGE_TITLE_LEN: usize = 300;
pub const MAX_USER_ID_LEN: usize = 256;

/// Event names GA4 reserves for its own automatic collection (MP reference).
const RESERVED_EVENTS: &[&str] = &[
    "ad_activeview",
    "ad_click",
    "ad_exposure",
    "ad_query",
    "ad_reward",
    "adunit_exposure",
    "app_background",
    "app_clear_data",
    "app_exception",
    "app_install",
    "app_remove",
    "app_store_refund",
    "app_update",
    "app_upgrade",
    "dynamic_link_app_open",
    "dynamic_link_app_update",
    "dynamic_link_first_open",
    "error",
    "first_open",
    "first_visit",
    "notification_dismiss",
    "notification_foreground",
    "notification_open",
    "notification_receive",
    "notification_send",
    "os_update",
    "session_start",
    "user_engagement",
];
/// Reserved only for app streams (requests identified by `firebase_app_id`).
const RESERVED_APP_EVENTS: &[&str] = &["ad_impression", "in_app_purchase", "screen_view"];
const RESERVED_EVENT_PREFIXES: &[&str] = &["_", "firebase_", "ga_", "google_", "gtag."];
const RESERVED_PARAMS: &[&str] = &["firebase_conversion"];
const RESERVED_PARAM_PREFIXES: &[&str] = &["_", "firebase_", "ga_", "google_", "gtag."];
const RESERVED_USER_PROPERTIES: &[&str] = &[
    "first_open_time",
    "first_visit_time",
    "last_deep_link_referrer",
    "user_id",
    "first_open_after_install",
];
const RESERVED_USER_PROPERTY_PREFIXES: &[&str] = &["_", "firebase_", "ga_", "google_"];

fn reserved(name: &str, names: &[&str], prefixes: &[&str]) -> bool {
    names.contains(&name) || prefixes.iter().any(|p| name.starts_with(p))
}

/// Is `name` an event name GA4 reserves (and so never accepts over Measurement Protocol)?
pub fn is_reserved_event_name(name: &str, app_stream: bool) -> bool {
    reserved(name, RESERVED_EVENTS, RESERVED_EVENT_PREFIXES)
        || (app_stream && RESERVED_APP_EVENTS.contains(&name))
}

pub fn is_reserved_param_name(name: &str) -> bool {
    reserved(name, RESERVED_PARAMS, RESERVED_PARAM_PREFIXES)
}

pub fn is_reserved_user_property_name(name: &str) -> bool {
    reserved(
        name,
        RESERVED_USER_PROPERTIES,
        RESERVED_USER_PROPERTY_PREFIXES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names() {
        for n in [
            "session_start",
            "firebase_campaign",
            "_x",
            "gtag.config",
            "notification_open",
        ] {
            assert!(is_reserved_event_name(n, false), "{n}");
        }
        assert!(!is_reserved_event_name("purchase", false));
        assert!(!is_reserved_event_name("screen_view", false));
        assert!(is_reserved_event_name("screen_view", true));
        assert!(is_reserved_param_name("firebase_conversion") && is_reserved_param_name("ga_x"));
        assert!(!is_reserved_param_name("value"));
        assert!(is_reserved_user_property_name("user_id"));
        assert!(!is_reserved_user_property_name("plan"));
    }
}
