//! The ingress side of backend orders: each order event is claimed once (idempotency), looked
//! up, enriched; its claim is committed once the events are durable in the outbox, or
//! released when they are not, so the platform's retry is taken again.

use std::sync::Arc;

use super::{enrich, Claim, OrderLedger, SessionRecord, SessionStore, StoreError, StoreKey};
use crate::event::{Event, KeyKind};

/// The stores and settings the ingress stitches with.
#[derive(Clone)]
pub struct Stitching {
    pub sessions: Arc<dyn SessionStore>,
    pub ledger: Arc<dyn OrderLedger>,
    /// `[stitching] enabled`: look orders up (and record sessions).
    pub enabled: bool,
    pub dedup_window_ms: i64,
}

impl std::fmt::Debug for Stitching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stitching")
            .field("enabled", &self.enabled)
            .field("dedup_window_ms", &self.dedup_window_ms)
            .finish_non_exhaustive()
    }
}

/// Why a webhook's events could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StitchError {
    /// Another request is sending the same order event right now.
    #[error("this order is being taken by another request; retry shortly")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Claims a webhook's events hold until they are settled.
#[derive(Debug, Default)]
#[must_use = "claims must be settled (committed or released)"]
pub struct Prepared {
    claims: Vec<String>,
    /// Sessions to record once the events are stored: each stitched purchase under its
    /// transaction id, so its refunds find the same visitor.
    follow_up: Vec<SessionRecord>,
    /// Events dropped because they were sent before (within the window).
    pub duplicates: usize,
    /// Events dropped because the order is older than the window.
    pub too_old: usize,
}

impl Stitching {
    /// Claims every order event of `events` (the others pass untouched), drops those sent
    /// before, and joins the rest to their sessions. On error every claim made is released.
    pub async fn prepare(
        &self,
        events: &mut Vec<Event>,
        now_ms: i64,
    ) -> Result<Prepared, StitchError> {
        let mut prepared = Prepared::default();
        let mut keep = Vec::with_capacity(events.len());
        for mut e in std::mem::take(events) {
            let Some(key) = e.stitch.as_ref().map(|s| s.dedup_key.clone()) else {
                keep.push(e);
                continue;
            };
            if e.timestamp_ms > 0 && e.timestamp_ms < now_ms - self.dedup_window_ms {
                metrics::counter!("tagrelay_stitch_orders_total", "client" => source_label(&e), "result" => "too_old").increment(1);
                prepared.too_old += 1;
                continue;
            }
            let claim = match self.ledger.claim(&key, now_ms).await {
                Ok(c) => c,
                Err(err) => {
                    self.release(prepared, now_ms).await;
                    return Err(err.into());
                }
            };
            match claim {
                Claim::Done { .. } => {
                    metrics::counter!("tagrelay_stitch_orders_total", "client" => source_label(&e), "result" => "duplicate").increment(1);
                    prepared.duplicates += 1;
                    continue;
                }
                Claim::Busy => {
                    self.release(prepared, now_ms).await;
                    return Err(StitchError::Busy);
                }
                Claim::Fresh => prepared.claims.push(key),
            }
            if let Err(err) = self.join(&mut e, now_ms, &mut prepared).await {
                self.release(prepared, now_ms).await;
                return Err(err.into());
            }
            keep.push(e);
        }
        *events = keep;
        Ok(prepared)
    }

    /// Looks the order's keys up and enriches the event.
    async fn join(
        &self,
        e: &mut Event,
        now_ms: i64,
        prepared: &mut Prepared,
    ) -> Result<(), StoreError> {
        let Some(st) = e.stitch.as_deref_mut() else {
            return Ok(());
        };
        let lookup = std::mem::take(&mut st.lookup);
        let mut keys = Vec::with_capacity(lookup.len());
        let mut fields = Vec::with_capacity(lookup.len());
        for k in &lookup {
            if let Some(sk) = StoreKey::new(k.kind, &k.value) {
                if !keys.contains(&sk) {
                    keys.push(sk);
                    fields.push(k.field.clone());
                }
            }
        }
        st.tried = fields.clone();
        let found = if self.enabled && !keys.is_empty() {
            self.sessions.find(&keys, now_ms).await?
        } else {
            None
        };
        match found {
            Some(f) => {
                let field = fields.get(f.index).cloned().unwrap_or_default();
                enrich::stitched(e, &f, &field);
                metrics::counter!("tagrelay_stitch_orders_total", "client" => source_label(e), "result" => "stitched").increment(1);
                if self.enabled && e.event_name == "purchase" {
                    if let Some(k) = e
                        .transaction_id
                        .as_deref()
                        .and_then(|t| StoreKey::new(KeyKind::Reference, t))
                    {
                        prepared.follow_up.push(SessionRecord {
                            keys: vec![(k, "transaction_id".into())],
                            client_id: e.client_id.as_deref().map(str::to_owned),
                            email: e
                                .user_data
                                .email_address
                                .as_deref()
                                .and_then(super::email_hash),
                            snapshot: enrich::snapshot_of(e),
                        });
                    }
                }
            }
            None => {
                enrich::unstitched(e);
                metrics::counter!("tagrelay_stitch_orders_total", "client" => source_label(e), "result" => "unstitched").increment(1);
            }
        }
        Ok(())
    }

    /// The events are durable (`stored`): the claims become "sent" and the follow-up sessions
    /// are recorded. Not stored: the claims are released so the platform's retry is taken.
    pub async fn settle(&self, prepared: Prepared, stored: bool, now_ms: i64) {
        if stored {
            if !prepared.follow_up.is_empty() {
                self.sessions.record(prepared.follow_up);
            }
            if prepared.claims.is_empty() {
                return;
            }
            if let Err(err) = self.ledger.settle(&prepared.claims, true, now_ms).await {
                // The events are stored and will be delivered; only a resend of this order
                // could now go out twice (with the same event ids, which vendors deduplicate).
                tracing::warn!(error = %err, "could not record the orders as sent; a resend of them would be sent again");
            }
        } else {
            self.release(prepared, now_ms).await;
        }
    }

    async fn release(&self, prepared: Prepared, now_ms: i64) {
        if prepared.claims.is_empty() {
            return;
        }
        if let Err(err) = self.ledger.settle(&prepared.claims, false, now_ms).await {
            tracing::warn!(error = %err, "could not release order claims; they free themselves when the store restarts");
        }
    }

    /// Hands a hit's session records to the store (never waits).
    pub fn record(&self, records: Vec<SessionRecord>) {
        if self.enabled && !records.is_empty() {
            self.sessions.record(records);
        }
    }
}

/// The client kind as a bounded metric label.
fn source_label(e: &Event) -> &'static str {
    match e.source.as_str() {
        "shopify" => "shopify",
        "woocommerce" => "woocommerce",
        "stripe" => "stripe",
        _ => "other",
    }
}
