//! What an SEV-SNP launch needs to know about an OVMF image: where it sits in guest memory,
//! the GUID-tagged table in its last bytes (the "footer table" that OVMF's reset vector code
//! builds, `OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm`), and the SEV metadata that table
//! points at (`OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm`): the guest pages the hypervisor
//! must pre-validate as zero pages, the SNP secrets page, the CPUID page and the page that
//! holds the kernel/initrd/cmdline hashes.
//!
//! The firmware is mapped so that it ends at 4 GiB (QEMU's `-bios`), so the image's last byte
//! is at guest physical address `0xffff_ffff`.
//!
//! The parser treats the file as untrusted bytes: every offset and length is checked against
//! the image, and a malformed table is an error, never a panic.

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

/// The firmware image ends at this guest physical address (exclusive).
const FOUR_GIB: u64 = 1 << 32;

/// The footer table's last entry header starts this many bytes before the image's end (the
/// last 32 bytes hold the reset vector and padding).
const FOOTER_TAIL: usize = 32;

/// An entry header: a little-endian `u16` length (of the whole entry, header included) and a
/// GUID.
const ENTRY_HEADER: usize = 2 + 16;

/// Converts a GUID in its usual textual parts into EFI's byte order (the first three fields
/// little-endian, the last eight bytes as written).
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// `96b582de-1fb2-45f7-baea-a366c55a082d`: the footer entry that spans the whole table.
const TABLE_FOOTER_GUID: [u8; 16] = guid(
    0x96b5_82de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
/// `00f771de-1a7e-4fcb-890e-68c77e2fb44e`: the SEV-ES AP reset block (first `u32`: the reset
/// address application processors start at).
const SEV_ES_RESET_BLOCK_GUID: [u8; 16] = guid(
    0x00f7_71de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
/// `7255371f-3a3b-4b04-927b-1da6efa8d454`: where QEMU writes the hashes table (`u32` GPA,
/// `u32` size).
const SEV_HASH_TABLE_RV_GUID: [u8; 16] = guid(
    0x7255_371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);
/// `dc886566-984a-4798-a75e-5585a7bf67cc`: the SEV metadata (`u32`: its offset from the
/// image's end).
const SEV_METADATA_GUID: [u8; 16] = guid(
    0xdc88_6566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);
/// `e47a6535-984a-4798-865e-4685a7bf8ec2`: the TDX metadata of a TDVF-capable OVMF.
const TDX_METADATA_GUID: [u8; 16] = guid(
    0xe47a_6535,
    0x984a,
    0x4798,
    [0x86, 0x5e, 0x46, 0x85, 0xa7, 0xbf, 0x8e, 0xc2],
);

/// Errors reading an OVMF image.
#[derive(Debug, thiserror::Error)]
pub enum OvmfError {
    /// The image is empty, larger than 4 GiB or not a whole number of pages.
    #[error("firmware image of {0} bytes is not a whole number of 4 KiB pages up to 4 GiB")]
    Size(usize),
    /// An entry of the footer table has a length that does not fit.
    #[error("firmware footer table entry at offset {offset:#x} has an invalid length {len}")]
    TableEntry {
        /// Where the entry's header starts in the image.
        offset: usize,
        /// The length it claims.
        len: usize,
    },
    /// An entry of the footer table is too short for the value it must hold.
    #[error("firmware footer table entry {0} is too short")]
    ShortEntry(&'static str),
    /// The SEV metadata is out of the image or malformed.
    #[error("firmware SEV metadata is malformed: {0}")]
    Metadata(&'static str),
    /// A metadata section has a type this code does not know.
    #[error("firmware SEV metadata section at {gpa:#x} has unknown type {kind:#x}")]
    SectionType {
        /// The section's guest physical address.
        gpa: u32,
        /// Its type.
        kind: u32,
    },
}

/// The kind of an SEV metadata section, as OVMF declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Memory OVMF's SEC phase uses; pre-validated as zero pages.
    SecMemory,
    /// The SNP secrets page (filled by the AMD secure processor).
    Secrets,
    /// The CPUID page (filled by the hypervisor, checked by the firmware of the secure
    /// processor).
    Cpuid,
    /// The SVSM calling area (zero pages).
    SvsmCallingArea,
    /// The page that receives QEMU's kernel/initrd/cmdline hashes table.
    KernelHashes,
}

impl SectionKind {
    fn from_raw(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => Self::SecMemory,
            2 => Self::Secrets,
            3 => Self::Cpuid,
            4 => Self::SvsmCallingArea,
            0x10 => Self::KernelHashes,
            _ => return None,
        })
    }
}

/// One SEV metadata section: a range of guest memory with a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// Guest physical address.
    pub gpa: u32,
    /// Length in bytes.
    pub size: u32,
    /// Its role.
    pub kind: SectionKind,
}

/// A footer table entry: its GUID and where its payload is in the image.
type TableEntry = ([u8; 16], std::ops::Range<usize>);

/// A parsed OVMF image.
#[derive(Debug, Clone)]
pub struct Ovmf {
    data: Vec<u8>,
    table: Vec<TableEntry>,
    sections: Vec<Section>,
}

impl Ovmf {
    /// Parses an image (the whole `-bios` file).
    pub fn parse(data: Vec<u8>) -> Result<Self, OvmfError> {
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) || data.len() as u64 > FOUR_GIB
        {
            return Err(OvmfError::Size(data.len()));
        }
        let table = footer_table(&data)?;
        let mut ovmf = Ovmf {
            data,
            table,
            sections: Vec::new(),
        };
        ovmf.sections = ovmf.parse_metadata()?;
        Ok(ovmf)
    }

    /// The image's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Guest physical address of the image's first byte.
    pub fn gpa(&self) -> u64 {
        FOUR_GIB - self.data.len() as u64
    }

    /// The SEV metadata sections, in the order the image lists them (the order they are
    /// measured in).
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// Whether the image has a section of this kind.
    pub fn has_section(&self, kind: SectionKind) -> bool {
        self.sections.iter().any(|s| s.kind == kind)
    }

    /// The address application processors start at under SEV-ES/SNP (from the SEV-ES reset
    /// block), if the image has one.
    pub fn sev_es_reset_eip(&self) -> Result<Option<u32>, OvmfError> {
        self.entry_u32(&SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block")
    }

    /// The guest physical address QEMU writes the hashes table to, if the image names one.
    pub fn hashes_table_gpa(&self) -> Result<Option<u32>, OvmfError> {
        self.entry_u32(&SEV_HASH_TABLE_RV_GUID, "SEV hash table")
    }

    /// Whether the image carries TDX metadata (it is a TDVF).
    pub fn has_tdx_metadata(&self) -> bool {
        self.entry(&TDX_METADATA_GUID).is_some()
    }

    fn entry(&self, guid: &[u8; 16]) -> Option<&[u8]> {
        self.table
            .iter()
            .find(|(g, _)| g == guid)
            .map(|(_, range)| &self.data[range.clone()])
    }

    fn entry_u32(&self, guid: &[u8; 16], name: &'static str) -> Result<Option<u32>, OvmfError> {
        match self.entry(guid) {
            None => Ok(None),
            Some(bytes) => le_u32(bytes, 0)
                .map(Some)
                .ok_or(OvmfError::ShortEntry(name)),
        }
    }

    fn parse_metadata(&self) -> Result<Vec<Section>, OvmfError> {
        let Some(offset) = self.entry_u32(&SEV_METADATA_GUID, "SEV metadata")? else {
            return Ok(Vec::new());
        };
        let start = self
            .data
            .len()
            .checked_sub(offset as usize)
            .ok_or(OvmfError::Metadata("offset beyond the image"))?;
        let header = self
            .data
            .get(start..start + 16)
            .ok_or(OvmfError::Metadata("header beyond the image"))?;
        if &header[..4] != b"ASEV" {
            return Err(OvmfError::Metadata("signature is not ASEV"));
        }
        let size = le_u32(header, 4).unwrap_or(0) as usize;
        let version = le_u32(header, 8).unwrap_or(0);
        let count = le_u32(header, 12).unwrap_or(0) as usize;
        if version != 1 {
            return Err(OvmfError::Metadata("version is not 1"));
        }
        let items = size
            .checked_sub(16)
            .and_then(|len| self.data.get(start + 16..start + 16 + len))
            .ok_or(OvmfError::Metadata("length beyond the image"))?;
        if count.checked_mul(12).is_none_or(|need| need > items.len()) {
            return Err(OvmfError::Metadata("more sections than its length holds"));
        }
        items
            .chunks_exact(12)
            .take(count)
            .map(|item| {
                let gpa = le_u32(item, 0).unwrap_or(0);
                let size = le_u32(item, 4).unwrap_or(0);
                let raw = le_u32(item, 8).unwrap_or(0);
                let kind =
                    SectionKind::from_raw(raw).ok_or(OvmfError::SectionType { gpa, kind: raw })?;
                Ok(Section { gpa, size, kind })
            })
            .collect()
    }
}

/// Reads the GUID-tagged table that ends 32 bytes before the image's end. An image without
/// the footer GUID has no table (it is not an error: such firmware simply has no SEV
/// support); a table whose entries do not fit is.
fn footer_table(data: &[u8]) -> Result<Vec<TableEntry>, OvmfError> {
    let Some(footer_at) = data.len().checked_sub(FOOTER_TAIL + ENTRY_HEADER) else {
        return Ok(Vec::new());
    };
    let (footer_len, footer_guid) = entry_header(data, footer_at);
    if footer_guid != TABLE_FOOTER_GUID {
        return Ok(Vec::new());
    }
    let Some(table_len) = footer_len.checked_sub(ENTRY_HEADER) else {
        return Ok(Vec::new());
    };
    let table_start = footer_at
        .checked_sub(table_len)
        .ok_or(OvmfError::TableEntry {
            offset: footer_at,
            len: footer_len,
        })?;
    let mut entries = Vec::new();
    // Entries are read backwards: each one's header sits at its end.
    let mut end = footer_at;
    while end - table_start >= ENTRY_HEADER {
        let header_at = end - ENTRY_HEADER;
        let (len, guid) = entry_header(data, header_at);
        if len < ENTRY_HEADER || len > end - table_start {
            return Err(OvmfError::TableEntry {
                offset: header_at,
                len,
            });
        }
        let start = end - len;
        entries.push((guid, start..header_at));
        end = start;
    }
    Ok(entries)
}

/// The `(length, guid)` header at `at`; the caller guarantees 18 bytes are there.
fn entry_header(data: &[u8], at: usize) -> (usize, [u8; 16]) {
    let len = u16::from_le_bytes([data[at], data[at + 1]]) as usize;
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&data[at + 2..at + ENTRY_HEADER]);
    (len, guid)
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Builds a small OVMF-shaped image for tests: `pages` pages, a footer table with the given
/// entries (GUID, payload) and, when `sections` is given, SEV metadata holding them.
#[cfg(test)]
pub(crate) fn synthetic_image(
    pages: usize,
    entries: &[([u8; 16], Vec<u8>)],
    sections: Option<&[(u32, u32, u32)]>,
) -> Vec<u8> {
    let mut data = vec![0u8; pages * PAGE_SIZE];
    // Give the pages distinct contents so that the measurement covers them visibly.
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / PAGE_SIZE) as u8 ^ (i as u8).wrapping_mul(31);
    }
    let mut entries = entries.to_vec();
    if let Some(sections) = sections {
        // Metadata in the first page: header + items.
        let mut meta = b"ASEV".to_vec();
        meta.extend_from_slice(&(16 + 12 * sections.len() as u32).to_le_bytes());
        meta.extend_from_slice(&1u32.to_le_bytes());
        meta.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        for (gpa, size, kind) in sections {
            meta.extend_from_slice(&gpa.to_le_bytes());
            meta.extend_from_slice(&size.to_le_bytes());
            meta.extend_from_slice(&kind.to_le_bytes());
        }
        data[..meta.len()].copy_from_slice(&meta);
        let from_end = data.len() as u32;
        entries.push((SEV_METADATA_GUID, from_end.to_le_bytes().to_vec()));
    }
    let mut table = Vec::new();
    for (guid, payload) in &entries {
        table.extend_from_slice(payload);
        table.extend_from_slice(&((payload.len() + ENTRY_HEADER) as u16).to_le_bytes());
        table.extend_from_slice(guid);
    }
    table.extend_from_slice(&((table.len() + ENTRY_HEADER) as u16).to_le_bytes());
    table.extend_from_slice(&TABLE_FOOTER_GUID);
    let end = data.len() - FOOTER_TAIL;
    data[end - table.len()..end].copy_from_slice(&table);
    data
}

#[cfg(test)]
pub(crate) const TEST_RESET_BLOCK_GUID: [u8; 16] = SEV_ES_RESET_BLOCK_GUID;
#[cfg(test)]
pub(crate) const TEST_HASH_TABLE_GUID: [u8; 16] = SEV_HASH_TABLE_RV_GUID;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_byte_order_is_efi() {
        // The footer GUID as it appears in every OVMF image.
        assert_eq!(
            TABLE_FOOTER_GUID,
            [
                0xde, 0x82, 0xb5, 0x96, 0xb2, 0x1f, 0xf7, 0x45, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a,
                0x08, 0x2d
            ]
        );
    }

    #[test]
    fn parses_entries_and_sections() {
        let image = synthetic_image(
            16,
            &[
                (
                    SEV_ES_RESET_BLOCK_GUID,
                    0xffff_b004u32.to_le_bytes().to_vec(),
                ),
                (SEV_HASH_TABLE_RV_GUID, {
                    let mut v = 0xffff_0c00u32.to_le_bytes().to_vec();
                    v.extend_from_slice(&0x400u32.to_le_bytes());
                    v
                }),
            ],
            Some(&[
                (0x80_0000, 0x9000, 1),
                (0x80_d000, 0x1000, 2),
                (0x80_e000, 0x1000, 0x10),
            ]),
        );
        let ovmf = Ovmf::parse(image).expect("parse");
        assert_eq!(ovmf.gpa(), 0xffff_0000);
        assert_eq!(ovmf.sev_es_reset_eip().expect("eip"), Some(0xffff_b004));
        assert_eq!(ovmf.hashes_table_gpa().expect("gpa"), Some(0xffff_0c00));
        assert!(!ovmf.has_tdx_metadata());
        assert_eq!(
            ovmf.sections(),
            &[
                Section {
                    gpa: 0x80_0000,
                    size: 0x9000,
                    kind: SectionKind::SecMemory
                },
                Section {
                    gpa: 0x80_d000,
                    size: 0x1000,
                    kind: SectionKind::Secrets
                },
                Section {
                    gpa: 0x80_e000,
                    size: 0x1000,
                    kind: SectionKind::KernelHashes
                },
            ]
        );
    }

    #[test]
    fn image_without_footer_has_no_table() {
        let ovmf = Ovmf::parse(vec![0u8; 2 * PAGE_SIZE]).expect("parse");
        assert!(ovmf.sections().is_empty());
        assert_eq!(ovmf.sev_es_reset_eip().expect("eip"), None);
    }

    /// Each malformed image and the error it must give.
    #[test]
    fn malformed_images_are_errors() {
        fn check(image: Vec<u8>, expect: &str) {
            let err = Ovmf::parse(image).expect_err("must fail").to_string();
            assert!(err.contains(expect), "{err:?} does not contain {expect:?}");
        }
        let good = synthetic_image(4, &[], Some(&[(0x1000, 0x1000, 1)]));
        let footer_at = good.len() - FOOTER_TAIL - ENTRY_HEADER;
        let meta_entry_at = footer_at - ENTRY_HEADER;

        check(vec![], "0 bytes");
        check(vec![0; PAGE_SIZE + 1], "4097 bytes");

        let mut image = good.clone();
        image[footer_at..footer_at + 2].copy_from_slice(&0xffffu16.to_le_bytes());
        check(image, "invalid length 65535");

        let mut image = good.clone();
        image[meta_entry_at..meta_entry_at + 2].copy_from_slice(&3u16.to_le_bytes());
        check(image, "invalid length 3");

        let mut image = good.clone();
        image[meta_entry_at..meta_entry_at + 2].copy_from_slice(&19u16.to_le_bytes());
        check(image, "too short");

        let mut image = good.clone();
        image[0] = b'X';
        check(image, "signature");

        let mut image = good.clone();
        image[8] = 2;
        check(image, "version");

        let mut image = good.clone();
        image[12..16].copy_from_slice(&1000u32.to_le_bytes());
        check(image, "more sections");

        let mut image = good.clone();
        image[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        check(image, "length beyond");

        let mut image = good.clone();
        image[16 + 8..16 + 12].copy_from_slice(&7u32.to_le_bytes());
        check(image, "unknown type 0x7");

        let mut image = good;
        let payload_at = meta_entry_at - 4;
        image[payload_at..payload_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        check(image, "offset beyond");
    }
}
