//! Entry names: normalisation, and quoting of image-supplied text before it
//! reaches an error message or a log line.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io;
use std::os::unix::ffi::OsStrExt;

use super::{MAX_NAME_BYTES, MAX_PATH_DEPTH};
use crate::Error;

/// Bytes of an image-supplied value shown in a message; the rest is cut.
pub(super) const MAX_SHOWN_BYTES: usize = 256;

/// Characters of a tar parser message kept in a [`Error::CorruptLayer`].
const MAX_MESSAGE_CHARS: usize = 512;

/// Split a tar entry name into normal components, rejecting absolute paths,
/// `..`, components longer than [`MAX_NAME_BYTES`] and more than
/// [`MAX_PATH_DEPTH`] components. `shown` is the name as quoted by [`quote`].
pub(super) fn normalize(raw: &[u8], shown: &str) -> Result<Vec<OsString>, Error> {
    if raw.first() == Some(&b'/') {
        return Err(Error::PathEscape {
            path: shown.to_string(),
            reason: "absolute paths are not allowed in a layer".into(),
        });
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::PathEscape {
                    path: shown.to_string(),
                    reason: "'..' path components are not allowed in a layer".into(),
                })
            }
            c => {
                if c.len() > MAX_NAME_BYTES {
                    return Err(too_long(
                        shown,
                        "the length in bytes of one of its path components",
                        MAX_NAME_BYTES,
                    ));
                }
                if out.len() == MAX_PATH_DEPTH {
                    return Err(too_long(
                        shown,
                        "its number of path components",
                        MAX_PATH_DEPTH,
                    ));
                }
                out.push(OsStr::from_bytes(c).to_os_string());
            }
        }
    }
    Ok(out)
}

pub(super) fn too_long(shown: &str, what: &'static str, limit: usize) -> Error {
    Error::PathTooLong {
        path: shown.to_string(),
        what,
        limit: u64::try_from(limit).unwrap_or(u64::MAX),
    }
}

/// Quote image-supplied bytes for a message: in double quotes, with control
/// and other unprintable characters escaped as `str::escape_debug` does,
/// invalid UTF-8 as `\xNN`, and anything past [`MAX_SHOWN_BYTES`] cut (the
/// full length is noted).
pub(crate) fn quote(raw: &[u8]) -> String {
    let head = &raw[..raw.len().min(MAX_SHOWN_BYTES)];
    let mut out = String::with_capacity(head.len() + 2);
    out.push('"');
    escape_into(&mut out, head, true);
    out.push('"');
    if head.len() < raw.len() {
        let _ = write!(out, "... ({} bytes in all)", raw.len());
    }
    out
}

/// Escape unprintable characters (and, when `quotes`, double quotes) of
/// `raw` onto `out`.
fn escape_into(out: &mut String, raw: &[u8], quotes: bool) {
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\'' => out.push(c),
                '"' if !quotes => out.push(c),
                c => out.extend(c.escape_debug()),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// Make a parser's message safe to show: the tar crate's messages quote
/// header fields and entry names verbatim. Unprintable characters are
/// escaped and the message is cut after [`MAX_MESSAGE_CHARS`] characters.
fn sanitize(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(MAX_MESSAGE_CHARS));
    let mut cut = false;
    for (n, c) in msg.chars().enumerate() {
        if n == MAX_MESSAGE_CHARS {
            cut = true;
            break;
        }
        let mut buf = [0u8; 4];
        escape_into(&mut out, c.encode_utf8(&mut buf).as_bytes(), false);
    }
    if cut {
        out.push_str("...");
    }
    out
}

/// An [`Error::CorruptLayer`] for a failure reading or parsing the layer
/// stream. The crate's own errors passed through a reader (e.g. a failed
/// decryption check) are kept as they are; any other message is sanitized,
/// since it may quote bytes of the layer.
pub(super) fn corrupt(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        return Error::CorruptLayer { source: e };
    }
    Error::CorruptLayer {
        source: io::Error::new(e.kind(), sanitize(&e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_and_cuts() {
        assert_eq!(quote(b"usr/bin/env"), r#""usr/bin/env""#);
        assert_eq!(quote("café/it's".as_bytes()), r#""café/it's""#);
        assert_eq!(quote(b"a\x1b[2J\n\"b\xff\\"), r#""a\u{1b}[2J\n\"b\xff\\""#);
        // Bidirectional overrides and zero-width characters are escaped too.
        assert_eq!(
            quote("x\u{202e}y\u{200b}".as_bytes()),
            r#""x\u{202e}y\u{200b}""#
        );
        let long = quote(&[b'a'; 5000]);
        assert!(long.len() < MAX_SHOWN_BYTES + 40, "{long}");
        assert!(long.ends_with("... (5000 bytes in all)"), "{long}");
    }

    #[test]
    fn corrupt_sanitizes_foreign_messages_only() {
        let e = corrupt(io::Error::other(
            "field \u{1b}]0;pwned\u{7} was not a number",
        ));
        let msg = e.to_string();
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
        assert!(msg.contains(r"\u{1b}]0;pwned\u{7}"), "{msg}");
        let long = corrupt(io::Error::other("x".repeat(100_000))).to_string();
        assert!(long.len() < MAX_MESSAGE_CHARS + 100, "{}", long.len());
        // The crate's own errors pass unchanged (and stay downcastable).
        let own = Error::InvalidKey {
            reason: "wrong key".into(),
        };
        let e = corrupt(io::Error::other(own));
        let Error::CorruptLayer { source } = e else {
            panic!("not CorruptLayer")
        };
        assert!(source.get_ref().is_some_and(|i| i.is::<Error>()));
    }
}
