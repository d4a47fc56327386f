//! RFC 9421 §2.5 signature bases, the stepup-v1 component set, and the view of
//! a request the components are read from.

use std::borrow::Cow;

use http::header::{HeaderName, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Uri};

use crate::sf;

/// The components stepup-v1 signs. The set is fixed: `content-type` is in it
/// exactly when the request has a Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// `@method`
    Method,
    /// `@authority`
    Authority,
    /// `@path`
    Path,
    /// `@query`
    Query,
    /// `content-type`
    ContentType,
    /// `content-digest`
    ContentDigest,
    /// `stepup-binding`
    StepupBinding,
}

impl Component {
    /// The component identifier as written in `Signature-Input`.
    pub const fn name(self) -> &'static str {
        match self {
            Component::Method => "@method",
            Component::Authority => "@authority",
            Component::Path => "@path",
            Component::Query => "@query",
            Component::ContentType => "content-type",
            Component::ContentDigest => "content-digest",
            Component::StepupBinding => "stepup-binding",
        }
    }

    /// The component for an identifier, if stepup-v1 uses it.
    pub fn from_name(name: &str) -> Option<Component> {
        Some(match name {
            "@method" => Component::Method,
            "@authority" => Component::Authority,
            "@path" => Component::Path,
            "@query" => Component::Query,
            "content-type" => Component::ContentType,
            "content-digest" => Component::ContentDigest,
            "stepup-binding" => Component::StepupBinding,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The required list, in the design doc's order.
    pub fn required(has_content_type: bool) -> &'static [Component] {
        use Component::*;
        const WITH: [Component; 7] = [
            Method,
            Authority,
            Path,
            Query,
            ContentType,
            ContentDigest,
            StepupBinding,
        ];
        const WITHOUT: [Component; 6] =
            [Method, Authority, Path, Query, ContentDigest, StepupBinding];
        if has_content_type {
            &WITH
        } else {
            &WITHOUT
        }
    }
}

/// True if `names` (any order) is exactly the required set, no duplicates.
pub(crate) fn is_required_set<'a>(
    names: impl IntoIterator<Item = &'a str>,
    has_content_type: bool,
) -> bool {
    let mut seen = 0u8;
    let mut n = 0usize;
    for name in names {
        let Some(c) = Component::from_name(name) else {
            return false;
        };
        if seen & c.bit() != 0 {
            return false;
        }
        seen |= c.bit();
        n += 1;
    }
    let required = Component::required(has_content_type);
    n == required.len() && required.iter().all(|c| seen & c.bit() != 0)
}

/// What the signature components are read from: a request as it is on the
/// wire on this side of the sidecar. Build it with [`RequestView::new`] or
/// [`RequestView::from_parts`].
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method, as sent (case-sensitive).
    pub method: &'a str,
    /// Authority (`:authority` or `Host`); `None` if the request has none.
    pub authority: Option<&'a str>,
    /// Path; `/` when empty.
    pub path: &'a str,
    /// Query without the `?`, if any.
    pub query: Option<&'a str>,
    /// All header fields.
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// From method, URI and headers. The authority is the URI's (HTTP/2
    /// `:authority`, or absolute-form, which RFC 9112 §3.2.2 says overrides
    /// `Host`), else the `Host` header.
    pub fn new(method: &'a Method, uri: &'a Uri, headers: &'a HeaderMap) -> RequestView<'a> {
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()));
        let path = match uri.path() {
            "" => "/",
            p => p,
        };
        RequestView {
            method: method.as_str(),
            authority,
            path,
            query: uri.query(),
            headers,
        }
    }

    /// From `http::request::Parts`.
    pub fn from_parts(parts: &'a http::request::Parts) -> RequestView<'a> {
        RequestView::new(&parts.method, &parts.uri, &parts.headers)
    }

    /// Replaces the authority (for a proxy that knows better, e.g. after
    /// rewriting the URI).
    pub fn with_authority(mut self, authority: &'a str) -> RequestView<'a> {
        self.authority = Some(authority);
        self
    }

    /// True if the request carries a Content-Type field.
    pub fn has_content_type(&self) -> bool {
        self.headers.contains_key(CONTENT_TYPE)
    }

    /// The value of component `name` per RFC 9421 §2.1-2.2: derived
    /// components `@method`, `@authority` (lower-cased, `:443` dropped), `@path`, `@query`
    /// (`?` plus the query, or just `?`), or a header field (lower-case name).
    /// `None` if the request lacks it or the name is unsupported.
    pub fn component_value(&self, name: &str) -> Option<Cow<'a, [u8]>> {
        match name {
            "@method" => Some(Cow::Borrowed(self.method.as_bytes())),
            "@authority" => {
                // Normalised per RFC 9110 §4.2.3 as RFC 9421 §2.2.3 asks:
                // lower-case, default port dropped. The step-up hop is always
                // TLS (https), so the default port is 443.
                let a = self.authority?;
                let a = a.strip_suffix(":443").unwrap_or(a);
                Some(if a.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(a.to_ascii_lowercase().into_bytes())
                } else {
                    Cow::Borrowed(a.as_bytes())
                })
            }
            "@path" => Some(Cow::Borrowed(self.path.as_bytes())),
            "@query" => {
                let mut q = Vec::with_capacity(1 + self.query.map_or(0, str::len));
                q.push(b'?');
                q.extend_from_slice(self.query.unwrap_or("").as_bytes());
                Some(Cow::Owned(q))
            }
            n if n.starts_with('@') => None,
            n => {
                // Header component names must already be lower-case (§2.1).
                if n.bytes().any(|b| b.is_ascii_uppercase()) {
                    return None;
                }
                let header = HeaderName::from_bytes(n.as_bytes()).ok()?;
                sf::field_value(self.headers, &header).map(Cow::Owned)
            }
        }
    }
}

impl RequestView<'_> {
    /// Appends the value of `component` (as [`RequestView::component_value`]
    /// gives it) to `out`, without an intermediate copy; false, with nothing
    /// appended, if the request lacks it.
    pub(crate) fn push_component_value(&self, component: Component, out: &mut Vec<u8>) -> bool {
        match component {
            Component::Method => out.extend_from_slice(self.method.as_bytes()),
            Component::Authority => {
                let Some(a) = self.authority else {
                    return false;
                };
                let a = a.strip_suffix(":443").unwrap_or(a);
                out.extend(a.bytes().map(|b| b.to_ascii_lowercase()));
            }
            Component::Path => out.extend_from_slice(self.path.as_bytes()),
            Component::Query => {
                out.push(b'?');
                out.extend_from_slice(self.query.unwrap_or("").as_bytes());
            }
            Component::ContentType => {
                return sf::push_field_value(self.headers, &CONTENT_TYPE, out)
            }
            Component::ContentDigest => {
                return sf::push_field_value(self.headers, &crate::headers::CONTENT_DIGEST, out)
            }
            Component::StepupBinding => {
                return sf::push_field_value(self.headers, &crate::headers::STEPUP_BINDING, out)
            }
        }
        true
    }
}

/// Appends the `"<id>": ` that starts a component's line of a signature base.
pub(crate) fn push_line_start(out: &mut Vec<u8>, component: Component) {
    // Component names need no escaping.
    out.push(b'"');
    out.extend_from_slice(component.name().as_bytes());
    out.extend_from_slice(b"\": ");
}

/// The line that ends every signature base, before the parameters.
pub(crate) const SIGNATURE_PARAMS_LINE: &[u8] = b"\"@signature-params\": ";

/// Serialises a component identifier as an sf-string, e.g. `"@method"`.
fn push_identifier(out: &mut Vec<u8>, name: &str) {
    out.push(b'"');
    for b in name.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Builds a signature base (RFC 9421 §2.5): one `"<id>": <value>` line per
/// covered component, in order, then `"@signature-params": <params>` with no
/// trailing newline. `signature_params` is the serialised inner list and
/// parameters exactly as signed (see [`serialize_signature_params`]).
pub fn signature_base<'a, V: AsRef<[u8]>>(
    components: impl IntoIterator<Item = (&'a str, V)>,
    signature_params: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + signature_params.len());
    for (name, value) in components {
        push_identifier(&mut out, name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_ref());
        out.push(b'\n');
    }
    out.extend_from_slice(b"\"@signature-params\": ");
    out.extend_from_slice(signature_params.as_bytes());
    out
}

/// Re-serialises a parsed `Signature-Input` member (inner list plus
/// parameters) with `sfv`, keeping the order received: never reorder, the
/// signer signed its own order.
pub fn serialize_signature_params(member: &sfv::InnerList) -> Option<String> {
    let mut ser = sfv::ListSerializer::new();
    {
        let mut inner = ser.inner_list();
        inner.items(&member.items);
        let _ = inner.finish().parameters(&member.params);
    }
    ser.finish()
}

/// Builds the base for `member` from `req`, reading every covered component
/// from the request. `None` if a component is missing or not a string.
pub fn request_signature_base(req: &RequestView<'_>, member: &sfv::InnerList) -> Option<Vec<u8>> {
    let params = serialize_signature_params(member)?;
    let mut values = Vec::with_capacity(member.items.len());
    for item in &member.items {
        // Component parameters (`;sf`, `;key`, `;req`, `;bs`) change the
        // value; this builder supports none of them.
        if !item.params.is_empty() {
            return None;
        }
        let name = item.bare_item.as_string()?.as_str();
        values.push((name, req.component_value(name)?));
    }
    Some(signature_base(values, &params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_set_matching() {
        let with = [
            "@method",
            "@authority",
            "@path",
            "@query",
            "content-type",
            "content-digest",
            "stepup-binding",
        ];
        assert!(is_required_set(with, true));
        assert!(!is_required_set(with, false));
        assert!(is_required_set(
            with[..]
                .iter()
                .rev()
                .copied()
                .filter(|n| *n != "content-type"),
            false
        ));
        let dup = [
            "@method",
            "@method",
            "@path",
            "@query",
            "content-digest",
            "stepup-binding",
        ];
        assert!(!is_required_set(dup, false));
        let other = [
            "@method",
            "@target-uri",
            "@path",
            "@query",
            "content-digest",
            "stepup-binding",
        ];
        assert!(!is_required_set(other, false));
    }

    #[test]
    fn query_and_authority_values() {
        let headers = HeaderMap::new();
        let m = Method::POST;
        let uri: Uri = "https://Example.COM:8443/a/b".parse().unwrap();
        let v = RequestView::new(&m, &uri, &headers);
        assert_eq!(v.component_value("@query").unwrap().as_ref(), b"?");
        assert_eq!(
            v.component_value("@authority").unwrap().as_ref(),
            b"example.com:8443"
        );
        assert_eq!(v.component_value("@path").unwrap().as_ref(), b"/a/b");
        assert!(v.component_value("content-type").is_none());
        assert!(v.component_value("Content-Type").is_none());
        let uri: Uri = "https://Example.com:443/".parse().unwrap();
        let v = RequestView::new(&m, &uri, &headers);
        assert_eq!(
            v.component_value("@authority").unwrap().as_ref(),
            b"example.com"
        );
        let uri: Uri = "/x?a=1&b".parse().unwrap();
        let v = RequestView::new(&m, &uri, &headers);
        assert_eq!(v.component_value("@query").unwrap().as_ref(), b"?a=1&b");
        assert!(v.authority.is_none());
    }

    #[test]
    fn params_keep_received_order() {
        let d: sfv::Dictionary =
            sfv::Parser::new(r#"s=("b" "a");tag="t";created=5;alg="x";keyid="k";nonce="n""#)
                .parse()
                .unwrap();
        let Some(sfv::ListEntry::InnerList(il)) = d.get("s") else {
            panic!()
        };
        assert_eq!(
            serialize_signature_params(il).unwrap(),
            r#"("b" "a");tag="t";created=5;alg="x";keyid="k";nonce="n""#
        );
    }
}
