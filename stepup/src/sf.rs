//! Structured-field helpers on top of `sfv` (RFC 9651): header combination
//! with size limits; single-pass visitors for `Signature-Input` and
//! `Signature` that see duplicate keys (a parsed `Dictionary` would silently
//! keep only the last of two `stepup` members) and for `Content-Digest` and
//! `Stepup-Binding`; and one-scan readers for fields written canonically
//! (as signers and verifiers write them), which leave everything else to
//! the visitors, so both read every field alike.

use std::borrow::Cow;
use std::convert::Infallible;

use http::header::HeaderName;
use http::HeaderMap;
use sfv::visitor::{
    DictionaryVisitor, EntryVisitor, Ignored, InnerListVisitor, ItemVisitor, ParameterVisitor,
};
use sfv::{BareItemFromInput, KeyRef, StringRef};

/// Why a header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldError {
    /// Longer than the limit (all field lines together).
    TooLarge,
    /// Not visible ASCII.
    NotText,
}

/// All field lines of `name` combined with ", " (RFC 9110 §5.3), bounded by
/// `max` bytes. `Ok(None)` if absent. A single field line (the usual case)
/// is borrowed, not copied.
pub(crate) fn combined<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    max: usize,
) -> Result<Option<Cow<'h, str>>, FieldError> {
    let mut lines = headers.get_all(name).iter();
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    let first = first.to_str().map_err(|_| FieldError::NotText)?;
    if first.len() > max {
        return Err(FieldError::TooLarge);
    }
    let Some(mut next) = lines.next() else {
        return Ok(Some(Cow::Borrowed(first)));
    };
    let mut out = String::from(first);
    loop {
        let text = next.to_str().map_err(|_| FieldError::NotText)?;
        // As before the single-line shortcut: an empty line so far adds no
        // separator.
        let extra = if out.is_empty() { 0 } else { 2 };
        if out.len() + extra + text.len() > max {
            return Err(FieldError::TooLarge);
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(text);
        match lines.next() {
            Some(v) => next = v,
            None => return Ok(Some(Cow::Owned(out))),
        }
    }
}

/// Component value of a header field per RFC 9421 §2.1: each field line
/// trimmed of leading/trailing whitespace, joined with ", ". Bytes, because a
/// field value need not be UTF-8.
pub(crate) fn field_value(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    push_field_value(headers, name, &mut out).then_some(out)
}

/// Appends the component value of a header field (as [`field_value`]) to
/// `out`; false, with nothing appended, if the request has no such field.
pub(crate) fn push_field_value(headers: &HeaderMap, name: &HeaderName, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let mut present = false;
    for value in headers.get_all(name) {
        // No separator while the value so far is empty (an empty first line).
        if out.len() > start {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(trim_ows(value.as_bytes()));
        present = true;
    }
    present
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

// ---------------------------------------------------------------------------
// Single-pass readers for the two signature fields. One visitor pass both
// validates the shape (exactly one member, `stepup`, right types, no duplicate
// parameters) and extracts the values, borrowing from the input: no
// intermediate `Dictionary`, and duplicates are seen instead of collapsed.
// ---------------------------------------------------------------------------

/// The `stepup` member of a `Signature-Input` field, in the order received.
#[derive(Debug, Default)]
pub(crate) struct SigInput<'de> {
    /// Component identifiers (sf-strings without parameters).
    pub components: Vec<Cow<'de, StringRef>>,
    /// Signature parameters, in order, no duplicate keys.
    pub params: Vec<(&'de KeyRef, BareItemFromInput<'de>)>,
    /// The member as received (after `stepup=`), when it already is its
    /// own serialisation: then it is the `@signature-params` value as is.
    pub canonical: Option<&'de str>,
}

impl SigInput<'_> {
    /// Appends the member serialised as `sfv` would (RFC 9421 §2.3: the
    /// `@signature-params` value), for
    /// the two parameter types stepup-v1 has (integers and strings); `None`
    /// for any other type, which the profile refuses anyway.
    pub(crate) fn write_serialized(&self, out: &mut Vec<u8>) -> Option<()> {
        if let Some(raw) = self.canonical {
            out.extend_from_slice(raw.as_bytes());
            return Some(());
        }
        out.push(b'(');
        for (i, c) in self.components.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            push_string(out, c.as_str());
        }
        out.push(b')');
        for (key, value) in &self.params {
            out.push(b';');
            out.extend_from_slice(key.as_str().as_bytes());
            out.push(b'=');
            match value {
                BareItemFromInput::Integer(i) => push_integer(out, i64::from(*i)),
                BareItemFromInput::String(v) => push_string(out, v.as_str()),
                _ => return None,
            }
        }
        Some(())
    }
}

/// Appends `s` as an sf-string (RFC 9651 §4.1.6). `s` holds only the
/// characters an sf-string may (a parsed or checked string).
pub(crate) fn push_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    // Without short-circuiting, so that the scan vectorises.
    let escapes = s
        .bytes()
        .fold(false, |found, b| found | (b == b'"') | (b == b'\\'));
    if escapes {
        for b in s.bytes() {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
    } else {
        out.extend_from_slice(s.as_bytes());
    }
    out.push(b'"');
}

/// Appends `i` in decimal, as an sf-integer.
pub(crate) fn push_integer(out: &mut Vec<u8>, i: i64) {
    let mut digits = [0u8; 20];
    let mut n = i.unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

/// What both dictionary visitors require: exactly one member, named
/// `stepup`, with nothing malformed inside it.
#[derive(Default)]
struct OnlyStepup {
    members: usize,
    foreign: bool,
    bad: bool,
}

impl OnlyStepup {
    /// Counts a member; `true` when it is `stepup`, the one to visit.
    fn enter(&mut self, key: &KeyRef) -> bool {
        self.members += 1;
        self.foreign |= key.as_str() != crate::LABEL;
        !self.foreign
    }

    fn valid(&self) -> bool {
        self.members == 1 && !self.foreign && !self.bad
    }
}

#[derive(Default)]
struct SigInputVisitor<'de> {
    seen: OnlyStepup,
    member: SigInput<'de>,
}

impl<'de> DictionaryVisitor<'de> for SigInputVisitor<'de> {
    type Out = Option<SigInput<'de>>;
    type Error = Infallible;

    fn entry(&mut self, key: &'de KeyRef) -> Result<impl EntryVisitor<'de>, Self::Error> {
        Ok(self.seen.enter(key).then_some(self))
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(self.seen.valid().then_some(self.member))
    }
}

impl<'de> EntryVisitor<'de> for &mut SigInputVisitor<'de> {
    type Error = Infallible;

    fn item(self) -> Result<impl ItemVisitor<'de>, Self::Error> {
        // A signature input is an inner list, never a bare item.
        self.seen.bad = true;
        Ok(Ignored)
    }

    fn inner_list(self) -> Result<impl InnerListVisitor<'de>, Self::Error> {
        Ok(self)
    }
}

impl<'de> InnerListVisitor<'de> for &mut SigInputVisitor<'de> {
    type Error = Infallible;

    fn item(&mut self) -> Result<impl ItemVisitor<'de>, Self::Error> {
        Ok(ComponentVisitor(self))
    }

    fn finish(self) -> Result<impl ParameterVisitor<'de>, Self::Error> {
        Ok(SignatureParams(self))
    }
}

struct ComponentVisitor<'a, 'de>(&'a mut SigInputVisitor<'de>);

impl<'de> ItemVisitor<'de> for ComponentVisitor<'_, 'de> {
    type Out = ();
    type Error = Infallible;

    fn bare_item(
        self,
        v: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Self::Out>, Self::Error> {
        match v {
            BareItemFromInput::String(s) => self.0.member.components.push(s),
            _ => self.0.seen.bad = true,
        }
        Ok(NoParams(self.0))
    }
}

/// Component parameters (`;sf`, `;key`, `;bs`, `;req`, ...) change what is
/// signed; stepup-v1 uses none, so any is malformed.
struct NoParams<'a, 'de>(&'a mut SigInputVisitor<'de>);

impl<'de> ParameterVisitor<'de> for NoParams<'_, 'de> {
    type Out = ();
    type Error = Infallible;

    fn parameter(&mut self, _: &'de KeyRef, _: BareItemFromInput<'de>) -> Result<(), Self::Error> {
        self.0.seen.bad = true;
        Ok(())
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(())
    }
}

struct SignatureParams<'a, 'de>(&'a mut SigInputVisitor<'de>);

impl<'de> ParameterVisitor<'de> for SignatureParams<'_, 'de> {
    type Out = ();
    type Error = Infallible;

    fn parameter(
        &mut self,
        key: &'de KeyRef,
        v: BareItemFromInput<'de>,
    ) -> Result<(), Self::Error> {
        // RFC 9651 would let the last duplicate win; a signer that sent two
        // values signed both, so the base could never match. Refuse early.
        if self.0.member.params.iter().any(|(k, _)| *k == key) {
            self.0.seen.bad = true;
        }
        self.0.member.params.push((key, v));
        Ok(())
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(())
    }
}

/// Parses a `Signature-Input` value that must hold exactly one member,
/// `stepup`: an inner list of strings without parameters, and signature
/// parameters without duplicates. `None` for anything else.
pub(crate) fn parse_signature_input(input: &str) -> Option<SigInput<'_>> {
    canonical_signature_input(input).or_else(|| {
        sfv::Parser::new(input)
            .parse_dictionary_with_visitor(SigInputVisitor::default())
            .ok()
            .flatten()
    })
}

/// The common case of [`parse_signature_input`] in one scan: a field that
/// is exactly the serialisation of a single `stepup` member (see
/// [`scan_member`]). Anything else, even if valid, is `None` and goes to the
/// general parser, so both read every input they accept alike.
fn canonical_signature_input(input: &str) -> Option<SigInput<'_>> {
    let member = input.strip_prefix("stepup=")?;
    let scanned = scan_member(member)?;
    let mut components = Vec::with_capacity(scanned.components.len());
    for c in scanned.components {
        components.push(Cow::Borrowed(c));
    }
    let mut params = Vec::with_capacity(scanned.params.len());
    for (key, value) in scanned.params {
        params.push((
            key,
            match value {
                Scalar::String(s) => BareItemFromInput::String(Cow::Borrowed(s)),
                Scalar::Integer(i) => BareItemFromInput::Integer(i),
                Scalar::True => BareItemFromInput::Boolean(true),
            },
        ));
    }
    Some(SigInput {
        components,
        params,
        canonical: Some(member),
    })
}

/// A parameter value [`scan_member`] reads.
pub(crate) enum Scalar<'a> {
    /// An sf-string.
    String(&'a StringRef),
    /// An sf-integer.
    Integer(sfv::Integer),
    /// A bare key (`;created`).
    True,
}

/// An inner list member as [`scan_member`] reads it, borrowing the input.
pub(crate) struct Scanned<'a> {
    /// The inner list's strings.
    pub components: Vec<&'a StringRef>,
    /// The parameters, in order, distinct keys.
    pub params: Vec<(&'a KeyRef, Scalar<'a>)>,
}

/// Reads `member` if it is exactly the serialisation (RFC 9651 §4.1) of an
/// inner list of strings with parameters, as signers and verifiers write
/// it: strings without escapes, single spaces between them, integers
/// without leading zeros, `;key` or `;key=value` parameters with distinct
/// keys, nothing after. `None` for anything else, valid or not.
pub(crate) fn scan_member(member: &str) -> Option<Scanned<'_>> {
    let b = member.as_bytes();
    if b.first() != Some(&b'(') {
        return None;
    }
    let mut i = 1;
    let mut components = Vec::with_capacity(8);
    if b.get(i) == Some(&b')') {
        i += 1;
    } else {
        loop {
            let (s, next) = plain_string(member, i)?;
            components.push(StringRef::from_str(s).ok()?);
            match b.get(next)? {
                b' ' => i = next + 1,
                b')' => {
                    i = next + 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    let mut params: Vec<(&KeyRef, Scalar<'_>)> = Vec::with_capacity(6);
    while i < b.len() {
        if b[i] != b';' {
            return None;
        }
        let key_start = i + 1;
        let key_end = member[key_start..]
            .find(['=', ';'])
            .map_or(b.len(), |n| key_start + n);
        let key = KeyRef::from_str(&member[key_start..key_end]).ok()?;
        if params.iter().any(|(k, _)| *k == key) {
            // Duplicates are the general parser's to read (or refuse).
            return None;
        }
        let (value, next) = if b.get(key_end) != Some(&b'=') {
            (Scalar::True, key_end)
        } else if b.get(key_end + 1) == Some(&b'"') {
            let (s, next) = plain_string(member, key_end + 1)?;
            (Scalar::String(StringRef::from_str(s).ok()?), next)
        } else {
            let start = key_end + 1;
            let end = member[start..].find(';').map_or(b.len(), |n| start + n);
            let i = canonical_integer(&member[start..end])?;
            (Scalar::Integer(sfv::Integer::try_from(i).ok()?), end)
        };
        params.push((key, value));
        i = next;
    }
    Some(Scanned { components, params })
}

/// The sf-string starting with the `"` at `at`, if it has no escapes: its
/// contents and the index after its closing quote.
fn plain_string(s: &str, at: usize) -> Option<(&str, usize)> {
    let b = s.as_bytes();
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    for (n, c) in b[start..].iter().enumerate() {
        match c {
            b'"' => return Some((&s[start..start + n], start + n + 1)),
            // An escape is left to the general parser (and the characters
            // to `StringRef::from_str`, by the caller).
            b'\\' => return None,
            _ => {}
        }
    }
    None
}

/// An sf-integer written the one way it serialises: no `+`, no leading
/// zeros, no `-0`, at most 15 digits.
fn canonical_integer(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let d = digits.as_bytes();
    let ok = !d.is_empty()
        && d.len() <= 15
        && d.iter().all(u8::is_ascii_digit)
        && (d[0] != b'0' || d.len() == 1)
        && !(digits == "0" && text.len() > 1);
    if !ok {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    Some(if text.starts_with('-') { -n } else { n })
}

/// The base64 sfv decodes byte sequences with (RFC 9651 §4.2.7: padding
/// optional, trailing bits ignored), for the shortcuts below to decode
/// exactly as the general parser would.
const SF_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// `prefix` + `:<base64>:` and nothing else: the decoded bytes. `None` for
/// any other shape (the general parser then decides).
fn plain_byte_sequence(input: &str, prefix: &str) -> Option<Vec<u8>> {
    let b64 = input
        .strip_prefix(prefix)?
        .strip_prefix(':')?
        .strip_suffix(':')?;
    if b64.contains(':') {
        return None;
    }
    base64::Engine::decode(&SF_BASE64, b64).ok()
}

#[derive(Default)]
struct SignatureVisitor {
    seen: OnlyStepup,
    value: Option<Vec<u8>>,
}

impl<'de> DictionaryVisitor<'de> for SignatureVisitor {
    type Out = Option<Vec<u8>>;
    type Error = Infallible;

    fn entry(&mut self, key: &'de KeyRef) -> Result<impl EntryVisitor<'de>, Self::Error> {
        Ok(self.seen.enter(key).then_some(self))
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(self.value.filter(|_| self.seen.valid()))
    }
}

impl<'de> EntryVisitor<'de> for &mut SignatureVisitor {
    type Error = Infallible;

    fn item(self) -> Result<impl ItemVisitor<'de>, Self::Error> {
        Ok(self)
    }

    fn inner_list(self) -> Result<impl InnerListVisitor<'de>, Self::Error> {
        self.seen.bad = true;
        Ok(Ignored)
    }
}

impl<'de> ItemVisitor<'de> for &mut SignatureVisitor {
    type Out = ();
    type Error = Infallible;

    fn bare_item(
        self,
        v: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Self::Out>, Self::Error> {
        match v {
            BareItemFromInput::ByteSequence(b) => self.value = Some(b),
            _ => self.seen.bad = true,
        }
        Ok(self)
    }
}

impl<'de> ParameterVisitor<'de> for &mut SignatureVisitor {
    type Out = ();
    type Error = Infallible;

    fn parameter(&mut self, _: &'de KeyRef, _: BareItemFromInput<'de>) -> Result<(), Self::Error> {
        self.seen.bad = true;
        Ok(())
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(())
    }
}

/// Parses a `Signature` value that must hold exactly one member, `stepup`:
/// a byte sequence without parameters.
pub(crate) fn parse_signature(input: &str) -> Option<Vec<u8>> {
    if let Some(sig) = plain_byte_sequence(input, "stepup=") {
        return Some(sig);
    }
    sfv::Parser::new(input)
        .parse_dictionary_with_visitor(SignatureVisitor::default())
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------------
// Single-pass readers for `Content-Digest`, `Stepup-Binding` and
// `Accept-Signature`: the same syntax checks as a parsed `Dictionary` or
// `Item` (the same parser runs), and the same meaning (RFC 9651: the last
// of duplicate keys wins), without building the generic structures.
// ---------------------------------------------------------------------------

/// The `sha-256` member of a `Content-Digest` field: `None` if the field is
/// not a dictionary, or its (last) `sha-256` member is not a 32-byte byte
/// sequence. Other members and parameters are ignored (RFC 9530).
pub(crate) fn parse_content_digest(input: &str) -> Option<[u8; 32]> {
    if let Some(d) = plain_byte_sequence(input, "sha-256=") {
        return <[u8; 32]>::try_from(d.as_slice()).ok();
    }
    sfv::Parser::new(input)
        .parse_dictionary_with_visitor(DigestVisitor::default())
        .ok()
        .flatten()
}

#[derive(Default)]
struct DigestVisitor {
    sha256: Option<[u8; 32]>,
}

impl<'de> DictionaryVisitor<'de> for DigestVisitor {
    type Out = Option<[u8; 32]>;
    type Error = Infallible;

    fn entry(&mut self, key: &'de KeyRef) -> Result<impl EntryVisitor<'de>, Self::Error> {
        Ok(if key.as_str() == "sha-256" {
            // A later `sha-256` replaces an earlier one, whatever it holds.
            self.sha256 = None;
            Some(self)
        } else {
            None
        })
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(self.sha256)
    }
}

impl<'de> EntryVisitor<'de> for &mut DigestVisitor {
    type Error = Infallible;

    fn item(self) -> Result<impl ItemVisitor<'de>, Self::Error> {
        Ok(self)
    }

    fn inner_list(self) -> Result<impl InnerListVisitor<'de>, Self::Error> {
        Ok(Ignored)
    }
}

impl<'de> ItemVisitor<'de> for &mut DigestVisitor {
    type Out = ();
    type Error = Infallible;

    fn bare_item(
        self,
        v: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Self::Out>, Self::Error> {
        if let BareItemFromInput::ByteSequence(b) = v {
            self.sha256 = <[u8; 32]>::try_from(b.as_slice()).ok();
        }
        Ok(Ignored)
    }
}

/// A `Stepup-Binding` field: a byte sequence without parameters.
pub(crate) fn parse_binding(input: &str) -> Option<Vec<u8>> {
    if let Some(b) = plain_byte_sequence(input, "") {
        return Some(b);
    }
    sfv::Parser::new(input)
        .parse_item_with_visitor(BindingVisitor)
        .ok()
        .flatten()
}

struct BindingVisitor;

impl<'de> ItemVisitor<'de> for BindingVisitor {
    type Out = Option<Vec<u8>>;
    type Error = Infallible;

    fn bare_item(
        self,
        v: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Self::Out>, Self::Error> {
        Ok(BindingParams(match v {
            BareItemFromInput::ByteSequence(b) => Some(b),
            _ => None,
        }))
    }
}

struct BindingParams(Option<Vec<u8>>);

impl<'de> ParameterVisitor<'de> for BindingParams {
    type Out = Option<Vec<u8>>;
    type Error = Infallible;

    fn parameter(&mut self, _: &'de KeyRef, _: BareItemFromInput<'de>) -> Result<(), Self::Error> {
        self.0 = None;
        Ok(())
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(self.0)
    }
}

#[cfg(test)]
impl SigInput<'_> {
    /// `("c1" "c2" ...);p1=v1;...` exactly as RFC 9421 §2.3 serialises the
    /// received member (for the `@signature-params` line).
    pub(crate) fn serialize(&self) -> Option<std::string::String> {
        let mut ser = sfv::ListSerializer::new();
        {
            let mut inner = ser.inner_list();
            for c in &self.components {
                let _ = inner.bare_item(&**c);
            }
            let _ = inner.finish().parameters(
                self.params
                    .iter()
                    .map(|(k, v)| (*k, sfv::RefBareItem::from(v))),
            );
        }
        ser.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_and_bounds() {
        let mut h = HeaderMap::new();
        let n = HeaderName::from_static("x-a");
        assert_eq!(combined(&h, &n, 10), Ok(None));
        h.append(&n, "abc".parse().unwrap());
        h.append(&n, "de".parse().unwrap());
        assert_eq!(combined(&h, &n, 10), Ok(Some("abc, de".into())));
        assert_eq!(combined(&h, &n, 6), Err(FieldError::TooLarge));
        h.insert(&n, http::HeaderValue::from_bytes(b"  a\xff ").unwrap());
        assert_eq!(combined(&h, &n, 10), Err(FieldError::NotText));
        assert_eq!(field_value(&h, &n), Some(b"a\xff".to_vec()));
    }
}

#[cfg(test)]
mod visitor_tests {
    use super::*;

    #[test]
    fn signature_input_shapes() {
        let ok = parse_signature_input(r#"stepup=("@method" "@path");created=1;tag="t""#).unwrap();
        assert_eq!(ok.components.len(), 2);
        assert_eq!(
            ok.serialize().unwrap(),
            r#"("@method" "@path");created=1;tag="t""#
        );
        // Whitespace normalised by re-serialisation, order kept.
        let ws =
            parse_signature_input(r#"stepup=( "@path"  "@method" ); tag="t";created=1"#).unwrap();
        assert_eq!(
            ws.serialize().unwrap(),
            r#"("@path" "@method");tag="t";created=1"#
        );
        for bad in [
            r#"stepup=("@method");created=1;created=2"#,
            r#"stepup=("@method";sf)"#,
            r#"stepup=(@method)"#,
            r#"stepup="x""#,
            r#"stepup=("@method"), stepup=("@method")"#,
            r#"stepup=("@method"), x=("@method")"#,
            r#"x=("@method")"#,
            "",
            "stepup=(",
        ] {
            assert!(parse_signature_input(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn signature_shapes() {
        assert_eq!(parse_signature("stepup=:AQI=:"), Some(vec![1, 2]));
        for bad in [
            "stepup=:AQI=:;x",
            "stepup=(:AQI=:)",
            "stepup=\"x\"",
            "stepup=:AQI=:, stepup=:AQI=:",
            "stepup=:AQI=:, o=:AQI=:",
            "",
        ] {
            assert!(parse_signature(bad).is_none(), "{bad}");
        }
    }
}

/// The single-pass readers against the generic parsed structures they
/// replace, on inputs that probe duplicates, types and parameters.
#[cfg(test)]
mod equivalence_tests {
    use super::*;
    use sfv::{Dictionary, Item, Parser};

    #[test]
    fn content_digests_read_as_from_a_dictionary() {
        let member = |dict: &Dictionary| -> Option<[u8; 32]> { crate::digest::sha256_member(dict) };
        let good = crate::digest::content_digest(b"x");
        let other = crate::digest::content_digest(b"y");
        for input in [
            good.clone(),
            format!("{good}, {other}"),
            format!("{good}, sha-256=:AAAA:"),
            format!("sha-256=:AAAA:, {good}"),
            format!("{good}, sha-256=(:AAAA:)"),
            format!("{good};p=1, sha-512=:AAAA:"),
            format!("sha-512=:AAAA:, {good}"),
            format!("{good}, sha-256"),
            "sha-256=\"x\"".into(),
            "sha-256=:AAAA:".into(),
            "sha-256=:%:".into(),
            String::new(),
        ] {
            let by_dict = Parser::new(&input)
                .parse::<Dictionary>()
                .ok()
                .and_then(|d| member(&d));
            assert_eq!(parse_content_digest(&input), by_dict, "{input}");
        }
    }

    #[test]
    fn bindings_read_as_from_an_item() {
        for input in [
            ":AAAA:",
            ":AAAA:;x",
            ":AAAA:;x=1;y",
            "\"AAAA\"",
            "1",
            "",
            ":AAAA:, :BB==:",
        ] {
            let by_item = Parser::new(input).parse::<Item>().ok().and_then(|item| {
                item.params
                    .is_empty()
                    .then_some(())
                    .and_then(|()| item.bare_item.as_byte_sequence().map(<[u8]>::to_vec))
            });
            assert_eq!(parse_binding(input), by_item, "{input}");
        }
    }

    #[test]
    fn signature_params_are_written_as_sfv_serialises_them() {
        for input in [
            r#"stepup=("@method" "@path");created=1;tag="t""#,
            r#"stepup=( "@path"  "@method" ); tag="t";created=-15;nonce="a\"b\\c""#,
            r#"stepup=();created=999999999999999"#,
            r#"stepup=("x")"#,
        ] {
            let member = parse_signature_input(input).expect(input);
            let mut out = Vec::new();
            member.write_serialized(&mut out).expect(input);
            assert_eq!(
                std::str::from_utf8(&out).ok(),
                member.serialize().as_deref(),
                "{input}"
            );
        }
        // Parameter types stepup-v1 does not have are not written.
        let member = parse_signature_input(r#"stepup=("x");a=?1"#).expect("parses");
        assert!(member.write_serialized(&mut Vec::new()).is_none());
    }

    #[test]
    fn component_values_are_written_as_read() {
        use http::header::{HeaderValue, CONTENT_TYPE, HOST};
        use http::{Method, Uri};

        use crate::base::{Component, RequestView};
        use crate::headers::{CONTENT_DIGEST, STEPUP_BINDING};

        let mut h = HeaderMap::new();
        h.append(CONTENT_TYPE, HeaderValue::from_static("  "));
        h.append(CONTENT_TYPE, HeaderValue::from_static(" text/plain "));
        h.append(CONTENT_TYPE, HeaderValue::from_static("\tcharset=x"));
        h.append(
            CONTENT_DIGEST,
            HeaderValue::from_bytes(b"sha-256=:\xff:").unwrap(),
        );
        h.append(STEPUP_BINDING, HeaderValue::from_static(""));
        h.append(HOST, HeaderValue::from_static("Host.Example:8443"));
        let m = Method::from_bytes(b"pAtCh").unwrap();
        for uri in ["https://API.Example:443/a/b?q=1&r", "/x", "/?", "*"] {
            let uri: Uri = uri.parse().unwrap();
            let view = RequestView::new(&m, &uri, &h);
            let bare = HeaderMap::new();
            let without = RequestView::new(&m, &uri, &bare);
            for c in [
                Component::Method,
                Component::Authority,
                Component::Path,
                Component::Query,
                Component::ContentType,
                Component::ContentDigest,
                Component::StepupBinding,
            ] {
                for v in [view, without] {
                    let mut out = b"prefix".to_vec();
                    let written = v.push_component_value(c, &mut out);
                    let read = v.component_value(c.name());
                    assert_eq!(written, read.is_some(), "{c:?} {uri}");
                    let mut want = b"prefix".to_vec();
                    want.extend_from_slice(read.as_deref().unwrap_or_default());
                    assert_eq!(out, want, "{c:?} {uri}");
                }
            }
        }
    }
}

/// The one-scan shortcuts against the general parser, on mutations of
/// genuine fields: whatever a shortcut accepts, the general parser reads the
/// same way (same components, parameters, serialisation, bytes).
#[cfg(test)]
pub(crate) mod shortcut_tests {
    use super::*;
    use sfv::{Dictionary, Item, Parser};

    /// The general path of `parse_signature_input`.
    fn general(input: &str) -> Option<SigInput<'_>> {
        sfv::Parser::new(input)
            .parse_dictionary_with_visitor(SigInputVisitor::default())
            .ok()
            .flatten()
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const PIECES: &[&str] = &[
        " ",
        "  ",
        "\t",
        ";",
        "=",
        "\"",
        "\\",
        "(",
        ")",
        ",",
        ":",
        "-",
        "0",
        "00",
        "-0",
        "1",
        "?1",
        "1.5",
        "a",
        "A",
        "*",
        "created",
        "nonce",
        "stepup",
        "x=1",
        ";created",
        ";created=1",
        ";nonce=\"n\"",
        ", other=1",
        "\\\"",
        "AAAA",
        "==",
        "+/",
        "%",
    ];

    /// `seed` with one to three random insertions, deletions or
    /// replacements of structured-field syntax.
    pub(crate) fn mutate(rng: &mut Rng, seed: &str) -> String {
        let mut s = seed.to_owned();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(s.len() + 1);
            if !s.is_char_boundary(at) {
                return s;
            }
            match rng.below(3) {
                0 => s.insert_str(at, PIECES[rng.below(PIECES.len())]),
                1 if at < s.len() => {
                    let end = (at + 1 + rng.below(4)).min(s.len());
                    s.replace_range(at..end, "");
                }
                _ => {
                    let end = (at + rng.below(3)).min(s.len());
                    s.replace_range(at..end, PIECES[rng.below(PIECES.len())]);
                }
            }
        }
        s
    }

    const INPUT: &str = r#"stepup=("@method" "@authority" "@path" "@query" "content-digest" "stepup-binding");created=1764000000;nonce="AbC-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH";alg="ecdsa-p256-sha256";keyid="k-_Z";tag="stepup-v1""#;

    /// A genuine field and short ones, where mutations reach every part.
    const SEEDS: &[&str] = &[
        INPUT,
        r#"stepup=("a");created=1;expires=22"#,
        r#"stepup=("a" "b");x=0;y="""#,
        r#"stepup=();k="v""#,
    ];

    #[test]
    fn signature_inputs_read_alike() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for n in 0..80_000 {
            let seed = SEEDS[n % SEEDS.len()];
            let input = if n < SEEDS.len() {
                seed.to_owned()
            } else {
                mutate(&mut rng, seed)
            };
            let Some(fast) = canonical_signature_input(&input) else {
                continue;
            };
            accepted += 1;
            let slow =
                general(&input).unwrap_or_else(|| panic!("only the shortcut reads {input:?}"));
            assert_eq!(fast.components, slow.components, "{input}");
            assert_eq!(fast.params, slow.params, "{input}");
            assert_eq!(fast.canonical, slow.serialize().as_deref(), "{input}");
            // The hand-written serialisation covers integers and strings
            // (the only types stepup-v1 accepts).
            let mut written = Vec::new();
            if slow.write_serialized(&mut written).is_none() {
                continue;
            }
            assert_eq!(
                fast.canonical.map(str::as_bytes),
                Some(&written[..]),
                "{input}"
            );
        }
        // The generator must exercise the shortcut, not only the fallback.
        assert!(accepted > 5_000, "{accepted}");
    }

    #[test]
    fn byte_sequence_fields_read_alike() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let sig = format!("stepup=:{}:", "QUJD".repeat(22));
        let digest = crate::digest::content_digest(b"{}");
        let binding = format!(":{}=:", "A".repeat(43));
        for n in 0..20_000 {
            let pick = |s: &str, rng: &mut Rng| if n < 3 { s.to_owned() } else { mutate(rng, s) };
            let s = pick(&sig, &mut rng);
            let by_visitor = sfv::Parser::new(&s)
                .parse_dictionary_with_visitor(SignatureVisitor::default())
                .ok()
                .flatten();
            assert_eq!(parse_signature(&s), by_visitor, "{s}");
            let d = pick(&digest, &mut rng);
            let by_dict = Parser::new(&d)
                .parse::<Dictionary>()
                .ok()
                .and_then(|dict| crate::digest::sha256_member(&dict));
            assert_eq!(parse_content_digest(&d), by_dict, "{d}");
            let b = pick(&binding, &mut rng);
            let by_item = Parser::new(&b).parse::<Item>().ok().and_then(|item| {
                item.params
                    .is_empty()
                    .then(|| item.bare_item.as_byte_sequence().map(<[u8]>::to_vec))
                    .flatten()
            });
            assert_eq!(parse_binding(&b), by_item, "{b}");
        }
    }
}
