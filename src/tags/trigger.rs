//! Triggers decide whether a tag fires for an event, and can say why not.
//! (Full condition language: see the tags issue; this file is owned by the tags work.)

use serde::Deserialize;

use crate::config::ConsentDefault;
use crate::event::{ConsentState, Event};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Event names that fire the tag; `["*"]` for all.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Consent signals that must be granted.
    #[serde(default)]
    pub consent: Vec<String>,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        TriggerConfig {
            events: all_events(),
            consent: Vec::new(),
        }
    }
}

fn all_events() -> Vec<String> {
    vec!["*".into()]
}

/// A trigger's verdict with its explanation for the debug view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub fired: bool,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Trigger {
    all_events: bool,
    events: Vec<String>,
    consent: Vec<String>,
    consent_default: ConsentDefault,
}

impl Trigger {
    pub fn build(cfg: &TriggerConfig, consent_default: ConsentDefault) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        for c in &cfg.consent {
            if !crate::event::Consent::SIGNALS.contains(&c.as_str()) {
                problems.push(format!(
                    "trigger.consent: unknown consent signal `{c}` (expected one of {})",
                    crate::event::Consent::SIGNALS.join(", ")
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Trigger {
            all_events: cfg.events.iter().any(|e| e == "*"),
            events: cfg.events.clone(),
            consent: cfg.consent.clone(),
            consent_default,
        })
    }

    pub fn evaluate(&self, event: &Event) -> Decision {
        if !self.all_events && !self.events.iter().any(|e| e == &event.event_name) {
            return Decision {
                fired: false,
                reason: format!("event `{}` is not in trigger.events", event.event_name),
            };
        }
        for c in &self.consent {
            let state = event.consent.get(c).unwrap_or(ConsentState::Unknown);
            let granted = match state {
                ConsentState::Granted => true,
                ConsentState::Denied => false,
                ConsentState::Unknown => self.consent_default == ConsentDefault::Granted,
            };
            if !granted {
                return Decision {
                    fired: false,
                    reason: format!("consent `{c}` is {state:?}").to_lowercase(),
                };
            }
        }
        Decision {
            fired: true,
            reason: "all conditions met".into(),
        }
    }
}
