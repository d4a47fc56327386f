//! The crypto floor of one step-up request: one signature with the workload
//! key and one verification of it, with the same calls the sidecars make
//! ([`Signer::sign_raw`] as the outbound signs, [`PeerKey::verify`] with the
//! key parsed once per connection as the inbound verifies), and nothing else.
//! `benches/stepup-mesh.sh` runs it between its rounds, so the floor and the
//! mesh figures come from the same run on the same machine.
//!
//! Prints one line: `floor alg=<alg> sign_us=<x> verify_us=<y> floor_us=<x+y>`,
//! CPU time per operation (this thread's CPU clock, the median of `ROUNDS`
//! batches), so a preempted batch does not count the time it waited.
//!
//! `cargo run --release -p keyproof-stepup --example floor -- CERT.der KEY.pk8 [MILLIS]`
//! (the workload certificate and its PKCS#8 private key, DER; MILLIS is the
//! time to spend, default 1500).

use std::hint::black_box;
use std::time::{Duration, Instant};

use keyproof_stepup::{PeerKey, Signer};

const ROUNDS: usize = 9;
/// About the size of a signature base with seven components.
const BASE_LEN: usize = 420;

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`: the scheduler's
/// running total brought up to date at the call, unlike the tick-grained
/// `utime` or `schedstat` in procfs).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Median CPU time per call of `op` over `ROUNDS` batches of `n` calls.
fn per_op(n: usize, mut op: impl FnMut(usize)) -> f64 {
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|r| {
            let start = cpu_time();
            for i in 0..n {
                op(r * n + i);
            }
            (cpu_time() - start).as_secs_f64() * 1e6 / n as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[ROUNDS / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cert), Some(key)) = (args.get(1), args.get(2)) else {
        return Err("usage: floor CERT.der KEY.pk8 [MILLIS]".into());
    };
    let millis: u64 = args.get(3).map(|m| m.parse()).transpose()?.unwrap_or(1500);
    let cert = std::fs::read(cert)?;
    let signer = Signer::from_pkcs8_and_cert(&std::fs::read(key)?, &cert)?;
    let peer = PeerKey::from_cert_der(&cert)?;

    // Distinct messages, as every request's base differs (the nonce alone).
    let message = |i: usize| {
        let mut m = [b'a'; BASE_LEN];
        m[..8].copy_from_slice(&(i as u64).to_le_bytes());
        m
    };
    // Calibrate the batch size so both loops together take about `millis`.
    let start = Instant::now();
    let mut calib = 0;
    while start.elapsed() < Duration::from_millis(50) {
        let m = message(calib);
        let s = signer.sign_raw(&m)?;
        assert!(peer.verify(&m, &s));
        calib += 1;
    }
    let n = (calib * millis as usize / 50 / ROUNDS).max(10);

    let messages: Vec<_> = (0..n * ROUNDS).map(message).collect();
    let mut signatures = Vec::with_capacity(n * ROUNDS);
    let sign_us = per_op(n, |i| {
        signatures.push(black_box(signer.sign_raw(black_box(&messages[i]))));
    });
    let signatures: Vec<Vec<u8>> = signatures.into_iter().collect::<Result<_, _>>()?;
    let verify_us = per_op(n, |i| {
        assert!(peer.verify(black_box(&messages[i]), black_box(&signatures[i])));
    });
    println!(
        "floor alg={} sign_us={sign_us:.1} verify_us={verify_us:.1} floor_us={:.1}",
        signer.alg(),
        sign_us + verify_us
    );
    Ok(())
}
