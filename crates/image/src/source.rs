//! Image sources: a registry, an OCI image layout directory or a `docker save`
//! archive, each resolved to one manifest for the host platform and its blobs
//! fetched, verified, into the [`Store`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::manifest::{
    select_platform, ConfigFile, Descriptor, Manifest, ManifestError, Platform, OCI_CONFIG,
    OCI_MANIFEST,
};
pub use crate::manifest::{Compression, ImageConfig};
use crate::reference::{Digest, ImageReference, RegistryReference};
use crate::registry::{RegistryClient, RegistryError, RegistryOptions};
use crate::store::{ImageRecord, Store, StoreError};

/// Largest image config accepted.
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Nested indexes deeper than this are refused (a loop would never end).
const MAX_INDEX_DEPTH: usize = 4;
/// `manifest.json` of a docker archive, `index.json` and `oci-layout`.
const MAX_METADATA_BYTES: u64 = 4 << 20;
/// image-spec annotations.md: the tag of a manifest in an OCI layout.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors resolving or fetching an image.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{reference}")]
    Manifest {
        reference: String,
        #[source]
        source: ManifestError,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an OCI image layout: {why}")]
    NotOciLayout { path: PathBuf, why: String },
    #[error("{path} is not a docker save archive: {why}")]
    NotDockerArchive { path: PathBuf, why: String },
    #[error("{source_name}: no image named {wanted:?} (available: {available})")]
    NoSuchTag {
        source_name: String,
        wanted: String,
        available: String,
    },
    #[error("{source_name}: it holds several images; name one of: {available}")]
    Ambiguous {
        source_name: String,
        available: String,
    },
    #[error("{path}: {what} is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        path: PathBuf,
        what: String,
        size: u64,
        limit: u64,
    },
    #[error("{what} declares {size} bytes, over the {limit}-byte limit")]
    DeclaredTooLarge { what: String, size: u64, limit: u64 },
    #[error("layer {digest} is uncompressed but does not match its diff_id {diff_id}")]
    DiffIdMismatch { digest: Digest, diff_id: Digest },
    #[error("{reference}: nested indexes deeper than {MAX_INDEX_DEPTH}")]
    IndexTooDeep { reference: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SourceError + 'a {
    move |source| SourceError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One layer of an image, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// Digest of the blob as stored (compressed, if it is).
    pub digest: Digest,
    pub media_type: String,
    pub compression: Compression,
    pub size: u64,
    /// Digest of the uncompressed tar (config `rootfs.diff_ids`).
    pub diff_id: Digest,
}

/// An image resolved and fetched into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The normalised reference it was pulled by (the store record's key).
    pub reference: String,
    /// Digest of the platform image manifest.
    pub manifest_digest: Digest,
    /// Digest of the index the manifest was chosen from, if any.
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    pub platform: Platform,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

/// Options for [`pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub registry: RegistryOptions,
    /// Told about each layer as it is fetched (a CLI draws a progress bar).
    pub progress: Option<ProgressHook>,
    /// Largest layer (as the manifest declares it) accepted, before any byte
    /// of it is fetched.
    pub max_layer_bytes: u64,
    /// Largest sum of an image's declared layer sizes accepted.
    pub max_image_bytes: u64,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            registry: RegistryOptions::default(),
            progress: None,
            max_layer_bytes: 32 << 30,
            max_image_bytes: 64 << 30,
        }
    }
}

/// Receives pull progress: layer `index` of `count` (`size` bytes) is about to be
/// fetched, or (with `done`) has been fetched and verified.
pub trait PullProgress: Send + Sync {
    /// Layer `index` (0-based) of `count`, `size` bytes; `done` once it is stored.
    fn layer(&self, index: usize, count: usize, size: u64, done: bool);
}

/// A shared [`PullProgress`] (a newtype so [`PullOptions`] stays `Debug`).
#[derive(Clone)]
pub struct ProgressHook(pub std::sync::Arc<dyn PullProgress>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// A resolved manifest: what an [`ImageSource`] hands to [`pull`].
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub index_digest: Option<Digest>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// Where an image's manifest and blobs come from.
pub trait ImageSource {
    /// The image manifest for `platform` (resolving an index).
    fn resolve(&mut self, platform: &Platform) -> Result<ResolvedManifest, SourceError>;
    /// Puts blob `desc` into `store`, verified.
    fn fetch_blob(&mut self, desc: &Descriptor, store: &Store) -> Result<(), SourceError>;
}

/// Opens the source that `reference` names.
pub fn open_source(
    reference: &ImageReference,
    opts: &PullOptions,
    store: &Store,
) -> Result<Box<dyn ImageSource>, SourceError> {
    Ok(match reference {
        ImageReference::Registry(r) => Box::new(RegistrySource::new(r, &opts.registry)?),
        ImageReference::OciLayout { dir, tag } => {
            Box::new(OciLayoutSource::open(dir, tag.clone())?)
        }
        ImageReference::DockerArchive { file, name } => Box::new(DockerArchiveSource::open(
            file,
            name.clone(),
            store.clone(),
        )?),
    })
}

/// The key an image is recorded under: the reference with a local path made
/// absolute, so `oci:./x` and `oci:/abs/x` are the same image.
pub fn record_key(reference: &ImageReference) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    match reference {
        ImageReference::OciLayout { dir, tag } => ImageReference::OciLayout {
            dir: abs(dir),
            tag: tag.clone(),
        }
        .to_string(),
        ImageReference::DockerArchive { file, name } => ImageReference::DockerArchive {
            file: abs(file),
            name: name.clone(),
        }
        .to_string(),
        ImageReference::Registry(r) => r.to_string(),
    }
}

/// Resolves `reference` for the host platform, fetches its manifest, config
/// and layers into `store` (each verified), and records the image there.
pub fn pull(
    reference: &ImageReference,
    store: &Store,
    opts: &PullOptions,
) -> Result<PulledImage, SourceError> {
    let mut source = open_source(reference, opts, store)?;
    pull_with(source.as_mut(), &record_key(reference), store, opts)
}

/// [`pull`] from an already opened source, recorded under `key`.
pub fn pull_from(
    source: &mut dyn ImageSource,
    key: &str,
    store: &Store,
    opts: &PullOptions,
) -> Result<PulledImage, SourceError> {
    pull_with(source, key, store, opts)
}

fn pull_with(
    source: &mut dyn ImageSource,
    key: &str,
    store: &Store,
    opts: &PullOptions,
) -> Result<PulledImage, SourceError> {
    let progress = opts.progress.as_ref().map(|p| p.0.as_ref());
    let platform = Platform::host();
    let manifest_err = |source| SourceError::Manifest {
        reference: key.to_string(),
        source,
    };
    let resolved = source.resolve(&platform)?;
    let mut blobs = vec![resolved.digest.clone(), resolved.config.digest.clone()];
    blobs.extend(resolved.layers.iter().map(|l| l.digest.clone()));
    let _pin = store.pin(&blobs)?;
    store.write_blob(
        &resolved.digest,
        Some(resolved.bytes.len() as u64),
        &mut &resolved.bytes[..],
    )?;

    if resolved.config.size > MAX_CONFIG_BYTES {
        return Err(SourceError::TooLarge {
            path: PathBuf::from(key),
            what: format!("config {}", resolved.config.digest),
            size: resolved.config.size,
            limit: MAX_CONFIG_BYTES,
        });
    }
    source.fetch_blob(&resolved.config, store)?;
    let config_bytes = store.read_blob(&resolved.config.digest, MAX_CONFIG_BYTES)?;
    let config = ConfigFile::parse(&config_bytes).map_err(manifest_err)?;
    config.check_platform(&platform).map_err(manifest_err)?;
    if config.diff_ids.len() != resolved.layers.len() {
        return Err(manifest_err(ManifestError::LayerCountMismatch {
            diff_ids: config.diff_ids.len(),
            layers: resolved.layers.len(),
        }));
    }

    // A hostile manifest is refused before a byte of its layers is fetched.
    let mut total: u64 = 0;
    for (index, desc) in resolved.layers.iter().enumerate() {
        if desc.size > opts.max_layer_bytes {
            return Err(SourceError::DeclaredTooLarge {
                what: format!("layer {index} ({})", desc.digest),
                size: desc.size,
                limit: opts.max_layer_bytes,
            });
        }
        total = total.saturating_add(desc.size);
    }
    if total > opts.max_image_bytes {
        return Err(SourceError::DeclaredTooLarge {
            what: format!("the image's {} layers", resolved.layers.len()),
            size: total,
            limit: opts.max_image_bytes,
        });
    }
    let mut layers = Vec::with_capacity(resolved.layers.len());
    let count = resolved.layers.len();
    for (index, (desc, diff_id)) in resolved.layers.iter().zip(&config.diff_ids).enumerate() {
        let compression = Compression::from_media_type(&desc.media_type).map_err(manifest_err)?;
        if let Some(p) = progress {
            p.layer(index, count, desc.size, false);
        }
        source.fetch_blob(desc, store)?;
        if let Some(p) = progress {
            p.layer(index, count, desc.size, true);
        }
        // An uncompressed layer's digest is its diff_id (image-spec config.md).
        if compression == Compression::None && &desc.digest != diff_id {
            return Err(SourceError::DiffIdMismatch {
                digest: desc.digest.clone(),
                diff_id: diff_id.clone(),
            });
        }
        layers.push(Layer {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            compression,
            size: desc.size,
            diff_id: diff_id.clone(),
        });
    }

    let image = PulledImage {
        reference: key.to_string(),
        manifest_digest: resolved.digest.clone(),
        index_digest: resolved.index_digest.clone(),
        config_digest: resolved.config.digest.clone(),
        platform: config.platform,
        config: config.config,
        layers,
    };
    store.save_image(&ImageRecord {
        reference: image.reference.clone(),
        manifest_digest: image.manifest_digest.clone(),
        config_digest: image.config_digest.clone(),
        config: image.config.clone(),
        layers: image.layers.clone(),
        blobs,
        created_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })?;
    Ok(image)
}

/// Follows indexes down to the image manifest for `platform`.
fn resolve_manifest(
    reference: &str,
    mut bytes: Vec<u8>,
    mut media_type: Option<String>,
    mut digest: Digest,
    platform: &Platform,
    mut fetch: impl FnMut(&Descriptor) -> Result<(Vec<u8>, Option<String>), SourceError>,
) -> Result<ResolvedManifest, SourceError> {
    let mut index_digest = None;
    for _ in 0..MAX_INDEX_DEPTH {
        let manifest = Manifest::parse(&bytes, media_type.as_deref()).map_err(|source| {
            SourceError::Manifest {
                reference: reference.to_string(),
                source,
            }
        })?;
        match manifest {
            Manifest::Image { config, layers } => {
                return Ok(ResolvedManifest {
                    bytes,
                    digest,
                    index_digest,
                    config,
                    layers,
                })
            }
            Manifest::Index(entries) => {
                let child = select_platform(&entries, platform)
                    .map_err(|source| SourceError::Manifest {
                        reference: reference.to_string(),
                        source,
                    })?
                    .clone();
                index_digest.get_or_insert(digest);
                let (b, t) = fetch(&child)?;
                bytes = b;
                media_type = t.or(Some(child.media_type.clone()).filter(|m| !m.is_empty()));
                digest = child.digest;
            }
        }
    }
    Err(SourceError::IndexTooDeep {
        reference: reference.to_string(),
    })
}

/// Images pulled from an OCI distribution registry.
#[derive(Debug)]
pub struct RegistrySource {
    client: RegistryClient,
    reference: RegistryReference,
}

impl RegistrySource {
    pub fn new(
        reference: &RegistryReference,
        opts: &RegistryOptions,
    ) -> Result<RegistrySource, SourceError> {
        Ok(RegistrySource {
            client: RegistryClient::new(reference, opts)?,
            reference: reference.clone(),
        })
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&mut self, platform: &Platform) -> Result<ResolvedManifest, SourceError> {
        let top = self
            .client
            .get_manifest(&self.reference.manifest_reference())?;
        let client = &mut self.client;
        resolve_manifest(
            &self.reference.to_string(),
            top.bytes,
            top.media_type,
            top.digest,
            platform,
            |child| {
                let m = client.get_manifest(&child.digest.to_string())?;
                Ok((m.bytes, m.media_type))
            },
        )
    }

    fn fetch_blob(&mut self, desc: &Descriptor, store: &Store) -> Result<(), SourceError> {
        self.client
            .fetch_blob(&desc.digest, Some(desc.size), store)?;
        Ok(())
    }
}

/// Images in an OCI image layout directory (image-spec `image-layout.md`).
#[derive(Debug)]
pub struct OciLayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

impl OciLayoutSource {
    /// Opens `dir`, checking its `oci-layout` marker.
    pub fn open(dir: &Path, tag: Option<String>) -> Result<OciLayoutSource, SourceError> {
        let marker = dir.join("oci-layout");
        let bytes = read_capped(&marker, MAX_METADATA_BYTES).map_err(|e| match e {
            SourceError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                SourceError::NotOciLayout {
                    path: dir.to_path_buf(),
                    why: "no oci-layout file".into(),
                }
            }
            other => other,
        })?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Marker {
            image_layout_version: String,
        }
        let m: Marker = serde_json::from_slice(&bytes).map_err(|e| SourceError::NotOciLayout {
            path: dir.to_path_buf(),
            why: format!("oci-layout: {e}"),
        })?;
        if !m.image_layout_version.starts_with("1.") {
            return Err(SourceError::NotOciLayout {
                path: dir.to_path_buf(),
                why: format!("unsupported imageLayoutVersion {}", m.image_layout_version),
            });
        }
        Ok(OciLayoutSource {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// Reads a small blob of the layout, verified.
    fn read_verified(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>, SourceError> {
        let path = self.blob_path(&desc.digest);
        let bytes = read_capped(&path, limit)?;
        let actual = Digest::of(&bytes);
        if actual != desc.digest {
            return Err(StoreError::DigestMismatch {
                expected: desc.digest.clone(),
                actual,
            }
            .into());
        }
        Ok(bytes)
    }
}

impl ImageSource for OciLayoutSource {
    fn resolve(&mut self, platform: &Platform) -> Result<ResolvedManifest, SourceError> {
        let index_path = self.dir.join("index.json");
        let index_bytes = read_capped(&index_path, MAX_METADATA_BYTES)?;
        let name = format!("oci:{}", self.dir.display());
        let entries = match Manifest::parse(&index_bytes, None) {
            Ok(Manifest::Index(entries)) => entries,
            Ok(Manifest::Image { .. }) => {
                return Err(SourceError::NotOciLayout {
                    path: self.dir.clone(),
                    why: "index.json is not an index".into(),
                })
            }
            Err(source) => {
                return Err(SourceError::Manifest {
                    reference: name,
                    source,
                })
            }
        };
        let tag_of = |d: &Descriptor| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        let available = || {
            entries
                .iter()
                .filter_map(tag_of)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen = match &self.tag {
            Some(tag) => entries
                .iter()
                .find(|d| tag_of(d).as_deref() == Some(tag.as_str()))
                .ok_or_else(|| SourceError::NoSuchTag {
                    source_name: name.clone(),
                    wanted: tag.clone(),
                    available: available(),
                })?,
            None => match entries.as_slice() {
                [one] => one,
                [] => {
                    return Err(SourceError::NoSuchTag {
                        source_name: name,
                        wanted: String::new(),
                        available: String::new(),
                    })
                }
                _ => {
                    return Err(SourceError::Ambiguous {
                        source_name: name,
                        available: available(),
                    })
                }
            },
        }
        .clone();
        let bytes = self.read_verified(&chosen, MAX_METADATA_BYTES)?;
        let media_type = Some(chosen.media_type.clone()).filter(|m| !m.is_empty());
        resolve_manifest(
            &name,
            bytes,
            media_type,
            chosen.digest.clone(),
            platform,
            |child| Ok((self.read_verified(child, MAX_METADATA_BYTES)?, None)),
        )
    }

    fn fetch_blob(&mut self, desc: &Descriptor, store: &Store) -> Result<(), SourceError> {
        let path = self.blob_path(&desc.digest);
        if !store.has_blob(&desc.digest) && !path.is_file() {
            return Err(SourceError::NotOciLayout {
                path: self.dir.clone(),
                why: format!("blob {} is missing", desc.digest),
            });
        }
        store.import_file(&path, &desc.digest, Some(desc.size))?;
        Ok(())
    }
}

/// Images in a `docker save` tar: `manifest.json` lists each image's config
/// and layer paths (legacy `<id>/layer.tar` or, since Docker 25, OCI-style
/// `blobs/sha256/<hex>`). There is no registry manifest in it, so one is
/// synthesised (OCI media types) from the config and layer digests; its digest
/// is stable for the same archive content.
#[derive(Debug)]
pub struct DockerArchiveSource {
    file: PathBuf,
    name: Option<String>,
    store: Store,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl DockerArchiveSource {
    pub fn open(
        file: &Path,
        name: Option<String>,
        store: Store,
    ) -> Result<DockerArchiveSource, SourceError> {
        if !file.is_file() {
            return Err(SourceError::NotDockerArchive {
                path: file.to_path_buf(),
                why: "no such file".into(),
            });
        }
        Ok(DockerArchiveSource {
            file: file.to_path_buf(),
            name,
            store,
        })
    }

    fn not_archive(&self, why: impl Into<String>) -> SourceError {
        SourceError::NotDockerArchive {
            path: self.file.clone(),
            why: why.into(),
        }
    }

    /// Calls `f` with the entry at `wanted` (a path inside the archive).
    fn with_entry<T>(
        &self,
        wanted: &str,
        f: impl FnOnce(&mut dyn Read, u64) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        let file = File::open(&self.file).map_err(io_err("opening", &self.file))?;
        let mut archive = tar::Archive::new(file);
        let wanted = clean_tar_path(wanted);
        let entries = archive
            .entries_with_seek()
            .map_err(io_err("reading", &self.file))?;
        for entry in entries {
            let mut entry = entry.map_err(io_err("reading", &self.file))?;
            let path = entry.path_bytes();
            let path = String::from_utf8_lossy(&path).into_owned();
            if clean_tar_path(&path) == wanted && entry.header().entry_type().is_file() {
                let size = entry.size();
                return f(&mut entry, size);
            }
        }
        Err(self.not_archive(format!("no entry {wanted:?}")))
    }

    fn read_entry(&self, path: &str, limit: u64) -> Result<Vec<u8>, SourceError> {
        self.with_entry(path, |r, size| {
            if size > limit {
                return Err(SourceError::TooLarge {
                    path: self.file.clone(),
                    what: path.to_string(),
                    size,
                    limit,
                });
            }
            let mut buf = Vec::new();
            r.take(limit)
                .read_to_end(&mut buf)
                .map_err(io_err("reading", &self.file))?;
            Ok(buf)
        })
    }

    /// Stores an entry whose digest is named by its path, else computed.
    fn import_entry(&self, path: &str) -> Result<(Digest, u64, Compression), SourceError> {
        let named = digest_from_path(path);
        self.with_entry(path, |r, size| {
            let mut head = [0u8; 4];
            let n = read_full(r, &mut head).map_err(io_err("reading", &self.file))?;
            let mut chained = (&head[..n]).chain(r);
            let digest = match named {
                Some(d) => {
                    self.store.write_blob(&d, Some(size), &mut chained)?;
                    d
                }
                None => self.store.ingest(Some(size), &mut chained)?,
            };
            Ok((digest, size, Compression::sniff(&head[..n])))
        })
    }
}

impl ImageSource for DockerArchiveSource {
    fn resolve(&mut self, _platform: &Platform) -> Result<ResolvedManifest, SourceError> {
        let source_name = format!("docker-archive:{}", self.file.display());
        let bytes = self.read_entry("manifest.json", MAX_METADATA_BYTES)?;
        let images: Vec<ArchiveEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| self.not_archive(format!("manifest.json: {e}")))?;
        let tags = |e: &ArchiveEntry| e.repo_tags.clone().unwrap_or_default();
        let available = images.iter().flat_map(tags).collect::<Vec<_>>().join(", ");
        let entry = match &self.name {
            Some(name) => {
                let norm = crate::store::normalise(name);
                images
                    .iter()
                    .find(|e| {
                        tags(e)
                            .iter()
                            .any(|t| t == name || crate::store::normalise(t) == norm)
                    })
                    .ok_or_else(|| SourceError::NoSuchTag {
                        source_name: source_name.clone(),
                        wanted: name.clone(),
                        available: available.clone(),
                    })?
            }
            None => match images.as_slice() {
                [one] => one,
                [] => return Err(self.not_archive("manifest.json lists no image")),
                _ => {
                    return Err(SourceError::Ambiguous {
                        source_name,
                        available,
                    })
                }
            },
        };
        if entry.layers.len() > crate::manifest::MAX_LAYERS {
            return Err(self.not_archive("too many layers"));
        }
        let (config_digest, config_size, _) = self.import_entry(&entry.config)?;
        let mut layers = Vec::with_capacity(entry.layers.len());
        for path in &entry.layers {
            let (digest, size, compression) = self.import_entry(path)?;
            layers.push(Descriptor {
                media_type: compression.oci_media_type().to_string(),
                digest,
                size,
                platform: None,
                annotations: None,
            });
        }
        let config = Descriptor {
            media_type: OCI_CONFIG.to_string(),
            digest: config_digest,
            size: config_size,
            platform: None,
            annotations: None,
        };
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Synth<'a> {
            schema_version: u32,
            media_type: &'a str,
            config: &'a Descriptor,
            layers: &'a [Descriptor],
        }
        let bytes = serde_json::to_vec(&Synth {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config: &config,
            layers: &layers,
        })
        .map_err(|e| self.not_archive(format!("synthesising manifest: {e}")))?;
        Ok(ResolvedManifest {
            digest: Digest::of(&bytes),
            bytes,
            index_digest: None,
            config,
            layers,
        })
    }

    fn fetch_blob(&mut self, desc: &Descriptor, store: &Store) -> Result<(), SourceError> {
        // resolve() stored every blob of the archive already.
        if store.has_blob(&desc.digest) {
            Ok(())
        } else {
            Err(StoreError::Missing(desc.digest.clone()).into())
        }
    }
}

fn clean_tar_path(p: &str) -> &str {
    let mut p = p;
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    p.trim_start_matches('/')
}

/// `blobs/sha256/<hex>` (Docker 25+ archives) or a legacy `<hex>.json` config.
fn digest_from_path(path: &str) -> Option<Digest> {
    let path = clean_tar_path(path);
    if let Some(hex) = path.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(hex).ok();
    }
    path.strip_suffix(".json")
        .and_then(|hex| Digest::from_hex(hex).ok())
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, SourceError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let mut buf = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err("reading", path))?;
    if buf.len() as u64 > limit {
        return Err(SourceError::TooLarge {
            path: path.to_path_buf(),
            what: "file".into(),
            size: buf.len() as u64,
            limit,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_from_path_forms() {
        let hex = "ab".repeat(32);
        assert_eq!(
            digest_from_path(&format!("./blobs/sha256/{hex}"))
                .unwrap()
                .hex(),
            hex
        );
        assert_eq!(digest_from_path(&format!("{hex}.json")).unwrap().hex(), hex);
        assert!(digest_from_path("abc/layer.tar").is_none());
        assert!(digest_from_path("blobs/sha256/../../etc").is_none());
    }

    #[test]
    fn oci_layout_without_marker_is_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = OciLayoutSource::open(dir.path(), None).unwrap_err();
        assert!(matches!(err, SourceError::NotOciLayout { .. }), "{err}");
    }

    #[test]
    fn docker_archive_missing_file_is_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let err = DockerArchiveSource::open(&dir.path().join("none.tar"), None, store).unwrap_err();
        assert!(matches!(err, SourceError::NotDockerArchive { .. }), "{err}");
    }

    #[test]
    fn docker_archive_hostile_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let tar_path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
        let body = br#"[{"Config":"../../etc/passwd","Layers":[]}]"#;
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "manifest.json", &body[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        let mut src = DockerArchiveSource::open(&tar_path, None, store.clone()).unwrap();
        let err = src.resolve(&Platform::host()).unwrap_err();
        assert!(err.to_string().contains("no entry"), "{err}");
        assert_eq!(
            std::fs::read_dir(store.root().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }
}
