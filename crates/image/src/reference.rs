//! Image references as skopeo and podman write them.
//!
//! - `oci:DIR[:TAG]`: an OCI image layout directory (image-spec `image-layout.md`),
//!   the image chosen by its `org.opencontainers.image.ref.name` annotation.
//! - `docker-archive:FILE[:NAME]`: a `docker save` tar.
//! - `docker://REF` or anything else: a registry reference, normalised as Docker
//!   does (`alpine` is `docker.io/library/alpine:latest`), grammar from the
//!   distribution project's `reference` package.
//!
//! Like skopeo, a transport's path ends at its first `:`, so a path containing
//! `:` cannot be named this way.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;

/// The registry a reference without a domain names (Docker's default).
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The namespace of single-component names on the default registry.
const OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// distribution/reference: `NameTotalLengthMax`.
const MAX_NAME_LEN: usize = 255;
/// distribution/reference: a tag is `[\w][\w.-]{0,127}`.
const MAX_TAG_LEN: usize = 128;

/// Why a reference was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("image reference {0:?}: {1}")]
    Invalid(String, &'static str),
    #[error("digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    Digest(String),
}

/// A content digest. Only sha256 is accepted: it is what every registry and
/// tool writes, and the only algorithm the store verifies (image-spec
/// `descriptor.md#digests`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest, ReferenceError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ReferenceError::Digest(truncate(s)))?;
        Digest::from_hex(hex).map_err(|_| ReferenceError::Digest(truncate(s)))
    }

    /// A digest from its 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Digest, ReferenceError> {
        let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(Digest {
                hex: hex.to_string(),
            })
        } else {
            Err(ReferenceError::Digest(truncate(hex)))
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::from_sha256(sha2::Sha256::digest(bytes).as_slice())
    }

    pub(crate) fn from_sha256(raw: &[u8]) -> Digest {
        let mut hex = String::with_capacity(64);
        for b in raw {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        Digest { hex }
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageReference {
    /// `oci:DIR[:TAG]`.
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE[:NAME]`; `name` picks one of several images by its
    /// `RepoTags` entry.
    DockerArchive { file: PathBuf, name: Option<String> },
    /// A registry reference.
    Registry(RegistryReference),
}

impl ImageReference {
    /// Parses a reference in skopeo/podman syntax.
    pub fn parse(s: &str) -> Result<ImageReference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.contains('\0') {
            return Err(ReferenceError::Invalid(truncate(s), "contains a NUL byte"));
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split_path(s, rest)?;
            if let Some(tag) = &tag {
                // image-spec annotations.md: ref.name is free text, but a
                // control character in it is never intended.
                if tag.chars().any(char::is_control) {
                    return Err(ReferenceError::Invalid(
                        truncate(s),
                        "control character in tag",
                    ));
                }
            }
            return Ok(ImageReference::OciLayout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, name) = split_path(s, rest)?;
            return Ok(ImageReference::DockerArchive { file, name });
        }
        let rest = s.strip_prefix("docker://").unwrap_or(s);
        if let Some((transport, _)) = rest.split_once(':') {
            // `dir:`, `containers-storage:` ... are skopeo transports we do not
            // read; say so instead of treating them as a registry host.
            if KNOWN_UNSUPPORTED_TRANSPORTS.contains(&transport) {
                return Err(ReferenceError::Invalid(
                    truncate(s),
                    "unsupported transport (use oci:, docker-archive: or a registry reference)",
                ));
            }
        }
        RegistryReference::parse(rest).map(ImageReference::Registry)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageReference::OciLayout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                match tag {
                    Some(t) => write!(f, ":{t}"),
                    None => Ok(()),
                }
            }
            ImageReference::DockerArchive { file, name } => {
                write!(f, "docker-archive:{}", file.display())?;
                match name {
                    Some(n) => write!(f, ":{n}"),
                    None => Ok(()),
                }
            }
            ImageReference::Registry(r) => r.fmt(f),
        }
    }
}

const KNOWN_UNSUPPORTED_TRANSPORTS: &[&str] = &[
    "dir",
    "containers-storage",
    "docker-daemon",
    "oci-archive",
    "ostree",
    "sif",
    "tarball",
];

fn split_path(whole: &str, rest: &str) -> Result<(PathBuf, Option<String>), ReferenceError> {
    let (path, extra) = match rest.split_once(':') {
        Some((p, e)) => (p, Some(e)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(ReferenceError::Invalid(truncate(whole), "missing path"));
    }
    match extra {
        Some("") => Err(ReferenceError::Invalid(
            truncate(whole),
            "empty tag after ':'",
        )),
        Some(e) => Ok((PathBuf::from(path), Some(e.to_string()))),
        None => Ok((PathBuf::from(path), None)),
    }
}

/// A normalised registry reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryReference {
    /// Host and optional port as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path, e.g. `library/alpine`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Digest pinned with `@sha256:...`.
    pub digest: Option<Digest>,
}

impl RegistryReference {
    /// Parses and normalises a Docker-style reference.
    pub fn parse(s: &str) -> Result<RegistryReference, ReferenceError> {
        let bad = |why| ReferenceError::Invalid(truncate(s), why);
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a port.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].find(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_tag[..at], Some(&name_tag[at + 1..]))
            }
            None => (name_tag, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(bad(
                    "invalid tag (letters, digits, '_', '.', '-'; at most 128)",
                ));
            }
        }
        if name.is_empty() {
            return Err(bad("missing repository name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("name longer than 255 characters"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if is_domain(first) => (first.to_string(), rest),
            _ => (DEFAULT_REGISTRY.to_string(), name),
        };
        if registry != DEFAULT_REGISTRY {
            validate_domain(&registry).map_err(bad)?;
        }
        if path.is_empty() {
            return Err(bad("missing repository name"));
        }
        for component in path.split('/') {
            if !valid_path_component(component) {
                return Err(bad(
                    "invalid repository name (lowercase letters, digits and '.', '_', '-' separators)",
                ));
            }
        }
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("{OFFICIAL_NAMESPACE}/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(RegistryReference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned,
    /// else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The registry's host without port or IPv6 brackets.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// Whether docker speaks plain http to this registry by default: loopback
    /// only (`localhost`, 127.0.0.0/8, `::1`).
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        if host == "localhost" {
            return true;
        }
        if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
            return v4.is_loopback();
        }
        host.parse::<Ipv6Addr>().is_ok_and(|v6| v6.is_loopback())
    }
}

impl fmt::Display for RegistryReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// Docker's rule: the first component is a registry when it has a `.` or `:`,
/// is `localhost`, or has an uppercase letter (which a repository may not).
fn is_domain(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

fn validate_domain(domain: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in registry")?;
        h.parse::<Ipv6Addr>()
            .map_err(|_| "invalid IPv6 address in registry")?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(p.strip_prefix(':').ok_or("junk after ']' in registry")?),
            ),
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid registry port");
        }
        if port.parse::<u32>().map_or(true, |p| p == 0 || p > 65535) {
            return Err("registry port out of range");
        }
    }
    if domain.starts_with('[') {
        return Ok(());
    }
    // distribution/reference domainComponent: [a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("invalid registry host")
    }
}

/// distribution/reference path component:
/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

/// Keeps error messages short when the input is huge.
fn truncate(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> RegistryReference {
        match ImageReference::parse(s).unwrap() {
            ImageReference::Registry(r) => r,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parse_short_name_normalises_to_library_latest() {
        let r = reg("alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert!(!r.is_loopback());
    }

    #[test]
    fn parse_user_repo_keeps_namespace() {
        assert_eq!(reg("foo/bar:1.2").to_string(), "docker.io/foo/bar:1.2");
        assert_eq!(
            reg("docker.io/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            reg("index.docker.io/alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
        assert_eq!(
            reg("docker://alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
    }

    #[test]
    fn parse_localhost_port_is_registry_and_loopback() {
        let r = reg("localhost:5000/busybox:1");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert!(r.is_loopback());
        assert_eq!(r.manifest_reference(), "1");
    }

    #[test]
    fn parse_loopback_addresses_are_plain_http_candidates() {
        assert!(reg("127.0.0.1:5000/a").is_loopback());
        assert!(reg("127.1.2.3/a/b").is_loopback());
        assert!(reg("[::1]:5000/a").is_loopback());
        assert!(reg("localhost/a").is_loopback());
        assert!(!reg("10.0.0.1:5000/a").is_loopback());
        assert!(!reg("localhost.example:5000/a").is_loopback());
        assert!(!reg("128.0.0.1/a").is_loopback());
    }

    #[test]
    fn parse_digest_pins_without_default_tag() {
        let r = reg(&format!("quay.io/a/b@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().to_string(), D);
        assert_eq!(r.manifest_reference(), D);
        let r = reg(&format!("a:1@{D}"));
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.manifest_reference(), D);
    }

    #[test]
    fn parse_oci_layout_with_and_without_tag() {
        assert_eq!(
            ImageReference::parse("oci:/tmp/img:v1").unwrap(),
            ImageReference::OciLayout {
                dir: "/tmp/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImageReference::parse("oci:rel/dir").unwrap(),
            ImageReference::OciLayout {
                dir: "rel/dir".into(),
                tag: None
            }
        );
    }

    #[test]
    fn parse_docker_archive_with_optional_name() {
        assert_eq!(
            ImageReference::parse("docker-archive:/x/y.tar").unwrap(),
            ImageReference::DockerArchive {
                file: "/x/y.tar".into(),
                name: None
            }
        );
        assert_eq!(
            ImageReference::parse("docker-archive:y.tar:busybox:1").unwrap(),
            ImageReference::DockerArchive {
                file: "y.tar".into(),
                name: Some("busybox:1".into())
            }
        );
    }

    #[test]
    fn parse_display_round_trips() {
        for s in [
            "oci:/a/b:t",
            "docker-archive:/f.tar",
            "localhost:5000/x/y:z",
            "docker.io/library/alpine:latest",
        ] {
            assert_eq!(ImageReference::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn parse_hostile_forms_are_refused() {
        let long = "a".repeat(300);
        let long_tag = format!("a:{}", "t".repeat(129));
        let cases: Vec<String> = vec![
            "".into(),
            "oci:".into(),
            "oci::tag".into(),
            "oci:/dir:".into(),
            "docker-archive:".into(),
            "Alpine".into(),
            "alpine:".into(),
            ":tag".into(),
            "a//b".into(),
            "a/../b".into(),
            "/abs".into(),
            "a/".into(),
            "a b".into(),
            "a\0b".into(),
            "a:-x".into(),
            "a@sha256:abc".into(),
            "a@md5:0123".into(),
            format!("a@{}", D.to_uppercase()),
            "a@".into(),
            "localhost:abc/x".into(),
            "localhost:0/x".into(),
            "localhost:99999/x".into(),
            "-bad.io/x".into(),
            "bad-.io/x".into(),
            "[::1/x".into(),
            "[zz]:5/x".into(),
            "a..b".into(),
            "a___b".into(),
            "a_".into(),
            "ünïcode".into(),
            "dir:/some/where".into(),
            "containers-storage:x".into(),
            long,
            long_tag,
        ];
        for c in &cases {
            assert!(ImageReference::parse(c).is_err(), "{c:?} was accepted");
        }
    }

    #[test]
    fn parse_separator_forms_are_accepted() {
        for c in ["a.b", "a_b", "a__b", "a---b", "a-b/c.d_e", "0/1", "x/y/z/w"] {
            assert!(ImageReference::parse(c).is_ok(), "{c:?} refused");
        }
    }

    #[test]
    fn digest_parse_and_of_agree() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(Digest::from_hex("E3B0").is_err());
    }
}
