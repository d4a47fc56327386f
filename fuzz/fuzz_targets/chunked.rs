//! The chunked decoder, fed the same wire bytes in arbitrary read splits.
//!
//! Invariants: no panic; the outcome (body, trailers, bytes consumed, or
//! refusal) is the same whatever the read boundaries; and it equals an
//! independent reference decode (RFC 9112 section 7.1 with the same limits),
//! so a body is never cut short, lengthened or accepted where it is not
//! valid.
#![no_main]

use bytes::BytesMut;
use keyproof_fuzz::{fields, reference_chunked, RefError, Splits};
use keyproof_proxy::http::h1::{ChunkedDecoder, Decoded};
use libfuzzer_sys::fuzz_target;

/// What a decode came to: the body, or `None` for a refusal; `Err` when the
/// input ran out first.
type Outcome = Result<Option<keyproof_fuzz::Body>, ()>;

fn decode(wire: &[u8], max_trailers: usize, mut splits: Splits) -> Outcome {
    let mut dec = ChunkedDecoder::new(max_trailers);
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), Vec::new());
    let mut fed = 0;
    loop {
        match dec.decode(&mut buf) {
            Err(_) => return Ok(None),
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty(), "empty data frame");
                data.extend_from_slice(&d);
            }
            Ok(Decoded::Trailers(t)) => {
                assert!(!t.is_empty(), "empty trailer frame");
                trailers = fields(&t);
                // A field map groups the lines of one name; the order within
                // a name is what counts.
                trailers.sort_by(|a, b| a.0.cmp(&b.0));
                assert!(dec.is_done());
            }
            Ok(Decoded::Done) => {
                assert!(dec.is_done());
                return Ok(Some(keyproof_fuzz::Body {
                    data,
                    trailers,
                    consumed: fed - buf.len(),
                }));
            }
            Ok(Decoded::NeedMore) if fed == wire.len() => return Err(()),
            Ok(Decoded::NeedMore) => {
                let n = splits.next_len().min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (ctl, wire) = data.split_at(3);
    let max_trailers = 16 + usize::from(ctl[0]) * 4;
    let seed = u32::from_le_bytes([ctl[1], ctl[2], ctl[0], 0x5a]);
    let whole = decode(wire, max_trailers, Splits::new(seed, usize::MAX));
    let split = decode(
        wire,
        max_trailers,
        Splits::new(seed, 1 + usize::from(ctl[1] % 16)),
    );
    let bytewise = decode(wire, max_trailers, Splits::new(seed, 1));
    assert_eq!(whole, split, "read boundaries changed the outcome");
    assert_eq!(whole, bytewise, "byte-by-byte reads changed the outcome");
    // A body both accept must be the same body; one accepted by only one
    // of them is a disagreement. Where the input ends early, either may
    // notice a fault sooner than the other.
    let reference = reference_chunked(wire, max_trailers).map(|mut body| {
        body.trailers.sort_by(|a, b| a.0.cmp(&b.0));
        body
    });
    match (&whole, reference) {
        (Ok(Some(got)), Ok(want)) => assert_eq!(got, &want, "different bodies"),
        (Ok(Some(got)), Err(e)) => panic!("keyproof accepts {got:?}, the reference: {e:?}"),
        (other, Ok(want)) => panic!("the reference accepts {want:?}, keyproof: {other:?}"),
        (Ok(None), Err(RefError::Invalid)) | (Err(()), Err(RefError::Incomplete)) => {}
        (Ok(None), Err(RefError::Incomplete)) | (Err(()), Err(RefError::Invalid)) => {}
    }
});
