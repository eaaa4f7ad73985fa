//! A small blocking client for the OCI distribution API (distribution-spec
//! v1.1 `spec.md`): manifest and blob GETs, the anonymous bearer-token flow
//! (Docker's `token.md`), basic credentials from the Docker config file,
//! bounded timeouts and a size cap on manifests.
//!
//! Why not `oci-client`: it is async (tokio + reqwest, ~140 crates for a sync
//! CLI) and reads manifest and error bodies whole with no size limit, so a
//! hostile registry could exhaust memory. `ureq` 2 gives per-read socket
//! timeouts (a registry that stops sending fails instead of hanging), plain
//! http where allowed, redirects that drop the Authorization header, and a
//! body reader we stream straight into the verifying store.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use crate::reference::{Digest, RegistryReference, DEFAULT_REGISTRY};
use crate::store::{Store, StoreError};

/// Docker Hub's references say `docker.io`; its API is served elsewhere.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Accept every manifest kind we can read (image-spec `media-types.md`).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";
/// Token replies and error bodies are small; never read more.
const MAX_SMALL_BODY: u64 = 1 << 20;
const USER_AGENT: &str = concat!("supermachine/", env!("CARGO_PKG_VERSION"));

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// `--tls-verify=false` turns this off: https without certificate
    /// checks (a TLS failure is still an error: never a silent downgrade to
    /// plain http). Loopback registries always use plain http, as docker does.
    pub tls_verify: bool,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for each socket read or write: a registry that stops answering
    /// fails after this long.
    pub io_timeout: Duration,
    /// Largest manifest or index accepted.
    pub max_manifest_bytes: u64,
    /// Every blob may take this long, plus its size at `min_blob_rate`; a
    /// registry that drips bytes just fast enough to beat `io_timeout` fails then.
    pub blob_deadline_floor: Duration,
    /// The slowest transfer rate (bytes per second) a blob is allowed.
    pub min_blob_rate: u64,
    /// Docker config file for credentials; `None` reads
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            tls_verify: true,
            connect_timeout: Duration::from_secs(15),
            io_timeout: Duration::from_secs(30),
            max_manifest_bytes: 4 << 20,
            blob_deadline_floor: Duration::from_secs(60),
            min_blob_rate: 64 << 10,
            docker_config: None,
        }
    }
}

/// Errors talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{url}")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("image {reference} not found in registry {registry} (manifest unknown: check the name and tag)")]
    ManifestNotFound { registry: String, reference: String },
    #[error("blob {digest} not found in registry {registry}")]
    BlobNotFound { registry: String, digest: Digest },
    #[error("registry {registry} refused access to {repository}: authentication required or denied (log in with `docker login {registry}`, or check the name)")]
    Unauthorized {
        registry: String,
        repository: String,
    },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: reading the reply")]
    Body {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {reference} is larger than {limit} bytes")]
    ManifestTooLarge { reference: String, limit: u64 },
    #[error("manifest {reference}: digest mismatch: expected {expected}, got {actual}")]
    ManifestDigest {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("token endpoint {realm}: {why}")]
    Token { realm: String, why: String },
    #[error("docker config {path}: {why}")]
    DockerConfig { path: PathBuf, why: String },
    #[error("setting up TLS")]
    Tls(#[source] tls::SetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A manifest as fetched: the bytes whose digest was checked, and the
/// Content-Type the registry gave.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: Option<String>,
    pub digest: Digest,
}

/// A client bound to one repository on one registry.
#[derive(Debug)]
pub struct RegistryClient {
    agent: ureq::Agent,
    reference: RegistryReference,
    scheme: &'static str,
    api_host: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
    max_manifest_bytes: u64,
    blob_deadline_floor: Duration,
    min_blob_rate: u64,
}

#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl RegistryClient {
    /// A client for `reference`'s repository.
    pub fn new(
        reference: &RegistryReference,
        opts: &RegistryOptions,
    ) -> Result<RegistryClient, RegistryError> {
        let builder = ureq::AgentBuilder::new()
            .timeout_connect(opts.connect_timeout)
            .timeout_read(opts.io_timeout)
            .timeout_write(opts.io_timeout)
            // Blob GETs commonly redirect to storage; ureq drops the
            // Authorization header when following them.
            .redirects(5)
            .user_agent(USER_AGENT);
        let loopback = reference.is_loopback();
        // Loopback registries speak plain http, so their TLS settings never
        // matter; keep the verifying default there.
        let builder =
            tls::configure(builder, opts.tls_verify || loopback).map_err(RegistryError::Tls)?;
        let api_host = if reference.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_API_HOST.to_string()
        } else {
            reference.registry.clone()
        };
        let config_path = match &opts.docker_config {
            Some(p) => Some(p.clone()),
            None => default_docker_config(),
        };
        let credentials = match config_path {
            Some(path) => credentials_from_file(&path, &reference.registry)?,
            None => None,
        };
        Ok(RegistryClient {
            agent: builder.build(),
            reference: reference.clone(),
            scheme: if loopback { "http" } else { "https" },
            api_host,
            credentials,
            authorization: None,
            max_manifest_bytes: opts.max_manifest_bytes,
            blob_deadline_floor: opts.blob_deadline_floor,
            min_blob_rate: opts.min_blob_rate.max(1),
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}://{}/v2/{}/{}",
            self.scheme, self.api_host, self.reference.repository, path
        )
    }

    /// GETs a manifest by tag or digest, verifying its digest when pinned
    /// and against `Docker-Content-Digest` when the registry sends one.
    pub fn get_manifest(&mut self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let path = format!("manifests/{reference}");
        let resp = match self.get(&path, Some(MANIFEST_ACCEPT)) {
            Err(RegistryError::Status { status: 404, .. }) => {
                return Err(RegistryError::ManifestNotFound {
                    registry: self.reference.registry.clone(),
                    reference: format!("{}:{reference}", self.reference.repository),
                })
            }
            other => other?,
        };
        let url = resp.get_url().to_string();
        let media_type = resp
            .header("Content-Type")
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let header_digest = resp
            .header("Docker-Content-Digest")
            .and_then(|d| Digest::parse(d).ok());
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(self.max_manifest_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| RegistryError::Body { url, source })?;
        if bytes.len() as u64 > self.max_manifest_bytes {
            return Err(RegistryError::ManifestTooLarge {
                reference: reference.to_string(),
                limit: self.max_manifest_bytes,
            });
        }
        let digest = Digest::of(&bytes);
        let expected = Digest::parse(reference).ok().or(header_digest);
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::ManifestDigest {
                    reference: reference.to_string(),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Streams blob `digest` into `store`, verified; returns its path there.
    pub fn fetch_blob(
        &mut self,
        digest: &Digest,
        size: Option<u64>,
        store: &Store,
    ) -> Result<PathBuf, RegistryError> {
        if store.has_blob(digest) {
            return Ok(store.blob_path(digest));
        }
        let resp = match self.get(&format!("blobs/{digest}"), None) {
            Err(RegistryError::Status { status: 404, .. }) => {
                return Err(RegistryError::BlobNotFound {
                    registry: self.reference.registry.clone(),
                    digest: digest.clone(),
                })
            }
            other => other?,
        };
        // The size the manifest declared, else what the reply says it sends.
        let expected = size.or_else(|| resp.header("Content-Length").and_then(|v| v.parse().ok()));
        let allowed = self.blob_deadline_floor
            + Duration::from_secs(expected.unwrap_or(0) / self.min_blob_rate);
        let mut reader = DeadlineReader {
            inner: resp.into_reader(),
            started: std::time::Instant::now(),
            allowed,
            read: 0,
        };
        Ok(store.write_blob(digest, size, &mut reader)?)
    }

    /// One GET with authentication: on 401 follow the challenge once.
    fn get(&mut self, path: &str, accept: Option<&str>) -> Result<ureq::Response, RegistryError> {
        let mut challenged = false;
        loop {
            let url = self.url(path);
            let mut req = self.agent.get(&url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if let Some(auth) = &self.authorization {
                req = req.set("Authorization", auth);
            }
            match req.call() {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if !challenged => {
                    challenged = true;
                    let challenge = resp.header("WWW-Authenticate").unwrap_or("").to_string();
                    self.authorization = Some(self.answer_challenge(&challenge)?);
                }
                Err(ureq::Error::Status(401 | 403, _)) => {
                    return Err(RegistryError::Unauthorized {
                        registry: self.reference.registry.clone(),
                        repository: self.reference.repository.clone(),
                    })
                }
                Err(ureq::Error::Status(status, resp)) => {
                    return Err(RegistryError::Status {
                        url,
                        status,
                        body: small_body(resp),
                    })
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(RegistryError::Transport {
                        url,
                        source: Box::new(t),
                    });
                }
            }
        }
    }

    /// The Authorization header value that answers a 401 challenge
    /// (RFC 6750 §3 Bearer; RFC 7617 Basic).
    fn answer_challenge(&self, challenge: &str) -> Result<String, RegistryError> {
        let unauthorized = || RegistryError::Unauthorized {
            registry: self.reference.registry.clone(),
            repository: self.reference.repository.clone(),
        };
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" => {
                let realm = params
                    .iter()
                    .find(|(k, _)| k == "realm")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(unauthorized)?;
                let service = params.iter().find(|(k, _)| k == "service").map(|(_, v)| v);
                let scope = params
                    .iter()
                    .find(|(k, _)| k == "scope")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                let token = self.fetch_token(&realm, service.map(String::as_str), &scope)?;
                Ok(format!("Bearer {token}"))
            }
            "basic" => match &self.credentials {
                Some(c) => Ok(basic_header(c)),
                None => Err(unauthorized()),
            },
            _ => Err(unauthorized()),
        }
    }

    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let token_err = |why: String| RegistryError::Token {
            realm: realm.to_string(),
            why,
        };
        let plain = realm.starts_with("http://");
        if !plain && !realm.starts_with("https://") {
            return Err(token_err("realm is not an http(s) URL".into()));
        }
        let mut req = self.agent.get(realm).query("scope", scope);
        if let Some(s) = service {
            req = req.query("service", s);
        }
        // Credentials never travel in clear text unless the registry itself
        // is one we speak plain http to.
        if let Some(c) = &self.credentials {
            if !plain || self.scheme == "http" {
                req = req.set("Authorization", &basic_header(c));
            }
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(401 | 403, _)) => {
                return Err(RegistryError::Unauthorized {
                    registry: self.reference.registry.clone(),
                    repository: self.reference.repository.clone(),
                })
            }
            Err(ureq::Error::Status(status, resp)) => {
                return Err(token_err(format!("HTTP {status}: {}", small_body(resp))))
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(RegistryError::Transport {
                    url: realm.to_string(),
                    source: Box::new(t),
                })
            }
        };
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_SMALL_BODY)
            .read_to_end(&mut bytes)
            .map_err(|source| RegistryError::Body {
                url: realm.to_string(),
                source,
            })?;
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
        }
        let reply: TokenReply = serde_json::from_slice(&bytes)
            .map_err(|e| token_err(format!("malformed reply: {e}")))?;
        let token = reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_err("reply has no token".into()))?;
        // A header value must be visible ASCII.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(token_err("token has invalid characters".into()));
        }
        Ok(token)
    }
}

fn small_body(resp: ureq::Response) -> String {
    let mut bytes = Vec::new();
    let _ = resp.into_reader().take(512).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes)
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Splits `Bearer realm="x",service="y"` into the scheme and its parameters
/// (RFC 7235 §2.1; values quoted or bare tokens).
fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    (scheme.to_string(), params)
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// Normalises an `auths` key (`https://host/v1/`, `host:port`) to a registry
/// name as references spell it.
fn auth_key_registry(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | DOCKER_HUB_API_HOST => DEFAULT_REGISTRY.to_string(),
        h => h.to_string(),
    }
}

/// Basic credentials for `registry` from a Docker config file's `auths`
/// (base64 `user:password` in `auth`, or `username` + `password`). A missing
/// file means no credentials; credential helpers are not run.
fn credentials_from_file(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let bad = |why: String| RegistryError::DockerConfig {
        path: path.to_path_buf(),
        why,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_SMALL_BODY)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(entry) = config
        .auths
        .iter()
        .find(|(k, _)| auth_key_registry(k) == registry)
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("auth for {registry} is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| bad(format!("auth for {registry} is not UTF-8")))?;
        let (username, password) = text
            .split_once(':')
            .ok_or_else(|| bad(format!("auth for {registry} is not user:password")))?;
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// A blob body that must arrive within `allowed` of `started`: a registry
/// sending one byte just often enough to beat the per-read timeout would
/// otherwise hold a pull forever.
struct DeadlineReader<R> {
    inner: R,
    started: std::time::Instant,
    allowed: Duration,
    read: u64,
}

impl<R: Read> Read for DeadlineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let elapsed = self.started.elapsed();
        if elapsed > self.allowed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the registry sent {} bytes in {:.0?}, past the {:.0?} this blob is allowed; giving up",
                    self.read, elapsed, self.allowed
                ),
            ));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The TLS backend, chosen per target so the rest of this file is free of
/// cfg. Linux uses rustls with ring; macOS uses Security.framework through
/// native-tls, because ring's build script compiles C and the Apple target
/// cannot be cross-checked from Linux without an Apple C toolchain.
#[cfg(not(target_os = "macos"))]
mod tls {
    use std::sync::Arc;

    /// Why the TLS configuration could not be built.
    pub(super) type SetupError = rustls::Error;

    /// Installs the TLS settings on `builder`: ureq's default (rustls with
    /// the system roots) when `verify`, else no certificate checks, for
    /// `--tls-verify=false` only.
    pub(super) fn configure(
        builder: ureq::AgentBuilder,
        verify: bool,
    ) -> Result<ureq::AgentBuilder, SetupError> {
        if verify {
            return Ok(builder);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth();
        Ok(builder.tls_config(Arc::new(config)))
    }

    #[derive(Debug)]
    struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _end_entity: &rustls::pki_types::CertificateDer<'_>,
            _intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _server_name: &rustls::pki_types::ServerName<'_>,
            _ocsp: &[u8],
            _now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

/// See the other `tls` module: this is the macOS one.
#[cfg(target_os = "macos")]
mod tls {
    use std::sync::Arc;

    /// Why the TLS configuration could not be built.
    pub(super) type SetupError = native_tls::Error;

    /// Installs the TLS settings on `builder`. ureq never picks native-tls
    /// by itself, so the connector is set even when `verify`: the system
    /// trust store then checks certificates; without `verify`
    /// (`--tls-verify=false` only) nothing is checked.
    pub(super) fn configure(
        builder: ureq::AgentBuilder,
        verify: bool,
    ) -> Result<ureq::AgentBuilder, SetupError> {
        let connector = native_tls::TlsConnector::builder()
            // The same floor as rustls on Linux: no TLS 1.0 or 1.1.
            .min_protocol_version(Some(native_tls::Protocol::Tlsv12))
            .danger_accept_invalid_certs(!verify)
            .build()?;
        Ok(builder.tls_connector(Arc::new(connector)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_challenge_bearer_quoted_params() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[1], ("service".into(), "reg.example".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
    }

    #[test]
    fn parse_challenge_garbage_yields_no_params() {
        let (s, p) = parse_challenge("Negotiate");
        assert_eq!(s, "Negotiate");
        assert!(p.is_empty());
        let (_, p) = parse_challenge(r#"Bearer realm="unterminated"#);
        assert_eq!(p, vec![("realm".into(), "unterminated".into())]);
    }

    #[test]
    fn credentials_from_file_auth_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("me:s3:cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                "localhost:5000":{{"username":"u","password":"p"}}}}}}"#
            ),
        )
        .unwrap();
        let hub = credentials_from_file(&path, "docker.io").unwrap().unwrap();
        assert_eq!(hub.username, "me");
        assert_eq!(hub.password, "s3:cret");
        let local = credentials_from_file(&path, "localhost:5000")
            .unwrap()
            .unwrap();
        assert_eq!(local.username, "u");
        assert!(credentials_from_file(&path, "other.example")
            .unwrap()
            .is_none());
        assert!(credentials_from_file(&dir.path().join("none.json"), "x")
            .unwrap()
            .is_none());
    }

    #[test]
    fn credentials_from_file_malformed_is_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"r.example":{"auth":"!!notbase64"}}}"#).unwrap();
        let err = credentials_from_file(&path, "r.example").unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        std::fs::write(&path, "{").unwrap();
        assert!(credentials_from_file(&path, "r.example").is_err());
    }

    #[test]
    fn credentials_debug_redacts_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn client_loopback_uses_plain_http() {
        let r = RegistryReference::parse("127.0.0.1:5000/a:1").unwrap();
        let opts = RegistryOptions {
            docker_config: Some("/nonexistent/config.json".into()),
            ..RegistryOptions::default()
        };
        let c = RegistryClient::new(&r, &opts).unwrap();
        assert_eq!(
            c.url("manifests/1"),
            "http://127.0.0.1:5000/v2/a/manifests/1"
        );
        let r = RegistryReference::parse("reg.example/a:1").unwrap();
        let c = RegistryClient::new(&r, &opts).unwrap();
        assert_eq!(c.url("x"), "https://reg.example/v2/a/x");
    }

    #[test]
    fn client_tls_verify_false_builds_insecure_tls_and_stays_on_https() {
        // Builds this target's no-verification TLS setup (rustls on Linux,
        // native-tls on macOS); a setup error would fail `new`.
        let r = RegistryReference::parse("reg.example/a:1").unwrap();
        let opts = RegistryOptions {
            tls_verify: false,
            docker_config: Some("/nonexistent/config.json".into()),
            ..RegistryOptions::default()
        };
        let c = RegistryClient::new(&r, &opts).unwrap();
        assert_eq!(c.url("x"), "https://reg.example/v2/a/x");
    }
}
