//! Manifests, indexes and image configs (image-spec v1.1 `manifest.md`,
//! `image-index.md`, `config.md`; Docker's image manifest v2 schema 2), and the
//! choice of the host's platform from a multi-arch index.

use std::collections::BTreeMap;

use crate::reference::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// Errors reading a manifest, index or config.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} is not valid JSON of the expected shape")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported manifest type {0:?} (Docker schema 1 and unknown types cannot be read; re-push the image with a current tool)")]
    UnsupportedType(String),
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    #[error("no image for {wanted} in the index (available: {available})")]
    NoMatchingPlatform { wanted: String, available: String },
    #[error("image config lists {diff_ids} diff_ids but the manifest has {layers} layers")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
    #[error("image is for {image}, this host runs {host}")]
    WrongPlatform { image: String, host: String },
    #[error("manifest has {0} layers, more than the {MAX_LAYERS} accepted")]
    TooManyLayers(usize),
}

/// Docker refuses more than 127 layers; leave room, but bound the work.
pub const MAX_LAYERS: usize = 1024;

/// A content descriptor (image-spec `descriptor.md`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image's platform.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform images must have to run here: linux (the guest) on the
    /// host's CPU architecture, in Go's `GOARCH` names.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            other => (other, None),
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            variant: variant.map(str::to_string),
        }
    }

    fn matches(&self, other: &Platform) -> bool {
        // arm64 images usually omit the variant; v8 is the only one.
        let variant_ok = match (&self.variant, &other.variant) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.os == other.os && self.architecture == other.architecture && variant_ok
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// A parsed manifest document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// An OCI index or Docker manifest list.
    Index(Vec<Descriptor>),
    /// One image.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Parses a manifest or index. The type comes from the document's
    /// `mediaType`, else the transport's Content-Type, else its shape
    /// (`manifests` vs `layers`), as image-spec allows `mediaType` to be absent.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                what: "manifest",
                source,
            })?;
        let declared = raw
            .media_type
            .clone()
            .or_else(|| content_type.map(str::to_string))
            .filter(|t| !t.is_empty() && t != "application/json" && t != "text/plain");
        let kind = match declared.as_deref() {
            Some(OCI_INDEX | DOCKER_LIST) => "index",
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => "image",
            Some(t) if t.starts_with(DOCKER_SCHEMA1) => {
                return Err(ManifestError::UnsupportedType(t.to_string()))
            }
            Some(t) => return Err(ManifestError::UnsupportedType(t.to_string())),
            None if raw.manifests.is_some() => "index",
            None => "image",
        };
        if kind == "index" {
            let manifests = raw.manifests.unwrap_or_default();
            return Ok(Manifest::Index(manifests));
        }
        let config = raw
            .config
            .ok_or_else(|| ManifestError::UnsupportedType("manifest without config".into()))?;
        let layers = raw.layers.unwrap_or_default();
        if layers.len() > MAX_LAYERS {
            return Err(ManifestError::TooManyLayers(layers.len()));
        }
        Ok(Manifest::Image { config, layers })
    }
}

/// The index entry for `platform`: the first image manifest that matches
/// (entries without a platform, such as attestations, are skipped).
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor, ManifestError> {
    entries
        .iter()
        .filter(|d| {
            matches!(
                d.media_type.as_str(),
                OCI_MANIFEST | DOCKER_MANIFEST | OCI_INDEX | DOCKER_LIST | ""
            )
        })
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .ok_or_else(|| ManifestError::NoMatchingPlatform {
            wanted: platform.to_string(),
            available: entries
                .iter()
                .filter_map(|d| d.platform.as_ref().map(Platform::to_string))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type (image-spec `layer.md`, Docker's rootfs diff
    /// types, foreign and non-distributable variants).
    pub fn from_media_type(t: &str) -> Result<Compression, ManifestError> {
        match t {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Ok(Compression::Zstd)
            }
            other => Err(ManifestError::UnsupportedLayer(other.to_string())),
        }
    }

    /// From a blob's first bytes (for `docker save` archives, which carry no
    /// media types): gzip `1f 8b`, zstd frame `28 b5 2f fd`.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// The runtime part of an image config (image-spec `config.md`, the
/// `config` object), as `run` applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `port/proto` keys of `ExposedPorts`, sorted.
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

/// A parsed image config blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub platform: Platform,
    pub config: ImageConfig,
    pub diff_ids: Vec<Digest>,
}

#[derive(serde::Deserialize)]
struct RawConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    variant: Option<String>,
    config: Option<RawConfig>,
    rootfs: RawRootFs,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
}

#[derive(serde::Deserialize)]
struct RawRootFs {
    diff_ids: Vec<Digest>,
}

impl ConfigFile {
    /// Parses an image config blob.
    pub fn parse(bytes: &[u8]) -> Result<ConfigFile, ManifestError> {
        let raw: RawConfigFile =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
                what: "image config",
                source,
            })?;
        let c = raw.config.unwrap_or(RawConfig {
            entrypoint: None,
            cmd: None,
            env: None,
            working_dir: None,
            user: None,
            exposed_ports: None,
            labels: None,
            stop_signal: None,
        });
        Ok(ConfigFile {
            platform: Platform {
                architecture: raw.architecture,
                os: raw.os,
                variant: raw.variant,
            },
            config: ImageConfig {
                entrypoint: c.entrypoint,
                cmd: c.cmd,
                env: c.env.unwrap_or_default(),
                working_dir: c.working_dir.filter(|w| !w.is_empty()),
                user: c.user.filter(|u| !u.is_empty()),
                exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
                labels: c.labels.unwrap_or_default(),
                stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
            },
            diff_ids: raw.rootfs.diff_ids,
        })
    }

    /// Refuses an image built for another OS or CPU.
    pub fn check_platform(&self, host: &Platform) -> Result<(), ManifestError> {
        if host.matches(&self.platform) {
            Ok(())
        } else {
            Err(ManifestError::WrongPlatform {
                image: self.platform.to_string(),
                host: host.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        )
    }

    #[test]
    fn select_platform_picks_matching_entry() {
        let Manifest::Index(entries) = Manifest::parse(index_json().as_bytes(), None).unwrap()
        else {
            panic!("not an index")
        };
        let amd = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(
            select_platform(&entries, &amd).unwrap().digest.to_string(),
            D2
        );
        let arm = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(
            select_platform(&entries, &arm).unwrap().digest.to_string(),
            D1
        );
        let riscv = Platform {
            architecture: "riscv64".into(),
            os: "linux".into(),
            variant: None,
        };
        let err = select_platform(&entries, &riscv).unwrap_err().to_string();
        assert!(
            err.contains("linux/arm64/v8") && err.contains("linux/amd64"),
            "{err}"
        );
    }

    #[test]
    fn parse_shape_decides_when_media_type_absent() {
        let m = format!(r#"{{"config":{{"digest":"{D1}","size":3}},"layers":[]}}"#);
        assert!(matches!(
            Manifest::parse(m.as_bytes(), None),
            Ok(Manifest::Image { .. })
        ));
        let i = r#"{"manifests":[]}"#;
        assert!(matches!(
            Manifest::parse(i.as_bytes(), Some("application/json")),
            Ok(Manifest::Index(_))
        ));
    }

    #[test]
    fn parse_schema1_and_garbage_are_refused() {
        let s1 = r#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#;
        assert!(matches!(
            Manifest::parse(s1.as_bytes(), None),
            Err(ManifestError::UnsupportedType(_))
        ));
        assert!(Manifest::parse(b"\xff\x00", None).is_err());
        let bad_digest = r#"{"config":{"digest":"sha256:xyz","size":3},"layers":[]}"#;
        assert!(Manifest::parse(bad_digest.as_bytes(), None).is_err());
        let neg = format!(r#"{{"config":{{"digest":"{D1}","size":-1}},"layers":[]}}"#);
        assert!(Manifest::parse(neg.as_bytes(), None).is_err());
    }

    #[test]
    fn compression_media_types_and_sniff() {
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
                .unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert!(Compression::from_media_type("text/html").is_err());
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"bin/"), Compression::None);
    }

    #[test]
    fn config_parse_fields_and_nulls() {
        let c = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":null,"Cmd":["sh"],
            "Env":["PATH=/bin"],"WorkingDir":"/w","User":"1:2","ExposedPorts":{{"80/tcp":{{}}}},
            "Labels":{{"a":"b"}}}},"rootfs":{{"type":"layers","diff_ids":["{D1}"]}}}}"#
        );
        let f = ConfigFile::parse(c.as_bytes()).unwrap();
        assert_eq!(f.config.entrypoint, None);
        assert_eq!(f.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(f.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(f.config.exposed_ports, vec!["80/tcp".to_string()]);
        assert_eq!(f.diff_ids.len(), 1);
        f.check_platform(&Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        })
        .unwrap();
        assert!(f
            .check_platform(&Platform {
                architecture: "arm64".into(),
                os: "linux".into(),
                variant: None
            })
            .is_err());
    }
}
