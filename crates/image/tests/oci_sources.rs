//! Pulls a real image (built with umoci from Debian's busybox-static) through
//! all three sources: the OCI layout, a docker-archive made by skopeo, and
//! Debian's docker-registry on 127.0.0.1 after a skopeo push. Hostile cases
//! use the real registry (unknown image, tampered storage) or a scripted
//! server (truncation, 500, hang, token flow).

// Test helpers outside #[test] fns: a failed step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::manifest::{Compression, Manifest};
use image::reference::{Digest, ImageReference};
use image::registry::{RegistryError, RegistryOptions};
use image::source::{pull, PullOptions, PulledImage, SourceError};
use image::store::{Store, StoreError};
use support::{StubReply, StubRequest, StubServer};

fn fresh_store(name: &str) -> Store {
    Store::open(support::scratch_dir(name).join("store")).unwrap()
}

fn opts() -> PullOptions {
    PullOptions {
        registry: RegistryOptions {
            // No ambient credentials in tests.
            docker_config: Some("/nonexistent/config.json".into()),
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            ..RegistryOptions::default()
        },
        ..PullOptions::default()
    }
}

fn parse(s: &str) -> ImageReference {
    ImageReference::parse(s).unwrap()
}

fn blob_count(store: &Store) -> usize {
    std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count()
}

fn tmp_count(store: &Store) -> usize {
    std::fs::read_dir(store.root().join("tmp")).unwrap().count()
}

/// Every layer and the config are on disk with the SHA-256 they claim.
fn assert_blobs_verified(store: &Store, img: &PulledImage) {
    for d in img
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&img.config_digest, &img.manifest_digest])
    {
        let bytes = std::fs::read(store.blob_path(d)).unwrap();
        assert_eq!(&Digest::of(&bytes), d);
    }
}

/// The manifest of `tag` in an OCI layout, and its layer descriptors' digests.
struct LayoutImage {
    manifest: Vec<u8>,
    manifest_digest: Digest,
    layers: Vec<Digest>,
}

fn layout_image(layout: &Path, tag: &str) -> LayoutImage {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let digest = Digest::parse(entry["digest"].as_str().unwrap()).unwrap();
    let manifest = std::fs::read(layout.join("blobs/sha256").join(digest.hex())).unwrap();
    let Manifest::Image { layers, .. } = Manifest::parse(&manifest, None).unwrap() else {
        panic!("layout entry is not an image manifest")
    };
    LayoutImage {
        manifest,
        manifest_digest: digest,
        layers: layers.into_iter().map(|l| l.digest).collect(),
    }
}

/// Serves the busybox layout as a registry would, with `blob_reply` deciding
/// what a blob GET gets.
fn layout_server(
    blob_reply: impl Fn(&Digest, Vec<u8>) -> StubReply + Send + Sync + 'static,
) -> (StubServer, LayoutImage) {
    let layout = support::busybox_layout();
    let img = layout_image(&layout, support::BUSYBOX_TAG);
    let manifest = img.manifest.clone();
    let server = StubServer::start(move |req: &StubRequest| {
        if req.path.contains("/manifests/") {
            return StubReply::Respond(
                200,
                vec![(
                    "Content-Type".into(),
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                manifest.clone(),
            );
        }
        if let Some(d) = req
            .path
            .rsplit("/blobs/")
            .next()
            .filter(|_| req.path.contains("/blobs/"))
        {
            let Ok(digest) = Digest::parse(d) else {
                return StubReply::Respond(400, vec![], vec![]);
            };
            let path = layout.join("blobs/sha256").join(digest.hex());
            return match std::fs::read(path) {
                Ok(bytes) => blob_reply(&digest, bytes),
                Err(_) => StubReply::Respond(404, vec![], vec![]),
            };
        }
        StubReply::Respond(404, vec![], vec![])
    });
    (server, img)
}

#[test]
fn pull_three_sources_agree() {
    let layout = support::busybox_layout();
    let archive = support::docker_archive(
        "busybox-archive",
        &layout,
        support::BUSYBOX_TAG,
        "busybox:latest",
    );
    let registry = support::Registry::start();
    let pushed = registry.push(&layout, support::BUSYBOX_TAG, "test/busybox:1");

    let oci_store = fresh_store("oci");
    let from_oci = pull(
        &parse(&format!(
            "oci:{}:{}",
            layout.display(),
            support::BUSYBOX_TAG
        )),
        &oci_store,
        &opts(),
    )
    .unwrap();
    let archive_store = fresh_store("archive");
    let from_archive = pull(
        &parse(&format!("docker-archive:{}", archive.display())),
        &archive_store,
        &opts(),
    )
    .unwrap();
    let reg_store = fresh_store("registry");
    let from_registry = pull(&parse(&pushed), &reg_store, &opts()).unwrap();

    // The registry serves the very manifest the layout holds.
    assert_eq!(from_registry.manifest_digest, from_oci.manifest_digest);
    assert_eq!(
        from_oci.manifest_digest,
        layout_image(&layout, support::BUSYBOX_TAG).manifest_digest
    );
    // A docker-archive holds no registry manifest (and skopeo stores its
    // layers uncompressed), but the config and the layer contents are the same.
    for img in [&from_archive, &from_registry] {
        assert_eq!(img.config_digest, from_oci.config_digest);
        assert_eq!(img.config, from_oci.config);
        let ids = |i: &PulledImage| {
            i.layers
                .iter()
                .map(|l| l.diff_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(img), ids(&from_oci));
    }
    assert_eq!(from_oci.layers.len(), 2);
    assert!(from_oci
        .layers
        .iter()
        .all(|l| l.compression == Compression::Gzip));
    assert!(from_archive
        .layers
        .iter()
        .all(|l| l.compression == Compression::None && l.digest == l.diff_id));

    let c = &from_oci.config;
    assert_eq!(
        c.cmd.as_deref(),
        Some(&["/bin/sh".to_string(), "-c".into(), "echo hello".into()][..])
    );
    assert!(c.env.contains(&"GREETING=hi".to_string()));
    assert_eq!(c.working_dir.as_deref(), Some("/etc"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    assert_eq!(c.exposed_ports, vec!["8080/tcp".to_string()]);
    assert_eq!(
        c.labels.get("org.example.test").map(String::as_str),
        Some("yes")
    );
    assert_eq!(from_oci.platform.os, "linux");

    for (store, img) in [
        (&oci_store, &from_oci),
        (&archive_store, &from_archive),
        (&reg_store, &from_registry),
    ] {
        assert_blobs_verified(store, img);
        assert_eq!(tmp_count(store), 0);
        let records = store.list().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].reference, img.reference);
        assert_eq!(records[0].manifest_digest, img.manifest_digest);
    }
    assert_eq!(
        from_registry.reference,
        format!("{}/test/busybox:1", registry.host())
    );

    // A second pull of the same image is served from the store and agrees.
    let again = pull(&parse(&pushed), &reg_store, &opts()).unwrap();
    assert_eq!(again, from_registry);

    // rmi: the record goes, and with it every blob nobody else needs.
    let stats = reg_store.remove(&pushed).unwrap();
    assert_eq!(stats.blobs_removed, 4, "manifest, config, two layers");
    assert_eq!(blob_count(&reg_store), 0);
    assert!(reg_store.list().unwrap().is_empty());
}

#[test]
fn pull_unknown_image_is_clear_not_found() {
    let registry = support::Registry::start();
    let store = fresh_store("unknown");
    let reference = format!("{}/nope/none:1", registry.host());
    let err = pull(&parse(&reference), &store, &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Registry(RegistryError::ManifestNotFound { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(blob_count(&store), 0);
}

#[test]
fn pull_tampered_registry_blob_is_refused_and_not_stored() {
    let layout = support::busybox_layout();
    let registry = support::Registry::start();
    let pushed = registry.push(&layout, support::BUSYBOX_TAG, "test/tampered:1");
    let top = layout_image(&layout, support::BUSYBOX_TAG)
        .layers
        .last()
        .unwrap()
        .clone();
    let data = registry.blob_data_path(top.hex());
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let store = fresh_store("tampered");
    let err = pull(&parse(&pushed), &store, &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Registry(RegistryError::Store(StoreError::DigestMismatch { .. }))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert!(!store.has_blob(&top));
    assert_eq!(tmp_count(&store), 0);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn pull_truncated_layer_fails_and_leaves_no_blob() {
    let (server, img) = layout_server(|_, bytes| {
        if bytes.len() > 100_000 {
            let declared = bytes.len() as u64;
            StubReply::Truncated(bytes[..bytes.len() / 2].to_vec(), declared)
        } else {
            StubReply::Respond(200, vec![], bytes)
        }
    });
    let store = fresh_store("truncated");
    let reference = format!("{}/test/busybox:1", server.host());
    let err = pull(&parse(&reference), &store, &opts()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("truncated") || text.contains("reading blob"),
        "{err:?}"
    );
    for layer in &img.layers {
        let whole = std::fs::read(
            support::busybox_layout()
                .join("blobs/sha256")
                .join(layer.hex()),
        )
        .unwrap();
        if whole.len() > 100_000 {
            assert!(!store.has_blob(layer));
        }
    }
    assert_eq!(tmp_count(&store), 0);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn pull_registry_500_is_clear_error() {
    let server = StubServer::start(|_| StubReply::Respond(500, vec![], b"boom".to_vec()));
    let store = fresh_store("500");
    let reference = format!("{}/test/busybox:1", server.host());
    let err = pull(&parse(&reference), &store, &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Registry(RegistryError::Status { status: 500, .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(blob_count(&store), 0);
}

#[test]
fn pull_hanging_registry_times_out() {
    let server = StubServer::start(|_| StubReply::Hang);
    let store = fresh_store("hang");
    let reference = format!("{}/test/busybox:1", server.host());
    let mut o = opts();
    o.registry.io_timeout = Duration::from_secs(1);
    let start = Instant::now();
    let err = pull(&parse(&reference), &store, &o).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(err, SourceError::Registry(RegistryError::Transport { .. })),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn pull_hanging_blob_body_times_out() {
    // Headers arrive, then the body never does.
    let (server, _) = layout_server(|_, bytes| {
        if bytes.len() > 100_000 {
            let declared = bytes.len() as u64;
            StubReply::Stall(bytes[..1000].to_vec(), declared)
        } else {
            StubReply::Respond(200, vec![], bytes)
        }
    });
    let store = fresh_store("hang-body");
    let reference = format!("{}/test/busybox:1", server.host());
    let mut o = opts();
    o.registry.io_timeout = Duration::from_secs(1);
    let start = Instant::now();
    assert!(pull(&parse(&reference), &store, &o).is_err());
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(tmp_count(&store), 0);
}

#[test]
fn pull_from_a_registry_that_drips_fails_within_the_blob_deadline() {
    // One byte a second: every read beats the per-read timeout.
    let (server, _) = layout_server(|_, bytes| {
        if bytes.len() > 100_000 {
            StubReply::Drip(bytes, Duration::from_secs(1))
        } else {
            StubReply::Respond(200, vec![], bytes)
        }
    });
    let store = fresh_store("drip");
    let reference = format!("{}/test/busybox:1", server.host());
    let mut o = opts();
    o.registry.io_timeout = Duration::from_secs(3);
    o.registry.blob_deadline_floor = Duration::from_secs(2);
    o.registry.min_blob_rate = u64::MAX;
    let start = Instant::now();
    let err = pull(&parse(&reference), &store, &o).unwrap_err();
    let elapsed = start.elapsed();
    let mut msg = err.to_string();
    let mut cur = std::error::Error::source(&err);
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    assert!(msg.contains("giving up"), "{msg}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert_eq!(tmp_count(&store), 0);
}

#[test]
fn pull_refuses_a_layer_declared_too_large_before_fetching_it() {
    let layout = support::busybox_layout();
    let img = layout_image(&layout, support::BUSYBOX_TAG);
    let mut manifest: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    manifest["layers"][0]["size"] = serde_json::json!(1u64 << 40);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let blobs = layout.join("blobs/sha256");
    let server = StubServer::start(move |req: &StubRequest| {
        if req.path.contains("/manifests/") {
            return StubReply::Respond(
                200,
                vec![(
                    "Content-Type".into(),
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                manifest.clone(),
            );
        }
        let hex = req.path.rsplit("sha256:").next().unwrap_or_default();
        match std::fs::read(blobs.join(hex)) {
            Ok(b) => StubReply::Respond(200, vec![], b),
            Err(_) => StubReply::Respond(404, vec![], vec![]),
        }
    });
    let store = fresh_store("declared-huge");
    let reference = format!("{}/test/busybox:1", server.host());
    let err = pull(&parse(&reference), &store, &opts()).unwrap_err();
    assert!(
        matches!(err, SourceError::DeclaredTooLarge { size, .. } if size == 1 << 40),
        "{err}"
    );
    let fetched: Vec<String> = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        !fetched.iter().any(|p| p.contains(&layer_digest)),
        "the layer was requested: {fetched:?}"
    );
}

#[test]
fn pull_bearer_token_flow_with_docker_config_credentials() {
    let layout = support::busybox_layout();
    let img = layout_image(&layout, support::BUSYBOX_TAG);
    let manifest = img.manifest.clone();
    let port_cell: Arc<std::sync::OnceLock<u16>> = Arc::new(std::sync::OnceLock::new());
    let port_for_handler = port_cell.clone();
    let basic = format!("Basic {}", base64_encode(b"tester:secret"));
    let server = StubServer::start(move |req: &StubRequest| {
        let port = *port_for_handler.get().unwrap();
        if req.path.starts_with("/token") {
            if req.header("Authorization") != Some(basic.as_str())
                || !req
                    .path
                    .contains("scope=repository%3Atest%2Fbusybox%3Apull")
            {
                return StubReply::Respond(401, vec![], vec![]);
            }
            return StubReply::Respond(200, vec![], br#"{"token":"good-token"}"#.to_vec());
        }
        if req.header("Authorization") != Some("Bearer good-token") {
            return StubReply::Respond(
                401,
                vec![(
                    "WWW-Authenticate".into(),
                    format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="stub",scope="repository:test/busybox:pull""#
                    ),
                )],
                vec![],
            );
        }
        if req.path.contains("/manifests/") {
            return StubReply::Respond(
                200,
                vec![(
                    "Content-Type".into(),
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                manifest.clone(),
            );
        }
        let hex = req.path.rsplit("sha256:").next().unwrap_or("");
        match std::fs::read(layout.join("blobs/sha256").join(hex)) {
            Ok(b) => StubReply::Respond(200, vec![], b),
            Err(_) => StubReply::Respond(404, vec![], vec![]),
        }
    });
    port_cell.set(server.port).unwrap();

    let dir = support::scratch_dir("dockercfg");
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
            server.host(),
            base64_encode(b"tester:secret")
        ),
    )
    .unwrap();
    let mut o = opts();
    o.registry.docker_config = Some(cfg);
    let store = fresh_store("token");
    let reference = format!("{}/test/busybox:1", server.host());
    let pulled = pull(&parse(&reference), &store, &o).unwrap();
    assert_eq!(pulled.manifest_digest, img.manifest_digest);
    let token_calls = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.starts_with("/token"))
        .count();
    assert_eq!(token_calls, 1, "the token is reused across requests");

    // Without credentials the token endpoint refuses: a clear auth error.
    let store = fresh_store("token-denied");
    let err = pull(&parse(&reference), &store, &opts()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Registry(RegistryError::Unauthorized { .. })
        ),
        "{err:?}"
    );
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Counts progress calls: (started, done, bytes done).
#[derive(Default)]
struct Counting(std::sync::Mutex<(usize, usize, u64)>);

impl image::source::PullProgress for Counting {
    fn layer(&self, _index: usize, _count: usize, size: u64, done: bool) {
        let mut c = self.0.lock().unwrap();
        if done {
            c.1 += 1;
            c.2 += size;
        } else {
            c.0 += 1;
        }
    }
}

#[test]
fn pull_progress_reports_every_layer_start_and_end() {
    let layout = support::busybox_layout();
    let store = fresh_store("progress");
    let counting = Arc::new(Counting::default());
    let mut o = opts();
    o.progress = Some(image::source::ProgressHook(counting.clone()));
    let img = pull(
        &parse(&format!(
            "oci:{}:{}",
            layout.display(),
            support::BUSYBOX_TAG
        )),
        &store,
        &o,
    )
    .unwrap();
    let (started, done, bytes) = *counting.0.lock().unwrap();
    assert_eq!(started, img.layers.len());
    assert_eq!(done, img.layers.len());
    assert_eq!(bytes, img.layers.iter().map(|l| l.size).sum::<u64>());
}
