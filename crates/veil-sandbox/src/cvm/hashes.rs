//! The kernel/initrd/cmdline hashes table of measured direct boot.
//!
//! With `-kernel` and `kernel-hashes=on`, QEMU hashes the kernel, the initrd and the command
//! line with SHA-256 and writes a GUID-tagged table of the three into the page OVMF reserves
//! for it (the firmware's `SNP_KERNEL_HASHES` section, at the address its footer table names).
//! That page is measured, so the launch measurement covers exactly what QEMU will boot, and
//! OVMF (`BlobVerifierLibSevHashes`) refuses blobs whose hashes differ from the table.
//!
//! Layout (packed, little-endian; `target/i386/sev.c` in QEMU):
//!
//! ```text
//! table:  guid[16]  length:u16 (= 168, the table without padding)
//!         cmdline entry, initrd entry, kernel entry — each: guid[16] length:u16 (= 50) sha256[32]
//!         zero padding to a multiple of 16 bytes (176 in all)
//! ```

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

use super::ovmf::{guid, PAGE_SIZE};

/// `9438d606-4f22-4cc9-b479-a793d411fd21`: the table's header.
const TABLE_GUID: [u8; 16] = guid(
    0x9438_d606,
    0x4f22,
    0x4cc9,
    [0xb4, 0x79, 0xa7, 0x93, 0xd4, 0x11, 0xfd, 0x21],
);
/// `4de79437-abd2-427f-b835-d5b172d2045b`: the kernel's entry.
const KERNEL_GUID: [u8; 16] = guid(
    0x4de7_9437,
    0xabd2,
    0x427f,
    [0xb8, 0x35, 0xd5, 0xb1, 0x72, 0xd2, 0x04, 0x5b],
);
/// `44baf731-3a2f-4bd7-9af1-41e29169781d`: the initrd's entry.
const INITRD_GUID: [u8; 16] = guid(
    0x44ba_f731,
    0x3a2f,
    0x4bd7,
    [0x9a, 0xf1, 0x41, 0xe2, 0x91, 0x69, 0x78, 0x1d],
);
/// `97d02dd8-bd20-4c94-aa78-e7714d36ab2a`: the command line's entry.
const CMDLINE_GUID: [u8; 16] = guid(
    0x97d0_2dd8,
    0xbd20,
    0x4c94,
    [0xaa, 0x78, 0xe7, 0x71, 0x4d, 0x36, 0xab, 0x2a],
);

/// One entry: GUID, `u16` length, SHA-256.
const ENTRY_LEN: usize = 16 + 2 + 32;
/// The table without padding: header GUID, `u16` length, three entries.
const TABLE_LEN: usize = 16 + 2 + 3 * ENTRY_LEN;
/// The table as written, padded to 16 bytes.
pub const PADDED_TABLE_LEN: usize = TABLE_LEN.div_ceil(16) * 16;

/// Errors hashing the boot blobs.
#[derive(Debug, thiserror::Error)]
pub enum HashesError {
    /// A kernel or initrd file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The table does not fit in its page at the offset the firmware names.
    #[error("the hashes table does not fit at offset {0:#x} of its page")]
    Offset(usize),
}

/// SHA-256 digests of what QEMU boots directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelHashes {
    /// Of the kernel file.
    pub kernel: [u8; 32],
    /// Of the initrd file (of no bytes without an initrd).
    pub initrd: [u8; 32],
    /// Of the command line with its terminating NUL (just the NUL without `-append`).
    pub cmdline: [u8; 32],
}

impl KernelHashes {
    /// Hashes the kernel and initrd files (streamed, not read into memory) and the command
    /// line, as QEMU does for `-kernel`, `-initrd` and `-append`.
    pub fn from_files(
        kernel: &Path,
        initrd: Option<&Path>,
        append: Option<&str>,
    ) -> Result<Self, HashesError> {
        Ok(KernelHashes {
            kernel: sha256_file(kernel)?,
            initrd: match initrd {
                Some(path) => sha256_file(path)?,
                None => Sha256::digest([]).into(),
            },
            cmdline: cmdline_hash(append),
        })
    }

    /// Hashes blobs already in memory.
    pub fn from_bytes(kernel: &[u8], initrd: &[u8], append: Option<&str>) -> Self {
        KernelHashes {
            kernel: Sha256::digest(kernel).into(),
            initrd: Sha256::digest(initrd).into(),
            cmdline: cmdline_hash(append),
        }
    }

    /// The table as QEMU writes it (padding included).
    pub fn table(&self) -> [u8; PADDED_TABLE_LEN] {
        let mut t = [0u8; PADDED_TABLE_LEN];
        t[..16].copy_from_slice(&TABLE_GUID);
        t[16..18].copy_from_slice(&(TABLE_LEN as u16).to_le_bytes());
        let entries = [
            (CMDLINE_GUID, &self.cmdline),
            (INITRD_GUID, &self.initrd),
            (KERNEL_GUID, &self.kernel),
        ];
        for (i, (guid, hash)) in entries.iter().enumerate() {
            let at = 18 + i * ENTRY_LEN;
            t[at..at + 16].copy_from_slice(guid);
            t[at + 16..at + 18].copy_from_slice(&(ENTRY_LEN as u16).to_le_bytes());
            t[at + 18..at + ENTRY_LEN].copy_from_slice(*hash);
        }
        t
    }

    /// The page that is measured: zeros with the table at `offset` (the hashes table's
    /// address within its page).
    pub fn page(&self, offset: usize) -> Result<Vec<u8>, HashesError> {
        if offset + PADDED_TABLE_LEN > PAGE_SIZE {
            return Err(HashesError::Offset(offset));
        }
        let mut page = vec![0u8; PAGE_SIZE];
        page[offset..offset + PADDED_TABLE_LEN].copy_from_slice(&self.table());
        Ok(page)
    }
}

fn cmdline_hash(append: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(append.unwrap_or("").as_bytes());
    h.update([0u8]);
    h.finalize().into()
}

fn sha256_file(path: &Path) -> Result<[u8; 32], HashesError> {
    let err = |source| HashesError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout() {
        assert_eq!(TABLE_LEN, 168);
        assert_eq!(PADDED_TABLE_LEN, 176);
        let h = KernelHashes::from_bytes(b"kernel", b"", Some("console=ttyS0"));
        let t = h.table();
        assert_eq!(&t[..16], &TABLE_GUID);
        assert_eq!(&t[16..18], &[168, 0]);
        // cmdline first, then initrd, then kernel, each with length 50.
        assert_eq!(&t[18..34], &CMDLINE_GUID);
        assert_eq!(&t[34..36], &[50, 0]);
        assert_eq!(&t[36..68], &Sha256::digest(b"console=ttyS0\0")[..]);
        assert_eq!(&t[68..84], &INITRD_GUID);
        assert_eq!(&t[86..118], &Sha256::digest(b"")[..]);
        assert_eq!(&t[118..134], &KERNEL_GUID);
        assert_eq!(&t[136..168], &Sha256::digest(b"kernel")[..]);
        assert_eq!(&t[168..], &[0u8; 8]);
    }

    #[test]
    fn no_append_hashes_the_nul() {
        let h = KernelHashes::from_bytes(b"k", b"i", None);
        assert_eq!(&h.cmdline[..], &Sha256::digest(b"\0")[..]);
    }

    #[test]
    fn page_places_the_table() {
        let h = KernelHashes::from_bytes(b"k", b"i", None);
        let page = h.page(0xc00).expect("page");
        assert_eq!(page.len(), PAGE_SIZE);
        assert!(page[..0xc00].iter().all(|&b| b == 0));
        assert_eq!(&page[0xc00..0xc00 + PADDED_TABLE_LEN], &h.table()[..]);
        assert!(page[0xc00 + PADDED_TABLE_LEN..].iter().all(|&b| b == 0));
        assert!(h.page(PAGE_SIZE - 100).is_err());
    }

    #[test]
    fn files_hash_like_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("k");
        let initrd = dir.path().join("i");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&kernel, &big).expect("write");
        std::fs::write(&initrd, b"initrd").expect("write");
        let from_files =
            KernelHashes::from_files(&kernel, Some(&initrd), Some("a b")).expect("hash");
        assert_eq!(
            from_files,
            KernelHashes::from_bytes(&big, b"initrd", Some("a b"))
        );
        let err = KernelHashes::from_files(&dir.path().join("missing"), None, None)
            .expect_err("missing kernel");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
