//! Registry authentication: credentials from a docker `config.json`, the `WWW-Authenticate`
//! challenge (Basic, or Bearer with realm/service/scope), and bearer tokens.

use std::{collections::BTreeMap, path::Path};

use base64::Engine as _;
use serde::Deserialize;

use crate::registry::RegistryError;

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` value.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// The credentials for `registry` in a docker `config.json`, if it has any.
    pub fn from_docker_config(path: &Path, registry: &str) -> Result<Option<Self>, RegistryError> {
        let bad = |detail: String| RegistryError::Credentials {
            path: path.display().to_string(),
            detail,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
            identitytoken: Option<String>,
        }
        let config: Config = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let keys: Vec<String> = if registry == "docker.io" {
            vec![
                "https://index.docker.io/v1/".into(),
                "index.docker.io".into(),
                "docker.io".into(),
            ]
        } else {
            vec![
                registry.to_string(),
                format!("https://{registry}"),
                format!("http://{registry}"),
            ]
        };
        let Some(entry) = keys.iter().find_map(|k| config.auths.get(k)) else {
            return Ok(None);
        };
        if let Some(token) = &entry.identitytoken {
            return Ok(Some(Self {
                username: "<token>".into(),
                password: token.clone(),
            }));
        }
        if let Some(auth) = &entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad(format!("auth for {registry} is not base64")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| bad(format!("auth for {registry} is not UTF-8")))?;
            let (username, password) = decoded
                .split_once(':')
                .ok_or_else(|| bad(format!("auth for {registry} is not user:password")))?;
            return Ok(Some(Self {
                username: username.into(),
                password: password.into(),
            }));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) => Ok(Some(Self {
                username: u.clone(),
                password: p.clone(),
            })),
            _ => Err(bad(format!(
                "entry for {registry} has neither auth nor username/password"
            ))),
        }
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="https://auth",service="reg",scope="repository:a:pull"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    let mut map = BTreeMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], quoted[end + 1..].trim_start())
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        map.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: map.remove("realm")?,
            service: map.remove("service"),
            scope: map.remove("scope"),
        }),
        _ => None,
    }
}

/// The token in a token server's JSON answer (`token` or `access_token`).
pub(super) fn token_from_response(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
    }
    let parsed: TokenResponse = serde_json::from_slice(body).ok()?;
    parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None, "no realm");
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn docker_config_credentials() {
        let dir = std::env::temp_dir().join(format!("imgstream-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"localhost:5000":{"auth":"dXNlcjpwYXNzOndvcmQ="},
                "https://index.docker.io/v1/":{"username":"hub","password":"pw"},
                "broken.example":{"auth":"!!"}}}"#,
        )
        .unwrap();
        let local = Credentials::from_docker_config(&path, "localhost:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (local.username.as_str(), local.password.as_str()),
            ("user", "pass:word")
        );
        assert_eq!(
            Credentials::from_docker_config(&path, "docker.io")
                .unwrap()
                .unwrap()
                .username,
            "hub"
        );
        assert_eq!(
            Credentials::from_docker_config(&path, "other:1").unwrap(),
            None
        );
        assert!(Credentials::from_docker_config(&path, "broken.example").is_err());
        assert_eq!(
            Credentials::from_docker_config(&dir.join("absent.json"), "x").unwrap(),
            None
        );
        assert!(
            !format!("{local:?}").contains("pass"),
            "Debug must not print the password"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tokens() {
        assert_eq!(
            token_from_response(br#"{"token":"t1"}"#).as_deref(),
            Some("t1")
        );
        assert_eq!(
            token_from_response(br#"{"access_token":"t2"}"#).as_deref(),
            Some("t2")
        );
        assert_eq!(token_from_response(br#"{"token":""}"#), None);
        assert_eq!(token_from_response(b"<html>"), None);
    }
}
