//! Storage engines behind the [`DeliveryStore`](crate::outbox::DeliveryStore) trait.

pub mod embedded;
