//! Structured-field helpers on top of `sfv` (RFC 9651): header combination
//! with size limits, and single-pass visitors for `Signature-Input` and
//! `Signature` that see duplicate keys (a parsed `Dictionary` would silently
//! keep only the last of two `stepup` members).

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
/// `max` bytes. `Ok(None)` if absent.
pub(crate) fn combined(
    headers: &HeaderMap,
    name: &HeaderName,
    max: usize,
) -> Result<Option<String>, FieldError> {
    let mut out: Option<String> = None;
    for value in headers.get_all(name) {
        let text = value.to_str().map_err(|_| FieldError::NotText)?;
        let s = out.get_or_insert_with(String::new);
        let extra = if s.is_empty() { 0 } else { 2 };
        if s.len() + extra + text.len() > max {
            return Err(FieldError::TooLarge);
        }
        if !s.is_empty() {
            s.push_str(", ");
        }
        s.push_str(text);
    }
    Ok(out)
}

/// Component value of a header field per RFC 9421 §2.1: each field line
/// trimmed of leading/trailing whitespace, joined with ", ". Bytes, because a
/// field value need not be UTF-8.
pub(crate) fn field_value(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for value in headers.get_all(name) {
        let v = trim_ows(value.as_bytes());
        let buf = out.get_or_insert_with(Vec::new);
        if !buf.is_empty() {
            buf.extend_from_slice(b", ");
        }
        buf.extend_from_slice(v);
    }
    out
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
}

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
    sfv::Parser::new(input)
        .parse_dictionary_with_visitor(SigInputVisitor::default())
        .ok()
        .flatten()
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
    sfv::Parser::new(input)
        .parse_dictionary_with_visitor(SignatureVisitor::default())
        .ok()
        .flatten()
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
