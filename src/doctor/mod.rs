//! `tagrelay doctor`: checks that tell an operator whether a deployment does what they expect
//! of it, before deploying (the CLI) and while running (background monitors).

pub mod itp;
