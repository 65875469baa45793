//! Names the commit a binary was built from, for `tagrelay --version` and the
//! `tagrelay_build_info` metric: `git rev-parse` when the source is a git checkout, else
//! `$TAGRELAY_GIT_SHA` (a container build, whose context has no `.git`), else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TAGRELAY_GIT_SHA");
    let commit = from_git()
        .or_else(from_env)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TAGRELAY_COMMIT={commit}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=7", "HEAD"])?;
    // Rebuild when HEAD moves: HEAD itself, the branch it names (a worktree keeps HEAD in
    // its own git dir and branches in the common one, which `--git-path` resolves),
    // packed-refs, and HEAD's reflog (written on every commit and checkout, also when the
    // branch lives only in packed-refs). Only existing files: Cargo reruns the script every
    // build for a missing one.
    let mut watched = vec![
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--git-path", "logs/HEAD"]),
    ];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched.into_iter().flatten() {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}

fn from_env() -> Option<String> {
    let sha = std::env::var("TAGRELAY_GIT_SHA").ok()?;
    let sha = sha.trim();
    // A label value and a version string: short and printable, like git's.
    if sha.is_empty() {
        return None;
    }
    if !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        println!("cargo:warning=TAGRELAY_GIT_SHA is not a commit id (hex digits); ignored");
        return None;
    }
    Some(sha.chars().take(7).collect())
}
