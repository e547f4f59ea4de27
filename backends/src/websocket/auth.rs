//! The bearer-token check, in constant time.

use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

/// Whether `headers` carry `Authorization: Bearer <expected>`. The comparison
/// takes the same time whatever the offered token (its length included): it
/// depends on the expected token's length only.
pub(super) fn bearer_matches(headers: &HeaderMap, expected: &[u8]) -> bool {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    // The scheme is case-insensitive (RFC 9110, 11.1); one space follows it.
    let Some((scheme, token)) = value.split_at_checked(7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    tokens_equal(token, expected)
}

/// `offered == expected`, in time that depends on `expected.len()` only.
pub(super) fn tokens_equal(offered: &[u8], expected: &[u8]) -> bool {
    let mut padded = vec![0u8; expected.len()];
    let n = offered.len().min(expected.len());
    padded[..n].copy_from_slice(&offered[..n]);
    let same_bytes = padded.ct_eq(expected);
    let same_len = (offered.len() as u64).ct_eq(&(expected.len() as u64));
    bool::from(same_bytes & same_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer() {
        assert!(bearer_matches(&headers("Bearer s3cret"), b"s3cret"));
        assert!(bearer_matches(&headers("bearer s3cret"), b"s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cre"), b"s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cretx"), b"s3cret"));
        assert!(!bearer_matches(&headers("Bearer "), b"s3cret"));
        assert!(!bearer_matches(&headers("Basic s3cret"), b"s3cret"));
        assert!(!bearer_matches(&headers("Bear"), b"s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), b"s3cret"));
    }
}
