//! The agent protocol's streaming decoder fed hostile bytes in arbitrary chunks.
//!
//! The first byte picks the chunk size, so frame headers and payloads are
//! split at every possible place. Checked: no panic, a poisoned decoder stays
//! poisoned, every message that decodes re-encodes to a frame that decodes to
//! the same message, and no frame exceeds the payload cap.
#![no_main]

use agent_protocol::{encode_frame, FrameDecoder, FrameError, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut dec = FrameDecoder::new();
    let mut failed = false;
    for piece in bytes.chunks(chunk) {
        let mut input = piece;
        loop {
            match dec.decode(&mut input) {
                Ok(Some(raw)) => {
                    assert!(!failed, "decoder produced a frame after an error");
                    assert!(raw.payload.len() <= MAX_PAYLOAD as usize);
                    if let Ok(frame) = raw.to_frame() {
                        let mut wire = Vec::new();
                        encode_frame(frame.stream, &frame.message, &mut wire)
                            .expect("a decoded message re-encodes within the cap");
                        let mut again = FrameDecoder::new();
                        let mut w = wire.as_slice();
                        let back = again
                            .decode(&mut w)
                            .expect("re-encoded frame decodes")
                            .expect("re-encoded frame is complete");
                        assert!(w.is_empty());
                        assert_eq!(back.to_frame().expect("same message"), frame);
                    }
                }
                Ok(None) => break,
                Err(FrameError::Poisoned) => {
                    assert!(failed, "poisoned without an earlier error");
                    break;
                }
                Err(_) => {
                    assert!(!failed, "second distinct error after poisoning");
                    failed = true;
                    break;
                }
            }
        }
    }
});
