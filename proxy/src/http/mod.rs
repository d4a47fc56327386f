//! HTTP as the sidecar speaks it, generic over what it carries. Nothing here
//! imports the listeners, the policy or the identity: what they need of
//! HTTP (the header fields the sidecar owns, a body kept for a resend, a
//! bounded drain) is written here as an HTTP mechanism, and `inbound/` and
//! `outbound/` decide when it applies.
//!
//! * `h1.rs`: the HTTP/1.1 wire format (heads, chunked bodies), strict where
//!   laxness allows smuggling; `h1_guard.rs`: the same strictness on the
//!   connections hyper parses.
//! * `h1_server.rs`: the outbound's HTTP/1.1 server; `h2_server.rs`: the
//!   HTTP/2 server of both listeners, on the h2 crate, handing `CONNECT`
//!   streams to their tunnels whole; `server.rs`: serving a connection
//!   (HTTP/2 there, HTTP/1.1 on the inbound with hyper) with idle and
//!   drain handling.
//! * `app_client.rs`: the pool of plaintext connections to the local app;
//!   `mesh_client.rs`: requests on an HTTP/2 mesh connection;
//!   `h2_stream.rs`: one HTTP/2 stream's body or tunnel, for both.
//! * `body.rs`: `ProxyBody`, the one body type handed to hyper, made of the
//!   body types above; `tee.rs`: a body streamed while a bounded copy is
//!   kept; `limited.rs`: reading or draining a body with a bound.
//! * `owned.rs`: header fields the sidecar owns, hop-by-hop and trailer
//!   rules; `path.rs`: the path normalizer.
//! * `read_ahead.rs`: a mesh connection's socket read in large chunks
//!   under TLS; `frame_guard.rs`: a budget for the WINDOW_UPDATE, PRIORITY
//!   and unknown frames an HTTP/2 peer sends, on both ends' connections.
//! * `traits.rs`, `response.rs`, `io.rs`, `map_in_place.rs`: small pieces
//!   the others share.

pub mod app_client;
pub mod body;
pub mod frame_guard;
pub mod h1;
pub mod h1_guard;
pub mod h1_server;
pub mod h2_server;
pub mod h2_stream;
pub mod io;
pub mod limited;
pub mod map_in_place;
pub mod mesh_client;
pub mod owned;
pub mod path;
pub mod read_ahead;
pub mod response;
pub mod server;
pub mod tee;
pub mod traits;

/// A request path as log lines show it: at most its first 256 bytes. A
/// caller repeats a long path for a few bytes each over HTTP/2 (HPACK), and
/// a line per refused request must not cost the log hundreds of times what
/// the caller sent.
pub fn shown_path(path: &str) -> &str {
    const SHOWN: usize = 256;
    path.get(..SHOWN).unwrap_or(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_logged_path_is_cut_at_256_bytes() {
        assert_eq!(super::shown_path("/a"), "/a");
        let long = format!("/{}", "x".repeat(4096));
        assert_eq!(super::shown_path(&long).len(), 256);
    }
}
