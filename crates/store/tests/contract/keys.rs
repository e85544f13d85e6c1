//! API keys: a token verifies to its key and role until the key is revoked, nothing else
//! verifies, and the store keeps a salted hash of the secret, never the secret.

use sha2::{Digest, Sha256};
use sluice_store::{ApiKey, Role};

use super::{Harness, now};

/// The id and the secret of a token `sk_<id>_<secret>`.
fn parts(token: &str) -> (&str, &str) {
    token
        .strip_prefix("sk_")
        .and_then(|rest| rest.split_once('_'))
        .unwrap_or_else(|| panic!("not a token: {token}"))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub async fn api_keys_verify_with_their_role<H: Harness>(h: &H) {
    let store = h.open().await;
    let before = now();
    let mut made: Vec<(ApiKey, String)> = Vec::new();
    for role in Role::ALL {
        let name = format!("{role} key");
        let (key, token) = store.create_api_key(role, Some(&name)).await.unwrap();
        let (id, secret) = parts(&token);
        assert_eq!(id, key.id);
        assert!(id.len() == 12 && is_lower_hex(id), "{token}");
        assert!(secret.len() == 64 && is_lower_hex(secret), "{token}");
        assert_eq!(
            (key.role, key.name.as_deref(), key.revoked_at),
            (role, Some(name.as_str()), None)
        );
        assert!(key.created_at >= before && key.created_at <= now());
        made.push((key, token));
    }
    let (anonymous, token) = store.create_api_key(Role::Device, None).await.unwrap();
    assert_eq!(anonymous.name, None);
    made.push((anonymous, token));

    // Any process on the same database verifies them.
    let other = h.connect().await;
    for (key, token) in &made {
        assert_eq!(
            other.verify_api_key(token).await.unwrap().as_ref(),
            Some(key)
        );
    }

    let listed = store.list_api_keys().await.unwrap();
    let mut expected: Vec<ApiKey> = made.into_iter().map(|(k, _)| k).collect();
    expected.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    assert_eq!(listed, expected, "every key, by creation time then id");
}

pub async fn wrong_and_malformed_api_keys_verify_as_nothing<H: Harness>(h: &H) {
    let store = h.open().await;
    let (key, token) = store.create_api_key(Role::Admin, None).await.unwrap();
    let (_, other_token) = store.create_api_key(Role::Viewer, None).await.unwrap();
    let (id, secret) = parts(&token);
    let (other_id, other_secret) = parts(&other_token);
    let flipped = {
        let (head, last) = secret.split_at(63);
        format!("{head}{}", if last == "0" { "1" } else { "0" })
    };

    let mut refused = vec![
        // Well formed, but wrong.
        format!("sk_{id}_{flipped}"),
        format!("sk_{id}_{other_secret}"),
        format!("sk_{other_id}_{secret}"),
        format!(
            "sk_{}_{secret}",
            if id == "000000000000" {
                "111111111111"
            } else {
                "000000000000"
            }
        ),
        // Malformed.
        String::new(),
        "sk_".to_owned(),
        "sk__".to_owned(),
        format!("{id}_{secret}"),
        format!("pk_{id}_{secret}"),
        format!("sk_{id}"),
        format!("sk_{id}_"),
        format!("sk_{id}{secret}"),
        format!("sk_{id}_{}", &secret[..63]),
        format!("sk_{id}_{secret}0"),
        format!("sk_{id}_{}g", &secret[..63]),
        format!("sk_{id}_{secret}_{secret}"),
        format!("sk_{}_{secret}", &id[..11]),
        format!("sk_{id}'--_{secret}"),
        format!(" {token}"),
        format!("{token}\n"),
    ];
    // One spelling per token: upper case is refused (when it changes anything at all).
    for upper in [
        format!("sk_{}_{secret}", id.to_uppercase()),
        format!("sk_{id}_{}", secret.to_uppercase()),
    ] {
        if upper != token {
            refused.push(upper);
        }
    }
    for bad in &refused {
        assert_eq!(store.verify_api_key(bad).await.unwrap(), None, "{bad:?}");
    }
    // The right token still verifies: the refusals above were not an outage.
    assert_eq!(store.verify_api_key(&token).await.unwrap(), Some(key));
}

pub async fn revoked_api_keys_verify_as_nothing<H: Harness>(h: &H) {
    let store = h.open().await;
    let (a, token_a) = store.create_api_key(Role::Device, Some("a")).await.unwrap();
    let (b, token_b) = store
        .create_api_key(Role::Operator, Some("b"))
        .await
        .unwrap();
    assert_eq!(
        store.verify_api_key(&token_a).await.unwrap(),
        Some(a.clone())
    );

    let before = now();
    assert!(store.revoke_api_key(&a.id).await.unwrap());
    let after = now();
    assert_eq!(store.verify_api_key(&token_a).await.unwrap(), None);
    let other = h.connect().await;
    assert_eq!(
        other.verify_api_key(&token_a).await.unwrap(),
        None,
        "another process sees the revocation at once"
    );
    assert_eq!(
        store.verify_api_key(&token_b).await.unwrap(),
        Some(b.clone()),
        "only the revoked key is affected"
    );

    let listed = store.list_api_keys().await.unwrap();
    let find = |id: &str| listed.iter().find(|k| k.id == id).cloned().unwrap();
    let revoked_at = find(&a.id)
        .revoked_at
        .expect("the list shows when it was revoked");
    assert!(revoked_at >= before && revoked_at <= after);
    assert_eq!(find(&b.id), b);

    assert!(
        !store.revoke_api_key(&a.id).await.unwrap(),
        "already revoked"
    );
    assert!(
        !store.revoke_api_key("000000000000").await.unwrap(),
        "no such key"
    );
    assert!(!store.revoke_api_key("").await.unwrap());
    let again = store.list_api_keys().await.unwrap();
    assert_eq!(
        again.iter().find(|k| k.id == a.id).unwrap().revoked_at,
        Some(revoked_at),
        "revoking again does not move the time"
    );
}

pub async fn api_keys_are_listed_without_secrets<H: Harness>(h: &H) {
    let store = h.open().await;
    let mut secrets = Vec::new();
    for role in [Role::Device, Role::Viewer, Role::Admin] {
        let (_, token) = store.create_api_key(role, Some("fleet")).await.unwrap();
        secrets.push(parts(&token).1.to_owned());
    }
    let listed = store.list_api_keys().await.unwrap();
    assert_eq!(listed.len(), 3);
    for key in &listed {
        let shown = [
            format!("{key:?}"),
            serde_json::to_string(key).unwrap(),
            key.id.clone(),
            key.name.clone().unwrap_or_default(),
        ];
        for secret in &secrets {
            // Half a secret is still too much to show.
            let half = &secret[..32];
            for text in &shown {
                assert!(!text.contains(half), "a secret shows in {text}");
            }
        }
    }
}

pub async fn api_keys_are_hashed_with_a_salt<H: Harness>(h: &H) {
    let store = h.open().await;
    let mut salts = Vec::new();
    for _ in 0..2 {
        let (key, token) = store.create_api_key(Role::Device, None).await.unwrap();
        let secret_hex = parts(&token).1;
        let secret = hex::decode(secret_hex).unwrap();
        // Ids are hex, so inlining them is safe.
        let column = async |c: &str| {
            h.blob(&format!("SELECT {c} FROM api_keys WHERE id = '{}'", key.id))
                .await
        };
        let (salt, hash) = (column("salt").await, column("hash").await);
        assert_eq!((salt.len(), hash.len()), (16, 32));
        assert_ne!(hash, Sha256::digest(&secret).to_vec(), "unsalted");
        assert_ne!(hash, Sha256::digest(secret_hex).to_vec(), "unsalted");
        assert_eq!(
            hash,
            Sha256::digest([salt.as_slice(), &secret].concat()).to_vec(),
            "SHA-256(salt || secret)"
        );
        salts.push(salt);
    }
    assert_ne!(salts[0], salts[1], "every key has its own salt");
}
