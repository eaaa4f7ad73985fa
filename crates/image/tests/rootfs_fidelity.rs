//! Build an EROFS rootfs from two layer tars (gzip lower, zstd upper with
//! whiteouts and an opaque dir) and check it with erofs-utils: `fsck.erofs`
//! (superblock checksum, every inode and block), `dump.erofs` (mode, owner,
//! link count and nid per path) and `fsck.erofs --extract` (contents, symlink
//! targets, device numbers). Xattrs have no erofs-utils 1.5 reader, so a small
//! reader below walks the image by the on-disk format to find `user.test`.
//! Skipped with a printed reason when erofs-utils is not installed.
// Test helpers outside #[test] fns unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use image::erofs::build_rootfs;
use image::flatten::{Compression, Layer};
use image::tar_guard::Limits;
use sha2::{Digest, Sha256};

const BIG: usize = 32 << 20;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("-V").output().is_ok()
}

fn big_data() -> Vec<u8> {
    // xorshift64: incompressible, deterministic.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(BIG);
    while v.len() < BIG {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

struct T<W: Write>(tar::Builder<W>);

impl<W: Write> T<W> {
    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }
    fn dir(&mut self, p: &str, mode: u32) {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, 0);
        self.0.append_data(&mut h, p, &[][..]).unwrap();
    }
    fn file(&mut self, p: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, p, data).unwrap();
    }
    fn link(&mut self, kind: tar::EntryType, p: &str, target: &str) {
        let mut h = Self::header(kind, 0o777, 0, 0);
        self.0.append_link(&mut h, p, target).unwrap();
    }
    fn dev(&mut self, p: &str, major: u32, minor: u32) {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, p, &[][..]).unwrap();
    }
}

fn lower_layer(big: &[u8]) -> Vec<u8> {
    let mut t = T(tar::Builder::new(Vec::new()));
    t.dir("etc", 0o755);
    t.file(
        "etc/passwd",
        0o644,
        0,
        0,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    t.file("etc/remove-me", 0o644, 0, 0, b"gone soon\n");
    t.file("etc/keep", 0o600, 33, 33, b"kept\n");
    t.dir("opq", 0o755);
    t.file("opq/lower-a", 0o644, 0, 0, b"a");
    t.dir("opq/sub", 0o755);
    t.file("opq/sub/lower-b", 0o644, 0, 0, b"b");
    t.dir("bin", 0o755);
    t.file("bin/su", 0o4755, 0, 0, b"#!/bin/sh\necho su\n");
    t.file("bin/tool", 0o755, 0, 0, b"old tool\n");
    t.link(tar::EntryType::Link, "bin/tool-link", "bin/tool");
    t.link(tar::EntryType::Symlink, "bin/sh", "busybox");
    t.link(tar::EntryType::Symlink, "abs-link", "/etc/passwd");
    t.dir("dev", 0o755);
    t.dev("dev/null", 1, 3);
    t.dir("tmp", 0o1777);
    t.dir("shared", 0o2775);
    // An xattr, as docker and buildkit write them: a PAX SCHILY.xattr record.
    t.0.append_pax_extensions([("SCHILY.xattr.user.test", &b"hello xattr"[..])])
        .unwrap();
    t.file("etc/xattr-file", 0o644, 0, 0, b"has an xattr\n");
    t.file("data/big", 0o640, 1000, 1000, big);
    // A big uid needs an extended inode.
    t.file("data/high-uid", 0o644, 70_000, 70_001, b"x");
    // A directory spanning several blocks.
    for i in 0..400 {
        t.file(
            &format!("many/file-with-a-longish-name-{i:04}"),
            0o644,
            0,
            0,
            &[b'm'; 10],
        );
    }
    t.0.into_inner().unwrap()
}

fn upper_layer() -> Vec<u8> {
    let mut t = T(tar::Builder::new(Vec::new()));
    t.file("etc/.wh.remove-me", 0o644, 0, 0, b"");
    t.file(
        "etc/passwd",
        0o644,
        0,
        0,
        b"root:x:0:0:root:/root:/bin/ash\n",
    );
    t.file("opq/.wh..wh..opq", 0o644, 0, 0, b"");
    t.file("opq/upper-c", 0o644, 0, 0, b"c");
    // Replacing bin/tool leaves bin/tool-link on the old inode, alone.
    t.file("bin/tool", 0o755, 0, 0, b"new tool\n");
    // A hardlink to a file of the lower layer.
    t.link(tar::EntryType::Link, "etc/keep-link", "etc/keep");
    t.0.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `dump.erofs --path=P`: (mode, uid, gid, links, nid, size).
fn dump(img: &Path, p: &str) -> (u32, u32, u32, u32, u64, u64) {
    let out = Command::new("dump.erofs")
        .arg(format!("--path={p}"))
        .arg(img)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "dump.erofs {p}: {s}");
    let words: Vec<&str> = s.split_whitespace().collect();
    let after = |key: &str| {
        let i = words.iter().position(|w| *w == key).unwrap();
        words[i + 1].to_string()
    };
    // dump.erofs 1.5 prints only the rwx bits; special bits are checked on the
    // extracted tree and by the mini reader.
    let mode = u32::from_str_radix(after("Access:").split('/').next().unwrap(), 8).unwrap();
    (
        mode,
        after("Uid:").parse().unwrap(),
        after("Gid:").parse().unwrap(),
        after("Links:").parse().unwrap(),
        after("NID:").parse().unwrap(),
        after("Size:").parse().unwrap(),
    )
}

#[test]
fn rootfs_two_layers_match_erofs_utils_view() {
    if !have("fsck.erofs") || !have("dump.erofs") {
        eprintln!("skipped: erofs-utils (fsck.erofs, dump.erofs) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big = big_data();
    let lower = dir.path().join("lower.tar.gz");
    let upper = dir.path().join("upper.tar.zst");
    std::fs::write(&lower, gzip(&lower_layer(&big))).unwrap();
    std::fs::write(
        &upper,
        ruzstd::encoding::compress_to_vec(
            &upper_layer()[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ),
    )
    .unwrap();
    let img = dir.path().join("rootfs.erofs");
    let stats = build_rootfs(
        &[
            Layer {
                path: lower,
                compression: Compression::Gzip,
            },
            Layer {
                path: upper,
                compression: Compression::Zstd,
            },
        ],
        &img,
        Limits::default(),
    )
    .unwrap();
    assert_eq!(stats.layers, 2);
    assert_eq!(stats.whiteouts, 1);
    assert_eq!(stats.opaque_dirs, 1);
    assert_eq!(stats.image_bytes, std::fs::metadata(&img).unwrap().len());

    // 1. fsck: superblock checksum, inodes, dirents, data blocks.
    let fsck = Command::new("fsck.erofs").arg(&img).output().unwrap();
    assert!(
        fsck.status.success(),
        "fsck.erofs: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    if let Ok(p) = std::env::var("ROOTFS_KEEP") {
        std::fs::copy(&img, p).unwrap();
    }
    // 2. Metadata through dump.erofs (no root needed).
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(
        mini_reader::mode(&raw, "bin/su"),
        Some(0o104755),
        "setuid kept"
    );
    assert_eq!(mini_reader::mode(&raw, "tmp"), Some(0o41777), "sticky kept");
    assert_eq!(
        mini_reader::mode(&raw, "shared"),
        Some(0o42775),
        "setgid kept"
    );
    assert_eq!(mini_reader::mode(&raw, "dev/null"), Some(0o20666));
    assert_eq!(dump(&img, "/bin/su").1, 0);
    let (mode, uid, gid, links, _, size) = dump(&img, "/data/big");
    assert_eq!(
        (mode, uid, gid, links, size),
        (0o640, 1000, 1000, 1, BIG as u64)
    );
    let (_, uid, gid, _, _, _) = dump(&img, "/data/high-uid");
    assert_eq!((uid, gid), (70_000, 70_001), "extended inode owner");
    let keep = dump(&img, "/etc/keep");
    let keep_link = dump(&img, "/etc/keep-link");
    assert_eq!(keep.4, keep_link.4, "hardlink shares a nid");
    assert_eq!((keep.3, keep.1, keep.2, keep.0), (2, 33, 33, 0o600));
    let tool = dump(&img, "/bin/tool");
    let tool_link = dump(&img, "/bin/tool-link");
    assert_ne!(tool.4, tool_link.4, "replaced file is a new inode");
    assert_eq!((tool.3, tool_link.3), (1, 1));
    // Root: 2 + 8 subdirectories (etc opq bin dev tmp shared data many).
    let root = dump(&img, "/");
    assert_eq!(root.3, 2 + 8);

    // 3. Extract and compare contents, links, devices.
    let out = dir.path().join("x");
    let ex = Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg(&img)
        .output()
        .unwrap();
    let root_user = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !ex.status.success() && !root_user {
        eprintln!("extraction needs root here (mknod); content checks skipped");
        return;
    }
    assert!(
        ex.status.success(),
        "{}",
        String::from_utf8_lossy(&ex.stderr)
    );
    let mut names = BTreeMap::new();
    for top in std::fs::read_dir(&out).unwrap() {
        let top = top.unwrap();
        names.insert(top.file_name().into_string().unwrap(), ());
    }
    let tops: Vec<&str> = names.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        tops,
        ["abs-link", "bin", "data", "dev", "etc", "many", "opq", "shared", "tmp"]
    );
    let read = |p: &str| std::fs::read(out.join(p)).unwrap();
    assert_eq!(read("etc/passwd"), b"root:x:0:0:root:/root:/bin/ash\n");
    assert!(!out.join("etc/remove-me").exists(), "whiteout applied");
    assert!(!out.join("etc/.wh.remove-me").exists());
    let mut opq: Vec<String> = std::fs::read_dir(out.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opq.sort();
    assert_eq!(opq, ["upper-c"], "opaque dir hides lower entries");
    assert_eq!(read("bin/tool"), b"new tool\n");
    assert_eq!(read("bin/tool-link"), b"old tool\n");
    assert_eq!(
        std::fs::read_link(out.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::read_link(out.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(std::fs::read_dir(out.join("many")).unwrap().count(), 400);
    assert_eq!(read("many/file-with-a-longish-name-0399"), [b'm'; 10]);
    assert_eq!(
        hex(&Sha256::digest(read("data/big"))),
        hex(&Sha256::digest(&big)),
        "32 MiB file intact"
    );
    if root_user {
        let meta = std::fs::symlink_metadata(out.join("dev/null")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.rdev(), libc_makedev(1, 3));
        assert_eq!(meta.mode() & 0o7777, 0o666);
        for (p, m) in [("bin/su", 0o4755), ("tmp", 0o1777), ("shared", 0o2775)] {
            let meta = std::fs::symlink_metadata(out.join(p)).unwrap();
            // fsck.erofs 1.5 extracts without the special bits (also from a
            // mkfs.erofs image); they are checked through the mini reader above.
            assert_eq!(meta.mode() & 0o777, m & 0o777, "{p} extracted mode");
        }
        assert_eq!(std::fs::metadata(out.join("data/big")).unwrap().uid(), 1000);
    }

    // 4. The xattr, read from the image by the on-disk format.
    let value = mini_reader::xattr(&raw, "etc/xattr-file", 1, b"test");
    assert_eq!(value.as_deref(), Some(&b"hello xattr"[..]));
}

fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32)
}

/// Just enough EROFS reading to find an inline xattr: superblock -> root nid ->
/// dirents -> inode -> xattr ibody. Written from erofs_fs.h, independent of the writer.
mod mini_reader {
    fn u16le(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32le(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64le(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    struct Inode {
        off: usize,
        isize: usize,
        xsize: usize,
        layout: u16,
        size: u64,
        raw_blkaddr: u32,
    }

    fn inode(img: &[u8], nid: u64) -> Inode {
        let meta = u32le(img, 1024 + 40) as usize * 4096;
        let off = meta + nid as usize * 32;
        let format = u16le(img, off);
        let icount = u16le(img, off + 2) as usize;
        let extended = format & 1 == 1;
        Inode {
            off,
            isize: if extended { 64 } else { 32 },
            xsize: if icount == 0 {
                0
            } else {
                12 + 4 * (icount - 1)
            },
            layout: (format >> 1) & 7,
            size: if extended {
                u64le(img, off + 8)
            } else {
                u64::from(u32le(img, off + 8))
            },
            raw_blkaddr: u32le(img, off + 16),
        }
    }

    fn data(img: &[u8], i: &Inode) -> Vec<u8> {
        let size = i.size as usize;
        let full = if i.layout == 2 {
            size / 4096 * 4096
        } else {
            size
        };
        let start = i.raw_blkaddr as usize * 4096;
        let mut out = if full > 0 {
            img[start..start + full].to_vec()
        } else {
            Vec::new()
        };
        if i.layout == 2 {
            let t = i.off + i.isize + i.xsize;
            out.extend_from_slice(&img[t..t + size - full]);
        }
        out
    }

    fn lookup(img: &[u8], dir: u64, name: &[u8]) -> Option<u64> {
        let d = data(img, &inode(img, dir));
        for block in d.chunks(4096) {
            let n = u16le(block, 8) as usize / 12;
            for k in 0..n {
                let nameoff = u16le(block, k * 12 + 8) as usize;
                let end = if k + 1 < n {
                    u16le(block, (k + 1) * 12 + 8) as usize
                } else {
                    block[nameoff..]
                        .iter()
                        .position(|&b| b == 0)
                        .map_or(block.len(), |p| nameoff + p)
                };
                if &block[nameoff..end] == name {
                    return Some(u64le(block, k * 12));
                }
            }
        }
        None
    }

    fn resolve(img: &[u8], path: &str) -> Option<u64> {
        let mut nid = u64::from(u16le(img, 1024 + 14));
        for comp in path.split('/') {
            nid = lookup(img, nid, comp.as_bytes())?;
        }
        Some(nid)
    }

    pub fn mode(img: &[u8], path: &str) -> Option<u16> {
        let i = inode(img, resolve(img, path)?);
        Some(u16le(img, i.off + 4))
    }

    pub fn xattr(img: &[u8], path: &str, index: u8, name: &[u8]) -> Option<Vec<u8>> {
        let i = inode(img, resolve(img, path)?);
        let mut p = i.off + i.isize + 12 + 4 * img[i.off + i.isize + 4] as usize;
        let end = i.off + i.isize + i.xsize;
        while p < end {
            let (nlen, idx, vlen) = (img[p] as usize, img[p + 1], u16le(img, p + 2) as usize);
            let n = &img[p + 4..p + 4 + nlen];
            if idx == index && n == name {
                return Some(img[p + 4 + nlen..p + 4 + nlen + vlen].to_vec());
            }
            p += (4 + nlen + vlen).next_multiple_of(4);
        }
        None
    }
}

/// Layouts off the common path: a tail that cannot be inlined beside big xattrs,
/// a symlink target too long to inline, an exactly block-sized file, an empty
/// file, and a directory whose entries end exactly at a block boundary.
#[test]
fn rootfs_edge_layouts_pass_fsck_and_extract() {
    if !have("fsck.erofs") {
        eprintln!("skipped: erofs-utils (fsck.erofs) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut t = T(tar::Builder::new(Vec::new()));
    let tail_data: Vec<u8> = (0..4096 + 2000).map(|i| (i % 251) as u8).collect();
    t.0.append_pax_extensions([("SCHILY.xattr.user.big", &[b'v'; 3000][..])])
        .unwrap();
    t.file("xattr-heavy", 0o644, 0, 0, &tail_data);
    // 4095 bytes (PATH_MAX - 1): cannot sit beside even a compact inode.
    let long_target = "d/".repeat(2047) + "x";
    t.link(tar::EntryType::Symlink, "long-link", &long_target);
    t.file("block", 0o644, 0, 0, &[7u8; 4096]);
    t.file("empty", 0o644, 0, 0, b"");
    // "." (13) + ".." (14) + 126 entries of 12 + 20 bytes + one of 12 + 25
    // bytes = 4096: the only block is exactly full.
    for i in 0..126 {
        t.file(&format!("full/n{i:019}"), 0o644, 0, 0, b"");
    }
    t.file(&format!("full/n{:024}", 999), 0o644, 0, 0, b"");
    let layer = dir.path().join("l.tar");
    std::fs::write(&layer, t.0.into_inner().unwrap()).unwrap();
    let img = dir.path().join("img");
    build_rootfs(
        &[Layer {
            path: layer,
            compression: Compression::None,
        }],
        &img,
        Limits::default(),
    )
    .unwrap();
    let fsck = Command::new("fsck.erofs").arg(&img).output().unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let out = dir.path().join("x");
    let ex = Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        ex.status.success(),
        "{}",
        String::from_utf8_lossy(&ex.stderr)
    );
    assert_eq!(std::fs::read(out.join("xattr-heavy")).unwrap(), tail_data);
    assert_eq!(
        std::fs::read_link(out.join("long-link")).unwrap(),
        Path::new(&long_target)
    );
    assert_eq!(std::fs::read(out.join("block")).unwrap(), [7u8; 4096]);
    assert!(std::fs::read(out.join("empty")).unwrap().is_empty());
    assert_eq!(std::fs::read_dir(out.join("full")).unwrap().count(), 127);
    let raw = std::fs::read(&img).unwrap();
    let v = mini_reader::xattr(&raw, "xattr-heavy", 1, b"big").unwrap();
    assert_eq!(v, [b'v'; 3000]);
    assert_eq!(
        dump(&img, "/full").5,
        4096,
        "directory ends on a block boundary"
    );
    for (p, layout) in [
        ("/xattr-heavy", "0"),
        ("/long-link", "0"),
        ("/block", "0"),
        ("/full", "0"),
        ("/", "2"),
    ] {
        let out = Command::new("dump.erofs")
            .arg(format!("--path={p}"))
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains(&format!("Layout: {layout} ")), "{p}: {text}");
    }
}
