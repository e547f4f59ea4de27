//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not a
//! stable API): the replication source's pgoutput decoder and transaction
//! assembler on arbitrary bytes, with no database client built.

#[cfg(not(feature = "replication"))]
#[allow(dead_code)]
#[path = "replication/pgoutput.rs"]
mod pgoutput;

#[cfg(not(feature = "replication"))]
#[allow(dead_code)]
#[path = "replication/assembler.rs"]
mod assembler;

#[cfg(feature = "replication")]
use crate::replication::{assembler, pgoutput};

/// Reads `data` as a stream of pgoutput messages, each behind a 2-byte
/// big-endian length, decodes each and assembles them into transactions as
/// the replication source does (an undecodable message marks its transaction
/// unreadable). Must never panic, whatever the bytes; returns how many
/// transactions were assembled.
pub fn pgoutput_stream(data: &[u8]) -> usize {
    let mut assembler = assembler::Assembler::new("fuzz", 64);
    let mut committed = 0;
    // One copy of the whole input; each message is a view of it, as each
    // message the source receives is a view of what the connection read.
    let data = bytes::Bytes::copy_from_slice(data);
    let mut rest = &data[..];
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (message, after) = tail.split_at(len);
        rest = after;
        match pgoutput::decode(&data.slice_ref(message)) {
            Ok(msg) => {
                if let Ok(Some(_)) = assembler.apply(msg) {
                    committed += 1;
                }
            }
            Err(e) => {
                assembler.unreadable(e.to_string());
            }
        }
    }
    committed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_begin_and_its_commit_assemble_one_transaction() {
        let mut stream = Vec::new();
        let begin = [&b"B"[..], &[0; 8], &[0; 8], &[0, 0, 0, 7]].concat();
        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&[0; 7]);
        commit.push(16); // commit LSN 16
        commit.extend_from_slice(&[0; 7]);
        commit.push(24); // end LSN 24
        commit.extend_from_slice(&[0; 8]);
        for m in [&begin, &commit] {
            stream.extend_from_slice(&u16::try_from(m.len()).unwrap().to_be_bytes());
            stream.extend_from_slice(m);
        }
        assert_eq!(pgoutput_stream(&stream), 1);
        assert_eq!(pgoutput_stream(&[0xff; 64]), 0);
        assert_eq!(pgoutput_stream(&[]), 0);
    }
}
