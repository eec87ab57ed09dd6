//! The 37-byte UUID strings stored in LSMT headers.
//!
//! overlaybd stores a layer's uuid and its parent's uuid as NUL-terminated
//! strings in the canonical 8-4-4-4-12 form, upper-case hex. A null uuid is
//! written as all zeros ("00000000-0000-0000-0000-000000000000").

use crate::error::{Error, Result};

/// A 128-bit uuid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

/// Length of the on-disk string field, including the terminating NUL.
pub const UUID_STRING_LEN: usize = 37;

impl Uuid {
    /// The all-zero uuid.
    pub const NIL: Uuid = Uuid([0; 16]);

    /// Whether this is the all-zero uuid.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parse the canonical textual form (either case).
    pub fn parse(s: &str) -> Result<Uuid> {
        let bad = || {
            Error::Invalid(format!(
                "invalid uuid '{s}': expected 8-4-4-4-12 hexadecimal digits"
            ))
        };
        let b = s.as_bytes();
        if b.len() != 36 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        let mut n = 0;
        let mut i = 0;
        while i < 36 {
            if matches!(i, 8 | 13 | 18 | 23) {
                if b[i] != b'-' {
                    return Err(bad());
                }
                i += 1;
                continue;
            }
            let hi = hexval(b[i]).ok_or_else(bad)?;
            let lo = hexval(b[i + 1]).ok_or_else(bad)?;
            out[n] = hi << 4 | lo;
            n += 1;
            i += 2;
        }
        Ok(Uuid(out))
    }

    /// Parse the on-disk NUL-terminated field. Returns `None` for an empty
    /// or unparsable field (older tools leave garbage there).
    pub fn from_field(field: &[u8]) -> Option<Uuid> {
        let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
        std::str::from_utf8(&field[..end])
            .ok()
            .and_then(|s| Uuid::parse(s).ok())
    }

    /// The 37-byte on-disk field.
    pub fn to_field(&self) -> [u8; UUID_STRING_LEN] {
        let mut f = [0u8; UUID_STRING_LEN];
        f[..36].copy_from_slice(self.to_string().as_bytes());
        f
    }

    /// The uuid overlaybd's convertor derives from a chain id: the first
    /// 32 hex digits of the sha256 chain id, formatted 8-4-4-4-12.
    pub fn from_chain_id(chain_id: &str) -> Result<Uuid> {
        let hex = chain_id.strip_prefix("sha256:").unwrap_or(chain_id);
        if hex.len() < 32 || !hex.bytes().take(32).all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "invalid chain id '{chain_id}': expected sha256:<64 hex digits>"
            )));
        }
        let h = &hex[..32];
        Uuid::parse(&format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Display for Uuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Uuid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_uppercase() {
        let u = Uuid::parse("6d5b0bd2-0000-4000-8000-000000000001").unwrap();
        assert_eq!(u.to_string(), "6D5B0BD2-0000-4000-8000-000000000001");
        let f = u.to_field();
        assert_eq!(f[36], 0);
        assert_eq!(Uuid::from_field(&f), Some(u));
        assert_eq!(
            Uuid::NIL.to_string(),
            "00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn rejects_bad_forms() {
        for s in [
            "",
            "6d5b0bd2-0000-4000-8000-00000000000",
            "6d5b0bd2x0000-4000-8000-000000000001",
            "gd5b0bd2-0000-4000-8000-000000000001",
        ] {
            assert!(Uuid::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn chain_id_uuid() {
        let u = Uuid::from_chain_id(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        assert_eq!(u.to_string(), "01234567-89AB-CDEF-0123-456789ABCDEF");
        assert!(Uuid::from_chain_id("sha256:xyz").is_err());
    }
}
