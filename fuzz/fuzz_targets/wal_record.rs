//! The write-ahead log's record decoder (`capstan_wal`): what the
//! coordinator reads back from `state.redb.wal` at start, whatever the file
//! holds (torn writes, another generation's leftovers, a damaged disk).
//!
//! Input: a mode byte, then bytes. Mode even: the bytes are a log file, read
//! record after record as `Wal::open` does. Mode odd: the bytes are a
//! record's payload, framed with a valid header and CRC so the decoder
//! behind the CRC is reached.
//!
//! Invariants: no panic; a record read is within the bytes, and encoding
//! its ops again gives the same bytes.
#![no_main]

use capstan_wal::fuzzing::{encode, read_record};
use libfuzzer_sys::fuzz_target;

const MAGIC: &[u8; 4] = b"CWAL";
const ID: u64 = 0x5eed;
const GENERATION: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        read_file(bytes);
    } else {
        let record = framed(bytes, u64::from(mode >> 1) % 4);
        if let Some((_, len)) = read_record(&record, ID, GENERATION, u64::from(mode >> 1) % 4) {
            assert_eq!(len, record.len());
        }
        read_file(&record);
    }
});

/// Every record from the start, in sequence, as `Wal::open` reads them.
fn read_file(bytes: &[u8]) {
    let mut offset = 0;
    let mut sequence = 0;
    while let Some((ops, len)) = read_record(&bytes[offset..], ID, GENERATION, sequence) {
        assert!(len > 0 && offset + len <= bytes.len());
        let again = encode(ID, GENERATION, sequence, &ops).expect("it was decoded, so it fits");
        assert_eq!(
            again,
            &bytes[offset..offset + len],
            "decode then encode differs"
        );
        offset += len;
        sequence += 1;
    }
}

/// `payload` as record `sequence` of the log: magic, length, ids, CRC.
fn framed(payload: &[u8], sequence: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(36 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&ID.to_le_bytes());
    out.extend_from_slice(&GENERATION.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[4..32]);
    hasher.update(&out[36..]);
    let crc = hasher.finalize();
    out[32..36].copy_from_slice(&crc.to_le_bytes());
    out
}
