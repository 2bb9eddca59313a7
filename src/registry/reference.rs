//! Image references: `[registry[:port]/]repository[:tag][@digest]`, with Docker Hub
//! normalisation (`docker.io`, `library/`), IPv6 literals and localhost.

use std::fmt;

use crate::digest::Digest;

use super::RegistryError;

/// The canonical name of Docker Hub in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The API endpoint host of Docker Hub.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// A parsed image reference. `registry` is normalised (`docker.io` for Docker Hub) and a bare
/// name gets the tag `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port: `docker.io`, `127.0.0.1:5000`, `[::1]:5000`.
    pub registry: String,
    /// Repository path: `library/busybox`, `team/app`.
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest (`sha256:<hex>`), if any.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `s`; errors say what part is malformed.
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        let invalid = |why: &str| RegistryError::Invalid(format!("image reference {s:?}: {why}"));
        if s.is_empty() || s.len() > 4096 {
            return Err(invalid("must be 1 to 4096 characters"));
        }
        let (name_and_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let parsed_digest = digest
            .map(Digest::parse)
            .transpose()
            .map_err(|e| invalid(&e.to_string()))?;
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_and_tag.rfind('/');
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                let candidate = &name_and_tag[colon + 1..];
                // "host:5000" with no '/' is not a tag case for a name without repo; but a
                // reference always has a repository, so a colon after the last slash is a tag,
                // unless the whole thing is an IPv6 literal ("[::1]") which needs a '/' anyway.
                (&name_and_tag[..colon], Some(candidate))
            }
            _ => (name_and_tag, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(|why| invalid(&why))?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.')
                    || first.contains(':')
                    || first.starts_with('[')
                    || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        validate_registry(&registry).map_err(|why| invalid(&why))?;
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(|why| invalid(&why))?;
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest: parsed_digest,
        })
    }

    /// The same repository at `digest` (the tag is dropped).
    pub fn with_digest(&self, digest: &Digest) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.clone()),
        }
    }

    /// The same repository at `tag` (the digest is dropped).
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        }
    }

    /// What to put after `/manifests/`: the digest if any, else the tag, else `latest`.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host:port the registry API is reached at (`registry-1.docker.io` for Docker Hub).
    pub fn endpoint_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// True for registries on loopback (`localhost`, `127.0.0.1`, `[::1]`), which use plain HTTP.
    pub fn is_localhost(&self) -> bool {
        is_localhost_host(&self.registry)
    }
}

/// True for `localhost`, `127.x.x.x` and `[::1]`, with or without a port.
pub fn is_localhost_host(host: &str) -> bool {
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    without_port == "localhost"
        || without_port == "::1"
        || without_port
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn validate_tag(t: &str) -> Result<(), String> {
    let mut bytes = t.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok
        || t.len() > 128
        || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return Err(format!(
            "tag {t:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        ));
    }
    Ok(())
}

fn validate_registry(host: &str) -> Result<(), String> {
    let bad = || format!("registry host {host:?} is malformed");
    let port = if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        addr.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        }
    } else {
        let (name, port) = match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err(bad());
        }
        port
    };
    if let Some(p) = port {
        p.parse::<u16>()
            .map_err(|_| format!("registry port {p:?} is not a number 0-65535"))?;
    }
    Ok(())
}

fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() || repo.len() > 255 {
        return Err("repository must be 1 to 255 characters".into());
    }
    for component in repo.split('/') {
        let ok = !component.is_empty()
            && component
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && component
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && component
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            return Err(format!(
                "repository component {component:?} must be lowercase letters and digits separated by '.', '_' or '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn docker_hub_normalisation() {
        let r = p("busybox");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.endpoint_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(p("docker.io/busybox:1.36").repository, "library/busybox");
        assert_eq!(p("index.docker.io/user/app").registry, "docker.io");
        assert_eq!(p("user/app:v1").repository, "user/app");
    }

    #[test]
    fn hosts_ports_ipv6_localhost() {
        let r = p("127.0.0.1:5000/team/app:v2");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert!(r.is_localhost());
        let r = p(&format!("[::1]:5000/app@{D}"));
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.tag, None);
        assert!(r.is_localhost());
        let r = p("localhost/app");
        assert_eq!(r.registry, "localhost");
        assert!(r.is_localhost());
        let r = p("localhost:5000/app:t");
        assert_eq!(r.registry, "localhost:5000");
        assert!(!p("ghcr.io/o/app").is_localhost());
        let r = p(&format!("ghcr.io/o/app:tag@{D}"));
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.to_string(), format!("ghcr.io/o/app:tag@{D}"));
    }

    #[test]
    fn with_digest_and_tag() {
        let r = p("example.com/a/b:t");
        let d = Digest::parse(D).unwrap();
        assert_eq!(
            r.with_digest(&d).to_string(),
            format!("example.com/a/b@{D}")
        );
        assert_eq!(r.with_tag("x").object(), "x");
        assert_eq!(r.with_digest(&d).object(), D);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "UPPER/case",
            "example.com/app:",
            "example.com/app@sha256:xyz",
            "example.com:port/app",
            "[::zz]:5000/app",
            "example.com//app",
            "app:-bad",
        ] {
            assert!(
                matches!(Reference::parse(bad), Err(RegistryError::Invalid(_))),
                "{bad:?} should be rejected"
            );
        }
    }
}
