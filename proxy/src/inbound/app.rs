//! The local app as the inbound reaches it: the pooled HTTP/1.1 and h2c
//! clients for one address, the request form the app gets, and what the
//! caller gets when the app gives no usable answer. One for `[inbound] app`
//! (connections made to the inbound's own port), and one per original
//! destination port of redirected connections (`127.0.0.1:<port>`), made
//! on demand and bounded in number ([`AppClients`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Response, StatusCode, Uri, Version};

use crate::config::{AppProtocol, InboundConfig};
use crate::error::LogEvery;
use crate::http::app_client::{self, AppError};
use crate::http::body::{absolute_uri, path_of, text, ProxyBody};
use crate::http::h2_server::Unprocessed;
use crate::http::owned;

/// Marks the 502 that [`AppClient::answer`] makes of an app's response
/// asking for a step-up on a route that may have one: the step-up path
/// decides what the caller gets instead.
#[derive(Debug, Clone, Copy)]
pub struct AppAsked;

/// A failure to make an app client.
#[derive(Debug, thiserror::Error)]
#[error("inbound.app: {0}")]
pub struct BadAddress(String);

/// The clients of one app address.
pub struct AppClient {
    /// HTTP/1.1, pooled.
    pub h1: Arc<app_client::H1Pool>,
    /// h2c (gRPC, or `app_protocol = "h2"`).
    pub h2: Arc<app_client::H2cPool>,
    authority: Authority,
    protocol: AppProtocol,
    /// `host:port`, for the log and the caller's error bodies.
    addr: String,
    /// Said when the app's port refuses connections.
    pub gone: AppGone,
}

/// Tells the connections of callers that the app's port refused a
/// connection: the app has exited (as a terminating pod's app does before
/// its native sidecar is told) or not started. Each connection then ends
/// gracefully, so that its caller dials anew and a Service sends it to an
/// endpoint whose app is there, instead of every request on it getting 503
/// until the sidecar itself stops. Said at most every [`AppGone::EVERY`]: a
/// crash-looping app costs each caller a reconnection that often, not one
/// per failed request.
#[derive(Debug)]
pub struct AppGone {
    notify: tokio::sync::Notify,
    every: LogEvery,
}

impl Default for AppGone {
    fn default() -> AppGone {
        AppGone {
            notify: tokio::sync::Notify::new(),
            every: LogEvery::new(Self::EVERY),
        }
    }
}

impl AppGone {
    /// The most often the connections are told, in seconds.
    pub const EVERY: u64 = 5;

    /// The app's port refused a connection. True when the connections
    /// were told (the first time in [`AppGone::EVERY`]).
    pub fn note(&self) -> bool {
        let due = self.every.due();
        if due {
            self.notify.notify_waiters();
        }
        due
    }

    /// Resolves the next time the app's port refuses a connection.
    pub async fn refused(&self) {
        self.notify.notified().await;
    }
}

impl std::fmt::Debug for AppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl AppClient {
    /// Clients of the app at `addr` (`host:port`), with the settings of
    /// `[inbound]` (protocol, timeouts, `max_app_connections`). Nothing is
    /// dialled until a request needs it.
    pub fn new(addr: &str, cfg: &InboundConfig) -> Result<AppClient, BadAddress> {
        let authority: Authority = addr.parse().map_err(|e| BadAddress(format!("{e}")))?;
        let bounds = app_client::AppBounds {
            max_connections: cfg.max_app_connections,
            body_timeout: cfg.limits.body_timeout,
            max_per_peer: cfg.max_app_connections_per_peer,
        };
        let h1 = app_client::H1Pool::new(
            addr,
            cfg.app_connect_timeout,
            cfg.app_pool_idle_timeout,
            cfg.limits.max_header_bytes,
            bounds,
        );
        Ok(AppClient {
            h1,
            h2: app_client::H2cPool::new(
                addr,
                cfg.app_connect_timeout,
                cfg.app_pool_idle_timeout,
                cfg.limits.max_header_bytes,
                bounds,
            ),
            authority,
            protocol: cfg.app_protocol,
            addr: addr.to_owned(),
            gone: AppGone::default(),
        })
    }

    /// `host:port` of the app.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The app's form of a request: origin-form for HTTP/1.1 (with a Host),
    /// absolute for HTTP/2. Says whether it goes over HTTP/2 and whether
    /// the caller speaks HTTP/1.
    #[inline]
    pub fn to_app(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<(bool, bool), Box<Response<ProxyBody>>> {
        let use_h2 = match self.protocol {
            // gRPC needs HTTP/2 end to end (trailers, streams); anything else
            // reaches the app as HTTP/1.1, which every app speaks, so a
            // browser or curl negotiating h2 works against HTTP/1-only apps.
            AppProtocol::Auto => {
                parts.version == Version::HTTP_2
                    && parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
            }
            AppProtocol::Http1 => false,
            AppProtocol::H2 => true,
        };
        if !use_h2 && !parts.headers.contains_key(header::HOST) {
            // An HTTP/2 caller's :authority becomes the app's Host.
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        let path = path_of(&parts.uri);
        // HTTP/2 has no Connection field: a stalled body ends its stream.
        let h1_caller = parts.version != Version::HTTP_2;
        if use_h2 {
            // HTTP/2 keeps the caller's :authority.
            let authority = match parts.uri.authority() {
                Some(a) => a.clone(),
                None => self.authority.clone(),
            };
            parts.uri = absolute_uri(Scheme::HTTP, authority, path)?;
            parts.version = Version::HTTP_2;
        } else {
            // HTTP/1.1 goes out in origin-form; Host carries the name.
            parts.uri = Uri::from(path);
            parts.version = Version::HTTP_11;
        }
        Ok((use_h2, h1_caller))
    }

    /// The app's response, or a 503/502 saying why there is none (408 for
    /// a request body that stalled, closing an HTTP/1 caller's connection:
    /// the rest of that body is still on the wire).
    pub fn answer(
        &self,
        sent: Result<Response<ProxyBody>, AppError>,
        h1_caller: bool,
        may_step_up: bool,
    ) -> Response<ProxyBody> {
        match sent {
            Ok(mut resp) => {
                // Only the sidecar speaks the StepUp scheme and sets its own
                // fields; the inbound's own challenges are added after this.
                if owned::strip_response(resp.headers_mut()) {
                    return self.app_asked(may_step_up);
                }
                resp
            }
            Err(AppError::Refused(cause)) => {
                // Logged with the notice: a gone app meets every request.
                if self.gone.note() {
                    tracing::warn!(app = %self.addr, error = %cause, "app unavailable: nothing listens on its port; callers' connections end");
                } else {
                    tracing::debug!(app = %self.addr, error = %cause, "app unavailable: nothing listens on its port");
                }
                // Nothing of the request reached the app: an HTTP/2 caller
                // is told so and sends it again, after the notice above on
                // a new connection, which a Service gives to an endpoint
                // whose app is there. An HTTP/1 caller gets the 503, and
                // its connection ends for the same reason.
                let mut r = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app unavailable: {}: {cause}\n", self.addr),
                );
                r.extensions_mut().insert(Unprocessed);
                if h1_caller {
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            }
            Err(AppError::Unavailable(cause)) => {
                tracing::warn!(app = %self.addr, error = %cause, "app unavailable");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app unavailable: {}: {cause}\n", self.addr),
                )
            }
            Err(AppError::BodyTimeout(after)) => {
                tracing::info!(app = %self.addr, "request body stalled for {after:?}; closing");
                let mut r = text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body made no progress for {after:?}\n"),
                );
                if h1_caller {
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            }
            Err(AppError::Malformed(cause)) => {
                tracing::info!(app = %self.addr, error = %cause, "malformed request body; closing");
                let mut r = text(
                    StatusCode::BAD_REQUEST,
                    format!("malformed request body: {cause}\n"),
                );
                if h1_caller {
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            }
            Err(AppError::Failed(cause)) => {
                tracing::warn!(app = %self.addr, error = %cause, "app request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("app request failed: {}: {cause}\n", self.addr),
                )
            }
        }
    }

    /// The app answered `x-keyproof-step-up: required`; its response is
    /// dropped, never passed on.
    #[cold]
    fn app_asked(&self, may_step_up: bool) -> Response<ProxyBody> {
        if !may_step_up {
            tracing::warn!(app = %self.addr, "the app asked for a step-up proof (x-keyproof-step-up: required) of a request on a route without step-up; answered 502");
            return text(
                StatusCode::BAD_GATEWAY,
                "the app asked for a step-up proof of a request on a route without step-up\n",
            );
        }
        let mut resp = text(
            StatusCode::BAD_GATEWAY,
            "the app asked for a step-up proof\n",
        );
        resp.extensions_mut().insert(AppAsked);
        resp
    }
}

/// Most per-port app clients kept at once: ports a pod serves are few; an
/// unbounded map would grow with every port a redirect rule lets through.
pub const MAX_APP_PORTS: usize = 256;

/// The app clients of redirected connections, by original destination
/// port (`127.0.0.1:<port>`), made on demand and shared by the connections
/// to that port.
#[derive(Debug, Default)]
pub struct AppClients {
    by_port: Mutex<HashMap<u16, Arc<AppClient>>>,
}

impl AppClients {
    /// The client for local `port`, made now if there is none. At
    /// [`MAX_APP_PORTS`], clients no connection holds are dropped first;
    /// if all are in use, this connection gets a client of its own (its
    /// pool then lives as long as the connection).
    pub fn get(&self, port: u16, cfg: &InboundConfig) -> Arc<AppClient> {
        let mut map = self.by_port.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&port) {
            return c.clone();
        }
        let addr = format!("127.0.0.1:{port}");
        // An IP and a port always make an authority.
        let client = match AppClient::new(&addr, cfg) {
            Ok(c) => Arc::new(c),
            Err(e) => unreachable!("{e}"),
        };
        if map.len() >= MAX_APP_PORTS {
            map.retain(|_, c| Arc::strong_count(c) > 1);
        }
        if map.len() < MAX_APP_PORTS {
            map.insert(port, client.clone());
        } else {
            tracing::debug!(
                port,
                "{MAX_APP_PORTS} app ports in use; this connection gets an app client of its own"
            );
        }
        client
    }

    /// How many clients are kept.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.by_port.lock().map_or(0, |m| m.len())
    }
}
