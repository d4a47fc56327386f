//! Paths: the sidecar normalizes, then decides, then forwards what it
//! decided. nginx is the app (it normalizes paths itself, as real apps do),
//! with a distinct answer per location, and every request shape that could
//! make the policy and the app disagree is sent as written: HTTP/1.1 on a
//! raw mutual-TLS socket, HTTP/2 through hyper and curl `--path-as-is`, and
//! through the caller's outbound sidecar. The app must never serve the
//! admin or step-up location to a caller that did not pass that rule.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use keyproof_tests::free_port;
use keyproof_tests::nginx::Nginx;
use keyproof_tests::proxy_support::*;

const TD: &str = "prod.test";
const ADMIN: &str = "ADMIN-SECRET";
const STEPUP: &str = "STEPUP-SECRET";

/// Segment-aware locations, like the sidecar's routes: `= /x` and `/x/`.
const LOCATIONS: &str = r#"
    location = /public { return 200 "PUBLIC $uri\n"; }
    location /public/ { return 200 "PUBLIC $uri\n"; }
    location = /admin { return 200 "ADMIN-SECRET $uri\n"; }
    location /admin/ { return 200 "ADMIN-SECRET $uri\n"; }
    location = /stepup { return 200 "STEPUP-SECRET $uri\n"; }
    location /stepup/ { return 200 "STEPUP-SECRET $uri\n"; }
    location / { return 404 "NOTHING $uri\n"; }
"#;

struct Setup {
    pki: Pki,
    nginx: Nginx,
    inbound: ProxyProc,
    addr: SocketAddr,
    /// Allowed on `/admin`.
    client: Cert,
    /// Allowed on `/public` (and, with step-up, `/stepup`) only.
    other: Cert,
    server: Cert,
}

fn setup(default_policy: &str, public_route: bool) -> Setup {
    setup_with(default_policy, public_route, LOCATIONS, "")
}

/// [`setup`] with other nginx locations and routes (TOML, placed first;
/// `{client}` stands for the client's SPIFFE ID).
fn setup_with(default_policy: &str, public_route: bool, locations: &str, routes: &str) -> Setup {
    let pki = Pki::new(TD);
    let nginx = Nginx::start(locations);
    let server = pki.issue("server", "/ns/default/sa/api");
    let client = pki.issue("client", "/ns/default/sa/client");
    let other = pki.issue("other", "/ns/default/sa/other");
    let (cid, oid) = (
        pki.id("/ns/default/sa/client"),
        pki.id("/ns/default/sa/other"),
    );
    let routes = routes.replace("{client}", &cid);
    let public = if public_route {
        format!("[[inbound.routes]]\npath_prefix = \"/public\"\nallow = [\"{cid}\", \"{oid}\"]\n")
    } else {
        String::new()
    };
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = format!(
        "{}[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"{}\"\ndefault_policy = \"{default_policy}\"\n\
         {routes}{public}[[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{cid}\"]\n\
         [[inbound.routes]]\npath_prefix = \"/stepup\"\nallow = [\"{cid}\", \"{oid}\"]\nstep_up = true\n\
         [admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, &server),
        nginx.addr
    );
    let inbound = ProxyProc::start(pki.tmp.path(), "inbound", &cfg, admin);
    Setup {
        pki,
        nginx,
        inbound,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        client,
        other,
        server,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Setup {
    /// One HTTP/1.1 request with `target` exactly as written.
    fn h1(
        &self,
        rt: &tokio::runtime::Runtime,
        who: &Cert,
        method: &str,
        target: &str,
    ) -> (u16, String) {
        rt.block_on(async {
            let tls = mtls_stream(self.addr, &self.pki, who, b"http/1.1").await;
            let head = format!(
                "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            );
            raw_http1(tls, head.as_bytes()).await
        })
    }

    /// One HTTP/2 request with `:path` as written (hyper sends it as is);
    /// `None` when the target is not even a URI hyper can send.
    fn h2(&self, rt: &tokio::runtime::Runtime, who: &Cert, target: &str) -> Option<(u16, String)> {
        let uri: http::Uri = format!("https://localhost{target}").parse().ok()?;
        Some(rt.block_on(async {
            let tls = mtls_stream(self.addr, &self.pki, who, b"h2").await;
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .expect("h2 handshake");
            tokio::spawn(conn);
            let req = http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
            match send.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    (status, String::from_utf8_lossy(&body).into_owned())
                }
                // A stream reset: refused before any app saw it.
                Err(_) => (0, String::new()),
            }
        }))
    }

    fn curl_h2(&self, who: &Cert, target: &str) -> (u16, String) {
        let (crt, key, ca) = (
            who.crt.display().to_string(),
            who.key.display().to_string(),
            self.pki.bundle.display().to_string(),
        );
        let resolve = format!("localhost:{}:127.0.0.1", self.addr.port());
        let url = format!("https://localhost:{}{target}", self.addr.port());
        let (code, body, _) = curl(&[
            "--http2",
            "--path-as-is",
            "--cert",
            &crt,
            "--key",
            &key,
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            &url,
        ]);
        (code, body)
    }

    fn refused(&self, reason: &str) -> f64 {
        self.inbound.metric(&format!(
            "keyproof_http_requests_refused_total{{direction=\"inbound\",reason=\"{reason}\"}}"
        ))
    }
}

/// What the caller must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// 400 from the sidecar (the path has no safe normal form).
    Bad,
    /// 403: a route (or the default policy) refuses.
    Denied,
    /// 401: a step-up challenge, never the app.
    Challenge,
    /// 200 with this body start (nginx's `$uri`, i.e. what it resolved).
    Ok(&'static str),
    /// nginx's 404: the app got a path that is no protected location.
    NotFound,
}

fn check(what: &str, got: (u16, String), want: Want, log: &dyn Fn() -> String) {
    let (status, body) = got;
    assert!(
        !body.contains(ADMIN) || matches!(want, Want::Ok(b) if b.contains(ADMIN)),
        "{what}: the app served /admin to a caller the route refuses: {status} {body}\n{}",
        log()
    );
    assert!(
        !body.contains(STEPUP) || matches!(want, Want::Ok(b) if b.contains(STEPUP)),
        "{what}: the app served the step-up location without a proof: {status} {body}\n{}",
        log()
    );
    let ok = match want {
        Want::Bad => status == 400,
        Want::Denied => status == 403,
        Want::Challenge => status == 401,
        Want::Ok(start) => status == 200 && body.starts_with(start),
        Want::NotFound => status == 404 && body.starts_with("NOTHING"),
    };
    assert!(
        ok,
        "{what}: want {want:?}, got {status} {body:?}\n{}",
        log()
    );
}

/// The shapes for the caller `other` under `default_policy = "deny"` with
/// a `/public` route: (target, answer).
const DENY_SHAPES: &[(&str, Want)] = &[
    ("/public/../admin", Want::Denied),
    ("/public/%2e%2e/admin", Want::Denied),
    ("/public/%2E%2E/admin", Want::Denied),
    ("/public/.%2e/admin", Want::Denied),
    ("/public/%2e./admin", Want::Denied),
    ("/public//../admin", Want::Denied),
    ("/public/./../admin", Want::Denied),
    ("/public/x/../../admin", Want::Denied),
    ("/public/%2e%2e/admin?x=1", Want::Denied),
    ("//admin", Want::Denied),
    ("///admin//x", Want::Denied),
    ("/./admin", Want::Denied),
    ("/admin/.", Want::Denied),
    ("/admin/", Want::Denied),
    ("/%61dmin", Want::Denied),
    ("/%61%64%6D%69%6E/x", Want::Denied),
    ("/ad%6din/", Want::Denied),
    ("/ADMIN", Want::Denied),
    ("/%2561dmin", Want::Bad),
    ("/%C0%AE%C0%AE/admin", Want::Denied),
    ("/public/%C0%AE%C0%AE/admin", Want::Ok("PUBLIC /public/")),
    ("/public/../stepup/x", Want::Challenge),
    ("/public/%2e%2e/stepup", Want::Challenge),
    ("//stepup//x", Want::Challenge),
    ("/public/..%2fadmin", Want::Bad),
    ("/public/..%2Fadmin", Want::Bad),
    ("/public/%2e%2e%2fadmin", Want::Bad),
    ("/admin%2f", Want::Bad),
    ("/admin%2F", Want::Bad),
    ("/public/..%5cadmin", Want::Bad),
    ("/public/..\\admin", Want::Bad),
    ("/admin%00", Want::Bad),
    ("/public%00/../admin", Want::Bad),
    ("/public/%0d%0a/../admin", Want::Bad),
    ("/public/..;/admin", Want::Bad),
    ("/public/.;/admin", Want::Bad),
    ("/admin;x=y", Want::Bad),
    ("/public%3b/../admin", Want::Bad),
    ("/public/%zz/../admin", Want::Bad),
    ("/public/%4", Want::Bad),
    ("/public/%", Want::Bad),
    ("/..", Want::Bad),
    ("/../admin", Want::Bad),
    ("/public/../../admin", Want::Bad),
    ("/%2e%2e/admin", Want::Bad),
    ("/public", Want::Ok("PUBLIC /public\n")),
    ("/public/a/./b/../c", Want::Ok("PUBLIC /public/a/c\n")),
    ("/pub%6Cic/x", Want::Ok("PUBLIC /public/x\n")),
    (
        "/public/x?y=/../admin&z=%2f",
        Want::Ok("PUBLIC /public/x\n"),
    ),
    // A double encoding, or an encoded `?` or `#`: a hop in the app's pod
    // that decodes the path and passes it on (nginx's `proxy_pass
    // http://backend$uri`) would make `/admin` of them.
    ("/public/%252e%252e/admin", Want::Bad),
    ("/public/%25%32%65%25%32%65/admin", Want::Bad),
    ("/admin%3F/users", Want::Bad),
    ("/admin%23/users", Want::Bad),
    ("/public/x%3f", Want::Bad),
    ("/public/100%25", Want::Ok("PUBLIC /public/100%\n")),
];

#[test]
fn deny_default_every_shape_over_http1_and_http2() {
    let s = setup("deny", true);
    let rt = rt();
    let log = || format!("{}\nnginx:\n{}", s.inbound.log_text(), s.nginx.access_log());
    for &(target, want) in DENY_SHAPES {
        check(
            &format!("h1 {target}"),
            s.h1(&rt, &s.other, "GET", target),
            want,
            &log,
        );
        if let Some(got) = s.h2(&rt, &s.other, target) {
            check(&format!("h2 {target}"), got, want, &log);
        }
    }
    // Absolute-form: its path is what is normalized, decided and sent.
    for (target, want) in [
        ("http://localhost/admin", Want::Denied),
        ("http://localhost/public/../admin", Want::Denied),
        ("http://localhost/public/%2e%2e/admin", Want::Denied),
        ("http://localhost/public/..%2fadmin", Want::Bad),
        (
            "http://localhost/public/./x",
            Want::Ok("PUBLIC /public/x\n"),
        ),
    ] {
        check(
            &format!("h1 {target}"),
            s.h1(&rt, &s.other, "GET", target),
            want,
            &log,
        );
    }
    // Not a path at all, and `*` outside OPTIONS.
    for target in ["\\admin", "admin", "*"] {
        check(
            &format!("h1 {target}"),
            s.h1(&rt, &s.other, "GET", target),
            Want::Bad,
            &log,
        );
    }
    // A method that is not an RFC 9110 token never reaches a decision.
    for method in ["G(T", "GE\"T", "GET/"] {
        let got = s.h1(&rt, &s.other, method, "/public");
        assert_eq!(got.0, 400, "{method}: {got:?}");
    }
    // curl, a real HTTP/2 client, sending the path as written.
    for (target, want) in [
        ("/public/../admin", Want::Denied),
        ("/public/%2e%2e/admin", Want::Denied),
        ("/public/..%2fadmin", Want::Bad),
        ("//admin", Want::Denied),
        ("/public/../stepup/x", Want::Challenge),
        ("/public/./y", Want::Ok("PUBLIC /public/y\n")),
    ] {
        check(
            &format!("curl h2 {target}"),
            s.curl_h2(&s.other, target),
            want,
            &log,
        );
    }

    // The caller the /admin route allows gets it, at the normalized path.
    for (target, body) in [
        ("/public/../admin", "ADMIN-SECRET /admin\n"),
        ("//admin", "ADMIN-SECRET /admin\n"),
        ("/%61dmin/x/./y/../z", "ADMIN-SECRET /admin/x/z\n"),
        ("/public/%2E%2E/admin/", "ADMIN-SECRET /admin/\n"),
    ] {
        check(
            &format!("client h1 {target}"),
            s.h1(&rt, &s.client, "GET", target),
            Want::Ok(body),
            &log,
        );
        if let Some(got) = s.h2(&rt, &s.client, target) {
            check(&format!("client h2 {target}"), got, Want::Ok(body), &log);
        }
    }

    // nginx received only normalized targets, the query as sent.
    let access = s.nginx.access_log();
    for line in access.lines() {
        let (_, uri) = line.split_once(' ').unwrap();
        let path = uri.split('?').next().unwrap();
        for bad in [
            "//", "/./", "/../", ";", "\\", "%2e", "%2E", "%2f", "%2F", "%5C", "%00",
        ] {
            assert!(
                !path.contains(bad),
                "nginx got a non-normal path {uri:?}:\n{access}"
            );
        }
        assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{uri}");
    }
    for want in [
        "200 /admin/x/z",
        "200 /public/a/c",
        "200 /public/x",
        "200 /public/x?y=/../admin&z=%2f",
    ] {
        assert!(
            access.lines().any(|l| l == want),
            "nginx never got {want:?}:\n{access}"
        );
    }
    assert!(
        !access.contains(" /stepup"),
        "the step-up location was reached:\n{access}"
    );

    // Refusals are counted by reason and logged with it.
    for (reason, at_least) in [
        ("encoded_slash", 8.0),
        ("backslash", 2.0),
        ("encoded_control", 4.0),
        ("semicolon", 6.0),
        ("bad_percent_encoding", 4.0),
        ("above_root", 6.0),
        ("not_absolute", 1.0),
        ("encoded_delimiter", 3.0),
        ("double_encoded", 2.0),
    ] {
        let n = s.refused(reason);
        assert!(
            n >= at_least,
            "{reason}: {n} < {at_least}\n{}",
            s.inbound.metrics()
        );
    }
    let text = s.inbound.log_text();
    assert!(
        text.contains("encoded_slash") && text.contains("above_root"),
        "{text}"
    );
}

#[test]
fn allow_trust_domain_default_keeps_admin_to_its_route() {
    let s = setup("allow-trust-domain", false);
    let rt = rt();
    let log = || format!("{}\nnginx:\n{}", s.inbound.log_text(), s.nginx.access_log());
    let shapes: &[(&str, Want)] = &[
        ("//admin", Want::Denied),
        ("/%61dmin", Want::Denied),
        ("/admin%2f", Want::Bad),
        ("/admin%2F/x", Want::Bad),
        ("/x/../admin", Want::Denied),
        ("/x/%2e%2e/admin", Want::Denied),
        ("/x/..%2fadmin", Want::Bad),
        ("/admin/.", Want::Denied),
        ("/%2561dmin", Want::Bad),
        // An app that ignores case (Express, ASP.NET Core) would serve
        // these from its /admin handler: /admin's rule applies.
        ("/ADMIN", Want::Denied),
        ("/Admin/x", Want::Denied),
        ("/%41dmin/x", Want::Denied),
        ("/STEPUP/y", Want::Challenge),
        // Java's equalsIgnoreCase and JavaScript's /iu equate dotless ı,
        // dotted İ, long ſ and the Kelvin sign with i, i, s and k.
        ("/adm%C4%B1n", Want::Denied),
        ("/ADM%c4%b0N/x", Want::Denied),
        ("/%C5%BFtepup", Want::Challenge),
        // Spring MVC's suffix patterns and Rails' (.:format) serve these
        // from the /admin and /stepup handlers.
        ("/admin.json", Want::Denied),
        ("/admin%2ejson", Want::Denied),
        ("/admin.", Want::Denied),
        ("/stepup.json", Want::Challenge),
        // A PHP front controller routes by the path after the script, a
        // script runs with its path info, Rails strips a final slash.
        ("/index.php/admin/x", Want::Denied),
        ("/app/INDEX.php/stepup/y", Want::Challenge),
        ("/admin.php/x", Want::Denied),
        ("/admin.json/", Want::Denied),
        ("/stepup.php/", Want::Challenge),
        // A method override in the query (Symfony, Laravel read it there).
        ("/public/x?_method=DELETE", Want::Bad),
        ("/public/x?a=1&%5Fmethod=PUT", Want::Bad),
        ("/public/x?.method=PUT", Want::Bad),
        ("/admin;", Want::Bad),
        ("/admin;jsessionid=1", Want::Bad),
        ("/x/..;/admin", Want::Bad),
        ("/admin%00", Want::Bad),
        ("/%C0%AE%C0%AE/admin", Want::NotFound),
        ("/x/%C0%AE%C0%AE/admin", Want::NotFound),
        ("/%E0%80%AE%E0%80%AE/admin", Want::NotFound),
        ("/x/../stepup", Want::Challenge),
        ("//stepup/y", Want::Challenge),
        ("/public/../public/z", Want::Ok("PUBLIC /public/z\n")),
    ];
    for &(target, want) in shapes {
        check(
            &format!("h1 {target}"),
            s.h1(&rt, &s.other, "GET", target),
            want,
            &log,
        );
        if let Some(got) = s.h2(&rt, &s.other, target) {
            check(&format!("h2 {target}"), got, want, &log);
        }
    }
    check(
        "h1 absolute",
        s.h1(&rt, &s.other, "GET", "http://localhost/admin"),
        Want::Denied,
        &log,
    );
    check(
        "h1 absolute dots",
        s.h1(&rt, &s.other, "GET", "http://localhost/y/../admin"),
        Want::Denied,
        &log,
    );
    // An absolute-form authority other than Host: no reader may pick the
    // other one, so it is refused before any path decision.
    check(
        "h1 absolute, another authority",
        s.h1(&rt, &s.other, "GET", "http://x/admin"),
        Want::Bad,
        &log,
    );
    // Absolute-form without a path: the app gets `/` and the query, never a
    // request line with no path.
    check(
        "h1 absolute, no path",
        s.h1(&rt, &s.other, "GET", "http://localhost?x=/admin"),
        Want::NotFound,
        &log,
    );
    let access = s.nginx.access_log();
    assert!(
        !access
            .lines()
            .any(|l| l.contains("admin") && l.starts_with("200")),
        "{access}"
    );
}

/// app -> outbound -> inbound -> nginx: the outbound sends (and signs) the
/// normalized path, so the inbound's normalization is the identity and
/// step-up signatures still verify.
#[test]
fn through_the_outbound() {
    let s = setup("deny", true);
    let rt = rt();
    let out_port = free_port();
    let out_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = format!(
        "{}[outbound]\nlisten = \"127.0.0.1:{out_port}\"\n[[outbound.upstreams]]\nhost = \"api.test\"\naddress = \"{}\"\nidentity = \"{}\"\n[admin]\nlisten = \"{out_admin}\"\n",
        identity_toml(&s.pki.bundle, &s.other),
        s.addr,
        s.pki.id("/ns/default/sa/api")
    );
    let _ = &s.server;
    let outbound = ProxyProc::start(s.pki.tmp.path(), "outbound", &cfg, out_admin);
    let log = || {
        format!(
            "outbound:\n{}\ninbound:\n{}\nnginx:\n{}",
            outbound.log_text(),
            s.inbound.log_text(),
            s.nginx.access_log()
        )
    };
    let send = |target: &str| {
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", out_port))
                .await
                .unwrap();
            let head =
                format!("GET {target} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
            raw_http1(tcp, head.as_bytes()).await
        })
    };
    for (target, want) in [
        ("/public/./a/../b?q=/../x", Want::Ok("PUBLIC /public/b\n")),
        ("/public/../admin", Want::Denied),
        ("/public/%2e%2e/admin", Want::Denied),
        ("//admin", Want::Denied),
        ("/%61dmin", Want::Denied),
        ("/admin%2f", Want::Bad),
        ("/public/..;/admin", Want::Bad),
        ("/public/../../admin", Want::Bad),
        // `other` passes the step-up rule: its outbound signs the
        // normalized path, and the inbound verifies that same path.
        ("/public/../stepup/x", Want::Ok("STEPUP-SECRET /stepup/x\n")),
        ("/stepup/./x", Want::Ok("STEPUP-SECRET /stepup/x\n")),
        ("/stepup/y/../x", Want::Ok("STEPUP-SECRET /stepup/x\n")),
        ("/stepup/%78", Want::Ok("STEPUP-SECRET /stepup/x\n")),
    ] {
        check(&format!("outbound {target}"), send(target), want, &log);
    }
    let refused = |reason: &str| {
        outbound.metric(&format!(
            "keyproof_http_requests_refused_total{{direction=\"outbound\",reason=\"{reason}\"}}"
        ))
    };
    assert!(refused("encoded_slash") >= 1.0, "{}", outbound.metrics());
    assert!(refused("semicolon") >= 1.0, "{}", outbound.metrics());
    assert!(refused("above_root") >= 1.0, "{}", outbound.metrics());
    let ok = s
        .inbound
        .metric("keyproof_stepup_verifications_total{result=\"ok\"}");
    assert!(ok >= 4.0, "step-up verified {ok} times\n{}", log());
    let bad = s
        .inbound
        .metric("keyproof_stepup_verifications_total{result=\"bad_signature\"}");
    assert_eq!(bad, 0.0, "{}", log());
    // What the inbound refused never came from the outbound's own refusals.
    assert_eq!(s.refused("encoded_slash"), 0.0);
}

/// Round 12 auth F4/F5: nginx serves `/panel.php` for `/panel` (the "hide
/// .php" rewrite) and `/desk/index.php` for `/desk/` (its index). Routes
/// written for the scripts hold for those paths too.
#[test]
fn a_route_for_a_script_holds_where_the_server_runs_it_by_another_path() {
    let locations = r#"
    location = /panel.php { return 200 "ADMIN-SECRET panel.php\n"; }
    location = /panel { rewrite ^ /panel.php last; }
    location /panel/ { rewrite ^ /panel.php last; }
    location = /desk/index.php { return 200 "ADMIN-SECRET desk/index.php\n"; }
    location = /desk/ { rewrite ^ /desk/index.php last; }
    location / { return 404 "NOTHING $uri\n"; }
"#;
    let routes = "[[inbound.routes]]\npath_prefix = \"/panel.php\"\nallow = [\"{client}\"]\n\
                  [[inbound.routes]]\npath_prefix = \"/desk/index.php\"\nallow = [\"{client}\"]\n";
    let s = setup_with("allow-trust-domain", false, locations, routes);
    let rt = rt();
    let log = || format!("{}\nnginx:\n{}", s.inbound.log_text(), s.nginx.access_log());
    for target in [
        "/panel.php",
        "/panel",
        "/PANEL",
        "/panel/x",
        "/desk/index.php",
        "/desk/",
        "/desk",
    ] {
        check(
            &format!("h1 {target}"),
            s.h1(&rt, &s.other, "GET", target),
            Want::Denied,
            &log,
        );
        if let Some(got) = s.h2(&rt, &s.other, target) {
            check(&format!("h2 {target}"), got, Want::Denied, &log);
        }
    }
    // The allowed caller still reaches them.
    let (status, body) = s.h1(&rt, &s.client, "GET", "/panel");
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.h1(&rt, &s.client, "GET", "/desk/");
    assert_eq!(status, 200, "{body}");
    let access = s.nginx.access_log();
    assert_eq!(
        access.lines().filter(|l| l.starts_with("200")).count(),
        2,
        "{access}"
    );
}
