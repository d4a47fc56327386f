//! `Content-Digest` (RFC 9530) with `sha-256`, always present in stepup-v1,
//! also for an empty body.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sfv::{BareItem, Dictionary, ListEntry};

/// SHA-256 of a body: the one hash function of the identity library.
pub use keyproof_identity::keys::sha256;

/// The `Content-Digest` header value for `body`: `sha-256=:<base64>:`.
pub fn content_digest(body: &[u8]) -> String {
    let mut s = String::with_capacity(56);
    s.push_str("sha-256=:");
    s.push_str(&STANDARD.encode(sha256(body)));
    s.push(':');
    s
}

/// Extracts the `sha-256` member of a parsed `Content-Digest` dictionary.
/// `None` if absent or not a 32-byte byte sequence (other algorithms may be
/// present and are ignored, as RFC 9530 allows).
pub fn sha256_member(dict: &Dictionary) -> Option<[u8; 32]> {
    match dict.get("sha-256") {
        Some(ListEntry::Item(item)) => match &item.bare_item {
            BareItem::ByteSequence(b) if b.len() == 32 => {
                let mut out = [0u8; 32];
                out.copy_from_slice(b);
                Some(out)
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // RFC 9530 §2 / RFC 9421 examples: {"hello": "world"} without newline.
        assert_eq!(
            content_digest(br#"{"hello": "world"}"#),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
        // RFC 9530 §2 with the trailing newline.
        assert_eq!(
            content_digest(b"{\"hello\": \"world\"}\n"),
            "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"
        );
        // Empty body: SHA-256 of the empty string.
        assert_eq!(
            content_digest(b""),
            "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
        );
        let dict: Dictionary = sfv::Parser::new(&content_digest(b"x")).parse().unwrap();
        assert_eq!(sha256_member(&dict), Some(sha256(b"x")));
    }
}
