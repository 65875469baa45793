//! Counting what a piece of code records, for tests (metrics-util's debugging recorder,
//! installed for the current thread only).

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

type Labels = Vec<(String, String)>;

/// Counter values recorded while a closure ran on this thread: (name, labels, value).
pub struct Recorded(Vec<(String, Labels, u64)>);

impl Recorded {
    /// Sum of `name` over series whose labels include every `(key, value)` of `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Every recorded counter series: (name, labels).
    pub fn series(&self) -> impl Iterator<Item = (&str, &[(String, String)])> {
        self.0.iter().map(|(n, l, _)| (n.as_str(), l.as_slice()))
    }
}

/// Runs `f` with a fresh recorder for this thread and returns what it counted.
pub fn recording<T>(f: impl FnOnce() -> T) -> (T, Recorded) {
    let recorder = DebuggingRecorder::new();
    let snapshotter: Snapshotter = recorder.snapshotter();
    let out = metrics::with_local_recorder(&recorder, f);
    let counters = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(v) => {
                let key = key.key();
                let labels = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                Some((key.name().to_owned(), labels, v))
            }
            _ => None,
        })
        .collect();
    (out, Recorded(counters))
}
