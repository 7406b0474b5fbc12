//! kubelet's credential provider plugins, run by the agent itself: the same
//! `CredentialProviderConfig` file and bin directory kubelet is given
//! (`--image-credential-provider-config`, `--image-credential-provider-bin-dir`), and the same
//! exec protocol (`credentialprovider.kubelet.k8s.io/v1`: a `CredentialProviderRequest` on the
//! plugin's stdin, a `CredentialProviderResponse` on its stdout).
//!
//! kubelet asks a plugin when it pulls; a lazy layer keeps reading for hours after that, long
//! past the lifetime of registry tokens such as ECR's or GAR's. So the registry client asks
//! here when it has no credentials, and again when the registry or its token realm refuses
//! the ones it has: the answer is cached as the plugin says (`cacheKeyType`, `cacheDuration`,
//! else the provider's `defaultCacheDuration`), in memory only, and a refused answer is never
//! served again from the cache. Service-account tokens (`tokenAttributes`) are not available
//! to the agent: such providers are skipped with a warning.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::Credentials;

/// The exec protocol versions understood (they share one shape).
const PROTOCOL_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];

/// The config file versions understood.
const CONFIG_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];

/// Largest config file and plugin answer read: both are a few hundred bytes in practice.
const MAX_CONFIG: u64 = 1 << 20;
const MAX_ANSWER: u64 = 1 << 20;
/// What of a failing plugin's stderr goes into the error.
const MAX_STDERR: usize = 512;
/// Plugin answers cached at most (the soonest to expire goes first beyond it).
const MAX_CACHED: usize = 1024;

/// Errors loading the config or running a plugin. None carries a plugin's stdout: it holds
/// the secret.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("reading the credential provider config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credential provider config {path}: {detail}")]
    Invalid { path: String, detail: String },
    #[error("running credential provider plugin {provider}")]
    Exec {
        provider: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credential provider plugin {provider} gave no answer within {secs} s")]
    Timeout { provider: String, secs: u64 },
    #[error("credential provider plugin {provider} failed ({status}): {stderr}")]
    Failed {
        provider: String,
        status: String,
        stderr: String,
    },
    #[error("credential provider plugin {provider} answered wrongly: {detail}")]
    BadAnswer { provider: String, detail: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    providers: Vec<ProviderEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderEntry {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    token_attributes: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

/// One configured plugin.
#[derive(Debug)]
struct Provider {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    api_version: String,
    patterns: Vec<ImagePattern>,
    default_cache: Duration,
}

/// The plugin's answer.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    api_version: String,
    kind: String,
    cache_key_type: String,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, AnswerAuth>,
}

#[derive(Deserialize)]
struct AnswerAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// A plugin's credentials, each with the image pattern it is for.
type AuthEntries = Vec<(ImagePattern, Credentials)>;

/// A cached answer.
struct Cached {
    auth: AuthEntries,
    expires: Instant,
}

/// The configured plugins and their cached answers.
pub struct CredentialProviders {
    providers: Vec<Provider>,
    timeout: Duration,
    /// By (provider index, cache key): the key is the image, its registry, or "" (global),
    /// as the plugin's `cacheKeyType` said.
    cache: std::sync::Mutex<BTreeMap<(usize, String), Cached>>,
    /// One plugin run at a time: concurrent refusals wait for the first run's answer
    /// instead of each running the plugin.
    running: tokio::sync::Mutex<()>,
    runs: AtomicU64,
}

impl std::fmt::Debug for CredentialProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialProviders")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl CredentialProviders {
    /// Reads kubelet's `CredentialProviderConfig` (YAML or JSON) at `config`; plugins are
    /// programs in `bin_dir` named as their provider. Each run gets `timeout`.
    pub fn load(config: &Path, bin_dir: &Path, timeout: Duration) -> Result<Self, ProviderError> {
        let shown = config.display().to_string();
        let invalid = |detail: String| ProviderError::Invalid {
            path: shown.clone(),
            detail,
        };
        let file = std::fs::File::open(config).map_err(|source| ProviderError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG + 1), &mut text)
            .map_err(|source| ProviderError::Read {
                path: shown.clone(),
                source,
            })?;
        if text.len() as u64 > MAX_CONFIG {
            return Err(invalid(format!("larger than {MAX_CONFIG} bytes")));
        }
        let file: ConfigFile = serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if !CONFIG_VERSIONS.contains(&file.api_version.as_str())
            || file.kind != "CredentialProviderConfig"
        {
            return Err(invalid(format!(
                "{} {} is not a kubelet CredentialProviderConfig",
                file.api_version, file.kind
            )));
        }
        let mut providers = Vec::new();
        for entry in file.providers {
            let name = entry.name;
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(invalid(format!(
                    "provider name {name:?} is not a file name in the bin directory"
                )));
            }
            if !PROTOCOL_VERSIONS.contains(&entry.api_version.as_str()) {
                return Err(invalid(format!(
                    "provider {name}: apiVersion {:?} is not one of {PROTOCOL_VERSIONS:?}",
                    entry.api_version
                )));
            }
            if entry.match_images.is_empty() {
                return Err(invalid(format!("provider {name}: matchImages is empty")));
            }
            let patterns = entry
                .match_images
                .iter()
                .map(|p| {
                    ImagePattern::parse(p).ok_or_else(|| {
                        invalid(format!(
                            "provider {name}: matchImages entry {p:?} is not an image pattern"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let default_cache = match &entry.default_cache_duration {
                Some(d) => go_duration(d).ok_or_else(|| {
                    invalid(format!(
                        "provider {name}: defaultCacheDuration {d:?} is not a duration"
                    ))
                })?,
                None => {
                    return Err(invalid(format!(
                        "provider {name}: defaultCacheDuration is required"
                    )));
                }
            };
            if entry.token_attributes.is_some() {
                tracing::warn!(provider = %name, "credential provider wants a service account token (tokenAttributes), which only kubelet has: the agent does not run it");
                continue;
            }
            providers.push(Provider {
                program: bin_dir.join(&name),
                name,
                args: entry.args,
                env: entry.env.into_iter().map(|e| (e.name, e.value)).collect(),
                api_version: entry.api_version,
                patterns,
                default_cache,
            });
        }
        Ok(Self {
            providers,
            timeout,
            cache: std::sync::Mutex::new(BTreeMap::new()),
            running: tokio::sync::Mutex::new(()),
            runs: AtomicU64::new(0),
        })
    }

    /// Whether some provider's `matchImages` covers `image` (`registry/repository[...]`).
    pub fn serves(&self, image: &str) -> bool {
        let Some(target) = ImagePattern::parse(image) else {
            return false;
        };
        self.providers
            .iter()
            .any(|p| p.patterns.iter().any(|pattern| pattern.matches(&target)))
    }

    /// How many times a plugin was run.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Credentials for `image` other than `refused` (the ones a registry just turned down):
    /// from the cache while its answer lasts, else from running the matching plugins in
    /// order. `None` when no provider serves the image or none has anything new.
    pub async fn credentials(
        &self,
        image: &str,
        refused: Option<&Credentials>,
    ) -> Result<Option<Credentials>, ProviderError> {
        let Some(target) = ImagePattern::parse(image) else {
            return Ok(None);
        };
        let _running = self.running.lock().await;
        if let Some(cached) = self.cached(image, &target, refused) {
            return Ok(Some(cached));
        }
        let mut first_error = None;
        for (index, provider) in self.providers.iter().enumerate() {
            if !provider.patterns.iter().any(|p| p.matches(&target)) {
                continue;
            }
            self.runs.fetch_add(1, Ordering::Relaxed);
            let answer = match provider.run(image, self.timeout).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!(provider = %provider.name, error = %e, "credential provider plugin failed");
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let (key, ttl, auth) = answer.cacheable(provider, image, &target)?;
            let found = best_for(&auth, &target).cloned();
            self.remember(index, key, ttl, auth);
            match found {
                Some(credentials) if Some(&credentials) != refused => {
                    tracing::info!(provider = %provider.name, %image, "credentials from the credential provider plugin");
                    return Ok(Some(credentials));
                }
                _ => continue,
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// A cached answer's credentials for `image` that are not `refused`; a refused answer is
    /// dropped from the cache.
    fn cached(
        &self,
        image: &str,
        target: &ImagePattern,
        refused: Option<&Credentials>,
    ) -> Option<Credentials> {
        let mut cache = crate::sync::lock(&self.cache);
        let now = Instant::now();
        cache.retain(|_, cached| cached.expires > now);
        for (index, provider) in self.providers.iter().enumerate() {
            if !provider.patterns.iter().any(|p| p.matches(target)) {
                continue;
            }
            for key in [image.to_string(), target.registry(), String::new()] {
                let Some(cached) = cache.get(&(index, key.clone())) else {
                    continue;
                };
                match best_for(&cached.auth, target) {
                    Some(c) if Some(c) == refused => {
                        cache.remove(&(index, key));
                    }
                    Some(c) => return Some(c.clone()),
                    None => {}
                }
            }
        }
        None
    }

    fn remember(&self, index: usize, key: String, ttl: Duration, auth: AuthEntries) {
        if ttl.is_zero() {
            return;
        }
        let mut cache = crate::sync::lock(&self.cache);
        cache.insert(
            (index, key),
            Cached {
                auth,
                expires: Instant::now() + ttl,
            },
        );
        while cache.len() > MAX_CACHED {
            let soonest = cache
                .iter()
                .min_by_key(|(_, c)| c.expires)
                .map(|(k, _)| k.clone());
            match soonest {
                Some(key) => cache.remove(&key),
                None => break,
            };
        }
    }
}

/// The most specific credentials in `auth` whose pattern covers `target`.
fn best_for<'a>(
    auth: &'a [(ImagePattern, Credentials)],
    target: &ImagePattern,
) -> Option<&'a Credentials> {
    auth.iter()
        .filter(|(pattern, _)| pattern.matches(target))
        .max_by_key(|(pattern, _)| pattern.specificity())
        .map(|(_, credentials)| credentials)
}

impl Provider {
    /// Runs the plugin for `image`: the request on stdin, the answer from stdout (bounded),
    /// killed when `timeout` passes.
    async fn run(&self, image: &str, timeout: Duration) -> Result<Answer, ProviderError> {
        let exec = |source| ProviderError::Exec {
            provider: self.name.clone(),
            source,
        };
        let request = serde_json::json!({
            "apiVersion": self.api_version,
            "kind": "CredentialProviderRequest",
            "image": image,
        })
        .to_string();
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(exec)?;
        let (mut stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => {
                    return Err(exec(std::io::Error::other(
                        "the plugin's pipes are missing",
                    )));
                }
            };
        let talk = async {
            // A plugin that never reads its stdin still gets to answer.
            let write = async {
                let _ = stdin.write_all(request.as_bytes()).await;
                drop(stdin);
                Ok::<_, std::io::Error>(())
            };
            // Both pipes are drained to the end, so a chatty plugin never blocks on them.
            let (_, out, err) = tokio::try_join!(
                write,
                read_bounded(stdout, MAX_ANSWER + 1),
                read_bounded(stderr, MAX_STDERR as u64)
            )?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(timeout, talk).await {
            Err(_) => {
                return Err(ProviderError::Timeout {
                    provider: self.name.clone(),
                    secs: timeout.as_secs(),
                });
            }
            Ok(result) => result.map_err(exec)?,
        };
        if !status.success() {
            return Err(ProviderError::Failed {
                provider: self.name.clone(),
                status: status.to_string(),
                stderr: String::from_utf8_lossy(&err).trim().to_string(),
            });
        }
        let bad = |detail: String| ProviderError::BadAnswer {
            provider: self.name.clone(),
            detail,
        };
        if out.len() as u64 > MAX_ANSWER {
            return Err(bad(format!("more than {MAX_ANSWER} bytes")));
        }
        // The parser's message could quote the answer, secret and all: only where it broke.
        let answer: Answer = serde_json::from_slice(&out).map_err(|e| {
            bad(format!(
                "not a CredentialProviderResponse (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if answer.api_version != self.api_version || answer.kind != "CredentialProviderResponse" {
            return Err(bad(format!(
                "{} {}, expected {} CredentialProviderResponse",
                answer.api_version, answer.kind, self.api_version
            )));
        }
        Ok(answer)
    }
}

/// Everything `reader` gives until its end, of which the first `limit` bytes are kept.
async fn read_bounded(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = (limit as usize).saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

impl Answer {
    /// The cache key, lifetime and credentials this answer stands for.
    fn cacheable(
        self,
        provider: &Provider,
        image: &str,
        target: &ImagePattern,
    ) -> Result<(String, Duration, AuthEntries), ProviderError> {
        let bad = |detail: String| ProviderError::BadAnswer {
            provider: provider.name.clone(),
            detail,
        };
        let key = match self.cache_key_type.as_str() {
            "Image" => image.to_string(),
            "Registry" => target.registry(),
            "Global" => String::new(),
            other => return Err(bad(format!("cacheKeyType {other:?}"))),
        };
        let ttl = match &self.cache_duration {
            Some(d) => go_duration(d).ok_or_else(|| bad(format!("cacheDuration {d:?}")))?,
            None => provider.default_cache,
        };
        let mut auth = Vec::new();
        for (pattern, entry) in self.auth {
            let parsed = ImagePattern::parse(&pattern)
                .ok_or_else(|| bad(format!("auth key {pattern:?} is not an image pattern")))?;
            auth.push((
                parsed,
                Credentials {
                    username: entry.username,
                    password: entry.password,
                },
            ));
        }
        Ok((key, ttl, auth))
    }
}

/// An image or image pattern as kubelet reads `matchImages` and the keys of a plugin's
/// `auth`: host labels (each a glob), an optional port that must be equal, and a path that
/// must be a prefix of the image's.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ImagePattern {
    labels: Vec<String>,
    port: Option<String>,
    path: String,
}

impl ImagePattern {
    fn parse(text: &str) -> Option<Self> {
        let rest = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port))
                if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (host, Some(port.to_string()))
            }
            _ => (authority, None),
        };
        if host.is_empty() || port.as_deref() == Some("") {
            return None;
        }
        Some(Self {
            labels: host.split('.').map(str::to_string).collect(),
            port,
            path: path.to_string(),
        })
    }

    /// `target`, an image, is covered by this pattern (kubelet's `URLsMatch`).
    fn matches(&self, target: &Self) -> bool {
        self.port == target.port
            && self.labels.len() == target.labels.len()
            && self
                .labels
                .iter()
                .zip(&target.labels)
                .all(|(glob, label)| glob_match(glob.as_bytes(), label.as_bytes()))
            && target.path.starts_with(&self.path)
    }

    /// The registry part (`host[:port]`), the key of a `Registry` cache entry.
    fn registry(&self) -> String {
        let host = self.labels.join(".");
        match &self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }

    /// Longer paths, then fewer wildcards, are more specific.
    fn specificity(&self) -> (usize, usize) {
        let literal = self
            .labels
            .iter()
            .map(|l| l.bytes().filter(|b| !b"*?[".contains(b)).count())
            .sum();
        (self.path.len(), literal)
    }
}

/// Go's `filepath.Match` for one host label: `*` (any run), `?` (one byte), `[...]` classes
/// with ranges and `^` negation, `\` escapes. A malformed pattern matches nothing.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_match(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((b'[', rest)) => {
            let Some((&c, tail)) = text.split_first() else {
                return false;
            };
            match class_match(rest, c) {
                Some((true, after)) => glob_match(after, tail),
                _ => false,
            }
        }
        Some((b'\\', rest)) => match (rest.split_first(), text.split_first()) {
            (Some((p, rest)), Some((t, tail))) => p == t && glob_match(rest, tail),
            _ => false,
        },
        Some((p, rest)) => text.first() == Some(p) && glob_match(rest, &text[1..]),
    }
}

/// Whether `c` is in the class that starts `pattern` (just past its `[`), and the pattern
/// after the class; `None` when the class is never closed.
fn class_match(pattern: &[u8], c: u8) -> Option<(bool, &[u8])> {
    let (negated, mut rest) = match pattern.split_first() {
        Some((b'^', rest)) => (true, rest),
        _ => (false, pattern),
    };
    let mut found = false;
    let mut first = true;
    loop {
        let (&lo, after) = rest.split_first()?;
        if lo == b']' && !first {
            return Some((found != negated, after));
        }
        first = false;
        let (lo, after) = if lo == b'\\' {
            let (&escaped, after) = after.split_first()?;
            (escaped, after)
        } else {
            (lo, after)
        };
        rest = after;
        let hi = match rest {
            [b'-', hi, tail @ ..] if *hi != b']' => {
                rest = tail;
                *hi
            }
            _ => lo,
        };
        if lo <= c && c <= hi {
            found = true;
        }
    }
}

/// A Go duration (`90s`, `1h30m`, `6h0m0s`, `1.5h`, `0`).
fn go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> ImagePattern {
        ImagePattern::parse(text).expect("a pattern")
    }

    #[test]
    fn image_patterns_match_as_kubelet_matches_them() {
        let ecr = pattern("*.dkr.ecr.*.amazonaws.com");
        assert!(ecr.matches(&pattern(
            "123456789.dkr.ecr.us-east-1.amazonaws.com/team/app"
        )));
        // One label per `*`: a deeper host is another pattern's.
        assert!(!ecr.matches(&pattern("a.b.dkr.ecr.us-east-1.amazonaws.com/app")));
        // Ports must be equal, absent on both sides or the same.
        assert!(!pattern("registry.local").matches(&pattern("registry.local:5000/app")));
        assert!(pattern("registry.local:5000").matches(&pattern("registry.local:5000/app")));
        assert!(pattern("https://registry.local:5000").matches(&pattern("registry.local:5000")));
        // The pattern's path is a prefix of the image's.
        assert!(pattern("gcr.io/team").matches(&pattern("gcr.io/team/app")));
        assert!(!pattern("gcr.io/team").matches(&pattern("gcr.io/other/app")));
        assert!(pattern("127.0.0.1:5000").matches(&pattern("127.0.0.1:5000/private/app")));
        // Globs within a label: `?`, classes, ranges, negation, escapes.
        assert!(pattern("reg-?.example").matches(&pattern("reg-1.example")));
        assert!(pattern("reg-[0-3].example").matches(&pattern("reg-2.example")));
        assert!(!pattern("reg-[0-3].example").matches(&pattern("reg-7.example")));
        assert!(pattern("reg-[^0-3].example").matches(&pattern("reg-7.example")));
        assert!(!pattern("reg-[0-3.example").matches(&pattern("reg-2.example")));
        assert!(pattern("reg-\\*.example").matches(&pattern("reg-*.example")));
        assert!(!pattern("reg-\\*.example").matches(&pattern("reg-x.example")));
        assert_eq!(ImagePattern::parse(""), None);
        assert_eq!(ImagePattern::parse("host:/x"), None);
    }

    #[test]
    fn go_durations_parse_and_garbage_does_not() {
        assert_eq!(go_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(go_duration("6h0m0s"), Some(Duration::from_secs(6 * 3600)));
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "12", "h", "1d", "1h-5m", "1..5s", "1e400h"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    /// A directory with a config naming plugin `name` (for `reg.example:5000`), and the
    /// plugin: `body`, a shell script that sees the request in `$REQUEST` and this
    /// directory in `$STATE`.
    fn plugin_dir(test: &str, name: &str, extra: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let dir =
            std::env::temp_dir().join(format!("imgstream-provider-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).expect("scratch dir");
        let config = format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: {name}\n    matchImages: [\"reg.example:5000\"]\n    defaultCacheDuration: 10m\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    env:\n      - name: STATE\n        value: {}\n{extra}",
            dir.display()
        );
        std::fs::write(dir.join("config.yaml"), config).expect("config");
        let program = dir.join("bin").join(name);
        std::fs::write(&program, format!("#!/bin/sh\nREQUEST=$(cat)\n{body}\n")).expect("plugin");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    fn load(dir: &Path, timeout: Duration) -> CredentialProviders {
        CredentialProviders::load(&dir.join("config.yaml"), &dir.join("bin"), timeout)
            .expect("the config loads")
    }

    /// A plugin whose every run hands out a new password, `pw-<run>`, for a cache duration.
    const COUNTING: &str = r#"n=$(( $(cat "$STATE/runs" 2>/dev/null || echo 0) + 1 ))
echo $n > "$STATE/runs"
printf '%s' "$REQUEST" > "$STATE/request"
printf '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"1h","auth":{"reg.example:5000":{"username":"robot","password":"pw-%s"}}}' $n"#;

    #[tokio::test]
    async fn a_plugins_answer_is_cached_and_it_is_run_again_when_refused() {
        let dir = plugin_dir("cache", "counting", "", COUNTING);
        let providers = load(&dir, Duration::from_secs(10));
        let image = "reg.example:5000/team/app";
        assert!(providers.serves(image));
        assert!(!providers.serves("other.example/team/app"));

        let first = providers.credentials(image, None).await.expect("ran");
        assert_eq!(first.as_ref().map(|c| c.password.as_str()), Some("pw-1"));
        let request: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("request")).expect("request"))
                .expect("the request is JSON");
        assert_eq!(
            request,
            serde_json::json!({
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "kind": "CredentialProviderRequest",
                "image": image,
            })
        );
        // Cached by registry: another repository of it needs no run.
        let again = providers
            .credentials("reg.example:5000/team/other", None)
            .await
            .expect("cached");
        assert_eq!(again, first);
        assert_eq!(providers.runs(), 1);
        // Refused: the cached answer is not served again, the plugin gives a new one.
        let renewed = providers
            .credentials(image, first.as_ref())
            .await
            .expect("ran again");
        assert_eq!(renewed.as_ref().map(|c| c.password.as_str()), Some("pw-2"));
        assert_eq!(providers.runs(), 2);
        // Images no provider matches cost no run.
        assert_eq!(
            providers
                .credentials("elsewhere.example/app", None)
                .await
                .expect("nothing to do"),
            None
        );
        assert_eq!(providers.runs(), 2);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[tokio::test]
    async fn failing_slow_and_garbled_plugins_are_clear_errors_without_the_secret() {
        let image = "reg.example:5000/app";
        let dir = plugin_dir("fail", "failing", "", "echo 'no token for you' >&2; exit 3");
        let err = load(&dir, Duration::from_secs(10))
            .credentials(image, None)
            .await
            .expect_err("the plugin failed");
        assert!(
            err.to_string().contains("no token for you") && err.to_string().contains('3'),
            "{err}"
        );

        let dir = plugin_dir("slow", "slow", "", "sleep 30");
        let started = Instant::now();
        let err = load(&dir, Duration::from_millis(300))
            .credentials(image, None)
            .await
            .expect_err("too slow");
        assert!(matches!(err, ProviderError::Timeout { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed at its deadline"
        );

        // A chatty plugin that writes more than is kept still finishes.
        let dir = plugin_dir(
            "chatty",
            "chatty",
            "",
            "head -c 300000 /dev/zero | tr '\\0' x >&2; head -c 2000000 /dev/zero",
        );
        let err = load(&dir, Duration::from_secs(20))
            .credentials(image, None)
            .await
            .expect_err("an answer too large");
        assert!(err.to_string().contains("more than"), "{err}");

        for answer in [
            r#"{"password":"hunter2", "#,
            r#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Sometimes","auth":{"reg.example:5000":{"password":"hunter2"}}}"#,
            r#"{"apiVersion":"v9","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"reg.example:5000":{"password":"hunter2"}}}"#,
            r#"{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"soon","auth":{"reg.example:5000":{"password":"hunter2"}}}"#,
        ] {
            let dir = plugin_dir("garbled", "garbled", "", &format!("printf '%s' '{answer}'"));
            let err = load(&dir, Duration::from_secs(10))
                .credentials(image, None)
                .await
                .expect_err("a wrong answer");
            let shown = crate::error_chain(&err);
            assert!(matches!(err, ProviderError::BadAnswer { .. }), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
            std::fs::remove_dir_all(&dir).expect("cleanup");
        }
    }

    #[test]
    fn configs_kubelet_would_refuse_are_refused_and_token_providers_skipped() {
        let dir = plugin_dir("config", "plain", "", "exit 0");
        let path = dir.join("config.yaml");
        let good = std::fs::read_to_string(&path).expect("config");
        let load_text = |text: &str| {
            std::fs::write(&path, text).expect("config");
            CredentialProviders::load(&path, &dir.join("bin"), Duration::from_secs(1))
        };
        for (bad, why) in [
            (
                good.replace("kubelet.config.k8s.io/v1", "v2"),
                "not a kubelet",
            ),
            (
                good.replace("credentialprovider.kubelet.k8s.io/v1", "x/v1"),
                "apiVersion",
            ),
            (
                good.replace("    defaultCacheDuration: 10m\n", ""),
                "required",
            ),
            (good.replace("10m", "ten minutes"), "defaultCacheDuration"),
            (good.replace("name: plain", "name: ../plain"), "file name"),
            (good.replace("[\"reg.example:5000\"]", "[]"), "matchImages"),
            ("providers: [".to_string(), "config"),
        ] {
            let err = load_text(&bad).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        let with_token =
            format!("{good}    tokenAttributes:\n      serviceAccountTokenAudience: example\n");
        let providers = load_text(&with_token).expect("loads");
        assert!(!providers.serves("reg.example:5000/app"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_most_specific_credentials_win() {
        let creds = |name: &str| Credentials {
            username: name.into(),
            password: "x".into(),
        };
        let auth = vec![
            (pattern("*.example"), creds("wild")),
            (pattern("reg.example"), creds("host")),
            (pattern("reg.example/team"), creds("team")),
        ];
        let best = |image: &str| best_for(&auth, &pattern(image)).map(|c| c.username.clone());
        assert_eq!(best("reg.example/team/app").as_deref(), Some("team"));
        assert_eq!(best("reg.example/other").as_deref(), Some("host"));
        assert_eq!(best("mirror.example/other").as_deref(), Some("wild"));
        assert_eq!(best("elsewhere.test/app"), None);
    }
}
