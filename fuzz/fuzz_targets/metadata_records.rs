//! Decoders of metadata read back from disk or the object store, on arbitrary bytes: the
//! block map's keys and values and the other RocksDB records (`snapshotter`), the JSON
//! volume / timeline / checkpoint records, the manifests and map pages of the object tier
//! (`blockd::manifest`), checksummed objects and lease records (`chunkstore::remote`).
//! None may panic; what decodes re-encodes consistently where the encoding is ours.

#![no_main]

use blockd::manifest::{Manifest, Page};
use chunkstore::remote::{LeaseRecord, append_checksum, strip_checksum};
use libfuzzer_sys::fuzz_target;
use snapshotter::decode;
use snapshotter::{CheckpointRecord, Seq, TimelineRecord, Version, VolumeRecord};

fuzz_target!(|data: &[u8]| {
    let _ = decode::decode_map_key(data);
    let _ = decode::decode_u64_key(data);
    let _ = decode::decode_checkpoint_key(data);
    let _ = decode::decode_i64(data);
    if let Ok(c) = decode::Counters::decode(data) {
        assert_eq!(decode::Counters::decode(&c.encode()).ok(), Some(c));
    }
    if let Ok(v) = decode::MapValue::decode(data) {
        assert_eq!(decode::MapValue::decode(&v.encode()).ok(), Some(v));
    }
    let seq = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let _ = Version::decode(Seq(seq), data);
    let _ = decode::record::<VolumeRecord>("volume", data);
    let _ = decode::record::<TimelineRecord>("timeline", data);
    let _ = decode::record::<CheckpointRecord>("checkpoint", data);

    if let Ok(m) = Manifest::decode(data) {
        // What a manifest decodes to encodes to a manifest that decodes the same way.
        let again = Manifest::decode(&m.encode()).expect("re-encoded manifest decodes");
        assert_eq!(again.encode(), m.encode());
    }
    if let Ok(p) = Page::decode(data) {
        let (bytes, _) = p.encode();
        Page::decode(&bytes).expect("re-encoded page decodes");
    }
    match strip_checksum(data) {
        Ok(body) => {
            let _ = serde_json::from_slice::<LeaseRecord>(body);
        }
        Err(_) => {
            // Any body with its checksum appended is accepted and given back unchanged.
            let mut obj = data.to_vec();
            append_checksum(&mut obj);
            assert_eq!(strip_checksum(&obj).expect("own checksum"), data);
        }
    }
});
