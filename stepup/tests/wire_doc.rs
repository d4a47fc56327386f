//! `docs/step-up.md` against the code, for everything in it that can drift:
//! the names and constants the crate exports, the header fields (the
//! crate's, and the two `x-keyproof-step-up*` fields the proxy adds), the
//! verification results, the nonce layout, the field limits, the settings'
//! defaults, the metric names and signer results the proxy exports, and the
//! examples (challenge, signed request, signature base), which are rebuilt
//! here by the real verifier and signer.
//!
//! The proxy's names are read from `proxy/src` as text (the whole tree, so
//! moving a file there changes nothing): `keyproof-proxy` depends on this
//! crate, not the other way round.
//!
//! The design doc beside the checkout (`../shared/design/step-up.md`) is the
//! normative reference; the last test checks it still names what the code
//! does, and is skipped when the file is not there.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;
use keyproof_stepup::nonce::{ENCODED_LEN, ID_LEN, MAC_LEN, RAW_LEN};
use keyproof_stepup::sign::MAX_ACCEPT_SIGNATURE_LEN;
use keyproof_stepup::verify::{
    MAX_BINDING_LEN, MAX_CONTENT_DIGEST_LEN, MAX_SIGNATURE_INPUT_LEN, MAX_SIGNATURE_LEN,
};
use keyproof_stepup::{
    headers, Alg, Challenge, Component, IssueError, Outcome, RequestView, StepUpConfig,
    BINDING_LEN, EXPORTER_LABEL, LABEL, TAG,
};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn doc() -> String {
    let p = manifest_dir().join("../docs/step-up.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Asserts `doc` contains `needle`, naming `what` when it does not.
#[track_caller]
fn mentions(doc: &str, needle: &str, what: &str) {
    assert!(
        doc.contains(needle),
        "docs/step-up.md does not mention {what}: expected to find {needle:?}"
    );
}

/// The one table row of `doc` whose first cell is `first_cell`.
#[track_caller]
fn row<'d>(doc: &'d str, first_cell: &str) -> &'d str {
    let prefix = format!("| {first_cell} |");
    let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(
        rows.len(),
        1,
        "docs/step-up.md: expected one table row starting {prefix:?}, found {rows:?}"
    );
    rows[0]
}

/// Every algorithm, listed through an exhaustive match so that a new
/// variant does not compile until it is added here (and to the doc).
fn all_algs() -> [Alg; 2] {
    let algs = [Alg::EcdsaP256Sha256, Alg::Ed25519];
    for a in algs {
        match a {
            Alg::EcdsaP256Sha256 | Alg::Ed25519 => {}
        }
    }
    algs
}

/// Every header constant of `keyproof_stepup::headers`.
fn all_headers() -> [http::HeaderName; 5] {
    [
        headers::SIGNATURE_INPUT,
        headers::SIGNATURE,
        headers::ACCEPT_SIGNATURE,
        headers::CONTENT_DIGEST,
        headers::STEPUP_BINDING,
    ]
}

/// Names at the start of string literals in `text` that start with
/// `prefix`: the literal up to its first character that cannot be in a
/// metric or header name (so `"name{label=..."` gives `name`).
fn literals_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let open = format!("\"{prefix}");
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(&open) {
        let lit = &rest[i + 1..];
        let end = lit
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'))
            .unwrap_or(lit.len());
        out.insert(lit[..end].to_owned());
        rest = &lit[end..];
    }
    out
}

/// Every `.rs` file under `dir`, concatenated.
fn rust_sources(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&path).expect("read source"));
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn names_and_constants_are_in_the_doc() {
    let doc = doc();
    mentions(&doc, &format!("`{TAG}`"), "the tag (TAG)");
    mentions(&doc, &format!("`{LABEL}`"), "the signature label (LABEL)");
    let exporter = std::str::from_utf8(EXPORTER_LABEL).expect("ASCII label");
    mentions(
        &doc,
        &format!("`{exporter}`"),
        "the exporter label (EXPORTER_LABEL)",
    );
    mentions(
        &doc,
        &format!("{BINDING_LEN} bytes"),
        "the binding length (BINDING_LEN)",
    );
    for name in ["TAG", "LABEL", "EXPORTER_LABEL", "BINDING_LEN"] {
        mentions(&doc, &format!("`{name}`"), "where the constant lives");
    }
    for alg in all_algs() {
        mentions(&doc, &format!("`{}`", alg.name()), "an algorithm name");
        assert_eq!(Alg::from_name(alg.name()), Some(alg));
    }
    // The doc says HMAC is refused; so must the code.
    assert_eq!(Alg::from_name("hmac-sha256"), None);
    mentions(&doc, "`hmac-sha256`", "that HMAC is refused");
}

#[test]
fn every_header_field_is_in_the_doc() {
    let doc = doc().to_ascii_lowercase();
    for h in all_headers() {
        mentions(&doc, &format!("`{}`", h.as_str()), "a header field");
    }
    // `all_headers` must stay the whole `headers` module: count the
    // constants in its source.
    let lib = std::fs::read_to_string(manifest_dir().join("src/lib.rs")).expect("lib.rs");
    let start = lib
        .find("pub mod headers {")
        .expect("pub mod headers in lib.rs");
    let end = start + lib[start..].find("\n}").expect("end of mod headers");
    let in_source: BTreeSet<String> = lib[start..end]
        .split("HeaderName::from_static(\"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').expect("closing quote")].to_owned())
        .collect();
    let listed: BTreeSet<String> = all_headers()
        .iter()
        .map(|h| h.as_str().to_owned())
        .collect();
    assert_eq!(
        in_source, listed,
        "keyproof_stepup::headers changed: update all_headers() here and docs/step-up.md"
    );
    // The fields the verifier and signer use besides those.
    for f in ["www-authenticate", "cache-control", "retry-after"] {
        mentions(&doc, &format!("`{f}`"), "a header field of the challenge");
    }
    // The proxy's own fields between a sidecar and its app.
    let proxy = rust_sources(&manifest_dir().join("../proxy/src"));
    let own = literals_with_prefix(&proxy, "x-keyproof-step-up");
    assert!(
        own.len() >= 2,
        "expected x-keyproof-step-up and x-keyproof-step-up-error in proxy/src, found {own:?}"
    );
    for f in own {
        mentions(
            &doc,
            &format!("`{f}`"),
            "a step-up header field the proxy sets",
        );
    }
}

#[test]
fn every_result_and_component_is_in_the_doc() {
    let doc = doc();
    for o in Outcome::ALL {
        let name = o.as_str();
        mentions(&doc, &format!("`{name}`"), "a verification result");
    }
    mentions(
        &doc,
        &format!(
            "the {} results of section 6",
            number_word(Outcome::ALL.len())
        ),
        "the number of verification results",
    );
    for with_ct in [true, false] {
        for c in Component::required(with_ct) {
            mentions(&doc, &format!("`\"{}\"`", c.name()), "a covered component");
        }
    }
    let without: Vec<String> = Component::required(false)
        .iter()
        .map(|c| format!("\"{}\"", c.name()))
        .collect();
    mentions(
        &doc,
        &format!("`({})`", without.join(" ")),
        "the component list without Content-Type",
    );
}

fn number_word(n: usize) -> &'static str {
    match n {
        10 => "ten",
        11 => "eleven",
        12 => "twelve",
        _ => "(add the word to number_word)",
    }
}

#[test]
fn nonce_layout_limits_and_defaults_are_the_codes() {
    let doc = doc();
    mentions(
        &doc,
        &format!("A nonce is {RAW_LEN} bytes"),
        "the raw nonce length",
    );
    mentions(
        &doc,
        &format!("{ENCODED_LEN} characters"),
        "the encoded nonce length",
    );
    mentions(
        &doc,
        &format!("random id ({ID_LEN} bytes"),
        "the nonce id length",
    );
    mentions(
        &doc,
        &format!("first {MAC_LEN} bytes of HMAC-SHA256"),
        "the MAC length",
    );
    assert_eq!(RAW_LEN, ID_LEN + 4 + MAC_LEN, "id, 32-bit expiry, MAC");

    for (field, max) in [
        ("`Signature-Input`", MAX_SIGNATURE_INPUT_LEN),
        ("`Signature`", MAX_SIGNATURE_LEN),
        ("`Content-Digest`", MAX_CONTENT_DIGEST_LEN),
        ("`Stepup-Binding`", MAX_BINDING_LEN),
    ] {
        let r = row(&doc, field);
        assert!(
            r.ends_with(&format!("| {max} bytes |")),
            "docs/step-up.md: {field} limit is {max} bytes, the row says {r:?}"
        );
    }
    let r = row(&doc, "`Accept-Signature`");
    assert!(
        r.contains(&format!("{MAX_ACCEPT_SIGNATURE_LEN} bytes")),
        "docs/step-up.md: Accept-Signature limit is {MAX_ACCEPT_SIGNATURE_LEN} bytes, the row says {r:?}"
    );

    let d = StepUpConfig::default();
    let defaults = [
        ("`nonce_ttl`", format!("{} s", d.nonce_ttl.as_secs())),
        (
            "`max_clock_skew`",
            format!("{} s", d.max_clock_skew.as_secs()),
        ),
        ("`max_body`", format!("{} bytes", d.max_body)),
        ("`max_outstanding`", d.max_outstanding.to_string()),
        (
            "`max_outstanding_per_peer`",
            d.max_outstanding_per_peer.to_string(),
        ),
        ("`channel_binding`", d.channel_binding.to_string()),
    ];
    for (key, value) in defaults {
        let r = row(&doc, key);
        assert!(
            r.starts_with(&format!("| {key} | {value} |")),
            "docs/step-up.md: default of {key} is {value}, the row says {r:?}"
        );
    }
    mentions(
        &doc,
        &format!("default {} s", d.nonce_ttl.as_secs()),
        "the nonce lifetime",
    );
    mentions(
        &doc,
        &format!("default {} s", d.max_clock_skew.as_secs()),
        "the clock skew",
    );
    mentions(
        &doc,
        &format!("(default {})", d.max_outstanding),
        "the global bound",
    );
    mentions(
        &doc,
        &format!("(default {})", d.max_outstanding_per_peer),
        "the per-caller bound",
    );

    // Full table: the statuses and Retry-After the doc gives.
    let global = IssueError::GlobalFull {
        retry_after_secs: 1,
    };
    let peer = IssueError::PeerFull {
        retry_after_secs: 1,
    };
    for (e, why) in [(global, "global bound"), (peer, "per-caller bound")] {
        let status = e.http_status().as_u16();
        let r = row(&doc, &status.to_string());
        assert!(r.contains("`Retry-After`"), "{why}: {status} row {r:?}");
    }
    let w = p256();
    let fx = fixture_with(
        &w,
        StepUpConfig {
            max_outstanding: 0,
            ..StepUpConfig::default()
        },
    );
    match fx.verifier.challenge(&fx.peer, ROUTE, false, None, NOW) {
        Err(IssueError::GlobalFull { retry_after_secs }) => {
            assert_eq!(u64::from(retry_after_secs), d.nonce_ttl.as_secs());
            mentions(
                &doc,
                "`Retry-After` set to the nonce lifetime",
                "Retry-After's value",
            );
        }
        other => panic!("a table bounded at 0 issued: {other:?}"),
    }
}

#[test]
fn the_proxys_metrics_and_signer_results_are_in_the_doc() {
    let doc = doc();
    let proxy = rust_sources(&manifest_dir().join("../proxy/src"));
    let metrics = literals_with_prefix(&proxy, "keyproof_stepup_");
    for m in [
        "keyproof_stepup_verifications_total",
        "keyproof_stepup_signatures_total",
    ] {
        assert!(
            metrics.contains(m),
            "{m} not found in proxy/src: {metrics:?}"
        );
    }
    for m in &metrics {
        mentions(&doc, &format!("`{m}"), "a step-up metric the proxy exports");
    }
    // `SignResult::X => "label"`: the `result` values of
    // keyproof_stepup_signatures_total (and the first word of each
    // x-keyproof-step-up-error reason).
    let mut results = BTreeSet::new();
    let mut rest = proxy.as_str();
    while let Some(i) = rest.find("SignResult::") {
        rest = &rest[i + "SignResult::".len()..];
        let ident_end = rest
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(rest.len());
        if let Some(lit) = rest[ident_end..].strip_prefix(" => \"") {
            let end = lit
                .find(|c: char| !c.is_ascii_lowercase() && c != '_')
                .unwrap_or(lit.len());
            results.insert(lit[..end].to_owned());
        }
    }
    assert!(
        results.len() >= 10 && results.contains("ok") && results.contains("rejected"),
        "signer results not found in proxy/src: {results:?}"
    );
    for r in results {
        mentions(
            &doc,
            &format!("`{r}`"),
            "a keyproof_stepup_signatures_total result",
        );
    }
}

/// Replaces every occurrence of the values that change from run to run.
fn placeholders(s: &str, nonce: &str, keyid: &str) -> String {
    s.replace(nonce, "<nonce>").replace(keyid, "<keyid>")
}

#[test]
fn the_examples_are_what_the_code_sends() {
    let doc = doc();
    // The doc's example: Ed25519, an exporter of 32 bytes of 0x5a, at NOW.
    let w = ed25519();
    let fx = fixture(&w);
    assert_eq!(fx.exporter, [0x5a; BINDING_LEN]);
    let body = br#"{"action":"rotate"}"#;
    mentions(
        &doc,
        &format!("body `{}`", std::str::from_utf8(body).unwrap()),
        "the example body",
    );
    mentions(
        &doc,
        &format!("created={NOW}"),
        "the example's signing time",
    );
    let mut parts = request("POST", "/admin/rotate?x=1", Some("application/json"));

    // The challenge.
    let view = RequestView::from_parts(&parts);
    let ch = fx
        .verifier
        .challenge(&fx.peer, ROUTE, view.has_content_type(), None, NOW)
        .expect("challenge");
    let accept = ch.accept_signature.to_str().expect("text").to_owned();
    let parsed = Challenge::parse(&accept).expect("parse").expect("member");
    let (nonce, keyid) = (parsed.nonce.clone(), parsed.keyid.clone());
    assert_eq!(nonce.len(), ENCODED_LEN);
    mentions(
        &doc,
        &format!("{} characters", keyid.len()),
        "the keyid length",
    );
    for line in [
        format!(
            "WWW-Authenticate: {}",
            ch.www_authenticate.to_str().unwrap()
        ),
        format!(
            "Accept-Signature: {}",
            placeholders(&accept, &nonce, &keyid)
        ),
        format!("Cache-Control: {}", ch.cache_control.to_str().unwrap()),
    ] {
        mentions(
            &doc,
            &format!("\n{line}\n"),
            "a line of the example challenge",
        );
    }
    let refused = fx
        .verifier
        .challenge(&fx.peer, ROUTE, false, Some(Outcome::Replay), NOW)
        .expect("challenge");
    mentions(
        &doc,
        refused.www_authenticate.to_str().unwrap(),
        "the challenge after a refusal",
    );

    // The signed request.
    let signed = fx.sign(&parsed, &mut parts, body, NOW);
    let binding = signed.stepup_binding.to_str().unwrap();
    assert_eq!(binding, format!(":{}:", STANDARD.encode(fx.exporter)));
    mentions(
        &doc,
        &format!("exactly {}", binding.len()),
        "the Stepup-Binding length",
    );
    for line in [
        format!(
            "Content-Digest: {}",
            signed.content_digest.to_str().unwrap()
        ),
        format!("Stepup-Binding: {binding}"),
        format!(
            "Signature-Input: {}",
            placeholders(signed.signature_input.to_str().unwrap(), &nonce, &keyid)
        ),
    ] {
        mentions(
            &doc,
            &format!("\n{line}\n"),
            "a line of the example signed request",
        );
    }
    let sig = signed.signature.to_str().unwrap();
    let sig = sig
        .strip_prefix(&format!("{LABEL}=:"))
        .and_then(|s| s.strip_suffix(':'))
        .expect("stepup=:...:");
    let sig_len = STANDARD.decode(sig).expect("base64").len();
    assert_eq!(sig_len, Alg::Ed25519.signature_len());
    mentions(
        &doc,
        &format!("Signature: {LABEL}=:<{sig_len} bytes, base64>:"),
        "the signature field",
    );

    // The signature base, whole, as the verifier rebuilds it.
    let view = RequestView::from_parts(&parts);
    let pending = fx
        .verifier
        .begin(&fx.peer, ROUTE, &view, NOW)
        .expect("steps 1-7 pass");
    let base = std::str::from_utf8(pending.signature_base()).expect("text");
    mentions(
        &doc,
        &format!("```\n{}\n```", placeholders(base, &nonce, &keyid)),
        "the example signature base (a fenced block of exactly these lines)",
    );
    assert_eq!(pending.finish(body, NOW), Outcome::Ok);
}

#[test]
fn the_design_doc_names_what_the_code_does() {
    let design = manifest_dir().join("../../shared/design/step-up.md");
    let Ok(design) = std::fs::read_to_string(&design) else {
        eprintln!("skipping: {} not found", design.display());
        return;
    };
    let exporter = std::str::from_utf8(EXPORTER_LABEL).expect("ASCII label");
    for needle in [TAG, exporter] {
        mentions_design(&design, needle);
    }
    for alg in all_algs() {
        mentions_design(&design, alg.name());
    }
    for o in Outcome::ALL {
        mentions_design(&design, &format!("`{}`", o.as_str()));
    }
    for c in Component::required(true) {
        mentions_design(&design, &format!("\"{}\"", c.name()));
    }
    let design = design.to_ascii_lowercase();
    for h in all_headers() {
        mentions_design(&design, h.as_str());
    }
}

#[track_caller]
fn mentions_design(design: &str, needle: &str) {
    assert!(
        design.contains(needle),
        "../shared/design/step-up.md (the normative reference) does not mention {needle:?}: the code and the design disagree"
    );
}
