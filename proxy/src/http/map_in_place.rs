//! A future combinator for the per-request path that neither moves nor
//! duplicates the future it wraps.
//!
//! Per-request futures are a few hundred bytes to a few kilobytes, and
//! copying them shows in the profiles (`benches/instructions.sh`):
//! `FutureExt::map` moves its whole finished future out of itself when it
//! completes, and `async move { f(fut.await) }` holds `fut` twice, once as
//! the captured variable and once as the future being awaited.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project_lite::pin_project! {
    /// `fut`, then `f` applied to its output, in place.
    #[must_use = "futures do nothing unless polled"]
    pub struct MapInPlace<F, G> {
        #[pin]
        fut: F,
        f: Option<G>,
    }
}

/// Runs `fut`, then `f` on its output.
pub fn map_in_place<F, G, T>(fut: F, f: G) -> MapInPlace<F, G>
where
    F: Future,
    G: FnOnce(F::Output) -> T,
{
    MapInPlace { fut, f: Some(f) }
}

impl<F, G, T> Future for MapInPlace<F, G>
where
    F: Future,
    G: FnOnce(F::Output) -> T,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        let f = this.f.take().expect("MapInPlace polled after it completed");
        Poll::Ready(f(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn applies_the_function_once_to_the_output() {
        let calls = std::cell::Cell::new(0);
        let out = map_in_place(async { 20 }, |v| {
            calls.set(calls.get() + 1);
            v + 1
        })
        .await;
        assert_eq!((out, calls.get()), (21, 1));
    }
}
