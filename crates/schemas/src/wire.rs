//! The Confluent wire format: magic byte 0, the schema id as 4 big-endian bytes, the Avro body.
//! Any Kafka tool that knows a schema registry reads Sluice's topics through it.

use crate::{Error, Result};

/// First byte of every framed value.
pub const MAGIC: u8 = 0;
/// Bytes before the Avro body.
pub const HEADER_LEN: usize = 5;

/// Frames an Avro body written with schema `schema_id`.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits a framed value into its schema id and Avro body.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8])> {
    match bytes {
        [MAGIC, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [] => Err(Error::Wire("empty message".into())),
        [MAGIC, ..] => Err(Error::Wire(format!(
            "{} bytes is shorter than the 5-byte header",
            bytes.len()
        ))),
        [other, ..] => Err(Error::Wire(format!(
            "magic byte is {other:#04x}, expected 0x00 (not in the Confluent wire format)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_is_magic_then_big_endian_id() {
        assert_eq!(frame(0x0102_0304, &[9]), vec![0, 1, 2, 3, 4, 9]);
    }

    #[test]
    fn bad_frames_are_rejected_with_a_reason() {
        assert!(unframe(&[]).unwrap_err().to_string().contains("empty"));
        assert!(
            unframe(&[0, 0, 1])
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
        assert!(
            unframe(b"{\"json\":1}")
                .unwrap_err()
                .to_string()
                .contains("magic byte is 0x7b")
        );
    }

    proptest! {
        #[test]
        fn frame_round_trips(id in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let framed = frame(id, &body);
            let (got_id, got_body) = unframe(&framed).unwrap();
            prop_assert_eq!(got_id, id);
            prop_assert_eq!(got_body, &body[..]);
        }
    }
}
