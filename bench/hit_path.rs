//! The per-hit pure path, timed without sockets or the outbox (see `hit_common.rs`).
//! Run with `cargo bench --bench hit_path`; `-- --quick` for a fast look.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[path = "hit_common.rs"]
mod hit_common;
use hit_common::{cases, encode_for_tags, headers, pipeline, take_hit};

/// The allocator the server binary uses (see `src/main.rs`), so the figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let p = pipeline();
    let mut rng = StdRng::seed_from_u64(7);
    let (with_cookie, without) = (headers(true), headers(false));

    let mut g = c.benchmark_group("hit_path");
    g.throughput(Throughput::Elements(1));
    for case in cases() {
        let h = if case.cookies { &with_cookie } else { &without };
        g.bench_function(case.name, |b| {
            b.iter(|| {
                let (events, produced) = take_hit(&p, &mut rng, &case, h);
                black_box(produced + encode_for_tags(&p, &events))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
