//! API keys: roles, tokens, and their salted hashes. A token is `sk_<id>_<secret>`: the id
//! (12 lowercase hex digits) finds the row, and the secret (32 random bytes, 64 lowercase hex
//! digits) is checked against `SHA-256(salt || secret bytes)`. The secret is returned once, by
//! [`Store::create_api_key`](crate::Store::create_api_key), and never stored.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::RngCore;
use rand::rngs::OsRng;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sends events (HTTP ingest).
    Device,
    /// Reads (queries).
    Viewer,
    /// Reads, and replays and handles dead letters.
    Operator,
    /// Everything, including managing keys.
    Admin,
}

impl Role {
    /// Every role, least powerful first.
    pub const ALL: [Role; 4] = [Role::Device, Role::Viewer, Role::Operator, Role::Admin];

    /// The role as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// May send events.
    pub fn may_ingest(self) -> bool {
        matches!(self, Role::Device | Role::Admin)
    }

    /// May run queries. Devices may not: a leaked device key must not read the fleet's data.
    pub fn may_query(self) -> bool {
        matches!(self, Role::Viewer | Role::Operator | Role::Admin)
    }

    /// May replay and re-drive or discard dead letters.
    pub fn may_operate(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }

    /// May create, list and revoke keys.
    pub fn may_manage_keys(self) -> bool {
        self == Role::Admin
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: expected device, viewer, operator or admin")
            })
    }
}

/// A stored API key, without its secret (which is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// Public id: the second part of the token.
    pub id: String,
    /// A name to recognise it by.
    pub name: Option<String>,
    /// What it may do.
    pub role: Role,
    /// When it was created (microsecond precision).
    pub created_at: DateTime<Utc>,
    /// When it was revoked; a revoked key verifies as nothing.
    pub revoked_at: Option<DateTime<Utc>>,
}

const PREFIX: &str = "sk_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;
const SALT_BYTES: usize = 16;

/// A key as stored, hash and salt included.
#[derive(Debug, Clone)]
pub(crate) struct StoredKey {
    pub key: ApiKey,
    pub salt: Vec<u8>,
    pub hash: Vec<u8>,
}

impl StoredKey {
    /// A new key with fresh randomness, and its token.
    pub fn generate(role: Role, name: Option<&str>, created_at: DateTime<Utc>) -> (Self, String) {
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        let mut salt = [0u8; SALT_BYTES];
        OsRng.fill_bytes(&mut id);
        OsRng.fill_bytes(&mut secret);
        OsRng.fill_bytes(&mut salt);
        let id = hex::encode(id);
        let token = format!("{PREFIX}{id}_{}", hex::encode(secret));
        let stored = StoredKey {
            key: ApiKey {
                id,
                name: name.map(str::to_owned),
                role,
                created_at,
                revoked_at: None,
            },
            hash: hash(&salt, &secret).to_vec(),
            salt: salt.to_vec(),
        };
        (stored, token)
    }

    /// Whether `secret` is this key's; `false` once revoked.
    pub fn accepts(&self, secret: &[u8; SECRET_BYTES]) -> bool {
        let matches = constant_time_eq(&hash(&self.salt, secret), &self.hash);
        matches && self.key.revoked_at.is_none()
    }
}

/// The id and secret of a well-formed token; `None` for anything else.
pub(crate) fn parse_token(token: &str) -> Option<(&str, [u8; SECRET_BYTES])> {
    let (id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    // Lowercase only: one spelling per token, and the id is compared as text.
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !lower_hex(id, 2 * ID_BYTES) || !lower_hex(secret, 2 * SECRET_BYTES) {
        return None;
    }
    let mut bytes = [0u8; SECRET_BYTES];
    hex::decode_to_slice(secret, &mut bytes).ok()?;
    Some((id, bytes))
}

fn hash(salt: &[u8], secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret);
    h.finalize().into()
}

/// Equality whose time does not depend on where the first difference is, so response times
/// do not reveal how much of a guessed hash was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_grant_what_they_say() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert!("Admin".parse::<Role>().is_err());
        let grants = |r: Role| {
            (
                r.may_ingest(),
                r.may_query(),
                r.may_operate(),
                r.may_manage_keys(),
            )
        };
        assert_eq!(grants(Role::Device), (true, false, false, false));
        assert_eq!(grants(Role::Viewer), (false, true, false, false));
        assert_eq!(grants(Role::Operator), (false, true, true, false));
        assert_eq!(grants(Role::Admin), (true, true, true, true));
    }

    #[test]
    fn generated_tokens_parse_and_verify() {
        let (stored, token) = StoredKey::generate(Role::Viewer, Some("ci"), Utc::now());
        let (id, secret) = parse_token(&token).expect("a generated token parses");
        assert_eq!(id, stored.key.id);
        assert_eq!(token.len(), 3 + 12 + 1 + 64);
        assert!(stored.accepts(&secret));
        let mut wrong = secret;
        wrong[31] ^= 1;
        assert!(!stored.accepts(&wrong));
        let revoked = StoredKey {
            key: ApiKey {
                revoked_at: Some(Utc::now()),
                ..stored.key.clone()
            },
            ..stored
        };
        assert!(!revoked.accepts(&secret));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
