//! Image references: `[registry/]repository[:tag][@digest]` (Docker Hub names normalised), and
//! `oci:PATH[:TAG]` for local OCI layouts.

use std::{fmt, path::PathBuf};

use crate::oci::digest::Digest;

/// Errors parsing a reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference {0:?} is empty or has an empty part")]
    Empty(String),
    #[error("image reference {reference:?}: {why}")]
    Invalid {
        reference: String,
        why: &'static str,
    },
}

/// Where an image lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Registry {
        /// Host (and port) as written; `docker.io` for Docker Hub.
        registry: String,
        repository: String,
        tag: Option<String>,
        digest: Option<Digest>,
    },
    Layout {
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` of the image in the layout.
        tag: Option<String>,
    },
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let invalid = |why| ReferenceError::Invalid {
            reference: s.chars().take(200).collect(),
            why,
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            // oci:PATH[:TAG]; a tag has no '/'.
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t.to_string())),
                _ => (rest, None),
            };
            if path.is_empty() || tag.as_deref() == Some("") {
                return Err(ReferenceError::Empty(s.into()));
            }
            return Ok(Self::Layout {
                path: PathBuf::from(path),
                tag,
            });
        }
        let rest = s.strip_prefix("docker://").unwrap_or(s);
        if rest.is_empty() || rest.len() > 4096 {
            return Err(ReferenceError::Empty(s.into()));
        }
        let (name, digest) = match rest.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    d.parse::<Digest>()
                        .map_err(|_| invalid("the digest is not sha256:<64 hex>"))?,
                ),
            ),
            None => (rest, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
        {
            return Err(invalid("the tag must be 1-128 of [A-Za-z0-9_.-]"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && !c.starts_with(['.', '_', '-'])
        };
        if !repository.split('/').all(component_ok) {
            return Err(invalid(
                "repository components must be lowercase [a-z0-9._-]",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Self::Registry {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Self::Registry { tag, .. } | Self::Layout { tag, .. } => tag.as_deref(),
        }
    }

    /// What to ask the source for: the digest if pinned, else the tag.
    pub fn manifest_reference(&self) -> Option<String> {
        match self {
            Self::Registry {
                digest: Some(d), ..
            } => Some(d.to_string()),
            Self::Registry { tag, .. } | Self::Layout { tag, .. } => tag.clone(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registry {
                registry,
                repository,
                tag,
                digest,
            } => {
                write!(f, "{registry}/{repository}")?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                if let Some(d) = digest {
                    write!(f, "@{d}")?;
                }
                Ok(())
            }
            Self::Layout { path, tag } => {
                write!(f, "oci:{}", path.display())?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> (String, String, Option<String>, Option<Digest>) {
        match ImageRef::parse(s).unwrap() {
            ImageRef::Registry {
                registry,
                repository,
                tag,
                digest,
            } => (registry, repository, tag, digest),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registry_references() {
        assert_eq!(
            reg("busybox"),
            (
                "docker.io".into(),
                "library/busybox".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(reg("localhost:5000/a/b:v1").0, "localhost:5000");
        assert_eq!(reg("localhost:5000/a/b:v1").2.as_deref(), Some("v1"));
        assert_eq!(reg("127.0.0.1:5000/img").2.as_deref(), Some("latest"));
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let (_, _, tag, digest) = reg(&format!("docker://registry.example/x@{d}"));
        assert_eq!(
            (tag, digest.map(|d| d.to_string())),
            (None, Some(d.to_string()))
        );
        assert_eq!(
            ImageRef::parse("localhost:5000/a:t").unwrap().to_string(),
            "localhost:5000/a:t"
        );
    }

    #[test]
    fn layout_references() {
        assert_eq!(
            ImageRef::parse("oci:/var/images/x:v2").unwrap(),
            ImageRef::Layout {
                path: "/var/images/x".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:./dir").unwrap(),
            ImageRef::Layout {
                path: "./dir".into(),
                tag: None
            }
        );
    }

    #[test]
    fn bad_references() {
        for bad in [
            "",
            "oci:",
            "UPPER/case",
            "a//b",
            "x:",
            "x:bad tag",
            "x@sha256:abc",
            "localhost:5000/../x",
            "oci:dir:",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
