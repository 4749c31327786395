//! A bound on the tar extension headers the `tar` crate reads into memory.
//!
//! The crate reads a GNU long name (`L`) or long link name (`K`) member and
//! a PAX extended header (`x`) whole into a `Vec` before it yields the entry
//! they describe, whatever size its header claims; it has no limit of its
//! own. [`HeaderGuard`] sits between the decompressor and the parser, follows
//! the archive's framing, and looks at every header block before the parser
//! gets it: if the extension headers of one entry (`L`, `K`, `x`, and a PAX
//! global header `g`) would hold more than [`MAX_EXTENSION_HEADER_BYTES`], it
//! fails the read, so not one byte of them is read.
//!
//! The framing inside a run of extension headers follows from their own
//! header's size field (the crate applies no PAX size to them). Where an
//! entry's data ends is learnt from the parser itself when it yields the
//! entry ([`Framing::entry_started`]), so a PAX `size` record or a GNU sparse
//! file's extension blocks cannot make the guard and the parser disagree;
//! the positions they report are checked against the guard's at each entry.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use tar::{EntryType, Header};

use super::names::corrupt;
use super::MAX_EXTENSION_HEADER_BYTES;
use crate::Error;

const BLOCK: u64 = 512;

/// State shared by the [`HeaderGuard`] (inside the tar parser) and the
/// unpacker loop.
#[derive(Debug)]
pub(super) struct Framing {
    /// Bytes handed to the parser so far.
    pos: Cell<u64>,
    /// Where the next header block starts, while known.
    next_header: Cell<Option<u64>>,
    /// Where the header of the entry the parser is about to yield starts.
    entry_header: Cell<Option<u64>>,
    /// Extension-header bytes claimed so far for the coming entry.
    extension_bytes: Cell<u64>,
    /// The header that crossed the bound, and the bytes it brought them to.
    refused: Cell<Option<(&'static str, u64)>>,
}

impl Framing {
    pub(super) fn new() -> Rc<Self> {
        Rc::new(Framing {
            pos: Cell::new(0),
            next_header: Cell::new(Some(0)),
            entry_header: Cell::new(None),
            extension_bytes: Cell::new(0),
            refused: Cell::new(None),
        })
    }

    /// The error for a failure of the tar parser: the refusal if the guard
    /// refused an extension header, else the (sanitized) parser error.
    pub(super) fn error(&self, e: io::Error) -> Error {
        match self.refused.get() {
            Some((kind, size)) => Error::ExtensionHeaderTooLarge {
                kind,
                size,
                limit: MAX_EXTENSION_HEADER_BYTES,
            },
            None => corrupt(e),
        }
    }

    /// Learn where `entry`'s data ends, from the parser. Must be called for
    /// every entry the parser yields, before any of its data is read.
    pub(super) fn entry_started<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), Error> {
        let lost = || Error::CorruptLayer {
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "the tar stream's framing could not be followed",
            ),
        };
        if self.entry_header.take() != Some(entry.raw_header_position()) {
            return Err(lost());
        }
        let pos = self.pos.get();
        let size = if entry.header().entry_type().is_gnu_sparse() {
            // The parser reports the expanded size; the archive holds the
            // size in the header (or a PAX record), after the header's sparse
            // extension blocks, which it has already read (so `pos` is past
            // them).
            match pax_size(entry) {
                Some(size) => size,
                None => entry.header().entry_size().map_err(corrupt)?,
            }
        } else {
            if entry.raw_file_position() != pos {
                return Err(lost());
            }
            entry.size()
        };
        let next = padded(size)
            .and_then(|s| pos.checked_add(s))
            .ok_or_else(lost)?;
        self.next_header.set(Some(next));
        Ok(())
    }

    /// Look at the header block at `at` before the parser reads it.
    fn inspect(&self, block: &[u8; BLOCK as usize], at: u64) -> io::Result<()> {
        // Unless the guard can follow the framing past this block, it looks
        // at nothing more: the parser fails on a block the guard cannot read,
        // and an all-zero block ends the archive.
        self.next_header.set(None);
        if block.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let header = Header::from_byte_slice(block);
        let sum = block[..148]
            .iter()
            .chain(&block[156..])
            .fold(0u32, |a, &b| a + u32::from(b))
            + 8 * 32;
        if header.cksum().ok() != Some(sum) {
            return Ok(());
        }
        let Ok(size) = header.entry_size() else {
            return Ok(());
        };
        let kind = header.entry_type();
        let extension = match kind {
            EntryType::GNULongName => Some("GNU long name"),
            EntryType::GNULongLink => Some("GNU long link name"),
            EntryType::XHeader => Some("PAX extended"),
            EntryType::XGlobalHeader => Some("PAX global extended"),
            _ => None,
        };
        if let Some(name) = extension {
            let total = self.extension_bytes.get().saturating_add(size);
            if total > MAX_EXTENSION_HEADER_BYTES {
                self.refused.set(Some((name, total)));
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "tar extension header too large",
                ));
            }
            self.extension_bytes.set(total);
        }
        // The parser reads these three whole and goes on to the next header
        // (only in GNU or ustar headers, as it does); anything else is an
        // entry it yields.
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        if recognized
            && matches!(
                kind,
                EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader
            )
        {
            let next = padded(size).and_then(|s| at.checked_add(BLOCK)?.checked_add(s));
            self.next_header.set(next);
        } else {
            self.extension_bytes.set(0);
            self.entry_header.set(Some(at));
        }
        Ok(())
    }
}

/// `size` rounded up to whole blocks.
fn padded(size: u64) -> Option<u64> {
    Some(size.checked_add(BLOCK - 1)? & !(BLOCK - 1))
}

/// The PAX `size` record of `entry`'s extensions as the tar crate reads it
/// (the first `size` key; nothing if a record before it or its value is
/// malformed).
fn pax_size<R: Read>(entry: &mut tar::Entry<'_, R>) -> Option<u64> {
    let exts = entry.pax_extensions().ok()??;
    for ext in exts {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

/// The reader the tar parser reads through; see the module documentation.
pub(super) struct HeaderGuard<R> {
    inner: R,
    framing: Rc<Framing>,
    /// A header block read ahead to be inspected, and how much of it has
    /// been handed on.
    block: [u8; BLOCK as usize],
    filled: usize,
    served: usize,
}

impl<R: Read> HeaderGuard<R> {
    pub(super) fn new(inner: R, framing: Rc<Framing>) -> Self {
        HeaderGuard {
            inner,
            framing,
            block: [0; BLOCK as usize],
            filled: 0,
            served: 0,
        }
    }

    /// Read a whole block (less only at the end of the stream).
    fn fill_block(&mut self) -> io::Result<()> {
        self.filled = 0;
        self.served = 0;
        while self.filled < self.block.len() {
            match self.inner.read(&mut self.block[self.filled..]) {
                Ok(0) => break,
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn advance(&self, n: usize) {
        let pos = &self.framing.pos;
        pos.set(pos.get().saturating_add(n as u64));
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.served == self.filled {
            let pos = self.framing.pos.get();
            let room = match self.framing.next_header.get() {
                Some(at) if at == pos => {
                    self.fill_block()?;
                    if self.filled == self.block.len() {
                        self.framing.inspect(&self.block, at)?;
                    } else {
                        self.framing.next_header.set(None);
                    }
                    None
                }
                Some(at) => Some(at.saturating_sub(pos)),
                None => Some(u64::MAX),
            };
            if let Some(room) = room {
                let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..len])?;
                self.advance(n);
                return Ok(n);
            }
        }
        let n = buf.len().min(self.filled - self.served);
        buf[..n].copy_from_slice(&self.block[self.served..self.served + n]);
        self.served += n;
        self.advance(n);
        Ok(n)
    }
}
