//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! A request carries `webhook-id`, `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`. The secret is
//! written `whsec_<base64 key>`; the key is the decoded bytes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix every Standard Webhooks secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";

/// The shortest key accepted, in bytes: the lower bound the specification recommends.
pub const MIN_KEY_BYTES: usize = 24;

/// How far a `webhook-timestamp` may be from the verifier's clock (the specification's and the
/// reference libraries' tolerance).
pub const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Header names, lower case as HTTP/2 and the specification write them.
pub const HEADER_ID: &str = "webhook-id";
/// See [`HEADER_ID`].
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// See [`HEADER_ID`].
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// A signing key parsed from a `whsec_...` string. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

/// Why a `whsec_...` string is not a usable secret. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The string does not start with `whsec_`.
    #[error("the secret must start with `whsec_` followed by the base64 key")]
    MissingPrefix,
    /// The part after `whsec_` is not standard base64.
    #[error("the part after `whsec_` is not valid standard base64 ({0})")]
    NotBase64(String),
    /// The key is shorter than [`MIN_KEY_BYTES`].
    #[error("the key is {len} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort {
        /// Decoded key length.
        len: usize,
    },
}

impl Secret {
    /// Parses `whsec_<base64>`, padded or not. Surrounding whitespace (a trailing newline from a
    /// secret mounted as a file) is ignored.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD_PAD_INDIFFERENT
            .decode(encoded)
            // The decoder's message names a byte offset, never the secret's content.
            .map_err(|e| SecretError::NotBase64(e.to_string()))?;
        Secret::from_key(key)
    }

    /// A secret from raw key bytes.
    pub fn from_key(key: impl Into<Vec<u8>>) -> Result<Secret, SecretError> {
        let key = key.into();
        if key.len() < MIN_KEY_BYTES {
            return Err(SecretError::TooShort { len: key.len() });
        }
        Ok(Secret { key })
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }
}

impl FromStr for Secret {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Secret::parse(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes, redacted>)", self.key.len())
    }
}

/// The three headers of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `webhook-id`: the message id, the same on every attempt so receivers can deduplicate.
    pub id: String,
    /// `webhook-timestamp`: unix seconds when this attempt was signed.
    pub timestamp: u64,
    /// `webhook-signature`: `v1,<base64 signature>`.
    pub signature: String,
}

impl SignedHeaders {
    /// The headers as (name, value) pairs.
    pub fn pairs(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_ID, self.id.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }
}

fn signed_content(mac: &mut HmacSha256, id: &str, timestamp: &str, body: &[u8]) {
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
}

/// Signs `body` as message `id` at `timestamp` (unix seconds).
pub fn sign(secret: &Secret, id: &str, timestamp: u64, body: &[u8]) -> SignedHeaders {
    let mut mac = secret.mac();
    signed_content(&mut mac, id, &timestamp.to_string(), body);
    let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    SignedHeaders {
        id: id.to_owned(),
        timestamp,
        signature,
    }
}

/// Why [`verify`] rejected a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-timestamp` is not an integer.
    #[error("webhook-timestamp is not unix seconds")]
    BadTimestamp,
    /// The timestamp is outside [`TIMESTAMP_TOLERANCE`] of `now`.
    #[error("webhook-timestamp is more than {}s away from now", TIMESTAMP_TOLERANCE.as_secs())]
    OutsideTolerance,
    /// No `v1` signature in the header matches.
    #[error("no v1 signature matches")]
    NoMatch,
}

/// Verifies a request the way a receiver does: the timestamp within [`TIMESTAMP_TOLERANCE`] of
/// `now` (unix seconds), and any of the space-separated `v1,<sig>` signatures matching.
pub fn verify(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    now: u64,
) -> Result<(), VerifyError> {
    let ts: u64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
    if ts.abs_diff(now) > TIMESTAMP_TOLERANCE.as_secs() {
        return Err(VerifyError::OutsideTolerance);
    }
    for candidate in signature_header.split(' ') {
        let Some(("v1", encoded)) = candidate.split_once(',') else {
            continue;
        };
        let Ok(given) = STANDARD.decode(encoded) else {
            continue;
        };
        let mut mac = secret.mac();
        signed_content(&mut mac, id, timestamp, body);
        // Constant-time comparison.
        if mac.verify_slice(&given).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification and its reference libraries.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: u64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_specification_example() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let headers = sign(&secret, SPEC_ID, SPEC_TS, SPEC_BODY);
        assert_eq!(headers.signature, SPEC_SIG);
        assert_eq!(headers.id, SPEC_ID);
        assert_eq!(
            headers.pairs()[1],
            (HEADER_TIMESTAMP, "1614265330".to_owned())
        );
    }

    #[test]
    fn verify_accepts_own_signature_and_rejects_tampering() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let ts = SPEC_TS.to_string();
        let h = sign(&secret, SPEC_ID, SPEC_TS, SPEC_BODY);
        assert_eq!(
            verify(&secret, SPEC_ID, &ts, &h.signature, SPEC_BODY, SPEC_TS),
            Ok(())
        );
        // Several signatures (key rotation): any match is enough.
        let multi = format!("v1,Zm9v v2,abc {}", h.signature);
        assert_eq!(
            verify(&secret, SPEC_ID, &ts, &multi, SPEC_BODY, SPEC_TS + 10),
            Ok(())
        );
        let no = Err(VerifyError::NoMatch);
        assert_eq!(
            verify(&secret, SPEC_ID, &ts, &h.signature, b"{}", SPEC_TS),
            no
        );
        assert_eq!(
            verify(&secret, "msg_other", &ts, &h.signature, SPEC_BODY, SPEC_TS),
            no
        );
        let ts2 = (SPEC_TS + 1).to_string();
        assert_eq!(
            verify(&secret, SPEC_ID, &ts2, &h.signature, SPEC_BODY, SPEC_TS),
            no
        );
        let other = Secret::from_key([7u8; 32]).unwrap();
        assert_eq!(
            verify(&other, SPEC_ID, &ts, &h.signature, SPEC_BODY, SPEC_TS),
            no
        );
        assert_eq!(
            verify(
                &secret,
                SPEC_ID,
                &ts,
                &h.signature,
                SPEC_BODY,
                SPEC_TS + 301
            ),
            Err(VerifyError::OutsideTolerance)
        );
        assert_eq!(
            verify(&secret, SPEC_ID, "soon", &h.signature, SPEC_BODY, SPEC_TS),
            Err(VerifyError::BadTimestamp)
        );
    }

    #[test]
    fn parse_accepts_unpadded_and_trailing_newline() {
        let key = [42u8; 32];
        let padded = format!("whsec_{}", STANDARD.encode(key));
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=').to_owned();
        for text in [padded.clone(), unpadded, format!("{padded}\n")] {
            assert_eq!(
                Secret::parse(&text).unwrap(),
                Secret::from_key(key).unwrap()
            );
        }
    }

    #[test]
    fn parse_errors_are_clear_and_never_show_the_secret() {
        let hidden = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1ub3QtbGVhaw";
        let e = Secret::parse(hidden).unwrap_err();
        assert_eq!(e, SecretError::MissingPrefix);
        assert!(e.to_string().contains("whsec_"));

        let e = Secret::parse("whsec_not*base64!").unwrap_err();
        assert!(matches!(e, SecretError::NotBase64(_)), "{e:?}");
        assert!(!e.to_string().contains("not*base64"), "{e}");

        let e = Secret::parse(&format!("whsec_{}", STANDARD.encode([1u8; 8]))).unwrap_err();
        assert_eq!(e, SecretError::TooShort { len: 8 });
        assert!(e.to_string().contains("8 bytes"));
    }

    #[test]
    fn debug_redacts_the_key() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let shown = format!("{secret:?} {:?}", Some(&secret));
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("MfKQ"), "{shown}");
        assert!(!shown.contains("49"), "no key bytes: {shown}");
    }
}
