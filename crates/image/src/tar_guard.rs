//! Limits on a layer tar, enforced on the byte stream before the `tar` crate
//! sees it.
//!
//! The `tar` crate reads a GNU long name, long link or PAX record whole into
//! memory, however large its header says it is: a 510 KB gzip layer holding one
//! 512 MiB long name once made a pull peak at 2.17 GB. [`TarGuard`] sits between
//! the decompressor and the `tar` crate, follows the archive's structure (512-byte
//! headers, data padded to 512, PAX `size` overrides, GNU sparse extension
//! blocks) and fails the read that would hand over a header breaking a
//! [`Limits`] bound, so nothing is allocated for it. It also bounds the entry
//! count and the uncompressed bytes of the whole image.
//!
//! The guard must read the archive exactly as the `tar` crate (0.4.46) does, or
//! a crafted layer could make the two disagree on where headers are and walk
//! entries past the limits (the `tar_flatten` fuzz target found such a
//! layer): sizes parse as the crate parses them (octal text trimmed of
//! whitespace, a `+` allowed; base-256 from the last 8 bytes, wrapping), long
//! name, long link and PAX headers are extension headers only with a ustar or
//! GNU magic, a PAX `size` is the first `size` record (none after a malformed
//! record) and applies to the next member only, never to an extension header.
//! A size field the crate cannot parse either is refused, never skipped.

use std::io::{self, Read};

/// Tar block size.
const BLOCK: usize = 512;

/// Bounds on one image's layer tars. The defaults are generous: far above any
/// real image, far below what would exhaust a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest GNU long name / long link or PAX extended header (Go's
    /// archive/tar allows 1 MiB too).
    pub max_meta_entry: u64,
    /// Most entries (files, directories, links, ...) over all layers.
    pub max_entries: u64,
    /// Most uncompressed tar bytes over all layers.
    pub max_bytes: u64,
    /// Most memory the merged file tree may take (names, link targets,
    /// extended attributes and a fixed cost per inode and directory entry), so
    /// that a layer of millions of tiny entries is refused before it exhausts
    /// the host: the tree is the one part of a conversion held in RAM.
    pub max_tree_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_meta_entry: 1 << 20,
            max_entries: 1_000_000,
            max_bytes: 64 << 30,
            // About 285,000 files with short names; the process stays under
            // 64 MiB while it refuses a bigger tree.
            max_tree_bytes: 48 << 20,
        }
    }
}

/// A layer broke a [`Limits`] bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A long name, long link or PAX header larger than allowed.
    #[error("a {kind} header of {size} bytes is larger than the {limit}-byte limit")]
    MetaEntryTooLarge {
        /// What the header is ("GNU long name", ...).
        kind: &'static str,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// More entries than allowed.
    #[error("the image has more than {limit} entries")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// A file tree that needs more memory than allowed.
    #[error(
        "the image's file tree needs more than {limit} bytes of metadata in memory \
         (refused at entry {entries})"
    )]
    TreeTooLarge {
        /// The limit.
        limit: u64,
        /// Entries read when it was reached.
        entries: u64,
    },
    /// More uncompressed bytes than allowed.
    #[error("the image's layers hold more than {limit} bytes uncompressed")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// A header whose size field is not a number.
    #[error("a tar header's size field is not a number")]
    BadSize,
}

/// The running totals over an image's layers, carried from one layer's guard
/// to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Entries seen.
    pub entries: u64,
    /// Uncompressed bytes seen.
    pub bytes: u64,
}

#[derive(Debug)]
enum State {
    /// Collecting a header block.
    Header,
    /// Passing `left` bytes of entry data and padding; the first `capture` of
    /// them are kept (a PAX header's records).
    Data { left: u64, capture: usize },
    /// Collecting a GNU sparse extension block; `data` follows the last one.
    SparseExt { data: u64 },
    /// After the end-of-archive block: nothing more is structure.
    End,
}

/// A reader that enforces [`Limits`] on the tar stream it passes through.
#[derive(Debug)]
pub struct TarGuard<R> {
    inner: R,
    limits: Limits,
    totals: Totals,
    state: State,
    block: [u8; BLOCK],
    filled: usize,
    /// A PAX header's records while they stream by.
    pax: Vec<u8>,
    /// The `size` a PAX header gave the next entry.
    pax_size: Option<u64>,
}

impl<R: Read> TarGuard<R> {
    /// Guards `inner`, counting on from `totals` (the image's earlier layers).
    pub fn new(inner: R, limits: Limits, totals: Totals) -> Self {
        Self {
            inner,
            limits,
            totals,
            state: State::Header,
            block: [0; BLOCK],
            filled: 0,
            pax: Vec::new(),
            pax_size: None,
        }
    }

    /// The totals so far (for the next layer).
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Follows the structure over `data`, which is about to be handed on.
    fn inspect(&mut self, mut data: &[u8]) -> Result<(), LimitError> {
        self.totals.bytes = self.totals.bytes.saturating_add(data.len() as u64);
        if self.totals.bytes > self.limits.max_bytes {
            return Err(LimitError::TooLarge {
                limit: self.limits.max_bytes,
            });
        }
        while !data.is_empty() {
            match self.state {
                State::End => return Ok(()),
                State::Header | State::SparseExt { .. } => {
                    let n = (BLOCK - self.filled).min(data.len());
                    self.block[self.filled..self.filled + n].copy_from_slice(&data[..n]);
                    self.filled += n;
                    data = &data[n..];
                    if self.filled == BLOCK {
                        self.filled = 0;
                        self.state = match self.state {
                            State::SparseExt { data } => self.after_sparse_ext(data),
                            _ => self.after_header()?,
                        };
                    }
                }
                State::Data { left, capture } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    let keep = capture.min(n);
                    if keep > 0 {
                        self.pax.extend_from_slice(&data[..keep]);
                    }
                    data = &data[n..];
                    let left = left - n as u64;
                    let capture = capture - keep;
                    self.state = if left == 0 {
                        if !self.pax.is_empty() {
                            self.pax_size = pax_size(&self.pax);
                            self.pax = Vec::new();
                        }
                        State::Header
                    } else {
                        State::Data { left, capture }
                    };
                }
            }
        }
        Ok(())
    }

    /// A whole header block is in `self.block`: what follows it.
    fn after_header(&mut self) -> Result<State, LimitError> {
        let h = &self.block;
        if h.iter().all(|&b| b == 0) {
            // The end-of-archive marker: the tar crate stops here too.
            return Ok(State::End);
        }
        let header_size = parse_size(&h[124..136]).ok_or(LimitError::BadSize)?;
        let typeflag = h[156];
        // An extension header by its type: the crate never applies a PAX size
        // to one.
        let extension_type = matches!(typeflag, b'L' | b'K' | b'x' | b'g');
        let size = match self.pax_size {
            Some(s) if !extension_type => s,
            _ => header_size,
        };
        // The crate consumes L, K and x as extensions of the next member only
        // in a ustar or GNU header; otherwise they are members themselves.
        let recognized = &h[257..263] == b"ustar\0" && &h[263..265] == b"00"
            || &h[257..263] == b"ustar " && &h[263..265] == b" \0";
        let kind = match typeflag {
            b'L' if recognized => Some("GNU long name"),
            b'K' if recognized => Some("GNU long link"),
            b'x' if recognized => Some("PAX extended"),
            _ => None,
        };
        if let Some(kind) = kind {
            if size > self.limits.max_meta_entry {
                return Err(LimitError::MetaEntryTooLarge {
                    kind,
                    size,
                    limit: self.limits.max_meta_entry,
                });
            }
            // size <= max_meta_entry, which a usize holds on every host we build.
            let capture = if typeflag == b'x' {
                usize::try_from(size).unwrap_or(0)
            } else {
                0
            };
            return Ok(data_state(size, capture));
        }
        // The member the extensions described: they end with it.
        self.pax_size = None;
        if typeflag == b'g' {
            // A PAX global header: the crate hands it on as a member, the
            // flattener skips it without counting it; its records are not
            // kept (no size of them applies to anything).
            if size > self.limits.max_meta_entry {
                return Err(LimitError::MetaEntryTooLarge {
                    kind: "PAX global",
                    size,
                    limit: self.limits.max_meta_entry,
                });
            }
            return Ok(data_state(size, 0));
        }
        self.totals.entries += 1;
        if self.totals.entries > self.limits.max_entries {
            return Err(LimitError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        // GNU sparse: `isextended` says extension blocks come before the data.
        if typeflag == b'S' && h[482] != 0 {
            return Ok(State::SparseExt { data: size });
        }
        Ok(data_state(size, 0))
    }

    /// A GNU sparse extension block is in `self.block`: another, or the data.
    fn after_sparse_ext(&self, data: u64) -> State {
        if self.block[504] != 0 {
            State::SparseExt { data }
        } else {
            data_state(data, 0)
        }
    }
}

/// The data of an entry of `size` bytes, padded to whole blocks.
fn data_state(size: u64, capture: usize) -> State {
    let padded = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
    if padded == 0 {
        State::Header
    } else {
        State::Data {
            left: padded,
            capture,
        }
    }
}

/// A header's size field as the tar crate reads it: GNU base-256 when the top
/// bit is set (the last 8 bytes, big-endian, higher bytes shifted out), else
/// octal text up to the first NUL, trimmed of whitespace, with `u64`'s own
/// parsing (a leading `+` allowed); `None` where the crate fails too.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field.first()? & 0x80 != 0 {
        let skip = if field.len() == 8 { 1 } else { field.len() - 8 };
        let mut v: u64 = if field.len() == 8 {
            u64::from(field[0] ^ 0x80)
        } else {
            0
        };
        for &b in &field[skip..] {
            v = (v << 8) | u64::from(b);
        }
        return Some(v);
    }
    let text = match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    };
    u64::from_str_radix(std::str::from_utf8(text).ok()?.trim(), 8).ok()
}

/// The `size` record of PAX extended-header records as the tar crate finds
/// it: the first `size` record, and none once a record before it is
/// malformed.
fn pax_size(records: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(records) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.inspect(&buf[..n]).map_err(io::Error::other)?;
        Ok(n)
    }
}

/// The [`LimitError`] inside `e`, if a [`TarGuard`] raised it.
pub fn limit_error(e: &io::Error) -> Option<&LimitError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<LimitError>())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A header block of `kind` declaring `size` bytes.
    fn header(name: &str, kind: u8, size: u64) -> [u8; BLOCK] {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        *h.as_bytes()
    }

    /// `head` then `tail_zeros` zero bytes, made as they are read (nothing big
    /// is ever held); counts what was read.
    struct Synth {
        head: Vec<u8>,
        pos: usize,
        tail_zeros: u64,
        read: u64,
    }

    impl Read for Synth {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = if self.pos < self.head.len() {
                let n = (self.head.len() - self.pos).min(buf.len());
                buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
                self.pos += n;
                n
            } else {
                let n = usize::try_from(self.tail_zeros)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                buf[..n].fill(0);
                self.tail_zeros -= n as u64;
                n
            };
            self.read += n as u64;
            Ok(n)
        }
    }

    fn entries_of<R: Read>(r: R) -> io::Result<usize> {
        let mut a = tar::Archive::new(r);
        let mut n = 0;
        for e in a.entries()? {
            let mut e = e?;
            io::copy(&mut e, &mut io::sink())?;
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn huge_gnu_long_name_is_refused_at_its_header() {
        let mut synth = Synth {
            head: header("././@LongLink", b'L', 512 << 20).to_vec(),
            pos: 0,
            tail_zeros: 512 << 20,
            read: 0,
        };
        let guard = TarGuard::new(&mut synth, Limits::default(), Totals::default());
        let e = entries_of(guard).unwrap_err();
        assert_eq!(
            limit_error(&e),
            Some(&LimitError::MetaEntryTooLarge {
                kind: "GNU long name",
                size: 512 << 20,
                limit: 1 << 20
            }),
            "{e}"
        );
        assert!(
            synth.read < 64 << 10,
            "read {} bytes before refusing",
            synth.read
        );
    }

    #[test]
    fn huge_pax_header_is_refused() {
        let mut synth = Synth {
            head: header("PaxHeaders/x", b'x', 100 << 20).to_vec(),
            pos: 0,
            tail_zeros: 100 << 20,
            read: 0,
        };
        let e = entries_of(TarGuard::new(
            &mut synth,
            Limits::default(),
            Totals::default(),
        ))
        .unwrap_err();
        assert!(matches!(
            limit_error(&e),
            Some(LimitError::MetaEntryTooLarge {
                kind: "PAX extended",
                ..
            })
        ));
    }

    /// A real archive with a long name, a PAX header (with a size record for
    /// the next entry), a sparse-less regular file and a directory.
    fn real_archive(entries: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            let data = vec![b'x'; i % 700];
            h.set_size(data.len() as u64);
            let long = format!("{}/{i}", "d".repeat(300));
            b.append_data(&mut h, &long, &data[..]).unwrap();
        }
        b.append_pax_extensions([("size", b"5".as_slice()), ("uid", b"7".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0); // the PAX size (5) wins
        h.set_path("paxsized").unwrap();
        h.set_cksum();
        b.append(&h, &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn real_archives_pass_unchanged_and_are_counted() {
        let tar = real_archive(40);
        let mut guard = TarGuard::new(&tar[..], Limits::default(), Totals::default());
        let mut out = Vec::new();
        guard.read_to_end(&mut out).unwrap();
        assert_eq!(out, tar);
        assert_eq!(guard.totals().entries, 41);
        assert_eq!(guard.totals().bytes, tar.len() as u64);
        // Through the tar crate: every entry, the PAX-sized one with its 5 bytes.
        let n = entries_of(TarGuard::new(
            &tar[..],
            Limits::default(),
            Totals::default(),
        ));
        assert_eq!(n.unwrap(), 41);
    }

    #[test]
    fn entry_count_is_bounded_over_layers() {
        let limits = Limits {
            max_entries: 50,
            ..Limits::default()
        };
        let tar = real_archive(30);
        let mut first = TarGuard::new(&tar[..], limits, Totals::default());
        io::copy(&mut first, &mut io::sink()).unwrap();
        let e = entries_of(TarGuard::new(&tar[..], limits, first.totals())).unwrap_err();
        assert_eq!(
            limit_error(&e),
            Some(&LimitError::TooManyEntries { limit: 50 })
        );
    }

    #[test]
    fn uncompressed_bytes_are_bounded() {
        let limits = Limits {
            max_bytes: 10_000,
            ..Limits::default()
        };
        let tar = real_archive(40);
        let e = entries_of(TarGuard::new(&tar[..], limits, Totals::default())).unwrap_err();
        assert_eq!(
            limit_error(&e),
            Some(&LimitError::TooLarge { limit: 10_000 })
        );
    }

    #[test]
    fn size_fields_parse_as_the_tar_crate_parses_them() {
        assert_eq!(parse_size(b"00000001750\0"), Some(1000));
        assert_eq!(parse_size(b"     1750 \0\0"), Some(1000));
        let mut b = [0u8; 12];
        b[0] = 0x80;
        b[11] = 1;
        b[10] = 2;
        assert_eq!(parse_size(&b), Some(0x201));
        assert_eq!(parse_size(b"0000000009\0\0"), None);
        // Each field against the crate's own reading of it.
        let fields: [&[u8; 12]; 10] = [
            b"\0\0\0\0\0\0\0\0\0\0\0\0",
            b"+0000000017\0",
            b"\t17\n\0\0\0\0\0\0\0\0",
            b"17 17\0\0\0\0\0\0\0",
            b"0000000017\0x",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07",
            b"\x81\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07",
            b"77777777777\0",
            b"-1\0\0\0\0\0\0\0\0\0\0",
        ];
        for f in fields {
            let mut h = tar::Header::new_gnu();
            h.as_mut_bytes()[124..136].copy_from_slice(f);
            assert_eq!(parse_size(f), h.entry_size().ok(), "{f:?}");
        }
    }

    /// Whether the guard and the tar crate count the same members in `tar`
    /// (the crate's count, or its error).
    fn same_count_as_the_crate(tar: &[u8]) -> (u64, Result<usize, String>) {
        let limits = Limits {
            max_entries: 1_000,
            ..Limits::default()
        };
        let mut g = TarGuard::new(tar, limits, Totals::default());
        let _ = io::copy(&mut g, &mut io::sink());
        let mut a = tar::Archive::new(tar);
        let crate_count = a.entries().map_err(|e| e.to_string()).and_then(|es| {
            let mut n = 0;
            for e in es {
                let mut e = e.map_err(|e| e.to_string())?;
                if e.header().entry_type().as_byte() != b'g' {
                    n += 1;
                }
                io::copy(&mut e, &mut io::sink()).map_err(|e| e.to_string())?;
            }
            Ok(n)
        });
        (g.totals().entries, crate_count)
    }

    /// One PAX record, its length prefix counting itself.
    fn pax_record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}")
    }

    /// Blocks of a member: its header, then `data` padded.
    fn member(out: &mut Vec<u8>, name: &str, kind: u8, data: &[u8], magic_ok: bool) {
        let mut h = header(name, kind, data.len() as u64);
        if !magic_ok {
            h[257..265].fill(0);
            let mut hh = tar::Header::from_byte_slice(&h).clone();
            hh.set_cksum();
            h = *hh.as_bytes();
        }
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }

    #[test]
    fn crafted_archives_are_counted_as_the_crate_reads_them() {
        let hidden = {
            // Ten members inside what a reader that disagreed would take for data.
            let mut v = Vec::new();
            for i in 0..10 {
                member(&mut v, &format!("h{i}"), b'0', b"x", true);
            }
            v
        };
        // A PAX header with two size records: the crate takes the first.
        let mut a = Vec::new();
        let recs = pax_record("size", "0") + &pax_record("size", &hidden.len().to_string());
        member(&mut a, "pax", b'x', recs.as_bytes(), true);
        member(&mut a, "f", b'0', b"", true);
        a.extend_from_slice(&hidden);
        // A long-name type without a ustar/GNU magic: a member of its own.
        let mut b = Vec::new();
        member(&mut b, "plain-L", b'L', b"name", false);
        b.extend_from_slice(&hidden);
        // A PAX size, then a global header: the size is not the global's,
        // and ends with it.
        let mut c = Vec::new();
        let size = pax_record("size", &hidden.len().to_string());
        member(&mut c, "pax", b'x', size.as_bytes(), true);
        member(&mut c, "global", b'g', b"", true);
        c.extend_from_slice(&hidden);
        for (what, tar) in [
            ("two size records", a),
            ("L without magic", b),
            ("x then g", c),
        ] {
            let mut tar = tar;
            tar.extend_from_slice(&[0u8; 2 * BLOCK]);
            let (guard, crate_count) = same_count_as_the_crate(&tar);
            assert_eq!(Ok(guard as usize), crate_count, "{what}");
        }
    }
}
