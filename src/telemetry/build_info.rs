//! What this binary is: its version and the commit it was built from (`build.rs`).

/// The crate version, `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit's short id, or `unknown` when the build saw neither git nor `TAGRELAY_GIT_SHA`.
pub const COMMIT: &str = env!("TAGRELAY_COMMIT");

/// `0.1.0 (abc1234)`, as `tagrelay --version` prints it.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("TAGRELAY_COMMIT"),
    ")"
);
