//! Layer tars built from structure-aware entries (regular files, directories,
//! symlinks, hardlinks, devices, whiteouts, opaque markers, GNU long names and
//! links, PAX records with sizes and xattrs, truncations and raw header bytes),
//! applied in up to three layers to one tree under small limits.
//!
//! Checked: no panic, no hang; every outcome is `Ok` or a typed error; the
//! limits hold (no more entries than allowed are counted); after `Ok`, every
//! directory entry names an inode that exists.
#![no_main]

use std::io::Read;

use arbitrary::Arbitrary;
use image::flatten::{DataSink, FileData, InodeKind, SinkError, Tree, Xattr};
use image::tar_guard::Limits;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDev,
    Fifo,
    Other(u8),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// Path components, joined with '/', from a small alphabet so that paths
    /// collide, climb (`..`) and whiteout (`.wh.`) often.
    path: Vec<u8>,
    kind: Kind,
    link: Vec<u8>,
    data: Vec<u8>,
    mode: u16,
    /// Write the path as a GNU long name even when it fits.
    long_name: bool,
    /// PAX records to put before the entry.
    pax: Vec<(u8, Vec<u8>)>,
    /// Claim this many more bytes than the data holds.
    size_lie: Option<u16>,
}

const PARTS: [&[u8]; 8] = [b"a", b"b", b"..", b".", b".wh.a", b".wh..wh..opq", b"dir", b""];
const PAX_KEYS: [&str; 6] = ["path", "linkpath", "size", "uid", "mtime", "SCHILY.xattr.user.x"];

fn path_of(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, b) in raw.iter().take(12).enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(PARTS[usize::from(*b) % PARTS.len()]);
    }
    if out.is_empty() {
        out.push(b'f');
    }
    out
}

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries.iter().take(64) {
        let path = path_of(&e.path);
        let link = path_of(&e.link);
        if !e.pax.is_empty() {
            let mut records = Vec::new();
            for (k, v) in e.pax.iter().take(4) {
                let key = PAX_KEYS[usize::from(*k) % PAX_KEYS.len()];
                let body = format!("{key}={}\n", String::from_utf8_lossy(v));
                // "%d %s": the length counts itself.
                let mut n = body.len() + 2;
                while format!("{n} {body}").len() != n {
                    n += 1;
                }
                records.extend_from_slice(format!("{n} {body}").as_bytes());
            }
            push_entry(&mut out, b"PaxHeaders/x", b'x', &records, None, b"");
        }
        if e.long_name {
            let mut name = path.clone();
            name.push(0);
            push_entry(&mut out, b"././@LongLink", b'L', &name, None, b"");
        }
        let (kind, data): (u8, &[u8]) = match e.kind {
            Kind::File => (b'0', &e.data),
            Kind::Dir => (b'5', &[]),
            Kind::Symlink => (b'2', &[]),
            Kind::Hardlink => (b'1', &[]),
            Kind::CharDev => (b'3', &[]),
            Kind::Fifo => (b'6', &[]),
            Kind::Other(k) => (k, &e.data),
        };
        push_entry(&mut out, &path, kind, data, e.size_lie, &link);
        let _ = e.mode;
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// One header (ustar, fields as a hostile writer fills them) and its data.
fn push_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, data: &[u8], lie: Option<u16>, link: &[u8]) {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    let size = data.len() as u64 + u64::from(lie.unwrap_or(0));
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

/// Keeps nothing: reads what it is given, as the EROFS writer would.
struct Sink;

impl DataSink for Sink {
    fn store_file(
        &mut self,
        src: &mut dyn Read,
        size: u64,
        _xattrs: &[Xattr],
    ) -> Result<FileData, SinkError> {
        let got = std::io::copy(&mut src.take(size), &mut std::io::sink()).map_err(SinkError::Read)?;
        if got < size {
            return Err(SinkError::Truncated { missing: size - got });
        }
        Ok(FileData {
            size,
            ..FileData::default()
        })
    }
}

fuzz_target!(|layers: Vec<Vec<Entry>>| {
    let limits = Limits {
        max_meta_entry: 4096,
        max_entries: 100,
        max_bytes: 1 << 20,
        max_tree_bytes: 64 << 10,
    };
    let mut tree = Tree::with_limits(limits);
    for (i, layer) in layers.iter().take(3).enumerate() {
        let tar = tar_of(layer);
        if tree.apply_layer(&tar[..], i, &mut Sink).is_err() {
            return;
        }
        assert!(tree.stats.entries <= limits.max_entries);
    }
    for inode in &tree.inodes {
        if let InodeKind::Dir(children) = &inode.kind {
            for child in children.values() {
                assert!(child.inode() < tree.inodes.len(), "a dangling directory entry");
            }
        }
    }
});
