//! Measures nonce-table memory per outstanding nonce with a counting global
//! allocator: inserts N nonces (default 1,000,000) spread over 1,000 peers
//! and reports heap bytes per entry.
//!
//! `cargo run --release -p keyproof-stepup --example nonce_memory [-- N]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use aws_lc_rs::rand::SystemRandom;
use keyproof_stepup::NonceTable;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// The workspace denies unsafe code; a global allocator cannot be written
// without it, and this one only measures (it is no part of any binary).
// SAFETY: delegates to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let peers = 1000usize;
    let rng = SystemRandom::new();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let table = NonceTable::new(n, n / peers + 1, 30);
    let start = Instant::now();
    let mut peer = [0u8; 32];
    for i in 0..n {
        peer[..8].copy_from_slice(&((i % peers) as u64).to_le_bytes());
        if let Err(e) = table.issue(&rng, &peer, u32::MAX, 1, 1000) {
            eprintln!("issue {i} failed: {e}");
            std::process::exit(1);
        }
    }
    let elapsed = start.elapsed();
    let live = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    println!("entries:            {}", table.len());
    println!("live heap bytes:    {live}");
    println!("bytes per entry:    {:.1}", live as f64 / n as f64);
    println!(
        "peak bytes / entry: {:.1} (during the last resize)",
        peak as f64 / n as f64
    );
    println!(
        "issue time:         {:.0} ns/nonce",
        elapsed.as_nanos() as f64 / n as f64
    );
    drop(table);
}
