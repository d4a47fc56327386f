//! Just enough DER to find the SubjectPublicKeyInfo in a certificate and the
//! AlgorithmIdentifier in an SPKI. The certificate was already verified by
//! rustls/webpki; this walk only has to be bounds-safe, never trusting lengths.

/// One TLV: (tag, whole encoding including header, contents).
pub(crate) struct Tlv<'a> {
    pub tag: u8,
    pub whole: &'a [u8],
    pub contents: &'a [u8],
}

/// Reads one TLV from the front of `input`; returns it and the rest.
pub(crate) fn read_tlv(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let tag = *input.first()?;
    // Multi-byte tags never occur in the structures we walk.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        // DER never needs more than 4 length bytes for anything we accept.
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if end > input.len() {
        return None;
    }
    Some((
        Tlv {
            tag,
            whole: &input[..end],
            contents: &input[header..end],
        },
        &input[end..],
    ))
}

/// The SubjectPublicKeyInfo TLV (whole encoding) of an X.509 certificate.
pub(crate) fn cert_spki(cert: &[u8]) -> Option<&[u8]> {
    let (cert, _) = read_tlv(cert)?;
    if cert.tag != 0x30 {
        return None;
    }
    let (tbs, _) = read_tlv(cert.contents)?;
    if tbs.tag != 0x30 {
        return None;
    }
    let mut rest = tbs.contents;
    let (first, after) = read_tlv(rest)?;
    // Optional explicit [0] version.
    if first.tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer, validity, subject.
    for expected in [0x02u8, 0x30, 0x30, 0x30, 0x30] {
        let (tlv, after) = read_tlv(rest)?;
        if tlv.tag != expected {
            return None;
        }
        rest = after;
    }
    let (spki, _) = read_tlv(rest)?;
    (spki.tag == 0x30).then_some(spki.whole)
}

/// The AlgorithmIdentifier TLV (whole encoding) of an SPKI, if the SPKI is a
/// single well-formed SEQUENCE { AlgorithmIdentifier, BIT STRING }.
pub(crate) fn spki_algorithm(spki: &[u8]) -> Option<&[u8]> {
    let (outer, trailing) = read_tlv(spki)?;
    if outer.tag != 0x30 || !trailing.is_empty() {
        return None;
    }
    let (alg, rest) = read_tlv(outer.contents)?;
    let (bits, rest) = read_tlv(rest)?;
    if alg.tag != 0x30 || bits.tag != 0x03 || !rest.is_empty() {
        return None;
    }
    Some(alg.whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_inputs_are_rejected() {
        assert!(read_tlv(&[]).is_none());
        assert!(read_tlv(&[0x30]).is_none());
        assert!(read_tlv(&[0x30, 0x05, 0x00]).is_none());
        assert!(read_tlv(&[0x30, 0x85, 0, 0, 0, 0, 1]).is_none());
        assert!(cert_spki(&[0x30, 0x00]).is_none());
        assert!(spki_algorithm(&[0x30, 0x00]).is_none());
    }
}
