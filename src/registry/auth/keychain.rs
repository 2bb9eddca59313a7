//! Credentials handed to the daemon at run time rather than read from a file: the CRI keychain
//! keeps the pull secrets kubelet sends with each CRI PullImage, per image, in memory only, for
//! a while after the last pull, so the layers lazysnap mounts for that image can be fetched.
//! The registry client consults it before the docker config.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::credentials::normalize_auth_key;
use super::Credentials;
use crate::registry::Reference;

struct Entry {
    credentials: Credentials,
    stored: Instant,
}

/// Credentials by (registry host, repository), each kept `ttl` after it was last given.
pub struct Keychain {
    entries: Mutex<HashMap<(String, String), Entry>>,
    ttl: Duration,
}

impl fmt::Debug for Keychain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let images = crate::sync::lock(&self.entries).len();
        f.debug_struct("Keychain")
            .field("images", &images)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Keychain {
    /// An empty keychain whose entries last `ttl` after their last pull.
    pub fn new(ttl: Duration) -> Self {
        Keychain {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Keeps `credentials` for the image `reference` (replacing older ones).
    pub fn remember(&self, reference: &Reference, credentials: Credentials) {
        let key = (
            normalize_auth_key(&reference.registry),
            reference.repository.clone(),
        );
        let mut entries = crate::sync::lock(&self.entries);
        let now = Instant::now();
        entries.retain(|_, e| now.duration_since(e.stored) < self.ttl);
        entries.insert(
            key,
            Entry {
                credentials,
                stored: now,
            },
        );
    }

    /// The credentials for `repository` on `host`, else the newest ones given for `host`.
    pub fn credentials_for(&self, host: &str, repository: Option<&str>) -> Option<Credentials> {
        let host = normalize_auth_key(host);
        let entries = crate::sync::lock(&self.entries);
        let now = Instant::now();
        let live = |e: &&Entry| now.duration_since(e.stored) < self.ttl;
        if let Some(repository) = repository {
            if let Some(entry) = entries
                .get(&(host.clone(), repository.to_string()))
                .filter(live)
            {
                return Some(entry.credentials.clone());
            }
        }
        entries
            .iter()
            .filter(|((h, _), e)| *h == host && live(e))
            .max_by_key(|(_, e)| e.stored)
            .map(|(_, e)| e.credentials.clone())
    }

    /// Images with live credentials.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        crate::sync::lock(&self.entries)
            .values()
            .filter(|e| now.duration_since(e.stored) < self.ttl)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str) -> Credentials {
        Credentials::Basic {
            username: user.into(),
            password: "pw".into(),
        }
    }

    fn user_of(c: Option<Credentials>) -> Option<String> {
        match c {
            Some(Credentials::Basic { username, .. }) => Some(username),
            _ => None,
        }
    }

    #[test]
    fn credentials_are_found_by_repository_then_by_host_and_expire() {
        let keychain = Keychain::new(Duration::from_secs(60));
        keychain.remember(&Reference::parse("reg:5000/team/a:1").unwrap(), basic("a"));
        keychain.remember(&Reference::parse("reg:5000/team/b:1").unwrap(), basic("b"));
        assert_eq!(
            user_of(keychain.credentials_for("reg:5000", Some("team/a"))).as_deref(),
            Some("a")
        );
        assert_eq!(
            user_of(keychain.credentials_for("reg:5000", Some("other"))).as_deref(),
            Some("b")
        );
        assert!(keychain.credentials_for("elsewhere:5000", None).is_none());
        let expired = Keychain::new(Duration::ZERO);
        expired.remember(&Reference::parse("reg:5000/team/a:1").unwrap(), basic("a"));
        assert!(expired
            .credentials_for("reg:5000", Some("team/a"))
            .is_none());
        assert!(expired.is_empty());
    }

    #[test]
    fn debug_shows_no_secret() {
        let keychain = Keychain::new(Duration::from_secs(60));
        keychain.remember(&Reference::parse("reg:5000/a:1").unwrap(), basic("alice"));
        let shown = format!("{keychain:?}");
        assert!(!shown.contains("alice") && !shown.contains("pw"), "{shown}");
    }
}
