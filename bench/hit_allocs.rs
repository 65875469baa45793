//! Heap allocations per hit on the pure path (see `hit_common.rs`): what the hit path makes
//! (parse, cookies, triggers, the stored payload) and what the dispatchers make later (encoding
//! for both tags), counted by dhat's allocator. Counts don't depend on the allocator or the
//! machine, so they move only when the code does.
//!
//! Run with `cargo bench --bench hit_allocs`.

use rand::rngs::StdRng;
use rand::SeedableRng;

#[path = "hit_common.rs"]
mod hit_common;
use hit_common::{cases, encode_for_tags, headers, pipeline, take_hit};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const HITS: u64 = 1_000;

/// Allocations and bytes per call of `f`, over `HITS` calls after one warm-up call.
fn per_call(mut f: impl FnMut()) -> (f64, f64) {
    f();
    let before = dhat::HeapStats::get();
    for _ in 0..HITS {
        f();
    }
    let after = dhat::HeapStats::get();
    let n = HITS as f64;
    (
        (after.total_blocks - before.total_blocks) as f64 / n,
        (after.total_bytes - before.total_bytes) as f64 / n,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too, with no flag.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    let p = pipeline();
    let mut rng = StdRng::seed_from_u64(7);
    let (with_cookie, without) = (headers(true), headers(false));
    println!(
        "| hit | hit path: allocations (bytes) | dispatchers, both tags: allocations (bytes) |"
    );
    println!("|---|---|---|");
    for case in cases() {
        let h = if case.cookies { &with_cookie } else { &without };
        let (events, _) = take_hit(&p, &mut rng, &case, h);
        let (hit_n, hit_b) = per_call(|| {
            std::hint::black_box(take_hit(&p, &mut rng, &case, h));
        });
        let (enc_n, enc_b) = per_call(|| {
            std::hint::black_box(encode_for_tags(&p, &events));
        });
        println!(
            "| {} | {hit_n:.0} ({hit_b:.0} B) | {enc_n:.0} ({enc_b:.0} B) |",
            case.name
        );
    }
}
