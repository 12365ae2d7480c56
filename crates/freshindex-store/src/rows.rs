//! The encoding of lineage records shared by the backends: one record per item holding all
//! its tracked rows (one write per item instead of one per row).

use crate::{Result, StoreError, TrackedRow};
use freshindex_core::Fingerprint;

/// A fingerprint column (`None` stays `None`; a value of the wrong length is corrupt data).
pub(crate) fn fp_from(col: Option<Vec<u8>>) -> Result<Option<Fingerprint>> {
    match col {
        None => Ok(None),
        Some(b) => Fingerprint::from_slice(&b)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt(format!("fingerprint of {} bytes", b.len()))),
    }
}

/// Encodes an item's tracked rows: per row, the key length (u16 LE) and bytes, the 32-byte row
/// fingerprint, a flag byte and, when the flag is 1, the 32-byte memo key.
pub(crate) fn encode_rows(rows: &[TrackedRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 100);
    for r in rows {
        let key = r.row_key.as_bytes();
        let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&key[..len as usize]);
        out.extend_from_slice(&r.row_fp.0);
        match &r.memo_key {
            Some(m) => {
                out.push(1);
                out.extend_from_slice(&m.0);
            }
            None => out.push(0),
        }
    }
    out
}

/// Walks an encoded row list, handing each row's parts to `visit`.
fn walk_rows(mut b: &[u8], mut visit: impl FnMut(&[u8], &[u8], Option<&[u8]>)) -> Result<()> {
    let corrupt = || StoreError::Corrupt("tracked rows record is truncated".into());
    while !b.is_empty() {
        let len = u16::from_le_bytes([b[0], *b.get(1).ok_or_else(corrupt)?]) as usize;
        let key = b.get(2..2 + len).ok_or_else(corrupt)?;
        let fp = b.get(2 + len..34 + len).ok_or_else(corrupt)?;
        let flag = *b.get(34 + len).ok_or_else(corrupt)?;
        let (memo, used) = if flag == 1 {
            (
                Some(b.get(35 + len..67 + len).ok_or_else(corrupt)?),
                67 + len,
            )
        } else {
            (None, 35 + len)
        };
        visit(key, fp, memo);
        b = &b[used..];
    }
    Ok(())
}

pub(crate) fn decode_rows(b: &[u8]) -> Result<Vec<TrackedRow>> {
    let mut out = Vec::new();
    let mut bad_key = false;
    walk_rows(b, |key, fp, memo| match std::str::from_utf8(key) {
        Ok(k) => out.push(TrackedRow {
            row_key: k.to_string(),
            row_fp: Fingerprint::from_slice(fp).unwrap_or(Fingerprint([0; 32])),
            memo_key: memo.and_then(Fingerprint::from_slice),
        }),
        Err(_) => bad_key = true,
    })?;
    if bad_key {
        return Err(StoreError::Corrupt("tracked row key is not UTF-8".into()));
    }
    Ok(out)
}

pub(crate) fn for_each_memo_key(b: &[u8], mut visit: impl FnMut(Fingerprint)) -> Result<()> {
    walk_rows(b, |_, _, memo| {
        if let Some(m) = memo.and_then(Fingerprint::from_slice) {
            visit(m);
        }
    })
}
