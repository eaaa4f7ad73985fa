//! Hostile layers: each gives a clear error, leaves no output and no temporary
//! file behind, and writes nothing outside the output directory.
// Test helpers outside #[test] fns unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;

use image::erofs::{build_rootfs, RootfsError};
use image::flatten::{Compression, FlattenError, Layer};
use image::tar_guard::Limits;

/// A tar with one entry whose raw name and link name are written as given
/// (the tar crate's own setters refuse `..`, hostile producers do not).
fn raw_tar(kind: tar::EntryType, name: &str, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, data).unwrap();
    b.into_inner().unwrap()
}

fn build(dir: &Path, blob: &[u8], compression: Compression) -> Result<(), RootfsError> {
    let layer = dir.join("layer");
    std::fs::write(&layer, blob).unwrap();
    build_rootfs(
        &[Layer {
            path: layer,
            compression,
        }],
        &dir.join("out/rootfs.erofs"),
        Limits::default(),
    )
    .map(|_| ())
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    dir
}

fn assert_nothing_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir.join("out")).unwrap().collect();
    assert!(left.is_empty(), "output dir not empty: {left:?}");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["layer", "out"]);
}

fn flatten_error(e: RootfsError) -> FlattenError {
    match e {
        RootfsError::Layer(l) => l.source,
        other => panic!("expected a layer error, got {other}"),
    }
}

#[test]
fn rootfs_dotdot_entry_is_refused() {
    let dir = setup();
    let tar = raw_tar(tar::EntryType::Regular, "../../escape", "", b"x");
    let err = flatten_error(build(dir.path(), &tar, Compression::None).unwrap_err());
    assert!(matches!(err, FlattenError::PathEscapesRoot { .. }), "{err}");
    assert_nothing_left(dir.path());
}

#[test]
fn rootfs_hardlink_outside_root_is_refused() {
    let dir = setup();
    let tar = raw_tar(tar::EntryType::Link, "x", "../../../etc/passwd", b"");
    let err = flatten_error(build(dir.path(), &tar, Compression::None).unwrap_err());
    assert!(
        matches!(err, FlattenError::HardlinkTargetMissing { .. }),
        "{err}"
    );
    assert_nothing_left(dir.path());
}

#[test]
fn rootfs_truncated_gzip_layer_is_refused() {
    let dir = setup();
    let tar = raw_tar(tar::EntryType::Regular, "f", "", &vec![0x5a; 100_000]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let mut blob = gz.finish().unwrap();
    blob.truncate(blob.len() / 2);
    let err = build(dir.path(), &blob, Compression::Gzip).unwrap_err();
    let err = flatten_error(err);
    assert!(
        matches!(err, FlattenError::Data { .. } | FlattenError::Tar(_)),
        "{err}"
    );
    assert_nothing_left(dir.path());
}

#[test]
fn rootfs_absurd_size_is_truncation_error() {
    let dir = setup();
    // Announces 8 GiB - 1 of data, carries 512 bytes.
    let mut tar = raw_tar(tar::EntryType::Regular, "huge", "", &[1u8; 512]);
    let mut h = tar::Header::from_byte_slice(&tar[..512]).clone();
    h.set_size(0o77777777777);
    h.set_cksum();
    tar[..512].copy_from_slice(h.as_bytes());
    let err = flatten_error(build(dir.path(), &tar, Compression::None).unwrap_err());
    assert!(matches!(err, FlattenError::Data { .. }), "{err}");
    assert_nothing_left(dir.path());
}

#[test]
fn rootfs_garbage_zstd_is_refused() {
    let dir = setup();
    let err = build(dir.path(), b"definitely not zstd", Compression::Zstd).unwrap_err();
    assert!(matches!(err, RootfsError::Layer(_)), "{err}");
    assert_nothing_left(dir.path());
}

/// The process's peak RSS so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A gzip layer whose tar is `header` followed by `zeros_mib` MiB of zeros,
/// small on disk: one gzip member for the header, then one member of 1 MiB of
/// zeros repeated (the decoder reads every member).
fn gzip_with_zeros(header: &[u8], zeros_mib: usize) -> Vec<u8> {
    let member = |data: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    let mut blob = member(header);
    let zeros = member(&vec![0u8; 1 << 20]);
    for _ in 0..zeros_mib {
        blob.extend_from_slice(&zeros);
    }
    blob
}

#[test]
fn rootfs_huge_gnu_long_name_is_refused_without_reading_it() {
    let dir = setup();
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(512 << 20);
    h.set_cksum();
    let blob = gzip_with_zeros(h.as_bytes(), 512);
    assert!(
        blob.len() < 2 << 20,
        "the layer is small: {} bytes",
        blob.len()
    );
    let err = build(dir.path(), &blob, Compression::Gzip).unwrap_err();
    let msg = image_error_chain(&err);
    assert!(
        msg.contains("layer 0") && msg.contains("GNU long name") && msg.contains("1048576"),
        "the error names the layer and the limit: {msg}"
    );
    assert!(
        matches!(flatten_error(err), FlattenError::Limit(_)),
        "a limit error"
    );
    let peak = peak_rss();
    assert!(peak < 64 << 20, "peak RSS {} MiB", peak >> 20);
    assert_nothing_left(dir.path());
}

#[test]
fn rootfs_huge_pax_record_is_refused() {
    let dir = setup();
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/f").unwrap();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(256 << 20);
    h.set_cksum();
    let blob = gzip_with_zeros(h.as_bytes(), 256);
    let err = flatten_error(build(dir.path(), &blob, Compression::Gzip).unwrap_err());
    assert!(
        matches!(
            err,
            FlattenError::Limit(image::tar_guard::LimitError::MetaEntryTooLarge {
                kind: "PAX extended",
                ..
            })
        ),
        "{err}"
    );
    assert_nothing_left(dir.path());
}

/// Every message of `e`'s chain, joined.
fn image_error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[test]
fn rootfs_build_sweeps_old_leftovers_of_killed_builds_only() {
    let dir = setup();
    let out = dir.path().join("out");
    let old = out.join(".erofs-killed.tmp");
    let fresh = out.join(".erofs-running.tmp");
    let other = out.join("keep.tmp");
    for p in [&old, &fresh, &other] {
        std::fs::write(p, b"x").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for p in [&old, &other] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let tar = raw_tar(tar::EntryType::Regular, "f", "", b"data");
    build(dir.path(), &tar, Compression::None).unwrap();
    assert!(!old.exists(), "a killed build's leftover is swept");
    assert!(fresh.exists(), "a running build's file is left alone");
    assert!(other.exists(), "files that are not ours are left alone");
}

/// Runs the test `name` of this binary again, alone in a child process with
/// `CHILD_ENV` set (so its peak RSS is its own), and returns what it printed.
fn run_alone(name: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const CHILD_ENV: &str = "ROOTFS_HOSTILE_CHILD";

/// A gzip layer of 10 million empty-file entries, about 10 MB on disk: 300,000
/// distinct files in 30 directories, then 970 gzip members of the same 10,000
/// headers for one name (each a valid entry that replaces the last), with no
/// end-of-archive marker until the very end.
fn write_ten_million_entries(path: &Path) -> u64 {
    let header = |name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_cksum();
        *h.as_bytes()
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut entries = 0u64;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for i in 0..300_000u32 {
        gz.write_all(&header(&format!("d{:02}/file-{i:07}", i / 10_000)))
            .unwrap();
        entries += 1;
    }
    file.write_all(&gz.finish().unwrap()).unwrap();
    let same = header("zz-same");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..10_000 {
        gz.write_all(&same).unwrap();
    }
    let member = gz.finish().unwrap();
    for _ in 0..970 {
        file.write_all(&member).unwrap();
        entries += 10_000;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&[0u8; 1024]).unwrap();
    file.write_all(&gz.finish().unwrap()).unwrap();
    file.flush().unwrap();
    entries
}

#[test]
fn rootfs_ten_million_entries_are_refused_in_bounded_memory() {
    const NAME: &str = "rootfs_ten_million_entries_are_refused_in_bounded_memory";
    if std::env::var_os(CHILD_ENV).is_none() {
        let out = run_alone(NAME);
        let line = out
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no result from the child: {out}"));
        let (peak, msg) = line.split_once(' ').unwrap();
        let peak: u64 = peak.parse().unwrap();
        eprintln!("refused with a peak RSS of {} MiB: {msg}", peak >> 20);
        assert!(
            msg.contains("layer 0") && msg.contains("file tree") && msg.contains("50331648"),
            "the error names the layer and the limit: {msg}"
        );
        assert!(peak < 64 << 20, "peak RSS {} MiB", peak >> 20);
        return;
    }
    let dir = setup();
    let layer = dir.path().join("layer");
    let entries = write_ten_million_entries(&layer);
    assert_eq!(entries, 10_000_000);
    let size = std::fs::metadata(&layer).unwrap().len();
    assert!(size < 32 << 20, "the layer is small: {size} bytes");
    let base = peak_rss();
    let err = build_rootfs(
        &[Layer {
            path: layer,
            compression: Compression::Gzip,
        }],
        &dir.path().join("out/rootfs.erofs"),
        Limits::default(),
    )
    .unwrap_err();
    let msg = image_error_chain(&err);
    assert!(
        matches!(
            flatten_error(err),
            FlattenError::Limit(image::tar_guard::LimitError::TreeTooLarge { .. })
        ),
        "a tree limit error: {msg}"
    );
    assert_nothing_left(dir.path());
    println!("base peak {} MiB", base >> 20);
    println!("RESULT {} {msg}", peak_rss());
}
