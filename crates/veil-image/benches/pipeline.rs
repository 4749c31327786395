//! Throughput of the confidential layer pipeline against the physical limits of its parts, on
//! one 100 MiB layer (gzip-compressed tar of compressible data), all in one run:
//!
//! * `aes_ctr_hmac`      — decrypting the encrypted blob alone (AES-256-CTR + HMAC-SHA256),
//! * `gunzip`            — decompressing the plain blob alone,
//! * `plain_unpack`      — decompress + untar of the plain layer (what a non-confidential pull does),
//! * `confidential_unpack` — decrypt + decompress + untar of the encrypted layer.
//!
//! `cargo bench -p veil-image --bench pipeline`. Throughput is per uncompressed tar byte.
//! Set `VEIL_BENCH_MIB` to change the layer size.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::{Read, Write};
use veil_image::build::Blob;
use veil_image::crypt::{self, PrivateKey};
use veil_image::manifest::{Compression, OCI_LAYER_TAR_GZIP};
use veil_image::unpack::{unpack_layer, UnpackOptions};

fn make_tar(total: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(total + (1 << 20)));
    // Text-like, compressible content (about 3-4x with gzip), in 8 MiB files.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let words = [
        "veil ",
        "sandbox ",
        "layer ",
        "function ",
        "attest ",
        "digest ",
        "node ",
        "key ",
    ];
    let mut written = 0;
    let mut n = 0;
    while written < total {
        let size = (total - written).min(8 << 20);
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            data.extend_from_slice(words[(seed % 8) as usize].as_bytes());
            if seed.is_multiple_of(13) {
                data.extend_from_slice(&seed.to_le_bytes());
            }
        }
        data.truncate(size);
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, format!("data/file{n}"), &data[..])
            .expect("tar");
        written += size;
        n += 1;
    }
    b.into_inner().expect("tar")
}

fn bench(c: &mut Criterion) {
    let mib: usize = std::env::var("VEIL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let tar = make_tar(mib << 20);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let key = PrivateKey::generate_p256();
    let blob = Blob::new(OCI_LAYER_TAR_GZIP, gz.clone());
    let (enc, desc) = crypt::encrypt_layer(&blob, &[key.public_key()]).expect("encrypt");
    let layer_key = crypt::unwrap_layer_key(&desc, std::slice::from_ref(&key)).expect("unwrap");
    let opts = UnpackOptions::default();

    let mut g = c.benchmark_group("layer_pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("aes_ctr_hmac", |b| {
        b.iter(|| {
            let mut r = layer_key.decrypt(&enc[..]);
            std::io::copy(&mut r, &mut std::io::sink()).expect("decrypt");
        })
    });
    g.bench_function("gunzip", |b| {
        b.iter(|| {
            let mut r = flate2::read::MultiGzDecoder::new(&gz[..]);
            let mut buf = vec![0u8; 1 << 16];
            while r.read(&mut buf).expect("gunzip") > 0 {}
        })
    });
    g.bench_function("plain_unpack", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            unpack_layer(&gz[..], Compression::Gzip, dir.path(), &opts).expect("unpack");
        })
    });
    g.bench_function("confidential_unpack", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let r = layer_key.decrypt(&enc[..]);
            unpack_layer(r, Compression::Gzip, dir.path(), &opts).expect("unpack");
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
