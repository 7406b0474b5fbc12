//! Credentials kubelet handed to the runtime, kept in memory for the lazy layers of the images
//! they pulled: keyed by registry and repository, never written anywhere, dropped when they
//! age out or when no image of their repository is left on the node.
//!
//! The CRI image proxy ([`crate::cri::image_proxy`]) keeps what each `PullImage` carried;
//! [`super::http::RegistryClient::new`] asks here before it reads a docker `config.json`.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::http::Credentials;

/// Repositories remembered at most; the least recently kept goes first beyond it. A node
/// runs a few hundred images at most: this bounds memory against a runaway caller, not use.
pub const MAX_REPOSITORIES: usize = 4096;

/// How long kept credentials serve when the agent is not told otherwise: long enough for a
/// large image's background download after its pull, short enough that a revoked secret does
/// not linger for days. Registry tokens handed out by credential providers expire sooner,
/// and a registry that refuses them is answered with an error like any other refusal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);

/// Credentials by (registry, repository), each with when it was kept.
pub struct Keyring {
    entries: Mutex<BTreeMap<(String, String), (Credentials, Instant)>>,
    ttl: Duration,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("repositories", &self.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Keyring {
    /// An empty keyring whose entries serve for `ttl` after they were kept.
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
            ttl,
        }
    }

    /// Keeps `credentials` for `registry/repository`, replacing what was kept for it.
    pub fn keep(&self, registry: &str, repository: &str, credentials: Credentials) {
        let mut entries = crate::sync::lock(&self.entries);
        let now = Instant::now();
        entries.retain(|_, (_, kept)| now.duration_since(*kept) < self.ttl);
        entries.insert(
            (registry.to_string(), repository.to_string()),
            (credentials, now),
        );
        while entries.len() > MAX_REPOSITORIES {
            let oldest = entries
                .iter()
                .min_by_key(|(_, (_, kept))| *kept)
                .map(|(key, _)| key.clone());
            match oldest {
                Some(key) => entries.remove(&key),
                None => break,
            };
        }
    }

    /// What was kept for `registry/repository`, unless it has aged out.
    pub fn get(&self, registry: &str, repository: &str) -> Option<Credentials> {
        let mut entries = crate::sync::lock(&self.entries);
        let key = (registry.to_string(), repository.to_string());
        let (credentials, kept) = entries.get(&key)?;
        if kept.elapsed() < self.ttl {
            return Some(credentials.clone());
        }
        entries.remove(&key);
        None
    }

    /// Drops what was kept for `registry/repository`.
    pub fn forget(&self, registry: &str, repository: &str) -> bool {
        crate::sync::lock(&self.entries)
            .remove(&(registry.to_string(), repository.to_string()))
            .is_some()
    }

    /// The repositories credentials are kept for, aged-out ones included until looked at.
    pub fn repositories(&self) -> Vec<(String, String)> {
        crate::sync::lock(&self.entries).keys().cloned().collect()
    }

    /// How many repositories have credentials kept.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.entries).len()
    }

    /// Whether no credentials are kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Credentials {
        Credentials {
            username: name.into(),
            password: format!("{name}-secret"),
        }
    }

    #[test]
    fn credentials_serve_their_own_repository_until_they_age_out() {
        let keyring = Keyring::new(Duration::from_millis(200));
        keyring.keep("reg:5000", "team/app", user("alice"));
        assert_eq!(keyring.get("reg:5000", "team/app"), Some(user("alice")));
        // Another repository of the same registry, or the same path on another registry,
        // is another secret's business.
        assert_eq!(keyring.get("reg:5000", "team/other"), None);
        assert_eq!(keyring.get("reg:5001", "team/app"), None);
        // The latest pull's credentials replace the earlier ones.
        keyring.keep("reg:5000", "team/app", user("bob"));
        assert_eq!(keyring.get("reg:5000", "team/app"), Some(user("bob")));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(keyring.get("reg:5000", "team/app"), None);
        assert!(
            keyring.is_empty(),
            "an aged-out entry is dropped when looked at"
        );
    }

    #[test]
    fn forgetting_drops_one_repository_and_the_count_is_bounded() {
        let keyring = Keyring::new(DEFAULT_TTL);
        keyring.keep("reg", "a", user("a"));
        keyring.keep("reg", "b", user("b"));
        assert!(keyring.forget("reg", "a"));
        assert!(!keyring.forget("reg", "a"));
        assert_eq!(keyring.repositories(), vec![("reg".into(), "b".into())]);
        for i in 0..MAX_REPOSITORIES + 10 {
            keyring.keep("reg", &format!("r{i}"), user("u"));
        }
        assert_eq!(keyring.len(), MAX_REPOSITORIES);
        // The most recent are the ones kept.
        let last = format!("r{}", MAX_REPOSITORIES + 9);
        assert!(keyring.get("reg", &last).is_some());
        assert!(keyring.get("reg", "b").is_none());
    }

    #[test]
    fn debug_output_names_no_secret() {
        let keyring = Keyring::new(DEFAULT_TTL);
        keyring.keep("reg", "app", user("alice"));
        let shown = format!("{keyring:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("alice"),
            "{shown}"
        );
    }
}
