//! Rootfs conversion throughput: generated layer tars (230+ MiB of file data,
//! thousands of small files, a few big ones, whiteouts in an upper layer) into
//! an EROFS image, median of 5, against the raw write speed of the same number
//! of bytes (buffered 1 MiB writes + fsync) in the same directory in the same run.
//!
//! `cargo bench -p image --bench rootfs`; `ROOTFS_BENCH_DIR` picks the disk
//! (default: the system temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::erofs::build_rootfs;
use image::flatten::{Compression, Layer};
use image::tar_guard::Limits;

const MIB: f64 = 1024.0 * 1024.0;
const RUNS: usize = 5;

struct Gen(u64);

impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

fn add(b: &mut tar::Builder<std::io::BufWriter<std::fs::File>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn make_layers(dir: &Path) -> (Vec<Layer>, u64) {
    let mut g = Gen(0x1234_5678_9abc_def1);
    let mut big = vec![0u8; 8 << 20];
    let mut small = vec![0u8; 16 << 10];
    let mut layers = Vec::new();
    let mut total = 0u64;
    for (n, (bigs, smalls)) in [(20usize, 6000usize), (3, 1500)].into_iter().enumerate() {
        let path = dir.join(format!("layer{n}.tar"));
        let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut b = tar::Builder::new(file);
        for i in 0..bigs {
            g.fill(&mut big);
            add(&mut b, &format!("opt/big/blob-{n}-{i}"), &big);
        }
        for i in 0..smalls {
            let len = 1000 + (i * 7919) % (15 << 10);
            g.fill(&mut small[..len]);
            add(
                &mut b,
                &format!("usr/share/d{}/f-{n}-{i}", i % 100),
                &small[..len],
            );
        }
        if n == 1 {
            for i in 0..500 {
                add(&mut b, &format!("usr/share/d{}/.wh.f-0-{i}", i % 100), b"");
            }
        }
        b.into_inner().unwrap().flush().unwrap();
        total += std::fs::metadata(&path).unwrap().len();
        layers.push(Layer {
            path,
            compression: Compression::None,
        });
    }
    (layers, total)
}

fn raw_write(path: &Path, bytes: u64) -> Duration {
    let mut buf = vec![0u8; 1 << 20];
    Gen(7).fill(&mut buf);
    let start = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    let t = start.elapsed();
    std::fs::remove_file(path).unwrap();
    t
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let base: PathBuf = std::env::var_os("ROOTFS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).unwrap();
    let (layers, tar_bytes) = make_layers(dir.path());
    let out = dir.path().join("rootfs.erofs");

    let mut conv = Vec::new();
    let mut raw = Vec::new();
    let mut stats = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        let s = build_rootfs(&layers, &out, Limits::default()).unwrap();
        conv.push(start.elapsed());
        std::fs::remove_file(&out).unwrap();
        raw.push(raw_write(&dir.path().join("raw"), s.image_bytes));
        stats = Some(s);
    }
    let s = stats.unwrap();
    let (cm, cmin, cmax) = median(conv);
    let (rm, rmin, rmax) = median(raw);
    let img = s.image_bytes as f64 / MIB;
    let rate = |d: Duration| img / d.as_secs_f64();
    println!(
        "rootfs: {} layers, {:.1} MiB of tar, {} inodes, {:.1} MiB of file data, image {:.1} MiB ({:.1} MiB dead data of removed files)",
        layers.len(),
        tar_bytes as f64 / MIB,
        s.inodes,
        s.file_bytes as f64 / MIB,
        img,
        s.dead_bytes as f64 / MIB,
    );
    println!(
        "conversion (tar -> EROFS + fsync): median {:.0} ms = {:.0} MiB/s of image (min {:.0} ms, max {:.0} ms, {RUNS} runs)",
        cm.as_secs_f64() * 1e3,
        rate(cm),
        cmin.as_secs_f64() * 1e3,
        cmax.as_secs_f64() * 1e3,
    );
    println!(
        "raw write of the same bytes (1 MiB writes + fsync): median {:.0} ms = {:.0} MiB/s (min {:.0} ms, max {:.0} ms)",
        rm.as_secs_f64() * 1e3,
        rate(rm),
        rmin.as_secs_f64() * 1e3,
        rmax.as_secs_f64() * 1e3,
    );
    println!("ratio conversion / raw write: {:.2}", rate(cm) / rate(rm));

    // The same layers gzipped, as registries serve them: one run, to show what
    // inflate costs on top (CPU-bound, one thread per layer stream).
    let gz: Vec<Layer> = layers
        .iter()
        .map(|l| {
            let path = l.path.with_extension("tar.gz");
            let mut e = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(std::fs::File::create(&path).unwrap()),
                flate2::Compression::fast(),
            );
            std::io::copy(&mut std::fs::File::open(&l.path).unwrap(), &mut e).unwrap();
            e.finish().unwrap().flush().unwrap();
            Layer {
                path,
                compression: Compression::Gzip,
            }
        })
        .collect();
    let start = Instant::now();
    build_rootfs(&gz, &out, Limits::default()).unwrap();
    let t = start.elapsed();
    println!(
        "gzip layers (1 run): {:.0} ms = {:.0} MiB/s of image",
        t.as_secs_f64() * 1e3,
        rate(t)
    );
}
