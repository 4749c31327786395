//! Content digests (`sha256:<64 lowercase hex>`), hashing and verification.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::Error;

const PREFIX: &str = "sha256:";

/// A content digest of the form `sha256:<64 lowercase hex>`.
///
/// Only sha256 is supported. Parsing via [`FromStr`] validates the text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The 64 lowercase hex characters after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// The full digest string, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new();
        h.update(bytes);
        h.finish()
    }

    fn from_hash(out: &[u8]) -> Digest {
        Digest(format!("{PREFIX}{}", hex::encode(out)))
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| Error::InvalidDigest {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(err(
                "expected the form sha256:<64 lowercase hex characters>",
            ));
        };
        if algo != "sha256" {
            return Err(err("only the sha256 algorithm is supported"));
        }
        if hex.len() != 64 {
            return Err(err("a sha256 digest must have exactly 64 hex characters"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err(
                "the hex part must contain only lowercase hex characters (0-9, a-f)",
            ));
        }
        Ok(Digest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 hasher producing a [`Digest`].
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Hasher(Sha256::new())
    }

    /// Feed more bytes.
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        Digest::from_hash(&self.0.finalize())
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`Read`] adapter that hashes and counts every byte read through it.
///
/// Read the stream to EOF, then call [`VerifyingReader::verify`].
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Hasher,
    bytes: u64,
}

impl<R: Read> VerifyingReader<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> Self {
        VerifyingReader {
            inner,
            hasher: Hasher::new(),
            bytes: 0,
        }
    }

    /// Number of bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Digest of the bytes read so far.
    pub fn digest(&self) -> Digest {
        self.hasher.clone().finish()
    }

    /// Check the bytes read so far against `expected` (and `expected_size`
    /// if given). Call after reading to EOF.
    ///
    /// The size is checked first, so a truncated stream reports
    /// [`Error::SizeMismatch`]; otherwise a different hash reports
    /// [`Error::DigestMismatch`].
    pub fn verify(&self, expected: &Digest, expected_size: Option<u64>) -> Result<(), Error> {
        if let Some(size) = expected_size {
            if size != self.bytes {
                return Err(Error::SizeMismatch {
                    expected: size,
                    actual: self.bytes,
                });
            }
        }
        let actual = self.digest();
        if &actual != expected {
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Unwrap the inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R> fmt::Debug for VerifyingReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingReader")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sha256_of_empty() {
        assert_eq!(Digest::sha256(b"").as_str(), EMPTY);
        assert_eq!(Hasher::new().finish().as_str(), EMPTY);
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.to_string(), EMPTY);
    }

    #[test]
    fn parse_rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha512:abcd",
            "sha256:abc",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "md5:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            let e = bad.parse::<Digest>().unwrap_err();
            assert!(matches!(e, Error::InvalidDigest { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let d = Digest::sha256(b"x");
        let j = serde_json::to_string(&d).unwrap();
        assert_eq!(j, format!("\"{d}\""));
        let back: Digest = serde_json::from_str(&j).unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
    }

    #[test]
    fn verifying_reader() {
        let data = b"hello world".repeat(1000);
        let mut r = VerifyingReader::new(&data[..]);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        assert_eq!(r.bytes_read(), data.len() as u64);
        let d = Digest::sha256(&data);
        r.verify(&d, Some(data.len() as u64)).unwrap();
        r.verify(&d, None).unwrap();
        let other = Digest::sha256(b"other");
        assert!(matches!(
            r.verify(&other, None),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(matches!(
            r.verify(&d, Some(1)),
            Err(Error::SizeMismatch { expected: 1, .. })
        ));
    }
}
