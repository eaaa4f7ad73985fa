//! The content-addressed blob store and the image records that name its blobs.
//!
//! Layout under the root (the product puts it at `guest_assets::cache::CacheLayout::store`):
//! - `blobs/sha256/<hex>`: a blob whose SHA-256 was verified while it was
//!   written. Blobs are written to `tmp/` and renamed into place only after the
//!   digest (and size, when known) matched, so a file under `blobs/` is always
//!   complete; an interrupted download leaves only a temp file, removed on a
//!   later open once it is stale.
//! - `images/<sha256 of the reference>.json`: an [`ImageRecord`].
//! - `pins/`: the blobs a pull in progress is about to reference, so a
//!   concurrent garbage collection keeps them.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::Digest as _;

use crate::reference::{Digest, ImageReference};
use crate::source::{ImageConfig, Layer};

/// A temp file untouched this long belongs to a dead writer (an active one
/// writes at least every registry read timeout).
const STALE_TEMP_AGE: Duration = Duration::from_secs(10 * 60);
/// A pin older than this belongs to a dead pull.
const STALE_PIN_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Image records are small JSON; refuse anything absurd.
const MAX_RECORD_BYTES: u64 = 16 << 20;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading blob {digest}")]
    Read {
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("blob digest mismatch: expected {expected}, got {actual} (the source is corrupt or was tampered with)")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} is truncated: expected {expected} bytes, got {actual}")]
    Truncated {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} is larger than its declared size of {expected} bytes")]
    Oversized { digest: Digest, expected: u64 },
    #[error("blob {digest} is {size} bytes, more than the {limit}-byte limit for it")]
    TooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error("blob {0} is not in the store")]
    Missing(Digest),
    #[error("image record {path} is corrupt")]
    CorruptRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no image {0:?} in the store")]
    NoSuchImage(String),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What the store keeps about a pulled image: enough for `images`, `rmi`,
/// the rootfs builder and `run` without reading the manifest again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// The normalised reference the image was pulled by (its key).
    pub reference: String,
    /// Digest of the image manifest (the platform's, not the index).
    pub manifest_digest: Digest,
    /// Digest of the image config blob.
    pub config_digest: Digest,
    /// The image config's `config` section.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// Every blob this image needs kept (index, manifest, config, layers).
    pub blobs: Vec<Digest>,
    /// When it was stored, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// A content-addressed blob store. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// What a garbage collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, and removes temp files
    /// that interrupted writers left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let store = Store { root: root.into() };
        for dir in [
            store.blob_dir(),
            store.tmp_dir(),
            store.images_dir(),
            store.pins_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        store.remove_stale(&store.tmp_dir(), STALE_TEMP_AGE);
        store.remove_stale(&store.pins_dir(), STALE_PIN_AGE);
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    fn pins_dir(&self) -> PathBuf {
        self.root.join("pins")
    }

    /// Where the blob `digest` lives (whether or not it is present).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(digest.hex())
    }

    /// Whether the blob is present. Presence means verified: blobs are only
    /// renamed into place after their digest matched.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a stored blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Missing(digest.clone()),
            _ => StoreError::Io {
                action: "opening",
                path,
                source: e,
            },
        })
    }

    /// Reads a stored blob of at most `limit` bytes into memory (manifests,
    /// configs).
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let file = self.open_blob(digest)?;
        let mut buf = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(io_err("reading", &self.blob_path(digest)))?;
        if buf.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                digest: digest.clone(),
                size: buf.len() as u64,
                limit,
            });
        }
        Ok(buf)
    }

    /// Stores `bytes` under their own digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        self.write_blob(&digest, Some(bytes.len() as u64), &mut &bytes[..])?;
        Ok(digest)
    }

    /// Streams `reader` into the store as blob `expected`, verifying its
    /// SHA-256 (and its size when `size` is given) as it goes. The blob appears
    /// under `blobs/` only if everything matched; on any error nothing is
    /// left behind. A blob already present is not read again.
    pub fn write_blob(
        &self,
        expected: &Digest,
        size: Option<u64>,
        reader: &mut dyn Read,
    ) -> Result<PathBuf, StoreError> {
        let final_path = self.blob_path(expected);
        if final_path.is_file() {
            return Ok(final_path);
        }
        let (tmp, actual) = self.write_temp(expected.hex(), Some(expected), size, reader)?;
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        // Durable before visible: a crash after the rename must not leave a
        // complete-looking blob with missing data.
        tmp.file.sync_all().map_err(io_err("syncing", &tmp.path))?;
        tmp.persist(&final_path)?;
        Ok(final_path)
    }

    /// Streams `reader` into the store under the digest computed from it, for
    /// sources that name no digest (legacy `docker save` layers). The result
    /// is still content-addressed: the name is the content's hash.
    pub fn ingest(&self, size: Option<u64>, reader: &mut dyn Read) -> Result<Digest, StoreError> {
        let (tmp, digest) = self.write_temp("ingest", None, size, reader)?;
        let final_path = self.blob_path(&digest);
        if !final_path.is_file() {
            tmp.file.sync_all().map_err(io_err("syncing", &tmp.path))?;
            tmp.persist(&final_path)?;
        }
        Ok(digest)
    }

    /// Writes `reader` to a temp file, hashing it; checks the size when known.
    fn write_temp(
        &self,
        stem: &str,
        expected: Option<&Digest>,
        size: Option<u64>,
        reader: &mut dyn Read,
    ) -> Result<(TempFile, Digest), StoreError> {
        let label = || expected.cloned().unwrap_or_else(|| Digest::of(b""));
        let tmp = TempFile::create(&self.tmp_dir(), stem)?;
        let mut hasher = sha2::Sha256::new();
        let mut written: u64 = 0;
        let mut buf = vec![0u8; 128 * 1024];
        let mut out = io::BufWriter::with_capacity(1 << 20, &tmp.file);
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StoreError::Read {
                        digest: label(),
                        source,
                    })
                }
            };
            written += n as u64;
            if let Some(limit) = size {
                if written > limit {
                    return Err(StoreError::Oversized {
                        digest: label(),
                        expected: limit,
                    });
                }
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io_err("writing", &tmp.path))?;
        }
        out.flush().map_err(io_err("writing", &tmp.path))?;
        drop(out);
        if let Some(expected_size) = size {
            if written < expected_size {
                return Err(StoreError::Truncated {
                    digest: label(),
                    expected: expected_size,
                    actual: written,
                });
            }
        }
        let digest = Digest::from_sha256(hasher.finalize().as_slice());
        Ok((tmp, digest))
    }

    /// Copies a local file into the store as blob `expected`, verified.
    pub fn import_file(
        &self,
        path: &Path,
        expected: &Digest,
        size: Option<u64>,
    ) -> Result<PathBuf, StoreError> {
        if self.has_blob(expected) {
            return Ok(self.blob_path(expected));
        }
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        self.write_blob(expected, size, &mut file)
    }

    /// Marks blobs as in use by a pull that has not saved its record yet, so
    /// a concurrent [`Store::gc`] keeps them. The pin is removed when dropped.
    pub fn pin(&self, blobs: &[Digest]) -> Result<Pin, StoreError> {
        let name = unique_name("pin");
        let path = self.pins_dir().join(format!("{name}.json"));
        let json = serde_json::to_vec(blobs).map_err(|e| StoreError::CorruptRecord {
            path: path.clone(),
            source: e,
        })?;
        write_atomic(&self.tmp_dir(), &path, &json)?;
        Ok(Pin { path })
    }

    /// Saves (or replaces) the record of an image.
    pub fn save_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.reference);
        let json = serde_json::to_vec_pretty(record).map_err(|e| StoreError::CorruptRecord {
            path: path.clone(),
            source: e,
        })?;
        write_atomic(&self.tmp_dir(), &path, &json)
    }

    /// The record of `reference` (any spelling that normalises to it).
    pub fn image(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let key = normalise(reference);
        let path = self.record_path(&key);
        if !path.is_file() {
            return Err(StoreError::NoSuchImage(reference.to_string()));
        }
        read_record(&path)
    }

    /// Every image in the store, sorted by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.images_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_record(&path)?);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Removes the image `reference` and garbage-collects the blobs no other
    /// image needs.
    pub fn remove(&self, reference: &str) -> Result<GcStats, StoreError> {
        let key = normalise(reference);
        let path = self.record_path(&key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchImage(reference.to_string()))
            }
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
        self.gc()
    }

    /// Removes every blob that no image record and no live pin refers to.
    /// A corrupt record stops the collection (its blobs could be needed).
    pub fn gc(&self) -> Result<GcStats, StoreError> {
        let mut keep: BTreeSet<Digest> = BTreeSet::new();
        for record in self.list()? {
            keep.extend(record.blobs);
        }
        let pins = self.pins_dir();
        for entry in fs::read_dir(&pins).map_err(io_err("listing", &pins))? {
            let path = entry.map_err(io_err("listing", &pins))?.path();
            let Ok(bytes) = fs::read(&path) else { continue };
            if let Ok(digests) = serde_json::from_slice::<Vec<Digest>>(&bytes) {
                keep.extend(digests);
            }
        }
        let mut stats = GcStats::default();
        let dir = self.blob_dir();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|n| Digest::from_hex(n).ok()) else {
                continue;
            };
            if keep.contains(&digest) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {
                    stats.blobs_removed += 1;
                    stats.bytes_freed += size;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        Ok(stats)
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        self.images_dir()
            .join(format!("{}.json", Digest::of(reference.as_bytes()).hex()))
    }

    fn remove_stale(&self, dir: &Path, age: Duration) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|d| d >= age);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The key an image is recorded under: the normalised reference when it
/// parses, else the text as given.
pub fn normalise(reference: &str) -> String {
    ImageReference::parse(reference).map_or_else(|_| reference.to_string(), |r| r.to_string())
}

fn read_record(path: &Path) -> Result<ImageRecord, StoreError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::CorruptRecord {
        path: path.to_path_buf(),
        source,
    })
}

fn unique_name(stem: &str) -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{stem}.{}.{n}.{nanos}", std::process::id())
}

fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = TempFile::create(tmp_dir, "record")?;
    (&tmp.file)
        .write_all(bytes)
        .map_err(io_err("writing", &tmp.path))?;
    tmp.file.sync_all().map_err(io_err("syncing", &tmp.path))?;
    tmp.persist(path)
}

/// A temp file removed on drop unless persisted.
struct TempFile {
    file: File,
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dir: &Path, stem: &str) -> Result<TempFile, StoreError> {
        let path = dir.join(format!("{}.partial", unique_name(stem)));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("creating", &path))?;
        Ok(TempFile {
            file,
            path,
            keep: false,
        })
    }

    fn persist(mut self, to: &Path) -> Result<(), StoreError> {
        fs::rename(&self.path, to).map_err(io_err("renaming into place", to))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Keeps blobs from garbage collection while a pull is in progress.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        (dir, store)
    }

    fn entries(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    fn record(store: &Store, reference: &str, blobs: Vec<Digest>) -> ImageRecord {
        let r = ImageRecord {
            reference: normalise(reference),
            manifest_digest: blobs[0].clone(),
            config_digest: blobs[0].clone(),
            config: ImageConfig::default(),
            layers: vec![],
            blobs,
            created_unix: 0,
        };
        store.save_image(&r).unwrap();
        r
    }

    #[test]
    fn write_blob_matching_digest_is_stored() {
        let (_d, s) = store();
        let digest = s.put_bytes(b"hello").unwrap();
        assert_eq!(fs::read(s.blob_path(&digest)).unwrap(), b"hello");
        assert_eq!(entries(&s.tmp_dir()), 0);
    }

    #[test]
    fn write_blob_wrong_digest_leaves_nothing() {
        let (_d, s) = store();
        let wrong = Digest::of(b"other");
        let err = s.write_blob(&wrong, None, &mut &b"hello"[..]).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!s.has_blob(&wrong));
        assert_eq!(entries(&s.tmp_dir()), 0);
        assert_eq!(entries(&s.blob_dir()), 0);
    }

    #[test]
    fn write_blob_short_read_is_truncated_error() {
        let (_d, s) = store();
        let d = Digest::of(b"hello world");
        let err = s.write_blob(&d, Some(11), &mut &b"hello"[..]).unwrap_err();
        assert!(
            matches!(err, StoreError::Truncated { actual: 5, .. }),
            "{err}"
        );
        assert_eq!(entries(&s.blob_dir()), 0);
    }

    #[test]
    fn write_blob_longer_than_declared_is_refused() {
        let (_d, s) = store();
        let d = Digest::of(b"hello");
        let err = s.write_blob(&d, Some(3), &mut &b"hello"[..]).unwrap_err();
        assert!(matches!(err, StoreError::Oversized { .. }), "{err}");
        assert_eq!(entries(&s.blob_dir()), 0);
    }

    #[test]
    fn write_blob_reader_error_leaves_nothing() {
        struct Failing(u8);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let (_d, s) = store();
        let d = Digest::of(b"xxxx");
        let err = s.write_blob(&d, None, &mut Failing(2)).unwrap_err();
        assert!(matches!(err, StoreError::Read { .. }), "{err}");
        assert_eq!(entries(&s.tmp_dir()), 0);
        assert_eq!(entries(&s.blob_dir()), 0);
    }

    #[test]
    fn open_removes_stale_temps_only() {
        let (_d, s) = store();
        let stale = s.tmp_dir().join("x.partial");
        let fresh = s.tmp_dir().join("y.partial");
        fs::write(&stale, b"half").unwrap();
        fs::write(&fresh, b"half").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let s = Store::open(s.root()).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists());
        drop(s);
    }

    #[test]
    fn read_blob_over_limit_is_refused() {
        let (_d, s) = store();
        let d = s.put_bytes(&[7u8; 100]).unwrap();
        assert!(matches!(
            s.read_blob(&d, 99),
            Err(StoreError::TooLarge { size: 100, .. })
        ));
        assert_eq!(s.read_blob(&d, 100).unwrap().len(), 100);
    }

    #[test]
    fn remove_collects_only_unshared_blobs() {
        let (_d, s) = store();
        let shared = s.put_bytes(b"shared").unwrap();
        let only_a = s.put_bytes(b"only a").unwrap();
        let only_b = s.put_bytes(b"only b").unwrap();
        record(&s, "a", vec![only_a.clone(), shared.clone()]);
        record(
            &s,
            "localhost:5000/b:1",
            vec![only_b.clone(), shared.clone()],
        );
        assert_eq!(s.list().unwrap().len(), 2);
        // Any spelling of the reference finds it.
        let stats = s.remove("docker.io/library/a:latest").unwrap();
        assert_eq!(stats.blobs_removed, 1);
        assert!(!s.has_blob(&only_a));
        assert!(s.has_blob(&shared) && s.has_blob(&only_b));
        assert_eq!(s.list().unwrap().len(), 1);
        assert!(matches!(s.remove("a"), Err(StoreError::NoSuchImage(_))));
    }

    #[test]
    fn gc_keeps_pinned_blobs_until_pin_dropped() {
        let (_d, s) = store();
        let blob = s.put_bytes(b"in flight").unwrap();
        let pin = s.pin(std::slice::from_ref(&blob)).unwrap();
        assert_eq!(s.gc().unwrap().blobs_removed, 0);
        drop(pin);
        assert_eq!(s.gc().unwrap().blobs_removed, 1);
        assert!(!s.has_blob(&blob));
    }

    #[test]
    fn gc_corrupt_record_stops_collection() {
        let (_d, s) = store();
        let blob = s.put_bytes(b"x").unwrap();
        fs::write(s.images_dir().join("bad.json"), b"{not json").unwrap();
        assert!(matches!(s.gc(), Err(StoreError::CorruptRecord { .. })));
        assert!(s.has_blob(&blob));
    }
}
